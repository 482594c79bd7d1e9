"""JobSpec and Resources: what a job is, defined once, placed anywhere.

Both are frozen pydantic v2 models. Every validation failure is raised as :class:`meshrun.SpecError`
naming the field and what is allowed, never as a pydantic ``ValidationError``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
from typing import Annotated, Any, Callable, Mapping

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
    field_serializer,
    field_validator,
    model_validator,
)

from ._data import DataError, DataInput, DataOutput, parse_inputs, parse_outputs
from ._errors import SpecError
from ._units import (
    DURATION_HELP,
    GPU_HELP,
    SIZE_HELP,
    format_duration,
    format_size,
    parse_duration,
    parse_gpus,
    parse_size,
)

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FUNC_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_<>][\w.<>]*$")
_BACKEND_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_RESERVED_ENV = ("CUDA_VISIBLE_DEVICES", "MESHRUN_JOB_ID", "MESHRUN_JOB_DIR", "MESHRUN_JOB_NAME")
RESOURCE_FIELDS = ("gpus", "gpu_type", "gpu_alternatives", "gpu_memory", "cpus", "memory", "disk", "nodes")
#: the fields that make up the GPU request: a new value for one of them replaces the alternatives
GPU_REQUEST_FIELDS = ("gpus", "gpu_type", "gpu_alternatives")


def _no_nul(value: str, what: str) -> str:
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters (they cannot be passed to a process)")
    return value


class Resources(BaseModel):
    """What a job needs, per node: ``gpus`` (count), ``gpu_type``, ``gpu_memory`` (bytes, minimum per GPU),
    ``cpus``, ``memory`` and ``disk`` (bytes), and the number of ``nodes``.

    ``gpu_alternatives`` says the job can run on any one of several GPU requests, most preferred first
    (``["L4:1", "A10G:1"]``); ``gpus``/``gpu_type`` then hold the first. Placement asks for each alternative
    and ranks them all by their own prices; a backend given the spec as is runs the first."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    gpus: int = Field(0, description=f"GPUs per node: {GPU_HELP}")
    gpu_type: str | None = Field(None, description='GPU model, e.g. "H100", "A100-80GB"')
    gpu_alternatives: tuple[str, ...] = Field(
        (), description='GPU requests the job accepts instead, most preferred first, e.g. ["L4:1", "A10G:1"]; '
                        "gpus and gpu_type are the first")
    gpu_memory: int | None = Field(None, description=f"minimum memory per GPU: {SIZE_HELP}")
    cpus: float | None = Field(None, description="CPU cores per node")
    memory: int | None = Field(None, description=f"host memory per node: {SIZE_HELP}")
    disk: int | None = Field(None, description=f"disk per node: {SIZE_HELP}")
    nodes: int = Field(1, description="number of nodes (1 to 4096)")

    @model_validator(mode="before")
    @classmethod
    def _split_gpu_request(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("gpu_alternatives"):
            data = _first_alternative(data)
        if isinstance(data, Mapping) and isinstance(data.get("gpus"), str):
            data = dict(data)
            try:
                count, gtype = parse_gpus(data["gpus"])
            except ValueError as e:
                raise SpecErrorSignal("gpus", str(e)) from None
            data["gpus"] = count
            if gtype is not None:
                if data.get("gpu_type") not in (None, gtype):
                    raise SpecErrorSignal(
                        "gpu_type",
                        f"conflicts with gpus={gtype}:{count}; give the type once",
                    )
                data["gpu_type"] = gtype
        return data

    @field_validator("gpus", mode="before")
    @classmethod
    def _v_gpus(cls, v: Any) -> int:
        count, gtype = parse_gpus(v)
        return count

    @field_validator("gpu_type", mode="before")
    @classmethod
    def _v_gpu_type(cls, v: Any) -> str | None:
        if v is None:
            return None
        if not isinstance(v, str):
            raise ValueError(f"expected a GPU model name such as 'H100', got {type(v).__name__}")
        parse_gpus(f"{v}:1")  # same character rules
        return v

    @field_validator("gpu_alternatives", mode="before")
    @classmethod
    def _v_gpu_alternatives(cls, v: Any) -> tuple[str, ...]:
        return normalize_alternatives(v)

    @field_validator("gpu_memory", "memory", "disk", mode="before")
    @classmethod
    def _v_size(cls, v: Any) -> int | None:
        if v is None:
            return None
        n = parse_size(v)
        if n == 0:
            raise ValueError("must be more than 0 (leave it out for no requirement)")
        return n

    @field_validator("cpus", mode="before")
    @classmethod
    def _v_cpus(cls, v: Any) -> float | None:
        if v is None:
            return None
        if isinstance(v, bool):
            raise ValueError("expected a number of CPU cores such as 4 or 0.5")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number of CPU cores such as 4 or 0.5, got {v!r}") from None
        if not (0 < f <= 4096):
            raise ValueError(f"must be more than 0 and at most 4096, got {v!r}")
        return f

    @field_validator("nodes", mode="before")
    @classmethod
    def _v_nodes(cls, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, str) and not v.strip().isdigit()):
            raise ValueError(f"expected a whole number of nodes from 1 to 4096, got {v!r}")
        n = int(v)
        if not 1 <= n <= 4096:
            raise ValueError(f"expected a whole number of nodes from 1 to 4096, got {v!r}")
        return n

    def alternatives(self) -> list["Resources"]:
        """One Resources per GPU alternative, most preferred first (just this one when there are none)."""
        if not self.gpu_alternatives:
            return [self]
        out = []
        for alt in self.gpu_alternatives:
            count, gtype = parse_gpus(alt)
            out.append(self.model_copy(update={"gpus": count, "gpu_type": gtype, "gpu_alternatives": ()}))
        return out

    @property
    def gpu_request(self) -> str | None:
        """The request in the usual ``TYPE:COUNT`` form (None for CPU jobs)."""
        if not self.gpus:
            return None
        return f"{self.gpu_type}:{self.gpus}" if self.gpu_type else str(self.gpus)

    def describe(self) -> str:
        parts = []
        if self.nodes > 1:
            parts.append(f"{self.nodes} nodes x")
        if self.gpus:
            parts.append(f"{self.gpus} {self.gpu_type or ''} GPU{'s' if self.gpus != 1 else ''}".replace("  ", " "))
        if len(self.gpu_alternatives) > 1:
            parts.append(f"(or {' or '.join(self.gpu_alternatives[1:])})")
        if self.cpus:
            parts.append(f"{self.cpus:g} CPUs")
        if self.memory:
            parts.append(format_size(self.memory))
        return " ".join(parts) or "any"


def normalize_alternatives(v: Any) -> tuple[str, ...]:
    """GPU alternatives as "TYPE:COUNT" texts, in the order given (duplicates dropped; one alone is no choice)."""
    full = _alternative_list(v)
    return tuple(full) if len(full) > 1 else ()


def _alternative_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
        raise ValueError(f'expected a list of GPU requests such as ["L4:1", "A10G:1"], got {v!r}')
    out: list[str] = []
    for i, item in enumerate(v):
        try:
            count, gtype = parse_gpus(item)
        except ValueError as e:
            raise ValueError(f"alternative {i + 1}: {e}") from None
        if gtype is None or count < 1:
            raise ValueError(f"alternative {i + 1} must name a GPU model and count, such as 'L4:1', got {item!r}")
        text = f"{gtype}:{count}"
        if text not in out:
            out.append(text)
    return out


def _first_alternative(data: Mapping[str, Any]) -> dict[str, Any]:
    """Fill gpus/gpu_type from the first alternative; a gpus/gpu_type given as well must be that one."""
    data = dict(data)
    try:
        full = _alternative_list(data["gpu_alternatives"])
    except ValueError as e:
        raise SpecErrorSignal("gpu_alternatives", str(e)) from None
    count, gtype = parse_gpus(full[0])
    given, given_type = data.get("gpus"), data.get("gpu_type")
    if isinstance(given, str):
        try:
            given, typed = parse_gpus(given)
        except ValueError as e:
            raise SpecErrorSignal("gpus", str(e)) from None
        given_type = typed or given_type
    if given not in (None, 0, count) or given_type not in (None, gtype):
        raise SpecErrorSignal("gpu_alternatives", f"the first alternative ({full[0]}) must be the request that "
                              "gpus/gpu_type give, or leave those out")
    data.update(gpus=count, gpu_type=gtype, gpu_alternatives=tuple(full) if len(full) > 1 else ())
    return data


class SpecErrorSignal(ValueError):
    """Raised inside validators to pin an error on a field other than the one being validated."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(message)


def _func_ref(fn: Any) -> str:
    if isinstance(fn, str):
        return fn
    mod = getattr(fn, "__module__", None) or "__main__"
    qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return f"{mod}:{qual}"


def _json_value(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return {"__repr__": repr(v)}


FunctionField = Annotated[
    Any,
    PlainSerializer(lambda f: None if f is None else _func_ref(f), return_type=Any),
    WithJsonSchema(
        {
            "anyOf": [{"type": "string", "pattern": _FUNC_REF.pattern}, {"type": "null"}],
            "description": 'a Python callable, serialised as "module:qualname"',
        }
    ),
]


#: readers of other tools' job files, by format ("skypilot", "skypilot-pipeline", "dstack": a path and
#: ``env=`` -> JobSpec, or a list of them for a pipeline), registered by :mod:`meshrun._jobfile`, so that this
#: module depends on none of them
FILE_READERS: dict[str, Callable[..., Any]] = {}


def _file_reader(kind: str) -> Callable[..., Any]:
    reader = FILE_READERS.get(kind)
    if reader is None:
        raise SpecError("", f"the {kind} job-file reader is not loaded (import meshrun, which loads it with JobSpec)")
    return reader


class JobSpec(BaseModel):
    """A job, defined once: a command (argv list, or a string run by bash) or a Python function with its
    arguments, the resources it needs, its environment, files and time limit.

    Resource fields may be given flat (``JobSpec(command=[...], gpus="H100:8", memory="32GiB")``) or as
    ``resources=Resources(...)``. Invalid input raises :class:`meshrun.SpecError`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True, validate_default=False)

    name: str | None = Field(None, description="a human name; any text (shown as is, sanitised per backend)")
    command: list[str] | str | None = Field(
        None, description="argv list (run without a shell) or a string run by bash -c"
    )
    function: FunctionField = None
    args: tuple[Any, ...] = Field((), description="positional arguments for the function")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the function")
    resources: Resources = Field(default_factory=Resources)
    time_limit: float | None = Field(None, description=f"wall-clock limit in seconds; {DURATION_HELP}")
    env: dict[str, str] = Field(default_factory=dict, description="environment variables for the job")
    secrets: dict[str, str | None] = Field(
        default_factory=dict, repr=False,
        description="environment variables whose values are secret: they reach the job's environment but are "
                    "never written (the job store, plans and status hold their names only); a null value is "
                    "taken from the submitter's environment at submit")
    workdir: str | None = Field(None, description="working directory (shipped to remote backends)")
    files: dict[str, str] = Field(
        default_factory=dict, description="extra files to place: {target path: local source path}"
    )
    setup: list[str] = Field(default_factory=list, description="shell commands run before the job")
    backend: str | None = Field(None, description="run on this backend instead of letting placement choose")
    backend_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description='per-backend settings, e.g. {"slurm": {"partition": "gpu"}}'
    )
    image: str | None = Field(None, description="container image for container backends")
    max_pending: float | None = Field(
        None, description="move the job to the next offer if it waits longer than this (seconds)"
    )
    retries: int = Field(0, description="times to resubmit a job that failed (0 to 100)")
    labels: dict[str, str] = Field(default_factory=dict, description="free-form labels for your own use")
    inputs: tuple[DataInput, ...] = Field(
        (), description='object-store data the job reads: {"s3://bucket/prefix/": "path/"} or a list of '
                        '{source, path}; downloaded on the node before the job starts (docs/data.md)')
    outputs: tuple[DataOutput, ...] = Field(
        (), description='what the job writes that goes to object storage: {"path/": "s3://bucket/prefix/"} or '
                        '{path: {destination, on: [success, failure, cancel], every: "10m"}} (docs/data.md)')
    # experiment tracking (meshrun/_tracking.py): None = the config's [tracking] table
    track: dict[str, dict[str, Any]] | None = Field(
        None, description='experiment tracking: "wandb,mlflow,tensorboard", a list, {tool: {settings}}, or False'
    )

    @field_validator("inputs", mode="before")
    @classmethod
    def _v_inputs(cls, v: Any) -> tuple[DataInput, ...]:
        try:
            return parse_inputs(v)
        except DataError as e:
            raise SpecErrorSignal(e.field, e.message) from None

    @field_validator("outputs", mode="before")
    @classmethod
    def _v_outputs(cls, v: Any) -> tuple[DataOutput, ...]:
        try:
            return parse_outputs(v)
        except DataError as e:
            raise SpecErrorSignal(e.field, e.message) from None

    @field_validator("track", mode="before")
    @classmethod
    def _v_track(cls, v: Any) -> dict[str, dict[str, Any]] | None:
        from ._tracking import normalize

        return normalize(v)

    # ---- construction: every error is a SpecError -------------------------------------------------
    def __init__(self, **data: Any):
        try:
            super().__init__(**_lift_resources(data))
        except ValidationError as e:
            raise _to_spec_error(e, type(self)) from None
        except SpecErrorSignal as e:
            raise SpecError(e.field, e.message) from None

    @classmethod
    def from_dict(cls, data: Any) -> "JobSpec":
        if not isinstance(data, Mapping):
            raise SpecError("", f"a job spec must be a mapping of fields, got {type(data).__name__}")
        for k in data:
            if not isinstance(k, str):
                raise SpecError(str(k), "field names must be strings")
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str | bytes) -> "JobSpec":
        try:
            data = json.loads(text)
        except (ValueError, TypeError) as e:
            raise SpecError("", f"not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_skypilot_yaml(cls, path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> "JobSpec":
        """The job described by an existing SkyPilot task YAML (``run``, ``setup``, ``envs``, ``secrets``,
        ``workdir``, ``num_nodes``, ``file_mounts``, ``resources``); what only SkyPilot understands is kept in
        ``backend_options["skypilot"]``. ``env`` is merged over the task's envs (and fills null ones).
        docs/job-files.md says how each field maps. ``meshrun run task.yaml`` uses this."""
        return _file_reader("skypilot")(path, env=env)

    @classmethod
    def from_dstack_yaml(cls, path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> "JobSpec":
        """The job described by a dstack task configuration (``type: task``, a ``.dstack.yml``): commands,
        env, image, nodes, files, resources; dstack settings without a JobSpec field go to
        ``backend_options["dstack"]``; a field meshrun cannot express (ports, GPU count ranges, ...) is a
        SpecError naming it. docs/job-files.md says how each field maps."""
        return _file_reader("dstack")(path, env=env)

    @classmethod
    def pipeline_from_skypilot_yaml(cls, path: str | os.PathLike[str], *,
                                    env: Mapping[str, str] | None = None) -> list["JobSpec"]:
        """Every task of a SkyPilot pipeline (a multi-document task YAML), in order (one for a plain task)."""
        return list(_file_reader("skypilot-pipeline")(path, env=env))

    def to_json(self, **kw: Any) -> str:
        """JSON text; a function is written as its "module:qualname" reference."""
        return self.model_dump_json(**kw)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        return cls.model_json_schema()

    def replace(self, **changes: Any) -> "JobSpec":
        """A new spec with some fields changed (validated like a new one; resource fields may be flat)."""
        data = {k: getattr(self, k) for k in type(self).model_fields if k != "resources"}
        if "resources" in changes:
            data["resources"] = changes.pop("resources")
        elif any(k in changes for k in RESOURCE_FIELDS):
            flat = self.resources.model_dump()
            g = changes.get("gpus")
            if isinstance(g, str) and not g.strip().isdigit() and "gpu_type" not in changes:
                flat.pop("gpu_type")  # "H100:2" brings its own type
            if any(k in changes for k in GPU_REQUEST_FIELDS) and "gpu_alternatives" not in changes:
                flat.pop("gpu_alternatives")  # a new GPU request replaces the alternatives
            flat.update({k: changes.pop(k) for k in RESOURCE_FIELDS if k in changes})
            data.update(flat)
        else:
            data["resources"] = self.resources
        data.update(changes)
        return type(self)(**data)

    # ---- convenience ---------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return "function" if self.function is not None else "command"

    @property
    def gpus(self) -> int:
        return self.resources.gpus

    @property
    def nodes(self) -> int:
        return self.resources.nodes

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.function is not None:
            return _func_ref(self.function).split(":")[-1]
        if isinstance(self.command, str):
            return self.command.split()[0] if self.command.split() else "job"
        return os.path.basename(self.command[0]) if self.command else "job"

    def resolve_function(self) -> Callable[..., Any]:
        """The callable, importing a "module:qualname" reference if need be."""
        fn = self.function
        if not isinstance(fn, str):
            return fn
        mod_name, _, qual = fn.partition(":")
        try:
            obj: Any = importlib.import_module(mod_name)
            for part in qual.split("."):
                obj = getattr(obj, part)
        except Exception as e:
            raise SpecError("function", f"cannot import {fn!r}: {type(e).__name__}: {e}") from None
        if not callable(obj):
            raise SpecError("function", f"{fn!r} is not callable")
        return obj

    def options_for(self, backend: str) -> dict[str, Any]:
        return dict(self.backend_options.get(backend) or {})

    def summary(self) -> str:
        what = (
            _func_ref(self.function) + "(...)"
            if self.function is not None
            else (self.command if isinstance(self.command, str) else shlex.join(self.command or []))
        )
        extra = f", time limit {format_duration(self.time_limit)}" if self.time_limit else ""
        return f"{self.display_name}: {what} [{self.resources.describe()}{extra}]"

    # ---- validators ----------------------------------------------------------------------------
    @field_validator("name", mode="before")
    @classmethod
    def _v_name(cls, v: Any) -> str | None:
        if v is None:
            return None
        if not isinstance(v, str):
            raise ValueError(f"expected text, got {type(v).__name__}")
        if not v.strip():
            raise ValueError("must not be empty or blank (leave it out to use the command's name)")
        if len(v) > 256:
            raise ValueError(f"must be at most 256 characters, got {len(v)}")
        return _no_nul(v, "the name")

    @field_validator("command", mode="before")
    @classmethod
    def _v_command(cls, v: Any) -> list[str] | str | None:
        if v is None:
            return None
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("a command string must not be empty")
            return _no_nul(v, "the command")
        if isinstance(v, (list, tuple)):
            if not v:
                raise ValueError("an argv list must hold at least the program to run")
            out = []
            for i, a in enumerate(v):
                if isinstance(a, os.PathLike):
                    a = os.fspath(a)
                if isinstance(a, (int, float)) and not isinstance(a, bool):
                    a = str(a)
                if not isinstance(a, str):
                    raise ValueError(f"argv[{i}] must be text, got {type(a).__name__}")
                out.append(_no_nul(a, f"argv[{i}]"))
            if not out[0]:
                raise ValueError("argv[0], the program, must not be empty")
            return out
        raise ValueError(f"expected an argv list or a command string, got {type(v).__name__}")

    @field_validator("function", mode="before")
    @classmethod
    def _v_function(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, str):
            if not _FUNC_REF.match(v):
                raise ValueError(f'expected a callable or a "module:qualname" reference, got {v!r}')
            return v
        if not callable(v):
            raise ValueError(f"expected a callable, got {type(v).__name__}")
        return getattr(v, "__meshrun_function__", v)

    @field_validator("args", mode="before")
    @classmethod
    def _v_args(cls, v: Any) -> tuple[Any, ...]:
        if v is None:
            return ()
        if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__") or isinstance(v, Mapping):
            raise ValueError(f"expected a list or tuple of positional arguments, got {type(v).__name__}")
        return tuple(v)

    @field_validator("kwargs", mode="before")
    @classmethod
    def _v_kwargs(cls, v: Any) -> dict[str, Any]:
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise ValueError(f"expected a mapping of keyword arguments, got {type(v).__name__}")
        for k in v:
            if not isinstance(k, str) or not k.isidentifier():
                raise ValueError(f"keyword argument names must be identifiers, got {k!r}")
        return dict(v)

    @field_serializer("args")
    def _s_args(self, v: tuple[Any, ...]) -> list[Any]:
        return [_json_value(a) for a in v]

    @field_serializer("kwargs")
    def _s_kwargs(self, v: dict[str, Any]) -> dict[str, Any]:
        return {k: _json_value(a) for k, a in v.items()}

    @field_validator("time_limit", "max_pending", mode="before")
    @classmethod
    def _v_duration(cls, v: Any) -> float | None:
        return None if v is None else parse_duration(v)

    @field_validator("env", mode="before")
    @classmethod
    def _v_env(cls, v: Any) -> dict[str, str]:
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise ValueError(f"expected a mapping of NAME to value, got {type(v).__name__}")
        out = {}
        for k, val in v.items():
            if not isinstance(k, str) or not _ENV_KEY.match(k):
                raise ValueError(
                    f"variable names must match [A-Za-z_][A-Za-z0-9_]* , got {k!r}"
                )
            if k in _RESERVED_ENV:
                hint = " (ask for GPUs with gpus=...; meshrun sets it to the leased GPUs)" if k.startswith("CUDA") else ""
                raise ValueError(f"{k} is set by meshrun and cannot be given{hint}")
            if isinstance(val, bool) or not isinstance(val, (str, int, float)):
                raise ValueError(f"the value of {k} must be text, got {type(val).__name__}")
            out[k] = _no_nul(str(val), f"the value of {k}")
        return out

    @field_validator("secrets", mode="before")
    @classmethod
    def _v_secrets(cls, v: Any) -> dict[str, str | None]:
        if v is None:
            return {}
        if isinstance(v, (list, tuple)):  # names only: each taken from the submitter's environment
            v = {k: None for k in v}
        if not isinstance(v, Mapping):
            raise ValueError(f"expected a mapping of NAME to value (or a list of names), got {type(v).__name__}")
        out: dict[str, str | None] = {}
        for k, val in v.items():
            if not isinstance(k, str) or not _ENV_KEY.match(k):
                raise ValueError(f"variable names must match [A-Za-z_][A-Za-z0-9_]* , got {k!r}")
            if k in _RESERVED_ENV:
                raise ValueError(f"{k} is set by meshrun and cannot be given")
            if val is not None and (isinstance(val, bool) or not isinstance(val, (str, int, float))):
                raise ValueError(f"the value of {k} must be text (or null: from the environment at submit), "
                                 f"got {type(val).__name__}")
            out[k] = None if val is None else _no_nul(str(val), f"the value of {k}")
        return out

    @field_serializer("secrets")
    def _s_secrets(self, v: dict[str, str | None]) -> dict[str, None]:
        return {k: None for k in v}  # never the values: they are resolved again at submit

    def resolved_secrets(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The secrets' values, a null one taken from ``environ`` (default: ``os.environ``); one that is
        nowhere is a SpecError naming it."""
        environ = os.environ if environ is None else environ
        out = {}
        for k, v in self.secrets.items():
            if v is None:
                if k not in environ:
                    raise SpecError(f"secrets.{k}", f"has no value and {k} is not set in the environment of the "
                                    "submitting process; export it (or give the value) before submitting")
                v = environ[k]
            out[k] = v
        return out

    @field_validator("workdir", mode="before")
    @classmethod
    def _v_workdir(cls, v: Any) -> str | None:
        if v is None:
            return None
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if not isinstance(v, str) or not v:
            raise ValueError("expected a directory path")
        return _no_nul(v, "the working directory")

    @field_validator("files", mode="before")
    @classmethod
    def _v_files(cls, v: Any) -> dict[str, str]:
        if v is None:
            return {}
        items: list[tuple[Any, Any]]
        if isinstance(v, Mapping):
            items = list(v.items())
        elif isinstance(v, (list, tuple)):
            items = []
            for src in v:
                if isinstance(src, os.PathLike):
                    src = os.fspath(src)
                if not isinstance(src, str):
                    raise ValueError("a list of files must hold paths")
                items.append((os.path.basename(src.rstrip("/")) or src, src))
        else:
            raise ValueError("expected {target: source} or a list of source paths")
        out = {}
        for dst, src in items:
            dst = os.fspath(dst) if isinstance(dst, os.PathLike) else dst
            src = os.fspath(src) if isinstance(src, os.PathLike) else src
            if not isinstance(dst, str) or not isinstance(src, str) or not dst or not src:
                raise ValueError("targets and sources must be non-empty paths")
            out[_no_nul(dst, "a file target")] = _no_nul(src, "a file source")
        return out

    @field_validator("setup", mode="before")
    @classmethod
    def _v_setup(cls, v: Any) -> list[str]:
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple)):
            raise ValueError("expected a list of shell commands")
        for i, c in enumerate(v):
            if not isinstance(c, str) or not c.strip():
                raise ValueError(f"setup[{i}] must be a non-empty shell command")
            _no_nul(c, f"setup[{i}]")
        return list(v)

    @field_validator("backend", mode="before")
    @classmethod
    def _v_backend(cls, v: Any) -> str | None:
        if v is None:
            return None
        if not isinstance(v, str) or not _BACKEND_NAME.match(v):
            raise ValueError(f"expected a backend name such as 'local' or 'slurm', got {v!r}")
        return v

    @field_validator("backend_options", mode="before")
    @classmethod
    def _v_backend_options(cls, v: Any) -> dict[str, dict[str, Any]]:
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise ValueError('expected {"backend": {option: value}}')
        out = {}
        for k, opts in v.items():
            if not isinstance(k, str) or not _BACKEND_NAME.match(k):
                raise ValueError(f"keys must be backend names, got {k!r}")
            if not isinstance(opts, Mapping):
                raise ValueError(f"options for {k} must be a mapping, got {type(opts).__name__}")
            for ok in opts:
                if not isinstance(ok, str):
                    raise ValueError(f"option names for {k} must be text, got {ok!r}")
            out[k] = dict(opts)
        return out

    @field_validator("image", mode="before")
    @classmethod
    def _v_image(cls, v: Any) -> str | None:
        if v is None:
            return None
        if not isinstance(v, str) or not v.strip() or any(c.isspace() for c in v):
            raise ValueError(f"expected a container image reference such as 'python:3.11-slim', got {v!r}")
        return v

    @field_validator("retries", mode="before")
    @classmethod
    def _v_retries(cls, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 100:
            raise ValueError(f"expected a whole number from 0 to 100, got {v!r}")
        return v

    @field_validator("labels", mode="before")
    @classmethod
    def _v_labels(cls, v: Any) -> dict[str, str]:
        if v is None:
            return {}
        if not isinstance(v, Mapping) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
            raise ValueError("expected a mapping of text to text")
        return dict(v)

    @model_validator(mode="after")
    def _v_whole(self) -> "JobSpec":
        if (self.command is None) == (self.function is None):
            raise SpecErrorSignal(
                "command" if self.command is None else "function",
                "give exactly one of command (argv list or string) and function",
            )
        both = sorted(set(self.env) & set(self.secrets))
        if both:
            raise SpecErrorSignal(f"secrets.{both[0]}", "is in env as well; give a variable in env or in secrets, "
                                  "not both")
        if self.command is not None and (self.args or self.kwargs):
            raise SpecErrorSignal("args", "args and kwargs are for function jobs; put a command's arguments in its argv")
        return self


def _lift_resources(data: dict[str, Any]) -> dict[str, Any]:
    """Accept resource fields at the top level: JobSpec(command=..., gpus=2, memory="8GiB")."""
    flat = {k: data[k] for k in RESOURCE_FIELDS if k in data}
    if not flat:
        return data
    data = {k: v for k, v in data.items() if k not in RESOURCE_FIELDS}
    base = data.get("resources")
    if isinstance(base, Resources):
        merged = base.model_dump()
        if "gpus" in flat and isinstance(flat["gpus"], str) and not flat["gpus"].strip().isdigit():
            merged.pop("gpu_type", None)
        if any(k in flat for k in GPU_REQUEST_FIELDS) and "gpu_alternatives" not in flat:
            merged.pop("gpu_alternatives", None)
        merged.update(flat)
    elif isinstance(base, Mapping):
        merged = {**base, **flat}
    elif base is None:
        merged = flat
    else:
        raise SpecErrorSignal("resources", f"expected Resources or a mapping, got {type(base).__name__}")
    try:
        data["resources"] = Resources(**merged)
    except ValidationError as e:
        raise _to_spec_error(e, Resources) from None
    return data


def _to_spec_error(e: ValidationError, model: type[BaseModel]) -> SpecError:
    errs = e.errors(include_url=False)
    first: dict[str, Any] = dict(errs[0]) if errs else {"loc": (), "msg": str(e), "type": ""}
    loc = [str(p) for p in first.get("loc", ())]
    ctx = first.get("ctx") or {}
    err = ctx.get("error")
    if isinstance(err, SpecErrorSignal):
        return SpecError(err.field, err.message, first.get("input"))
    field = ".".join(loc)
    if model is Resources and field and not field.startswith("resources"):
        field = field if field in RESOURCE_FIELDS else f"resources.{field}"
    msg = first.get("msg", "invalid")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if first.get("type") == "extra_forbidden":
        allowed = ", ".join(sorted(set(model.model_fields) | (set(RESOURCE_FIELDS) if model is JobSpec else set())))
        name = loc[-1] if loc else "?"
        msg = f"unknown field {name!r}; the fields are: {allowed}"
    elif first.get("type") in ("dict_type", "list_type", "string_type", "int_type", "float_type"):
        msg = f"{msg} (got {type(first.get('input')).__name__})"
    if len(errs) > 1:
        msg += f" (and {len(errs) - 1} more error{'s' if len(errs) > 2 else ''})"
    return SpecError(field, msg, first.get("input"))
