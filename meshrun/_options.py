"""PlacementOptions: every placement option, validated once, whether it comes from a function's keywords
(``meshrun.run``, ``submit``, ``plan``, ``@meshrun.job``), the ``[placement]`` config table or a CLI flag.

A bad value is a :class:`meshrun.SpecError` naming the option (a :class:`meshrun.ConfigError` naming
``placement.<option>`` when it came from the config) and what is allowed. An argument overrides the config,
which overrides the defaults; :func:`resolve_inputs` turns the merged options into what ranking reads.
"""

from __future__ import annotations

import contextvars
import enum
import math
import re
import time
from datetime import datetime, timedelta
from typing import Any, Mapping, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from ._errors import ConfigError, SpecError
from ._units import parse_duration

HOUR = 3600.0
DEFAULT_RUNTIME = HOUR
DEFAULT_UNKNOWN_START = HOUR
#: seconds a backend's offers are waited for at most (a backend named alone: this long)
DEFAULT_TIMEOUT = 10.0
#: seconds a backend has to answer (check and offers) before a submit skips it as not responding
DEFAULT_RESPOND_WITHIN = 1.0
#: seconds a backend that did not respond is skipped by every later submit of this user, without asking it
DEFAULT_SKIP_UNRESPONSIVE = 60.0
#: the backend that launches catalog (cloud) offers unless ``cloud_launcher`` says otherwise
DEFAULT_CLOUD_LAUNCHER = "skypilot"


class Objective(str, enum.Enum):
    """What placement optimises.

    COST: the lowest expected cost (price per hour of all nodes x expected runtime).
    START: the earliest expected start.
    BALANCED: the lowest cost + value_of_time x expected wait (hours).
    """

    COST = "cost"
    START = "start"
    BALANCED = "balanced"

    def __str__(self) -> str:
        return self.value


#: True while the ``[placement]`` table is validated: errors then name ``placement.<option>``
_from_config: contextvars.ContextVar[bool] = contextvars.ContextVar("meshrun_placement_config", default=False)


def _err(info: ValidationInfo, name: str, msg: str) -> SpecError:
    if _from_config.get():
        return ConfigError(f"placement.{name}", msg)
    return SpecError(name, msg)


def _seconds(v: Any, name: str, info: ValidationInfo) -> float:
    try:
        return parse_duration(v)
    except ValueError as e:
        raise _err(info, name, str(e)) from None


class PlacementOptions(BaseModel):
    """Where a job may run and what placement optimises. Every field is optional (None: not given, so the
    config or the default decides); docs/placement.md describes each one."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, arbitrary_types_allowed=True)

    objective: Objective | None = None
    runtime: float | None = None
    value_of_time: float | None = None
    unknown_start: float | None = None
    max_price_per_hour: float | None = None
    allow_spot: bool | None = None
    regions: tuple[str, ...] | None = None
    backends: tuple[str, ...] | None = None
    exclude_backends: tuple[str, ...] | None = None
    catalog_dir: str | None = None
    clouds: tuple[str, ...] | None = None
    cloud_launcher: str | None = None
    cloud_start: float | None = None
    offers_timeout: float | None = Field(default=None, validation_alias="timeout")
    respond_within: float | dict[str, float] | None = None
    skip_unresponsive_for: float | None = None
    #: seconds from the submit (a duration), or a point in time (datetime)
    deadline: float | datetime | None = None

    def __init__(self, **data: Any):
        """``PlacementOptions(objective="start", ...)``: a bad value raises SpecError naming the option."""
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise _translate(e, _from_config.get()) from None

    # ---- construction
    @classmethod
    def of(cls, options: PlacementOptions | None = None, /, **kw: Any) -> PlacementOptions:
        """Options from keyword arguments (``timeout`` is ``offers_timeout``), over ``options`` if given;
        ``None`` values are left out. A bad value raises SpecError naming the keyword."""
        given = {k: v for k, v in kw.items() if v is not None}
        made = cls._validate(given, config=False)
        return made if options is None else made.over(options)

    @classmethod
    def from_config(cls, table: Mapping[str, Any] | None = None) -> PlacementOptions:
        """The ``[placement]`` table (the current config's unless given); ConfigError names the key."""
        if table is None:
            from ._config import get_config

            table = get_config().section("placement")
        return cls._validate(dict(table), config=True)

    @classmethod
    def _validate(cls, data: dict[str, Any], *, config: bool) -> PlacementOptions:
        if "offers_timeout" in data and "timeout" not in data:
            data["timeout"] = data.pop("offers_timeout")
        elif "offers_timeout" in data:
            key = "placement.offers_timeout" if config else "offers_timeout"
            raise (ConfigError if config else SpecError)(key, "give timeout or offers_timeout, not both")
        token = _from_config.set(config)
        try:
            return cls(**data)
        finally:
            _from_config.reset(token)

    def over(self, base: PlacementOptions) -> PlacementOptions:
        """These options where given, else ``base``'s (arguments over the config)."""
        return base.model_copy(update={k: getattr(self, k) for k in self.given()})

    def given(self) -> dict[str, Any]:
        """The options that were set (not None)."""
        return {k: getattr(self, k) for k in type(self).model_fields if getattr(self, k) is not None}

    @classmethod
    def split(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """Take the placement keywords out of ``fields`` (a mix of job fields and placement options)."""
        return {k: fields.pop(k) for k in list(fields) if k in KEYWORDS}

    # ---- validators
    @field_validator("objective", mode="before")
    @classmethod
    def _v_objective(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None or isinstance(v, Objective):
            return v
        try:
            return Objective(str(v).lower())
        except ValueError:
            raise _err(info, "objective", f"expected one of {', '.join(o.value for o in Objective)}, got {v!r}") \
                from None

    @field_validator("runtime", "unknown_start", "cloud_start", mode="before")
    @classmethod
    def _v_duration(cls, v: Any, info: ValidationInfo) -> Any:
        return None if v is None else _seconds(v, str(info.field_name), info)

    @field_validator("value_of_time", "max_price_per_hour", mode="before")
    @classmethod
    def _v_price(cls, v: Any, info: ValidationInfo) -> Any:
        name = str(info.field_name)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise _err(info, name, f"expected a price in $ per hour (a number >= 0), got {v!r}")
        try:
            f = float(v)
        except ValueError:
            raise _err(info, name, f"expected a price in $ per hour (a number >= 0), got {v!r}") from None
        if not math.isfinite(f) or f < 0:
            raise _err(info, name, f"must be a number >= 0 ($ per hour), got {v!r}")
        return f

    @field_validator("allow_spot", mode="before")
    @classmethod
    def _v_bool(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None or isinstance(v, bool):
            return v
        raise _err(info, "allow_spot", f"expected true or false, got {v!r}")

    @field_validator("regions", "backends", "exclude_backends", mode="before")
    @classmethod
    def _v_names(cls, v: Any, info: ValidationInfo) -> Any:
        """One name or a list of names (regions may hold wildcards); backend names lose repeats."""
        if v is None:
            return None
        name = str(info.field_name)
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple, set, frozenset)) or not all(isinstance(x, str) and x.strip() for x in v):
            what = ("region names (wildcards allowed, e.g. \"us-*\")" if name == "regions" else "backend names")
            raise _err(info, name, f"expected a list of {what}, got {v!r}")
        return tuple(v) if name == "regions" else tuple(sorted(set(v), key=list(v).index))

    @field_validator("clouds", mode="before")
    @classmethod
    def _v_clouds(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None:
            return None
        if not isinstance(v, (list, tuple)) or not all(isinstance(c, str) for c in v):
            raise _err(info, "clouds", f"expected a list of cloud names such as [\"lambda\"], got {v!r}")
        return tuple(v)

    @field_validator("cloud_launcher", mode="before")
    @classmethod
    def _v_launcher(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None:
            return None
        if not isinstance(v, str) or not v:
            raise _err(info, "cloud_launcher", f"expected a backend name, got {v!r}")
        return v

    @field_validator("catalog_dir", mode="before")
    @classmethod
    def _v_path(cls, v: Any, info: ValidationInfo) -> Any:
        import os

        if v is None:
            return None
        if not isinstance(v, (str, os.PathLike)) or not str(os.fspath(v)):
            raise _err(info, "catalog_dir", f"expected a folder (a SkyPilot catalogs/v8 folder), got {v!r}")
        return str(os.fspath(v))

    @field_validator("offers_timeout", mode="before")
    @classmethod
    def _v_timeout(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise _err(info, "offers_timeout", f"expected seconds >= 0, got {v!r}")
        return float(v)

    @field_validator("respond_within", mode="before")
    @classmethod
    def _v_respond(cls, v: Any, info: ValidationInfo) -> Any:
        def secs(key: str, x: Any) -> float:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
                raise _err(info, key, f"expected seconds >= 0 (0 turns the limit off), got {x!r}")
            return float(x)

        if v is None:
            return None
        if isinstance(v, Mapping):
            return {str(k): secs(f"respond_within.{k}", x) for k, x in v.items()}
        return secs("respond_within", v)

    @field_validator("skip_unresponsive_for", mode="before")
    @classmethod
    def _v_skip(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None:
            return None
        if (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0) or (
                isinstance(v, str) and re.fullmatch(r"\s*0+(\.0*)?\s*[smhd]?\s*", v)):
            return 0.0
        return _seconds(v, "skip_unresponsive_for", info)

    @field_validator("deadline", mode="before")
    @classmethod
    def _v_deadline(cls, v: Any, info: ValidationInfo) -> Any:
        """A duration (seconds, "1h", a timedelta) or a point in time (a datetime, or an ISO 8601 string;
        naive means local time)."""
        if v is None or isinstance(v, datetime):
            return v
        if isinstance(v, str):
            try:
                return parse_duration(v)
            except ValueError:
                pass
            try:
                return datetime.fromisoformat(v.strip())
            except ValueError:
                raise _err(info, "deadline", "expected a duration such as \"1h\" or \"90m\", seconds, a datetime or "
                           f"an ISO time such as \"2030-01-31T18:00\", got {v!r}") from None
        if isinstance(v, (int, float, timedelta)) and not isinstance(v, bool):
            return _seconds(v, "deadline", info)
        raise _err(info, "deadline", f"expected a duration, seconds or a datetime, got {type(v).__name__}")


def _translate(e: ValidationError, config: bool) -> SpecError:
    """The one error of a failed validation: ours as raised, pydantic's as a SpecError (ConfigError from the
    config) naming the option and what is allowed."""
    err = e.errors(include_url=False)[0]
    orig = (err.get("ctx") or {}).get("error")
    if isinstance(orig, SpecError):
        return orig
    name = ".".join(str(p) for p in err.get("loc", ()))
    name = "offers_timeout" if name == "timeout" else name
    if err.get("type") == "extra_forbidden":
        if config:
            return ConfigError(f"placement.{name}", "unknown placement setting; the valid ones are: " + ", ".join(FIELDS))
        return SpecError(name, "not a placement option; the options are: " + ", ".join(FIELDS))
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return ConfigError(f"placement.{name}", msg) if config else SpecError(name, msg)


#: every option, in the order the config's error message lists them
FIELDS = tuple(PlacementOptions.model_fields)
#: what a function's keywords may name: the options, and ``timeout`` for ``offers_timeout``
KEYWORDS = frozenset(FIELDS) | {"timeout"}


def effective(options: PlacementOptions | None = None) -> PlacementOptions:
    """``options`` over the ``[placement]`` config."""
    conf = PlacementOptions.from_config()
    return conf if options is None else options.over(conf)


def known_backends(options: PlacementOptions | None = None) -> list[str]:
    """Every backend name placement accepts: known to meshrun, installed, or registered in-process."""
    from ._registry import KNOWN, installed_backends

    launcher = (options.cloud_launcher if options is not None else None) or DEFAULT_CLOUD_LAUNCHER
    return sorted(set(KNOWN) | set(installed_backends()) | {launcher}, key=lambda n: (n != "local", n))


def check_names(o: PlacementOptions, given: PlacementOptions | None) -> None:
    """Every backend name in ``o`` is one placement knows (SpecError naming the option when it was
    ``given`` as an argument, else ConfigError naming ``placement.<option>``)."""
    valid: list[str] | None = None
    for name in ("backends", "exclude_backends"):
        names = getattr(o, name)
        if names:
            valid = valid if valid is not None else known_backends(o)
            bad = [x for x in names if x not in valid]
            if bad:
                msg = f"unknown backend {bad[0]!r}; the backends are: {', '.join(valid)}"
                if given is not None and getattr(given, name) is not None:
                    raise SpecError(name, msg)
                raise ConfigError(f"placement.{name}", msg)


def resolve_inputs(options: PlacementOptions | None = None, *, now: float | None = None) -> dict[str, Any]:
    """What ranking reads: ``options`` over the ``[placement]`` config over the defaults, with the backend
    names checked against the known backends and the deadline turned into seconds from ``now``."""
    o = effective(options)
    check_names(o, options)
    now = time.time() if now is None else now
    objective = o.objective
    if objective is None:
        objective = Objective.BALANCED if o.value_of_time is not None else Objective.COST
    if objective is Objective.BALANCED and o.value_of_time is None:
        raise SpecError("value_of_time", "the balanced objective needs value_of_time: what an hour of waiting is "
                        "worth to you, in $ (e.g. value_of_time=20)")
    if o.backends is not None and o.exclude_backends is not None:
        both = [b for b in o.backends if b in o.exclude_backends]
        if both:
            raise SpecError("exclude_backends", f"{both[0]!r} is both allowed (backends) and excluded")
    return {
        "objective": objective,
        "runtime": o.runtime or DEFAULT_RUNTIME,
        "deadline": _deadline_seconds(o.deadline, now),
        "value_of_time": o.value_of_time,
        "max_price_per_hour": o.max_price_per_hour,
        "backends": list(o.backends) if o.backends is not None else None,
        "exclude_backends": list(o.exclude_backends) if o.exclude_backends is not None else None,
        "allow_spot": bool(o.allow_spot),
        "regions": list(o.regions) if o.regions is not None else None,
        "unknown_start": o.unknown_start if o.unknown_start is not None else DEFAULT_UNKNOWN_START,
    }


def _deadline_seconds(v: float | datetime | None, now: float) -> float | None:
    if v is None or not isinstance(v, datetime):
        return v
    ts = v.timestamp() if v.tzinfo is not None else v.astimezone().timestamp()
    secs = ts - now
    if secs <= 0:
        raise SpecError("deadline", f"{v.isoformat()} is already past")
    return secs


class RespondLimits(NamedTuple):
    default: float  # seconds; 0 = no limit of its own (the backend is waited for up to offers_timeout)
    per_backend: Mapping[str, float]
    skip_for: float  # seconds an unresponsive backend is skipped; 0 = not remembered

    def of(self, name: str) -> float:
        return self.per_backend.get(name, self.default)


def respond_limits(options: PlacementOptions | None = None) -> RespondLimits:
    """``respond_within`` (seconds, or a table by backend name with an optional ``default``) and
    ``skip_unresponsive_for`` (0 = do not remember) of ``options`` (else the config), with the defaults."""
    o = options if options is not None else PlacementOptions.from_config()
    raw = o.respond_within if o.respond_within is not None else DEFAULT_RESPOND_WITHIN
    if isinstance(raw, dict):
        per = dict(raw)
        default = per.pop("default", DEFAULT_RESPOND_WITHIN)
    else:
        per, default = {}, raw
    skip = o.skip_unresponsive_for if o.skip_unresponsive_for is not None else DEFAULT_SKIP_UNRESPONSIVE
    return RespondLimits(default, per, skip)
