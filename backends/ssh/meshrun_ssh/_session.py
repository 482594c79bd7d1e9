"""One host as the backend sees it: the shared connection, the remote helper beside the host agent, and
the requests the backend makes (probe, stage and submit, status, read, fetch, cancel, sync).

The helper (``_remote.py``) runs as one long-lived exec channel per host (``persistent = true``, the
default): a request is one round trip on an open channel, with no process start on the host. With
``persistent = false`` every request starts ``_remote.py once`` on a fresh exec channel instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import meshrun.backend as mb

from . import _conn
from ._errors import BackendError, ConnectionLost, RemoteError, Unreachable, retryable
from ._settings import HostParams, SSHSettings

BACKEND = "ssh"
HELPER = Path(__file__).with_name("_remote.py")


class Bundle:
    """What the host runs: the agent and the helper, each kept under a name that carries its content's
    SHA-256 (``agent-<sha256[:16]>.py``, ``remote-<sha256[:16]>.py``) and checked against the full hash in
    the very process that runs it (see _verified.py)."""

    def __init__(self) -> None:
        from ._verified import content_name

        agent = Path(mb.agent_file()).read_bytes()
        helper = HELPER.read_bytes()
        self.agent_name, self.agent_sha = content_name("agent", agent)
        self.helper_name, self.helper_sha = content_name("remote", helper)
        self.files = {self.agent_name: agent, self.helper_name: helper}


_BUNDLE: Optional[Bundle] = None


def _bundle() -> Bundle:
    global _BUNDLE
    if _BUNDLE is None:
        _BUNDLE = Bundle()
    return _BUNDLE


def local_cloudpickle() -> tuple[Optional[str], Optional[Path]]:
    try:
        import cloudpickle
    except ImportError:  # pragma: no cover - a core dependency
        return None, None
    return cloudpickle.__version__, Path(cloudpickle.__file__).parent


def local_python() -> str:
    import sys

    return "%d.%d" % sys.version_info[:2]


class _Frames:
    """Frame reader/writer on a paramiko channel (see _remote.py)."""

    def __init__(self, chan: Any, name: str):
        self.chan = chan
        self.name = name
        self.buf = bytearray()

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectionLost(f"{self.name}: the remote helper did not answer in time", backend=BACKEND)
        self.chan.settimeout(min(left, 5.0))
        try:
            chunk = self.chan.recv(1 << 16)
        except TimeoutError:
            return
        except OSError as e:
            raise ConnectionLost(f"{self.name}: connection dropped: {e}", backend=BACKEND) from None
        except Exception as e:  # socket.timeout is TimeoutError on 3.10+
            if type(e).__name__ == "timeout":
                return
            raise ConnectionLost(f"{self.name}: connection dropped: {e}", backend=BACKEND) from None
        if not chunk:
            raise EOFError
        self.buf += chunk

    def read(self, timeout: float) -> tuple[dict[str, Any], bytes]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            self._fill(deadline)
        i = self.buf.index(b"\n")
        head = json.loads(bytes(self.buf[:i]).decode("utf-8", "surrogateescape"))
        del self.buf[: i + 1]
        n = int(head.get("n") or 0)
        while len(self.buf) < n:
            self._fill(deadline)
        blob = bytes(self.buf[:n])
        del self.buf[:n]
        return head, blob

    def write(self, head: dict[str, Any], blob: bytes = b"") -> None:
        head = dict(head)
        head["n"] = len(blob)
        data = json.dumps(head).encode("utf-8", "surrogateescape") + b"\n" + blob
        try:
            self.chan.sendall(data)
        except Exception as e:
            raise ConnectionLost(f"{self.name}: connection dropped while sending: {e}", backend=BACKEND) from None


class RemoteHost:
    """The backend's handle on one host (thread-safe; requests to one host are serialised)."""

    def __init__(self, params: HostParams, settings: SSHSettings):
        self.params = params
        self.settings = settings
        self.name = params.name
        self._lock = threading.RLock()
        self._chan: Any = None
        self._frames: Optional[_Frames] = None
        self._gen = -1
        self.hello: Optional[dict[str, Any]] = None
        self._seq = 0
        self._uploaded = False
        self.down: Optional[tuple[float, str]] = None  # (when, why) of the last failure to connect
        self.claims: dict[str, tuple[int, Optional[str], float]] = {}  # job id -> (gpus, type, when)
        self.claim_seq = 0  # bumped on every claim: an offer made before a claim may be stale

    # ---- paths on the host
    @property
    def root(self) -> str:
        return self.params.remote_dir

    def job_dir(self, job_id: str) -> str:
        return f"{self.root}/jobs/{job_id}"

    def agent_dir(self) -> str:
        return f"{self.root}/agent"

    def agent_files(self) -> list[str]:
        """The host paths of the agent and the helper (content-addressed)."""
        b = _bundle()
        return [f"{self.agent_dir()}/{b.agent_name}", f"{self.agent_dir()}/{b.helper_name}"]

    @property
    def conn(self) -> _conn.Connection:
        return _conn.get_connection(self.params, self.settings)

    # ---- the helper
    def _helper_line(self, mode: str) -> str:
        from ._verified import boot_argv

        want = local_cloudpickle()[0] or ""
        b = _bundle()
        agent, helper = (_conn.rel_home(p) for p in self.agent_files())
        argv = boot_argv(self.params.python, (helper, b.helper_sha), [mode, self.root, want],
                         modules=[("_agent", agent, b.agent_sha)])
        return _conn.shell_command(argv, self.params.remote_env(), exec_=True)

    def _start(self, mode: str) -> tuple[Any, _Frames, dict[str, Any]]:
        """Start the helper on a new exec channel (uploading it first if the host lacks it); returns the
        channel, its frames and the hello."""
        conn = self.conn
        for attempt in range(3):
            chan = conn.open_session(retry=False)
            try:
                chan.exec_command(self._helper_line(mode))
            except Exception as e:
                chan.close()
                raise ConnectionLost(f"{self.name}: cannot start the remote helper: {e}", backend=BACKEND) from None
            frames = _Frames(chan, self.name)
            try:
                hello, _ = frames.read(timeout=max(30.0, self.params.connect_timeout))
            except EOFError:
                err = _drain_stderr(chan)
                rc = chan.recv_exit_status() if chan.exit_status_ready() else None
                chan.close()
                if "meshrun-boot: unsafe:" in err:
                    raise BackendError(
                        f"{self.name}: meshrun will not run its host agent from {self.agent_dir()}: "
                        f"{err.split('meshrun-boot: unsafe:', 1)[1].strip()} "
                        f"(or set {self.params.field_prefix}.remote_dir)", backend=BACKEND)
                if attempt == 0 and "meshrun-boot: stale:" in err:
                    self._upload_bundle()  # missing, or not the expected content: install a verified copy
                    continue
                if rc == 127 or "not found" in err:
                    raise BackendError(
                        f"{self.name}: the remote interpreter {self.params.python!r} was not found "
                        f"({self.params.field_prefix}.python): {err.strip()[-300:]}", backend=BACKEND)
                if not conn.is_active():
                    raise ConnectionLost(f"{self.name}: connection dropped while starting the helper",
                                         backend=BACKEND)
                raise BackendError(f"{self.name}: the remote helper did not start (exit {rc}): {err.strip()[-800:]}",
                                   backend=BACKEND)
            if hello.get("agent_version") != mb.agent_version():
                chan.close()
                raise BackendError(
                    f"{self.name}: the host agent reports version {hello.get('agent_version')!r}, this meshrun "
                    f"needs {mb.agent_version()!r}; remove {self.root}/agent on the host", backend=BACKEND)
            if attempt < 2 and self._needs_cloudpickle(hello):
                chan.close()
                self._upload_cloudpickle()
                continue
            return chan, frames, hello
        raise BackendError(f"{self.name}: could not set up the remote helper", backend=BACKEND)

    def _needs_cloudpickle(self, hello: dict[str, Any]) -> bool:
        want, path = local_cloudpickle()
        return bool(want and path and hello.get("python") == local_python() and hello.get("cloudpickle") != want)

    def _upload_bundle(self) -> None:
        from ._verified import install_verified

        install_verified(self.conn, self.agent_dir(), _bundle().files, pythons=[self.params.python],
                         what="the host agent", setting=f"{self.params.field_prefix}.remote_dir", backend=BACKEND)
        self._uploaded = True

    def _upload_cloudpickle(self) -> None:
        """Copy this client's cloudpickle (pure Python) to ``<root>/lib/cloudpickle-<version>/`` on the host,
        for function jobs on a host whose Python lacks it or has another version: no root, no network."""
        ver, path = local_cloudpickle()
        assert ver and path
        base = f"{self.root}/lib/cloudpickle-{ver}/cloudpickle"
        self.conn.makedirs(base)
        for f in sorted(path.glob("*.py")):
            self.conn.put_bytes(f.read_bytes(), f"{base}/{f.name}", 0o644)

    def _ensure(self) -> _Frames:
        conn = self.conn
        conn.transport(retry=False)
        if self._frames is not None and self._gen == conn.generation and not self._chan.closed:
            return self._frames
        self._close_helper()
        self._chan, self._frames, self.hello = self._start("serve")
        self._gen = conn.generation
        return self._frames

    def _close_helper(self) -> None:
        if self._chan is not None:
            try:
                self._chan.close()
            except Exception:
                pass
        self._chan = None
        self._frames = None

    def _exchange(self, head: dict[str, Any], blob: bytes, timeout: float) -> tuple[dict[str, Any], bytes]:
        with self._lock:
            self._seq += 1
            head = dict(head, id=self._seq)
            if self.settings.persistent:
                frames = self._ensure()
                try:
                    frames.write(head, blob)
                    rep, data = frames.read(timeout)
                except EOFError:
                    self._close_helper()
                    raise ConnectionLost(f"{self.name}: the remote helper went away", backend=BACKEND) from None
                except ConnectionLost:
                    self._close_helper()
                    raise
                if rep.get("id") != head["id"]:
                    self._close_helper()
                    raise ConnectionLost(f"{self.name}: the remote helper answered out of turn", backend=BACKEND)
            else:
                self.conn.transport(retry=False)
                chan, frames, self.hello = self._start("once")
                try:
                    frames.write(head, blob)
                    rep, data = frames.read(timeout)
                except EOFError:
                    raise ConnectionLost(f"{self.name}: the remote helper went away", backend=BACKEND) from None
                finally:
                    chan.close()
        if not rep.get("ok"):
            raise RemoteError(f"{self.name}: {head.get('op')} failed on the host: {rep.get('error')}", backend=BACKEND)
        return rep, data

    def call(self, op: str, *, blob: bytes = b"", retry: bool = True, timeout: Optional[float] = None,
             **fields: Any) -> tuple[dict[str, Any], bytes]:
        """One request to the host's helper; connection problems are retried with back-off when ``retry``
        (every request is idempotent, submit included)."""
        timeout = timeout or (60.0 + len(blob) / 2e6)
        head = dict(fields, op=op)

        def once() -> tuple[dict[str, Any], bytes]:
            try:
                rep = self._exchange(head, blob, timeout)
            except Unreachable as e:
                self.down = (time.monotonic(), str(e))
                raise
            self.down = None
            return rep

        if not retry:
            return once()
        return _conn.with_retries(self.settings, once)

    def close(self) -> None:
        with self._lock:
            self._close_helper()

    # ---- GPUs promised to jobs this process submitted, until the host shows their lease or ticket
    def claim(self, job_id: str, gpus: int, gpu_type: Optional[str]) -> None:
        self.claims[job_id] = (gpus, gpu_type, time.monotonic())
        self.claim_seq += 1

    def unclaim(self, job_id: str) -> None:
        self.claims.pop(job_id, None)

    def pending_claims(self, seen: set[str]) -> int:
        now = time.monotonic()
        total = 0
        for job_id, (gpus, _t, when) in list(self.claims.items()):
            if job_id in seen or now - when > 60.0:
                self.claims.pop(job_id, None)
                continue
            total += gpus
        return total

    # ---- requests
    def probe(self) -> dict[str, Any]:
        """GPUs, leases, queue, foreign processes, load (one round trip). Raises Unreachable when down."""
        recent = self.down
        if recent is not None and time.monotonic() - recent[0] < 3.0:
            raise Unreachable(recent[1], backend=BACKEND)
        rep, _ = self.call("probe", retry=False, timeout=30.0)
        return rep["snapshot"]

    def status(self, job_ids: Sequence[str], *, retry: bool = True) -> dict[str, dict[str, Any]]:
        dirs = [self.job_dir(j) for j in job_ids]
        rep, _ = self.call("status", dirs=dirs, retry=retry)
        st = rep["status"]
        return {j: st.get(d) or {} for j, d in zip(job_ids, dirs)}

    def submit(self, job_id: str, files: dict[str, bytes]) -> dict[str, Any]:
        names = sorted(files)
        blob = b"".join(files[n] for n in names)
        rep, _ = self.call("submit", blob=blob, job_dir=self.job_dir(job_id),
                           files=[[n, len(files[n])] for n in names])
        return rep

    def read(self, path: str, offset: int, done_file: Optional[str] = None, max_bytes: int = 1 << 20,
             retry: bool = True) -> tuple[dict[str, Any], bytes]:
        return self.call("read", path=path, offset=offset, done_file=done_file, max=max_bytes, retry=retry)

    def fetch(self, job_id: str, names: Sequence[str], limits: Optional[dict[str, int]] = None) -> dict[str, bytes]:
        rep, blob = self.call("fetch", dir=self.job_dir(job_id), names=list(names), limits=limits or {})
        out, pos = {}, 0
        for name, size in rep["files"]:
            out[name] = blob[pos:pos + size]
            pos += size
        return out

    def exists(self, paths: Sequence[str], retry: bool = True) -> dict[str, bool]:
        rep, _ = self.call("exists", paths=list(paths), retry=retry)
        return rep["exists"]

    def cancel(self, job_id: str, grace: float) -> dict[str, Any]:
        """Cancel on its own exec channel (it waits for the job's process tree to end), so status requests
        on the helper channel are never held up behind it."""
        head = {"op": "cancel", "dir": self.job_dir(job_id), "grace": grace, "id": 1}

        def once() -> dict[str, Any]:
            self.conn.transport(retry=False)
            chan, frames, _ = self._start("once")
            try:
                frames.write(head)
                rep, _ = frames.read(timeout=grace + 60.0)
            except EOFError:
                raise ConnectionLost(f"{self.name}: the remote helper went away", backend=BACKEND) from None
            finally:
                chan.close()
            if not rep.get("ok"):
                raise RemoteError(f"{self.name}: cancel failed: {rep.get('error')}", backend=BACKEND)
            return rep["record"]

        return _conn.with_retries(self.settings, once)

    def sync(self, dest: str, entries: Sequence[Any]) -> dict[str, Any]:
        """Mirror ``entries`` (from _sync.scan) into ``dest`` on the host: only what differs travels."""
        from ._sync import read_entries

        wire = [e.wire() for e in entries]
        rep, _ = self.call("sync", phase="diff", dest=dest, entries=wire)
        if rep.get("clean"):
            return {"ok": True, "dest": rep["dest"], "written": 0, "removed": 0, "bytes": 0}
        need = set(rep["need"])
        todo = [e for e in entries if e.path in need]
        try:
            blob = read_entries(todo)
        except OSError as e:
            raise BackendError(f"cannot read the working directory: {e}", backend=BACKEND) from None
        rep, _ = self.call("sync", phase="apply", dest=dest, entries=wire, files=[e.wire() for e in todo],
                           blob=blob)
        rep["bytes"] = len(blob)
        return rep


def _drain_stderr(chan: Any) -> str:
    err = bytearray()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
            continue
        if chan.exit_status_ready() or chan.closed:
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
            break
        time.sleep(0.01)
    return err.decode("utf-8", "replace")


def workdir_name(local_dir: str) -> str:
    """The remote mirror's folder name for a local directory: its base name (made safe) and a hash of
    where it is, so two projects called ``train`` never share a mirror."""
    import re
    import socket

    base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(local_dir.rstrip("/")) or "root")[:40]
    h = hashlib.sha256(f"{socket.gethostname()}\0{os.path.realpath(local_dir)}".encode("utf-8", "surrogateescape"))
    return f"{base}-{h.hexdigest()[:10]}"


def quote(s: str) -> str:
    return shlex.quote(s)
