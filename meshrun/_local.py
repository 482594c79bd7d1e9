"""The local backend, meshrun's embedded default: this machine, its GPUs leased per job.

Jobs run under the host agent's supervisor (``_agent.py``), started through a warm fork server so a job
starts in milliseconds; GPU leases live in the machine-wide ``MESHRUN_LEASE_DIR`` shared by all users.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from . import _agent
from ._backend import Availability, Backend, Feature, JobState, JobStatus, Offer, Submission
from ._config import get_config

INVENTORY_TTL = 10.0

_STATES = {
    "starting": JobState.PENDING,
    "pending": JobState.PENDING,
    "queued": JobState.PENDING,
    "running": JobState.RUNNING,
    "succeeded": JobState.SUCCEEDED,
    "failed": JobState.FAILED,
    "cancelled": JobState.CANCELLED,
    "timeout": JobState.TIMEOUT,
    "lost": JobState.LOST,
}


def agent_file() -> Path:
    """Path of the stdlib-only host agent, for backends that upload it to another machine."""
    return Path(_agent.__file__).resolve()


def agent_version() -> str:
    return _agent.AGENT_VERSION


_DIGEST: dict[str, str] = {}


def _agent_digest() -> str:
    """The agent file's content hash (a warm fork server runs the code it was started with: an edited or
    upgraded agent must not reuse it, whatever its version says)."""
    path = str(agent_file())
    if path not in _DIGEST:
        try:
            _DIGEST[path] = hashlib.sha1(Path(path).read_bytes()).hexdigest()[:12]
        except OSError:
            _DIGEST[path] = "?"
    return _DIGEST[path]


def map_agent_status(rec: Mapping[str, Any]) -> JobStatus:
    """Translate one agent status record (``exit.json``/``state.json``) into a :class:`JobStatus`."""
    state = _STATES.get(str(rec.get("state")), JobState.UNKNOWN)
    where = rec.get("host")
    gpus = rec.get("gpus")
    if gpus and where:
        where = f"{where} GPU {','.join(str(g.get('index', g)) if isinstance(g, dict) else str(g) for g in gpus)}"
    return JobStatus(
        state=state,
        reason=rec.get("reason"),
        exit_code=rec.get("exit_code"),
        started_at=rec.get("started_at"),
        ended_at=rec.get("ended_at"),
        where=where,
        detail={k: rec[k] for k in ("pid", "position", "gpu_uuids", "containment", "cgroup") if k in rec},
    )


class _Reaper:
    """Waits for the processes we start directly so none is left a zombie while we live."""

    @staticmethod
    def watch(p: subprocess.Popen) -> None:
        threading.Thread(target=p.wait, name=f"meshrun-reap-{p.pid}", daemon=True).start()


class LocalBackend(Backend):
    name = "local"
    features = Feature.COMMANDS | Feature.FUNCTIONS | Feature.GPUS | Feature.LOGS_FOLLOW | Feature.REATTACH
    install_hint = "built in"
    poll_interval = (0.002, 0.25)

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        self.settings = _local_settings().load("local", self.config)
        self._server_lock = threading.Lock()
        self._server_started = 0.0
        self._inventory: tuple[float, Any, Any] | None = None

    # ---- where things are
    @property
    def home(self) -> Path:
        return get_config().home

    def _job_dir(self, backend_id: str) -> Path:
        return self.home / "jobs" / backend_id

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.settings.lease_dir:
            env["MESHRUN_LEASE_DIR"] = self.settings.lease_dir
        return env

    def _server_path(self) -> str:
        key = f"{sys.executable}|{_agent.AGENT_VERSION}|{agent_file()}|{_agent_digest()}|{os.getuid()}"
        h = hashlib.sha1(key.encode()).hexdigest()[:10]
        path = str(self.home / f"agent-{h}.sock")
        if len(path.encode()) > 100:  # AF_UNIX paths are limited to ~107 bytes
            path = os.path.join("/tmp", f"meshrun-{os.getuid()}-{h}.sock")
        return path

    def _discover(self) -> Any:
        """The GPU inventory (nvidia-smi is slow: cached for a few seconds; leases are always read fresh)."""
        now = time.monotonic()
        env = self._env()
        key = (env.get("MESHRUN_GPUS"), env.get("PATH"), env.get("FAKE_NVIDIA_SMI"))
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
        env = self._env()
        gpus, source, err = self._discover()
        matching = [g for g in gpus if _agent.gpu_matches(g, r.gpu_type)]
        gpu_type = r.gpu_type or (matching[0]["name"] if (r.gpus and matching) else None)
        price = self._price(gpu_type) * r.gpus
        base = Offer(
            backend=self.name,
            where=host,
            gpus=r.gpus,
            gpu_type=gpu_type,
            cpus=r.cpus,
            memory=r.memory,
            nodes=1,
            price_per_hour=price,
            detail={"gpu_source": source},
        )
        if r.nodes > 1:
            return [base.rejected(f"the local backend runs single-node jobs; the job asks for {r.nodes} nodes")]
        if r.gpus and len(matching) < r.gpus:
            have = f"{len(matching)} {r.gpu_type} GPU(s)" if r.gpu_type else f"{len(gpus)} GPU(s)"
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
        snap = _agent.snapshot(env)
        free = [
            g for g in matching
            if str(g["index"]) not in snap.get("leases", {}) and g["uuid"] not in snap.get("foreign", {})
        ]
        queue = [t for t in snap.get("queue", [])]
        if len(free) >= r.gpus and not queue:
            return [base]
        note = f"{len(free)} of {len(matching)} GPUs free, {len(queue)} job(s) queued"
        return [Offer(**{**_offer_fields(base), "expected_start": None, "start_note": f"queued: {note}"})]

    def _price(self, gpu_type: str | None) -> float:
        prices = self.settings.price_per_gpu_hour
        if isinstance(prices, (int, float)):
            return float(prices)
        if gpu_type:
            for k, v in prices.items():
                if _agent.gpu_matches({"name": gpu_type}, k):
                    return float(v)
        return float(prices.get("default", 0.0))

    def submit(self, submission: Submission, offer: Offer | None = None) -> str:
        job_dir = str(submission.job_dir)
        launch = dict(submission.launch)
        launch.setdefault("grace_period", self.settings.grace_period)
        if launch.get("nodes", 1) == 1:
            from ._launch import dist_env, free_port

            d = dist_env(nnodes=1, node_rank=0, master_addr="127.0.0.1", master_port=free_port(),
                         gpus_per_node=int(launch.get("gpus") or 0))
            launch["dist"] = {**d, **(launch.get("dist") or {})}
        _agent.write_json(os.path.join(job_dir, _agent.LAUNCH), launch, mode=0o600)
        env = self._env()
        if self.settings.fork_server:
            path = self._server_path()
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
            p = subprocess.Popen(
                [sys.executable, str(agent_file()), "serve", path, str(self.settings.server_idle)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
            _Reaper.watch(p)

    def status(self, ids: Sequence[str]) -> dict[str, JobStatus]:
        return {i: map_agent_status(_agent.job_status(str(self._job_dir(i)))) for i in ids}

    def cancel(self, backend_id: str) -> None:
        _agent.cancel(str(self._job_dir(backend_id)), grace=self.settings.grace_period)

    def logs(self, backend_id: str, *, follow: bool = False) -> Iterator[str]:
        job_dir = self._job_dir(backend_id)
        return tail_file(job_dir / _agent.LOG, follow=follow,
                         done=lambda: (job_dir / _agent.EXIT).exists())

    def find(self, job_id: str) -> str | None:
        return job_id if (self._job_dir(job_id) / _agent.LAUNCH).exists() else None

    # ---- extras for the CLI
    def gpus(self) -> dict[str, Any]:
        env = self._env()
        snap = _agent.snapshot(env)
        mode, detail = _agent.containment_available(env)  # what a job started from here gets
        snap["containment"] = {"mode": mode, "detail": detail}
        return snap

    def stop_server(self) -> None:
        """Stop this process's warm fork server, if any (tests; it also idles out by itself)."""
        path = self._server_path()
        try:
            os.unlink(path)
        except OSError:
            pass


def tail_file(path: Path, *, follow: bool, done: Any, poll: float = 0.1) -> Iterator[str]:
    """Yield a growing text file's content in chunks; with ``follow``, until ``done()`` and EOF."""
    pos = 0
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")("replace")
    while True:
        finished = done() if follow else True
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                while True:
                    chunk = f.read(65536)
                    if not chunk:
                        break
                    pos += len(chunk)
                    text = dec.decode(chunk)
                    if text:
                        yield text
        except FileNotFoundError:
            pass
        if finished:
            rest = dec.decode(b"", final=True)
            if rest:
                yield rest
            return
        time.sleep(poll)


def _total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return None


def _offer_fields(o: Offer) -> dict[str, Any]:
    from dataclasses import fields

    return {f.name: getattr(o, f.name) for f in fields(o)}


_SETTINGS = None


def _local_settings() -> Any:
    global _SETTINGS
    if _SETTINGS is None:
        from typing import Union

        from ._config import BackendSettings

        class LocalSettings(BackendSettings):  # type: ignore[misc, valid-type]
            grace_period: float = 10.0
            lease_dir: Union[str, None] = None
            fork_server: bool = True
            server_idle: float = 300.0
            price_per_gpu_hour: Union[float, dict[str, float]] = 0.0

        _SETTINGS = LocalSettings
    return _SETTINGS


def dump_snapshot(snap: Mapping[str, Any]) -> str:
    return json.dumps(snap, indent=2, sort_keys=True)
