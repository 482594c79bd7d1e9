"""Experiment tracking that follows the job: W&B, MLflow and TensorBoard runs named, grouped, resumed and
closed by meshrun.

A job gets its run identity through each tool's own environment variables, put into the job's launch
environment at submit (so every backend carries it, and an unmodified ``wandb.init()``,
``mlflow.start_run()`` or TensorBoard writer lands in the right place). What was handed out is kept in the
job folder as ``tracking.json`` (ids, names, URLs; never a key or a token). When the store first records a
job's end, :func:`job_ended` closes what the job could not: its MLflow run (and a sweep's parent run once
every job of the sweep has ended) is set FINISHED, FAILED or KILLED with the reason as a tag, and the W&B run
of a job that did not succeed is resumed and finished with a failing exit code, the outcome in its summary.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ._errors import ConfigError, MeshrunError

TYPE_CHECKING = False  # typing is not imported at run time (the CLI must start fast)
if TYPE_CHECKING:
    from typing import Any, Iterator

    # the spec and the store call in here (when a job is prepared, when an end is recorded), so this module
    # names their types without importing them: ``JobSpec`` and ``Store`` are those of meshrun._spec / _store
    JobSpec = Any
    Store = Any

RECORD = "tracking.json"

# the settings each tool takes (config table ``[tracking.<tool>]``, ``track={tool: {...}}``)
TOOLS: dict[str, tuple[str, ...]] = {
    "wandb": ("project", "entity", "mode", "dir", "tags"),
    "mlflow": ("tracking_uri", "experiment"),
    "tensorboard": ("root",),
}
_WANDB_MODES = ("online", "offline", "disabled", "shared")
_TRACK_HELP = ('a tool name or a comma-separated list ("wandb,mlflow"), a list of names, a mapping '
               '{tool: {setting: value}}, or False for none; the tools are: ' + ", ".join(TOOLS))

# MLflow's statuses for meshrun's outcomes
_MLFLOW_STATUS = {"succeeded": "FINISHED", "cancelled": "KILLED", "preempted": "KILLED",
                  "failed": "FAILED", "timeout": "FAILED", "lost": "FAILED"}

# a sweep's MLflow parent run, created once per (tracking URI, sweep id) by the submitting process
_parents: dict[tuple[str, str], tuple[str, str]] = {}
_env_lock = _thread.RLock()  # threading's RLock, without importing threading (a CLI start)


# ---- what to track ------------------------------------------------------------------------------------


def normalize(value: Any, where: str = "track") -> dict[str, dict[str, Any]] | None:
    """``track=`` in its one form: None (what the config says), {} (nothing), or {tool: settings}.
    Raises ValueError naming what is allowed."""
    if value is None or value is True:
        return None
    if value is False:
        return {}
    if isinstance(value, str):
        value = [t.strip() for t in value.split(",") if t.strip()]
    if isinstance(value, (list, tuple)):
        if not all(isinstance(t, str) for t in value):
            raise ValueError(f"expected {_TRACK_HELP}; got {value!r}")
        value = {t: {} for t in value}
    if not isinstance(value, Mapping):
        raise ValueError(f"expected {_TRACK_HELP}; got {type(value).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for tool, settings in value.items():
        if tool not in TOOLS:
            raise ValueError(f"unknown tracking tool {tool!r} in {where}; the tools are: {', '.join(TOOLS)}")
        if settings is None or settings is True:
            settings = {}
        if not isinstance(settings, Mapping):
            raise ValueError(f"{where}.{tool} must be a mapping of settings ({', '.join(TOOLS[tool])}), "
                             f"got {type(settings).__name__}")
        clean: dict[str, Any] = {}
        for k, v in settings.items():
            if k not in TOOLS[tool]:
                secret = any(w in str(k).lower() for w in ("key", "token", "password", "secret"))
                hint = (" (keys and tokens are never part of a job: set them in the environment, e.g. "
                        "WANDB_API_KEY or MLFLOW_TRACKING_TOKEN)") if secret else ""
                raise ValueError(f"unknown setting {k!r} for {where}.{tool}; the settings are: "
                                 f"{', '.join(TOOLS[tool])}{hint}")
            if k == "tags":
                if isinstance(v, str):
                    v = [t.strip() for t in v.split(",") if t.strip()]
                if not isinstance(v, (list, tuple)) or not all(isinstance(t, str) and t and "," not in t
                                                               for t in v):
                    raise ValueError(f"{where}.{tool}.tags must be a list of non-empty text without commas "
                                     f"(WANDB_TAGS is comma-separated), got {v!r}")
                v = list(v)
            elif not isinstance(v, str) or not v or "\x00" in v:
                raise ValueError(f"{where}.{tool}.{k} must be non-empty text, got {v!r}")
            if k == "mode" and v not in _WANDB_MODES:
                raise ValueError(f"{where}.{tool}.mode must be one of {', '.join(_WANDB_MODES)}, got {v!r}")
            if k == "tracking_uri" and _password_in(v):
                raise ValueError(f"{where}.{tool}.tracking_uri must not carry a password (it would be stored "
                                 "with the job); set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or "
                                 "MLFLOW_TRACKING_TOKEN in the environment instead")
            clean[k] = v
        out[tool] = clean
    return out


def configured() -> dict[str, dict[str, Any]]:
    """The ``[tracking]`` table of the config: the tools every job is tracked with unless it says otherwise."""
    from ._config import get_config

    table = get_config().section("tracking")
    try:
        return normalize(table, "tracking") or {}
    except ValueError as e:
        raise ConfigError("tracking", str(e)) from None


def settings_for(track: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """The tools a job is tracked with and their settings: the job's ``track`` over the config's table."""
    conf = configured()
    if track is None:
        return conf
    return {tool: {**conf.get(tool, {}), **s} for tool, s in track.items()}


# ---- at submit: the identity ----------------------------------------------------------------------------


def begin(spec: JobSpec, launch: dict[str, Any], files: dict[str, bytes], *, backend: str,
          array_id: str | None, array_index: int | None) -> None:
    """Give a job being prepared its run identity: the tools' variables go into ``launch["env"]`` (the job's
    own ``env`` wins over them) and what was handed out into ``files["tracking.json"]``."""
    tools = settings_for(getattr(spec, "track", None))
    if not tools:
        return
    job_id = launch["job_id"]
    name = spec.display_name if array_index is None else f"{spec.display_name}[{array_index}]"
    tags = [f"backend:{backend}"]
    if spec.resources.gpus:
        tags.append(f"gpu:{spec.resources.gpu_type or 'any'}x{spec.resources.gpus}")
    env: dict[str, str] = {}
    record: dict[str, Any] = {"job_id": job_id, "sweep": array_id}
    for tool in TOOLS:
        if tool not in tools:
            continue
        s = tools[tool]
        if tool == "wandb":
            e, r = _wandb_identity(s, job_id, name, array_id, tags)
        elif tool == "mlflow":
            e, r = _mlflow_identity(s, spec, job_id, name, array_id, backend)
        else:
            e, r = _tensorboard_identity(s, job_id, array_id, array_index)
        env.update(e)
        record[tool] = r
    launch["env"] = {**env, **(launch.get("env") or {})}
    files[RECORD] = (json.dumps(record, sort_keys=True, indent=1) + "\n").encode()


def for_offer(launch: dict[str, Any], offer: Any) -> bool:
    """Tag a W&B-tracked job with the price of the offer its attempt is submitted to (``price:$1.23/h``,
    ``spot``); returns whether ``launch`` changed."""
    env = launch.get("env") or {}
    tags = env.get("WANDB_TAGS")
    if not tags or offer is None or env.get("WANDB_RUN_ID") != launch.get("job_id"):
        return False
    kept = [t for t in tags.split(",") if not t.startswith("price:") and t != "spot"]
    kept.append(f"price:${float(offer.total_price_per_hour):.2f}/h")
    if getattr(offer, "spot", False):
        kept.append("spot")
    new = ",".join(kept)
    if new == tags:
        return False
    launch["env"] = {**env, "WANDB_TAGS": new}
    return True


def _wandb_identity(s: dict[str, Any], job_id: str, name: str, sweep: str | None,
                    tags: list[str]) -> tuple[dict[str, str], dict[str, Any]]:
    # the run id is the job id: a retry or a failover of the job resumes the same run
    env = {"WANDB_RUN_ID": job_id, "WANDB_RESUME": "allow", "WANDB_NAME": name,
           "WANDB_TAGS": ",".join(["meshrun", *tags, *s.get("tags", [])])}
    if sweep:
        env["WANDB_RUN_GROUP"] = sweep
    for key, var in (("project", "WANDB_PROJECT"), ("entity", "WANDB_ENTITY"), ("mode", "WANDB_MODE"),
                     ("dir", "WANDB_DIR")):
        if s.get(key):
            env[var] = s[key]
    rec: dict[str, Any] = {"run_id": job_id, "name": name, "group": sweep, "tags": env["WANDB_TAGS"].split(","),
                           "project": s.get("project"), "entity": s.get("entity"), "mode": s.get("mode")}
    if s.get("dir"):
        rec["dir"] = s["dir"]
    if s.get("entity") and s.get("project") and s.get("mode") in (None, "online", "shared"):
        base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").replace("://api.", "://")
        rec["url"] = f"{base.rstrip('/')}/{s['entity']}/{s['project']}/runs/{job_id}"
    return env, rec


_MLFLOW_QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


@contextlib.contextmanager
def _quick_mlflow() -> Iterator[None]:
    """MLflow retries an unreachable server for minutes by default; meshrun's own calls (at submit, and in
    whatever status refresh sees a job end) give up after seconds. Variables the user set are kept."""
    with _env_lock:
        mine = [k for k in _MLFLOW_QUICK if k not in os.environ]
        for k in mine:
            os.environ[k] = _MLFLOW_QUICK[k]
        try:
            yield
        finally:
            for k in mine:
                os.environ.pop(k, None)


def _mlflow_client(uri: str) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        from ._install import extra_hint

        raise ConfigError("tracking.mlflow", "tracking with MLflow needs the mlflow package here, where jobs are "
                          f"submitted: {extra_hint('track')} (or pip install mlflow)") from None
    return MlflowClient(tracking_uri=uri)


def _mlflow_identity(s: dict[str, Any], spec: JobSpec, job_id: str, name: str, sweep: str | None,
                     backend: str) -> tuple[dict[str, str], dict[str, Any]]:
    uri = s.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError("tracking.mlflow.tracking_uri", "MLflow tracking needs a tracking URI: set tracking_uri "
                          "in [tracking.mlflow] (or track={'mlflow': {'tracking_uri': ...}}) or MLFLOW_TRACKING_URI")
    try:
        with _quick_mlflow():
            exp_id, rid, parent = _mlflow_create(s, spec, uri, job_id, name, sweep, backend)
    except MeshrunError:
        raise
    except Exception as e:
        raise MeshrunError(f"MLflow tracking: could not create the job's run at {_redact(uri)}: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_ID": str(exp_id), "MLFLOW_RUN_ID": rid}
    rec: dict[str, Any] = {"tracking_uri": _redact(uri), "experiment_id": str(exp_id), "run_id": rid,
                           "parent_run_id": parent}
    if uri.startswith(("http://", "https://")):
        rec["url"] = f"{_redact(uri).rstrip('/')}/#/experiments/{exp_id}/runs/{rid}"
    return env, rec


def _mlflow_create(s: dict[str, Any], spec: JobSpec, uri: str, job_id: str, name: str, sweep: str | None,
                   backend: str) -> tuple[str, str, str | None]:
    """The job's run (and its sweep's parent run, once per process): (experiment id, run id, parent id)."""
    client = _mlflow_client(uri)
    exp_name = s.get("experiment") or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
    exp = client.get_experiment_by_name(exp_name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(exp_name)
    tags = {"meshrun.job_id": job_id, "meshrun.backend": backend}
    parent = None
    if sweep:
        key = (uri, sweep)
        if key not in _parents:
            prun = client.create_run(exp_id, run_name=f"{spec.display_name} {sweep}",
                                     tags={"meshrun.sweep": sweep, "meshrun.backend": backend})
            _parents[key] = (prun.info.run_id, exp_id)
        parent = _parents[key][0]
        tags["mlflow.parentRunId"] = parent
        tags["meshrun.sweep"] = sweep
    run = client.create_run(exp_id, run_name=name, tags=tags)
    rid = run.info.run_id
    params = _function_params(spec)
    if params:
        from mlflow.entities import Param

        client.log_batch(rid, params=[Param(k, v) for k, v in params.items()])
    client.update_run(rid, status="SCHEDULED")  # the job's start_run() makes it RUNNING
    return str(exp_id), rid, parent


def _function_params(spec: JobSpec) -> dict[str, str]:
    """A function job's arguments by parameter name, as text MLflow accepts (cut to 500 characters)."""
    if spec.kind != "function":
        return {}
    import inspect

    try:
        bound = inspect.signature(spec.resolve_function()).bind_partial(*spec.args, **spec.kwargs)
        items = list(bound.arguments.items())
    except (TypeError, ValueError):
        items = [(f"arg{i}", a) for i, a in enumerate(spec.args)] + list(spec.kwargs.items())
    out = {}
    for k, v in items:
        text = v if isinstance(v, str) else repr(v)
        out[str(k)[:250]] = text if len(text) <= 500 else text[:485] + " [... cut here]"
    return out


def _tensorboard_identity(s: dict[str, Any], job_id: str, sweep: str | None,
                          index: int | None) -> tuple[dict[str, str], dict[str, Any]]:
    root = s.get("root")
    if not root:
        from ._config import get_config

        root = str(get_config().home / "tensorboard")
    root = os.path.abspath(os.path.expanduser(root))
    folder = os.path.join(root, sweep) if sweep else root
    logdir = os.path.join(folder, f"{index:03d}-{job_id}" if sweep else job_id)
    try:  # where the job runs on this machine or a shared file system; elsewhere its writer makes it
        os.makedirs(logdir, exist_ok=True)
    except OSError:
        pass
    env = {"TENSORBOARD_LOGDIR": logdir, "MESHRUN_TENSORBOARD_DIR": logdir}
    return env, {"logdir": logdir, "sweep_dir": folder if sweep else None}


# ---- when a job ends: close what the job could not ------------------------------------------------------


def job_ended(store: Store, job_id: str) -> None:
    """Called by the store when it records a terminal state. Closes the job's MLflow run (and its sweep's
    parent run once the whole sweep has ended) and marks the W&B run of a job that did not succeed; never
    raises (a failure is noted in tracking.json)."""
    path = store.job_dir(job_id) / RECORD
    if not path.exists():
        return
    try:
        record = json.loads(path.read_text())
        rec = store.get(job_id)
        state = rec.state.value
        if rec.state.terminal and isinstance(record.get("mlflow"), dict):
            with _quick_mlflow():
                _mlflow_close(store, record, state, rec.reason, rec.where)
        w = record.get("wandb")
        if rec.state.terminal and isinstance(w, dict) and state != "succeeded" and not w.get("closed"):
            w["closed"] = _wandb_close(store, job_id, state, rec.reason, rec.where, rec.exit_code)
        record["ended"] = {"state": state, "reason": rec.reason, "at": time.time()}
        record.pop("close_error", None)
    except Exception as e:
        try:
            fresh = json.loads(path.read_text())
            if isinstance(record.get("wandb"), dict) and record["wandb"].get("closed"):
                fresh["wandb"] = record["wandb"]  # closed before the failure: not to be closed twice
            record = fresh
            record["close_error"] = f"{type(e).__name__}: {e}"
        except Exception:
            return
    _write(path, record)


def close_again(store: Store, job_id: str) -> None:
    """Close an ended job's runs once more if the last try failed (``meshrun status`` does, so a tracking
    server that was down when the job ended catches up)."""
    if links(store.job_dir(job_id)).get("close_error") and store.get(job_id).terminal:
        job_ended(store, job_id)


def _mlflow_close(store: Store, record: dict[str, Any], state: str, reason: str | None, where: str | None) -> None:
    m = record["mlflow"]
    uri = _launch_env(store, record["job_id"]).get("MLFLOW_TRACKING_URI") or m["tracking_uri"]
    client = _mlflow_client(uri)
    rid = m["run_id"]
    status = _MLFLOW_STATUS.get(state, "FAILED")
    run = client.get_run(rid)
    client.set_tag(rid, "meshrun.state", state)
    if reason:
        client.set_tag(rid, "meshrun.reason", reason[:4900])
    if where:
        client.set_tag(rid, "meshrun.where", where)
    # a job that succeeded keeps the end its own code gave its run; any other outcome is meshrun's to say
    if not (status == "FINISHED" and run.info.status in ("FINISHED", "FAILED", "KILLED")):
        client.set_terminated(rid, status=status)
    sweep, parent = record.get("sweep"), m.get("parent_run_id")
    if sweep and parent:
        jobs = store.list(array_id=sweep, limit=None)
        if all(j.terminal for j in jobs):
            states = {j.state.value for j in jobs}
            pstatus = ("FINISHED" if states == {"succeeded"} else
                       "FAILED" if states & {"failed", "timeout", "lost"} else "KILLED")
            client.set_tag(parent, "meshrun.states", ",".join(sorted(states)))
            client.set_terminated(parent, status=pstatus)


# the submitter's W&B variables the closing process keeps (credentials, server, local folders); the run's
# identity comes from the job's launch environment
_WANDB_KEEP = ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_CONFIG_DIR",
               "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_MODE", "WANDB_INIT_TIMEOUT")
_WANDB_TIMEOUT = 20.0  # seconds for the whole closing process (an offline one takes about three)

# run in a separate Python, so that wandb's global state and threads never enter the submitting process
_WANDB_CLOSE = """
import json, os, sys
import wandb
state, reason, where, code = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
run = wandb.init()
run.summary.update({"meshrun.state": state, "meshrun.reason": reason, "meshrun.where": where})
run.tags = tuple(t for t in run.tags if t != "meshrun:" + state) + ("meshrun:" + state,)
folder = os.path.dirname(run.dir)
run.finish(exit_code=code)
print(json.dumps({"folder": folder}))
"""


def _wandb_close(store: Store, job_id: str, state: str, reason: str | None, where: str | None,
                 exit_code: int | None) -> dict[str, Any]:
    """Resume the job's W&B run in a separate process and finish it with a failing exit code, the job's state,
    reason and host in its summary (``meshrun.state``, ``meshrun.reason``, ``meshrun.where``) and a
    ``meshrun:<state>`` tag. Returns what was done, for tracking.json; raises when it could not be done."""
    import importlib.util

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") or k in _WANDB_KEEP}
    env.update({k: v for k, v in _launch_env(store, job_id).items() if k.startswith("WANDB_")})
    if env.get("WANDB_MODE") == "disabled":
        return {"skipped": "mode disabled"}
    if importlib.util.find_spec("wandb") is None:
        from ._install import extra_hint

        raise ConfigError("tracking.wandb", "marking the W&B run of a job that did not succeed needs the wandb "
                          f"package here, where jobs are submitted: {extra_hint('track')} (or pip install wandb)")
    # an offline run is written where the job's were, when that folder is here; else (and for an online run,
    # whose local files are only a cache) into the job's folder in the store
    folder = env.get("WANDB_DIR")
    if folder and env.get("WANDB_MODE") == "offline" and os.path.isdir(folder):
        folder = os.path.abspath(folder)
    else:
        folder = str(store.job_dir(job_id))
    env.update({"WANDB_DIR": folder, "WANDB_RUN_ID": job_id, "WANDB_RESUME": "allow", "WANDB_SILENT": "true"})
    env.setdefault("WANDB_INIT_TIMEOUT", "15")
    code = exit_code if isinstance(exit_code, int) and exit_code > 0 else 1
    args = [state, (reason or state)[:4900].replace("\x00", ""), (where or "").replace("\x00", ""), str(code)]
    import shutil
    import subprocess
    import tempfile

    # W&B's service leaves folders and sockets in the temporary folder: a private one (mkdtemp: ours, 0700,
    # a name nobody could choose beforehand), removed afterwards
    env["TMPDIR"] = tmp = tempfile.mkdtemp(prefix="meshrun-wandb-")
    try:
        p = subprocess.Popen([sys.executable, "-c", _WANDB_CLOSE, *args], env=env, cwd=folder, text=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
        try:
            out, err = p.communicate(timeout=_WANDB_TIMEOUT)
        except subprocess.TimeoutExpired:
            import signal

            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)  # the process and the wandb service it started
            p.communicate()
            raise MeshrunError(f"W&B: resuming run {job_id} to mark it {state} took over {_WANDB_TIMEOUT:g} s") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = out.strip().splitlines()
    if p.returncode != 0 or not lines:
        last = (err.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
        raise MeshrunError(f"W&B: could not mark run {job_id} {state}: {last}")
    return {"state": state, "exit_code": code, "folder": json.loads(lines[-1])["folder"], "at": time.time()}


def _launch_env(store: Store, job_id: str) -> dict[str, str]:
    try:
        env = json.loads((store.job_dir(job_id) / "launch.json").read_text()).get("env") or {}
        return env if isinstance(env, dict) else {}
    except (OSError, ValueError):
        return {}


# ---- links ---------------------------------------------------------------------------------------------


def links(job_dir: Path | str) -> dict[str, Any]:
    """What a job was tracked as: {tool: {run_id, name, url, logdir, ...}}; {} for an untracked job."""
    try:
        record = json.loads((Path(job_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in record.items() if k in TOOLS or k in ("ended", "close_error")}


def link_lines(job_dir: Path | str) -> list[tuple[str, str]]:
    """One (label, text) per tracked tool, for ``meshrun status``."""
    out = []
    t = links(job_dir)
    if "wandb" in t:
        w = t["wandb"]
        where = "/".join(x for x in (w.get("entity"), w.get("project")) if x)
        text = f"run {w['run_id']}" + (f" in {where}" if where else "") + (f" ({w['mode']})" if w.get("mode") else "")
        if w.get("group"):
            text += f", group {w['group']}"
        if (w.get("closed") or {}).get("state"):
            text += f", marked {w['closed']['state']} by meshrun"
        out.append(("wandb", text + (f"  {w['url']}" if w.get("url") else "")))
    if "mlflow" in t:
        m = t["mlflow"]
        text = f"run {m['run_id']} (experiment {m['experiment_id']})"
        if m.get("parent_run_id"):
            text += f", parent {m['parent_run_id']}"
        out.append(("mlflow", text + f"  {m.get('url') or m['tracking_uri']}"))
    if "tensorboard" in t:
        out.append(("tensorboard", t["tensorboard"]["logdir"]))
    if t.get("close_error"):
        out.append(("tracking", f"closing the run failed: {t['close_error']}"))
    return out


def short_links(job_dir: Path | str) -> str:
    """A few words for a table column (``meshrun ls``): the tools, with the MLflow run's id cut short."""
    t = links(job_dir)
    parts = []
    if "wandb" in t:
        parts.append("wandb")
    if "mlflow" in t:
        parts.append(f"mlflow:{t['mlflow']['run_id'][:8]}")
    if "tensorboard" in t:
        parts.append("tb")
    return " ".join(parts)


def html_links(job_dir: Path | str) -> str:
    """The tracked runs for a notebook view: each tool's run, linked where it has a URL (escaped HTML)."""
    import html

    out = []
    for label, text in link_lines(job_dir):
        body, _, url = text.partition("  ")
        if url.startswith(("http://", "https://")):
            out.append(f'{html.escape(label)} <a href="{html.escape(url)}" target="_blank">{html.escape(body)}</a>')
        else:
            out.append(f"{html.escape(label)} {html.escape(text)}")
    return "<br>".join(out)


def tensorboard_logdir(store: Store, job_or_sweep: str) -> str:
    """The folder TensorBoard should read for a job (its log dir) or a sweep (the folder of its jobs)."""
    from ._errors import JobNotFound

    jobs = store.list(array_id=job_or_sweep, limit=1)
    if jobs:
        tb = links(store.job_dir(jobs[0].id)).get("tensorboard")
        if tb and tb.get("sweep_dir"):
            return str(tb["sweep_dir"])
        raise MeshrunError(f"the jobs of sweep {job_or_sweep} were not tracked with TensorBoard "
                           "(track='tensorboard' or a [tracking.tensorboard] table)")
    try:
        rec = store.get(job_or_sweep)
    except JobNotFound:
        raise JobNotFound(f"no job or sweep {job_or_sweep!r} in the job store at {store.home}",
                          job_or_sweep) from None
    tb = links(store.job_dir(rec.id)).get("tensorboard")
    if not tb:
        raise MeshrunError(f"job {rec.id} was not tracked with TensorBoard "
                           "(track='tensorboard' or a [tracking.tensorboard] table)")
    return str(tb["logdir"])


# ---- small helpers -------------------------------------------------------------------------------------


def _password_in(uri: str) -> bool:
    try:
        return urlsplit(uri).password is not None
    except ValueError:
        return False


def _redact(uri: str) -> str:
    """The URI without user information (a name or a password never reaches a record or the screen)."""
    try:
        u = urlsplit(uri)
    except ValueError:
        return re.sub(r"//[^/@]*@", "//", uri)
    if u.username is None and u.password is None:
        return uri
    host = u.hostname or ""
    if u.port:
        host += f":{u.port}"
    return urlunsplit((u.scheme, host, u.path, u.query, u.fragment))


def _write(path: Path, record: dict[str, Any]) -> None:
    from ._agent import atomic_write

    try:
        atomic_write(str(path), (json.dumps(record, sort_keys=True, indent=1) + "\n").encode(), 0o600)
    except OSError:
        pass
