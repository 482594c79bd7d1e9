"""Read a SkyPilot task YAML into a :class:`meshrun.JobSpec`, so ``meshrun run task.yaml`` runs it anywhere.

A pure reader: no ``sky`` import (PyYAML only). What a JobSpec can say is mapped onto it; what only SkyPilot
understands (infra, spot, instance types, ports, any_of, job_recovery, ...) is kept verbatim in
``backend_options["skypilot"]`` so the SkyPilot backend can hand it back to SkyPilot unchanged, and other
backends simply ignore it.

    run                      -> command (a string, run by bash -c, byte for byte)
    setup                    -> setup (one shell script)
    envs, secrets            -> env (a null value is taken from the submitter's environment)
    workdir (a local path)   -> workdir
    num_nodes                -> nodes
    file_mounts {dst: local} -> files {dst: local}; bucket/URL mounts stay in backend_options
    resources.accelerators   -> gpus, gpu_type ("H100:8", {"H100": 8}); candidate lists stay in backend_options
    resources.cpus "4+" / 4  -> cpus (an exact "4" is also kept in backend_options)
    resources.memory "32+"   -> memory in GiB (a "4x" ratio stays in backend_options)
    resources.disk_size      -> disk in GiB
    anything else            -> backend_options["skypilot"] (resource keys flat, other task keys under "task")
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

from ._errors import SpecError
from ._spec import FILE_READERS, JobSpec

#: top-level keys of a SkyPilot task (its schema); the ones meshrun maps itself are handled below
TASK_KEYS = (
    "name", "workdir", "num_nodes", "resources", "envs", "secrets", "file_mounts", "setup", "run",
    "service", "config", "volumes", "volume_mounts", "event_callback", "inputs", "outputs", "pool",
    "file_mounts_mapping", "managed_secrets", "api_server_access",
)
#: keys of a SkyPilot ``resources`` section
RESOURCE_KEYS = (
    "infra", "cloud", "region", "zone", "accelerators", "accelerator_args", "instance_type", "cpus",
    "memory", "disk_size", "disk_tier", "network_tier", "use_spot", "job_recovery", "image_id", "ports",
    "labels", "any_of", "ordered", "autostop", "priority", "priority_class", "max_hourly_cost", "local_disk",
    "ephemeral_storage", "volumes",
)
_YAML_FIELD = {
    "nodes": "num_nodes", "gpus": "resources.accelerators", "gpu_type": "resources.accelerators",
    "cpus": "resources.cpus", "memory": "resources.memory", "disk": "resources.disk_size", "env": "envs",
    "command": "run", "files": "file_mounts", "setup": "setup", "name": "name", "workdir": "workdir",
}
_MAPPED_TASK_KEYS = ("name", "workdir", "num_nodes", "resources", "envs", "secrets", "file_mounts", "setup", "run")
_NUM = r"\d+(?:\.\d+)?"


def spec_from_task_yaml(path: str | os.PathLike[str]) -> Any:
    """The :class:`meshrun.JobSpec` described by the SkyPilot task YAML file at ``path``."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with the SkyPilot backend
        raise SpecError("", "reading a task YAML needs PyYAML: pip install pyyaml") from None

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
    except OSError as e:
        raise SpecError("", f"cannot read the task YAML {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise SpecError("", f"{path} is not valid YAML: {e}") from None
    if not docs:
        raise SpecError("", f"{path} holds no task")
    if len(docs) > 1:
        raise SpecError("", f"{path} holds {len(docs)} YAML documents (a pipeline); meshrun runs one task per job")
    base = os.path.dirname(os.path.abspath(path))
    return spec_from_task_config(docs[0], base_dir=base, source=path)


def spec_from_task_config(config: Any, *, base_dir: str | None = None, source: str = "the task",
                          environ: Mapping[str, str] | None = None) -> Any:
    """The :class:`meshrun.JobSpec` of one SkyPilot task given as a mapping (a loaded task YAML).

    Relative local paths (workdir, file mount sources) are taken relative to ``base_dir`` (the YAML's
    folder), as SkyPilot does; null env/secret values come from ``environ`` (default: ``os.environ``)."""
    if not isinstance(config, Mapping):
        raise SpecError("", f"{source} must be a mapping of task fields, got {type(config).__name__}")
    environ = os.environ if environ is None else environ
    # SkyPilot's own bookkeeping keys (``_metadata``, ``_user_specified_yaml``) are not part of the task
    config = {k: v for k, v in config.items() if not (isinstance(k, str) and k.startswith("_"))}
    unknown = sorted(str(k) for k in config if k not in TASK_KEYS)
    if unknown:
        raise SpecError(unknown[0], f"not a SkyPilot task field; the fields are: {', '.join(TASK_KEYS)}")
    fields: dict[str, Any] = {}
    opts: dict[str, Any] = {}
    extra_task: dict[str, Any] = {k: config[k] for k in config if k not in _MAPPED_TASK_KEYS}

    if config.get("name") is not None:
        fields["name"] = _text(config["name"], "name")
    run = config.get("run")
    if run is None:
        raise SpecError("run", f"{source} has no run section; meshrun needs something to run")
    if not isinstance(run, str):
        raise SpecError("run", "must be a shell script (text); SkyPilot's Python-callable run is not supported")
    fields["command"] = run
    setup = config.get("setup")
    if setup is not None:
        fields["setup"] = [_text(setup, "setup")]

    env: dict[str, str] = {}
    for section in ("envs", "secrets"):
        values = config.get(section)
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise SpecError(section, "must be a mapping of NAME: value")
        for k, v in values.items():
            if not isinstance(k, str):
                raise SpecError(f"{section}.{k}", "names must be text")
            if v is None:
                if k not in environ:
                    raise SpecError(f"{section}.{k}", f"has no value in {source} and {k} is not set in the "
                                    "environment; give it a value or export it before running")
                v = environ[k]
            elif isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise SpecError(f"{section}.{k}", f"the value must be text, got {type(v).__name__}")
            env[k] = str(v)
    if env:
        fields["env"] = env

    workdir = config.get("workdir")
    if isinstance(workdir, str):
        fields["workdir"] = _local(workdir, base_dir)
    elif workdir is not None:
        extra_task["workdir"] = workdir  # a git repository: SkyPilot fetches it itself

    if config.get("num_nodes") is not None:
        fields["nodes"] = config["num_nodes"]

    mounts = config.get("file_mounts")
    if mounts is not None:
        if not isinstance(mounts, Mapping):
            raise SpecError("file_mounts", "must be a mapping of remote path: source")
        files, others = {}, {}
        for dst, src in mounts.items():
            if isinstance(src, str) and "://" not in src:
                files[str(dst)] = _local(src, base_dir)
            else:
                others[dst] = src
        if files:
            fields["files"] = files
        if others:
            extra_task["file_mounts"] = others

    res = config.get("resources")
    if res is not None:
        if not isinstance(res, Mapping):
            raise SpecError("resources", "must be a mapping of resource fields")
        unknown = sorted(str(k) for k in res if k not in RESOURCE_KEYS)
        if unknown:
            raise SpecError(f"resources.{unknown[0]}",
                            f"not a SkyPilot resources field; the fields are: {', '.join(RESOURCE_KEYS)}")
        _map_resources(res, fields, opts)

    if extra_task:
        opts["task"] = extra_task
    if opts:
        fields["backend_options"] = {"skypilot": opts}
    try:
        return JobSpec(**fields)
    except SpecError as e:  # name the task YAML's field, not the JobSpec's
        field = e.field.split(".")[-1] if e.field.startswith("resources.") else e.field.split(".")[0]
        raise SpecError(_YAML_FIELD.get(field, e.field), e.message, e.value) from None


def _map_resources(res: Mapping[str, Any], fields: dict[str, Any], opts: dict[str, Any]) -> None:
    for k, v in res.items():
        if k not in ("accelerators", "cpus", "memory", "disk_size"):
            opts[k] = v
    acc = res.get("accelerators")
    if acc is not None:
        parsed = _single_accelerator(acc)
        if parsed is None:
            opts["accelerators"] = acc  # candidates or a fraction: SkyPilot chooses
            first = _first_count(acc)
            if first:
                fields["gpus"] = first
        else:
            fields["gpu_type"], fields["gpus"] = parsed
    cpus = res.get("cpus")
    if cpus is not None:
        text = str(cpus).strip()
        m = re.fullmatch(rf"({_NUM})(\+?)", text)
        if not m or isinstance(cpus, bool):
            raise SpecError("resources.cpus", f"expected a number of CPUs such as 4 or '4+', got {cpus!r}")
        fields["cpus"] = float(m.group(1))
        if not m.group(2):
            opts["cpus"] = text  # exactly this many: only SkyPilot can say it
    mem = res.get("memory")
    if mem is not None:
        text = str(mem).strip()
        m = re.fullmatch(rf"({_NUM})(\+?)", text)
        if m and not isinstance(mem, bool):
            fields["memory"] = f"{m.group(1)}GiB"
            if not m.group(2):
                opts["memory"] = text
        elif re.fullmatch(rf"{_NUM}x", text):
            opts["memory"] = text
        else:
            raise SpecError("resources.memory", f"expected GiB such as 32 or '32+' (or a CPU ratio '4x'), got {mem!r}")
    disk = res.get("disk_size")
    if disk is not None:
        if isinstance(disk, bool) or not isinstance(disk, (int, float, str)) or not re.fullmatch(_NUM, str(disk).strip()):
            raise SpecError("resources.disk_size", f"expected a size in GiB such as 256, got {disk!r}")
        fields["disk"] = f"{str(disk).strip()}GiB"


def _single_accelerator(acc: Any) -> tuple[str, int] | None:
    """(type, count) for one accelerator with a whole count ("H100:8", "H100", {"H100": 8}), else None."""
    if isinstance(acc, str):
        name, _, text = acc.strip().partition(":")
        text = text.strip() or "1"
        if name and "," not in name and text.isdigit() and int(text) > 0:
            return name.strip(), int(text)
        return None
    if isinstance(acc, Mapping) and len(acc) == 1:
        (name, count), = acc.items()
        if count is None:
            count = 1
        if isinstance(name, str) and isinstance(count, int) and not isinstance(count, bool) and count > 0:
            return name, count
    return None


def _first_count(acc: Any) -> int:
    try:
        if isinstance(acc, Mapping):
            v = next(iter(acc.values()))
        elif isinstance(acc, (list, tuple, set)):
            first = next(iter(acc))
            v = first.partition(":")[2] or 1 if isinstance(first, str) else 1
        else:
            return 0
        n = int(float(v or 1))
        return n if n >= 1 and float(v or 1) == n else 0
    except (StopIteration, TypeError, ValueError):
        return 0


def _text(v: Any, field: str) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    if not isinstance(v, str):
        raise SpecError(field, f"expected text, got {type(v).__name__}")
    return v


def _local(path: Any, base_dir: str | None) -> str:
    path = os.path.expanduser(_text(path, "path"))
    if base_dir and not os.path.isabs(path):
        path = os.path.normpath(os.path.join(base_dir, path))
    return path


FILE_READERS["skypilot"] = spec_from_task_yaml  # JobSpec.from_skypilot_yaml
