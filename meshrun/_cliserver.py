"""The command server: a resident per-user process that answers ``meshrun run`` and ``meshrun offers`` warm.

What makes those commands slow from a fresh interpreter is not their work (a submit takes ~15 ms once warm)
but importing pydantic, building the spec models and loading the backends: ~200-400 ms at every start. So
the first such command starts, after it has done its work the ordinary way, a server that has imported all
of that (imports only: no configuration, no job, no backend instance is kept in it). The next command's
process stays small: it connects, hands over its argv, working directory, environment, umask and standard
streams (the file descriptors themselves, ``SCM_RIGHTS``), and the server forks a child that becomes that
command: it takes all of those on, reads the configuration afresh and runs ``meshrun.main`` as the process
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
import socket
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SERVED = frozenset({"run", "offers"})  # the commands that import pydantic and the backends
ENV_SWITCH = "MESHRUN_CLI_SERVER"
IDLE = 900.0  # seconds a server waits for its next command before it exits
MAX_REQUEST = 64 << 20
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_STREAMS = (0, 1, 2)


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


def _peer_uid(s: socket.socket) -> int | None:
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
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2.0)
        try:
            s.connect(path)
        except OSError:
            return None
        uid = _peer_uid(s)
        if uid is not None and uid != os.getuid():
            sys.stderr.write(f"meshrun: warning: the command server socket {path} is served by uid {uid}, not by "
                             f"us (uid {os.getuid()}): not using it\n")
            return None
        streams = []
        for n in _STREAMS:
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
    if path is None or _answers(path):
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


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


# ---- the server ---------------------------------------------------------------------------------------------


def _prewarm() -> None:
    """Import what the served commands need, and build what pydantic builds lazily; keep no state."""
    from . import _attempts, _cli, _gather, _options, _placement, _plan, _scheduler, _spec  # noqa: F401
    from . import _local  # noqa: F401
    from ._registry import _entry_points, backend_class

    for name in list(_entry_points()):
        try:
            backend_class(name)
        except Exception:  # a broken plugin: the command reports it, as it would without a server
            pass
    for cmd in SERVED:
        _cli.build_parser(cmd)
    _spec.JobSpec(command=["true"])


def _watched() -> dict[str, int]:
    """mtime_ns of every imported module's file and of every directory on sys.path (installs change them)."""
    out: dict[str, int] = {}
    paths = [getattr(m, "__file__", None) for m in list(sys.modules.values())]
    paths += [p for p in sys.path if p]
    for p in paths:
        if isinstance(p, str) and p not in out:
            try:
                out[p] = os.stat(p).st_mtime_ns
            except OSError:
                out[p] = -1
    return out


def _changed(seen: dict[str, int]) -> str | None:
    for p, t in seen.items():
        try:
            now = os.stat(p).st_mtime_ns
        except OSError:
            now = -1
        if now != t:
            return p
    return None


def _why_not_fork(seen: dict[str, int]) -> str | None:
    changed = _changed(seen)
    if changed:
        return f"{changed} changed since this server started"
    from ._agent import fork_unsafe

    unsafe = fork_unsafe()  # a thread or a GPU context that a learned import left: never fork that
    return f"forking became unsafe: {unsafe}" if unsafe else None


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    import array

    fds: list[int] = []
    buf = b""
    size = array.array("i").itemsize
    while not buf.endswith(b"\n"):
        chunk, anc, _flags, _addr = conn.recvmsg(1 << 20, socket.CMSG_SPACE(len(_STREAMS) * size))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(payload[: len(payload) - len(payload) % size])
                fds.extend(a)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError(f"request larger than {MAX_REQUEST} bytes")
    req = json.loads(buf.decode())
    if not isinstance(req, dict):
        raise ValueError("a request is a JSON object")
    return req, fds


def _learn(path: str, before: set[str]) -> None:
    """Tell the server which modules this command imported that it had not (it imports them for the next)."""
    new = sorted(m for m in set(sys.modules) - before if m != "__main__" and not m.startswith("_frozen"))
    if not new:
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2.0)
        s.connect(path)
        if _peer_uid(s) in (None, os.getuid()):
            s.sendall((json.dumps({"op": "learn", "modules": new[:1000]}) + "\n").encode())
    except OSError:
        pass
    finally:
        s.close()


def _api_child(conn: socket.socket, req: dict) -> int:
    """``meshrun.run(command, **fields)`` for a caller in another process: send the job's id or the error."""
    from ._scheduler import run

    try:
        job = run(req.get("command"), **dict(req.get("fields") or {}))
        msg: dict = {"job": job.id}
    except Exception as e:  # the caller raises it as its own
        import base64
        import pickle

        msg = {"error": f"{type(e).__name__}: {e}"}
        try:
            data = pickle.dumps(e)
            pickle.loads(data)  # only what comes back whole
            msg["pickled"] = base64.b64encode(data).decode()
        except Exception:
            pass
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    try:
        conn.sendall((json.dumps(msg) + "\n").encode())
    except OSError:
        pass
    return 0


def _become(conn: socket.socket, req: dict, fds: list[int], path: str) -> None:
    """In the forked child: take on the caller's streams, directory, environment and umask, run the command,
    send its exit code and end. Never returns."""
    import io
    import signal
    import threading

    rc = 1
    before = set(sys.modules)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        streams = [int(n) for n in req.get("streams", [])]
        null = os.open(os.devnull, os.O_RDWR)
        for n in _STREAMS:
            src = fds[streams.index(n)] if n in streams and streams.index(n) < len(fds) else null
            os.dup2(src, n)
        for fd in set(fds) | {null}:
            if fd not in _STREAMS:
                os.close(fd)
        enc, errors = str(req.get("encoding") or "utf-8"), str(req.get("errors") or "strict")
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding=enc, errors=errors)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding=enc, errors=errors,
                                      line_buffering=os.isatty(1), write_through=False)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding=enc, errors="backslashreplace",
                                      line_buffering=True)
        os.chdir(str(req["cwd"]))
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in dict(req["env"]).items()})
        os.umask(int(req.get("umask", 0o022)))
        conn.sendall((json.dumps({"pid": os.getpid()}) + "\n").encode())
        if req.get("api") == "run":
            rc = _api_child(conn, req)
            return
        argv = [str(a) for a in req["argv"]]
        sys.argv = [sys.argv[0]] + argv

        def hang_up() -> None:  # the caller went away: end as a command whose terminal hung up
            try:
                while conn.recv(4096):
                    pass
            except OSError:
                pass
            os.kill(os.getpid(), signal.SIGHUP)

        threading.Thread(target=hang_up, daemon=True).start()
        from ._cli import main

        try:
            rc = int(main(argv) or 0)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        except KeyboardInterrupt:
            rc = 130
        except BaseException:
            import traceback

            traceback.print_exc()
            rc = 1
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
        try:
            conn.sendall((json.dumps({"exit": rc}) + "\n").encode())
        except OSError:
            pass
    finally:
        try:
            conn.close()
            _learn(path, before)
        except BaseException:  # noqa: BLE001 - the command is done; nothing here may change its exit code
            pass
        os._exit(rc if isinstance(rc, int) and 0 <= rc < 256 else 1)


def serve(path: str, idle: float = IDLE) -> None:
    """Listen at ``path`` (in the private socket directory) and fork a child per command until idle."""
    import time

    key = server_key()
    _prewarm()
    seen = _watched()
    os.setsid() if os.getsid(0) != os.getpid() else None
    os.chdir("/")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}"
    try:
        os.unlink(tmp)
    except OSError:
        pass
    old = os.umask(0o077)
    try:
        sock.bind(tmp)
    finally:
        os.umask(old)
    sock.listen(64)
    if os.path.lexists(path) and not _answers(path):  # a killed server's socket (our private directory)
        try:
            os.unlink(path)
        except OSError:
            pass
    try:
        os.link(tmp, path)  # never replaces a server that got there first
    except OSError:
        os.unlink(tmp)
        return
    os.unlink(tmp)
    ino = os.stat(path).st_ino

    def still_ours() -> bool:
        try:
            return os.stat(path).st_ino == ino
        except OSError:
            return False

    def reap() -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    sock.settimeout(1.0)
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle:
            try:
                conn, _ = sock.accept()
            except socket.timeout:
                reap()
                if not still_ours():
                    return
                continue
            fds: list[int] = []
            try:
                uid = _peer_uid(conn)
                if uid is not None and uid != os.getuid():
                    conn.sendall((json.dumps({"error": f"refused: this server serves uid {os.getuid()} only"})
                                  + "\n").encode())
                    continue
                last = time.monotonic()
                conn.settimeout(5)
                req, fds = _recv_request(conn)
                if req.get("op") == "learn":  # what a command imported that this server had not: import it now
                    import importlib

                    for name in req.get("modules", []):
                        try:
                            importlib.import_module(str(name))
                        except BaseException:  # noqa: BLE001 - a module that fails here fails in the command too
                            pass
                    seen.update({p: t for p, t in _watched().items() if p not in seen})
                    continue
                if req.get("key") != key:
                    conn.sendall((json.dumps({"error": "not this server: a different interpreter"}) + "\n").encode())
                    continue
                why = _why_not_fork(seen)
                if why:  # the caller runs the command itself, and starts a fresh server
                    conn.sendall((json.dumps({"error": "stale: " + why}) + "\n").encode())
                    return
                conn.settimeout(None)
                pid = os.fork()
                if pid == 0:
                    sock.close()
                    _become(conn, req, fds, path)
            except Exception as e:  # a bad request must not take the server down
                try:
                    conn.sendall((json.dumps({"error": str(e)}) + "\n").encode())
                except OSError:
                    pass
            finally:
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                conn.close()
            reap()
    finally:
        if still_ours():
            try:
                os.unlink(path)
            except OSError:
                pass
        sock.close()


if __name__ == "__main__":  # python -m meshrun._cliserver PATH
    serve(sys.argv[1])
