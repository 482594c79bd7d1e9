"""Read a dstack task configuration (``type: task``, a ``.dstack.yml``) into a :class:`meshrun.JobSpec`.

A pure reader (PyYAML only, no dstack import). What a JobSpec says is mapped onto it; dstack settings a
JobSpec has no field for, but the dstack backend takes (``backend_options["dstack"]``), are kept there;
anything else is refused with an error naming the field, never dropped:

    commands                 -> command (joined with " && ", as dstack runs them)
    setup                    -> setup
    env (mapping or list)    -> env; a bare ``- NAME`` is taken from the submitter's environment (or --env)
    image                    -> image
    nodes                    -> nodes
    max_duration             -> time_limit
    files ["local:remote"]   -> files {remote: local} (local paths from the configuration's folder)
    resources.gpu            -> gpus, gpu_type, gpu_alternatives (one per name), gpu_memory (a minimum)
    resources.cpu/memory/disk-> cpus, memory, disk (minimums: "8", "8..", "32GB", "32GB..")
    resources (as written)   -> backend_options["dstack"]["resources"]: the dstack backend gives dstack the
                                section itself (dstack's exact sizes and "at least one GPU" included)
    python, spot_policy, max_price, retry, backends, regions, instance_types, fleets,
    reservation, priority, working_dir, user, privileged, volumes, stop_duration, idle_duration
                             -> backend_options["dstack"]

Refused, naming the field: other run types (services, dev environments), ``ports``, GPU count ranges
("1..8": give one count), upper bounds of sizes ("16GB..40GB"), vendors other than NVIDIA, env values that
refer to dstack's server-side secrets (``${{ secrets.x }}``), ``repos``.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

from ._errors import SpecError
from ._taskyaml import load_documents

#: fields of a dstack task configuration meshrun maps itself
_MAPPED = ("type", "name", "commands", "setup", "env", "image", "nodes", "max_duration", "files", "resources")
#: fields kept verbatim for the dstack backend (its ``backend_options["dstack"]``)
DSTACK_OPTIONS = ("python", "spot_policy", "max_price", "retry", "backends", "regions", "instance_types", "fleets",
                  "reservation", "priority", "working_dir", "user", "privileged", "volumes", "stop_duration",
                  "idle_duration")
#: fields meshrun cannot express, and why
_REFUSED = {
    "ports": "a meshrun job exposes no ports; run it as a dstack service with dstack itself, or reach the "
             "port another way (an SSH tunnel)",
    "repos": "meshrun ships the working directory (--workdir), not a repository; check the repository out "
             "and run from it",
    "nvcc": "pick an image with the CUDA compiler (image:) instead",
    "docker": "meshrun runs no Docker daemon in the job",
    "entrypoint": "put the program in commands",
    "schedule": "meshrun runs a job when it is submitted; schedule the submit (cron) instead",
    "utilization_policy": "meshrun does not stop jobs by GPU utilisation",
    "startup_order": "meshrun starts every node together",
    "stop_criteria": "meshrun ends a multi-node job when its nodes end",
    "single_branch": "meshrun ships the working directory, not a repository",
    "creation_policy": "placement chooses where the job runs",
}
_VENDORS = ("nvidia", "amd", "google", "tpu", "intel", "tenstorrent")
_RESOURCE_KEYS = ("gpu", "cpu", "memory", "disk", "shm_size")
_SIZE = r"(\d+(?:\.\d+)?)\s*(MB|GB|TB|KB)?"
_SIZE_UNITS = {None: 1.0, "KB": 2**-20, "MB": 2**-10, "GB": 1.0, "TB": 2**10}
_AMD_NAME = re.compile(r"^MI\d", re.IGNORECASE)
_TPU_NAME = re.compile(r"^(v\d+[a-z]*-\d+|v\d+[a-z]*pod|tpu)", re.IGNORECASE)
_SECRET_REF = re.compile(r"\$\{\{\s*secrets\.([A-Za-z0-9_.-]+)\s*\}\}")


def spec_from_dstack_yaml(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Any:
    """The :class:`meshrun.JobSpec` of the dstack task configuration file at ``path``."""
    path = os.fspath(path)
    docs = load_documents(path)
    if len(docs) > 1:
        raise SpecError("", f"{path} holds {len(docs)} YAML documents; a dstack configuration is one")
    return spec_from_dstack_config(docs[0], base_dir=os.path.dirname(os.path.abspath(path)), source=path, env=env)


def is_dstack_config(doc: Any) -> bool:
    """Whether a loaded YAML document is a dstack configuration (it says its ``type``)."""
    return isinstance(doc, Mapping) and isinstance(doc.get("type"), str) and "run" not in doc


def spec_from_dstack_config(config: Any, *, base_dir: str | None = None, source: str = "the configuration",
                            env: Mapping[str, str] | None = None,
                            environ: Mapping[str, str] | None = None) -> Any:
    """The :class:`meshrun.JobSpec` of one dstack task configuration given as a mapping."""
    from ._spec import JobSpec

    if not isinstance(config, Mapping):
        raise SpecError("", f"{source} must be a mapping of configuration fields, got {type(config).__name__}")
    environ = os.environ if environ is None else environ
    kind = config.get("type")
    if kind != "task":
        raise SpecError("type", f"meshrun runs dstack tasks (type: task), not {kind!r}")
    for k in config:
        if k in _REFUSED:
            raise SpecError(str(k), f"cannot be expressed by meshrun: {_REFUSED[k]}")
        if k not in _MAPPED and k not in DSTACK_OPTIONS:
            raise SpecError(str(k), "not a dstack task field meshrun knows; the fields are: "
                            + ", ".join(sorted((*_MAPPED, *DSTACK_OPTIONS))))
    fields: dict[str, Any] = {}
    opts: dict[str, Any] = {k: config[k] for k in DSTACK_OPTIONS if config.get(k) is not None}
    retry = opts.get("retry")
    if isinstance(retry, Mapping):  # dstack's {on_events: [...], duration: ...}: the backend's retry/retry_on
        opts["retry"] = retry.get("duration") or True
        if retry.get("on_events") is not None:
            opts["retry_on"] = retry["on_events"]
    if isinstance(opts.get("python"), float):  # YAML reads `python: 3.12` as a number (and 3.10 as 3.1)
        opts["python"] = {"3.1": "3.10"}.get(str(opts["python"]), str(opts["python"]))

    if config.get("name") is not None:
        fields["name"] = str(config["name"])
    commands = config.get("commands")
    if not isinstance(commands, list) or not commands or not all(isinstance(c, str) for c in commands):
        raise SpecError("commands", f"{source} needs commands: a list of shell commands")
    fields["command"] = " && ".join(c.strip() for c in commands)
    setup = config.get("setup")
    if setup is not None:
        if not isinstance(setup, list) or not all(isinstance(c, str) for c in setup):
            raise SpecError("setup", "expected a list of shell commands")
        fields["setup"] = [" && ".join(c.strip() for c in setup)] if setup else []
    fields["env"] = _env(config.get("env"), env or {}, environ, source)
    if config.get("image") is not None:
        fields["image"] = config["image"]
    if config.get("nodes") is not None:
        fields["nodes"] = config["nodes"]
    md = config.get("max_duration")
    if md is not None and md != "off" and md is not False:
        fields["time_limit"] = md
    files = config.get("files")
    if files is not None:
        fields["files"] = _files(files, base_dir)
    res = config.get("resources")
    if res is not None:
        _resources(res, fields, opts)
    opts["resources"] = res or {}  # dstack reads its own section back (exact sizes, "1.." counts, defaults)
    if opts:
        fields["backend_options"] = {"dstack": opts}
    return JobSpec(**fields)


def _env(values: Any, overrides: Mapping[str, str], environ: Mapping[str, str], source: str) -> dict[str, str]:
    items: dict[str, Any] = {}
    if isinstance(values, list):
        for item in values:
            if not isinstance(item, str):
                raise SpecError("env", f"expected NAME=value or NAME entries, got {item!r}")
            k, sep, v = item.partition("=")
            items[k] = v if sep else None  # a bare NAME: from the submitter's environment, as dstack does
    elif isinstance(values, Mapping):
        items = dict(values)
    elif values is not None:
        raise SpecError("env", "expected a list of NAME=value (or NAME) entries or a mapping")
    items.update(overrides)
    out = {}
    for k, v in items.items():
        if v is None:
            if k not in environ:
                raise SpecError(f"env.{k}", f"takes its value from the environment and {k} is not set there; "
                                f"export it or give it with --env {k}=...")
            v = environ[k]
        elif isinstance(v, str) and _SECRET_REF.search(v):
            raise SpecError(f"env.{k}", f"refers to the dstack secret {_SECRET_REF.search(v).group(1)!r} "  # type: ignore[union-attr]
                            "that only dstack's server holds; export the value as "
                            f"{k} and list it as `- {k}` (or pass it as a meshrun secret)")
        elif not isinstance(v, (str, int, float)):
            raise SpecError(f"env.{k}", f"the value must be text, got {type(v).__name__}")
        out[str(k)] = str(v)
    return out


def _files(files: Any, base_dir: str | None) -> dict[str, str]:
    if not isinstance(files, list):
        raise SpecError("files", 'expected a list of "local:remote" paths or {local_path, path} mappings')
    out = {}
    for item in files:
        if isinstance(item, Mapping):
            local, remote = item.get("local_path"), item.get("path")
        elif isinstance(item, str):
            local, _, remote = item.partition(":")
        else:
            local = remote = None
        if not isinstance(local, str) or not local:
            raise SpecError("files", f'expected "local:remote" or {{local_path, path}}, got {item!r}')
        local = os.path.expanduser(local)
        if not os.path.isabs(local):
            local = os.path.normpath(os.path.join(base_dir or os.getcwd(), local))
        out[remote or os.path.basename(local.rstrip("/"))] = local
    return out


def _resources(res: Any, fields: dict[str, Any], opts: dict[str, Any]) -> None:
    if not isinstance(res, Mapping):
        raise SpecError("resources", "expected a mapping of resources (gpu, cpu, memory, disk, shm_size)")
    for k in res:
        if k not in _RESOURCE_KEYS:
            raise SpecError(f"resources.{k}", f"not a dstack resource meshrun knows; they are: {', '.join(_RESOURCE_KEYS)}")
    if res.get("gpu") is not None:
        _gpu(res["gpu"], fields)
    if res.get("cpu") is not None:
        cpu = res["cpu"]
        if isinstance(cpu, Mapping):
            cpu = cpu.get("count", cpu.get("min"))
        fields["cpus"] = _minimum(cpu, "resources.cpu", size=False)
    for key, field in (("memory", "memory"), ("disk", "disk")):
        v = res.get(key)
        if isinstance(v, Mapping):
            v = v.get("size", v.get("min"))
        if v is not None:
            fields[field] = f"{_minimum(v, f'resources.{key}', size=True):g}GiB"


def _minimum(value: Any, field: str, *, size: bool) -> float:
    """The lower bound of a dstack quantity ("8", "8..", 8, "32GB", "32GB.."); an upper bound is refused."""
    text = str(value).strip().replace(" ", "")
    lo, dots, hi = text.partition("..")
    if hi:
        raise SpecError(field, f"a range with an upper bound ({text}) cannot be expressed by meshrun, which asks "
                        f"for at least an amount; give the least you need ({lo or hi}..)")
    m = re.fullmatch(_SIZE if size else r"(\d+(?:\.\d+)?)()", lo, re.IGNORECASE)
    if isinstance(value, bool) or not m or not lo:
        what = "a size such as 32GB or 32GB.." if size else "a number such as 8 or 8.."
        raise SpecError(field, f"expected {what}, got {value!r}")
    n = float(m.group(1)) * (_SIZE_UNITS[(m.group(2) or None) and m.group(2).upper()] if size else 1.0)
    if n <= 0:
        raise SpecError(field, f"must be more than 0, got {value!r}")
    return n


def _gpu(gpu: Any, fields: dict[str, Any]) -> None:
    """dstack's GPU spec: "A100:2", "24GB", "A10G,A100", "nvidia:H100:8", 2, {name: [...], count: 2, memory}."""
    names: list[str] = []
    count: Any = None
    memory: Any = None
    vendor: Any = None
    if isinstance(gpu, int) and not isinstance(gpu, bool):
        count = gpu
    elif isinstance(gpu, str):
        for token in (t.strip() for t in gpu.split(":") if t.strip()):
            if token.lower() in _VENDORS:
                vendor = token.lower()
            elif re.fullmatch(r"\d*\.\.\d*|\d+", token):
                count = token
            elif re.fullmatch(rf"{_SIZE}(\.\.({_SIZE})?)?|\.\.{_SIZE}", token, re.IGNORECASE) and re.search("[A-Za-z]", token):
                memory = token
            else:
                names.extend(n.strip() for n in token.split(",") if n.strip())
    elif isinstance(gpu, Mapping):
        unknown = [k for k in gpu if k not in ("name", "count", "memory", "vendor", "total_memory", "compute_capability")]
        if unknown or gpu.get("total_memory") is not None or gpu.get("compute_capability") is not None:
            bad = unknown[0] if unknown else ("total_memory" if gpu.get("total_memory") is not None else "compute_capability")
            raise SpecError(f"resources.gpu.{bad}", "cannot be expressed by meshrun: give the GPU names, count and "
                            "memory per GPU")
        raw = gpu.get("name")
        names = [raw] if isinstance(raw, str) else list(raw or [])
        count, memory, vendor = gpu.get("count"), gpu.get("memory"), gpu.get("vendor")
        if isinstance(count, Mapping):
            count = f"{count.get('min', '')}..{count.get('max', '')}"
        if isinstance(memory, Mapping):
            memory = f"{memory.get('min', '')}..{memory.get('max', '')}"
    else:
        raise SpecError("resources.gpu", f"expected a GPU spec such as 'A100:2' or a mapping, got {gpu!r}")
    for name in names:  # dstack tells the vendor from the name as well
        if _AMD_NAME.match(name):
            vendor = "amd"
        elif _TPU_NAME.match(name):
            vendor = "google"
    if vendor is not None and str(vendor).lower() != "nvidia":
        raise SpecError("resources.gpu", f"meshrun schedules NVIDIA GPUs; {vendor} accelerators "
                        f"({', '.join(names) or gpu}) cannot be expressed")
    n = 1
    if count is not None:
        text = str(count).strip()
        lo, dots, hi = text.partition("..")
        if dots and lo != hi:
            raise SpecError("resources.gpu", f"a GPU count range ({text}) cannot be expressed by meshrun, which asks "
                            "for an exact number of GPUs per node; give one count (e.g. A100:8)")
        if not lo.isdigit():
            raise SpecError("resources.gpu", f"expected a GPU count, got {count!r}")
        n = int(lo)
    if n == 0:
        return
    if memory is not None:
        fields["gpu_memory"] = f"{_minimum(memory, 'resources.gpu', size=True):g}GiB"
    if not names:
        fields["gpus"] = n
        return
    fields["gpus"] = f"{names[0]}:{n}"
    if len(names) > 1:
        fields["gpu_alternatives"] = [f"{name}:{n}" for name in names]
