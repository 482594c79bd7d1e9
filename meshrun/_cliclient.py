"""The warm command server, the caller's side (the server is ``_cliserver.py``): a resident per-user process
that answers ``meshrun run`` and ``meshrun offers`` warm.

What makes those commands slow from a fresh interpreter is not their work (a submit takes ~15 ms once warm)
but importing pydantic, building the spec models and loading the backends: ~200-400 ms at every start. So
the first such command starts, after it has done its work the ordinary way, a server that has imported all
of that (imports only: no configuration, no job, no backend instance is kept in it). The next command's
process stays small: it connects, hands over its argv, working directory, environment, umask and standard
streams (the file descriptors themselves, ``SCM_RIGHTS``; its resource limits the server reads itself), and
the server hands them to a child it forked ahead (its spare, ``_agent.Spare``), or forks one, which
becomes that command: it takes all of those on, reads the configuration afresh and runs ``meshrun.main`` as
the process would have, writing straight to the caller's terminal. The caller waits for the child's exit code, passing
on Ctrl-C and other signals; when the caller goes away, the child is ended as a hung-up terminal would end it.

Trust, as with the fork server: the socket lives only in this user's private socket directory (``_rundir``),
the caller sends nothing before ``SO_PEERCRED`` shows the server runs as its own uid, and the server reads
nothing from, and forks nothing for, a peer of another uid. Each message is a :func:`frame`: a length, then the
message in the interpreter's own ``marshal`` format, which only ever passes between two processes of one
uid and one interpreter (the server's key names it). The socket's name is keyed by the interpreter, ``PYTHONPATH`` and
meshrun's location; before every fork the server checks that no module it imported and no directory on its
``sys.path`` changed since it started (an upgrade, a new backend installed), and if one did it steps aside
(the caller runs the command itself, and starts a fresh server). It ends after ``IDLE`` seconds unused.

``MESHRUN_CLI_SERVER=0`` turns it off (every command then runs in its own process, as before); any other
value, or none, leaves it on. Standard library only on the caller's side, and little of it: the caller
loads ``_socket`` (not ``socket``, whose enums and selectors cost milliseconds) and no json.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from typing import Any

SERVED = frozenset({"run", "offers"})  # the commands that import pydantic and the backends
ENV_SWITCH = "MESHRUN_CLI_SERVER"
IDLE = 900.0  # seconds a server waits for its next command before it exits
MAX_REQUEST = 64 << 20
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
STREAMS = (0, 1, 2)


def enabled(env: dict[str, str] | os._Environ[str] | None = None) -> bool:
    v = (os.environ if env is None else env).get(ENV_SWITCH, "")
    return v.strip().lower() not in ("0", "false", "no", "off")


def server_key() -> str:
    """What a server must share with the caller to answer for it: uid, interpreter, module path, meshrun."""
    return "|".join((str(os.getuid()), sys.executable, os.environ.get("PYTHONPATH", ""), _PKG_DIR,
                     str(sys.flags.isolated), str(sys.flags.no_user_site)))


def server_path() -> str | None:
    """This caller's server socket, in the private socket directory; None where there is no private one."""
    from ._rundir import socket_dir

    d = socket_dir(warn=False)
    if d is None:
        return None
    h = 0x811C9DC5  # FNV-1a, 32 bits: a short stable name for the key (nothing to import for it)
    for b in server_key().encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return os.path.join(d, "cli-%08x.sock" % h)


# ---- the protocol -------------------------------------------------------------------------------------------


def frame(msg: dict) -> bytes:
    """One message: its length (4 bytes, big-endian), then ``marshal.dumps(msg)`` (plain values only)."""
    import marshal  # built in: nothing to load

    data = marshal.dumps(msg)
    return len(data).to_bytes(4, "big") + data


def unframe(data: bytes, limit: int = MAX_REQUEST) -> tuple[dict | None, int]:
    """(the message at the start of ``data``, or None when it is not all there yet, its length in bytes).
    Raises ValueError for a message over ``limit`` bytes, or one that is not a dict."""
    if len(data) < 4:
        return None, 0
    n = int.from_bytes(data[:4], "big")
    if n > limit:
        raise ValueError(f"message larger than {limit} bytes")
    if len(data) < 4 + n:
        return None, 0
    import marshal

    try:
        msg = marshal.loads(data[4:4 + n])
    except (EOFError, TypeError) as e:
        raise ValueError(f"not a message: {e}") from None
    if not isinstance(msg, dict):
        raise ValueError("not a message: not a dict")
    return msg, 4 + n


class Frames:
    """The messages arriving on a socket, one by one (a message may share a read with the next)."""

    def __init__(self, s: Any):
        self.s = s
        self.buf = b""

    def next(self) -> dict | None:
        """The next message, or None when the socket closes (or sends something else) first."""
        while True:
            try:
                msg, n = unframe(self.buf)
            except ValueError:
                return None
            if msg is not None:
                self.buf = self.buf[n:]
                return msg
            chunk = self.s.recv(65536)
            if not chunk:
                return None
            self.buf += chunk


def read_frame(s: Any) -> dict | None:
    """The one message a socket sends (a reply), or None."""
    return Frames(s).next()


# ---- the caller ---------------------------------------------------------------------------------------------


def peer_cred(s: Any) -> tuple[int, int] | None:
    """(pid, uid) of the process at the other end of unix socket ``s``, from the kernel (``SO_PEERCRED``)."""
    import _socket  # here: a command that is not served never loads it

    opt = getattr(_socket, "SO_PEERCRED", None)
    if opt is None:  # pragma: no cover - not Linux
        return None
    pid, uid, _gid = memoryview(s.getsockopt(_socket.SOL_SOCKET, opt, 12)).cast("i")  # struct ucred
    return int(pid), int(uid)


def peer_uid(s: Any) -> int | None:  # _agent.peer_uid, without importing the agent (or socket) for every command
    cred = peer_cred(s)
    return None if cred is None else cred[1]


def call(argv: list[str]) -> int | None:
    """Run ``meshrun ARGV`` through this user's warm server: its exit code, or None when no server took the
    command (none running, not ours, stale, or no private socket directory); then nothing of it has run."""
    done = _request({"argv": list(argv)})
    if done is None:
        return None
    if "exit" not in done:
        sys.stderr.write(f"meshrun: {done.get('error')}\n")
        return 1
    return int(done["exit"])


def run(command: Any = None, /, **fields: Any) -> Any:
    """Submit a command job: ``meshrun.run(["python", "train.py"], gpus=2, name="train")``.

    ``command`` is an argv list (run without a shell) or a string (run by ``bash -c``); the other keywords
    are :class:`JobSpec` fields; ``backend=`` names where to run it (else placement chooses), and the
    placement options (``objective=``, ``max_price_per_hour=``, ``unknown_start=``, ``timeout=``, ...) are
    those of :func:`meshrun.plan`. A :class:`JobSpec` is accepted too (the keywords then replace its fields).
    A function is submitted with :func:`meshrun.submit` or ``@meshrun.job``.

    The first submit of a fresh interpreter is handed to this user's warm command server when one answers
    (plain values only; the same validation and errors), so a script does not wait for pydantic and the
    backends to load; ``MESHRUN_CLI_SERVER=0`` submits in this process always.
    """
    first = "meshrun._scheduler" not in sys.modules  # once it is loaded, submitting here is as quick
    if first:
        job_id = api_run(command, fields)
        if job_id is not None:
            from ._job import Job

            return Job(job_id)
    from ._scheduler import run as submit_here

    job = submit_here(command, **fields)
    if first and enabled() and _plain(command) and _plain(fields):
        start()  # warm for the next script
    return job


def api_run(command: object, fields: dict) -> str | None:
    """``meshrun.run(command, **fields)`` through the warm server, from a process that has not configured or
    registered anything of its own: the new job's id, or None when no server took it (then nothing ran, and
    the caller submits itself). The caller's exception is raised here as the server's child raised it."""
    if not enabled() or not _plain(command) or not _plain(fields) or _customised():
        return None
    done = _request({"api": "run", "command": command, "fields": fields})
    if done is None:
        return None
    if "job" in done:
        return str(done["job"])
    raise _exception(done)


def _plain(v: object, depth: int = 0) -> bool:
    """Plain JSON-like values, which the server's child rebuilds as the caller gave them (a tuple, a Path or
    anything else stays in-process: the child would not see the same object)."""
    if v is None or isinstance(v, (str, bool, int, float)):
        return True
    if depth > 20:
        return False
    if type(v) is list:
        return all(_plain(x, depth + 1) for x in v)
    if type(v) is dict:
        return all(type(k) is str and _plain(x, depth + 1) for k, x in v.items())
    return False


def _customised() -> bool:
    """Whether this process set configuration or backends of its own, which a server's child would not see."""
    config = sys.modules.get("meshrun._config")
    current = getattr(config, "_current", None)
    if current is not None and getattr(current, "source", None) == "meshrun.configure()":
        return True
    registry = sys.modules.get("meshrun._registry")
    return bool(getattr(registry, "_manual", None))


def _exception(done: dict) -> BaseException:
    import base64
    import pickle

    try:
        e = pickle.loads(base64.b64decode(done["pickled"]))
        if isinstance(e, BaseException):
            return e
    except Exception:
        pass
    from ._errors import MeshrunError

    return MeshrunError(str(done.get("error") or "the command server's submit failed"))


def _request(what: dict) -> dict | None:
    path = server_path()
    if path is None:
        return None
    import _socket

    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(2.0)
        try:
            s.connect(path)
        except OSError:
            return None
        uid = peer_uid(s)
        if uid is not None and uid != os.getuid():
            sys.stderr.write(f"meshrun: warning: the command server socket {path} is served by uid {uid}, not by "
                             f"us (uid {os.getuid()}): not using it\n")
            return None
        streams = []
        for n in STREAMS:
            try:
                os.fstat(n)
                streams.append(n)
            except OSError:
                pass
        try:
            cwd = os.getcwd()
        except OSError:
            return None
        mask = os.umask(0o022)
        os.umask(mask)
        out = sys.stdout
        req = {**what, "key": server_key(), "cwd": cwd, "env": dict(os.environ), "umask": mask, "streams": streams,
               "encoding": getattr(out, "encoding", None) or "utf-8",
               "errors": getattr(out, "errors", None) or "strict"}
        data = frame(req)
        fds = b"".join(n.to_bytes(4, sys.byteorder, signed=True) for n in streams)  # an int array, as SCM_RIGHTS
        try:
            sent = s.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
            if sent < len(data):
                s.sendall(data[sent:])
            # the server has the request: wait for its answer however long it takes (a caller that gave up
            # and ran the command itself could run it twice); nothing ran if it closes without one
            s.settimeout(None)
            frames = Frames(s)
            hello = frames.next()
        except OSError:
            return None
        if not hello or "pid" not in hello:
            return None  # refused (stale, not ours, a bad request): nothing ran
        return _wait_for(frames, int(hello["pid"]), forward_signals="argv" in what)
    finally:
        s.close()


def _wait_for(frames: Frames, pid: int, forward_signals: bool) -> dict:
    """The command runs as ``pid``: pass our signals on to it (a command line's) and return its last word."""
    if forward_signals:
        _forward_signals(pid)
    while True:
        try:
            done = frames.next()
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries recv itself
            continue
        except OSError:
            done = None
            break
    if done is None or not ("exit" in done or "job" in done or "error" in done):
        return {"exit": 1, "error": "the command server ended this command without its outcome"}
    return done


def _forward_signals(pid: int) -> None:
    # built in (the signal module's enums cost a millisecond); typeshed has no stub for it
    import _signal as signal  # type: ignore[import-not-found]

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except OSError:
            pass

    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, forward)


def start() -> None:
    """Start this user's server in the background (when none answers), for the commands that follow."""
    path = server_path()
    if path is None or answers(path):
        return
    import subprocess

    try:
        subprocess.Popen([sys.executable, "-m", "meshrun._cliserver", path], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                         close_fds=True, cwd=os.path.dirname(_PKG_DIR))  # imports this very meshrun
    except OSError:
        pass


def stop() -> bool:
    """Stop this caller's server (it ends within a second of its socket going); whether there was one."""
    path = server_path()
    if path is None or not os.path.lexists(path):
        return False
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def answers(path: str) -> bool:
    import _socket

    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
