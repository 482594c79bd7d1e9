"""Settings of the Slurm backend (``[backends.slurm]``) and per-job options (``backend_options["slurm"]``).

Both are validated here: an unknown key or a bad value is an error naming the field and what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Mapping, Union

import meshrun
import meshrun.backend as mb
from pydantic import BaseModel, Field, SecretStr, field_validator

BACKEND = "slurm"

# Slurm names (partitions, accounts, QOS, reservations): a comma-separated list of plain words
_NAME_LIST = re.compile(r"^[A-Za-z0-9_.+@-]+(,[A-Za-z0-9_.+@-]+)*$")
_NODE_LIST = re.compile(r"^[A-Za-z0-9_.,\[\]-]+$")
# sbatch options meshrun sets itself (a job-specific value would break status, logs or re-attach)
RESERVED_SBATCH = (
    "--array", "-a", "--job-name", "-J", "--output", "-o", "--error", "-e", "--chdir", "-D", "--workdir",
    "--parsable", "--wrap", "--test-only", "--wait", "-W", "--open-mode",
    "--nodes", "-N", "--ntasks-per-node", "--ntasks", "-n", "--cpus-per-task", "-c", "--input", "-i",
    "--batch", "--clusters", "-M",
)

_SPLITTERS = ("hetjob", "packjob")  # sbatch splits a script into a heterogeneous job at these words


def check_directive_text(value: str, where: str) -> str:
    """Text that goes on an ``#SBATCH`` line: one line, printable, not a heterogeneous-job separator."""
    if not value:
        raise ValueError(f"{where} must not be empty")
    bad = [c for c in value if (ord(c) < 32 and c != "\t") or ord(c) == 127]
    if bad:
        raise ValueError(f"{where} must be one line of text without control characters (found {bad[0]!r})")
    low = value.lower()
    for word in _SPLITTERS:
        if word in low:
            raise ValueError(f"{where} must not contain {word!r} (sbatch reads it as a heterogeneous-job separator)")
    if len(value) > 4096:
        raise ValueError(f"{where} is too long ({len(value)} characters, at most 4096)")
    return value


def _name_list(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME_LIST.match(value):
        raise ValueError(
            f"{where} must be a Slurm name or a comma-separated list of names (letters, digits, '_', '.', '-', "
            f"'+', '@'), got {value!r}"
        )
    return value


def _asks_for_gpus(name: str, value: str) -> bool:
    """An sbatch option that sets the job's GPU count: -G, --gpus[-per-node|-per-task|-per-socket] (or a prefix
    sbatch accepts), and --gres or --tres-per-task with a gpu item."""
    if name.startswith("-G") or name.startswith("--gpus"):
        return True
    if (len(name) >= 4 and "--gres".startswith(name)) or name.startswith("--tres-per"):
        items = [x.strip().lower() for x in value.split(",")]
        return any(x.split(":")[0] in ("gpu", "gres/gpu") for x in items)
    return False


def _sbatch_args(value: Any, where: str) -> list[str]:
    """Extra sbatch options: a list of "--option[=value]" strings, or a table {option: value | true}."""
    if value is None:
        return []
    items: list[str] = []
    if isinstance(value, str):
        raise ValueError(f'{where} must be a list of options such as ["--exclusive", "--mail-type=END"], '
                         f"got a string (put each option in its own list item)")
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str) or not re.match(r"^-{0,2}[A-Za-z][A-Za-z0-9-]*$", k):
                raise ValueError(f"{where}: option names are words such as 'mail-type', got {k!r}")
            opt = k if k.startswith("-") else f"--{k}"
            if v is True:
                items.append(opt)
            elif v is False or v is None:
                continue
            elif isinstance(v, (str, int, float)):
                items.append(f"{opt}={v}")
            else:
                raise ValueError(f"{where}: the value of {k!r} must be text, a number or true")
    elif isinstance(value, (list, tuple)):
        for i, a in enumerate(value):
            if not isinstance(a, str):
                raise ValueError(f"{where}[{i}] must be text such as '--exclusive', got {type(a).__name__}")
            items.append(_one_word(a))
    else:
        raise ValueError(f"{where} must be a list of sbatch options, got {type(value).__name__}")
    for i, a in enumerate(items):
        check_directive_text(a, f"{where}[{i}]")
        if not a.startswith("-"):
            raise ValueError(f"{where}[{i}] must be an sbatch option starting with '-', got {a!r}")
        name = a.split("=", 1)[0]
        if name.startswith("--"):
            # sbatch takes any unambiguous prefix of a long option ("--out" is --output)
            reserved = any(r.startswith(name) for r in RESERVED_SBATCH if r.startswith("--"))
        else:
            if len(name) < 2 or not name[1].isalpha():
                raise ValueError(f"{where}[{i}] must be an sbatch option such as '--exclusive', got {a!r}")
            reserved = name[:2] in RESERVED_SBATCH  # "-Jname" hides -J as well
        if _asks_for_gpus(name, a.split("=", 1)[1] if "=" in a else ""):
            raise ValueError(
                f"{where}[{i}]: {a!r} asks Slurm for GPUs that the job's resources would not know of (placement, "
                f"GPUS_PER_NODE and NPROC_PER_NODE follow the job's gpus); ask with gpus= instead, e.g. gpus=2 or "
                f"gpus='a100:2' (backend_options.slurm.gpus_flag='gpus-per-node' writes --gpus-per-node for it)"
            )
        if reserved:
            raise ValueError(
                f"{where}[{i}]: {a!r} sets something meshrun sets itself (from the job's resources, name and "
                f"folder); those options are: {', '.join(o for o in RESERVED_SBATCH if o.startswith('--'))}"
            )
    return items


_SPACED = re.compile(r"^(?P<opt>-[A-Za-z]|--[A-Za-z][A-Za-z0-9-]*)\s+(?P<value>\S.*)$", re.DOTALL)


def _one_word(item: str) -> str:
    """An option and its value written with a space in one item ("-p debug", "--mail-type END"), as sbatch
    would read them from a command line: one word each ("-pdebug", "--mail-type=END")."""
    m = _SPACED.match(item.strip())
    if not m:
        return item
    opt, value = m.group("opt"), m.group("value").strip()
    return f"{opt}={value}" if opt.startswith("--") else f"{opt}{value}"


def _option_name(item: str) -> str:
    """The long name an sbatch item sets ("--mem-per-gpu", "--time"), short ones (-t) spelt out."""
    name = item.split("=", 1)[0]
    return {"-t": "--time"}.get(name[:2], name) if not name.startswith("--") else name


def _sets(items: tuple[str, ...], *longs: str, least: int = 4) -> list[str]:
    """The items that set one of the long options ``longs`` (sbatch takes an unambiguous prefix)."""
    out = []
    for a in items:
        name = _option_name(a)
        if name.startswith("--") and len(name) >= least and any(o.startswith(name) for o in longs):
            out.append(a)
    return out


_MEMORY_OPTIONS = ("--mem", "--mem-per-cpu", "--mem-per-gpu")


def check_against_spec(opts: "JobOptions", spec: Any) -> None:
    """What sbatch would refuse, or write twice, refused now with the fields named: memory given by the
    job's ``memory`` and an sbatch memory option (or two of those options), and a time limit given twice."""
    where = "backend_options.slurm.sbatch"
    mems = []
    for a in opts.sbatch:
        name = _option_name(a)
        exact = [o for o in _MEMORY_OPTIONS if o == name]
        if exact or (len(name) > len("--mem") and any(o.startswith(name) for o in _MEMORY_OPTIONS)):
            mems.append(a)
    if spec.resources.memory and mems:
        raise meshrun.SpecError(where, f"{mems[0]!r} sets the job's memory, and so does memory=; sbatch takes one "
                                "of --mem, --mem-per-cpu and --mem-per-gpu: leave out memory= or the option")
    if len(mems) > 1:
        raise meshrun.SpecError(where, f"{mems[0]!r} and {mems[1]!r} are mutually exclusive in sbatch; keep one")
    times = [a for a in opts.sbatch if _option_name(a) in ("--time", "--ti", "--tim")]
    if times and (spec.time_limit or opts.time):
        given = "time_limit" if spec.time_limit else "backend_options.slurm.time"
        raise meshrun.SpecError(where, f"{times[0]!r} sets the time limit, and so does {given}; give it once "
                                "(time_limit also tells the job's own watchdog)")


def user_comment(opts: "JobOptions") -> bool:
    """Whether the sbatch options carry the user's own --comment (then meshrun writes none)."""
    return bool(_sets(opts.sbatch, "--comment", least=5))




# ---------------------------------------------------------------------------------------------------------
# backend settings

class _JobDefaults(BaseModel):
    """The keys both ``[backends.slurm]`` (defaults) and ``backend_options["slurm"]`` (per job) take."""

    partition: Union[str, None] = None
    account: Union[str, None] = None
    qos: Union[str, None] = None
    constraint: Union[str, None] = None
    reservation: Union[str, None] = None
    sbatch: list[str] = Field(default_factory=list)
    array_parallelism: Union[int, None] = None

    @field_validator("partition", "account", "qos", "reservation", mode="before")
    @classmethod
    def _v_names(cls, v: Any, info: Any) -> Any:
        return None if v is None else _name_list(v, info.field_name)

    @field_validator("constraint", mode="before")
    @classmethod
    def _v_constraint(cls, v: Any) -> Any:
        if v is None:
            return None
        if not isinstance(v, str):
            raise ValueError("must be text such as 'a100&ib'")
        return check_directive_text(v, "constraint")

    @field_validator("sbatch", mode="before")
    @classmethod
    def _v_sbatch(cls, v: Any) -> Any:
        return _sbatch_args(v, "sbatch")

    @field_validator("array_parallelism", mode="before")
    @classmethod
    def _v_par(cls, v: Any) -> Any:
        return None if v is None else _parallelism(v, "array_parallelism")


Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]  # a number of seconds, 0 or more


class SlurmSettings(mb.BackendSettings, _JobDefaults):
    """``[backends.slurm]``: defaults for every job, where the cluster is and how to talk to it."""

    renamed = {"command_timeout": "request_timeout", "rest_url": "endpoint", "rest_token": "token"}

    python: Union[str, None] = None
    login_host: Union[str, dict[str, Any], None] = None
    ssh: Union[dict[str, Any], None] = None
    remote_dir: str = "~/.meshrun/slurm"
    api: Literal["cli", "rest"] = "cli"
    endpoint: Union[str, None] = None  # slurmrestd (api = "rest")
    rest_user: Union[str, None] = None
    token: Union[SecretStr, None] = None  # slurmrestd's JWT
    rest_api_version: str = "v0.0.38"
    query_interval: Seconds = 1.0
    lost_after: Seconds = 300.0
    sacct: bool = True
    test_only: bool = True
    grace_period: Seconds = 3.0
    request_timeout: Seconds = 60.0

    @field_validator("python", "remote_dir", mode="before")
    @classmethod
    def _v_path(cls, v: Any) -> Any:
        if v is None:
            return None
        if not isinstance(v, str) or not v.strip() or any(c in v for c in "\n\r\x00"):
            raise ValueError("must be a path on one line")
        return v

    @field_validator("endpoint", mode="before")
    @classmethod
    def _v_url(cls, v: Any) -> Any:
        if v is None:
            return None
        if not isinstance(v, str) or not re.match(r"^(https?://[^\s]+|unix:/[^\s]+)$", v):
            raise ValueError("must be an http(s):// URL or unix:/path/to/socket")
        return v.rstrip("/")

    def __repr__(self) -> str:  # never show the token
        return f"SlurmSettings(api={self.api!r}, login_host={self.login_host!r}, partition={self.partition!r})"


def load_settings(table: Mapping[str, Any] | None) -> SlurmSettings:
    return SlurmSettings.load(BACKEND, table)


def _parallelism(v: Any, where: str) -> int:
    if isinstance(v, bool):
        raise ValueError(f"{where} must be a whole number of at least 1")
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if not isinstance(v, int) or v < 1:
        raise ValueError(f"{where} must be a whole number of at least 1, got {v!r}")
    return v


# ---------------------------------------------------------------------------------------------------------
# per-job options

class SlurmOptions(mb.BackendOptions, _JobDefaults):
    """``backend_options["slurm"]`` of one job, as given (``job_options`` merges it over the settings)."""

    time: Union[str, None] = None  # Slurm's own --time, when it must differ from the job's time_limit
    exclusive: bool = False
    nodelist: Union[str, None] = None
    exclude: Union[str, None] = None
    gpus_flag: Literal["gres", "gpus-per-node"] = "gres"

    @field_validator("time", mode="before")
    @classmethod
    def _v_time(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, (int, float)) or (isinstance(v, str) and re.fullmatch(r"\s*[0-9.]+\s*", v)):
            raise ValueError(f"time needs a unit, e.g. '30m' or '2h' (Slurm reads a bare number as "
                             f"minutes, meshrun as seconds), got {v!r}")
        try:
            secs = meshrun.parse_duration(v)
        except ValueError as e:
            raise ValueError(f"time: {e}") from None
        return mb.slurm_time(secs)

    @field_validator("exclusive", mode="before")
    @classmethod
    def _v_exclusive(cls, v: Any) -> Any:
        if not isinstance(v, bool):
            raise ValueError(f"exclusive must be true or false, got {v!r}")
        return v

    @field_validator("nodelist", "exclude", mode="before")
    @classmethod
    def _v_nodes(cls, v: Any, info: Any) -> Any:
        if v is not None and (not isinstance(v, str) or not _NODE_LIST.match(v)):
            raise ValueError(f"{info.field_name} must be a Slurm node list such as 'node[1-4],gpu7', got {v!r}")
        return v


JOB_OPTIONS = tuple(SlurmOptions.model_fields)


@dataclass(frozen=True)
class JobOptions:
    """``backend_options["slurm"]`` merged over the backend's settings."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    reservation: str | None = None
    sbatch: tuple[str, ...] = ()
    array_parallelism: int | None = None
    time: str | None = None  # Slurm's own --time, when it must differ from the job's time_limit
    exclusive: bool = False
    nodelist: str | None = None
    exclude: str | None = None
    gpus_flag: str = "gres"  # "gres": --gres=gpu[:type]:N   "gpus-per-node": --gpus-per-node=[type:]N
    extra: Mapping[str, Any] = field(default_factory=dict)


def job_options(spec_options: Mapping[str, Any] | None, settings: Any = None, *, spec: Any = None) -> JobOptions:
    """``backend_options["slurm"]`` validated by :class:`SlurmOptions` (a :class:`meshrun.SpecError` naming
    the key), over the settings' defaults; with the ``spec``, also what its fields and the sbatch options say
    twice or in conflict (:func:`check_against_spec`)."""
    given = SlurmOptions.load(BACKEND, spec_options)
    out: dict[str, Any] = {}
    if settings is not None:
        for k in ("partition", "account", "qos", "constraint", "reservation", "array_parallelism"):
            out[k] = getattr(settings, k)
        out["sbatch"] = tuple(settings.sbatch)
    for k in given.model_fields_set - {"sbatch"}:
        out[k] = getattr(given, k)
    out["sbatch"] = tuple(out.get("sbatch") or ()) + tuple(given.sbatch)
    result = JobOptions(**out)
    if spec is not None:
        check_against_spec(result, spec)
    return result
