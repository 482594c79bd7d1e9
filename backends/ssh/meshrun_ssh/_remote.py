"""The SSH backend's remote helper: uploaded next to the host agent (``_agent.py``) and run by the host's
own Python (3.8 or newer, standard library only).

    python3 _remote.py serve ROOT [CLOUDPICKLE_VERSION]   answer requests on stdin/stdout until EOF
    python3 _remote.py once ROOT [CLOUDPICKLE_VERSION]    answer one request, then exit

Frames, both ways: one line of JSON, then ``n`` bytes of binary data when the JSON has ``"n": N``.
The first frame the helper writes is ``hello`` (versions, host, user, home). Every request names an
``op``; every answer has ``ok`` (and ``error`` when false).

Jobs are started exactly as ``_agent.py submit`` starts them (the agent's ``run`` in its own session,
detached from the SSH connection), but forked from this already-warm interpreter, so a job starts in
milliseconds and outlives the connection. The agent's own ``.started`` guard makes a repeated submit of
the same job directory a no-op, so a submit retried after a dropped connection never starts it twice.
"""

import json
import os
import socket
import sys
import time

if "_agent" not in sys.modules:  # run directly, not through the verifying bootstrap (which loads it first)
    HERE = os.path.dirname(os.path.abspath(__file__))
    if HERE not in sys.path:
        sys.path.insert(0, HERE)

from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:  # the type checker reads the agent where it lives in the meshrun package
    from meshrun import _agent
else:
    import _agent  # noqa: E402  (the host agent, verified by hash and loaded by the bootstrap)

MANIFEST = ".meshrun-sync.json"
READ_MAX = 1 << 20
RECORD_MAX = 1 << 20  # a job record (launch.json, state.json) of another job is never larger
IDLE_WARM_UP = 0.05  # seconds without a request before the helper warms its imports


# --------------------------------------------------------------------------------------------------
# framing


class Channel:
    def __init__(self, rfd=0, wfd=1):
        self.rfd = rfd
        self.wfd = wfd
        self.buf = bytearray()
        self.eof = False

    def _fill(self):
        chunk = os.read(self.rfd, 1 << 16)
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def pending(self, wait=0.0):
        """True when a request has (started to) come in within ``wait`` seconds."""
        if self.buf or self.eof:
            return True
        import select

        return bool(select.select([self.rfd], [], [], wait)[0])

    def read(self):
        while b"\n" not in self.buf:
            if not self._fill():
                return None, b""
        i = self.buf.index(b"\n")
        head = json.loads(bytes(self.buf[:i]).decode("utf-8", "surrogateescape"))
        del self.buf[: i + 1]
        n = int(head.get("n") or 0)
        while len(self.buf) < n:
            if not self._fill():
                return None, b""
        blob = bytes(self.buf[:n])
        del self.buf[:n]
        return head, blob

    def write(self, head, blob=b""):
        head = dict(head)
        head["n"] = len(blob)
        data = json.dumps(head).encode() + b"\n" + blob
        view = memoryview(data)
        while view:
            view = view[os.write(self.wfd, view):]


# --------------------------------------------------------------------------------------------------
# paths


def expand(path):
    return os.path.abspath(os.path.expanduser(path))


def check_rel(rel):
    if not rel or "\x00" in rel or rel.startswith("/") or any(p in ("..", "") for p in rel.split("/")):
        raise ValueError("unsafe relative path %r" % (rel,))
    return rel


def inside(base, rel):
    """``base/rel``, refusing anything that would land outside ``base`` (.., absolute, symlinks)."""
    check_rel(rel)
    full = os.path.join(base, rel)
    real_base = os.path.realpath(base)
    real_parent = os.path.realpath(os.path.dirname(full))
    if real_parent != real_base and not real_parent.startswith(real_base + os.sep):
        raise ValueError("path %r leaves %s" % (rel, base))
    return full


def write_file(path, data, mode=0o600, mtime_ns=None):
    tmp = "%s.mrtmp.%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.chmod(tmp, mode & 0o7777)
    if mtime_ns is not None:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
    if os.path.isdir(path) and not os.path.islink(path):
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)


def makedirs(path, mode=0o700):
    if not os.path.isdir(path):
        os.makedirs(path, mode=mode, exist_ok=True)


# --------------------------------------------------------------------------------------------------
# operations


def op_hello(root, want_cp):
    py = "%d.%d" % sys.version_info[:2]
    cp, cp_error = cloudpickle_version()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = None
    return {
        "op": "hello",
        "ok": True,
        "agent_version": _agent.AGENT_VERSION,
        "python": py,
        "executable": sys.executable,
        "cloudpickle": cp,
        "cloudpickle_error": cp_error,
        "host": socket.gethostname(),
        "user": _agent.user_name(),
        "uid": os.getuid(),
        "home": os.path.expanduser("~"),
        "root": expand(root),
        "cpus": os.cpu_count(),
        "memory": mem,
        "pid": os.getpid(),
        "lease_dir": _agent.lease_dir(),
    }


def cloudpickle_version():
    """(version, error) of the cloudpickle this interpreter would import, read from its source without
    importing it (that import is the slowest part of a start; warm_up() does it when idle)."""
    mod = sys.modules.get("cloudpickle")
    if mod is not None:
        return getattr(mod, "__version__", None), None
    try:
        import importlib.util
        import re

        spec = importlib.util.find_spec("cloudpickle")
        if spec is None or not spec.origin:
            return None, "ModuleNotFoundError: No module named 'cloudpickle'"
        with open(spec.origin, encoding="utf-8") as f:
            m = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", f.read(), re.M)
        if m:
            return m.group(1), None
        import cloudpickle

        return cloudpickle.__version__, None
    except Exception as e:  # missing, or broken
        return None, "%s: %s" % (type(e).__name__, e)


def warm_up():
    """Import what supervisors and function jobs need, so the jobs forked from here start ready."""
    try:
        import pickle  # noqa: F401
        import traceback  # noqa: F401
        import types  # noqa: F401

        import cloudpickle  # noqa: F401
    except Exception:
        pass
    if hasattr(_agent, "_libc"):
        _agent._libc()


def op_status(req):
    return {"ok": True, "status": dict((d, _agent.job_status(expand(d))) for d in req["dirs"])}


class Unreadable(Exception):
    """A record that is not read: not a regular file, not its expected owner's, too large, not JSON."""


def read_json_checked(path, max_bytes=RECORD_MAX, owner=None):
    """The JSON object in ``path``, read the way a file named by someone else's data must be: opened with
    O_NOFOLLOW|O_NONBLOCK (a symbolic link, say to /dev/zero, is refused; a FIFO cannot block the open), then
    fstat: a regular file, owned by ``owner`` (a uid; default: this user), at most ``max_bytes`` long. Raises
    Unreadable (or OSError) saying why not."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if os.path.islink(path):
            raise Unreadable("%s is a symbolic link" % path)
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unreadable("%s is not a regular file (mode %o)" % (path, st.st_mode))
        want = os.getuid() if owner is None else int(owner)
        if st.st_uid != want:
            raise Unreadable("%s belongs to uid %d, not uid %d" % (path, st.st_uid, want))
        if st.st_size > max_bytes:
            raise Unreadable("%s is %d bytes, more than %d" % (path, st.st_size, max_bytes))
        data = os.read(fd, max_bytes + 1)
        if len(data) > max_bytes:
            raise Unreadable("%s grew past %d bytes" % (path, max_bytes))
    finally:
        os.close(fd)
    try:
        obj = json.loads(data.decode("utf-8"))
    except ValueError as e:
        raise Unreadable("%s is not JSON: %s" % (path, e))
    if not isinstance(obj, dict):
        raise Unreadable("%s does not hold a JSON object" % path)
    return obj


def _lease_ends(snap):
    """When each leased GPU is expected back: started_at + time_limit of jobs whose records we may read.
    The job folder is named by the lease table, which any user can write: its records are read only when
    they are regular files of the lease's owner and small (else the GPU's end is unknown, and why is
    returned in the second dict)."""
    ends, skipped = {}, {}
    for idx, lease in (snap.get("leases") or {}).items():
        if not isinstance(lease, dict):
            continue
        job_dir = lease.get("job_dir")
        if not isinstance(job_dir, str) or not job_dir.startswith("/"):
            continue
        try:
            owner = os.getuid() if lease.get("uid") is None else int(lease["uid"])
        except (TypeError, ValueError):
            skipped[idx] = "the lease names no valid owner (uid %r)" % (lease.get("uid"),)
            continue
        recs, why = [], []
        for name in (_agent.LAUNCH, _agent.STATE):
            try:
                recs.append(read_json_checked(os.path.join(job_dir, name), owner=owner))
            except (FileNotFoundError, PermissionError):
                recs.append(None)  # no record, or another user's private folder: the end is unknown
            except Unreadable as e:
                why.append(str(e))
            except OSError as e:
                why.append("%s: %s" % (os.path.join(job_dir, name), e.strerror or e))
        if why:
            skipped[idx] = "; ".join(why)
            continue
        launch, state = recs[0] or {}, recs[1] or {}
        try:
            limit = launch.get("time_limit")
            started = state.get("started_at") or lease.get("since")
            if limit and started:
                ends[idx] = float(started) + float(limit)
        except (TypeError, ValueError) as e:
            skipped[idx] = "%s: %s" % (type(e).__name__, e)
    return ends, skipped


def op_probe(req):
    snap = _agent.snapshot()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    snap["lease_ends"], snap["lease_ends_skipped"] = _lease_ends(snap)
    snap["load"] = load
    snap["cpus"] = os.cpu_count()
    return {"ok": True, "snapshot": snap}


def spawn(job_dir):
    """Start ``_agent.py run JOB_DIR`` forked from this interpreter, in its own session, detached from us
    (double fork: the supervisor is never our child). Returns its pid."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - in the forked child
        code = 70
        try:
            os.close(r)
            os.setsid()
            grand = os.fork()
            if grand:
                os.write(w, str(grand).encode())
                os._exit(0)
            os.close(w)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)  # let go of the SSH channel at once
            os.close(null)
            os.chdir("/")
            code = _agent.main(["run", job_dir])
        except BaseException:
            pass
        os._exit(code)
    os.close(w)
    data = _agent.read_to_end(r)
    os.close(r)
    os.waitpid(child, 0)
    return int(data) if data.strip() else None


def op_submit(req, blob):
    job_dir = expand(req["job_dir"])
    makedirs(job_dir)
    os.chmod(job_dir, 0o700)
    pos = 0
    for name, size in req["files"]:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError("bad staged file name %r" % (name,))
        data = blob[pos:pos + size]
        pos += size
        write_file(os.path.join(job_dir, name), data, 0o600)
    pid = None
    if req.get("start", True):
        pid = spawn(job_dir)
    return {"ok": True, "pid": pid, "job_dir": job_dir}


def op_sync(req, blob):
    """Mirror a local tree into ``dest``. ``entries`` is the whole local manifest [[path, size, mtime_ns,
    mode]]; phase "diff" answers which paths differ; phase "apply" writes the ``files`` carried in the blob
    and deletes paths this mirror synced before that are no longer in the manifest."""
    dest = expand(req["dest"])
    makedirs(dest)
    entries = req["entries"]
    if req["phase"] == "diff":
        need = []
        for path, size, mtime_ns, mode in entries:
            full = inside(dest, path)
            try:
                st = os.lstat(full)
            except OSError:
                need.append(path)
                continue
            if st.st_size != size or st.st_mtime_ns != mtime_ns or not os.path.isfile(full) \
                    or os.path.islink(full) or (st.st_mode & 0o777) != (mode & 0o777):
                need.append(path)
        old = _agent.read_json(os.path.join(dest, MANIFEST)) or {}
        same = set(old.get("paths") or []) == set(e[0] for e in entries)
        return {"ok": True, "need": need, "dest": dest, "clean": same and not need}
    pos = 0
    for path, size, mtime_ns, mode in req["files"]:
        full = inside(dest, path)
        parent = os.path.dirname(full)
        if not os.path.isdir(parent):
            if os.path.lexists(parent):
                os.unlink(parent)  # a file where the tree now has a directory
            makedirs(parent, 0o755)
            full = inside(dest, path)
        write_file(full, blob[pos:pos + size], mode, mtime_ns)
        pos += size
    old = _agent.read_json(os.path.join(dest, MANIFEST)) or {}
    now = set(e[0] for e in entries)
    removed = 0
    for path in old.get("paths", []):
        if path in now:
            continue
        try:
            full = inside(dest, path)
            if os.path.isfile(full) or os.path.islink(full):
                os.unlink(full)
                removed += 1
        except (OSError, ValueError):
            pass
    _agent.write_json(os.path.join(dest, MANIFEST), {"paths": sorted(now), "time": time.time()}, mode=0o600)
    return {"ok": True, "dest": dest, "written": len(req["files"]), "removed": removed}


def op_read(req):
    path = expand(req["path"])
    offset = int(req.get("offset") or 0)
    done_file = req.get("done_file")
    done = bool(done_file) and os.path.exists(expand(done_file))  # checked before reading: no lost tail
    data = b""
    size = None
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(offset)
            data = f.read(min(int(req.get("max") or READ_MAX), READ_MAX * 8))
    except FileNotFoundError:
        pass
    return {"ok": True, "size": size, "done": done, "exists": size is not None}, data


def op_fetch(req):
    job_dir = expand(req["dir"])
    sizes = []
    parts = []
    limits = req.get("limits") or {}
    for name in req["names"]:
        if "/" in name:
            raise ValueError("bad file name %r" % (name,))
        try:
            if name in limits and os.path.getsize(os.path.join(job_dir, name)) > limits[name]:
                continue
            with open(os.path.join(job_dir, name), "rb") as f:
                data = f.read()
        except (FileNotFoundError, IsADirectoryError):
            continue
        sizes.append([name, len(data)])
        parts.append(data)
    return {"ok": True, "files": sizes}, b"".join(parts)


def op_exists(req):
    return {"ok": True, "exists": dict((p, os.path.exists(expand(p))) for p in req["paths"])}


def op_cancel(req):
    return {"ok": True, "record": _agent.cancel(expand(req["dir"]), grace=req.get("grace"))}


def handle(head, blob):
    op = head.get("op")
    if op == "ping":
        return {"ok": True, "time": time.time()}, b""
    if op == "status":
        return op_status(head), b""
    if op == "probe":
        return op_probe(head), b""
    if op == "submit":
        return op_submit(head, blob), b""
    if op == "sync":
        return op_sync(head, blob), b""
    if op == "read":
        return op_read(head)
    if op == "fetch":
        return op_fetch(head)
    if op == "exists":
        return op_exists(head), b""
    if op == "cancel":
        return op_cancel(head), b""
    return {"ok": False, "error": "unknown op %r" % (op,)}, b""


def serve(root, want_cp, once=False):
    chan = Channel()
    chan.write(op_hello(root, want_cp))
    warm = once
    while True:
        if not warm and not chan.pending(IDLE_WARM_UP):
            warm_up()  # the client's burst of requests is over: use the quiet moment
            warm = True
        try:
            head, blob = chan.read()
        except ValueError as e:
            chan.write({"ok": False, "error": "bad frame: %s" % e})
            return 2
        if head is None:
            return 0
        try:
            rep, data = handle(head, blob)
        except Exception as e:
            rep, data = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}, b""
        rep["id"] = head.get("id")
        chan.write(rep, data)
        if once:
            return 0


def use_cloudpickle(root, want):
    """Put the cloudpickle copy uploaded for this client's version (if any) first on sys.path; function
    jobs forked from here inherit it. The client uploads one when the host's own differs or is missing."""
    if not want:
        return
    vendored = os.path.join(expand(root), "lib", "cloudpickle-%s" % want)
    if os.path.isdir(os.path.join(vendored, "cloudpickle")):
        sys.path.insert(0, vendored)


def main(argv):
    if len(argv) < 2 or argv[0] not in ("serve", "once"):
        sys.stderr.write("usage: _remote.py serve|once ROOT [CLOUDPICKLE_VERSION]\n")
        return 2
    root = argv[1]
    want_cp = argv[2] if len(argv) > 2 else None
    try:
        os.chdir(os.path.expanduser("~"))
    except OSError:
        pass
    use_cloudpickle(root, want_cp)
    return serve(root, want_cp, once=argv[0] == "once")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
