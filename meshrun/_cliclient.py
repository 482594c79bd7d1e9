"""The warm command server, the caller's side (the server is ``_cliserver.py``): a resident per-user process
that answers ``meshrun run`` and ``meshrun offers`` warm.

What makes those commands slow from a fresh interpreter is not their work (a submit takes ~15 ms once warm)
but importing pydantic, building the spec models and loading the backends: ~200-400 ms at every start. So
the first such command starts, after it has done its work the ordinary way, a server that has imported all
of that (imports only: no configuration, no job, no backend instance is kept in it). The next command's
process stays small: it connects, hands over its argv, working directory, environment, umask and standard
streams (the file descriptors themselves, ``SCM_RIGHTS``), and the server hands them to a child it forked
ahead (its spare, ``_cliserver._Spare``), or forks one, which becomes that command: it takes all of those
on, reads the configuration afresh and runs ``meshrun.main`` as the process
would have, writing straight to the caller's terminal. The caller waits for the child's exit code, passing
on Ctrl-C and other signals; when the caller goes away, the child is ended as a hung-up terminal would end it.

Trust, as with the fork server: the socket lives only in this user's private socket directory (``_rundir``),
the caller sends nothing before ``SO_PEERCRED`` shows the server runs as its own uid, and the server forks
nothing for a peer of another uid. The socket's name is keyed by the interpreter, ``PYTHONPATH`` and
meshrun's location; before every fork the server checks that no module it imported and no directory on its
``sys.path`` changed since it started (an upgrade, a new backend installed), and if one did it steps aside
(the caller runs the command itself, and starts a fresh server). It ends after ``IDLE`` seconds unused.

``MESHRUN_CLI_SERVER=0`` turns it off (every command then runs in its own process, as before); any other
value, or none, leaves it on. Standard library only on the caller's side: importing this module costs the
caller a few milliseconds.
"""

from __future__ import annotations

import json
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
    import zlib

    from ._rundir import socket_dir

    d = socket_dir(warn=False)
    if d is None:
        return None
    return os.path.join(d, "cli-%08x.sock" % zlib.crc32(server_key().encode()))


# ---- the caller ---------------------------------------------------------------------------------------------


def peer_uid(s: socket.socket) -> int | None:  # _agent.peer_uid, without importing the agent for every command
    import socket  # here: a command that is not served never loads it

    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:  # pragma: no cover - not Linux
        return None
    import struct

    _pid, uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i")))
    return int(uid)


def _read_line(s: socket.socket) -> dict | None:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            return None
        buf += chunk
    try:
        msg = json.loads(buf.decode())
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


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
    """JSON carries it unchanged (a tuple would come back a list, a Path a string: those stay in-process)."""
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
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
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
        req = {**what, "key": server_key(), "cwd": cwd, "env": dict(os.environ), "umask": mask,
               "streams": streams, "encoding": getattr(out, "encoding", None) or "utf-8",
               "errors": getattr(out, "errors", None) or "strict"}
        import array

        data = (json.dumps(req) + "\n").encode()
        try:
            sent = s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", streams))])
            if sent < len(data):
                s.sendall(data[sent:])
            # the server has the request: wait for its answer however long it takes (a caller that gave up
            # and ran the command itself could run it twice); nothing ran if it closes without one
            s.settimeout(None)
            hello = _read_line(s)
        except OSError:
            return None
        if not hello or "pid" not in hello:
            return None  # refused (stale, not ours, a bad request): nothing ran
        return _wait_for(s, int(hello["pid"]), forward_signals="argv" in what)
    finally:
        s.close()


def _wait_for(s: socket.socket, pid: int, forward_signals: bool) -> dict:
    """The command runs as ``pid``: pass our signals on to it (a command line's) and return its last word."""
    if forward_signals:
        _forward_signals(pid)
    s.settimeout(None)
    while True:
        try:
            done = _read_line(s)
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
    import signal

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
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
