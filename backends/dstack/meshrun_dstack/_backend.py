"""The dstack backend: meshrun jobs as dstack tasks, planned, applied, watched and stopped through a dstack
server's HTTP API."""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import meshrun
import meshrun.backend as mb

from . import _status, _task, _translate
from ._settings import DstackSettings, resolve

log = logging.getLogger("meshrun.dstack")
MIB = 1024**2
_AVAILABLE = {"available", "idle", "unknown"}
_UNAVAILABLE_WHY = {
    "not_available": "not available now",
    "no_quota": "no quota for it in this account",
    "no_balance": "no balance left",
    "busy": "busy (every block of the instance is in use)",
}


class DstackBackend(mb.Backend):
    name = "dstack"
    features = (
        mb.Feature.COMMANDS
        | mb.Feature.FUNCTIONS
        | mb.Feature.GPUS
        | mb.Feature.MULTI_NODE
        | mb.Feature.LOGS_FOLLOW
        | mb.Feature.REATTACH
        | mb.Feature.SPOT
        | mb.Feature.DATA
    )
    install_hint = mb.install_hint("dstack")
    settings_model = DstackSettings
    options_model = _translate.DstackOptions
    poll_interval = (1.0, 15.0)
    log_poll = 2.0  # seconds between log polls while following

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        if "token" in self.config:  # the plain token lives only inside the settings' SecretStr
            self.config["token"] = "**********"
        self._client: Any = None
        self._lock = threading.Lock()

    # ---- connection
    def client(self) -> Any:
        """The HTTP client, created on first use; BackendUnavailable when no server is configured."""
        with self._lock:
            if self._client is None:
                creds = resolve(self.settings)
                if creds is None:
                    raise meshrun.BackendUnavailable(
                        "no dstack server configured: set url (and token) in [backends.dstack] or "
                        "MESHRUN_DSTACK_ENDPOINT / MESHRUN_DSTACK_TOKEN, or configure a project with dstack "
                        f"(dstack project add) so that {self.settings.dstack_config} names it",
                        backend=self.name,
                    )
                from ._client import DstackClient

                self._client = DstackClient(
                    creds.url, creds.project, creds.token, timeout=self.settings.request_timeout,
                    api_version=self.settings.api_version, token_source=creds.source,
                )
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _scrub(self, text: Any) -> str:
        c = self._client
        return c.scrub(text) if c is not None else str(text)

    # ---- contract
    def check(self) -> mb.Availability:
        try:
            c = self.client()
            info = c.server_info()
            me = c.me()
            c.get_project()
            return mb.Availability(True, detail={
                "url": c.url, "project": c.project, "server_version": info.get("server_version"),
                "api_version": c.sent_version, "user": me.get("username"),
            })
        except meshrun.BackendUnavailable as e:
            hint = "check the server URL and token" if "authentication" in str(e) else ""
            return mb.Availability(False, reason=self._scrub(e), hint=hint)
        except meshrun.MeshrunError as e:
            return mb.Availability(False, reason=self._scrub(e))
        except Exception as e:  # check() never raises
            return mb.Availability(False, reason=f"{type(e).__name__}: {self._scrub(e)}")

    def _configuration(self, spec: Any, *, job_id: str, name: str | None, options: Any,
                       remote_job_dir: str | None = None, offer: Any = None, nonce: str = "plan") -> dict[str, Any]:
        fcmd = None
        slack: float | None = 0.0
        data = _has_data(spec)
        if spec.kind == "function" or data:
            cp = None
            if spec.kind == "function" and self.settings.install_cloudpickle:
                import cloudpickle

                cp = cloudpickle.__version__
            fcmd = _task.function_command(remote_job_dir or f"{self.settings.remote_dir}/{job_id}",
                                          cloudpickle_version=cp, nonce=nonce,
                                          boto3=data and self.settings.install_boto3)
            # the agent enforces the limit itself and records it; dstack stops it later. A data job's limit
            # starts once its inputs are in place, and its outputs go up after it: dstack's clock is left off
            slack = None if data else 120.0
        return _translate.task_configuration(
            spec, job_id=job_id, name=name, options=options, function_command=fcmd,
            time_limit_slack=slack, offer=offer, secrets=self.settings.data_secrets if data else None,
        )

    def _validate(self, rs: dict[str, Any]) -> None:
        if self.settings.validate_locally:
            _translate.validate_with_dstack(rs)

    def _spec_error(self, e: Exception) -> meshrun.SpecError:
        return meshrun.SpecError("dstack", self._scrub(e))

    def offers(self, spec: Any) -> list[mb.Offer]:
        r = spec.resources
        options = _translate.parse_options(spec)
        base = mb.Offer(
            backend=self.name, where="dstack", gpus=r.gpus, gpu_type=r.gpu_type, gpu_memory=r.gpu_memory,
            cpus=r.cpus, memory=r.memory, nodes=r.nodes, price_per_hour=0.0, expected_start=None,
            start_note="unknown",
        )
        conf = self._configuration(spec, job_id="plan", name=None, options=options)
        rs = _translate.run_spec(conf)
        try:
            c = self.client()
        except meshrun.BackendUnavailable as e:  # not configured: say so, without loading dstack's models
            return [base.rejected(self._scrub(e))]
        self._validate(rs)
        try:
            base = mb.Offer(**{**_fields(base), "where": f"dstack:{c.project}"})
            plan = c.get_plan(rs, max_offers=self.settings.max_offers)
        except meshrun.BackendUnavailable as e:
            return [base.rejected(self._scrub(e))]
        except Exception as e:
            from ._client import DstackAPIError

            if isinstance(e, DstackAPIError) and e.code in ("validation",):
                raise self._spec_error(e) from None
            if isinstance(e, DstackAPIError):
                return [base.rejected(f"dstack could not plan the task: {self._scrub(e)}")]
            raise
        job_plans = plan.get("job_plans") or []
        raw = (job_plans[0].get("offers") if job_plans else None) or []
        if not raw:
            why = f"no capacity: {self._no_offers_reason(c)}"
            retry = _translate._retry(options)
            if retry and "no-capacity" in retry["on_events"]:
                # dstack accepts the run and keeps retrying until capacity shows up: a queue, not a refusal
                limit = f" for up to {retry['duration']}" if "duration" in retry else ""
                return [mb.Offer(**{
                    **_fields(base), "price_per_hour": float(options.max_price or 0.0), "expected_start": None,
                    "start_note": f"waits for capacity (dstack retries{limit}); now {why}",
                    "detail": {"queued": True, "no_capacity": why},
                })]
            return [base.rejected(why)]
        return [self._offer(o, spec) for o in raw]

    def _no_offers_reason(self, c: Any) -> str:
        """dstack's own explanation of an empty plan (what its CLI prints in the same case)."""
        try:
            fleets = c.list_fleets()
        except meshrun.MeshrunError:
            fleets = None
        if fleets == []:
            return (f"the dstack project {c.project!r} has no fleets; create one before submitting a run "
                    "(dstack: \"The project has no fleets\")")
        return f"no matching instance offers available in dstack project {c.project!r}"

    def _offer(self, o: Mapping[str, Any], spec: Any) -> mb.Offer:
        inst = o.get("instance") or {}
        res = inst.get("resources") or {}
        gpus = res.get("gpus") or []
        availability = str(o.get("availability") or "unknown")
        backend = str(o.get("backend") or "")
        region = o.get("region")
        spot = bool(res.get("spot"))
        fits = availability in _AVAILABLE
        if availability == "idle":
            expected, note = 0.0, "an idle instance of a fleet"
        elif availability == "available":
            expected, note = float(self.settings.provision_estimate), "a new instance (provisioning)"
        else:
            expected, note = None, f"availability {availability}"
        offer = mb.Offer(
            backend=self.name,
            where=f"{backend}/{region}" if region else backend,
            gpus=len(gpus),
            gpu_type=gpus[0].get("name") if gpus else None,
            gpu_memory=int(gpus[0]["memory_mib"]) * MIB if gpus and gpus[0].get("memory_mib") else None,
            cpus=float(res["cpus"]) if res.get("cpus") is not None else None,
            memory=int(res["memory_mib"]) * MIB if res.get("memory_mib") else None,
            nodes=spec.resources.nodes,
            price_per_hour=float(o.get("price") or 0.0),
            spot=spot,
            expected_start=expected,
            start_note=note,
            instance_type=inst.get("name"),
            region=region,
            detail={"dstack_backend": backend, "availability": availability,
                    "blocks": o.get("blocks"), "total_blocks": o.get("total_blocks"),
                    "availability_zones": o.get("availability_zones")},
        )
        if not fits:
            offer = offer.rejected(f"dstack says {_UNAVAILABLE_WHY.get(availability, availability)}")
        return offer

    def native(self, submission: mb.Submission, offer: mb.Offer | None = None) -> str:
        """The run spec dstack's server would get (file archives shown by their paths)."""
        import yaml

        spec = submission.spec
        options = _translate.parse_options(spec)
        conf = self._configuration(spec, job_id=submission.job_id,
                                   name=_translate.run_name(submission.job_id, submission.attempt), options=options,
                                   remote_job_dir=f"{self.settings.remote_dir}/{submission.job_id}", offer=offer)
        return str(yaml.safe_dump(_translate.run_spec(conf), sort_keys=False, allow_unicode=True))

    def submit(self, submission: mb.Submission, offer: mb.Offer | None = None) -> str:
        spec = submission.spec
        options = _translate.parse_options(spec)
        name = _translate.run_name(submission.job_id, submission.attempt)
        remote_job_dir = f"{self.settings.remote_dir}/{submission.job_id}"
        cwd = submission.launch.get("cwd") or os.getcwd()
        work_dir = (options.working_dir or f"{remote_job_dir}/work") if spec.workdir is not None else None
        # what to ship: (archive bytes maker, container path)
        uploads: list[tuple[Any, str]] = []
        if work_dir is not None:
            uploads.append((lambda: _task.tar_tree(Path(cwd), "work"), work_dir))
        if spec.kind == "function" or _has_data(spec):  # run under the agent: the job folder travels
            launch = dict(submission.launch)
            # no folder given: the agent takes the task's own (absolute, so the stager places inputs there too)
            launch.update(cwd=work_dir or options.working_dir or None, lease=False, mask_gpus=False,
                          scheduler="dstack", dist={"MASTER_PORT": "29500"})
            launch.setdefault("grace_period", 10)
            (submission.job_dir / "launch.json").write_text(json.dumps(launch, sort_keys=True) + "\n")
            members = {p.name: p.read_bytes() for p in submission.files()}
            members["launch.json"] = (json.dumps(launch, sort_keys=True) + "\n").encode()
            uploads.append((lambda: mb.pack_job(members, root=submission.job_id), remote_job_dir))
        for dst, src in spec.files.items():
            path = Path(src if os.path.isabs(src) else os.path.join(cwd, src))
            if not path.exists():
                raise meshrun.SpecError(f"files.{dst}", f"the source {src!r} does not exist (looked at {path})")
            uploads.append((lambda path=path: _task.tar_tree(path, path.name or "file"), dst))
        conf = self._configuration(spec, job_id=submission.job_id, name=name, options=options,
                                   remote_job_dir=remote_job_dir, offer=offer,
                                   nonce=mb.records_nonce(submission.job_dir) or "")
        if work_dir is not None:
            conf["working_dir"] = work_dir
        # validate before anything is sent (placeholder archive ids)
        self._validate(_translate.run_spec(
            conf, file_archives=[{"id": "00000000-0000-0000-0000-000000000000", "path": p} for _, p in uploads]))
        c = self.client()
        existing = c.get_run(name)
        if existing is not None and str(existing.get("status")) not in ("terminated", "failed", "done"):
            # submitted before (a response lost on the way back): the run is already ours
            return name
        archives = [self._upload(c, make(), path) for make, path in uploads]
        rs = _translate.run_spec(conf, file_archives=archives)
        from ._client import DstackAPIError

        try:
            run = c.apply(rs)
        except DstackAPIError as e:
            if e.code == "validation":
                raise self._spec_error(e) from None
            raise
        return str(((run or {}).get("run_spec") or {}).get("run_name") or name)

    def _upload(self, c: Any, data: bytes, path: str) -> dict[str, str]:
        archive = c.upload_archive(_task.sha256(data), data)
        return {"id": str(archive["id"]), "path": path}

    def status(self, ids: Sequence[str]) -> dict[str, mb.JobStatus]:
        from ._client import DstackAuthError

        ids = list(dict.fromkeys(ids))
        try:
            c = self.client()
            runs = self._runs(c, ids)
        except DstackAuthError:
            raise
        except meshrun.BackendUnavailable as e:
            st = mb.JobStatus(mb.JobState.UNKNOWN, reason=f"status unavailable: {self._scrub(e)}")
            return {i: st for i in ids}
        out = {}
        for i in ids:
            run = runs.get(i)
            if run is None:
                out[i] = mb.JobStatus(mb.JobState.LOST,
                                           reason=f"the dstack run {i!r} no longer exists in project {c.project!r}")
            else:
                out[i] = _status.map_run(run)
        return out

    def _runs(self, c: Any, names: list[str]) -> dict[str, dict[str, Any]]:
        """The runs named, in as few requests as it takes: one get each for a few, else listing pages."""
        found: dict[str, dict[str, Any]] = {}
        wanted = set(names)
        if len(wanted) > 3:
            prev = None
            for _ in range(self.settings.status_pages):
                page = c.list_runs(limit=100, prev=prev)
                for run in page:
                    n = (run.get("run_spec") or {}).get("run_name")
                    if n in wanted and n not in found:
                        found[n] = run
                if len(page) < 100 or wanted <= set(found):
                    break
                prev = page[-1]
        for n in names:
            if n not in found:
                run = c.get_run(n)
                if run is not None:
                    found[n] = run
        return found

    def cancel(self, backend_id: str) -> None:
        from ._client import DstackNotFound

        try:
            self.client().stop([backend_id], abort=False)
        except DstackNotFound:
            return

    def logs(self, backend_id: str, *, follow: bool = False) -> Iterator[str]:
        c = self.client()
        return mb.LogFilter().feed_all(self._log_chunks(c, backend_id, follow=follow))

    def _log_chunks(self, c: Any, name: str, *, follow: bool) -> Iterator[str]:
        sub_id = None
        next_token = None
        last_ts = None
        while True:
            run = c.get_run(name)
            if run is None:
                return
            finished = str(run.get("status")) in ("terminated", "failed", "done")
            sub = _status.latest_submission(run)
            if sub is not None and sub.get("id"):
                if sub["id"] != sub_id:  # a new submission (a retry) has its own log
                    sub_id, next_token, last_ts = sub["id"], None, None
                while True:
                    page = c.poll_logs(name, sub_id, next_token=next_token,
                                       start_time=None if next_token else last_ts)
                    events = page.get("logs") or []
                    for ev in events:
                        last_ts = ev.get("timestamp") or last_ts
                        try:
                            text = base64.b64decode(ev.get("message") or "").decode("utf-8", "replace")
                        except ValueError:
                            text = str(ev.get("message") or "")
                        if text:
                            yield text
                    next_token = page.get("next_token")
                    if not next_token:
                        break
            if not follow or finished:
                return
            time.sleep(self.log_poll)

    def fetch_results(self, backend_id: str, job_dir: Path) -> None:
        """The records of a job run under the agent (a function or data job), taken from the run's log (framed
        by the agent with the job's nonce)."""
        job_dir = Path(job_dir)
        launch = _read_json(job_dir / "launch.json") or {}
        nonce = mb.records_nonce(job_dir, create=False)
        if (launch.get("kind") != "function" and not launch.get("data")) or nonce is None:
            return
        c = self.client()
        text = "".join(self._log_chunks(c, backend_id, follow=False))
        try:
            records = mb.extract_records(text, nonce)
        except mb.RecordError as e:
            raise meshrun.BackendError(f"the dstack run {backend_id!r}: {e}", backend=self.name) from e
        if records:
            mb.write_records(job_dir, records)
        else:
            run = c.get_run(backend_id)
            if run is not None and str(run.get("status")) == "done":
                raise meshrun.BackendError(
                    f"the dstack run {backend_id!r} is done but its log holds no meshrun records "
                    "(was the log cut short, e.g. by dstack's log quota?)", backend=self.name)

    def find(self, job_id: str, job_dir: Path | None = None) -> str | None:
        c = self.client()
        name = _translate.run_name(job_id)
        run = c.get_run(name)
        if run is None:
            return None
        env = ((run.get("run_spec") or {}).get("configuration") or {}).get("env") or {}
        if isinstance(env, dict) and env.get("MESHRUN_JOB_ID") not in (None, _translate.escape_env(job_id)):
            return None
        return name


def _has_data(spec: Any) -> bool:
    """Whether the job moves object-store data (the agent's stager runs before and after it)."""
    return bool(getattr(spec, "inputs", None) or getattr(spec, "outputs", None))


def _fields(o: mb.Offer) -> dict[str, Any]:
    from dataclasses import fields

    return {f.name: getattr(o, f.name) for f in fields(o)}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
