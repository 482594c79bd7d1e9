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
* the job supervisor (``run``): starts the job in its own session with ``CUDA_VISIBLE_DEVICES`` set to
  its leased GPUs, enforces the time limit, forwards cancellation to the whole process tree, reaps every
  process and writes the job's exit record;
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


def proc_start(pid):
    """Start time of a live (non-zombie) process, used to tell a process from a later one with its pid."""
    if not pid:
        return None
    if HAVE_PROC:
        st = _proc_stat(pid)
        if st is None or st[0] in ("Z", "X"):
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
        if st is not None and st[3] == sid and st[0] not in ("Z", "X"):
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
        if kind == "function":
            pid = os.fork()
            if pid == 0:  # the worker: runs setup, then the function, in this (forked) interpreter
                try:
                    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    signal.signal(signal.SIGALRM, signal.SIG_DFL)
                    os.environ.clear()
                    os.environ.update(env)
                    os.chdir(cwd)
                    code = _run_setup(setup, env, cwd)
                    if code:
                        os._exit(code)
                    os._exit(_run_function(self.job_dir, self.launch, self.rank))
                except BaseException:  # pragma: no cover - last resort
                    import traceback

                    traceback.print_exc()
                    os._exit(70)
            return pid
        if kind == "command":
            argv = self.launch.get("argv")
            if argv is None:
                argv = ["/bin/bash", "-c", self.launch["shell"]]
            if setup:
                # setup commands run first, in the same environment; the command itself is exec'd so
                # its argv reaches it untouched (no shell between meshrun and the user's arguments)
                script = 'set -e\nfor __mr_s in "${@:2:$1}"; do /bin/bash -c "$__mr_s"; done\nshift "$(( $1 + 1 ))"\nexec "$@"'
                argv = ["/bin/bash", "-c", script, "meshrun-setup", str(len(setup))] + list(setup) + list(argv)

            def pre():
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)

            try:
                p = subprocess.Popen(argv, env=env, cwd=cwd, preexec_fn=pre, close_fds=True)
            except OSError as e:
                raise _Fail("failed to start: %s: %s" % (argv[0], e.strerror or e))
            # keep the Popen alive: its __del__ would reap a fast child before our own waitpid sees it
            self._popen = p
            return p.pid
        raise _Fail("failed to start: launch.json has unknown kind %r" % (kind,))

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

    def _kill_tree(self, grace):
        """TERM every other process of our session, wait up to ``grace`` s, then KILL what is left."""
        if self.subreaper and not self._has_children():
            # as a subreaper every live descendant is our child or a child's descendant: none, nothing left
            return
        me = set([self.pid])
        if not kill_session(self.sid, signal.SIGTERM, exclude=me):
            self._reap_all()
            return
        deadline = now() + grace
        while now() < deadline:
            self._reap_all()
            if not [p for p in session_members(self.sid) if p != self.pid]:
                return
            time.sleep(0.05)
        for _ in range(50):
            kill_session(self.sid, signal.SIGKILL, exclude=me)
            self._reap_all()
            if not [p for p in session_members(self.sid) if p != self.pid]:
                return
            time.sleep(0.02)

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
            self.started_at = now()
            self.child = self._start(env)
            self._state(
                "running",
                started_at=self.started_at,
                child=self.child,
                gpus=[g["index"] for g in self.gpus],
                gpu_uuids=[g["uuid"] for g in self.gpus],
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
        _log(msg)
        return 3
    import pickle

    try:
        fn, args, kwargs = pickle.loads(body)
    except Exception as e:
        tb = traceback.format_exc()
        fail("PayloadError", "cannot unpickle the function: %s: %s" % (type(e).__name__, e), tb)
        sys.stderr.write(tb)
        return 3
    if header.get("filename"):
        fn = _restore_filename(fn, header["filename"])
    try:
        result = fn(*args, **kwargs)
    except BaseException as e:  # noqa: B902 - the user's code may raise anything, SystemExit included
        if isinstance(e, SystemExit) and (e.code is None or e.code == 0):
            result = None
        else:
            tb = traceback.format_exc()
            sys.stderr.write(tb)
            sys.stderr.flush()
            fail(type(e).__name__, str(e), tb, e)
            return 1
    import cloudpickle

    try:
        data = cloudpickle.dumps(result)
    except Exception as e:
        tb = traceback.format_exc()
        fail("ResultError", "the return value cannot be pickled: %s: %s" % (type(e).__name__, e), tb)
        return 1
    atomic_write(os.path.join(job_dir, rank_name(RESULT, rank)), data, mode=0o600)
    sys.stdout.flush()
    sys.stderr.flush()
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

    A job is started at most once: a second supervisor for the same directory (a retried spawn) exits
    at once without touching it."""
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
        return ex
    st = read_json(os.path.join(job_dir, rank_name(STATE, rank)))
    if isinstance(st, dict):
        if pid_alive(st.get("pid"), st.get("pid_start")):
            return st
        # the supervisor is gone without an exit record: killed (kill -9, OOM killer, reboot)
        ex = read_json(os.path.join(job_dir, rank_name(EXIT, rank)))  # it may have finished between the two reads
        if isinstance(ex, dict):
            return ex
        return {
            "state": "lost",
            "reason": "the job's supervisor (pid %s on %s) died without writing an exit record"
            % (st.get("pid"), st.get("host")),
            "exit_code": None,
        }
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


def cancel(job_dir, grace=None, wait=True):
    """Cancel a job: ask its supervisor to stop (it ends the whole process tree and frees the GPUs); if the
    supervisor is gone, end what is left of the session ourselves and write the exit record."""
    if os.path.exists(os.path.join(job_dir, EXIT)):
        return job_status(job_dir)
    write_json(os.path.join(job_dir, CANCEL), {"user": user_name(), "time": now()}, mode=0o600)
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
    # no live supervisor: clean up after it
    sid = st.get("sid") if isinstance(st, dict) else None
    if sid:
        kill_session(sid, signal.SIGKILL)
        t_end = now() + 5
        while session_members(sid) and now() < t_end:
            time.sleep(0.05)
    if isinstance(st, dict):
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


def peer_uid(sock):
    """The uid of the process at the other end of a connected unix socket (``SO_PEERCRED``), or None where
    the system does not say (then only the private socket directory vouches for the peer)."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:  # pragma: no cover - not Linux
        return None
    import struct

    size = struct.calcsize("3i")
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, opt, size))
    return uid


_WARNED = set()


def _warn_once(msg):
    if msg not in _WARNED:
        _WARNED.add(msg)
        sys.stderr.write("meshrun: warning: %s\n" % msg)
        sys.stderr.flush()


def current_umask():
    """This process's umask, read without changing it where /proc says (else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def current_rlimits():
    """{"RLIMIT_NAME": [soft, hard]} for every resource limit this system has (one name per resource)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return {}
    out, seen = {}, set()
    for name in sorted(n for n in dir(resource) if n.startswith("RLIMIT_")):
        res = getattr(resource, name)
        if res in seen:
            continue  # RLIMIT_OFILE is RLIMIT_NOFILE
        try:
            out[name] = list(resource.getrlimit(res))
        except (ValueError, OSError):
            continue
        seen.add(res)
    return out


def server_spawn(path, job_dir, env=None, timeout=2.0):
    """Ask the fork server at ``path`` to start ``job_dir``; returns the pid, or None if it does not answer
    or is not ours.

    Nothing is sent before the peer is known to run as our own uid (``SO_PEERCRED``): a listener of another
    user at that path gets a connection and not one byte. The request carries the submitter's environment,
    umask and resource limits, which the forked supervisor takes on before it runs the job."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        uid = peer_uid(s)
        if uid is not None and uid != os.getuid():
            _warn_once("the fork server socket %s is served by uid %d, not by us (uid %d): not using it; "
                       "jobs start as fresh processes" % (path, uid, os.getuid()))
            return None
        req = {"op": "spawn", "job_dir": job_dir, "env": dict(os.environ if env is None else env),
               "umask": current_umask(), "rlimits": current_rlimits()}
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


SERVER_MAX_REQUEST = 64 << 20  # bytes: a request is one JSON line (the environment is the big part)


def serve(path, idle=600.0):
    """Accept spawn requests on a unix socket until idle for ``idle`` seconds.

    ``path`` must be in a directory only this user can write (the local backend checks its private socket
    directory before it starts a server); the socket itself is created 0600, and every connection is
    checked with ``SO_PEERCRED``: a peer of another uid is answered with an error and nothing is started."""
    try:  # warm what every supervisor and function job will import, so forks start ready
        import pickle  # noqa: F401
        import resource  # noqa: F401
        import traceback  # noqa: F401
        import types  # noqa: F401

        import cloudpickle  # noqa: F401
    except Exception:
        pass
    _libc()
    os.setsid() if os.getsid(0) != os.getpid() else None
    try:
        os.chdir("/")  # hold no directory of whoever started us (each job has its own cwd in launch.json)
    except OSError:
        pass
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
            try:
                uid = peer_uid(conn)
                if uid is not None and uid != os.getuid():
                    conn.sendall((json.dumps({"error": "refused: this fork server serves uid %d only, not uid %d"
                                                       % (os.getuid(), uid)}) + "\n").encode())
                    continue
                last = now()
                conn.settimeout(5)
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        break
                    buf += chunk
                    if len(buf) > SERVER_MAX_REQUEST:
                        raise ValueError("request larger than %d bytes" % SERVER_MAX_REQUEST)
                req = json.loads(buf.decode())
                pid = _fork_supervisor(req["job_dir"], req.get("env"), sock, conn,
                                       umask=req.get("umask"), rlimits=req.get("rlimits"))
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


def _take_on_limits(umask, rlimits):
    """Apply the submitter's umask and resource limits to this (forked) process; returns a note for each
    limit that could not be set (the job runs anyway, with the limit it has)."""
    notes = []
    if umask is not None:
        os.umask(int(umask) & 0o777)
    if not rlimits:
        return notes
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return ["the submitter's resource limits were not applied: no resource module here"]
    for name, pair in sorted(rlimits.items()):
        res = getattr(resource, name, None) if str(name).startswith("RLIMIT_") else None
        if res is None:
            notes.append("resource limit %s is unknown here; left as it is" % (name,))
            continue
        try:
            want = (int(pair[0]), int(pair[1]))
            have = resource.getrlimit(res)
            if tuple(have) != want:
                resource.setrlimit(res, want)
        except (ValueError, OSError, TypeError, IndexError) as e:
            try:  # e.g. a hard limit above the server's own: come as close as this process may
                have = resource.getrlimit(res)
                hard = _rl_min(int(pair[1]), have[1])
                resource.setrlimit(res, (_rl_min(int(pair[0]), hard), hard))
            except (ValueError, OSError, TypeError, IndexError):
                pass
            try:
                have = resource.getrlimit(res)
            except (ValueError, OSError):
                have = ("?", "?")
            notes.append("could not set %s to the submitter's soft %s / hard %s (%s); the job runs with soft %s "
                         "/ hard %s" % (name, _rl(pair, 0), _rl(pair, 1), e, _rl(have, 0), _rl(have, 1)))
    return notes


def _rl_min(a, b):
    """The lower of two resource limits (RLIM_INFINITY is the highest)."""
    import resource

    if a == resource.RLIM_INFINITY:
        return b
    if b == resource.RLIM_INFINITY:
        return a
    return min(a, b)


def _rl(pair, i):
    try:
        v = int(pair[i])
    except (ValueError, TypeError, IndexError):
        return str(pair)
    try:
        import resource

        if v == resource.RLIM_INFINITY:
            return "unlimited"
    except ImportError:  # pragma: no cover
        pass
    return str(v)


def _fork_supervisor(job_dir, env, *close, umask=None, rlimits=None):
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
        notes = _take_on_limits(umask, rlimits)
        if notes and not os.path.exists(os.path.join(job_dir, ".started")):
            # the job's log is where its owner looks; the supervisor appends to it from here on
            fd = os.open(os.path.join(job_dir, LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, "".join("[meshrun] %s\n" % n for n in notes).encode())
            finally:
                os.close(fd)
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
