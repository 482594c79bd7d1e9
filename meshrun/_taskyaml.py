"""Read a SkyPilot task YAML into a :class:`meshrun.JobSpec`, so ``meshrun run task.yaml`` runs it anywhere.

A pure reader: no ``sky`` import (PyYAML only). What a JobSpec can say is mapped onto it; what only SkyPilot
understands (infra, spot, instance types, ports, any_of, job_recovery, ...) is kept verbatim in
``backend_options["skypilot"]`` so the SkyPilot backend can hand it back to SkyPilot unchanged, and other
backends simply ignore it.

    run                      -> command (a string, run by bash -c, byte for byte)
    setup                    -> setup (one shell script)
    envs                     -> env (a null value from --env, else the submitter's environment)
    secrets                  -> secrets (a null value, or a name of the list form, resolved at submit)
    workdir (a local path)   -> workdir (relative to the current directory, as SkyPilot reads it)
    num_nodes                -> nodes
    file_mounts {dst: local} -> files {dst: local}; bucket/URL mounts stay in backend_options
    resources.accelerators   -> gpus, gpu_type, gpu_alternatives (candidates, any_of/ordered, in order; a
     (or resources.gpus)        fraction asks for a whole GPU); the original stays in backend_options
    resources.cpus "4+" / 4  -> cpus (an exact "4" is also kept in backend_options)
    resources.memory "32GB+" -> memory in GiB (a "4x" ratio stays in backend_options)
    resources.disk_size      -> disk in GiB ("1024GB" too)
    resources.image_id       -> image, for "docker:IMAGE" (and kept in backend_options)
    resources.instance_type  -> gpus, when the file names no accelerators and the price catalog lists the
                                instance (kept in backend_options; one it does not list keeps the job on SkyPilot)
    anything else            -> backend_options["skypilot"] (resource keys flat, other task keys under "task")

``${VAR}``/``$VAR`` in workdir and file_mounts are filled from envs and inline secrets. docs/job-files.md
has the whole mapping.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

from ._errors import SpecError
from ._spec import JobSpec

#: top-level keys of a SkyPilot task (its schema); the ones meshrun maps itself are handled below
TASK_KEYS = (
    "name", "workdir", "num_nodes", "resources", "envs", "secrets", "file_mounts", "setup", "run",
    "service", "config", "volumes", "volume_mounts", "event_callback", "inputs", "outputs", "pool",
    "file_mounts_mapping", "managed_secrets", "api_server_access",
)
#: keys of a SkyPilot ``resources`` section (``gpus`` is its other name for ``accelerators``)
RESOURCE_KEYS = (
    "gpus", "infra", "cloud", "region", "zone", "accelerators", "accelerator_args", "instance_type", "cpus",
    "memory", "disk_size", "disk_tier", "network_tier", "use_spot", "job_recovery", "image_id", "ports",
    "labels", "any_of", "ordered", "autostop", "priority", "priority_class", "max_hourly_cost", "local_disk",
    "ephemeral_storage", "volumes",
)
_YAML_FIELD = {
    "nodes": "num_nodes", "gpus": "resources.accelerators", "gpu_type": "resources.accelerators",
    "gpu_alternatives": "resources.accelerators",
    "cpus": "resources.cpus", "memory": "resources.memory", "disk": "resources.disk_size", "env": "envs",
    "command": "run", "files": "file_mounts", "setup": "setup", "name": "name", "workdir": "workdir",
}
_MAPPED_TASK_KEYS = ("name", "workdir", "num_nodes", "resources", "envs", "secrets", "file_mounts", "setup", "run")
_NUM = r"\d+(?:\.\d+)?"


def load_documents(path: str | os.PathLike[str]) -> list[Any]:
    """The YAML documents of a job file (empty ones left out); unreadable or invalid YAML is a SpecError."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML is a dependency
        raise SpecError("", "reading a job file needs PyYAML: pip install pyyaml") from None

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
    except OSError as e:
        raise SpecError("", f"cannot read the job file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise SpecError("", f"{path} is not valid YAML: {e}") from None
    if not docs:
        raise SpecError("", f"{path} holds no task")
    return docs


def specs_from_task_yaml(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> list[Any]:
    """The jobs of a SkyPilot task YAML: one, or each task of a pipeline (a multi-document file whose first
    document may hold only the pipeline's ``name``), in order. ``meshrun run`` runs a pipeline as a chain:
    each task starts when the previous one succeeded."""
    path = os.fspath(path)
    docs = task_documents(load_documents(path), path)
    return [spec_from_task_config(d, source=path if len(docs) == 1 else f"task {i + 1} of {path}", env=env)
            for i, d in enumerate(docs)]


#: the header of a SkyPilot job group (a first document with ``execution: parallel``), as SkyPilot reads it
JOB_GROUP_HEADER_KEYS = ("name", "execution", "primary_tasks", "termination_delay", "inter_connection")


def split_documents(docs: list[Any]) -> tuple[Mapping[str, Any] | None, list[Any]]:
    """(header, tasks) of a loaded SkyPilot YAML, by SkyPilot's own rules: with more than one document, a
    first one with ``execution: parallel`` heads a job group, and a first one with only ``name`` (and
    ``execution``) heads a pipeline; otherwise every document is a task."""
    first = docs[0] if len(docs) > 1 and isinstance(docs[0], Mapping) else None
    if first is not None and (first.get("execution") == "parallel" or set(first) in ({"name"}, {"name", "execution"})):
        return first, docs[1:]
    return None, docs


def task_documents(docs: list[Any], source: str) -> list[Any]:
    """The task documents of a loaded SkyPilot YAML: all of them, or those after a pipeline's header. A job
    group (``execution: parallel``: tasks that run at the same time and reach each other by name) is refused:
    meshrun runs the tasks of a file as a chain, one after the other."""
    head, tasks = split_documents(docs)
    execution = head.get("execution") if head is not None else None
    if execution == "parallel":
        raise SpecError("execution", f"{source} is a SkyPilot job group (execution: parallel): its {len(tasks)} "
                        "tasks run at the same time and reach each other by name, which meshrun cannot do (it "
                        "runs the tasks of a file one after another, each when the previous one succeeded); "
                        f"launch the group with SkyPilot itself (sky jobs launch {source}), or make the file a "
                        "pipeline (a first document with only name) to run its tasks as a chain")
    if execution not in (None, "serial"):
        raise SpecError("execution", f"{execution!r} is not an execution mode of a pipeline: serial (a chain, "
                        "the default) or parallel (a SkyPilot job group)")
    return tasks


def spec_from_task_yaml(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Any:
    """The :class:`meshrun.JobSpec` described by the SkyPilot task YAML file at ``path``."""
    specs = specs_from_task_yaml(path, env=env)
    if len(specs) > 1:
        raise SpecError("", f"{os.fspath(path)} is a pipeline of {len(specs)} tasks (a multi-document YAML); a "
                        "JobSpec is one task: run the chain with `meshrun run FILE` (each task starts when the "
                        "previous one succeeded) or read them all with meshrun.JobSpec.pipeline_from_skypilot_yaml")
    return specs[0]


def spec_from_task_config(config: Any, *, base_dir: str | None = None, source: str = "the task",
                          environ: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None) -> Any:
    """The :class:`meshrun.JobSpec` of one SkyPilot task given as a mapping (a loaded task YAML).

    As SkyPilot does: relative local paths (workdir, file mount sources) are taken from the current
    directory (``base_dir`` overrides it), ``${VAR}``/``$VAR`` in paths are filled from the task's envs and
    inline secrets. ``env`` (``meshrun run --env``) is merged over the task's envs; an env left null is
    taken from ``environ`` (default: ``os.environ``). Secrets go to ``JobSpec.secrets``; a null secret (or
    the list form's names) is resolved from the submitter's environment at submit."""
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
        if "pool" in config or "service" in config:
            kind = "pool" if "pool" in config else "service"
            raise SpecError("run", f"{source} has no run section: it is a SkyPilot {kind} spec (`{kind}:`, for "
                            f"`sky {'jobs pool apply' if kind == 'pool' else 'serve up'}`), not a task to run")
        if config.get("setup") is not None:
            raise SpecError("run", f"{source} has no run section: it only sets up a cluster (what `sky launch` does "
                            "with a setup and no run); meshrun runs jobs: give it a run section")
        raise SpecError("run", f"{source} has no run section; meshrun needs something to run")
    if not isinstance(run, str):
        raise SpecError("run", "must be a shell script (text); SkyPilot's Python-callable run is not supported")
    fields["command"] = run
    setup = config.get("setup")
    if setup is not None:
        fields["setup"] = [_text(setup, "setup")]

    secrets = _secrets(config.get("secrets"))
    overrides = dict(env or {})
    for k in [k for k in overrides if k in secrets]:  # --env NAME=... fills a secret and keeps it secret
        secrets[k] = overrides.pop(k)
    envs = _envs(config.get("envs"), overrides, environ, source)
    if envs:
        fields["env"] = envs
    if secrets:
        fields["secrets"] = secrets
    known = {**envs, **{k: v for k, v in secrets.items() if v is not None}}  # what SkyPilot fills in paths

    workdir = config.get("workdir")
    if isinstance(workdir, str):
        fields["workdir"] = _local(_fill(workdir, known), base_dir)
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
            dst = _fill(str(dst), known)
            if isinstance(src, str) and "://" not in src:
                files[dst] = _local(_fill(src, known), base_dir)
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
        image = res.get("image_id")
        if isinstance(image, str) and image.startswith("docker:"):
            fields["image"] = image[len("docker:"):]  # container backends run it; SkyPilot keeps image_id

    if extra_task:
        opts["task"] = extra_task
    if opts:
        fields["backend_options"] = {"skypilot": opts}
    try:
        return JobSpec(**fields)
    except SpecError as e:  # name the task YAML's field, not the JobSpec's
        field = e.field.split(".")[-1] if e.field.startswith("resources.") else e.field.split(".")[0]
        raise SpecError(_YAML_FIELD.get(field, e.field), e.message, e.value) from None


def _envs(values: Any, overrides: Mapping[str, str], environ: Mapping[str, str], source: str) -> dict[str, str]:
    """The task's envs with ``overrides`` merged over them; a null value comes from ``environ``."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise SpecError("envs", "must be a mapping of NAME: value")
    out: dict[str, str] = {}
    for k, v in {**values, **overrides}.items():
        if not isinstance(k, str):
            raise SpecError(f"envs.{k}", "names must be text")
        if v is None:
            if k not in environ:
                raise SpecError(f"envs.{k}", f"has no value in {source} and {k} is not set in the environment; "
                                f"give it a value (--env {k}=...) or export it before running")
            v = environ[k]
        elif not isinstance(v, (str, int, float)):  # a bool too: SkyPilot writes it as True/False
            raise SpecError(f"envs.{k}", f"the value must be text, got {type(v).__name__}")
        out[k] = str(v)
    return out


def _secrets(values: Any) -> dict[str, str | None]:
    """SkyPilot secrets: {NAME: value}, {NAME: null} or the list form [NAME, "secrets:NAME"]; a missing value
    (null) is resolved from the submitter's environment at submit."""
    if values is None:
        return {}
    if isinstance(values, list):
        values = {v: None for v in values}
    if not isinstance(values, Mapping):
        raise SpecError("secrets", "must be a mapping of NAME: value or a list of names")
    out: dict[str, str | None] = {}
    for k, v in values.items():
        if not isinstance(k, str):
            raise SpecError(f"secrets.{k}", "names must be text")
        name = k[len("secrets:"):] if k.startswith("secrets:") else k
        if not isinstance(v, (str, int, float)) and v is not None:
            raise SpecError(f"secrets.{k}", f"the value must be text, got {type(v).__name__}")
        out[name] = None if v is None else str(v)
    return out


_VAR = re.compile(r"\$\{([a-zA-Z_][a-zA-Z0-9_]*)\}|\$([a-zA-Z_][a-zA-Z0-9_]*)")


def _fill(text: str, known: Mapping[str, str]) -> str:
    """``${VAR}`` and ``$VAR`` replaced by the task's envs (others left as written), as SkyPilot does."""
    return _VAR.sub(lambda m: known.get(m.group(1) or m.group(2), m.group(0)), text)


def _map_resources(res: Mapping[str, Any], fields: dict[str, Any], opts: dict[str, Any]) -> None:
    res = _accelerators_alias(res, "resources")
    for k, v in res.items():
        if k not in ("accelerators", "cpus", "memory", "disk_size"):
            opts[k] = v
    _map_gpus(res, fields, opts)
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
        if re.fullmatch(rf"{_NUM}x", text):
            opts["memory"] = text  # a ratio to the CPUs: only SkyPilot can say it
        else:
            gib, plus = _gib(mem, "resources.memory", allow_plus=True)
            fields["memory"] = f"{gib:g}GiB"
            if not plus or not re.fullmatch(rf"{_NUM}\+", text):
                opts["memory"] = text  # exactly this much (only SkyPilot can say it), or in SkyPilot's units
    disk = res.get("disk_size")
    if disk is not None:
        gib, _ = _gib(disk, "resources.disk_size", allow_plus=False)
        fields["disk"] = f"{gib:g}GiB"


#: SkyPilot's size units (its ``MEMORY_SIZE_UNITS``): a bare number is GiB, "GB" means GiB too
_UNITS = {"kb": 2**-20, "ki": 2**-20, "mb": 2**-10, "mi": 2**-10, "gb": 1, "gi": 1, "tb": 2**10, "ti": 2**10,
          "pb": 2**20, "pi": 2**20}


def _gib(value: Any, field: str, *, allow_plus: bool) -> tuple[float, bool]:
    """(GiB, whether "+" was given) of a SkyPilot size: 32, "32", "32+", "1024GB", "1TB", "32GB+"."""
    text = str(value).strip()
    m = re.fullmatch(rf"({_NUM})\s*([kmgtp][bi])?(\+?)", text, re.IGNORECASE)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or not m or (m.group(3) and not allow_plus):
        plus = " or '32GB+' for at least" if allow_plus else ""
        raise SpecError(field, f"expected a size in GiB such as 256 or '1024GB' (units KB/MB/GB/TB/PB){plus}, "
                        f"got {value!r}")
    gib = float(m.group(1)) * _UNITS[(m.group(2) or "gb").lower()]
    if gib <= 0:
        raise SpecError(field, f"must be more than 0, got {value!r}")
    return gib, bool(m.group(3))


def _accelerators_alias(res: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """SkyPilot's ``gpus`` is another name for ``accelerators``."""
    if "gpus" not in res:
        return res
    if res.get("accelerators") is not None:
        raise SpecError(f"{where}.gpus", "give either gpus or accelerators (they are the same field), not both")
    out = {k: v for k, v in res.items() if k != "gpus"}
    out["accelerators"] = res["gpus"]
    return out


def _map_gpus(res: Mapping[str, Any], fields: dict[str, Any], opts: dict[str, Any]) -> None:
    """The GPU request: ``accelerators`` (one, a fraction or candidates) and those of ``any_of``/``ordered``,
    as gpus/gpu_type plus ``gpu_alternatives`` in order of preference. A fraction asks other backends for a
    whole GPU (they cannot share one); the original stays in backend_options for SkyPilot, which honours it."""
    top = res.get("accelerators")
    choices: list[tuple[str, float]] = []
    groups = [(k, res[k]) for k in ("ordered", "any_of") if res.get(k) is not None]
    if top is not None and (groups or not _single_whole(top)):
        opts["accelerators"] = top  # alternatives that name none inherit it: SkyPilot gets it as written
    if len(groups) > 1:
        raise SpecError("resources.any_of", "give either any_of or ordered, not both")
    if groups:
        key, entries = groups[0]
        if not isinstance(entries, list) or not entries:
            raise SpecError(f"resources.{key}", "expected a list of resources alternatives")
        lost = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                raise SpecError(f"resources.{key}[{i}]", "expected a mapping of resources fields")
            entry = _accelerators_alias(entry, f"resources.{key}[{i}]")
            acc = entry.get("accelerators", top)
            if acc is not None:
                choices.extend(_accelerator_list(acc, f"resources.{key}[{i}].accelerators"))
                continue
            implied = instance_gpus({**res, **entry})
            if top is None and implied != ("", 0):
                opts["accelerators"] = None  # SkyPilot reads this one's GPUs from its instance type: none to inherit
            if implied is None:
                continue  # an instance type the catalog does not list: only SkyPilot can offer it
            if implied[1]:
                choices.append((implied[0], float(implied[1])))
            else:
                lost.append(i)
        if lost and choices:
            raise SpecError(f"resources.{key}[{lost[0]}]", "asks for no GPU while another alternative asks for "
                            f"{choices[0][0]}; meshrun cannot offer a choice between GPUs and none: give every "
                            "alternative its accelerators (or none of them)")
    elif top is not None:
        choices = _accelerator_list(top, "resources.accelerators")
    else:
        implied = instance_gpus(res)  # GPUs that only the instance type names (p4d.24xlarge: 8 A100)
        if implied is not None and implied[1]:
            choices = [(implied[0], float(implied[1]))]
            opts["accelerators"] = None  # SkyPilot is given the instance type as written and reads its GPUs itself
    if not choices:
        return
    whole = [f"{name}:{math.ceil(count)}" for name, count in choices]
    fields["gpus"] = whole[0]
    if len(set(whole)) > 1:
        fields["gpu_alternatives"] = whole


def instance_gpus(res: Mapping[str, Any]) -> tuple[str, int] | None:
    """The GPUs a SkyPilot resources mapping's ``instance_type`` has, by the catalog meshrun reads prices from
    (its ``infra``/``cloud`` picks the cloud's table): (name, count), ``("", 0)`` for none (also when no
    instance type is named), None when no table lists it."""
    itype = res.get("instance_type")
    if not isinstance(itype, str):
        return ("", 0)
    from ._catalog import instance_accelerators

    where = res.get("infra") if res.get("infra") is not None else res.get("cloud")
    cloud = str(where).split("/")[0].strip().lower() if where is not None else ""
    return instance_accelerators(itype, cloud if cloud and cloud != "*" else None)


def skypilot_only(spec: Any) -> str | None:
    """Why a backend other than SkyPilot cannot run ``spec`` as written (None if it can): the spec asks for no
    GPU but names a SkyPilot ``instance_type`` (``backend_options["skypilot"]``, or one of its
    ``any_of``/``ordered`` alternatives) that has GPUs, or whose GPUs no catalog table meshrun has lists."""
    opts = spec.backend_options.get("skypilot") or {}
    if spec.resources.gpus or not isinstance(opts, Mapping):
        return None
    alts = [e for k in ("any_of", "ordered") for e in (opts.get(k) or []) if isinstance(e, Mapping)]
    entries: list[Mapping[str, Any]] = [{**opts, **e} for e in alts] or [opts]
    for res in entries:
        if res.get("accelerators") is not None or res.get("gpus") is not None:
            continue
        implied = instance_gpus(res)
        itype = res.get("instance_type")
        if implied is None:
            return (f"it names the SkyPilot instance_type {itype}, whose GPUs meshrun cannot tell: no table of its "
                    "price catalog lists it (`meshrun catalog update` fetches the clouds' tables); only SkyPilot "
                    "can run it as written, or give gpus= to run it elsewhere")
        if implied[1]:
            return (f"it names the SkyPilot instance_type {itype}, which has {implied[1]} {implied[0]} GPU(s), "
                    f"but asks for none: give gpus=\"{implied[0]}:{implied[1]}\" to run it elsewhere")
    return None


def _accelerator_list(acc: Any, field: str) -> list[tuple[str, float]]:
    """SkyPilot accelerators as (name, count) in the order written: "H100:8", "H100", "T4:0.5", {"L4": 1,
    "A10G": 1}, ["L4:1", "A10G"], and YAML's reading of a flow mapping ``{A10:1}`` ({"A10:1": None})."""
    if isinstance(acc, str):
        name, sep, text = acc.strip().partition(":")
        name, text = name.strip(), text.strip()
        try:
            count = float(text) if sep else 1.0
        except ValueError:
            count = -1.0
        if not name or any(c in name for c in ",{}[] ") or not (count > 0 and math.isfinite(count)):
            raise SpecError(field, f"expected a GPU such as 'H100:8', 'T4:0.5' or a mapping/list of candidates, "
                            f"got {acc!r}")
        return [(name, count)]
    if isinstance(acc, Mapping) and acc:
        out: list[tuple[str, float]] = []
        for name, count in acc.items():
            if count is None:
                out.extend(_accelerator_list(str(name), field))
            elif isinstance(count, bool) or not isinstance(count, (int, float)) or not count > 0:
                raise SpecError(f"{field}.{name}", f"expected a GPU count such as 1 or 0.5, got {count!r}")
            else:
                out.extend(_accelerator_list(f"{name}:{count}", field))
        return out
    if isinstance(acc, list) and acc:
        return [c for item in acc for c in _accelerator_list(item, field)]
    raise SpecError(field, f"expected a GPU such as 'H100:8', a mapping {{L4: 1, A10G: 1}} or a list, got {acc!r}")


def _single_whole(acc: Any) -> bool:
    """One accelerator with a whole count ("H100:8", "H100", {"H100": 8}): exactly what gpus= says."""
    try:
        got = _accelerator_list(acc, "resources.accelerators")
    except SpecError:
        return False
    return len(got) == 1 and float(got[0][1]).is_integer() and (isinstance(acc, str) or
                                                                 (isinstance(acc, Mapping) and None not in acc.values()))


def _text(v: Any, field: str) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    if not isinstance(v, str):
        raise SpecError(field, f"expected text, got {type(v).__name__}")
    return v


def _local(path: Any, base_dir: str | None) -> str:
    """A local path as SkyPilot reads it: ``~`` expanded, relative to the current directory (or ``base_dir``)."""
    path = os.path.expanduser(_text(path, "path"))
    if not os.path.isabs(path):
        path = os.path.normpath(os.path.join(base_dir or os.getcwd(), path))
    return path
