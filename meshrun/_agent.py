"""The meshrun host agent: everything that happens on the machine a job runs on.

Standard library only, and one self-contained file on purpose: the local backend imports it, and the
SSH backend uploads this very file to a remote host and runs it there with whatever ``python3`` the
host has (3.8 or newer).

What it does:

* GPU inventory (``nvidia-smi``, or ``MESHRUN_GPUS`` declared by an admin or a test);
* GPU leases in a machine-wide directory (``MESHRUN_LEASE_DIR``), shared by every OS user of the host,
  guarded by ``flock``; a lease belongs to a job's process session and is reclaimed when no process of
  that session is left; GPUs busy with processes meshrun did not start are never handed out;
* a queue for jobs that ask for more GPUs than are free, served by fair share across OS users (the user
  with the least recent GPU use goes first, first come first served within one user);
* the job supervisor (``run``): starts the job with ``CUDA_VISIBLE_DEVICES`` set to its leased GPUs, in a
  cgroup of its own where one can be had (else it tracks the job's processes itself, as a subreaper), enforces
  the time limit, ends every process the job started on cancel, timeout or end, and only then releases the
  GPUs and writes the job's exit record;
* a small fork server (``serve``) that keeps a warm interpreter around so a job starts in milliseconds
  instead of paying for a fresh Python start-up;
* a JSON command line (``python3 _agent.py gpus|submit|status|cancel|version``) for remote callers.

The contract with the core is the job directory: the core writes ``launch.json`` (and ``payload.pkl`` for
function jobs); the agent writes ``state.json``, ``exit.json``, ``output.log`` and, for function jobs,
``result.pkl`` or ``error.json``/``error.pkl``.
"""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

AGENT_VERSION = "3"  # 2: the GPU queue served by fair share across users; 3: by recent GPU use

# Fair share counts each user's GPU-seconds: leases that ended (decaying with this half-life) plus the time
# the leases held now have run. One constant for every agent of a machine, so that all waiters agree.
FAIR_HALF_LIFE = 3600.0

# Files of a job directory (the contract between the core and the agent).
LAUNCH = "launch.json"
STATE = "state.json"
EXIT = "exit.json"
LOG = "output.log"
PAYLOAD = "payload.pkl"
RESULT = "result.pkl"
ERROR_JSON = "error.json"
ERROR_PKL = "error.pkl"
CANCEL = "cancel.json"

DEFAULT_LEASE_DIR = "/var/tmp/meshrun-leases"


def rank_name(name, rank):
    """The per-node name of a record file: node 0 uses the plain name, node R ``stem.rankR.ext``."""
    if not rank:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot:
        return "%s.rank%d" % (name, rank)
    return "%s.rank%d.%s" % (stem, rank, ext)
SPAWN_GRACE = 30.0  # seconds a job dir may go without a state file before it counts as lost


# --------------------------------------------------------------------------------------------------
# small helpers


def now():
    return time.time()


def atomic_write(path, data, mode=0o644):
    """Write bytes to ``path`` so that readers see the old or the new content, never a torn file."""
    tmp = "%s.tmp.%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:  # no fsync: records must survive killed processes, which the page cache does
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # umask must not narrow a machine-wide file
    os.replace(tmp, path)


def write_json(path, obj, mode=0o644):
    atomic_write(path, (json.dumps(obj, sort_keys=True) + "\n").encode(), mode)


def read_json(path, default=None):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode())
    except (OSError, ValueError):
        return default


def user_name():
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except Exception:  # pragma: no cover - no passwd entry (containers)
        return os.environ.get("USER") or str(os.getuid())


_LIBC = []


def _libc():
    if not _LIBC:
        try:
            import ctypes

            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except Exception:  # pragma: no cover
            _LIBC.append(None)
    return _LIBC[0]


def prctl(option, value):
    libc = _libc()
    if libc is None or not sys.platform.startswith("linux"):
        return False
    return libc.prctl(option, value, 0, 0, 0) == 0


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


# --------------------------------------------------------------------------------------------------
# processes


def _proc_stat(pid):
    """(state, ppid, pgid, sid, starttime) of a process from /proc, or None if it does not exist."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            raw = f.read().decode(errors="replace")
    except (OSError, ValueError):
        return None
    # the command name is in parentheses and may itself contain spaces and parentheses
    rest = raw[raw.rfind(")") + 2 :].split()
    try:
        return rest[0], int(rest[1]), int(rest[2]), int(rest[3]), int(rest[19])
    except (IndexError, ValueError):
        return None


HAVE_PROC = os.path.isdir("/proc/self")


def _dead(pid, state):
    """True for a process that has ended: a zombie whose threads have all ended too (the main thread of a
    multi-threaded process, e.g. one with a CUDA context, is a zombie while its other threads still exit)."""
    if state not in ("Z", "X"):
        return False
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return True
    for tid in tids:
        if tid == str(pid):
            continue
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid), "rb") as f:
                raw = f.read().decode(errors="replace")
        except OSError:
            continue
        if raw[raw.rfind(")") + 2 :][:1] not in ("Z", "X"):
            return False
    return True


def proc_start(pid):
    """Start time of a live (non-zombie) process, used to tell a process from a later one with its pid."""
    if not pid:
        return None
    if HAVE_PROC:
        st = _proc_stat(pid)
        if st is None or _dead(pid, st[0]):
            return None
        return st[4]
    try:  # pragma: no cover - no /proc (macOS): no start time, liveness only
        os.kill(pid, 0)
    except OSError as e:
        if e.errno == errno.EPERM:
            return 0
        return None
    return 0


def pid_alive(pid, start=None):
    s = proc_start(pid)
    if s is None:
        return False
    return start is None or s == start


def session_members(sid):
    """Live (non-zombie) processes whose session id is ``sid``."""
    if not sid or not HAVE_PROC:
        return [sid] if sid and pid_alive(sid) else []
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _proc_stat(int(name))
        if st is not None and st[3] == sid and not _dead(int(name), st[0]):
            out.append(int(name))
    return out


def proc_session(pid):
    st = _proc_stat(pid) if HAVE_PROC else None
    return st[3] if st else None


def kill_session(sid, sig, exclude=()):
    """Send ``sig`` to every live process of session ``sid`` (also those that left its process group)."""
    hit = []
    for pid in session_members(sid):
        if pid in exclude:
            continue
        try:
            os.kill(pid, sig)
            hit.append(pid)
        except OSError:
            pass
    return hit


def boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


# --------------------------------------------------------------------------------------------------
# GPUs


def _run(argv, timeout=15):
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)
    if p.returncode != 0:
        return None, (p.stderr or p.stdout).decode(errors="replace").strip() or "exit %d" % p.returncode
    return p.stdout.decode(errors="replace"), None


def _csv_rows(text):
    rows = []
    for line in text.splitlines():
        if line.strip():
            rows.append([c.strip() for c in line.split(",")])
    return rows


def nvidia_smi_gpus():
    """GPUs as nvidia-smi reports them: (list of dicts, error or None)."""
    out, err = _run(
        ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"]
    )
    if out is None:
        return [], err
    gpus = []
    for row in _csv_rows(out):
        if len(row) < 4:
            continue
        try:
            mem = int(float(row[3])) * 1024 * 1024
        except ValueError:
            mem = None
        gpus.append({"index": int(row[0]), "uuid": row[1], "name": row[2], "memory": mem})
    return gpus, None


def nvidia_smi_processes():
    """Compute processes on the GPUs: (list of {pid, gpu_uuid, used_memory, process_name}, error)."""
    out, err = _run(
        [
            "nvidia-smi",
            "--query-compute-apps=pid,gpu_uuid,used_memory,process_name",
            "--format=csv,noheader,nounits",
        ]
    )
    if out is None:
        return [], err
    procs = []
    for row in _csv_rows(out):
        if len(row) < 2 or not row[0].isdigit():
            continue
        procs.append(
            {
                "pid": int(row[0]),
                "gpu_uuid": row[1],
                "used_memory": row[2] if len(row) > 2 else "",
                "process_name": ",".join(row[3:]) if len(row) > 3 else "",
            }
        )
    return procs, None


def parse_declared(value):
    """``MESHRUN_GPUS``: "0,1,2,3", "0-3", "none" or "" (no GPUs)."""
    value = value.strip()
    if value.lower() in ("", "none"):
        return []
    idx = []
    for part in value.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            idx.extend(range(int(a), int(b) + 1))
        elif part:
            idx.append(int(part))
    if len(set(idx)) != len(idx) or any(i < 0 for i in idx):
        raise ValueError("MESHRUN_GPUS must list distinct GPU indices, e.g. '0,1,2,3' or '0-3'")
    return idx


def discover_gpus(env=None):
    """The GPUs meshrun may hand out here: (gpus, source, error).

    ``MESHRUN_GPUS`` restricts discovery to those indices (taking their details from nvidia-smi when it
    answers) or declares them outright on a machine without nvidia-smi.
    """
    env = os.environ if env is None else env
    declared = env.get("MESHRUN_GPUS")
    smi, err = nvidia_smi_gpus()
    if declared is None:
        return smi, "nvidia-smi", err
    wanted = parse_declared(declared)
    by_index = {g["index"]: g for g in smi}
    gpus = []
    for i in wanted:
        if i in by_index:
            gpus.append(by_index[i])
        else:
            gpus.append({"index": i, "uuid": "GPU-declared-%d" % i, "name": "declared", "memory": None})
    return gpus, "MESHRUN_GPUS", None


def _real_gpus(gpus):
    """True when at least one GPU came from nvidia-smi (declared-only GPUs have no processes to ask about)."""
    return any(g.get("name") != "declared" for g in gpus)


def gpu_matches(gpu, gpu_type):
    if not gpu_type:
        return True
    norm = lambda s: "".join(ch for ch in s.lower() if ch.isalnum())  # noqa: E731
    return norm(gpu_type) in norm(gpu.get("name") or "")


# --------------------------------------------------------------------------------------------------
# leases


class LeaseError(Exception):
    pass


def lease_dir(env=None):
    env = os.environ if env is None else env
    return env.get("MESHRUN_LEASE_DIR") or DEFAULT_LEASE_DIR


class Leases:
    """The machine-wide lease table: which session holds which GPU, and who waits in line.

    One JSON file, ``leases.json``, rewritten atomically under an exclusive ``flock`` on ``lock``. The
    directory is world-writable (not sticky) so that any user's job can reclaim a lease whose holder has
    died; this is a cooperative scheme for a shared workstation, not a security boundary.
    """

    def __init__(self, path=None):
        self.path = path or lease_dir()
        self._fd = None

    # -- locking
    def _ensure(self):
        if not os.path.isdir(self.path):
            try:
                os.makedirs(self.path, exist_ok=True)
            except OSError as e:
                raise LeaseError("cannot create lease directory %s: %s" % (self.path, e))
            try:
                os.chmod(self.path, 0o777)
            except OSError:
                pass
        lock = os.path.join(self.path, "lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise LeaseError(
                "cannot open %s: %s (the lease directory must be writable by every user of "
                "this machine; set MESHRUN_LEASE_DIR to use another)" % (lock, e)
            )
        try:
            if os.fstat(fd).st_uid == os.getuid():
                os.fchmod(fd, 0o666)
        except OSError:
            pass
        return fd

    def __enter__(self):
        import fcntl

        self._fd = self._ensure()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    # -- state (call only while locked)
    def load(self):
        state = read_json(os.path.join(self.path, "leases.json"))
        if not isinstance(state, dict) or state.get("boot_id") != boot_id():
            # first use, a corrupt file, or a reboot: nobody can hold anything any more
            state = {"boot_id": boot_id(), "gpus": {}, "queue": [], "seq": 0}
        state.setdefault("gpus", {})
        state.setdefault("queue", [])
        state.setdefault("seq", 0)
        state.setdefault("usage", {})
        return state

    def save(self, state):
        write_json(os.path.join(self.path, "leases.json"), state, mode=0o666)

    @staticmethod
    def holder_alive(rec):
        """A lease or ticket is live while its supervisor lives or any process of its session does."""
        if pid_alive(rec.get("pid"), rec.get("pid_start")):
            return True
        sid = rec.get("sid")
        return bool(sid) and bool(session_members(sid))

    def reclaim(self, state):
        """Drop leases and tickets whose processes are all gone; returns what was dropped."""
        dropped = []
        t = now()
        for key in list(state["gpus"]):
            if not self.holder_alive(state["gpus"][key]):
                rec = state["gpus"].pop(key)
                record_usage(state, rec, t)
                dropped.append(("gpu", key, rec))
        keep = []
        for t in state["queue"]:
            if pid_alive(t.get("pid"), t.get("pid_start")):
                keep.append(t)
            else:
                dropped.append(("ticket", t.get("ticket"), t))
        state["queue"] = keep
        return dropped


def foreign_busy(gpus, state, procs):
    """GPU uuids in use by processes that belong to no live meshrun lease."""
    leased_sids = set(r.get("sid") for r in state["gpus"].values() if r.get("sid"))
    busy = {}
    for p in procs:
        sid = proc_session(p["pid"])
        if sid is not None and sid in leased_sids:
            continue
        busy.setdefault(p["gpu_uuid"], []).append(p)
    return busy


def _owner(rec):
    """Whose GPUs these are, for fair share: the OS user (uid; the name for records that lack one)."""
    uid = rec.get("uid")
    return uid if uid is not None else rec.get("user")


def _decayed(gpu_s, at, t):
    return gpu_s * 0.5 ** (max(0.0, t - at) / FAIR_HALF_LIFE)


def _ran(rec, t):
    """Seconds a lease has been held at time ``t``."""
    since = rec.get("since")
    return max(0.0, t - float(since)) if since is not None else 0.0


def record_usage(state, rec, t):
    """Add an ended lease (one GPU, from its ``since`` to ``t``) to its user's recent use."""
    usage = state.setdefault("usage", {})
    key = str(_owner(rec))
    gpu_s, at = usage.get(key) or (0.0, t)
    usage[key] = [_decayed(gpu_s, at, t) + _ran(rec, t), t]
    for k in [k for k, (g, a) in usage.items() if _decayed(g, a, t) < 0.001]:
        del usage[k]  # forgotten (a day or two after a long run): keeps the file small


def usage_by_owner(state, t):
    """{owner (as a string): recent GPU-seconds}: ended leases, decayed, plus what the leases held now have
    run so far."""
    out = {}
    for key, (gpu_s, at) in (state.get("usage") or {}).items():
        out[key] = _decayed(gpu_s, at, t)
    for rec in state["gpus"].values():
        key = str(_owner(rec))
        out[key] = out.get(key, 0.0) + _ran(rec, t)
    return out


def held_by_owner(state):
    """{owner: number of GPUs leased to that OS user right now}."""
    held = {}
    for rec in state["gpus"].values():
        held[_owner(rec)] = held.get(_owner(rec), 0) + 1
    return held


def queue_policy(state):
    """How the queue is served now: "fair" when every waiting ticket was written by an agent that serves
    it by fair share, else "fifo" (ticket order). An older agent on the same machine (the SSH backend
    keeps one copy per agent version) serves by ticket order, and all waiters must agree on who is first,
    or two of them could each wait for the other."""
    return "fair" if all(t.get("order") == "fair-usage" for t in state["queue"]) else "fifo"


def serve_order(gpus, state, busy_uuids, t=None):
    """The order the queue is served in, and which tickets can start now: (order, grants, usage).

    Fair share across OS users: tickets are served by their user's recent GPU use (``usage_by_owner``:
    GPU-seconds of ended leases halving every FAIR_HALF_LIFE, plus the running time of the leases held
    now), least first, the earlier ticket on a tie; so one user's tickets keep their first-come-first-served
    order, and with one user waiting it is plain FCFS. The walk gives each ticket the GPUs it asks for while
    they last; the first ticket that cannot be served stops it (head of line: no one jumps it, so a large
    request is not starved by small ones). ``order`` lists every ticket: those granted, in grant order, then
    the rest. ``grants`` is {ticket: [gpu index, ...]} for tickets that can start now; ``usage`` is
    {owner: recent GPU-seconds}."""
    t = now() if t is None else t
    leased = set(state["gpus"])
    free = [
        g for g in sorted(gpus, key=lambda g: g["index"])
        if str(g["index"]) not in leased and g["uuid"] not in busy_uuids
    ]
    fair = queue_policy(state) == "fair"
    usage = usage_by_owner(state, t)

    def key(tk):
        return (usage.get(str(_owner(tk)), 0.0) if fair else 0.0, tk["ticket"])

    order, grants = [], {}
    waiting = sorted(state["queue"], key=key)
    for tk in waiting:
        fit = [g for g in free if gpu_matches(g, tk.get("gpu_type"))][: tk["gpus"]]
        if len(fit) < tk["gpus"]:
            break
        grants[tk["ticket"]] = [g["index"] for g in fit]
        taken = set(id(g) for g in fit)
        free = [g for g in free if id(g) not in taken]
    order = waiting
    return order, grants, usage


def snapshot(env=None, with_processes=True):
    """Everything ``meshrun gpus`` shows: inventory, leases, queue and foreign processes."""
    env = os.environ if env is None else env
    gpus, source, err = discover_gpus(env)
    procs, perr = nvidia_smi_processes() if (with_processes and _real_gpus(gpus)) else ([], None)
    leases = Leases(lease_dir(env))
    try:
        with leases:
            state = leases.load()
            if leases.reclaim(state):
                leases.save(state)
    except LeaseError as e:
        return {"gpus": gpus, "source": source, "error": str(e), "leases": {}, "queue": [], "foreign": {}}
    busy = foreign_busy(gpus, state, procs)
    # the queue in the order it is served, each ticket with its place and the GPUs its user holds now
    held = held_by_owner(state)
    order, _, usage = serve_order(gpus, state, set(busy))
    queue = [dict(t, position=i + 1, held=held.get(_owner(t), 0),
                  recent_gpu_hours=round(usage.get(str(_owner(t)), 0.0) / 3600.0, 4))
             for i, t in enumerate(order)]
    held_by_user = {}
    for rec in state["gpus"].values():
        name = str(rec.get("user") or rec.get("uid"))
        held_by_user[name] = held_by_user.get(name, 0) + 1
    return {
        "host": socket.gethostname(),
        "agent_version": AGENT_VERSION,
        "gpus": gpus,
        "source": source,
        "error": err,
        "process_error": perr,
        "leases": state["gpus"],
        "queue": queue,
        "queue_policy": queue_policy(state),
        "held_by_user": held_by_user,
        "foreign": busy,
        "lease_dir": leases.path,
        "time": now(),
    }


# --------------------------------------------------------------------------------------------------
# containment: which processes belong to a job, and how to end every one of them
#
# A job is everything it started. Where this process may create cgroups (cgroup v2, delegated to our uid
# or we are root), each job runs in a cgroup of its own: the kernel keeps every descendant in it, whatever
# session or process group it moves to, and ``cgroup.kill`` ends them all at once. Elsewhere the supervisor,
# a child subreaper, tracks the job's processes itself: its descendants (orphans are re-parented to it)
# plus any process whose environment carries the job's own marker (``MESHRUN_JOB_TOKEN``).

CONTAINMENT_ENV = "MESHRUN_CONTAINMENT"  # "auto" (the default), "cgroup" or "subreaper"
CONTAINMENT_MODES = ("auto", "cgroup", "subreaper")
TOKEN_ENV = "MESHRUN_JOB_TOKEN"


def _unescape_mountinfo(s):
    # mountinfo writes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and len(s[i + 1 : i + 4]) == 3 and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def cgroup2_mount():
    """(mount point, mounted root) of the cgroup v2 hierarchy (also in a hybrid layout), or None."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, sep, right = line.partition(" - ")
                if sep and right.split()[:1] == ["cgroup2"]:
                    fields = left.split()
                    return _unescape_mountinfo(fields[4]), _unescape_mountinfo(fields[3])
    except (OSError, IndexError):
        pass
    return None


def proc_cgroup(pid="self"):
    """A process's cgroup v2 path (the ``0::`` line of /proc/PID/cgroup), or None."""
    try:
        with open("/proc/%s/cgroup" % pid) as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n")
    except OSError:
        pass
    return None


def cgroup_dir(rel, mount=None):
    """The directory of cgroup ``rel`` under the v2 mount, or None when it is not visible there."""
    mount = mount or cgroup2_mount()
    if not mount or not rel or not rel.startswith("/") or rel.endswith(" (deleted)"):
        return None
    point, root = mount
    if root != "/":
        if rel == root:
            rel = "/"
        elif rel.startswith(root + "/"):
            rel = rel[len(root) :]
        else:
            return None
    return os.path.normpath(point + rel)


def delegated_cgroup():
    """The cgroup job cgroups can be made under: (directory, None), or (None, why there is none).

    That is this process's own cgroup v2 (the ``0::`` line of /proc/self/cgroup, under the v2 mount found
    in /proc/self/mountinfo) when our uid may write it and its ``cgroup.procs``: root, a delegated subtree
    (``systemd-run --user --scope -p Delegate=yes``, a container's own cgroup), or an admin's delegation."""
    if not HAVE_PROC:
        return None, "no /proc"
    mount = cgroup2_mount()
    if mount is None:
        return None, "no cgroup v2 hierarchy is mounted"
    rel = proc_cgroup()
    d = cgroup_dir(rel, mount)
    if d is None or not os.path.isdir(d):
        return None, "this process's cgroup %s is not visible under the cgroup v2 mount %s" % (rel, mount[0])
    if not (os.access(d, os.W_OK) and os.access(os.path.join(d, "cgroup.procs"), os.W_OK)):
        return None, "the cgroup %s is not delegated to uid %d (not writable)" % (d, os.getuid())
    return d, None


def cgroup_pids(path):
    """Every process in cgroup ``path`` and the cgroups below it."""
    out = []
    for d, subdirs, _ in os.walk(path):
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                out.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            pass
    return out


def cgroup_populated(path):
    """True while a live process is in the cgroup or below it (zombies do not count)."""
    try:
        with open(os.path.join(path, "cgroup.events")) as f:
            for line in f:
                if line.startswith("populated "):
                    return line.split()[1] != "0"
    except OSError:
        return bool(cgroup_pids(path)) if os.path.isdir(path) else False
    return False


def cgroup_kill(path):
    """SIGKILL every process of the cgroup (``cgroup.kill``; one by one on kernels before 5.14)."""
    try:
        fd = os.open(os.path.join(path, "cgroup.kill"), os.O_WRONLY)
        try:
            os.write(fd, b"1")
            return
        finally:
            os.close(fd)
    except OSError:
        pass
    for pid in cgroup_pids(path):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def cgroup_remove(path, timeout=2.0):
    """Remove an emptied cgroup and any the job made below it; True when it is gone."""
    end = time.time() + timeout
    while True:
        for d, _, _ in sorted(os.walk(path), key=lambda w: -len(w[0])):
            try:
                os.rmdir(d)
            except OSError:
                pass
        if not os.path.isdir(path) or time.time() > end:
            return not os.path.isdir(path)
        time.sleep(0.02)  # EBUSY while the last process's exit completes


def cgroup_enter(path):
    """Move the calling process into cgroup ``path``; True on success (runs in a just-forked child)."""
    try:
        fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
        return True
    except OSError:
        return False


def _proc_table():
    """{pid: (state, ppid)} for every process, from one pass over /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_stat(int(name))
            if st is not None:
                table[int(name)] = (st[0], st[1])
    return table


def descendants(root, table=None):
    """Live (non-zombie) descendants of ``root``, whatever session or process group they moved to."""
    if not HAVE_PROC or not root:
        return []
    table = _proc_table() if table is None else table
    kids = {}
    for pid, (state, ppid) in table.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], list(kids.get(root, ()))
    while todo:
        pid = todo.pop()
        if not _dead(pid, table[pid][0]):
            out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def marked_processes(token, uid=None):
    """Live processes of ``uid`` (default: ours) whose environment carries ``MESHRUN_JOB_TOKEN=token``."""
    if not token or not HAVE_PROC:
        return []
    uid = os.getuid() if uid is None else uid
    marker = ("\0%s=%s\0" % (TOKEN_ENV, token)).encode()
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            if os.stat("/proc/" + name).st_uid != uid:
                continue
            with open("/proc/%s/environ" % name, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if marker in b"\0" + data:
            st = _proc_stat(int(name))
            if st is not None and not _dead(int(name), st[0]):
                out.append(int(name))
    return out


def _has_children():
    """True if this process has a child, live or not yet reaped (nothing is reaped here)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return True
    except ChildProcessError:
        return False
    except (AttributeError, OSError):  # pragma: no cover - no waitid: assume there may be
        return True


def containment_mode(env=None):
    """The containment a job asks for through ``MESHRUN_CONTAINMENT``: auto, cgroup or subreaper."""
    env = os.environ if env is None else env
    mode = (env.get(CONTAINMENT_ENV) or "auto").strip().lower()
    if mode not in CONTAINMENT_MODES:
        raise ValueError("%s must be one of %s, not %r" % (CONTAINMENT_ENV, ", ".join(CONTAINMENT_MODES),
                                                            env.get(CONTAINMENT_ENV)))
    return mode


def containment_available(env=None):
    """Which containment a job started now would get: ("cgroup", directory) or ("subreaper", why not cgroup)."""
    try:
        mode = containment_mode(env)
    except ValueError as e:
        return "error", str(e)
    if mode == "subreaper":
        return "subreaper", "%s=subreaper" % CONTAINMENT_ENV
    d, why = delegated_cgroup()
    if d is None:
        return "subreaper", why
    return "cgroup", d


class Containment:
    """The set of processes that make up one job, and how to signal and end them.

    ``mode`` "cgroup": the job's own cgroup (``cgroup``). ``mode`` "subreaper": the live descendants of
    ``root`` (the supervisor, a child subreaper) plus the processes of ``uid`` whose environment carries
    ``token``. ``sid`` adds the processes of that session. Once the supervisor is gone (``from_record``),
    every one of these is searched whatever the mode was."""

    def __init__(self, mode, cgroup=None, token=None, root=None, sid=None, uid=None, thorough=False):
        self.mode = mode
        self.thorough = thorough
        self.cgroup = cgroup
        self.token = token
        self.root = root
        self.sid = sid
        self.uid = os.getuid() if uid is None else uid
        self.unkillable = set()  # processes we may not signal (another user's): not waited for
        self.seen = {}  # pid -> start time of every process found so far: followed until it has ended

    @classmethod
    def for_job(cls, env, name, root):
        """Set up containment for a job about to start (creates its cgroup when cgroups can be had).

        Raises ValueError for a bad ``MESHRUN_CONTAINMENT`` or when ``cgroup`` is demanded and impossible."""
        import binascii

        token = binascii.hexlify(os.urandom(16)).decode()
        mode = containment_mode(env)
        if mode != "subreaper":
            parent, why = delegated_cgroup()
            path = None
            if parent is not None:
                path = os.path.join(parent, name)
                try:
                    os.mkdir(path)
                except FileExistsError:
                    pass
                except OSError as e:
                    why, path = "cannot create the cgroup %s: %s" % (path, e.strerror or e), None
            if path is not None:
                return cls("cgroup", cgroup=path, token=token, root=root)
            if mode == "cgroup":
                raise ValueError("%s=cgroup, but no cgroup can be had here: %s" % (CONTAINMENT_ENV, why))
        return cls("subreaper", token=token, root=root)

    @classmethod
    def from_record(cls, rec, uid=None):
        """What is left of a job whose supervisor is gone, from its ``state.json``."""
        return cls(rec.get("containment") or "session", cgroup=rec.get("cgroup"), token=rec.get("token"),
                   sid=rec.get("sid"), uid=uid, thorough=True)

    def record(self):
        rec = {"containment": self.mode, "token": self.token}
        if self.cgroup:
            rec["cgroup"] = self.cgroup
        return rec

    def members(self):
        """Live processes of the job (never the supervisor itself).

        A process found once is followed until it has ended: one being killed drops out of the marker scan
        (its environment goes with its memory) before it is gone (a GPU driver may take a while to close
        its device files)."""
        pids = set()
        if self.cgroup and os.path.isdir(self.cgroup):
            pids.update(cgroup_pids(self.cgroup))
        if self.mode != "cgroup" or self.thorough:
            if self.root and (self.root != os.getpid() or _has_children()):
                pids.update(descendants(self.root))  # a subreaper without children has no descendants
            pids.update(marked_processes(self.token, self.uid))
        if self.sid:
            pids.update(session_members(self.sid))
        pids.discard(os.getpid())
        if self.root:
            pids.discard(self.root)
        for p in pids:
            if p not in self.seen:
                self.seen[p] = proc_start(p)
        return [p for p, start in self.seen.items() if start is not None and pid_alive(p, start)]

    def empty(self):
        if self.cgroup and os.path.isdir(self.cgroup) and cgroup_populated(self.cgroup):
            return False  # the kernel's own count: cheap and exact (a process still exiting counts)
        if self.mode == "cgroup" and not (self.sid or self.thorough):
            return True
        return not [p for p in self.members() if p not in self.unkillable]

    def signal(self, sig, skip=()):
        """Send ``sig`` to every process of the job (except ``skip``); returns the pids signalled."""
        hit = []
        for pid in self.members():
            if pid in skip:
                continue
            try:
                os.kill(pid, sig)
                hit.append(pid)
            except ProcessLookupError:
                pass
            except OSError:
                self.unkillable.add(pid)
        return hit

    def kill(self):
        if self.cgroup and os.path.isdir(self.cgroup):
            cgroup_kill(self.cgroup)
        if self.mode != "cgroup" or self.sid or self.thorough:
            self.signal(signal.SIGKILL)

    def remove(self):
        if self.cgroup and os.path.isdir(self.cgroup):
            return cgroup_remove(self.cgroup)
        return True


# --------------------------------------------------------------------------------------------------
# the job supervisor


class _Stop(Exception):
    """Raised from a signal handler: the job is to be stopped ("cancel" or "timeout")."""

    def __init__(self, how):
        self.how = how


class _Fail(Exception):
    """The job cannot run at all (unsatisfiable request, command not found)."""


def _log(msg):
    sys.stderr.write("[meshrun] %s\n" % msg)
    sys.stderr.flush()


def _redirect_output(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


class Supervisor:
    """Runs one job to the end: lease, start, wait, time limit, cancel, clean-up, exit record."""

    def __init__(self, job_dir, env=None):
        self.job_dir = os.path.abspath(job_dir)
        self.launch = read_json(os.path.join(self.job_dir, LAUNCH))
        if not isinstance(self.launch, dict):
            raise SystemExit("meshrun agent: no readable %s in %s" % (LAUNCH, self.job_dir))
        self.env = dict(os.environ if env is None else env)
        # multi-node: one supervisor per node, each with NODE_RANK in its environment; node 0 owns the
        # job's plain record files, node R writes state.rankR.json, exit.rankR.json, output.rankR.log ...
        self.rank = 0
        if int(self.launch.get("nodes") or 1) > 1:
            try:
                self.rank = int(self.env.get("NODE_RANK") or (self.launch.get("dist") or {}).get("NODE_RANK") or 0)
            except ValueError:
                self.rank = 0
        self.pid = os.getpid()
        self.pid_start = proc_start(self.pid)
        self.sid = os.getsid(0)
        self.child = None
        self.stop = None  # "cancel" or "timeout" once asked to stop
        self.stop_signal = None
        self.started_at = None
        self.subreaper = False
        self.contain = None  # the job's Containment, once it is about to start
        self.gpus = []
        self.ticket = None
        self.leases = Leases(lease_dir(self.env))

    # -- records
    def _state(self, state, **extra):
        rec = {
            "state": state,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "sid": self.sid,
            "host": socket.gethostname(),
            "user": user_name(),
            "since": now(),
            "agent_version": AGENT_VERSION,
        }
        rec.update(extra)
        write_json(self._path(STATE), rec, mode=0o600)

    def _exit(self, state, exit_code=None, reason=None, signal_num=None):
        rec = {
            "state": state,
            "exit_code": exit_code,
            "signal": signal_num,
            "reason": reason,
            "started_at": self.started_at,
            "ended_at": now(),
            "gpus": self.gpus,
            "host": socket.gethostname(),
        }
        if not os.path.exists(self._path(EXIT)):
            write_json(self._path(EXIT), rec, mode=0o600)

    def _path(self, name):
        return os.path.join(self.job_dir, rank_name(name, self.rank))

    # -- signals
    def _on_signal(self, signum, frame):
        if self.stop is None:
            self.stop = "timeout" if signum == signal.SIGALRM else "cancel"
            self.stop_signal = signum
        raise _Stop(self.stop)

    # -- leases
    def _acquire(self):
        if self.launch.get("lease") is False:
            return []
        n = int(self.launch.get("gpus") or 0)
        gpu_type = self.launch.get("gpu_type")
        if n <= 0:
            return []
        gpus, source, err = discover_gpus(self.env)
        fitting = [g for g in gpus if gpu_matches(g, gpu_type)]
        if len(fitting) < n:
            what = "%d %s GPU(s)" % (n, gpu_type) if gpu_type else "%d GPU(s)" % n
            have = "%d GPU(s)%s" % (len(fitting), " of type %s" % gpu_type if gpu_type else "")
            detail = " (%s)" % err if err and not gpus else ""
            raise _Fail("the job asks for %s and this machine has %s%s" % (what, have, detail))
        check_foreign = _real_gpus(gpus)
        delay, last_msg = 0.01, None
        while True:
            procs = nvidia_smi_processes()[0] if check_foreign else []
            with self.leases:
                state = self.leases.load()
                changed = bool(self.leases.reclaim(state))
                if self.ticket is None:
                    state["seq"] += 1
                    self.ticket = state["seq"]
                    state["queue"].append(
                        {
                            "ticket": self.ticket,
                            "job_id": self.launch.get("job_id"),
                            "name": self.launch.get("name"),
                            "user": user_name(),
                            "uid": os.getuid(),
                            "gpus": n,
                            "gpu_type": gpu_type,
                            "pid": self.pid,
                            "pid_start": self.pid_start,
                            "sid": self.sid,
                            "since": now(),
                            "order": "fair-usage",  # this agent serves the queue by recent GPU use (queue_policy)
                        }
                    )
                    changed = True
                busy = foreign_busy(gpus, state, procs)
                order, grants, _ = serve_order(gpus, state, set(busy))
                mine = grants.get(self.ticket)
                if mine is not None:
                    state["queue"] = [t for t in state["queue"] if t["ticket"] != self.ticket]
                    for idx in mine:
                        state["gpus"][str(idx)] = {
                            "job_id": self.launch.get("job_id"),
                            "name": self.launch.get("name"),
                            "user": user_name(),
                            "uid": os.getuid(),
                            "pid": self.pid,
                            "pid_start": self.pid_start,
                            "sid": self.sid,
                            "since": now(),
                            "job_dir": self.job_dir,
                        }
                    self.leases.save(state)
                    self.ticket = None
                    by_index = {g["index"]: g for g in gpus}
                    return [by_index[i] for i in mine]
                if changed:
                    self.leases.save(state)
                ahead = [t["ticket"] for t in order]
                ahead = ahead[: ahead.index(self.ticket)] if self.ticket in ahead else ahead
                free = [g for g in gpus if str(g["index"]) not in state["gpus"] and g["uuid"] not in busy]
            msg = "waiting for %s: %d of %d free%s, %d job(s) ahead in the queue" % (
                "%d %s GPU(s)" % (n, gpu_type) if gpu_type else "%d GPU(s)" % n,
                len(free),
                len(gpus),
                " (%d busy with processes meshrun did not start)" % len(busy) if busy else "",
                len(ahead),
            )
            if msg != last_msg:
                _log(msg)
                self._state("queued", reason=msg, position=len(ahead) + 1)
                last_msg = msg
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _release(self):
        if not self.gpus and self.ticket is None:
            return  # held nothing, waited for nothing: no need to touch the machine-wide lock
        try:
            with self.leases:
                state = self.leases.load()
                mine = [k for k, r in state["gpus"].items() if r.get("pid") == self.pid and r.get("sid") == self.sid]
                t = now()
                for k in mine:
                    record_usage(state, state["gpus"].pop(k), t)
                before = len(state["queue"])
                state["queue"] = [t for t in state["queue"] if t.get("pid") != self.pid]
                if mine or len(state["queue"]) != before:
                    self.leases.save(state)
        except Exception as e:  # never let clean-up hide the job's own outcome
            _log("could not release GPU lease: %s" % e)

    # -- the job's environment
    def _job_env(self):
        env = dict(self.env)
        env.update(self.launch.get("env") or {})
        env["MESHRUN_JOB_ID"] = str(self.launch.get("job_id") or "")
        env["MESHRUN_JOB_DIR"] = self.job_dir
        if self.launch.get("name") is not None:
            env["MESHRUN_JOB_NAME"] = self.launch["name"]
        env.setdefault("PYTHONUNBUFFERED", "1")
        for k, v in (self.launch.get("dist") or {}).items():
            env.setdefault(k, str(v))
        if self.launch.get("mask_gpus", True):
            if self.gpus:
                env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g["index"]) for g in self.gpus)
                env["MESHRUN_GPU_UUIDS"] = ",".join(g["uuid"] for g in self.gpus)
            else:
                # a CPU job must not wander onto a GPU someone else leased
                env["CUDA_VISIBLE_DEVICES"] = ""
        if "GPUS_PER_NODE" not in (self.launch.get("dist") or {}):
            # with leases, the GPUs this node was given; without (the scheduler hands them out), the request
            if self.launch.get("lease", True) is not False:
                env["GPUS_PER_NODE"] = str(len(self.gpus))
            else:
                env.setdefault("GPUS_PER_NODE", str(int(self.launch.get("gpus") or 0)))
        return env

    # -- starting the job
    def _start(self, env):
        cwd = self.launch.get("cwd") or self.job_dir
        setup = self.launch.get("setup") or []
        kind = self.launch.get("kind")
        if kind not in ("function", "command"):
            raise _Fail("failed to start: launch.json has unknown kind %r" % (kind,))
        if not os.path.isdir(cwd):
            raise _Fail(_no_workdir(cwd))
        cg = self.contain.cgroup if self.contain is not None and self.contain.mode == "cgroup" else None
        # the child enters the job's cgroup itself, before it runs any of the job's code (so nothing it
        # starts can be outside), and says on this pipe whether it got in
        r, w = os.pipe()
        try:
            if kind == "function":
                pid = os.fork()
                if pid == 0:
                    _worker(self.job_dir, self.launch, self.rank, env, cwd, setup, cg, r, w)  # never returns
            else:
                pid = self._start_command(env, cwd, setup, cg, w)
            os.close(w)
            w = None
            entered = os.read(r, 1) == b"c"
        finally:
            os.close(r)
            if w is not None:
                os.close(w)
        if cg and not entered:
            # the cgroup could not take the job: track its processes ourselves instead
            _log("could not move the job into its cgroup %s; tracking its processes instead" % cg)
            self.contain.remove()
            self.contain = Containment("subreaper", token=self.contain.token, root=self.pid)
        return pid

    def _start_command(self, env, cwd, setup, cg, w):
        argv = self.launch.get("argv")
        if argv is None:
            argv = ["/bin/bash", "-c", self.launch["shell"]]
        if setup:
            # setup commands run first, in the same environment; the command itself is exec'd so
            # its argv reaches it untouched (no shell between meshrun and the user's arguments)
            script = 'set -e\nfor __mr_s in "${@:2:$1}"; do /bin/bash -c "$__mr_s"; done\nshift "$(( $1 + 1 ))"\nexec "$@"'
            argv = ["/bin/bash", "-c", script, "meshrun-setup", str(len(setup))] + list(setup) + list(argv)

        def pre():
            os.write(w, b"c" if (cg and cgroup_enter(cg)) else b"s")
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        try:
            p = subprocess.Popen(argv, env=env, cwd=cwd, preexec_fn=pre, close_fds=True)
        except OSError as e:
            if e.filename == cwd and not os.path.isdir(cwd):
                raise _Fail(_no_workdir(cwd))
            raise _Fail("failed to start: %s: %s" % (argv[0], e.strerror or e))
        # keep the Popen alive: its __del__ would reap a fast child before our own waitpid sees it
        self._popen = p
        return p.pid

    def _has_children(self):
        self._reap_all()
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        return True

    def _reap_all(self):
        """Reap every child (we are a subreaper, so orphaned grandchildren come to us too)."""
        _reap_children()

    def _contain(self, env):
        """Set up the job's containment (its own cgroup, or tracking by the subreaper) and mark its
        environment; recorded in state.json before anything of the job runs."""
        name = "meshrun-%s" % "".join(ch if ch.isalnum() or ch in "._-" else "_"
                                      for ch in str(self.launch.get("job_id") or self.pid))
        if self.rank:
            name += ".rank%d" % self.rank
        try:
            self.contain = Containment.for_job(env, name, self.pid)
        except ValueError as e:
            raise _Fail(str(e))
        if self.contain.mode == "subreaper" and not self.subreaper:
            # no PR_SET_CHILD_SUBREAPER here (orphans are not ours): follow the session and the marker
            self.contain.mode = "session"
            if self.sid == self.pid:  # the job's session is ours alone
                self.contain.sid = self.sid
        env[TOKEN_ENV] = self.contain.token
        self._state("starting", **self.contain.record())

    def _kill_tree(self, grace):
        """End every process of the job: SIGTERM to all, up to ``grace`` s for them to go, then SIGKILL
        (``cgroup.kill`` in a cgroup). Returns only once none is left, so that the GPU lease, released
        next, outlives every process that could still be using the GPUs; then removes the job's cgroup."""
        c = self.contain
        self._reap_all()
        if c is None:  # the job never started: nothing of it can be running
            return
        if not c.empty():
            termed = set(c.signal(signal.SIGTERM))
            if self.stop is None and termed:
                _log("ending %d process(es) the job left running" % len(termed))
            deadline = now() + grace
            while now() < deadline:
                time.sleep(0.05)
                self._reap_all()
                if c.empty():
                    break
                # processes started after the first SIGTERM (a parent forking as it went) get theirs too
                termed.update(c.signal(signal.SIGTERM, skip=termed))
            tries, told = 0, now()
            while not c.empty():
                c.kill()
                self._reap_all()
                if c.empty():
                    break
                tries += 1
                time.sleep(0.02 if tries < 50 else 0.5)
                if now() - told > 30:  # e.g. stuck in the kernel (uninterruptible sleep): keep the GPUs leased
                    told = now()
                    _log("still waiting for process(es) %s of the job to end; its GPUs stay leased until they do"
                         % ", ".join(str(p) for p in sorted(c.members())[:10]))
        self._reap_all()
        if not c.remove():
            _log("could not remove the job's cgroup %s" % c.cgroup)

    def _wait_child(self):
        """Wait for the main child, reaping others as they come; returns its wait status."""
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                return None
            except InterruptedError:  # pragma: no cover - PEP 475 retries this for us
                continue
            if pid == self.child:
                return status

    def run(self):
        self.subreaper = prctl(PR_SET_CHILD_SUBREAPER, 1)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM):
            signal.signal(s, self._on_signal)
        grace = float(self.launch.get("grace_period") or 10)
        state, code, reason, signum = "failed", None, None, None
        try:
            if os.path.exists(os.path.join(self.job_dir, CANCEL)):
                raise _Stop("cancel")
            self._state("queued" if self.launch.get("gpus") else "starting")
            self.gpus = self._acquire()
            env = self._job_env()
            limit = self.launch.get("time_limit")
            self._contain(env)
            self.started_at = now()
            self.child = self._start(env)
            self._state(
                "running",
                started_at=self.started_at,
                child=self.child,
                gpus=[g["index"] for g in self.gpus],
                gpu_uuids=[g["uuid"] for g in self.gpus],
                **self.contain.record()
            )
            if limit:
                signal.setitimer(signal.ITIMER_REAL, float(limit))
            status = self._wait_child()
            signal.setitimer(signal.ITIMER_REAL, 0)
            if status is None:
                reason = "lost track of the job's process"
            elif os.WIFEXITED(status):
                code = os.WEXITSTATUS(status)
                state = "succeeded" if code == 0 else "failed"
                if code:
                    reason = _failure_reason(self.job_dir, code, self.rank)
            else:
                signum = os.WTERMSIG(status)
                code = 128 + signum
                reason = "killed by signal %d (%s)" % (signum, _signame(signum))
        except _Stop as stop:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signum = self.stop_signal
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
            if stop.how == "timeout":
                state = "timeout"
                reason = "exceeded its time limit of %ss" % _fmt_secs(self.launch.get("time_limit"))
            else:
                state, reason = "cancelled", _cancel_reason(self.job_dir, self.stop_signal)
            if self.child:
                _log("stopping the job (%s); grace period %ss" % (state, _fmt_secs(grace)))
        except _Fail as fail:
            state, reason = "failed", str(fail)
            _log(reason)
        except Exception as e:  # the supervisor itself failed: say so rather than vanish
            import traceback

            traceback.print_exc()
            state, reason = "failed", "meshrun agent error: %s: %s" % (type(e).__name__, e)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
            self._kill_tree(grace)
            self._release()
            self._exit(state, code, reason, signum)
        return 0 if state == "succeeded" else 1


def _signame(n):
    try:
        return signal.Signals(n).name
    except ValueError:
        return "?"


def _fmt_secs(s):
    try:
        f = float(s)
    except (TypeError, ValueError):
        return str(s)
    return ("%d" % f) if f == int(f) else ("%.3g" % f)


def _cancel_reason(job_dir, signum=None):
    rec = read_json(os.path.join(job_dir, CANCEL))
    if rec is None and signum:
        return "stopped by signal %s" % _signame(signum)
    who = (rec or {}).get("user")
    return "cancelled%s" % (" by %s" % who if who else "")


def _failure_reason(job_dir, code, rank=0):
    err = read_json(os.path.join(job_dir, rank_name(ERROR_JSON, rank)))
    if isinstance(err, dict) and err.get("type"):
        msg = "%s: %s" % (err["type"], err.get("message", ""))
        return msg if len(msg) < 300 else msg[:297] + "..."
    return "exited with code %d" % code


def _run_setup(setup, env, cwd):
    for i, cmd in enumerate(setup):
        rc = subprocess.call(["/bin/bash", "-c", cmd], env=env, cwd=cwd)
        if rc != 0:
            _log("setup command %d of %d failed with exit code %d" % (i + 1, len(setup), rc))
            return rc if 0 < rc < 256 else 1
    return 0


def _version_tuple():
    cp = None
    try:
        import cloudpickle

        cp = cloudpickle.__version__
    except Exception:
        pass
    return "%d.%d" % sys.version_info[:2], cp


def _write_error(job_dir, etype, message, tb, exc=None, rank=0):
    write_json(
        os.path.join(job_dir, rank_name(ERROR_JSON, rank)),
        {"type": etype, "message": message, "traceback": tb},
        mode=0o600,
    )
    if exc is not None:
        try:
            import cloudpickle

            atomic_write(os.path.join(job_dir, rank_name(ERROR_PKL, rank)), cloudpickle.dumps(exc), mode=0o600)
        except Exception:
            pass


def _no_workdir(cwd):
    return "failed to start: the working directory %s does not exist (or is not a directory)" % cwd


def _exc_message(e):
    """``str(e)``, or a fallback naming what went wrong when the exception's own ``__str__`` raises."""
    try:
        return str(e)
    except BaseException as inner:  # noqa: B902 - user code may raise anything from __str__
        try:
            shown = repr(e)
        except BaseException:  # noqa: B902
            shown = "<%s object>" % type(e).__name__
        try:
            why = "%s: %s" % (type(inner).__name__, inner)
        except BaseException:  # noqa: B902
            why = type(inner).__name__
        return "%s (str() raised %s)" % (shown, why)


def _quietly(fn, *args):
    """Write to stdout/stderr without letting a closed or broken stream raise."""
    try:
        fn(*args)
    except BaseException:  # noqa: B902
        pass


def _worker(job_dir, launch, rank, env, cwd, setup, cgroup, r, w):
    """The forked worker of a function job: enters the job's cgroup, runs setup and the function, and
    always leaves through ``os._exit`` (it must never return into the supervisor's code: a failure while
    reporting a failure, e.g. on a closed stderr, still ends here)."""
    code = 70
    try:
        try:
            os.close(r)
            os.write(w, b"c" if (cgroup and cgroup_enter(cgroup)) else b"s")
            os.close(w)
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            os.environ.clear()
            os.environ.update(env)
            try:
                os.chdir(cwd)
            except OSError:
                msg = _no_workdir(cwd)
                _write_error(job_dir, "WorkdirError", msg, "", None, rank)
                _quietly(_log, msg)
                code = 1
                return
            code = _run_setup(setup, env, cwd)
            if code:
                return
            code = 70
            code = _run_function(job_dir, launch, rank)
        except BaseException:  # noqa: B902 - last resort: say what happened if we still can
            try:
                import traceback

                traceback.print_exc()
            except BaseException:  # noqa: B902
                pass
    finally:
        os._exit(code)


def _run_function(job_dir, launch, rank=0):
    """In the worker: load the payload, call the function, write the result or the error."""
    import traceback

    if sys.flags.no_site:  # started with python -S for a fast start: the function needs site-packages
        import site

        site.main()

    def fail(etype, message, tb, exc=None):
        _write_error(job_dir, etype, message, tb, exc, rank)

    for p in reversed(launch.get("sys_path") or []):
        if p and p not in sys.path and os.path.isdir(p):
            sys.path.insert(0, p)
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    path = os.path.join(job_dir, launch.get("payload") or PAYLOAD)
    try:
        with open(path, "rb") as f:
            header = json.loads(f.readline().decode())
            body = f.read()
    except (OSError, ValueError) as e:
        fail("PayloadError", "cannot read the payload %s: %s" % (path, e), "")
        return 3
    py, cp = _version_tuple()
    if header.get("python") != py or (header.get("cloudpickle") and header.get("cloudpickle") != cp):
        msg = (
            "the job was pickled with Python %s and cloudpickle %s, but this runner has Python %s and "
            "cloudpickle %s (%s); a function job needs the same Python minor version and cloudpickle "
            "version on both sides: point the backend at a matching interpreter or install cloudpickle==%s"
            % (header.get("python"), header.get("cloudpickle"), py, cp or "not installed", sys.executable,
               header.get("cloudpickle"))
        )
        fail("VersionMismatch", msg, "")
        _quietly(_log, msg)
        return 3
    import pickle

    try:
        fn, args, kwargs = pickle.loads(body)
    except Exception as e:
        tb = traceback.format_exc()
        fail("PayloadError", "cannot unpickle the function: %s: %s" % (type(e).__name__, _exc_message(e)), tb)
        _quietly(sys.stderr.write, tb)
        return 3
    if header.get("filename"):
        fn = _restore_filename(fn, header["filename"])
    try:
        result = fn(*args, **kwargs)
    except BaseException as e:  # noqa: B902 - the user's code may raise anything, SystemExit included
        if isinstance(e, SystemExit) and (e.code is None or e.code == 0):
            result = None
        else:
            # record the exception first: printing it may fail (the function may have closed stderr)
            try:
                tb = traceback.format_exc()
            except BaseException:  # noqa: B902
                tb = ""
            fail(type(e).__name__, _exc_message(e), tb, e)
            _quietly(sys.stderr.write, tb)
            _quietly(sys.stderr.flush)
            return 1
    import cloudpickle

    try:
        data = cloudpickle.dumps(result)
    except Exception as e:
        tb = traceback.format_exc()
        fail("ResultError", "the return value cannot be pickled: %s: %s" % (type(e).__name__, _exc_message(e)), tb)
        return 1
    atomic_write(os.path.join(job_dir, rank_name(RESULT, rank)), data, mode=0o600)
    _quietly(sys.stdout.flush)
    _quietly(sys.stderr.flush)
    return 0


def _restore_filename(fn, filename):
    """cloudpickle rewrites the file name of functions it pickles by value to "<dynamic-code>"; put the
    real one back so tracebacks show the user's file and lines."""
    import types

    def fix(code):
        consts = tuple(fix(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
        if code.co_filename == "<dynamic-code>":
            return code.replace(co_filename=filename, co_consts=consts)
        return code.replace(co_consts=consts)

    target = getattr(fn, "__func__", fn)
    code = getattr(target, "__code__", None)
    if isinstance(code, types.CodeType) and code.co_filename == "<dynamic-code>":
        try:
            target.__code__ = fix(code)
        except (AttributeError, TypeError, ValueError):
            pass
    return fn


def run_job(job_dir, env=None):
    """Supervise one job in the foreground (this process becomes its session leader if it is not yet).

    A job is started at most once: a second supervisor for the same directory (a retried spawn, or one
    started after ``cancel`` claimed a job that had not started) exits at once without touching it."""
    sup = Supervisor(job_dir, env)
    try:
        os.close(os.open(sup._path(".started"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return 0
    try:
        os.setsid()
    except OSError:
        pass  # already a session leader
    _redirect_output(sup._path(LOG))
    sup.pid_start = proc_start(sup.pid)
    sup.sid = os.getsid(0)
    return sup.run()


# --------------------------------------------------------------------------------------------------
# starting, inspecting and cancelling jobs (what the local backend and the SSH backend call)


def _spawn_direct(job_dir, env=None, python=None):
    """Start a supervisor as a fresh interpreter in its own session (the slow, always-available path)."""
    argv = [python or sys.executable, os.path.abspath(__file__), "run", job_dir]
    p = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    return p


def spawn(job_dir, env=None, server=None):
    """Start the job in ``job_dir``: through the warm fork server at ``server`` when one answers, else as a
    new process. Returns (pid, Popen or None)."""
    if server:
        pid = server_spawn(server, job_dir, env)
        if pid:
            return pid, None
    p = _spawn_direct(job_dir, env)
    return p.pid, p


def job_status(job_dir, rank=0):
    """The job's state as the agent sees it from its directory and the process table."""
    ex = read_json(os.path.join(job_dir, rank_name(EXIT, rank)))
    if isinstance(ex, dict):
        return _with_containment(ex, job_dir, rank)
    st = read_json(os.path.join(job_dir, rank_name(STATE, rank)))
    if isinstance(st, dict):
        if pid_alive(st.get("pid"), st.get("pid_start")):
            return st
        # the supervisor is gone without an exit record: killed (kill -9, OOM killer, reboot)
        ex = read_json(os.path.join(job_dir, rank_name(EXIT, rank)))  # it may have finished between the two reads
        if isinstance(ex, dict):
            return _with_containment(ex, job_dir, rank)
        reason = "the job's supervisor (pid %s on %s) died without writing an exit record" % (
            st.get("pid"), st.get("host"))
        if st.get("host") in (None, socket.gethostname()):
            left = _leftovers(job_dir, st, rank).members()
            if left:
                reason += "; %d process(es) of the job still run (meshrun cancel stops them and frees its GPUs)" % len(left)
        rec = {"state": "lost", "reason": reason, "exit_code": None}
        for k in ("containment", "cgroup"):
            if k in st:
                rec[k] = st[k]
        return rec
    launch = os.path.join(job_dir, LAUNCH)
    try:
        age = now() - os.stat(launch).st_mtime
    except OSError:
        return {"state": "lost", "reason": "no job directory at %s" % job_dir}
    if os.path.exists(os.path.join(job_dir, CANCEL)) and age > 2:
        return {"state": "cancelled", "reason": _cancel_reason(job_dir)}
    if age > SPAWN_GRACE:
        return {"state": "lost", "reason": "the job never started (no supervisor after %ds)" % SPAWN_GRACE}
    return {"state": "pending", "reason": "starting"}


def _with_containment(ex, job_dir, rank=0):
    """An exit record, with the containment its job ran under (kept in state.json)."""
    if "containment" not in ex:
        st = read_json(os.path.join(job_dir, rank_name(STATE, rank)))
        if isinstance(st, dict) and st.get("containment"):
            ex = dict(ex, containment=st["containment"])
    return ex


def _leftovers(job_dir, st, rank=0):
    """What may be left of a job whose supervisor is gone: its cgroup, the processes of its owner that carry
    its marker, and its session."""
    try:
        uid = os.stat(os.path.join(job_dir, rank_name(STATE, rank))).st_uid
    except OSError:
        uid = os.getuid()
    return Containment.from_record(st, uid)


def cancel(job_dir, grace=None, wait=True):
    """Cancel a job: ask its supervisor to stop (it ends every process of the job and frees the GPUs); if
    the supervisor is gone, end what is left of the job ourselves, reclaim its GPUs and write the exit record.

    A job no supervisor has started yet (its submitter may have died mid-submit) is claimed here, so that
    none ever will: it ends cancelled before it runs."""
    if os.path.exists(os.path.join(job_dir, EXIT)):
        return job_status(job_dir)
    write_json(os.path.join(job_dir, CANCEL), {"user": user_name(), "time": now()}, mode=0o600)
    try:
        os.close(os.open(os.path.join(job_dir, ".started"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        claimed = True
    except OSError:
        claimed = False  # a supervisor was started (or the folder is gone)
    if claimed:
        write_json(
            os.path.join(job_dir, EXIT),
            {"state": "cancelled", "reason": "%s before it started" % _cancel_reason(job_dir), "exit_code": None,
             "ended_at": now()},
            mode=0o600,
        )
        return job_status(job_dir)
    launch = read_json(os.path.join(job_dir, LAUNCH)) or {}
    grace = float(grace if grace is not None else launch.get("grace_period") or 10)
    deadline = now() + grace + 5
    while True:
        st = read_json(os.path.join(job_dir, STATE))
        if isinstance(st, dict) or now() > deadline:
            break
        time.sleep(0.02)  # the supervisor is still starting; it checks for cancel.json itself
        if os.path.exists(os.path.join(job_dir, EXIT)):
            return job_status(job_dir)
    if isinstance(st, dict) and pid_alive(st.get("pid"), st.get("pid_start")):
        try:
            os.kill(st["pid"], signal.SIGTERM)
        except OSError:
            pass
        if not wait:
            return {"state": "cancelling"}
        while now() < deadline:
            if os.path.exists(os.path.join(job_dir, EXIT)) and not pid_alive(st["pid"], st.get("pid_start")):
                return job_status(job_dir)
            time.sleep(0.02)
    # no live supervisor (or one that did not finish in time): end what is left of the job ourselves
    if isinstance(st, dict):
        left = _leftovers(job_dir, st)
        t_end = now() + 10
        while not left.empty() and now() < t_end:
            left.kill()
            time.sleep(0.05)
        left.remove()
        try:
            leases = Leases(lease_dir())
            with leases:
                state = leases.load()
                if leases.reclaim(state):
                    leases.save(state)
        except LeaseError:
            pass
    if not os.path.exists(os.path.join(job_dir, EXIT)):
        write_json(
            os.path.join(job_dir, EXIT),
            {"state": "cancelled", "reason": _cancel_reason(job_dir), "exit_code": None, "ended_at": now()},
            mode=0o600,
        )
    return job_status(job_dir)


# --------------------------------------------------------------------------------------------------
# the fork server: a warm interpreter that starts supervisors by fork()


def server_spawn(path, job_dir, env=None, timeout=2.0):
    """Ask the fork server at ``path`` to start ``job_dir``; returns the pid, or None if it does not answer."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        req = {"op": "spawn", "job_dir": job_dir, "env": dict(os.environ if env is None else env)}
        s.sendall((json.dumps(req) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                return None
            buf += chunk
        rep = json.loads(buf.decode())
        return rep.get("pid")
    except (OSError, ValueError):
        return None
    finally:
        s.close()


def serve(path, idle=600.0):
    """Accept spawn requests on a unix socket until idle for ``idle`` seconds."""
    try:  # warm what every supervisor and function job will import, so forks start ready
        import pickle  # noqa: F401
        import traceback  # noqa: F401
        import types  # noqa: F401

        import cloudpickle  # noqa: F401
    except Exception:
        pass
    _libc()
    os.setsid() if os.getsid(0) != os.getpid() else None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = "%s.%d" % (path, os.getpid())
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
    os.replace(tmp, path)  # the socket appears only once it accepts
    ino = os.stat(path).st_ino

    def still_ours():
        try:
            return os.stat(path).st_ino == ino
        except OSError:
            return False

    sock.settimeout(1.0)
    last = now()
    try:
        while now() - last < idle:
            try:
                conn, _ = sock.accept()
            except socket.timeout:
                _reap_children()
                if not still_ours():
                    return  # removed, or another server took the path over
                continue
            last = now()
            try:
                conn.settimeout(5)
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        break
                    buf += chunk
                req = json.loads(buf.decode())
                pid = _fork_supervisor(req["job_dir"], req.get("env"), sock, conn)
                conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
            except Exception as e:  # a bad request must not take the server down
                try:
                    conn.sendall((json.dumps({"error": str(e)}) + "\n").encode())
                except OSError:
                    pass
            finally:
                conn.close()
            _reap_children()
    finally:
        if still_ours():
            try:
                os.unlink(path)
            except OSError:
                pass
        sock.close()


def _reap_children():
    """Reap every child that has exited, without waiting for the others."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _fork_supervisor(job_dir, env, *close):
    pid = os.fork()
    if pid:
        return pid
    try:
        for c in close:
            try:
                c.close()
            except Exception:
                pass
        os.setsid()
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        code = run_job(job_dir, env)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 70
    os._exit(code)


# --------------------------------------------------------------------------------------------------
# command line (for remote callers and for debugging)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.stderr.write("usage: _agent.py version|gpus|run DIR|submit DIR|status DIR...|cancel DIR|serve SOCK\n")
        return 2
    cmd, rest = argv[0], argv[1:]
    out = sys.stdout
    if cmd == "version":
        py, cp = _version_tuple()
        out.write(json.dumps({"agent_version": AGENT_VERSION, "python": py, "cloudpickle": cp,
                              "executable": sys.executable, "host": socket.gethostname(),
                              "user": user_name()}) + "\n")
        return 0
    if cmd == "gpus":
        out.write(json.dumps(snapshot()) + "\n")
        return 0
    if cmd == "run":
        return run_job(rest[0])
    if cmd == "submit":
        pid, p = spawn(os.path.abspath(rest[0]), server=rest[1] if len(rest) > 1 else None)
        out.write(json.dumps({"pid": pid}) + "\n")
        return 0
    if cmd == "status":
        out.write(json.dumps({d: job_status(d) for d in rest}) + "\n")
        return 0
    if cmd == "cancel":
        out.write(json.dumps(cancel(rest[0])) + "\n")
        return 0
    if cmd == "serve":
        serve(rest[0], float(rest[1]) if len(rest) > 1 else 600.0)
        return 0
    sys.stderr.write("unknown command %r\n" % cmd)
    return 2


if __name__ == "__main__":
    sys.exit(main())
