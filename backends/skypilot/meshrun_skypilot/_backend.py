"""The SkyPilot backend: launch meshrun jobs on any infra SkyPilot knows, priced from its catalogs.

Backend ids:
    ``cluster:<cluster>:<job name>:<request id>``   a job on a SkyPilot cluster (``sky launch`` / ``sky exec``)
    ``managed::<job name>:<request id>``            a SkyPilot managed job (``sky jobs launch``, spot recovery)
The job is found again by its SkyPilot job name (``meshrun-<job id>``); the request id tells a job that is
still being provisioned (or failed to be) from one that is gone.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from pydantic import field_validator

import meshrun
import meshrun.backend as mb
from meshrun import (
    Availability,
    Backend,
    BackendError,
    BackendUnavailable,
    Feature,
    JobState,
    JobStatus,
    Offer,
    Submission,
)

from . import _task
from ._follow import LogFollower
from ._server import ApiServer

NAME = "skypilot"

# SkyPilot cluster job states (sky.JobStatus values) -> meshrun
CLUSTER_STATES = {
    "INIT": JobState.PENDING,
    "PENDING": JobState.PENDING,
    "SETTING_UP": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "SUCCEEDED": JobState.SUCCEEDED,
    "FAILED": JobState.FAILED,
    "FAILED_SETUP": JobState.FAILED,
    "FAILED_DRIVER": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED,
}
# SkyPilot managed job states (sky.jobs.ManagedJobStatus values) -> meshrun
MANAGED_STATES = {
    "PENDING": JobState.PENDING,
    "SUBMITTED": JobState.PENDING,
    "STARTING": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "RECOVERING": JobState.PENDING,  # preempted; SkyPilot relaunches it (the reason says so)
    "CANCELLING": JobState.RUNNING,
    "SUCCEEDED": JobState.SUCCEEDED,
    "CANCELLED": JobState.CANCELLED,
    "FAILED": JobState.FAILED,
    "FAILED_SETUP": JobState.FAILED,
    "FAILED_PRECHECKS": JobState.FAILED,
    "FAILED_NO_RESOURCE": JobState.FAILED,
    "FAILED_CONTROLLER": JobState.FAILED,
}
# seconds after a job's end during which its records may still be on their way into the log
RECORDS_GRACE = 90.0
# API server request states
REQUEST_RUNNING = ("PENDING", "RUNNING")

_ID_RE = re.compile(r"^(cluster|managed):([^:]*):([^:]+):([^:]*)$")
_POOL_CLOUDS = ("slurm", "kubernetes", "ssh")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SkyPilotSettings(mb.BackendSettings):
    endpoint: Optional[str] = None  # a remote API server (default: the local one)
    port: Optional[int] = None  # local API server port (default: SKYPILOT_API_SERVER_LOCAL_PORT or 46580)
    start_server: bool = True  # start the local API server when it is down
    clouds: Optional[list[str]] = None  # offers only from these (of those `sky check` enabled)
    infra: Optional[str] = None  # default infra for jobs that give none, e.g. "slurm/testcluster"
    python: str = "python3"  # the interpreter on the cluster that runs meshrun's agent
    master_port: int = 29500  # MASTER_PORT of multi-node jobs
    grace_period: float = 10.0  # seconds between SIGTERM and SIGKILL on cancel/timeout
    idle_minutes: int = 10  # autodown a cluster meshrun started after this long idle (safety net)
    max_inline_bytes: int = 8 * 1024**2  # job files travelling inside the task
    catalog_dir: Optional[str] = None  # SkyPilot catalog folder (default: ~/.sky/catalogs/v8)
    request_timeout: float = 120.0  # seconds to wait for quick API requests (status, queue, cancel)
    follow_logs: int = 16  # the submitting process follows up to this many jobs' logs (0: poll `sky queue`)
    # the submitter's variables a job with inputs/outputs gets as SkyPilot secrets, those that are set: the
    # stager's endpoint, credentials and profile on the node (docs/data.md); [] forwards none
    data_env: list[str] = list(_task.DATA_ENV)

    @field_validator("data_env", mode="before")
    @classmethod
    def _v_data_env(cls, v: Any) -> Any:
        if isinstance(v, str):  # MESHRUN_SKYPILOT_DATA_ENV="AWS_PROFILE,AWS_CONFIG_FILE"
            v = [x.strip() for x in v.split(",") if x.strip()]
        if isinstance(v, (list, tuple)):
            for x in v:
                if not isinstance(x, str) or not _ENV_NAME.match(x):
                    raise ValueError(f"expected environment variable names, got {x!r}")
        return v


def parse_id(backend_id: str) -> tuple[str, str, str, str]:
    m = _ID_RE.match(backend_id or "")
    if not m:
        raise BackendError(f"not a SkyPilot backend id: {backend_id!r}", backend=NAME)
    return m.group(1), m.group(2), m.group(3), m.group(4)


def _enum_name(v: Any) -> str:
    return str(getattr(v, "name", None) or getattr(v, "value", None) or v).upper()


def _msg(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return text or type(e).__name__


class SkyPilotBackend(Backend):
    name = NAME
    features = (Feature.COMMANDS | Feature.FUNCTIONS | Feature.GPUS | Feature.MULTI_NODE | Feature.LOGS_FOLLOW
                | Feature.REATTACH | Feature.SPOT | Feature.SECRETS | Feature.DATA)
    install_hint = mb.install_hint("skypilot")
    settings_model = SkyPilotSettings
    options_model = _task.SkyPilotOptions
    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        self.server = ApiServer(self.settings)
        self._results: dict[str, dict[str, bytes]] = {}  # backend id -> agent records from the log
        self._enabled: tuple[float, list[str]] | None = None
        self._missing: dict[str, float] = {}  # backend id -> when its records were first found missing
        self._followers: dict[str, LogFollower] = {}  # backend id -> the follower of a job submitted here
        self._lock = threading.Lock()

    @property
    def poll_interval(self) -> tuple[float, float]:
        """Quick while a follower knows the answer without asking SkyPilot; slow when each poll is a
        `sky queue` round trip to the cluster."""
        with self._lock:
            following = any(f.alive for f in self._followers.values())
        return (0.1, 1.0) if following else (2.0, 30.0)

    # ---- SkyPilot access ---------------------------------------------------------------------------
    def _sdk(self) -> Any:
        """SkyPilot's client SDK, with the API server answering (started if need be)."""
        self.server.ensure()
        try:
            from sky.client import sdk
        except ImportError as e:  # pragma: no cover - a broken install
            raise BackendUnavailable(f"SkyPilot is not importable: {e}; {self.install_hint}", backend=NAME) from e
        return sdk

    def _get(self, request_id: Any, what: str, timeout: float | None = None) -> Any:
        """The result of an API request; SkyPilot's errors become meshrun errors naming ``what``."""
        from sky.client import sdk

        try:
            if timeout is None:
                return sdk.get(request_id)
            return _with_timeout(lambda: sdk.get(request_id), timeout, what)
        except meshrun.MeshrunError:
            raise
        except Exception as e:
            raise self._translate(e, what) from e

    def _translate(self, e: BaseException, what: str) -> meshrun.MeshrunError:
        from sky import exceptions as sx

        name = type(e).__name__
        if isinstance(e, sx.ClusterDoesNotExist):
            return BackendError(f"{what}: the SkyPilot cluster does not exist ({_msg(e)})", backend=NAME)
        if isinstance(e, sx.ClusterNotUpError):
            return BackendError(f"{what}: the SkyPilot cluster is not up ({_msg(e)})", backend=NAME)
        if isinstance(e, (sx.ResourcesUnavailableError, sx.NoCloudAccessError)):
            return BackendError(f"{what}: SkyPilot found no resources: {_msg(e)}", backend=NAME)
        if isinstance(e, sx.ApiServerConnectionError):
            return BackendUnavailable(f"{what}: {_msg(e)}", backend=NAME)
        if isinstance(e, (sx.InvalidSkyPilotConfigError, ValueError)) and not isinstance(e, sx.ClusterDoesNotExist):
            return BackendError(f"{what}: SkyPilot rejected it: {_msg(e)}", backend=NAME)
        return BackendError(f"{what}: {name}: {_msg(e)}", backend=NAME)

    # ---- contract: check ----------------------------------------------------------------------------
    def check(self) -> Availability:
        try:
            import importlib.util

            if importlib.util.find_spec("sky") is None:
                return Availability(False, "SkyPilot is not installed", hint="pip install 'skypilot[slurm]'")
            ok, why, info = self.server.health()
            detail = {"api_server": self.server.url, "local": self.server.local}
            if ok:
                detail["api_version"] = info.get("api_version")
                detail["version"] = info.get("version")
                return Availability(True, detail=detail)
            if self.server.local and self.settings.start_server:
                return Availability(True, detail={**detail, "note": f"{why}; meshrun starts it on first use"})
            return Availability(False, why, hint="start it with `sky api start`", detail=detail)
        except Exception as e:  # never raise
            return Availability(False, f"{type(e).__name__}: {e}")

    # ---- contract: offers ---------------------------------------------------------------------------
    def enabled_clouds(self, *, fresh: bool = False) -> list[str]:
        """The infra `sky check` enabled (clouds in lower case; pools expanded: "slurm/testcluster").

        Asked of the API server over plain HTTP (fast; no SDK import) and kept for a minute. Asking never
        starts the server (placement asks every installed backend, and must not spawn one as a side effect):
        when it is down, the last answer seen from that server (kept in the meshrun home) is used, and
        without one this raises BackendUnavailable saying to start it and run `sky check`."""
        now = time.monotonic()
        with self._lock:
            hit = self._enabled
        if hit is not None and not fresh and now - hit[0] < 60:
            return list(hit[1])
        ok, why, _ = self.server.health(timeout=2)
        if not ok:
            cached = self._cached_enabled()
            if cached is not None:
                return cached
            raise BackendUnavailable(f"{why}; start it with `sky api start` (port {self.server.port}) and run "
                                     "`sky check` (meshrun also starts it when a job is submitted to skypilot)",
                                     backend=NAME)
        got = self.server.call("/enabled_clouds?expand=True", timeout=self.settings.request_timeout)
        clouds = [str(c).lower() if "/" not in str(c) else str(c) for c in got or []]
        with self._lock:
            self._enabled = (now, clouds)
        self._cache_enabled(clouds)
        return clouds

    def _cache_path(self) -> Path:
        import hashlib

        from meshrun import get_config

        key = hashlib.sha1(self.server.url.encode()).hexdigest()[:10]
        return get_config().home / "skypilot" / f"enabled-{key}.json"

    def _cache_enabled(self, clouds: list[str]) -> None:
        import json

        try:
            p = self._cache_path()
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp")
            tmp.write_text(json.dumps({"url": self.server.url, "at": time.time(), "enabled": clouds}))
            os.replace(tmp, p)
        except OSError:
            pass

    def _cached_enabled(self) -> list[str] | None:
        import json

        try:
            data = json.loads(self._cache_path().read_text())
            return [str(c) for c in data["enabled"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def catalog_folder(self) -> str:
        if self.settings.catalog_dir:
            return os.path.expanduser(self.settings.catalog_dir)
        root = os.environ.get("SKY_RUNTIME_DIR") or os.path.expanduser("~")
        return os.path.join(os.path.expanduser(root), ".sky", "catalogs", "v8")

    def offers(self, spec: Any) -> list[Offer]:
        try:
            opts = _task.job_options(spec)
            _task.resources_config(spec, opts)
        except meshrun.SpecError as e:
            return [Offer(backend=NAME, where="-", fits=False, reason=str(e))]
        try:
            enabled = self.enabled_clouds()
        except BackendUnavailable as e:
            why = str(e).removeprefix("[skypilot] ")
            # prices do not need the server, launching does: show the catalog's offers, each saying why not
            priced = [o.rejected(why) for o in self._catalog_offers(spec, self.settings.clouds, opts) if o.fits]
            return priced or [Offer(backend=NAME, where="-", nodes=spec.nodes, fits=False, reason=why)]
        if not enabled:
            return [Offer(backend=NAME, where="-", gpus=spec.resources.gpus, gpu_type=spec.resources.gpu_type,
                          nodes=spec.nodes, fits=False,
                          reason="no cloud is enabled in SkyPilot (`sky check` enabled none); add credentials "
                                 "and run `sky check`")]
        pools = [c for c in enabled if c.split("/")[0] in _POOL_CLOUDS]
        clouds = sorted({c.split("/")[0] for c in enabled if c.split("/")[0] not in _POOL_CLOUDS})
        wanted = _wanted_infra(spec, opts, self.settings.infra)
        if self.settings.clouds is not None:
            allowed = {c.lower() for c in self.settings.clouds}
            clouds = [c for c in clouds if c in allowed]
            pools = [p for p in pools if p.split("/")[0] in allowed]
        if wanted:
            cloud = wanted.split("/")[0].lower()
            clouds = [c for c in clouds if c == cloud]
            pools = [p for p in pools if p == wanted or (p.split("/")[0] == cloud and "/" not in wanted)]
        out: list[Offer] = []
        if clouds:
            out.extend(self._catalog_offers(spec, clouds, opts))
        for pool in pools:
            out.append(self._pool_offer(spec, pool))
        if not out:
            out.append(Offer(backend=NAME, where=wanted or "-", nodes=spec.nodes, fits=False,
                             reason=f"{wanted or 'the job'} is not among the infra SkyPilot has enabled "
                                    f"({', '.join(enabled)})"))
        spot = opts.get("use_spot")
        if spot is not None:
            out = [o if o.spot == spot or not o.fits else o.rejected(f"the job asks for use_spot={spot}")
                   for o in out]
        return out

    def _catalog_offers(self, spec: Any, clouds: list[str] | None, opts: Mapping[str, Any]) -> list[Offer]:
        folder = self.catalog_folder()
        if hasattr(meshrun, "catalog_offers"):  # the core's reader of the same SkyPilot catalog CSVs
            # SkyPilot's own copy when it has one (it refreshes it), else the catalog meshrun uses (one
            # `meshrun catalog update` fetched, or the snapshot that ships with meshrun)
            where = folder if mb.catalog_has_tables(folder) else None
            offers = meshrun.catalog_offers(spec, catalog_dir=where, clouds=clouds, launcher=NAME)
        else:  # pragma: no cover - an older core: SkyPilot's own catalog module
            from ._catalog import sky_catalog_offers

            offers = sky_catalog_offers(spec, clouds or [])
        region = opts.get("region")
        if region:
            offers = [o if not o.fits or o.region == region else o.rejected(f"the job asks for region {region}")
                      for o in offers]
        if opts.get("instance_type"):
            it = opts["instance_type"]
            offers = [o if not o.fits or o.instance_type == it else o.rejected(f"the job asks for {it}")
                      for o in offers]
        return offers

    def _pool_offer(self, spec: Any, pool: str) -> Offer:
        r = spec.resources  # priced by the core's [prices] ([prices."skypilot:<infra>"]), like on-prem offers
        return Offer(backend=NAME, where=pool, gpus=r.gpus, gpu_type=r.gpu_type, cpus=r.cpus, memory=r.memory,
                     nodes=r.nodes, expected_start=None,
                     start_note=f"the queue of {pool} (SkyPilot asks it at launch)", region=pool.partition("/")[2] or None,
                     launcher=NAME, detail={"source": "pool", "infra": pool})

    # ---- contract: submit ---------------------------------------------------------------------------
    def task_for(self, submission: Submission, offer: Offer | None = None) -> Any:
        """The ``sky.Task`` meshrun launches for a submission (validated by SkyPilot)."""
        cfg = _task.launch_config(submission, python=self.settings.python, master_port=self.settings.master_port,
                                  grace_period=self.settings.grace_period,
                                  max_inline_bytes=self.settings.max_inline_bytes,
                                  data_env=self.settings.data_env)
        res = cfg.setdefault("resources", {})
        if not any(k in res for k in ("infra", "cloud", "any_of", "ordered")):
            where = None
            if offer is not None and offer.backend == NAME and offer.where not in ("-", ""):
                where = offer.where
            where = where or self.settings.infra
            if where:
                res["infra"] = where
        if offer is not None and offer.backend == NAME:
            if offer.instance_type and "instance_type" not in res and "accelerators" not in res:
                res["instance_type"] = offer.instance_type
            if offer.spot and "use_spot" not in res:
                res["use_spot"] = True
        if not res:
            cfg.pop("resources")
        return _task.build_task(cfg)

    def native(self, submission: Submission, offer: Offer | None = None) -> str:
        """The task YAML SkyPilot would get (validated by SkyPilot; secret values redacted)."""
        import yaml

        cfg = self.task_for(submission, offer).to_yaml_config()
        if cfg.get("secrets"):
            cfg["secrets"] = {k: "<redacted>" for k in cfg["secrets"]}
        cfg.pop("_user_specified_yaml", None)
        return str(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))

    def submit(self, submission: Submission, offer: Offer | None = None) -> str:
        spec = submission.spec
        opts = _task.job_options(spec)
        task = self.task_for(submission, offer)
        sdk = self._sdk()
        name = submission.name
        managed = bool(opts.get("managed")) or "job_recovery" in opts
        try:
            if managed:
                from sky.jobs.client import sdk as jobs_sdk

                req = jobs_sdk.launch(task, name=name)
                return f"managed::{name}:{req}"
            cluster = opts.get("cluster")
            if cluster and self._cluster_up(cluster):
                req = sdk.exec(task, cluster_name=cluster)
            else:
                cluster = cluster or name
                idle = opts.get("idle_minutes", self.settings.idle_minutes)
                owned = not opts.get("cluster") and not opts.get("keep")
                req = sdk.launch(task, cluster_name=cluster,
                                 idle_minutes_to_autostop=idle if (owned or "idle_minutes" in opts) else None,
                                 down=owned)
            backend_id = f"cluster:{cluster}:{name}:{req}"
            self._follow(mb.JobRef(backend_id, submission.job_id, submission.job_dir), sdk, cluster, str(req))
            return backend_id
        except meshrun.MeshrunError:
            raise
        except Exception as e:
            raise self._translate(e, f"submitting {name}") from e

    def dry_run(self, submission: Submission, offer: Offer | None = None) -> Any:
        """``sky launch --dryrun``: SkyPilot validates the task and its optimizer picks the resources
        (nothing is launched). Returns the request's result."""
        task = self.task_for(submission, offer)
        sdk = self._sdk()
        try:
            req = sdk.launch(task, cluster_name=submission.name, dryrun=True)
        except Exception as e:
            raise self._translate(e, "dry run") from e
        return self._get(req, f"dry run of {submission.name}")

    def _cluster_up(self, cluster: str) -> bool:
        sdk = self._sdk()
        recs = self._get(sdk.status([cluster], all_users=True), f"status of cluster {cluster}", self.settings.request_timeout)
        return any(_enum_name(_field(r, "status")) == "UP" for r in recs or [])

    def _follow(self, ref: mb.JobRef, sdk: Any, cluster: str, req: str) -> None:
        backend_id = ref.backend_id
        with self._lock:
            live = sum(1 for f in self._followers.values() if f.alive)
            if live >= self.settings.follow_logs or backend_id in self._followers:
                return

            def keep(files: dict[str, bytes], backend_id: str = backend_id) -> None:
                with self._lock:
                    self._results[backend_id] = files

            nonce = mb.records_nonce(ref.job_dir, create=False) or ""
            self._followers[backend_id] = LogFollower(sdk, cluster=cluster, job_id=ref.job_id, nonce=nonce,
                                                      request_id=req, on_records=keep)

    def _followed_status(self, backend_id: str, requests: Mapping[str, Any]) -> JobStatus | None:
        """The status a follower knows without asking SkyPilot, or None (then ``sky queue`` is asked)."""
        with self._lock:
            f = self._followers.get(backend_id)
        if f is None:
            return None
        _, cluster, _, req = parse_id(backend_id)
        if f.done.is_set():
            if f.files is None or "exit.json" not in f.files:
                return None  # ended without the records: SkyPilot's own view decides
            ended = JobStatus(JobState.UNKNOWN, reason=f"SkyPilot job {f.sky_job} on {cluster} ended",
                              started_at=f.started_at, where=cluster,
                              detail={"sky_job_id": f.sky_job, "cluster": cluster, "native": "ENDED"})
            return _refined(ended, f.files)
        if f.sky_job is None:  # still launching: the request says how that goes
            return self._request_outcome(req, requests, f"launching on {cluster}") or JobStatus(
                JobState.PENDING, reason=f"SkyPilot is launching on {cluster}", where=cluster)
        if f.started_at is not None:
            return JobStatus(JobState.RUNNING, reason=f"SkyPilot job {f.sky_job} on {cluster}: RUNNING",
                             started_at=f.started_at, where=cluster,
                             detail={"sky_job_id": f.sky_job, "cluster": cluster, "native": "RUNNING"})
        return JobStatus(JobState.PENDING, reason=f"SkyPilot job {f.sky_job} on {cluster}: waiting to start "
                         "(queued on the cluster or setting up)", where=cluster,
                         detail={"sky_job_id": f.sky_job, "cluster": cluster, "native": "PENDING"})

    # ---- contract: status ---------------------------------------------------------------------------
    def status(self, refs: Sequence[mb.JobRef]) -> dict[str, JobStatus]:
        out: dict[str, JobStatus] = {}
        parsed = {}
        for i in refs:
            try:
                parsed[i] = parse_id(i)
            except BackendError as e:
                out[i] = JobStatus(JobState.LOST, reason=str(e))
        if not parsed:
            return out
        try:
            sdk = self._sdk()
        except BackendUnavailable as e:
            return {**out, **{i: JobStatus(JobState.UNKNOWN, reason=str(e)) for i in parsed}}
        with self._lock:
            followers = dict(self._followers)
        asking = [p[3] for i, p in parsed.items() if p[3] and (i not in followers or followers[i].sky_job is None)]
        requests = self._request_states(asking)
        by_cluster: dict[str, list[mb.JobRef]] = {}
        managed: list[mb.JobRef] = []
        for i, (kind, cluster, _, _) in parsed.items():
            if kind != "managed" and i in followers:
                known = self._followed_status(i, requests)
                if known is not None:
                    out[i] = known
                    continue
            (managed.append(i) if kind == "managed" else by_cluster.setdefault(cluster, []).append(i))
        for cluster, group in by_cluster.items():
            try:
                records = self._get(sdk.queue(cluster, skip_finished=False, all_users=True), f"queue of {cluster}",
                                    self.settings.request_timeout)
                missing = None
            except BackendError as e:
                records, missing = [], str(e)
            for i in group:
                out[i] = self._cluster_job_status(i, parsed[i], records, missing, requests)
        if managed:
            out.update(self._managed_status(managed, parsed, requests))
        return out

    def _request_states(self, request_ids: list[str]) -> dict[str, Any]:
        if not request_ids:
            return {}
        from sky.client import sdk

        try:
            got = _with_timeout(lambda: sdk.api_status(request_ids=list(request_ids), all_status=True), 30,
                                "request status")
        except Exception:
            return {}
        return {str(_field(r, "request_id")): r for r in got or []}

    def _request_outcome(self, request_id: str, requests: Mapping[str, Any], what: str) -> JobStatus | None:
        """A status from the launch/exec request itself, while no job exists yet (or if it failed)."""
        req = requests.get(request_id)
        if req is None:
            return None
        state = _enum_name(_field(req, "status"))
        if state in REQUEST_RUNNING:
            return JobStatus(JobState.PENDING, reason=f"SkyPilot is {what} (request {request_id[:8]} {state.lower()})")
        if state == "CANCELLED":
            return JobStatus(JobState.CANCELLED, reason=f"the SkyPilot request {request_id[:8]} was cancelled")
        if state == "FAILED":
            from sky.client import sdk
            from sky.server import common as server_common

            try:
                sdk.get(server_common.RequestId(request_id))
                why = "the request failed"
            except Exception as e:  # the request's own error, raised again on the client
                why = f"{type(e).__name__}: {_msg(e)}"
            return JobStatus(JobState.FAILED, reason=f"SkyPilot could not launch the job: {why}"[:2000])
        return None

    def _cluster_job_status(self, backend_id: mb.JobRef, parsed: tuple[str, str, str, str], records: list[Any],
                            missing: str | None, requests: Mapping[str, Any]) -> JobStatus:
        _, cluster, name, req = parsed
        mine = [r for r in records if _field(r, "job_name") == name]
        if mine:
            rec = max(mine, key=lambda r: _field(r, "job_id") or 0)
            native = _enum_name(_field(rec, "status"))
            state = CLUSTER_STATES.get(native, JobState.UNKNOWN)
            st = JobStatus(state, reason=f"SkyPilot job {_field(rec, 'job_id')} on {cluster}: {native}",
                           started_at=_field(rec, "start_at"), ended_at=_field(rec, "end_at"), where=cluster,
                           detail={"sky_job_id": _field(rec, "job_id"), "cluster": cluster, "native": native})
            if state.terminal:
                st = self._with_agent_record(backend_id, st, cluster, _field(rec, "job_id"))
            return st
        pending = self._request_outcome(req, requests, f"launching on {cluster}") if req else None
        if pending is not None:
            return pending
        if missing is not None:
            return JobStatus(JobState.LOST, reason=f"{missing}; the job's outcome was not collected before the "
                             "cluster went away", where=cluster)
        return JobStatus(JobState.LOST, reason=f"no job named {name} on the SkyPilot cluster {cluster}", where=cluster)

    def _with_agent_record(self, backend_id: mb.JobRef, st: JobStatus, cluster: str, sky_job: Any) -> JobStatus:
        """A finished job: read the agent's records from its log (the outcome the agent saw: timeout,
        cancelled, the function's error) and keep them for fetch_results. SkyPilot may report the job ended
        a moment before the last lines reach its log: for RECORDS_GRACE seconds after the end a missing
        record means "ask again" (UNKNOWN), then SkyPilot's own state stands."""
        files = self._collect(backend_id, cluster=cluster, sky_job=sky_job)
        if not files or "exit.json" not in files:
            with self._lock:
                seen = self._missing.setdefault(backend_id, time.time())
            ended = max(st.ended_at or 0.0, seen)
            if time.time() - ended < RECORDS_GRACE:
                return JobStatus(JobState.UNKNOWN, reason=f"{st.reason}; waiting for meshrun's records in its log",
                                 where=st.where, detail=st.detail)
            return JobStatus(st.state, reason=f"{st.reason} (meshrun's records are missing from its log)",
                             started_at=st.started_at, ended_at=st.ended_at, where=st.where, detail=st.detail)
        return _refined(st, files) or st

    def _managed_status(self, ids: list[mb.JobRef], parsed: Mapping[mb.JobRef, tuple[str, str, str, str]],
                        requests: Mapping[str, Any]) -> dict[str, JobStatus]:
        from sky.jobs.client import sdk as jobs_sdk

        out: dict[str, JobStatus] = {}
        try:
            got = self._get(jobs_sdk.queue_v2(refresh=False, skip_finished=False, all_users=True),
                            "managed job queue", self.settings.request_timeout)
            records = got[0] if isinstance(got, tuple) else got
            missing = None
        except BackendError as e:
            records, missing = [], str(e)
        for i in ids:
            _, _, name, req = parsed[i]
            mine = [r for r in records or [] if _field(r, "job_name") == name]
            if not mine:
                pending = self._request_outcome(req, requests, "submitting the managed job") if req else None
                out[i] = pending or (JobStatus(JobState.UNKNOWN, reason=missing) if missing else
                                     JobStatus(JobState.LOST, reason=f"no managed job named {name}"))
                continue
            rec = max(mine, key=lambda r: _field(r, "job_id") or 0)
            native = _enum_name(_field(rec, "status"))
            state = MANAGED_STATES.get(native, JobState.UNKNOWN)
            recoveries = _field(rec, "recovery_count") or 0
            reason = f"SkyPilot managed job {_field(rec, 'job_id')}: {native}"
            if native == "RECOVERING":
                reason = f"preempted; SkyPilot is recovering it (recovery {recoveries + 1})"
            elif recoveries:
                reason += f" (recovered {recoveries} time{'s' if recoveries != 1 else ''} after preemption)"
            if _field(rec, "failure_reason"):
                reason += f": {_field(rec, 'failure_reason')}"
            st = JobStatus(state, reason=reason, started_at=_field(rec, "start_at"), ended_at=_field(rec, "end_at"),
                           where=_field(rec, "infra") or _field(rec, "cloud"),
                           detail={"managed_job_id": _field(rec, "job_id"), "recovery_count": recoveries,
                                   "native": native})
            if state.terminal:
                files = self._collect(i, managed_job=_field(rec, "job_id"))
                if files and "exit.json" in files:
                    import json

                    agent = mb.map_agent_status(json.loads(files["exit.json"]))
                    if agent.terminal:
                        st = JobStatus(agent.state, reason=agent.reason or reason, exit_code=agent.exit_code,
                                       started_at=st.started_at, ended_at=st.ended_at, where=st.where,
                                       detail=st.detail)
            out[i] = st
        return out

    # ---- results, logs, cancel, find ----------------------------------------------------------------
    def _collect(self, backend_id: mb.JobRef, *, cluster: str | None = None, sky_job: Any = None,
                 managed_job: Any = None) -> dict[str, bytes] | None:
        """The agent's records from the job's log (read once, then kept with the log text), checked with the
        nonce kept in the job's folder."""
        with self._lock:
            if backend_id in self._results:
                return self._results[backend_id]
        if not isinstance(backend_id, mb.JobRef):  # a bare id: no folder, no nonce to check the records with
            return None
        nonce = mb.records_nonce(backend_id.job_dir, create=False)
        if nonce is None:
            return None
        try:
            text = "".join(self._log_chunks(cluster=cluster, sky_job=sky_job, managed_job=managed_job, follow=False))
        except BackendError:
            return None
        files = mb.records_from_log(text, nonce)
        if files is not None:
            files = dict(files)
            files["output.log"] = _task.clean_log(text).encode()
            with self._lock:
                self._results[backend_id] = files
        return files

    def fetch_results(self, backend_id: mb.JobRef, job_dir: Path) -> None:
        kind, cluster, name, _ = parse_id(backend_id)
        files = self._results.get(backend_id)
        if files is None:
            if kind == "managed":
                rec = self._managed_record(name)
                files = self._collect(backend_id, managed_job=_field(rec, "job_id")) if rec is not None else None
            else:
                rec = self._cluster_record(cluster, name)
                files = self._collect(backend_id, cluster=cluster, sky_job=_field(rec, "job_id")) if rec is not None else None
        if files:  # the records, and the log as output.log (read when the cluster is gone)
            mb.write_records(Path(job_dir), files, also=["output.log"])
        if kind == "cluster" and cluster == name:
            self._down_if_owned(cluster, Path(job_dir))

    def _down_if_owned(self, cluster: str, job_dir: Path | None = None) -> None:
        """Tear down a cluster meshrun started for a job (named after it), unless the job keeps it."""
        import json

        try:
            spec = json.loads((job_dir / "spec.json").read_text()) if job_dir is not None else {}
        except (OSError, ValueError):
            spec = {}
        opts = ((spec or {}).get("backend_options") or {}).get(NAME) or {}
        if opts.get("keep"):
            return
        try:
            self._sdk().down(cluster)  # the API server tears it down in the background
        except Exception:
            pass  # autodown (idle_minutes) is the safety net

    def _cluster_record(self, cluster: str, name: str) -> Any:
        try:
            sdk = self._sdk()
            recs = self._get(sdk.queue(cluster, skip_finished=False, all_users=True), f"queue of {cluster}",
                             self.settings.request_timeout)
        except BackendError:
            return None
        mine = [r for r in recs if _field(r, "job_name") == name]
        return max(mine, key=lambda r: _field(r, "job_id") or 0) if mine else None

    def _managed_record(self, name: str) -> Any:
        from sky.jobs.client import sdk as jobs_sdk

        self._sdk()
        try:
            got = self._get(jobs_sdk.queue_v2(refresh=False, skip_finished=False, all_users=True, name_match=name),
                            "managed job queue", self.settings.request_timeout)
        except BackendError:
            return None
        records = got[0] if isinstance(got, tuple) else got
        mine = [r for r in records or [] if _field(r, "job_name") == name]
        return max(mine, key=lambda r: _field(r, "job_id") or 0) if mine else None

    def _log_chunks(self, *, cluster: str | None, sky_job: Any, managed_job: Any, follow: bool) -> Iterator[str]:
        sdk = self._sdk()
        try:
            if managed_job is not None:
                from sky.jobs.client import sdk as jobs_sdk

                it = jobs_sdk.tail_logs(job_id=int(managed_job), follow=follow, refresh=False, preload_content=False)
            else:
                it = sdk.tail_logs(cluster, int(sky_job) if sky_job is not None else None, follow,
                                   preload_content=False)
            for chunk in it:
                if chunk is None:
                    break
                yield chunk
        except meshrun.MeshrunError:
            raise
        except Exception as e:
            raise self._translate(e, f"logs of {cluster or 'managed job'} job {sky_job or managed_job}") from e

    def logs(self, backend_id: mb.JobRef, *, follow: bool = False) -> Iterator[str]:
        kind, cluster, name, req = parse_id(backend_id)
        if follow and req:  # still being launched: wait for the job to appear
            self._wait_for_job(kind, cluster, name, req)
        if kind == "managed":
            rec = self._managed_record(name)
            if rec is None:
                raise BackendError(f"no managed job named {name} (its log is gone)", backend=NAME)
            chunks = self._log_chunks(cluster=None, sky_job=None, managed_job=_field(rec, "job_id"), follow=follow)
        else:
            rec = self._cluster_record(cluster, name)
            if rec is None:
                raise BackendError(f"no job named {name} on the SkyPilot cluster {cluster} (gone or not started "
                                   "yet); a finished job's log is kept in its job folder", backend=NAME)
            chunks = self._log_chunks(cluster=cluster, sky_job=_field(rec, "job_id"), managed_job=None,
                                      follow=follow)
        return _clean_lines(chunks)

    def _wait_for_job(self, kind: str, cluster: str, name: str, req: str) -> None:
        while True:
            rec = self._managed_record(name) if kind == "managed" else self._cluster_record(cluster, name)
            if rec is not None:
                return
            state = self._request_states([req]).get(req)
            if state is None or _enum_name(_field(state, "status")) not in REQUEST_RUNNING:
                return
            time.sleep(2.0)

    def cancel(self, backend_id: mb.JobRef) -> None:
        kind, cluster, name, req = parse_id(backend_id)
        sdk = self._sdk()
        if kind == "managed":
            from sky.jobs.client import sdk as jobs_sdk

            self._get(jobs_sdk.cancel(name=name), f"cancelling managed job {name}", self.settings.request_timeout)
            return
        with self._lock:
            f = self._followers.get(backend_id)
        if f is not None and f.alive and f.sky_job is not None:  # known here: no `sky queue` round trip
            self._get(sdk.cancel(cluster, job_ids=[f.sky_job]), f"cancelling {name} on {cluster}",
                      self.settings.request_timeout)
            return
        rec = self._cluster_record(cluster, name)
        if rec is None:
            if req:  # still provisioning: cancel the launch request, then tear down what it started
                try:
                    sdk.api_cancel(req)
                except Exception:
                    pass
            if cluster == name:
                self._down_if_owned(cluster, getattr(backend_id, "job_dir", None))
            return
        self._get(sdk.cancel(cluster, job_ids=[int(_field(rec, "job_id"))]), f"cancelling {name} on {cluster}",
                  self.settings.request_timeout)

    def find(self, job_id: str, job_dir: Path | None = None) -> str | None:
        name = f"meshrun-{job_id}"
        try:
            sdk = self._sdk()
            clusters = self._get(sdk.status(all_users=True), "listing clusters", self.settings.request_timeout)
        except BackendError:
            return None
        names = [_field(c, "name") for c in clusters or []]
        for cluster in sorted(names, key=lambda c: c != name):
            if self._cluster_record(cluster, name) is not None:
                return f"cluster:{cluster}:{name}:"
        if self._managed_record(name) is not None:
            return f"managed::{name}:"
        if name in names:
            return f"cluster:{name}:{name}:"
        return None

    def close(self) -> None:
        with self._lock:
            self._results.clear()
            self._followers.clear()  # daemon threads: they end with their log stream or the process


def _refined(st: JobStatus, files: Mapping[str, bytes]) -> JobStatus | None:
    """``st`` told by the agent's exit record (its state, exit code, reason and times win), or None when the
    records hold no usable end."""
    import json

    try:
        rec = json.loads(files["exit.json"])
    except (KeyError, ValueError):
        return None
    agent = mb.map_agent_status(rec)
    if not agent.terminal:
        return None
    return JobStatus(agent.state, reason=agent.reason or st.reason, exit_code=agent.exit_code,
                     started_at=agent.started_at or st.started_at, ended_at=agent.ended_at or st.ended_at,
                     where=f"{st.where} ({rec['host']})" if rec.get("host") else st.where, detail=st.detail)


def _field(rec: Any, key: str) -> Any:
    if rec is None:
        return None
    if isinstance(rec, Mapping):
        return rec.get(key)
    return getattr(rec, key, None)


def _wanted_infra(spec: Any, opts: Mapping[str, Any], default: str | None) -> str | None:
    if opts.get("infra"):
        return str(opts["infra"])
    if opts.get("cloud"):
        region = opts.get("region")
        return f"{opts['cloud']}/{region}" if region and str(opts["cloud"]).lower() in _POOL_CLOUDS else str(opts["cloud"])
    return default


def _clean_lines(chunks: Iterator[str]) -> Iterator[str]:
    """Drop the result lines node 0 prints at the end (whole lines, across chunk boundaries) and SkyPilot's
    terminal colours."""
    buf = ""
    for chunk in chunks:
        buf += chunk
        if "\n" not in buf:
            continue
        head, _, buf = buf.rpartition("\n")
        text = _task.clean_log(head + "\n")
        if text:
            yield text
    if buf:
        text = _task.clean_log(buf)
        if text:
            yield text


def _with_timeout(fn: Any, timeout: float, what: str) -> Any:
    """Run ``fn`` in a thread; a call that takes longer than ``timeout`` seconds is reported, not waited for."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["v"] = fn()
        except BaseException as e:  # noqa: B902
            box["e"] = e

    t = threading.Thread(target=run, name=f"meshrun-skypilot-{what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise BackendError(f"{what}: no answer from the SkyPilot API server within {timeout:g}s", backend=NAME)
    if "e" in box:
        raise box["e"]
    return box.get("v")
