"""A meshrun spec as a SkyPilot task, and back: pure functions (no ``sky`` import) plus ``build_task``.

``task_config(spec)`` is the portable mapping (the task YAML a person would write: ``run`` is the command
itself); ``launch_config(submission, ...)`` is what the backend launches: the same task whose ``run`` is a
script that unpacks the job's files (host agent, launch.json, payload) on every node and runs the job under
the agent (``run --emit-records``): the agent maps SkyPilot's node variables onto meshrun's distributed env
contract, streams the job's output and prints its records into the job log framed with the job's nonce, so
they come back through SkyPilot itself (no bucket, no SSH: it works for clusters, managed jobs and remote API
servers alike) and are read with ``meshrun.backend.extract_records``.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shlex
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional, Sequence

from pydantic import Field, StrictBool, StrictInt

import meshrun
import meshrun.backend as mb

GIB = 1024**3

class SkyPilotOptions(mb.BackendOptions):
    """``backend_options["skypilot"]`` of a job, validated by the core before placement: meshrun's own keys,
    and every key of a SkyPilot ``resources`` section, handed to SkyPilot as given (SkyPilot checks those
    values when it builds the task)."""

    # meshrun's own
    cluster: Optional[str] = Field(None, pattern=r"^[a-zA-Z]([-_.a-zA-Z0-9]*[a-zA-Z0-9])?$")  # sky exec/launch here
    keep: StrictBool = False  # keep the cluster meshrun started after the job ends (default: tear it down)
    managed: StrictBool = False  # launch as a managed job (`sky jobs launch`): SkyPilot recovers preemptions
    idle_minutes: Optional[Annotated[StrictInt, Field(ge=0)]] = None  # autostop/autodown after this long idle
    task: dict[str, Any] = {}  # other SkyPilot task fields, passed through verbatim (service, volumes, ...)
    # SkyPilot's resources keys
    infra: Any = None
    cloud: Any = None
    region: Any = None
    zone: Any = None
    accelerators: Any = None
    accelerator_args: Any = None
    instance_type: Any = None
    cpus: Any = None
    memory: Any = None
    disk_size: Any = None
    disk_tier: Any = None
    network_tier: Any = None
    use_spot: Optional[StrictBool] = None
    job_recovery: Any = None
    image_id: Any = None
    ports: Any = None
    labels: Any = None
    any_of: Any = None
    ordered: Any = None
    autostop: Any = None
    priority: Any = None
    priority_class: Any = None
    max_hourly_cost: Any = None
    local_disk: Any = None
    ephemeral_storage: Any = None
    volumes: Any = None


#: the SkyPilot resources keys among the options: they go into the task's ``resources`` as given
RESOURCE_OPTIONS = tuple(k for k in SkyPilotOptions.model_fields if k not in ("cluster", "keep", "managed",
                                                                              "idle_minutes", "task"))
START_MARK = "::meshrun-started:"  # node 0 prints it once the job is unpacked and about to start
#: the submitter's variables a job with inputs/outputs gets as SkyPilot secrets (those that are set): what the
#: node's stager reads through boto3's chain (endpoint, key pair, profile) and meshrun's own data knobs
DATA_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE", "MESHRUN_DATA_PYTHON", "MESHRUN_DATA_CACHE")


def job_options(spec: Any) -> dict[str, Any]:
    """The keys of ``backend_options["skypilot"]`` the job gives, validated by :class:`SkyPilotOptions` (a
    SpecError names the key and what is allowed)."""
    opts = SkyPilotOptions.load("skypilot", spec.options_for("skypilot"))
    return opts.model_dump(include=opts.model_fields_set)


# ---- spec -> task (the portable mapping) -----------------------------------------------------------------


def resources_config(spec: Any, opts: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """SkyPilot ``resources`` for the spec: GPUs as "TYPE:N", minimum CPUs/memory as "N+", disk in GiB, and
    every SkyPilot resources key of ``backend_options["skypilot"]`` on top (they win)."""
    r = spec.resources
    opts = dict(opts if opts is not None else job_options(spec))
    res: dict[str, Any] = {}
    if r.gpus:
        if r.gpu_type:
            res["accelerators"] = f"{r.gpu_type}:{r.gpus}"
        elif "accelerators" not in opts:
            raise meshrun.SpecError("gpu_type", "SkyPilot needs a GPU model (e.g. gpus=\"H100:8\") or "
                                    "backend_options.skypilot.accelerators with the candidates")
    if r.cpus:
        res["cpus"] = f"{r.cpus:g}+"
    if r.memory:
        res["memory"] = f"{_gib(r.memory)}+"
    if r.disk:
        res["disk_size"] = int(math.ceil(r.disk / GIB))
    for k in RESOURCE_OPTIONS:
        if k in opts:
            res[k] = opts[k]
    return res


def _common_config(spec: Any, opts: Mapping[str, Any], name: str | None,
                   secrets: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The task fields both task forms share (name, workdir, nodes, resources, envs, secrets, file mounts),
    and the job's extra ``task`` keys still to merge (their ``file_mounts`` already merged)."""
    cfg: dict[str, Any] = {}
    if name is not None:
        cfg["name"] = name
    if spec.workdir is not None:
        cfg["workdir"] = spec.workdir
    if spec.nodes != 1:
        cfg["num_nodes"] = spec.nodes
    res = resources_config(spec, opts)
    if res:
        cfg["resources"] = res
    if spec.env:
        cfg["envs"] = dict(spec.env)
    if secrets:
        cfg["secrets"] = dict(secrets)
    mounts = {remote_target(k): v for k, v in spec.files.items()}
    extra = dict(opts.get("task") or {})
    if isinstance(extra.get("file_mounts"), Mapping):
        mounts.update(extra.pop("file_mounts"))
    if mounts:
        cfg["file_mounts"] = mounts
    return cfg, extra


def task_config(spec: Any) -> dict[str, Any]:
    """The SkyPilot task YAML (as a dict) that runs the spec's command natively: what
    ``meshrun._taskyaml.spec_from_task_config`` reads back into the same spec."""
    opts = job_options(spec)
    if spec.kind != "command":
        raise meshrun.SpecError("function", "a function job has no plain SkyPilot task; submit it to the "
                                "skypilot backend, which runs it through meshrun's runner")
    if spec.inputs or spec.outputs:
        raise meshrun.SpecError("inputs" if spec.inputs else "outputs",
                                "object-store inputs/outputs have no plain SkyPilot task field; submit the job to "
                                "the skypilot backend, which stages them on the node with meshrun's stager")
    # names only: the values of secrets are never written
    cfg, extra = _common_config(spec, opts, spec.name, {k: None for k in spec.secrets})
    if spec.setup:
        cfg["setup"] = spec.setup[0] if len(spec.setup) == 1 else "set -e\n" + "\n".join(spec.setup)
    cfg["run"] = spec.command if isinstance(spec.command, str) else shlex.join(spec.command)
    for k, v in extra.items():
        cfg.setdefault(k, v)
    return cfg


def remote_target(target: str) -> str:
    """A meshrun file target on the cluster: relative targets land in SkyPilot's workdir (the job's cwd)."""
    if target.startswith(("/", "~")):
        return target
    return "~/sky_workdir/" + (target[2:] if target.startswith("./") else target)


def _gib(n: int) -> str:
    v = n / GIB
    return f"{v:g}" if v == int(v) else f"{v:.3f}".rstrip("0")


# ---- the task meshrun launches -------------------------------------------------------------------------


def bundle(submission: Any, *, grace_period: float | None = None, with_cloudpickle: bool | None = None,
           master_port: int = 29500) -> bytes:
    """The job's files as a gzipped tar (``meshrun.backend.pack_job``): the host agent, launch.json (with
    ``lease``/``mask_gpus`` off, SkyPilot hands out the GPUs), spec.json, payload.pkl and, for function jobs,
    the submitter's cloudpickle (used on the cluster only when its Python lacks that exact version)."""
    launch = dict(submission.launch)
    launch["lease"] = False
    launch["mask_gpus"] = False
    launch["cwd"] = None  # set on the node: SkyPilot's working directory
    launch["scheduler"] = "skypilot"  # the agent reads the env contract from SkyPilot's variables
    launch["dist"] = {"MASTER_PORT": str(int(master_port))}
    if grace_period is not None:
        launch.setdefault("grace_period", grace_period)
    files = {p.name: p.read_bytes() for p in submission.files() if p.name != "launch.json"}
    files["launch.json"] = (json.dumps(launch, sort_keys=True) + "\n").encode()
    extra = {}
    if with_cloudpickle if with_cloudpickle is not None else submission.spec.kind == "function":
        import cloudpickle

        root = Path(cloudpickle.__file__).resolve().parent
        extra = {f".meshrun-lib/cloudpickle/{f.name}": f.read_bytes() for f in sorted(root.glob("*.py"))}
    return mb.pack_job(files, compress=True, extra=extra)


def run_script(*, job_id: str, bundle_b64: str, nonce: str, python: str = "python3",
               cloudpickle_version: str | None = None, remote_root: str = "$HOME/.meshrun") -> str:
    """The task's ``run``: pure text, every value shell-quoted (golden-file tested). The job's files are
    unpacked with the node's own ``base64`` and ``tar``; everything else is the agent's."""
    if not re.fullmatch(r"[A-Za-z0-9+/=]*", bundle_b64):
        raise ValueError("the bundle must be base64")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", job_id):
        raise ValueError(f"bad job id {job_id!r}")
    root = remote_root if remote_root == "$HOME/.meshrun" else shlex.quote(remote_root)
    cp_check = ""
    if cloudpickle_version:
        cp_check = (
            f'if ! "$MR_PY" -c {shlex.quote(f"import sys, cloudpickle; sys.exit(cloudpickle.__version__ != {json.dumps(cloudpickle_version)})")} 2>/dev/null; then\n'
            '  export PYTHONPATH="$MR_DIR/.meshrun-lib${PYTHONPATH:+:$PYTHONPATH}"\n'
            "fi\n"
        )
    if not re.fullmatch(r"[A-Za-z0-9_-]+", nonce):
        raise ValueError(f"bad records nonce {nonce!r}")
    return (
        f"# meshrun job {job_id}: runs on every node of the cluster under meshrun's host agent\n"
        f"MR_PY={shlex.quote(python)}\n"
        f"MR_JOB={job_id}\n"
        'MR_RANK="${SKYPILOT_NODE_RANK:-0}"\n'
        f'MR_DIR="{root}/jobs/$MR_JOB/rank$MR_RANK"\n'
        'mkdir -p "$MR_DIR" || exit 97\n'
        f"printf '%s' '{bundle_b64}' | base64 -d | tar -xzf - -C \"$MR_DIR\" || "
        '{ echo "meshrun: cannot unpack the job into $MR_DIR" >&2; exit 97; }\n'
        f'if [ "$MR_RANK" = 0 ]; then echo "{START_MARK}$MR_JOB::"; fi\n'
        + cp_check +
        # the agent streams this node's output and ends it with the job's records, framed with the nonce
        f'exec "$MR_PY" "$MR_DIR/_agent.py" run "$MR_DIR" --emit-records {nonce} </dev/null\n'
    )


def data_secrets(spec: Any, names: Sequence[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a job with inputs/outputs takes from the submitter's environment (``environ``, default
    ``os.environ``) to its nodes as SkyPilot secrets: each variable of ``names`` that is set, unless the spec
    gives it itself (in ``env`` or ``secrets``). Nothing for a job that moves no data."""
    if not (spec.inputs or spec.outputs):
        return {}
    env = os.environ if environ is None else environ
    return {k: env[k] for k in names if k in env and k not in spec.env and k not in spec.secrets}


def launch_config(submission: Any, *, python: str = "python3", master_port: int = 29500,
                  grace_period: float | None = None, max_inline_bytes: int = 8 * 1024**2,
                  data_env: Sequence[str] = DATA_ENV) -> dict[str, Any]:
    """The task meshrun launches for a submission: the portable mapping, with meshrun's run script. A job
    with inputs/outputs also gets the variables of ``data_env`` set here as SkyPilot secrets (the stager's
    endpoint and credentials on the node: :func:`data_secrets`)."""
    spec = submission.spec
    opts = job_options(spec)
    data = bundle(submission, grace_period=grace_period, master_port=master_port)
    if len(data) > max_inline_bytes:
        raise meshrun.SpecError(
            "args", f"the job's files take {len(data)} bytes packed, more than the {max_inline_bytes}-byte limit "
            "for what travels inside the task (max_inline_bytes); pass large data as files= (SkyPilot file mounts)")
    cp = None
    if spec.kind == "function":
        import cloudpickle

        cp = cloudpickle.__version__
    # SkyPilot's own secrets: redacted in everything it shows; never in the job folder (not in launch.json:
    # the node's environment is what the stager reads)
    secrets = {**data_secrets(spec, data_env), **submission.secrets}
    cfg, extra = _common_config(spec, opts, submission.name, secrets)
    cfg["run"] = run_script(job_id=submission.job_id, bundle_b64=base64.b64encode(data).decode(), python=python,
                            nonce=mb.records_nonce(submission.job_dir) or "", cloudpickle_version=cp)
    for k, v in extra.items():
        cfg.setdefault(k, v)
    return cfg


def build_task(config: Mapping[str, Any]) -> Any:
    """A ``sky.Task`` from a task config, through SkyPilot's own schema validation (``from_yaml_config``).
    Invalid fields become :class:`meshrun.SpecError`. ``config`` is left as it was (SkyPilot rewrites the
    mapping it reads, nested parts included, so it reads a deep copy)."""
    import copy

    import sky
    from sky import exceptions as sky_exc

    try:
        return sky.Task.from_yaml_config(copy.deepcopy(dict(config)))
    except (sky_exc.InvalidSkyPilotConfigError, ValueError, TypeError, AssertionError) as e:
        raise meshrun.SpecError("backend_options.skypilot", f"SkyPilot rejects the task: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


# ---- the job log --------------------------------------------------------------------------------------


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """The text without terminal colours (SkyPilot colours its log lines)."""
    return _ANSI.sub("", text)


def clean_log(text: str) -> str:
    """The log without the framed records, the start line and terminal colours (what a person wants to read)."""
    text = mb.strip_records(text)
    if START_MARK in text:
        text = "".join(line for line in text.splitlines(keepends=True) if START_MARK not in line)
    return strip_ansi(text)
