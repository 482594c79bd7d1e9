"""The local backend, meshrun's embedded default: this machine, its GPUs leased per job.

Jobs run under the host agent's supervisor (``_agent.py``), started through a warm fork server so a job
starts in milliseconds; GPU leases live in the machine-wide ``MESHRUN_LEASE_DIR`` shared by all users.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

from . import _agent
from ._backend import Availability, Backend, Feature, JobRef, JobState, JobStatus, Offer, Submission
from ._backend import map_agent_status as map_agent_status  # the agent's records, read by every backend
from ._config import get_config
from ._localenv import agent_env, gpu_snapshot
from ._logfile import local_logs
from ._logfile import tail_file as tail_file  # meshrun.backend's tail_file, as it always was
from ._logfile import tail_offset as tail_offset
from ._rundir import prune_warm_files, socket_dir

INVENTORY_TTL = 10.0

def agent_file() -> Path:
    """Path of the stdlib-only host agent, for backends that upload it to another machine."""
    f = _agent.__file__
    if _AGENT_FILE.get(f) is None:
        _AGENT_FILE[f] = Path(f).resolve()  # once: resolving walks every directory of the path
    return _AGENT_FILE[f]


_AGENT_FILE: dict[str, Path] = {}


def agent_version() -> str:
    return _agent.AGENT_VERSION


_DIGEST: dict[str, str] = {}


def _agent_digest() -> str:
    """The agent file's content hash (a warm fork server runs the code it was started with: an edited or
    upgraded agent must not reuse it, whatever its version says)."""
    path = str(agent_file())
    if path not in _DIGEST:
        try:
            import hashlib

            _DIGEST[path] = hashlib.sha1(Path(path).read_bytes()).hexdigest()[:12]
        except OSError:
            _DIGEST[path] = "?"
    return _DIGEST[path]


class _Reaper:
    """Waits for the processes we start directly so none is left a zombie while we live."""

    @staticmethod
    def watch(p: subprocess.Popen) -> None:
        threading.Thread(target=p.wait, name=f"meshrun-reap-{p.pid}", daemon=True).start()


#: the keys of ``[backends.local]``; unknown ones are refused when the backend is made (the values' types when
#: the settings are first used), so a typo is an error at once without loading pydantic for every read
SETTING_NAMES = ("grace_period", "lease_dir", "fork_server", "server_idle", "warm_imports", "share_gpu_below_mib")


def _settings_model() -> Any:
    """``LocalSettings``, the ``[backends.local]`` model, built on first use: the local backend serves reading
    commands (``meshrun status``/``logs`` of a local job) that never need its settings, and pydantic is the
    slowest import of all."""
    global _LocalSettings
    if _LocalSettings is None:
        from ._settings import BackendSettings

        class LocalSettings(BackendSettings):
            """``[backends.local]``."""

            grace_period: float = 10.0
            lease_dir: Union[str, None] = None
            fork_server: bool = True
            server_idle: float = 300.0
            # the fork server imports the installed packages function jobs imported (e.g. torch), so the next
            # job starts with them loaded (imports only: never a GPU context or a Python thread)
            warm_imports: bool = True
            share_gpu_below_mib: float = 0.0

        assert tuple(LocalSettings.model_fields) == SETTING_NAMES, "SETTING_NAMES and LocalSettings must agree"
        _LocalSettings = LocalSettings
    return _LocalSettings


_LocalSettings: Any = None


class _ModelOnFirstUse:
    """A class attribute (``settings_model``) whose value is made by ``factory`` when first read."""

    def __init__(self, factory: Any):
        self.factory = factory

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        return self.factory()


def __getattr__(name: str) -> Any:
    if name == "LocalSettings":
        return _settings_model()
    raise AttributeError(name)


class LocalBackend(Backend):
    name = "local"
    features = (Feature.COMMANDS | Feature.FUNCTIONS | Feature.GPUS | Feature.LOGS_FOLLOW | Feature.REATTACH
                | Feature.SECRETS | Feature.DATA)
    install_hint = "built in"
    poll_interval = (0.002, 0.25)
    shared_filesystem = True
    always_available = True  # this machine: placement goes straight to offers(), which discover GPUs only for a GPU job
    settings_model = _ModelOnFirstUse(_settings_model)

    def __init__(self, config: Mapping[str, Any] | None = None):
        # the settings are validated when first used (a submit, offers, check), not to read a job's status
        self.config: dict[str, Any] = dict(config or {})
        if set(self.config) - set(SETTING_NAMES):
            _settings_model().load(self.name, self.config)  # the model's error names the key and the valid ones
        self._settings: Any = None
        self._server_lock = threading.Lock()
        self._server_started = 0.0
        self._inventory: tuple[float, Any, Any] | None = None

    @property
    def settings(self) -> Any:
        if self._settings is None:
            self._settings = _settings_model().load(self.name, self.config)
        return self._settings

    # ---- where things are
    @property
    def home(self) -> Path:
        return get_config().home

    def _env(self, server: str | None = None) -> dict[str, str]:
        """The agent's environment (``server``: the fork server's socket, when the caller has it already)."""
        path = (server or self._server_path()) if self.settings.fork_server and self.settings.warm_imports else None
        return agent_env(self.settings.lease_dir, self.settings.share_gpu_below_mib,
                         path + ".warm.json" if path is not None else None)

    def _server_path(self) -> str | None:
        return fork_server_path(self.home)

    def _discover(self) -> Any:
        """The GPU inventory (nvidia-smi is slow: cached for a few seconds; leases are always read fresh)."""
        now = time.monotonic()
        env = self._env()
        key = tuple(env.get(k) for k in ("MESHRUN_GPUS", "PATH", "MESHRUN_PLATFORM", "FAKE_NVIDIA_SMI",
                                           "FAKE_AMD_SMI_DIR", "FAKE_ROCM_SMI_DIR"))
        if self._inventory is None or now - self._inventory[0] > INVENTORY_TTL or self._inventory[1] != key:
            self._inventory = (now, key, _agent.discover_gpus(env))
        return self._inventory[2]

    # ---- contract
    def check(self) -> Availability:
        gpus, source, err = self._discover()
        detail = {"gpus": len(gpus), "gpu_source": source, "host": socket.gethostname()}
        if err and not gpus:
            detail["gpu_note"] = f"no GPUs found ({err}); CPU jobs only"
        return Availability(True, detail=detail)

    def offers(self, spec: Any) -> list[Offer]:
        r = spec.resources
        host = socket.gethostname()
        # a CPU job needs no GPU inventory (asking nvidia-smi takes ~20 ms, more where it is missing)
        wants_gpus = bool(r.gpus or r.gpu_type or r.gpu_memory)
        gpus, source, err = self._discover() if wants_gpus else ([], None, None)
        # a job gets GPUs of one vendor and model: the first kind with enough of them, else the largest
        groups = _agent.gpu_groups(gpus, r.gpu_type)
        matching: list[Any] = next((g for g in groups if len(g) >= r.gpus), max(groups, key=len, default=[]))
        gpu_type = r.gpu_type or (matching[0]["name"] if (r.gpus and matching) else None)
        base = Offer(
            backend=self.name,
            where=host,
            gpus=r.gpus,
            gpu_type=gpu_type,
            cpus=r.cpus,
            memory=r.memory,
            nodes=1,
            detail={"gpu_source": source} if source else {},
        )
        if r.nodes > 1:
            return [base.rejected(f"the local backend runs single-node jobs; the job asks for {r.nodes} nodes")]
        if r.gpus and len(matching) < r.gpus:
            have = f"{len(matching)} {r.gpu_type} GPU(s)" if r.gpu_type else f"{len(matching)} GPU(s)"
            if len(groups) > 1:
                have += " of one kind (a job never mixes vendors or models)"
            why = f" ({err})" if err and not gpus else ""
            return [base.rejected(f"this machine has {have}{why}; the job asks for {r.gpus}")]
        cpus = os.cpu_count() or 1
        if r.cpus and r.cpus > cpus:
            return [base.rejected(f"this machine has {cpus} CPUs; the job asks for {r.cpus:g}")]
        mem = _total_memory()
        if r.memory and mem and r.memory > mem:
            from ._units import format_size

            return [base.rejected(f"this machine has {format_size(mem)} of memory; the job asks for {format_size(r.memory)}")]
        if r.gpu_memory and matching and all((g.get("memory") or 0) < r.gpu_memory for g in matching):
            return [base.rejected("no GPU here has the requested GPU memory")]
        if not r.gpus:
            return [base]
        env = self._env()
        # a stuck lease lock must not outlast the offers deadline: give up sooner and say who holds it
        lock_timeout = min(float(env.get("MESHRUN_LEASE_LOCK_TIMEOUT") or _agent.LOCK_TIMEOUT), 1.5)
        snap = _agent.snapshot({**env, "MESHRUN_LEASE_LOCK_TIMEOUT": str(lock_timeout)})
        if snap.get("error") and "lease_dir" not in snap:
            return [base.rejected(snap["error"])]
        free = [
            g for g in matching
            if str(g["index"]) not in snap.get("leases", {}) and g["uuid"] not in snap.get("foreign", {})
        ]
        queue = [t for t in snap.get("queue", [])]
        if len(free) >= r.gpus and not queue:
            return [base]
        note = f"{len(free)} of {len(matching)} GPUs free, {len(queue)} job(s) queued"
        return [Offer(**{**_offer_fields(base), "expected_start": None, "start_note": f"queued: {note}"})]

    def submit(self, submission: Submission, offer: Offer | None = None) -> str:
        job_dir = str(submission.job_dir)
        launch = dict(submission.launch)
        launch.setdefault("grace_period", self.settings.grace_period)
        _agent.write_json(os.path.join(job_dir, _agent.LAUNCH), launch, mode=0o600)
        path = self._server_path() if self.settings.fork_server else None
        env = {**self._env(path), **submission.secrets}  # the supervisor's environment, passed on to the job
        if path is not None:  # None: no private directory for the socket; start the job directly
            if _agent.server_spawn(path, job_dir, env):
                return submission.job_id
            self._start_server(path, env)
        p = _agent._spawn_direct(job_dir, env)
        _Reaper.watch(p)
        return submission.job_id

    def _start_server(self, path: str, env: dict[str, str]) -> None:
        with self._server_lock:
            if time.monotonic() - self._server_started < 5:
                return
            self._server_started = time.monotonic()
            p = _agent.start_agent([sys.executable, str(agent_file()), "serve", path, str(self.settings.server_idle)],
                                   env)
            _Reaper.watch(p)
            prune_warm_files(os.path.dirname(path))

    def status(self, refs: Sequence[JobRef]) -> dict[str, JobStatus]:
        return {r: local_status(r.job_dir) for r in refs}

    def cancel(self, ref: JobRef) -> None:
        _agent.cancel(str(ref.job_dir), grace=self.settings.grace_period)

    #: logs() takes ``tail``/``max_bytes`` and starts that far from the end of the file
    logs_from_end = True

    def logs(self, ref: JobRef, *, follow: bool = False, tail: int | None = None,
             max_bytes: int | None = None) -> Iterator[str]:
        return local_logs(ref.job_dir, follow=follow, tail=tail, max_bytes=max_bytes)

    def find(self, job_id: str, job_dir: Path) -> str | None:
        return job_id if (job_dir / _agent.LAUNCH).exists() else None

    # ---- extras for the CLI
    def gpus(self) -> dict[str, Any]:
        return gpu_snapshot(self._env())

    def stop_server(self) -> None:
        """Stop this process's warm fork server, if any (tests; it also idles out by itself)."""
        path = fork_server_path(self.home, warn=False)
        if path is None:
            return
        try:
            os.unlink(path)
        except OSError:
            pass


def local_status(job_dir: Path) -> JobStatus:
    """A local job's status from its folder. Two corrections to what the agent's records alone say: a
    function whose complete result is on disk succeeded, even if its supervisor died before writing the exit
    record; and a supervisor that died on a full disk is said to have done so."""
    st = map_agent_status(_agent.job_status(str(job_dir)))
    if st.state is not JobState.LOST or (job_dir / _agent.EXIT).exists():
        return st
    launch = _agent.read_json(str(job_dir / _agent.LAUNCH)) or {}
    if launch.get("kind") == "function" and _agent.result_complete(str(job_dir / _agent.RESULT)):
        return JobStatus(JobState.SUCCEEDED, exit_code=0, started_at=st.started_at, where=st.where,
                         reason="its supervisor ended before writing the exit record; the result is complete")
    if _agent.disk_full(str(job_dir)):
        return JobStatus(JobState.LOST, started_at=st.started_at, where=st.where,
                         reason=f"the disk is full (ENOSPC) at {job_dir}; {st.reason or 'no exit record'}")
    return st


def fork_server_path(home: Path | str, *, warn: bool = True) -> str | None:
    """Where the warm fork server for this user, interpreter, agent and ``home`` listens, or None when there is
    no private directory to put its socket in (then jobs start as fresh processes, with a warning).

    Sockets live only in a directory that this user owns and no one else can enter: ``$XDG_RUNTIME_DIR/meshrun``
    when ``XDG_RUNTIME_DIR`` is a private directory of ours, else ``/tmp/meshrun-<uid>``; never in
    ``MESHRUN_HOME``, which may be shared or loose."""
    key = f"{sys.executable}|{_agent.AGENT_VERSION}|{agent_file()}|{_agent_digest()}|{os.getuid()}|{home}"
    import hashlib  # here, not at the top: reading a local job's status needs no hash

    name = f"agent-{hashlib.sha1(key.encode()).hexdigest()[:10]}.sock"
    d = socket_dir(warn=warn)
    return None if d is None else os.path.join(d, name)


def _total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return None


def _offer_fields(o: Offer) -> dict[str, Any]:
    from dataclasses import fields

    return {f.name: getattr(o, f.name) for f in fields(o)}


def dump_snapshot(snap: Mapping[str, Any]) -> str:
    return json.dumps(snap, indent=2, sort_keys=True)
