"""The command server itself: ``python -m meshrun._cliserver PATH``, started by ``_cliclient.start()``.

It imports what the served commands need, listens on ``PATH`` (in the private socket directory) and forks a
child per command that becomes the caller's command (``_cliclient`` describes the whole exchange).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Callable

from ._agent import Spare, current_rlimits, limits_out_of_reach, set_name
from ._cliclient import IDLE, SERVED, STREAMS, answers, frame, peer_cred, peer_uid, server_key, unframe

def _prewarm() -> None:
    """Import what the served commands need, and build what pydantic builds lazily; keep no state."""
    from . import _attempts, _cli, _gather, _options, _placement, _plan, _scheduler, _spec  # noqa: F401
    from . import _local  # noqa: F401
    from ._registry import _entry_points, backend_class

    for name in list(_entry_points()):
        try:
            cls = backend_class(name)
            cls.settings_model, cls.options_model  # noqa: B018 - models a backend builds on first use
        except Exception:  # a broken plugin: the command reports it, as it would without a server
            pass
    for cmd in SERVED:
        _cli.build_parser(cmd)  # kept: a pure function of the code, which the stale check watches
    _cli.build_parser("run").parse_args(["run", "--", "true"])  # argparse's patterns, compiled and cached
    _spec.JobSpec(command=["true"])
    _local._agent_digest()  # the agent file's hash, likewise (names the fork server's socket)
    from ._agent import _libc

    _libc()  # ctypes and the C library: what each spare uses to name itself and copy its memory


def _freeze() -> None:
    """Keep the collector out of what the server has loaded: a child's collection would otherwise visit (and so
    copy, page by page) every object it inherited, tens of milliseconds for a command that takes a few."""
    import gc

    gc.collect()
    gc.freeze()


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


def _recv_request(conn: socket.socket, nfds: int = len(STREAMS)) -> tuple[dict, list[int]]:
    """One :func:`frame` and the file descriptors that came with it. Raises ValueError for anything else."""
    import array

    fds: list[int] = []
    buf = b""
    size = array.array("i").itemsize
    while True:
        req, _ = unframe(buf)
        if req is not None:
            return req, fds
        chunk, anc, _flags, _addr = conn.recvmsg(1 << 20, socket.CMSG_SPACE(nfds * size))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(payload[: len(payload) - len(payload) % size])
                fds.extend(a)
        if not chunk:
            for fd in fds:
                os.close(fd)
            raise ValueError("the connection closed before the whole request came")
        buf += chunk


def _command_spare(path: str) -> Callable[[socket.socket, str], int]:
    """What a spare of this server does with its command (``_agent.Spare``): the request, and the caller's
    connection and streams as file descriptors; it becomes that command and never returns."""

    def become(there: socket.socket, name: str) -> int:
        try:
            req, fds = _recv_request(there, 1 + len(STREAMS))
        except (OSError, ValueError):
            return 0  # the server replaced or ended us
        if not fds:
            return 0
        set_name(name)
        conn = socket.socket(fileno=fds[0])
        global _to_server
        _to_server = there  # held to the end: its close tells the server this command is done
        _become(conn, req, fds[1:], path)  # never returns
        return 1

    return become


SPARE_NAME = "meshrun-spare"
_to_server: socket.socket | None = None  # in a spare that took a command: its pair, closed only by its exit


def _learn(path: str, before: set[str]) -> None:
    """Tell the server which modules this command imported that it had not (it imports them for the next)."""
    new = sorted(m for m in set(sys.modules) - before if m != "__main__" and not m.startswith("_frozen"))
    if not new:
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2.0)
        s.connect(path)
        if peer_uid(s) in (None, os.getuid()):
            s.sendall(frame({"op": "learn", "modules": new[:1000]}))
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
    _reply(conn, msg)
    return 0


def _reply(conn: socket.socket, msg: dict) -> None:
    """The command's last word to its caller, after everything it printed."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    try:
        conn.sendall(frame(msg))
    except OSError:
        pass


def _become(conn: socket.socket, req: dict, fds: list[int], path: str) -> None:
    """In the forked child: take on the caller's streams, directory, environment and umask, run the command,
    send its exit code and end. Never returns."""
    import io
    import signal

    rc = 1
    before = set(sys.modules)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        streams = [int(n) for n in req.get("streams", [])]
        null = os.open(os.devnull, os.O_RDWR)
        for n in STREAMS:
            src = fds[streams.index(n)] if n in streams and streams.index(n) < len(fds) else null
            os.dup2(src, n)
        for fd in set(fds) | {null}:
            if fd not in STREAMS:
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
        from ._agent import _take_on_limits

        notes = _take_on_limits(None, req.get("rlimits"))  # the caller's resource limits, as if it ran there
        if notes:  # one this process cannot take on (a hard limit above the server's): the caller runs it
            conn.sendall(frame({"error": "refused: " + notes[0]}))
            return
        conn.sendall(frame({"pid": os.getpid()}))
        if req.get("api") == "run":
            rc = _api_child(conn, req)
            return
        argv = [str(a) for a in req["argv"]]
        sys.argv = [sys.argv[0]] + argv

        _on_hang_up(conn)
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
        signal.signal(signal.SIGIO, signal.SIG_IGN)  # done: the caller may go as soon as it has the exit code
        _reply(conn, {"exit": rc})
    finally:
        try:
            conn.close()
            _learn(path, before)
        except BaseException:  # noqa: BLE001 - the command is done; nothing here may change its exit code
            pass
        os._exit(rc if isinstance(rc, int) and 0 <= rc < 256 else 1)


def _on_hang_up(conn: socket.socket) -> None:
    """When the caller goes away (its end of ``conn`` closes; it sends nothing after its request), end as a
    command whose terminal hung up: SIGHUP. The kernel says so with SIGIO (``O_ASYNC``), no thread needed."""
    import fcntl
    import select
    import signal

    def hung_up(_sig: int, _frame: object) -> None:
        os.kill(os.getpid(), signal.SIGHUP)

    signal.signal(signal.SIGIO, hung_up)
    fd = conn.fileno()
    fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
    if select.select([fd], [], [], 0)[0]:  # it went away before the kernel was asked to tell
        os.kill(os.getpid(), signal.SIGHUP)


def serve(path: str, idle: float = IDLE) -> None:
    """Listen at ``path`` (in the private socket directory) and fork a child per command until idle."""
    import time

    key = server_key()
    _prewarm()
    _freeze()
    seen = _watched()
    os.setsid() if os.getsid(0) != os.getpid() else None
    os.chdir("/")
    from ._agent import listen_aside, reap_children, same_inode

    sock, tmp = listen_aside(path)
    if os.path.lexists(path) and not answers(path):  # a killed server's socket (our private directory)
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
        return same_inode(path, ino)

    import select

    spare: Spare | None = None
    busy: Spare | None = None  # the spare running the last command handed over, until it ends
    want_spare = time.monotonic()  # when to fork the next spare: once a command is done, not while it runs
    last = time.monotonic()
    sock.settimeout(1.0)  # accept() after select(): never blocks on a caller that went away in between
    try:
        while time.monotonic() - last < idle:
            if busy is not None and (time.monotonic() >= want_spare or select.select([busy.sock], [], [], 0)[0]):
                busy.close()  # done (or running long: the next spare need not wait for it)
                busy, want_spare = None, time.monotonic() + SPARE_AFTER_DONE
            if spare is not None and spare.gone:  # killed while it waited: fork another
                spare.close()
                spare = None
            if spare is None and time.monotonic() >= want_spare:
                spare = Spare((sock,), _command_spare(path), SPARE_NAME)
            wait = 1.0 if spare is not None else max(0.01, want_spare - time.monotonic())
            readable = select.select([sock] + ([busy.sock] if busy is not None else []), [], [], wait)[0]
            if sock not in readable:
                if not readable:
                    reap_children()
                    if not still_ours():
                        return
                continue  # (or the busy spare is done: the next turn forks a spare)
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, socket.timeout):
                continue
            fds: list[int] = []
            try:
                cred = peer_cred(conn)
                uid = None if cred is None else cred[1]
                if uid is not None and uid != os.getuid():
                    conn.sendall(frame({"error": f"refused: this server serves uid {os.getuid()} only"}))
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
                    _freeze()
                    if spare is not None:  # forked before these imports: the next one has them
                        spare.close()
                        spare = None
                    continue
                if req.get("key") != key:
                    conn.sendall(frame({"error": "not this server: a different interpreter"}))
                    continue
                try:  # the caller's resource limits, read from the kernel: the command takes them on
                    req["rlimits"] = current_rlimits(cred[0]) if cred is not None else None
                except OSError as e:  # e.g. a caller in another PID namespace: it runs the command itself
                    conn.sendall(frame({"error": f"refused: cannot read the caller's resource limits ({e})"}))
                    continue
                why = _why_not_fork(seen) or limits_out_of_reach(req.get("rlimits"))
                if why:  # the caller runs the command itself, and starts a fresh server
                    conn.sendall(frame({"error": "stale: " + why}))
                    return
                conn.settimeout(None)
                taken = False
                if spare is not None and spare.is_ready():
                    if busy is not None:
                        busy.close()
                    taken = spare.hand(frame(req), [conn.fileno()] + fds)
                    busy, spare = (spare if taken else None), None  # a spare that took it: done when it ends
                    want_spare = time.monotonic() + SPARE_AFTER
                if not taken:
                    pid = os.fork()
                    if pid == 0:
                        sock.close()
                        _become(conn, req, fds, path)
            except Exception as e:  # a bad request must not take the server down
                try:
                    conn.sendall(frame({"error": str(e)}))
                except OSError:
                    pass
            finally:
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                conn.close()
            reap_children()
    finally:
        for s in (spare, busy):
            if s is not None:
                s.close()
        if still_ours():
            try:
                os.unlink(path)
            except OSError:
                pass
        sock.close()


SPARE_AFTER = 0.5  # seconds after handing a command over before the next spare is forked, if it is not done by then
SPARE_AFTER_DONE = 0.02  # seconds after a command is done before the next spare is forked (its caller exits then)


if __name__ == "__main__":  # python -m meshrun._cliserver PATH
    serve(sys.argv[1])
