"""The SSH backend: a pool of shared GPU workstations and servers, each running meshrun's host agent.

Placement: every host is asked (one round trip each, in parallel) which GPUs are free right now; a job
goes to a host that can start it now, else to the one expected to free soonest, where it waits in that
host's GPU queue (fair share across users, first come first served within one). GPU leases live on each
host, machine-wide and shared by every OS user there, exactly as with the local backend.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import meshrun
import meshrun.backend as mb

from ._settings import SSHOptions, SSHSettings

BACKEND = "ssh"
CLAIM_TTL = 60.0


class SSHBackend(mb.Backend):
    name = "ssh"
    features = (mb.Feature.COMMANDS | mb.Feature.FUNCTIONS | mb.Feature.GPUS
                | mb.Feature.LOGS_FOLLOW | mb.Feature.REATTACH | mb.Feature.DATA)
    install_hint = mb.install_hint("ssh")
    poll_interval = (0.05, 5.0)
    settings_model = SSHSettings
    options_model = SSHOptions

    def __init__(self, config: Optional[Mapping[str, Any]] = None):
        super().__init__(config)
        self._hosts: dict[str, Any] = {}
        self._params: dict[str, Any] = {}
        self._lock = threading.Lock()

    # ---- hosts
    def host_names(self) -> list[str]:
        return [h if isinstance(h, str) else h.label for h in self.settings.hosts]

    def _host(self, name: str) -> Any:
        from ._session import RemoteHost
        from ._settings import resolve

        with self._lock:
            h = self._hosts.get(name)
            if h is None:
                for i, entry in enumerate(self.settings.hosts):
                    label = entry if isinstance(entry, str) else entry.label
                    if label == name:
                        h = RemoteHost(resolve(entry, self.settings, i), self.settings)
                        self._hosts[name] = h
                        break
            if h is None:
                raise meshrun.BackendError(
                    f"host {name!r} is not in [backends.ssh] hosts (known: {', '.join(self.host_names()) or 'none'})",
                    backend=BACKEND)
            return h

    def _each_host(self, fn: Any, names: Optional[Sequence[str]] = None) -> dict[str, Any]:
        """``fn(host)`` on every host in parallel; each result, or the exception it raised."""
        names = list(names if names is not None else self.host_names())
        out: dict[str, Any] = {}
        if not names:
            return out

        def one(n: str) -> Any:
            try:
                return fn(self._host(n))
            except Exception as e:  # reported per host, never raised for the whole pool
                return e

        if len(names) == 1:
            return {names[0]: one(names[0])}
        with ThreadPoolExecutor(max_workers=min(16, len(names)), thread_name_prefix="meshrun-ssh") as ex:
            for n, r in zip(names, ex.map(one, names)):
                out[n] = r
        return out

    @staticmethod
    def _split(backend_id: str) -> tuple[str, str]:
        host, sep, job_id = backend_id.partition(":")
        if not sep or not host or not job_id:
            raise meshrun.BackendError(f"not an ssh backend id (HOST:JOB_ID): {backend_id!r}", backend=BACKEND)
        return host, job_id

    # ---- contract
    def check(self) -> mb.Availability:
        import importlib.util

        for dep in ("paramiko", "tenacity"):  # found, not imported: paramiko alone costs ~0.15 s
            if importlib.util.find_spec(dep) is None:
                return mb.Availability(False, f"missing dependency: {dep}", hint=self.install_hint)
        names = self.host_names()
        if not names:
            return mb.Availability(
                False, "no hosts configured",
                hint='add hosts to [backends.ssh] in the meshrun config, e.g. hosts = ["gpu-box-1", "gpu-box-2"] '
                     "(aliases from ~/.ssh/config) or tables {name, host, port, user, key}")
        return mb.Availability(True, detail={"hosts": len(names), "names": ", ".join(names)})

    def offers(self, spec: Any) -> list[mb.Offer]:
        results = self._each_host(lambda h: (h.probe(), h.hello))
        offers = [self._offer(spec, name, res) for name, res in results.items()]
        order = {n: i for i, n in enumerate(self.host_names())}
        return sorted(offers, key=lambda o: _rank(o, order))

    def _offer(self, spec: Any, name: str, res: Any) -> mb.Offer:
        r = spec.resources
        h = self._host(name)
        base = dict(backend=BACKEND, where=name, gpus=r.gpus, gpu_type=r.gpu_type, cpus=r.cpus, memory=r.memory,
                    nodes=1)
        if isinstance(res, BaseException):
            why = str(res).splitlines()[0].removeprefix("[ssh] ")
            return mb.Offer(**base, fits=False, reason=f"unreachable: {why}", expected_start=None,
                                 start_note="unreachable")
        snap, hello = res
        hello = hello or {}
        if r.nodes > 1:
            return mb.Offer(**base, fits=False,
                                 reason=f"the ssh backend runs single-node jobs; the job asks for {r.nodes} nodes")
        if spec.kind == "function":
            from ._session import local_cloudpickle, local_python

            if hello.get("python") != local_python():
                return mb.Offer(**base, fits=False, reason=(
                    f"{h.params.python} on {name} is Python {hello.get('python')}; a function job needs Python "
                    f"{local_python()} like this client (set {h.params.field_prefix}.python to a "
                    f"{local_python()} interpreter)"))
            if hello.get("cloudpickle") != local_cloudpickle()[0]:
                return mb.Offer(**base, fits=False, reason=(
                    f"cloudpickle on {name} is {hello.get('cloudpickle') or 'missing'} "
                    f"({hello.get('cloudpickle_error') or 'version differs'}); this client has "
                    f"{local_cloudpickle()[0]}"))
        cpus = snap.get("cpus") or hello.get("cpus")
        if r.cpus and cpus and r.cpus > cpus:
            return mb.Offer(**base, fits=False, reason=f"{name} has {cpus} CPUs; the job asks for {r.cpus:g}")
        mem = hello.get("memory")
        if r.memory and mem and r.memory > mem:
            return mb.Offer(**base, fits=False, reason=(
                f"{name} has {meshrun.format_size(mem)} of memory; the job asks for {meshrun.format_size(r.memory)}"))
        load = snap.get("load")
        detail: dict[str, Any] = {"host": snap.get("host"), "load": load, "cpus": cpus, "claim_seq": h.claim_seq}
        if not r.gpus:
            return mb.Offer(**base, detail=detail)
        gpus = snap.get("gpus") or []
        if snap.get("error") and "lease_dir" not in snap:  # the agent could not use the lease directory
            return mb.Offer(**base, fits=False, reason=f"GPU leases unusable on {name}: {snap['error']} "
                                 f"(set {h.params.field_prefix}.lease_dir to a directory every user may write)")
        gpu_error = snap.get("error") if not gpus else None
        # a job gets GPUs of one vendor and model (AMD and NVIDIA on one host): the first kind with enough
        groups = mb.gpu_groups(gpus, r.gpu_type)
        matching: list = next((g for g in groups if len(g) >= r.gpus), max(groups, key=len, default=[]))
        if len(matching) < r.gpus:
            have = f"{len(matching)} {r.gpu_type} GPU(s)" if r.gpu_type else f"{len(gpus)} GPU(s)"
            return mb.Offer(**base, fits=False,
                                 reason=f"{name} has {have}{f' ({gpu_error})' if gpu_error else ''}; the job asks for {r.gpus}")
        if r.gpu_memory and all((g.get("memory") or 0) < r.gpu_memory for g in matching):
            return mb.Offer(**base, fits=False, reason=f"no GPU on {name} has the requested GPU memory")
        gpu_type = r.gpu_type or matching[0].get("name")
        base["gpu_type"] = gpu_type
        leases = snap.get("leases") or {}
        foreign = snap.get("foreign") or {}
        queue = snap.get("queue") or []
        free = [g for g in matching if str(g["index"]) not in leases and g["uuid"] not in foreign]
        # jobs this process just submitted that the host does not show yet (their supervisor is starting)
        seen = {str(x.get("job_id")) for x in list(leases.values()) + list(queue)}
        claimed = h.pending_claims(seen)
        n_free = max(0, len(free) - claimed)
        ahead = sum(int(t.get("gpus") or 0) for t in queue if _gpu_matches({"name": gpu_type}, t.get("gpu_type"))
                    or not t.get("gpu_type"))
        ahead += max(0, claimed - len(free))  # our own just-submitted jobs that will queue there too
        detail.update(free=n_free, total=len(matching), queued=len(queue), foreign=len(foreign))
        if n_free >= r.gpus and not queue:
            return mb.Offer(**base, detail=detail, start_note=f"now: {n_free} of {len(matching)} GPUs free")
        # when would enough GPUs be back? known ends of leases (time limits we may read), soonest first
        need = r.gpus + ahead - n_free
        ends = sorted(float(t) for i, t in (snap.get("lease_ends") or {}).items()
                      if any(str(g["index"]) == str(i) for g in matching))
        now = snap.get("time") or time.time()
        expected = None
        if 0 < need <= len(ends):
            # with leases of unknown end (other users' jobs) this is an upper bound: they may end sooner
            expected = max(0.0, ends[need - 1] - now)
        note = (f"queued: {n_free} of {len(matching)} GPUs free, {len(queue)} job(s) waiting"
                + (f", {len(foreign)} busy with processes meshrun did not start" if foreign else ""))
        if expected is not None:
            note += f"; expected in about {meshrun.format_duration(expected)}"
        detail.update(waiting_gpus=ahead, need=need)
        return mb.Offer(**base, expected_start=expected, start_note=note, detail=detail)

    def submit(self, submission: Any, offer: Optional[mb.Offer] = None) -> str:
        spec = submission.spec
        opts = self._job_options(spec)
        host_name = opts.host
        if host_name is None and offer is not None and offer.backend == BACKEND and offer.where in self.host_names():
            host_name = offer.where
            stale = spec.resources.gpus and (offer.detail or {}).get("claim_seq") != self._host(host_name).claim_seq
            if stale:  # this process gave GPUs of that host to other jobs since the offer: place again
                host_name = None
        if host_name is None:
            offers = self.offers(spec)
            fitting = [o for o in offers if o.fits]
            if not fitting:
                raise meshrun.NoPlacementError(f"no ssh host can run {spec.display_name!r}",
                                               [f"{o.where}: {o.reason}" for o in offers] or ["no hosts configured"])
            host_name = fitting[0].where
        h = self._host(host_name)
        if h.hello is None:
            h.call("ping")  # connect and start the helper: its hello tells the remote home
        launch = dict(submission.launch)
        local_cwd = launch.get("cwd") or os.getcwd()
        remote_cwd = self._stage_workdir(h, spec, local_cwd, opts)
        launch["cwd"] = remote_cwd
        launch["sys_path"] = _map_sys_path(launch.get("sys_path") or [], local_cwd, remote_cwd)
        launch.setdefault("grace_period", self.settings.grace_period)
        files = {p.name: p.read_bytes() for p in submission.files()}
        files["launch.json"] = (json.dumps(launch, sort_keys=True) + "\n").encode()
        if spec.resources.gpus:
            h.claim(submission.job_id, spec.resources.gpus, spec.resources.gpu_type)
        try:
            h.submit(submission.job_id, files)
        except Exception:
            h.unclaim(submission.job_id)
            raise
        return f"{host_name}:{submission.job_id}"

    def _job_options(self, spec: Any) -> SSHOptions:
        opts: SSHOptions = self.options(spec)
        if opts.host is not None and opts.host not in self.host_names():
            known = ", ".join(self.host_names())
            raise meshrun.SpecError("backend_options.ssh.host",
                                    f"{opts.host!r} is not one of the configured hosts: {known}")
        return opts

    def _stage_workdir(self, h: Any, spec: Any, local_cwd: str, opts: SSHOptions) -> str:
        """Mirror the working directory (and the spec's files) to the host; the job's remote cwd."""
        from ._session import workdir_name
        from ._settings import DEFAULT_EXCLUDE
        from ._sync import scan

        if opts.workdir is not None and not opts.sync:
            if spec.files:
                raise meshrun.SpecError("files", "files need the working directory sync; leave out "
                                        "backend_options.ssh.workdir or set sync=True")
            return _expand_remote(opts.workdir, h)
        sync = self.settings.sync if opts.sync is None else opts.sync
        if not sync and not spec.files:
            return _expand_remote("~", h)
        patterns = list(DEFAULT_EXCLUDE) + list(self.settings.sync_exclude) + list(opts.sync_exclude)
        if sync:
            entries = scan(local_cwd, patterns, max_bytes=self.settings.max_sync_bytes,
                           max_files=self.settings.max_sync_files, extra=dict(spec.files))
        else:
            entries = scan(_empty_dir(), [], max_bytes=self.settings.max_sync_bytes,
                           max_files=self.settings.max_sync_files, extra=dict(spec.files))
        dest = opts.workdir or f"{h.root}/work/{workdir_name(local_cwd)}"
        rep = h.sync(dest, entries)
        return rep["dest"]

    def status(self, ids: Sequence[str]) -> dict[str, mb.JobStatus]:
        by_host: dict[str, list[str]] = {}
        out: dict[str, mb.JobStatus] = {}
        for bid in ids:
            try:
                host, job_id = self._split(bid)
            except meshrun.BackendError as e:
                out[bid] = mb.JobStatus(mb.JobState.LOST, reason=str(e))
                continue
            if host not in self.host_names():
                out[bid] = mb.JobStatus(mb.JobState.UNKNOWN, reason=(
                    f"host {host!r} is no longer in [backends.ssh] hosts; add it back to follow this job"))
                continue
            by_host.setdefault(host, []).append(job_id)
        results = self._each_host(lambda h: h.status(by_host[h.name]), list(by_host))
        for host, res in results.items():
            for job_id in by_host[host]:
                bid = f"{host}:{job_id}"
                if isinstance(res, BaseException):
                    why = str(res).splitlines()[0].removeprefix("[ssh] ")
                    out[bid] = mb.JobStatus(mb.JobState.UNKNOWN, reason=f"{host} unreachable: {why}",
                                                 where=host)
                    continue
                rec = res.get(job_id) or {}
                st = mb.map_agent_status(rec)
                where = f"{host} ({st.where})" if st.where and st.where.split()[0] != host else (st.where or host)
                out[bid] = mb.JobStatus(st.state, st.reason, st.exit_code, st.started_at, st.ended_at, where,
                                             dict(st.detail))
                if st.state is not mb.JobState.PENDING or rec.get("position"):
                    self._host(host).unclaim(job_id)
        return out

    def cancel(self, backend_id: str) -> None:
        host, job_id = self._split(backend_id)
        h = self._host(host)
        h.cancel(job_id, self.settings.grace_period)
        h.unclaim(job_id)

    def logs(self, backend_id: str, *, follow: bool = False) -> Iterator[str]:
        host, job_id = self._split(backend_id)
        h = self._host(host)
        if not follow:  # read now, so an unreachable host raises here (the core then shows the local copy)
            return iter(list(_follow_log(h, job_id, False)))
        return _follow_log(h, job_id, True)

    def fetch_results(self, backend_id: str, job_dir: Path) -> None:
        host, job_id = self._split(backend_id)
        h = self._host(host)
        # the output comes too while it is small, so logs() still answers when the host no longer does
        files = h.fetch(job_id, list(mb.RESULT_FILES) + ["output.log"], limits={"output.log": 8 << 20})
        mb.write_records(Path(job_dir), files, also=["output.log"])

    def find(self, job_id: str, job_dir: Optional[Path] = None) -> Optional[str]:
        def look(h: Any) -> bool:
            path = f"{h.job_dir(job_id)}/launch.json"
            return bool(h.exists([path], retry=False).get(path))

        for host, res in self._each_host(look).items():
            if res is True:
                return f"{host}:{job_id}"
        return None

    def gpus(self) -> dict[str, Any]:
        """{host name: the agent's snapshot, or {"unreachable": reason}} for ``meshrun gpus --backend ssh``."""
        out: dict[str, Any] = {}
        for name, res in self._each_host(lambda h: h.probe()).items():
            if isinstance(res, BaseException):
                out[name] = {"unreachable": str(res).splitlines()[0].removeprefix("[ssh] ")}
            else:
                out[name] = res
        return out

    def host(self, name: str) -> Any:
        """The RemoteHost for a configured host name (benchmarks, diagnostics)."""
        return self._host(name)

    def close(self) -> None:
        with self._lock:
            hosts = list(self._hosts.values())
            self._hosts.clear()
        for h in hosts:
            h.close()


# ---- helpers


def _gpu_matches(gpu: Mapping[str, Any], gpu_type: Optional[str]) -> bool:
    if not gpu_type:
        return True
    norm = lambda s: "".join(ch for ch in s.lower() if ch.isalnum())  # noqa: E731
    return norm(gpu_type) in norm(gpu.get("name") or "")


def _rank(o: mb.Offer, order: Mapping[str, int]) -> tuple:
    """Start-now hosts first (least loaded, most GPUs free), then the host expected to free soonest, then
    hosts with an unknown wait (fewest GPUs queued ahead), unreachable or unfit last."""
    d = o.detail or {}
    start = o.expected_start
    load = d.get("load") or 0.0
    cpus = d.get("cpus") or 1
    return (
        not o.fits,
        0 if start == 0 else 1,
        start if start is not None else float("inf"),
        d.get("waiting_gpus", 0),
        -(d.get("free") or 0),
        round(load / cpus, 1),
        o.total_price_per_hour,
        order.get(o.where, 0),
    )


def _map_sys_path(paths: Sequence[str], local_cwd: str, remote_cwd: str) -> list[str]:
    """The job's import path on the host: entries inside the synced tree, moved to the mirror."""
    out = []
    base = os.path.realpath(local_cwd)
    for p in paths:
        rp = os.path.realpath(p)
        if rp == base:
            out.append(remote_cwd)
        elif rp.startswith(base + os.sep):
            out.append(remote_cwd + "/" + os.path.relpath(rp, base).replace(os.sep, "/"))
    return out


def _expand_remote(path: str, h: Any) -> str:
    """A host path with ``~`` made absolute (the agent does not expand it), from the helper's hello."""
    if path == "~" or path.startswith("~/"):
        home = (h.hello or {}).get("home")
        if not home:
            raise meshrun.BackendError(f"{h.name}: the remote home directory is not known yet", backend=BACKEND)
        return home + path[1:]
    return path


_EMPTY: Optional[str] = None


def _empty_dir() -> str:
    global _EMPTY
    if _EMPTY is None:
        import tempfile

        _EMPTY = tempfile.mkdtemp(prefix="meshrun-ssh-empty-")
    return _EMPTY


def _follow_log(h: Any, job_id: str, follow: bool) -> Iterator[str]:
    import codecs

    path = f"{h.job_dir(job_id)}/output.log"
    done_file = f"{h.job_dir(job_id)}/exit.json"
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    offset = 0
    delay = 0.05
    while True:
        rep, data = h.read(path, offset, done_file=done_file)
        if data:
            offset += len(data)
            text = dec.decode(data)
            if text:
                yield text
            delay = 0.05
            if len(data) >= (1 << 20):
                continue  # more is waiting
        if not follow or rep.get("done"):
            if rep.get("done") and rep.get("size") is not None and offset < rep["size"]:
                continue  # written before the exit record: read it all
            rest = dec.decode(b"", final=True)
            if rest:
                yield rest
            return
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
