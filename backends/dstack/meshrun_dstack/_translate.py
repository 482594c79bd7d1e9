"""A meshrun JobSpec becomes a dstack task configuration: pure functions, no I/O.

What dstack does to a task, and what that means here (read from dstack's server):

* ``commands`` are stripped, joined with `` && `` and run by ``<shell> -i -c`` (``/bin/bash`` with dstack's
  own image, ``/bin/sh`` with any other). So every command here is one self-contained shell word list:
  an argv is ``shlex``-quoted (POSIX quoting, right for both shells); a command string and each setup
  command run as ``bash -c <quoted text>``, meshrun's rule for strings.
* ``${{ groups[..] }}`` references in commands are rewritten by the server; a command holding ``${{`` is
  therefore not placed in ``commands`` at all but carried base64-encoded in the environment and run
  with ``eval``.
* environment values go through dstack's secrets interpolation (``${{ secrets.x }}``, and ``$$`` for a
  literal ``$``); every ``$`` of a value is doubled here so the value reaches the task unchanged. The only
  references meshrun writes are those of the ``data_secrets`` setting (a job with inputs/outputs), made here
  from checked names, never from a spec's value.
* run names must match ``^[a-z][a-z0-9-]{1,40}$``.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import shlex
import sys
from typing import Any, List, Mapping, Optional, Union

from pydantic import Field, field_validator

import meshrun
import meshrun.backend as mb

RUN_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{1,40}$")
GIB = 1024**3
# the env contract from the variables dstack's runner sets (meshrun's one table), for commands run without the agent
DIST_PRELUDE = mb.dist_shell("dstack", {"NNODES": 1, "NODE_RANK": 0, "MASTER_ADDR": "127.0.0.1",
                                             "MASTER_PORT": 29500, "GPUS_PER_NODE": 0})
SPOT_POLICIES = ("spot", "on-demand", "auto")
RETRY_EVENTS = ("no-capacity", "interruption", "error")
PYTHON_VERSIONS = ("3.9", "3.10", "3.11", "3.12", "3.13", "3.14")


# ---------------------------------------------------------------------------------------------
# run names


def run_name(job_id: str, attempt: int = 1) -> str:
    """The dstack run name of a meshrun job: ``meshrun-<job id>`` made valid (lowercase, [a-z0-9-],
    starting with a letter, at most 41 characters), deterministic so a job can be found again."""
    base = f"meshrun-{job_id}" if attempt <= 1 else f"meshrun-{job_id}-r{attempt}"
    name = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    if not name or not name[0].isalpha():
        name = "m-" + name
    if len(name) > 41 or name != base:
        # keep it unique: a short hash of the exact original
        digest = hashlib.sha1(base.encode()).hexdigest()[:8]
        name = f"{name[: 41 - 9].rstrip('-')}-{digest}"
    if len(name) < 2:
        name = name + "-x"
    assert RUN_NAME_RE.match(name), name
    return name


# ---------------------------------------------------------------------------------------------
# backend_options["dstack"]

class DstackOptions(mb.BackendOptions):
    """``backend_options["dstack"]``: dstack knobs a JobSpec has no field for."""

    image: Optional[str] = None
    python: Optional[str] = None
    spot_policy: Optional[str] = None
    max_price: Optional[float] = Field(None, gt=0)
    retry: Union[bool, str, int, None] = None
    retry_on: Optional[List[str]] = None
    backends: Optional[List[str]] = None
    regions: Optional[List[str]] = None
    instance_types: Optional[List[str]] = None
    fleets: Optional[List[str]] = None
    reservation: Optional[str] = None
    shm_size: Optional[str] = None
    resources: Optional[dict] = None  # a dstack ``resources`` section, as written (from a dstack file)
    priority: Optional[int] = Field(None, ge=0, le=100)
    working_dir: Optional[str] = None
    user: Optional[str] = None
    privileged: Optional[bool] = None
    volumes: Optional[List[Union[str, dict]]] = None
    stop_duration: Union[str, int, None] = None
    idle_duration: Union[str, int, None] = None
    pin_offer: bool = True

    @field_validator("spot_policy")
    @classmethod
    def _v_spot(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v not in SPOT_POLICIES:
            raise ValueError(f"expected one of {', '.join(SPOT_POLICIES)}, got {v!r}")
        return v

    @field_validator("python")
    @classmethod
    def _v_python(cls, v: Any) -> Optional[str]:
        if v is None:
            return None
        v = str(v)
        if v not in PYTHON_VERSIONS:
            raise ValueError(f"expected one of {', '.join(PYTHON_VERSIONS)}, got {v!r}")
        return v

    @field_validator("retry_on")
    @classmethod
    def _v_retry_on(cls, v: Optional[List[str]]) -> Optional[List[str]]:
        if v is None:
            return None
        if not v:
            raise ValueError("give at least one event, or leave it out")
        for e in v:
            if e not in RETRY_EVENTS:
                raise ValueError(f"expected events among {', '.join(RETRY_EVENTS)}, got {e!r}")
        return v

    @field_validator("retry")
    @classmethod
    def _v_retry(cls, v: Any) -> Any:
        if isinstance(v, str) and not _duration_ok(v):
            raise ValueError(f"expected true/false or a duration such as '30m', '4h', '1d', got {v!r}")
        if isinstance(v, int) and not isinstance(v, bool) and v <= 0:
            raise ValueError(f"expected a positive number of seconds, got {v!r}")
        return v

    @field_validator("stop_duration", "idle_duration")
    @classmethod
    def _v_dur(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "off" and not _duration_ok(v):
            raise ValueError(f"expected a duration such as '5m' or 'off', got {v!r}")
        return v

    @field_validator("working_dir")
    @classmethod
    def _v_wd(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"expected an absolute path inside the container, got {v!r}")
        return v


def _duration_ok(v: str) -> bool:
    return bool(re.fullmatch(r"\d+ *[smhdw]?", v.strip()))


def parse_options(spec: Any) -> DstackOptions:
    """The validated ``backend_options["dstack"]``; unknown keys and bad values raise SpecError naming the
    field and listing the valid keys."""
    return DstackOptions.load("dstack", spec.options_for("dstack"))


# ---------------------------------------------------------------------------------------------
# pieces


def secret_ref(name: str) -> str:
    """The env value dstack replaces with the project secret ``name`` when the job starts."""
    from ._settings import SECRET_NAME

    if not SECRET_NAME.match(name):
        raise meshrun.ConfigError("backends.dstack.data_secrets", f"{name!r} is not a secret name a task can reference")
    return "${{ secrets.%s }}" % name


def escape_env(value: str) -> str:
    """A value that dstack's interpolation turns back into ``value`` (``$`` -> ``$$``)."""
    return value.replace("$", "$$")


def gib(n_bytes: int) -> float:
    """Bytes as dstack's "GB" (it counts in GiB: 1 GB = 1024 MiB), rounded up to 1/1000."""
    return math.ceil(n_bytes / GIB * 1000) / 1000


_GPU_WITH_MEMORY = re.compile(r"^(?P<name>.+?)[-_:](?P<mem>\d+)\s*(?:GB|G|GIB)$", re.IGNORECASE)


def gpu_spec(r: Any) -> dict[str, Any]:
    if not r.gpus:
        return {"count": {"min": 0, "max": 0}}
    gpu: dict[str, Any] = {"count": {"min": r.gpus, "max": r.gpus}}
    mem_gb = gib(r.gpu_memory) if r.gpu_memory else None
    if r.gpu_type:
        m = _GPU_WITH_MEMORY.match(r.gpu_type)
        if m:  # "A100-80GB": dstack names the model and the memory separately
            gpu["name"] = [m.group("name")]
            mem_gb = max(mem_gb or 0, float(m.group("mem")))
        else:
            gpu["name"] = [r.gpu_type]
    if mem_gb:
        gpu["memory"] = {"min": mem_gb}
    return gpu


def resources_spec(r: Any, options: Any) -> dict[str, Any]:
    """dstack ``resources`` for the spec's resources (minimums); ``backend_options.dstack.resources`` (a
    dstack file's own section, kept by ``JobSpec.from_dstack_yaml``) is given to dstack as written."""
    if options.resources is not None:
        given: dict[str, Any] = dict(options.resources)
        if options.shm_size and "shm_size" not in given:
            given["shm_size"] = options.shm_size
        return given
    res: dict[str, Any] = {"gpu": gpu_spec(r)}
    if r.cpus:
        res["cpu"] = {"count": {"min": max(1, math.ceil(r.cpus))}}
    if r.memory:
        res["memory"] = {"min": gib(r.memory)}
    if r.disk:
        res["disk"] = {"size": {"min": gib(r.disk)}}
    if options.shm_size:
        res["shm_size"] = options.shm_size
    return res


def _bash_c(text: str) -> str:
    return "bash -c " + shlex.quote(text)


def user_commands(spec: Any) -> list[str]:
    """The shell commands that run a command job's setup and then its command."""
    cmds = [_bash_c(s) for s in spec.setup]
    if isinstance(spec.command, str):
        cmds.append(_bash_c(spec.command))
    else:
        cmds.append(shlex.join(spec.command))
    return cmds


def _needs_env_transport(cmds: list[str]) -> bool:
    return any("${{" in c for c in cmds)


COMMAND_ENV = "MESHRUN_COMMAND_B64"
_EVAL = 'eval "$(printf %s "$' + COMMAND_ENV + '" | base64 -d)"'


def task_commands(spec: Any, *, function_command: str | None = None) -> tuple[list[str], dict[str, str]]:
    """(commands, extra env). A command job's own commands, or the function runner's single command (the
    agent, which derives the env contract itself from dstack's variables: launch.json names the scheduler)."""
    if function_command is not None:
        return [function_command], {}
    cmds = user_commands(spec)
    if _needs_env_transport(cmds):
        script = " && ".join(cmds)
        return [DIST_PRELUDE, _EVAL], {COMMAND_ENV: base64.b64encode(script.encode()).decode()}
    return [DIST_PRELUDE, *cmds], {}


def python_version() -> str:
    v = "%d.%d" % sys.version_info[:2]
    return v if v in PYTHON_VERSIONS else "3.11"


def _retry(options: Any) -> dict[str, Any] | None:
    r = options.retry
    if r is None or r is False:
        return None
    out: dict[str, Any] = {"on_events": list(options.retry_on or ["no-capacity"])}
    if isinstance(r, str):
        out["duration"] = r.strip().replace(" ", "")
    elif isinstance(r, int) and not isinstance(r, bool):
        out["duration"] = int(r)
    return out


def task_configuration(
    spec: Any,
    *,
    job_id: str,
    name: str | None,
    options: Any,
    env: Mapping[str, str] | None = None,
    function_command: str | None = None,
    time_limit_slack: float | None = 0.0,
    offer: Any = None,
    secrets: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The dstack ``type: task`` configuration (a plain dict in dstack's schema) for ``spec``. ``secrets``
    (variable -> dstack secret name) become references the server fills in when the job starts (a variable
    the spec's env sets keeps the spec's value); ``time_limit_slack`` None: no ``max_duration`` (the agent
    keeps the time limit)."""
    commands, extra_env = task_commands(spec, function_command=function_command)
    all_env = {**spec.env, **(env or {}), **extra_env,
               "MESHRUN_JOB_ID": job_id, "MESHRUN_JOB_NAME": spec.display_name}
    env_values = {k: escape_env(str(v)) for k, v in all_env.items()}
    for var, secret in (secrets or {}).items():
        env_values.setdefault(var, secret_ref(secret))
    conf: dict[str, Any] = {
        "type": "task",
        "name": name,
        "commands": commands,
        "env": env_values,
        "resources": resources_spec(spec.resources, options),
    }
    if spec.resources.nodes > 1:
        conf["nodes"] = spec.resources.nodes
    image = options.image or spec.image
    if image:
        conf["image"] = image
        if options.python:
            raise meshrun.SpecError("backend_options.dstack.python",
                                    "dstack takes either an image or a Python version, not both")
    elif options.python:
        conf["python"] = options.python
    elif spec.kind == "function" and function_command is not None:
        conf["python"] = python_version()  # the function was pickled by this Python
    if spec.time_limit and time_limit_slack is not None:
        conf["max_duration"] = int(math.ceil(spec.time_limit + time_limit_slack))
    spot = options.spot_policy
    if spot is None and offer is not None and options.pin_offer:
        spot = "spot" if offer.spot else "on-demand"
    if spot:
        conf["spot_policy"] = spot
    if options.max_price:
        conf["max_price"] = options.max_price
    retry = _retry(options)
    if retry:
        conf["retry"] = retry
    for key in ("backends", "regions", "instance_types", "fleets"):
        val = getattr(options, key)
        if val:
            conf[key] = list(val)
    if offer is not None and options.pin_offer:
        d = dict(getattr(offer, "detail", {}) or {})
        if "backends" not in conf and d.get("dstack_backend") and d.get("dstack_backend") != "remote":
            conf["backends"] = [d["dstack_backend"]]
            if "regions" not in conf and offer.region:
                conf["regions"] = [offer.region]
    for key in ("reservation", "priority", "working_dir", "user", "privileged", "stop_duration", "idle_duration"):
        val = getattr(options, key)
        if val is not None:
            conf[key] = val
    if options.volumes:
        conf["volumes"] = list(options.volumes)
    return conf


def run_spec(conf: dict[str, Any], *, file_archives: list[dict[str, str]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"run_name": conf.get("name"), "configuration": conf}
    if file_archives:
        spec["file_archives"] = list(file_archives)
    return spec


def validate_with_dstack(run_spec_dict: dict[str, Any]) -> None:
    """Check a run spec with dstack's own models (when the ``dstack`` package is installed), so a task
    dstack would reject fails here, before anything is sent. Raises SpecError naming dstack's field."""
    try:
        from dstack._internal.core.models.runs import RunSpec
    except Exception:  # dstack not installed (or an incompatible one): the server validates instead
        return
    from pydantic import ValidationError

    try:
        RunSpec.model_validate(run_spec_dict)
    except ValidationError as e:
        errs = e.errors(include_url=False)
        first = errs[0]
        loc = ".".join(str(p) for p in first.get("loc", ()) if not str(p).startswith("function-"))
        loc = loc.replace("configuration.task.", "configuration.")
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        raise meshrun.SpecError(f"dstack.{loc}" if loc else "dstack",
                                f"dstack rejects the task: {msg}{more}") from None
    name = run_spec_dict.get("run_name")
    if name is not None and not RUN_NAME_RE.match(name):
        raise meshrun.SpecError("dstack.run_name", f"dstack rejects the run name {name!r}: it must match "
                                f"{RUN_NAME_RE.pattern}")
