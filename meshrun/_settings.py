"""Declared backend settings and options: the models a backend names, and the core's validation of them.

A backend declares two pydantic models as class attributes (docs/writing-a-backend.md):

    class MyBackend(mb.Backend):
        settings_model = MySettings    # [backends.mine] + MESHRUN_MINE_<KEY>; mb.BackendSettings subclass
        options_model = MyOptions      # backend_options["mine"] of a job; mb.BackendOptions subclass

The core loads the settings when the backend is created (``backend.settings``) and validates every job's
``backend_options[name]`` before placement (``backend.options(spec)`` gives the validated model). Errors name
the backend, the key and what is allowed. A model lists renamed keys in ``renamed = {"old": "new"}``: the old
name still works and warns (``DeprecationWarning``).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ._errors import ConfigError, SpecError

M = TypeVar("M", bound="_Declared")

_SECRET_WORDS = ("token", "password", "secret", "key")


#: settings no backend has any more, and where each went: a config that still sets one is told so
MOVED = {
    "price_per_gpu_hour": "prices are set in [prices] for every backend alike: [prices.{b}] (or "
                          "[prices.\"{b}:<host or partition>\"]) with GPU types, default, cpu and memory "
                          "(docs/placement.md, Prices)",
    "price_per_cpu_hour": "prices are set in [prices]: cpu = <$ per CPU-hour> in [prices.{b}] (docs/placement.md)",
    "pool_price_per_hour": "pools are priced in [prices]: [prices.\"{b}:<infra>\"] (docs/placement.md)",
}


class _Declared(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: keys renamed since an earlier release: {old name: new name}; the old one warns and still works
    renamed: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _new_names(cls, data: Any) -> Any:
        if not cls.renamed or not isinstance(data, Mapping):
            return data
        data = dict(data)
        for old, new in cls.renamed.items():
            if old in data:
                warnings.warn(f"the setting {old!r} of {cls.__name__} is now called {new!r}; the old name will go "
                              "in a later release", DeprecationWarning, stacklevel=2)
                if new in data:
                    raise ValueError(f"set only {new!r} (the new name of {old!r})")
                data[new] = data.pop(old)
        return data

    @classmethod
    def _explain(cls, backend: str, e: ValidationError, what: str) -> tuple[str, str]:
        """(key, message) for the first error, naming the backend and what is allowed."""
        # of a union's errors (a host given as a name or a table), the one that went deepest; the union's
        # branch names (a class or a type, "HostSettings", "str") are not part of the key
        err = max(e.errors(include_url=False), key=lambda x: len(x.get("loc", ())))
        branches = {"str", "int", "float", "bool", "list", "dict"}
        loc = [str(p) for p in err.get("loc", ())
               if not (isinstance(p, str) and (p[:1].isupper() or "[" in p or p in branches))]
        key = ".".join(loc)
        if err.get("type") == "extra_forbidden" and loc and loc[-1] in MOVED:
            return key, f"{loc[-1]!r} is no longer a setting: {MOVED[loc[-1]].format(b=backend)}"
        if err.get("type") == "extra_forbidden" and len(loc) > 1:
            return key, f"unknown {what} {loc[-1]!r} in {'.'.join(loc[:-1])} for the {backend} backend"
        if err.get("type") == "extra_forbidden":
            valid = ", ".join(sorted(cls.model_fields)) or "(none)"
            return key, f"unknown {what} {key!r} for the {backend} backend; the valid {what}s are: {valid}"
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, SpecError):  # a validator that already knows its field
            return ctx_err.field, ctx_err.message
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        name = loc[0] if loc else ""
        field = cls.model_fields.get(name)
        secret = any(w in name.lower() for w in _SECRET_WORDS) or (
            field is not None and "Secret" in str(field.annotation))
        return key, f"{msg} (got {'**********' if secret else repr(err.get('input'))}; {backend} backend)"


class BackendSettings(_Declared):
    """Base of every backend's typed settings (``[backends.<name>]``): unknown keys are errors that list the
    valid ones. Declare the keys with defaults; the core calls ``load(name, table)``."""

    @classmethod
    def load(cls: type[M], backend: str, table: Mapping[str, Any] | None) -> M:
        try:
            return cls(**dict(table or {}))
        except ValidationError as e:
            key, msg = cls._explain(backend, e, "setting")
            raise ConfigError(f"backends.{backend}.{key}", msg) from None


class BackendOptions(_Declared):
    """Base of every backend's per-job options (``backend_options[<name>]``): unknown keys are errors that
    list the valid ones; a bad value is a :class:`meshrun.SpecError` naming ``backend_options.<name>.<key>``."""

    @classmethod
    def load(cls: type[M], backend: str, options: Mapping[str, Any] | None) -> M:
        where = f"backend_options.{backend}"
        if options is not None and not isinstance(options, Mapping):
            raise SpecError(where, f"must be a mapping of {backend} options", options)
        try:
            return cls(**dict(options or {}))
        except ValidationError as e:
            key, msg = cls._explain(backend, e, "option")
            raise SpecError(key if key.startswith("backend_options.") else f"{where}.{key}", msg) from None
