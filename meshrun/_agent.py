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
* the distributed env contract (``dist_env``: MASTER_ADDR ... WORLD_SIZE), computed on each node from
  ``launch.json`` and the scheduler's own variables, and Slurm's rendezvous (``rendezvous``);
* a small fork server (``serve``) that keeps a warm interpreter around so a job starts in milliseconds
  instead of paying for a fresh Python start-up;
* a JSON command line (``python3 _agent.py gpus|submit|status|records|cancel|version``) for remote callers;
* the job's records on their way back: the exit record carries the result's size and SHA-256, and
  ``run DIR --emit-records NONCE`` streams the job's output and then frames its records into it, for a backend
  whose only way back is the job's log (``frame_records``; the core's ``_transport.py`` reads them).

The contract with the core is the job directory: the core writes ``launch.json`` (and ``payload.pkl`` for
function jobs); the agent writes ``state.json``, ``exit.json``, ``output.log`` and, for function jobs,
``result.pkl`` or ``error.json``/``error.pkl``.
"""

import errno
import json
import os
import signal
import stat
import sys
import time


class _OnFirstUse(object):
    """A standard module imported where it is first used: reading a job's records (``meshrun ls`` of a running
    job, ``meshrun gpus``) needs neither sockets nor subprocesses, a few milliseconds of imports each."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        module = __import__(self._name)
        globals()[self._name] = module  # later uses go straight to the module
        return getattr(module, attr)


def hostname():
    """This machine's name, as ``socket.gethostname()`` gives it (the kernel's nodename), without socket."""
    return os.uname()[1]


TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    import subprocess
else:
    socket = _OnFirstUse("socket")
    subprocess = _OnFirstUse("subprocess")

AGENT_VERSION = "4"  # 2: the GPU queue served by fair share across users; 3: by recent GPU use;
# 4: leases as flocked per-job hold files, the lease directory treated as hostile

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
STAGE = "stage.py"  # the data stager (object-store inputs/outputs), run with a Python that has boto3
STARTED = ".started"  # created exclusively by the one supervisor of a job, and flocked while it lives

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


def atomic_write(path, data, mode=0o644, before_replace=None):
    """Write bytes to ``path`` so that readers see the old or the new content, never a torn file.

    The temporary file gets a fresh random name and is created exclusively (never through a link someone
    planted); it is removed again if anything fails. ``before_replace`` (if given) is called once the new
    content is wholly written, just before it becomes visible at ``path``."""
    d, base = os.path.split(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = os.path.join(d, "%s.tmp.%d.%s" % (base, os.getpid(), os.urandom(4).hex()))
        try:
            fd = os.open(tmp, flags, mode)
            break
        except FileExistsError:  # pragma: no cover - 32 random bits
            continue
    try:
        try:
            os.fchmod(fd, mode)  # created by this call; umask must not narrow a record meant for others
            view = memoryview(data)
            while view:  # no fsync: records must survive killed processes, which the page cache does
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json(path, obj, mode=0o644, before_replace=None):
    atomic_write(path, (json.dumps(obj, sort_keys=True) + "\n").encode(), mode, before_replace)


def result_complete(path):
    """True when ``path`` is a whole pickle (written by an atomic rename, and ending with pickle's STOP)."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) < 2:
                return False
            f.seek(-1, 2)
            return f.read(1) == b"."
    except OSError:
        return False


def result_digest(path):
    """``{"result_bytes": N, "result_sha256": HEX}`` of a result file (empty when there is none): the exit
    record carries it, so whoever reads the result, here or after any transport, can tell a whole one from a
    cut or altered one before unpickling it."""
    try:
        f = open(path, "rb")
    except OSError:
        return {}
    import hashlib  # only now: a command job has no result, and this import costs milliseconds

    h, n = hashlib.sha256(), 0
    try:
        with f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
                n += len(block)
    except OSError:
        return {}
    return {"result_bytes": n, "result_sha256": h.hexdigest()}


def read_json(path, default=None):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode())
    except (OSError, ValueError):
        return default


def user_name():
    """This process's user name (looked up once per uid: a supervisor records it in every state it writes)."""
    uid = os.getuid()
    if uid not in _USER_NAMES:
        try:
            import pwd

            _USER_NAMES[uid] = pwd.getpwuid(uid).pw_name
        except Exception:  # pragma: no cover - no passwd entry (containers)
            return os.environ.get("USER") or str(uid)
    return _USER_NAMES[uid]


_USER_NAMES = {}  # type: dict


_LIBC = []  # type: list


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
PR_SET_NAME = 15

#: a forked spare copies its parent's writable memory ahead only up to this much (a fork server with large
#: warm imports, e.g. torch, would double its memory for little gain)
POPULATE_MAX = 256 << 20


def set_name(name):
    """Set this process's name (``/proc/self/comm``, what ps shows); returns the one it had."""
    libc = _libc()
    try:
        with open("/proc/self/comm") as f:
            old = f.read().strip()
        if libc is not None:
            import ctypes

            libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
        return old
    except (OSError, ImportError, AttributeError):
        return name


def populate_memory(limit=POPULATE_MAX):
    """In a process forked ahead of its work (a spare): take private copies of the writable memory inherited
    from the parent now (``MADV_POPULATE_WRITE``, Linux 5.14+), so that the work runs without the
    copy-on-write faults (a thousand or more, milliseconds, for a command). Nothing where the kernel cannot,
    or when that memory is over ``limit`` bytes (it is then copied page by page, as after any fork)."""
    libc = _libc()
    if libc is None:
        return
    try:
        import ctypes

        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
    except (OSError, ImportError, AttributeError):
        return
    spans = []
    for line in maps:
        fields = line.split()
        if len(fields) < 5 or fields[1][:2] != "rw" or fields[1][3] != "p":
            continue  # only private writable mappings: what a fork shares copy-on-write
        if len(fields) > 5 and fields[5].startswith("[") and fields[5] != "[heap]":
            continue  # the stack, vvar, vdso
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        spans.append((lo, hi - lo))
    if sum(n for _, n in spans) > limit:
        return
    MADV_POPULATE_WRITE = 23
    for lo, n in spans:
        if libc.madvise(lo, n, MADV_POPULATE_WRITE) != 0 and ctypes.get_errno() == errno.EINVAL:
            return  # a kernel before 5.14 knows no such advice


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


class ExitWatch(object):
    """Wakes a waiter as soon as the supervisor of the job in ``job_dir`` (on this machine) exits, which it does
    right after writing the job's exit record: a pidfd (Linux 5.3+, Python 3.9+) of the pid its ``state.json``
    names, once that is there. Elsewhere, and before that, :meth:`wait` only sleeps; it never waits past its
    timeout. (inotify would also see the job's output, but closing its last watch waits for an RCU grace period,
    ~10 ms, where this closes at once.)"""

    def __init__(self, job_dir, rank=0):
        self.state = os.path.join(str(job_dir), rank_name(STATE, rank))
        self.fd = None
        self.spent = not hasattr(os, "pidfd_open")

    def _open(self):
        st = read_json(self.state)
        pid = st.get("pid") if isinstance(st, dict) else None
        if not isinstance(pid, int) or pid <= 0:
            return
        self.spent = True  # one try: a supervisor gone (or a pid reused) is waited for by polling alone
        if st.get("pid_start") is not None and proc_start(pid) != st.get("pid_start"):
            return
        try:
            self.fd = os.pidfd_open(pid)
        except OSError:
            return

    def wait(self, timeout):
        """Sleep up to ``timeout`` seconds, less when the supervisor exits meanwhile."""
        if self.fd is None and not self.spent:
            self._open()
        if self.fd is None:
            time.sleep(timeout)
            return
        import select

        if select.select([self.fd], [], [], timeout)[0]:
            self.close()  # it has exited: from here on, polls alone

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.close()


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


def _missing(prog):
    """An error like the one starting ``prog`` would give when it is on no PATH directory, else None: a tool
    that is not installed (amd-smi on an NVIDIA machine) costs a few stats, not a process start."""
    dirs = [""] if os.sep in prog else os.environ.get("PATH", os.defpath).split(os.pathsep)
    for d in dirs:
        if os.access(os.path.join(d, prog) if d else prog, os.X_OK):
            return None
    return "[Errno %d] %s: %r" % (errno.ENOENT, os.strerror(errno.ENOENT), prog)


def _run(argv, timeout=15):
    missing = _missing(argv[0])
    if missing:
        return None, missing
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


def nvml_query(with_processes=True):
    """NVIDIA GPUs and their compute processes asked of NVML (``libnvidia-ml.so.1``, what nvidia-smi itself
    asks) in this process: ``(gpus, procs)`` in the shapes ``nvidia_smi_gpus`` and ``nvidia_smi_processes``
    give, or None where NVML cannot be loaded or answers with an error (then nvidia-smi is asked). Only for a
    process that starts no job afterwards (``meshrun gpus``): NVML keeps the driver's control device open."""
    if not os.path.exists("/dev/nvidiactl"):
        return None  # no NVIDIA driver here: not even ctypes is loaded
    try:
        import ctypes

        nv = ctypes.CDLL("libnvidia-ml.so.1")
    except (OSError, ImportError):
        return None

    class Memory(ctypes.Structure):
        _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

    class Process(ctypes.Structure):
        _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                    ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]

    try:
        if nv.nvmlInit_v2() != 0:
            return None
    except AttributeError:
        return None
    try:
        count = ctypes.c_uint()
        if nv.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        gpus, procs = [], []
        for i in range(count.value):
            h = ctypes.c_void_p()
            name, uuid, mem = ctypes.create_string_buffer(96), ctypes.create_string_buffer(96), Memory()
            if (nv.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(h)) or nv.nvmlDeviceGetName(h, name, 96)
                    or nv.nvmlDeviceGetUUID(h, uuid, 96) or nv.nvmlDeviceGetMemoryInfo(h, ctypes.byref(mem))):
                return None
            u = uuid.value.decode(errors="replace")
            gpus.append({"index": i, "uuid": u, "name": name.value.decode(errors="replace"),
                         "memory": (mem.total >> 20) << 20})  # whole MiB, as nvidia-smi reports it
            if not with_processes:
                continue
            n = ctypes.c_uint(0)
            table = (Process * 256)()
            n.value = 256
            if nv.nvmlDeviceGetComputeRunningProcesses_v3(h, ctypes.byref(n), table) != 0:
                return None
            for p in table[: n.value]:
                pname = ctypes.create_string_buffer(1024)
                got = nv.nvmlSystemGetProcessName(p.pid, pname, 1024) == 0
                used = "" if p.usedGpuMemory >= (1 << 63) else str(p.usedGpuMemory >> 20)
                procs.append({"pid": int(p.pid), "gpu_uuid": u, "used_memory": used,
                              "process_name": pname.value.decode(errors="replace") if got else ""})
        return gpus, procs
    except AttributeError:  # a driver too old for these calls
        return None
    finally:
        nv.nvmlShutdown()


NVIDIA_APPS = ["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory,process_name",
               "--format=csv,noheader,nounits"]


def _start(argv):
    """``argv`` started now, its answer read later by ``_finish`` (two tools asked at once); None if it
    cannot start."""
    if _missing(argv[0]):
        return None
    try:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError:
        return None


def _finish(p, timeout=15):
    """What ``_run`` returns, for a process ``_start`` started (None: killed, as not needed)."""
    if p is None:
        return None, "not started"
    try:
        out, errout = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        p.kill()
        p.communicate()
        return None, str(e)
    if p.returncode != 0:
        return None, (errout or out).decode(errors="replace").strip() or "exit %d" % p.returncode
    return out.decode(errors="replace"), None


def nvidia_smi_processes(started=None):
    """Compute processes on the GPUs: (list of {pid, gpu_uuid, used_memory, process_name}, error). ``started``:
    the query already running (``_start(NVIDIA_APPS)``)."""
    out, err = _finish(started) if started is not None else _run(NVIDIA_APPS)
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
    """``MESHRUN_GPUS``: "0,1,2,3", "0-3", "none" or "" (no GPUs); indices only (see ``parse_declared_gpus``)."""
    return [i for _, i in parse_declared_gpus(value)]


def parse_declared_gpus(value):
    """``MESHRUN_GPUS`` as [(vendor, index), ...]: "0-3" (NVIDIA), "amd:0-7" (AMD), "0-1,amd:0-1" (both),
    "none" or "" (no GPUs). A vendor prefix holds for the items after it, up to the next prefix."""
    value = value.strip()
    if value.lower() in ("", "none"):
        return []
    out, vendor = [], "nvidia"
    for part in value.split(","):
        part = part.strip()
        if ":" in part:
            vendor, part = part.split(":", 1)
            vendor = vendor.strip().lower()
            if vendor not in ("nvidia", "amd"):
                raise ValueError("MESHRUN_GPUS: unknown GPU vendor %r (nvidia or amd, e.g. 'amd:0-7')" % vendor)
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend((vendor, i) for i in range(int(a), int(b) + 1))
        elif part:
            out.append((vendor, int(part)))
    if len(set(out)) != len(out) or any(i < 0 or i >= AMD_SLOT_BASE for _, i in out):
        raise ValueError("MESHRUN_GPUS must list distinct GPU indices, e.g. '0,1,2,3' or '0-3' ('amd:0-7' for AMD)")
    return out


# AMD GPUs (ROCm). Their lease slots are AMD_SLOT_BASE + the GPU's index, so a machine with GPUs of both
# vendors keeps one lease table without the two index spaces colliding (an NVIDIA GPU 0 and an AMD GPU 0
# are different GPUs); "device" is the index the vendor's own tools and masking variables use.
AMD_SLOT_BASE = 1000
VENDORS = ("nvidia", "amd", "apple")


def _amd_size(v):
    """Bytes from amd-smi's "196592 MB" / {"value": 196592, "unit": "MB"} (MB as amd-smi means it: MiB)."""
    if isinstance(v, dict):
        v = "%s %s" % (v.get("value"), v.get("unit") or "")
    parts = str(v or "").split()
    try:
        n = float(parts[0])
    except (ValueError, IndexError):
        return None
    unit = (parts[1] if len(parts) > 1 else "B").upper()
    scale = {"B": 1, "KB": 1 << 10, "KIB": 1 << 10, "MB": 1 << 20, "MIB": 1 << 20, "GB": 1 << 30, "GIB": 1 << 30}
    return int(n * scale.get(unit, 1))


def _amd_text_records(text):
    """amd-smi's human output ("GPU: 0" then indented "SECTION:" / "KEY: value" lines) as
    [{"gpu": 0, "ASIC.MARKET_NAME": ..., "BUS.BDF": ..., "VRAM.SIZE": ...}, ...]."""
    recs, stack = [], []
    for line in text.splitlines():
        if not line.strip() or ":" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        key, _, value = line.strip().partition(":")
        key, value = key.strip(), value.strip()
        if indent == 0:
            if key == "GPU" and value.isdigit():
                recs.append({"gpu": int(value)})
            stack = []
            continue
        if not recs:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if value:
            recs[-1][".".join([s for _, s in stack] + [key])] = value
        else:
            stack.append((indent, key))
    return recs


def amd_smi_gpus():
    """AMD GPUs as amd-smi reports them: (list of dicts, error or None). ``amd-smi list`` gives every GPU
    (index, BDF, UUID), ``amd-smi static --asic --vram`` their names and memory. Their human output is read:
    its layout has stayed the same across ROCm releases, where the JSON's has not (a list in ROCm 6,
    {"gpu_data": [...]} later)."""
    out, err = _run(["amd-smi", "list"])
    if out is None:
        return [], err
    static, _ = _run(["amd-smi", "static", "--asic", "--vram"])
    details = dict((r["gpu"], r) for r in _amd_text_records(static or ""))
    listed = _amd_text_records(out)
    # ROCr (and so HIP) numbers GPUs in the order of their KFD nodes, not amd-smi's: where every GPU shows its
    # NODE_ID, a GPU's place among them is the index ROCR_VISIBLE_DEVICES takes
    nodes = [r.get("NODE_ID", "") for r in listed]
    rocr = (dict((r["gpu"], sorted(int(n) for n in nodes).index(int(r["NODE_ID"]))) for r in listed)
            if all(n.isdigit() for n in nodes) and len(set(nodes)) == len(nodes) else {})
    gpus = []
    for r in listed:
        d = details.get(r["gpu"], {})
        uuid = r.get("UUID") or ""
        ident = uuid if uuid and uuid != "N/A" and not uuid.startswith("<") else (r.get("BDF") or str(r["gpu"]))
        gpus.append({"index": AMD_SLOT_BASE + r["gpu"], "device": r["gpu"], "rocr": rocr.get(r["gpu"], r["gpu"]),
                     "vendor": "amd", "name": d.get("ASIC.MARKET_NAME") or "AMD GPU", "uuid": "AMD-%s" % ident,
                     "memory": _amd_size(d.get("VRAM.SIZE"))})
    return gpus, None


def _rocm_card_index(key):
    return int(key[4:]) if key.startswith("card") and key[4:].isdigit() else None


def rocm_smi_gpus():
    """AMD GPUs as ``rocm-smi --showproductname --showmeminfo vram --showbus --json`` reports them, where
    only the older rocm-smi is installed: (list of dicts, error or None)."""
    out, err = _run(["rocm-smi", "--showproductname", "--showmeminfo", "vram", "--showbus", "--json"])
    if out is None:
        return [], err
    try:
        data = json.loads(out[out.find("{"):]) if "{" in out else {}
    except ValueError as e:
        return [], "rocm-smi printed no JSON: %s" % e
    gpus = []
    for key, card in sorted(data.items(), key=lambda kv: _rocm_card_index(kv[0]) or 0):
        i = _rocm_card_index(key)
        if i is None or not isinstance(card, dict):
            continue
        name = card.get("Card Series") or card.get("Device Name") or card.get("Card series") or "AMD GPU"
        bus = card.get("PCI Bus") or card.get("Unique ID")
        mem = card.get("VRAM Total Memory (B)")
        gpus.append({"index": AMD_SLOT_BASE + i, "device": i, "vendor": "amd", "name": name,
                     "uuid": "AMD-%s" % (bus if bus and bus != "N/A" else i),
                     "memory": int(mem) if str(mem or "").isdigit() else None})
    return gpus, None


def amd_gpus():
    """AMD GPUs from amd-smi, else rocm-smi: (list, tool, error or None)."""
    gpus, err = amd_smi_gpus()
    if gpus or err is None:
        return gpus, "amd-smi", err
    gpus2, err2 = rocm_smi_gpus()
    if gpus2 or err2 is None:
        return gpus2, "rocm-smi", err2
    return [], "amd-smi", err


def _amd_mib(v):
    b = _amd_size(v)
    return "%d" % (b >> 20) if b is not None else ""


def amd_smi_processes():
    """Compute processes on AMD GPUs from ``amd-smi process --json``: (list of {pid, gpu (index), used_memory
    (MiB), process_name}, error)."""
    out, err = _run(["amd-smi", "process", "--json"])
    if out is None:
        return [], err
    try:
        data = json.loads(out[min(i for i in (out.find("["), out.find("{"), len(out)) if i >= 0):] or "[]")
    except ValueError as e:
        return [], "amd-smi printed no JSON: %s" % e
    if isinstance(data, dict):
        data = data.get("gpu_data") or []
    procs = []
    for entry in data if isinstance(data, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("gpu"), int):
            continue
        plist = entry.get("process_list") or []
        for item in plist if isinstance(plist, list) else []:
            info = item.get("process_info") if isinstance(item, dict) else None
            if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
                continue  # "No running processes detected"
            mem = info.get("mem_usage") or (info.get("memory_usage") or {}).get("vram_mem") or info.get("mem")
            procs.append({"pid": info["pid"], "gpu": entry["gpu"], "used_memory": _amd_mib(mem),
                          "process_name": str(info.get("name") or "")})
    return procs, None


def rocm_smi_processes():
    """Compute processes on AMD GPUs from rocm-smi: ``--showpids`` (pid, name, VRAM) joined with
    ``--showpidgpus`` (which GPUs each pid uses): (list, error)."""
    out, err = _run(["rocm-smi", "--showpids"])
    if out is None:
        return [], err
    info = {}
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 4 and cols[0].isdigit():
            vram = cols[3]
            info[int(cols[0])] = (cols[1], "%d" % (int(vram) >> 20) if vram.isdigit() else "")
    if not info:
        return [], None
    out, err = _run(["rocm-smi", "--showpidgpus"])
    if out is None:
        return [], err
    procs, pid = [], None
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 4 and words[0] == "PID" and words[1].isdigit() and words[2:4] == ["is", "using"]:
            pid = int(words[1])  # "PID 1949829 is using 2 DRM device(s):", then its GPUs on one line or more
        elif pid is not None and words and all(w.isdigit() for w in words):
            name, mem = info.get(pid, ("", ""))
            procs.extend({"pid": pid, "gpu": int(w), "used_memory": mem, "process_name": name} for w in words)
        else:
            pid = None
    return procs, None


def amd_processes(gpus, tool):
    """Processes on the AMD GPUs in ``gpus``, each with the ``gpu_uuid`` of its GPU: (list, error)."""
    procs, err = (rocm_smi_processes() if tool == "rocm-smi" else amd_smi_processes())
    by_device = dict((g["device"], g["uuid"]) for g in gpus if g.get("vendor") == "amd")
    out = []
    for p in procs:
        if p["gpu"] in by_device:
            out.append({"pid": p["pid"], "gpu_uuid": by_device[p["gpu"]], "used_memory": p["used_memory"],
                        "process_name": p["process_name"]})
    return out, err


# Apple Silicon: the whole machine is one Metal (MPS) device. There is nothing to mask, so GPU jobs are
# serialised by the lease table alone: one at a time.
APPLE_SLOT = 2000


def machine_platform(env=None):
    """(system, machine), e.g. ("Linux", "x86_64") or ("Darwin", "arm64"); ``MESHRUN_PLATFORM`` ("Darwin-arm64")
    stands in for the real one (tests, and a Mac seen through an emulator)."""
    env = os.environ if env is None else env
    fake = env.get("MESHRUN_PLATFORM")
    if fake:
        system, _, machine = fake.partition("-")
        return system, machine
    u = os.uname()
    return u.sysname, u.machine


def apple_gpu(env=None):
    """The Mac's one MPS device, or None when this is not Apple Silicon."""
    system, machine = machine_platform(env)
    if system != "Darwin" or machine != "arm64":
        return None
    out, _ = _run(["sysctl", "-n", "machdep.cpu.brand_string", "hw.memsize"], timeout=5)
    lines = (out or "").split("\n")
    name = lines[0].strip() if lines and lines[0].strip() else "Apple Silicon"
    mem = lines[1].strip() if len(lines) > 1 else ""
    return {"index": APPLE_SLOT, "device": 0, "vendor": "apple", "name": "%s (MPS)" % name,
            "uuid": "MPS-0", "memory": int(mem) if mem.isdigit() else None}


def _declared(vendor, i):
    if vendor == "amd":
        return {"index": AMD_SLOT_BASE + i, "device": i, "vendor": "amd", "uuid": "AMD-declared-%d" % i,
                "name": "declared", "memory": None}
    return {"index": i, "device": i, "vendor": "nvidia", "uuid": "GPU-declared-%d" % i, "name": "declared",
            "memory": None}


def discover_gpus(env=None, nvidia=None):
    """The GPUs meshrun may hand out here: (gpus, source, error), each GPU with its ``vendor``, its
    ``device`` index (the vendor's numbering) and its ``label`` in ``meshrun gpus``; see ``_discover``.
    ``nvidia``: the NVIDIA GPUs already asked of NVML (``nvml_query``), instead of nvidia-smi."""
    gpus, source, err = _discover(os.environ if env is None else env, nvidia)
    for g in gpus:
        g["label"] = gpu_label(g)
    return gpus, source, err


def _discover(env, nvidia=None):
    """The GPUs meshrun may hand out here: (gpus, source, error).

    NVIDIA GPUs from nvidia-smi, AMD GPUs from amd-smi (or rocm-smi), a Mac's MPS device from the platform.
    ``MESHRUN_GPUS`` restricts discovery to those indices (taking their details from the tools when they
    answer) or declares them outright on a machine without them."""
    declared = env.get("MESHRUN_GPUS")
    mps = apple_gpu(env)
    if mps is not None:
        if declared is not None and not parse_declared_gpus(declared):
            return [], "MESHRUN_GPUS", None
        return [mps], "platform (Apple Silicon: one MPS device)", None
    smi, err = (nvidia, None) if nvidia is not None else nvidia_smi_gpus()
    for g in smi:
        g.setdefault("vendor", "nvidia")
        g.setdefault("device", g["index"])
    amd, tool, aerr = amd_gpus()
    for g in amd:
        g["smi"] = tool
    if declared is None:
        if smi and amd:
            return smi + amd, "nvidia-smi, " + tool, None
        if amd:
            return amd, tool, None
        return smi, "NVML" if nvidia is not None else "nvidia-smi", err
    wanted = parse_declared_gpus(declared)
    by_key = dict(((g["vendor"], g["device"]), g) for g in smi + amd)
    gpus = [by_key.get(k) or _declared(*k) for k in wanted]
    return gpus, "MESHRUN_GPUS", None


def gpu_label(g):
    """How ``meshrun gpus`` names a GPU: its index (NVIDIA), "amd:<index>", or "mps"."""
    vendor = g.get("vendor") or "nvidia"
    return "mps" if vendor == "apple" else ("amd:%s" % g.get("device") if vendor == "amd" else str(g["index"]))


def gpu_notes(gpus):
    """What ``meshrun gpus`` says about the kinds of GPU here, beyond the table."""
    if any(g.get("vendor") == "apple" for g in gpus):
        return ["Apple Silicon: one MPS device for the whole machine; nothing can mask it, so jobs that ask for "
                "a GPU run one at a time (serialised by the lease table)"]
    if len(set(g.get("vendor") or "nvidia" for g in gpus)) > 1:
        return ["GPUs of more than one vendor: a job gets GPUs of one vendor and model (ask for a type, e.g. "
                "MI300X:8 or H100:8, to choose)"]
    return []


def _real_gpus(gpus, vendor=None):
    """True when at least one GPU (of ``vendor``) came from a vendor tool (declared-only GPUs have no
    processes to ask about)."""
    return any(g.get("name") != "declared" and (vendor is None or g.get("vendor", "nvidia") == vendor)
               for g in gpus)


def gpu_processes(gpus, started=None, nvidia=None):
    """Compute processes on ``gpus`` from each vendor's tool: (list of {pid, gpu_uuid, used_memory (MiB),
    process_name}, error or None). ``started``: nvidia-smi's query started ahead (ended here if not needed);
    ``nvidia``: the NVIDIA processes already asked of NVML."""
    procs, errs = [], []
    if nvidia is not None:
        procs.extend(nvidia)
    elif _real_gpus(gpus, "nvidia"):
        p, e = nvidia_smi_processes(started)
        procs.extend(p)
        errs.append(e)
    elif started is not None:
        started.kill()
        started.communicate()
    amd = [g for g in gpus if g.get("vendor") == "amd" and g.get("name") != "declared"]
    if amd:
        p, e = amd_processes(gpus, amd[0].get("smi"))
        procs.extend(p)
        errs.append(e)
    return procs, "; ".join(e for e in errs if e) or None


def gpu_matches(gpu, gpu_type):
    if not gpu_type:
        return True
    norm = lambda s: "".join(ch for ch in s.lower() if ch.isalnum())  # noqa: E731
    return norm(gpu_type) in norm(gpu.get("name") or "") or norm(gpu_type) == gpu.get("vendor")


def gpu_groups(gpus, gpu_type=None):
    """The GPUs that may serve one job, as groups of one vendor and model each (a job never gets a mix),
    matching ``gpu_type``: NVIDIA first, then AMD, then Apple; within a vendor, in index order."""
    groups = {}
    for g in sorted(gpus, key=lambda g: g["index"]):
        if gpu_matches(g, gpu_type):
            groups.setdefault((g.get("vendor") or "nvidia", g.get("name")), []).append(g)
    return [groups[k] for k in sorted(groups, key=lambda k: (VENDORS.index(k[0]) if k[0] in VENDORS else 9,
                                                             groups[k][0]["index"]))]


def fit_gpus(gpus, n, gpu_type=None):
    """``n`` GPUs of one kind from ``gpus`` (the first group that has enough), or None."""
    for grp in gpu_groups(gpus, gpu_type):
        if len(grp) >= n:
            return grp[:n]
    return None


def mask_env(gpus):
    """The variables that show a job its leased ``gpus`` and nothing else (all of one vendor):

    * NVIDIA: ``CUDA_VISIBLE_DEVICES`` (their indices, in PCI bus order);
    * AMD: ``ROCR_VISIBLE_DEVICES`` (their ROCr indices: ROCr, under every ROCm runtime, shows only those) and
      ``HIP_VISIBLE_DEVICES``/``CUDA_VISIBLE_DEVICES`` counting from 0 (HIP numbers the devices ROCr left it,
      and PyTorch on ROCm reads either);
    * Apple (MPS): nothing can be masked; the lease alone keeps other jobs off.

    A CPU job gets ``CUDA_VISIBLE_DEVICES=""`` (and, on a machine with AMD GPUs, ``ROCR_VISIBLE_DEVICES``
    naming none) so it cannot wander onto a GPU someone else leased."""
    if not gpus:
        env = {"CUDA_VISIBLE_DEVICES": ""}
        if os.path.exists("/dev/kfd"):
            env["ROCR_VISIBLE_DEVICES"] = env["HIP_VISIBLE_DEVICES"] = "-1"
        return env
    env = {"MESHRUN_GPU_UUIDS": ",".join(g["uuid"] for g in gpus)}
    vendor = gpus[0].get("vendor") or "nvidia"
    devices = ",".join(str(g.get("device", g["index"])) for g in gpus)
    if vendor == "amd":
        env["ROCR_VISIBLE_DEVICES"] = ",".join(str(g.get("rocr", g.get("device", g["index"]))) for g in gpus)
        env["HIP_VISIBLE_DEVICES"] = env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(gpus)))
    elif vendor == "nvidia":
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = devices
    return env


# --------------------------------------------------------------------------------------------------
# leases
#
# The machine-wide lease directory (MESHRUN_LEASE_DIR) is shared by every OS user of the host, so every
# user's agent treats everything in it as chosen by a possibly hostile user: nothing in it is followed
# (O_NOFOLLOW), opened without O_NONBLOCK (a FIFO must not block), trusted before fstat (a regular file,
# one link, the expected owner, a size cap) or chmodded unless the same call created it (O_EXCL). All
# access goes through a descriptor of the directory itself. docs/architecture.md ("Threat model") says
# what another local user can and cannot do to the leases.
#
#   lock                      flocked (exclusive) around every read-modify-write of the leases
#   leases.json               ticket counter, recent GPU use per user (fair share), and entries of
#                             older agents; rewritten in place (every user must be able to write it)
#   hold-<uid>-<token>.json   one per waiting or leased job, owned by its user and flocked by the
#                             job's supervisor (and inherited by the job's processes) for as long as
#                             the job lives: a hold is live exactly while its flock is held, which any
#                             user can probe (LOCK_NB) without seeing the holder's processes (hidepid,
#                             PID namespaces and PID reuse cannot free a live lease)


class LeaseError(Exception):
    pass


LEASE_TABLE = "leases.json"
LEASE_LOCK = "lock"
HOLD_PREFIX = "hold-"
USAGE_PREFIX = "usage-"  # usage-<uid>.jsonl: one line per ended lease of that user's, appended by that user
USAGE_MAX_BYTES = 8 << 20  # then the file is renamed to usage-<uid>.1.jsonl (the older one goes) and begun again
TABLE_MAX_BYTES = 1 << 20
HOLD_MAX_BYTES = 64 << 10
LOCK_TIMEOUT = 30.0
MAX_GPUS_PER_JOB = 1024

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def lease_dir(env=None):
    env = os.environ if env is None else env
    return env.get("MESHRUN_LEASE_DIR") or DEFAULT_LEASE_DIR


def _env_float(env, name, default):
    try:
        return float(env.get(name) or default)
    except ValueError:
        return default


def uid_name(uid):
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except Exception:
        return "uid %s" % uid


def _who(st):
    return "owner %s (uid %d), mode %04o" % (uid_name(st.st_uid), st.st_uid, st.st_mode & 0o7777)


def _pwrite_all(fd, data, offset=0):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _rewrite_in_place(fd, data, old_size):
    """Replace a file's content under a lock: pad with blanks to the old size, then trim, so that a writer
    killed half-way leaves valid JSON (with trailing blanks) rather than a torn file."""
    pad = max(0, old_size - len(data))
    _pwrite_all(fd, data + b" " * pad, 0)
    if pad:
        os.ftruncate(fd, len(data))


def read_to_end(fd):
    """Everything a pipe's writers send until the last of them closes it (or exits, or execs: close-on-exec)."""
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _read_fd(fd, limit):
    chunks, off = [], 0
    while off < limit:
        b = os.pread(fd, min(65536, limit - off), off)
        if not b:
            break
        chunks.append(b)
        off += len(b)
    return b"".join(chunks)


def _flock_holder(st):
    """Who holds a flock on the file with stat ``st``, from /proc/locks: "pid N (comm, user U)" or None."""
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    dev = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in lines:
        parts = line.split()
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        if parts[5].lower() != dev:
            continue
        pid = parts[4]
        try:
            with open("/proc/%s/comm" % pid) as f:
                comm = f.read().strip()
            owner = uid_name(os.stat("/proc/%s" % pid).st_uid)
            return "pid %s (%s, user %s)" % (pid, _clean(comm), owner)
        except OSError:
            return "pid %s (a process this user cannot see)" % pid
    return None


def _clean(s, limit=200):
    """A string another user wrote, made safe to print: control characters shown escaped, length capped."""
    s = s if isinstance(s, str) else str(s)
    out = []
    for ch in s[:limit]:
        o = ord(ch)
        if o < 32 or o == 127 or 0x80 <= o < 0xA0 or 0x202A <= o <= 0x202E or 0x2066 <= o <= 0x2069:
            out.append("\\x%02x" % o if o < 256 else "\\u%04x" % o)
        else:
            out.append(ch)
    return "".join(out) + ("..." if len(s) > limit else "")


def _is_int(v, lo=0, hi=1 << 62):
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _opt_str(v, limit=4096):
    return v is None or (isinstance(v, str) and len(v) <= limit)


def _valid_legacy_lease(rec):
    return (isinstance(rec, dict) and _is_int(rec.get("pid"), 1) and (rec.get("sid") is None or _is_int(rec.get("sid")))
            and (rec.get("uid") is None or _is_int(rec.get("uid"))) and (rec.get("since") is None or _is_num(rec.get("since")))
            and _opt_str(rec.get("user")) and _opt_str(rec.get("job_id")) and _opt_str(rec.get("name")))


def _valid_legacy_ticket(t):
    return (_valid_legacy_lease(t) and _is_int(t.get("ticket")) and _is_int(t.get("gpus"), 1, MAX_GPUS_PER_JOB)
            and _opt_str(t.get("gpu_type"), 200))


def _fresh_table():
    return {"boot_id": boot_id(), "gpus": {}, "queue": [], "seq": 0, "usage": {}, "ended": {}}


class Leases:
    """The machine-wide lease table: which job holds which GPU, and who waits in line (see above).

    ``with leases:`` takes the lock; ``load()`` then returns the state (live holds merged with the table),
    ``save(state)`` writes the table back. A supervisor takes a ticket (``take_ticket``), is granted GPUs
    (``grant``) and gives them back (``drop_hold``); its hold file stays flocked in between."""

    def __init__(self, path=None, env=None, shared=True):
        self.env = os.environ if env is None else env
        self.path = path or lease_dir(self.env)
        self.shared = shared  # False: the lease service's own directory (root's, 0700)
        self.service = None  # the lease service's socket, when a supervisor's hold came from it
        self._dfd = None
        self._lfd = None
        self._tfd = None
        self._table_size = 0
        self._table_st = None
        self.writable = True
        self.warnings = []
        self.hold_fd = None
        self.hold_name = None
        self.hold_rec = None

    # -- the directory
    def _where(self, name=None):
        return os.path.join(self.path, name) if name else self.path

    def _unusable(self, name, what, st=None):
        who = (" (%s)" % _who(st)) if st is not None else ""
        return ("the GPU lease table at %s is unusable: %s%s; meshrun hands out no GPUs until it is fixed. "
                "Fix: its owner or root removes it (rm -rf %s); meshrun then starts a fresh one"
                % (self._where(name), what, who, self._where(name)))

    def _open_dir(self):
        flags = os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC
        created = False
        try:
            dfd = os.open(self.path, flags)
        except FileNotFoundError:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                os.mkdir(self.path, 0o700)
                created = True
            except FileExistsError:
                pass
            except OSError as e:
                raise LeaseError("cannot create the GPU lease directory %s: %s (set MESHRUN_LEASE_DIR to a "
                                 "directory every user of this machine can write)" % (self.path, e.strerror or e))
            dfd = self._open_existing_dir(flags)
        except OSError:
            dfd = self._open_existing_dir(flags)
        st = os.fstat(dfd)
        if not self.shared:
            if st.st_uid != os.getuid() or st.st_mode & 0o077:
                os.close(dfd)
                raise LeaseError("the lease service's directory %s must be its own with mode 0700 (%s)" % (self.path, _who(st)))
            return dfd
        if st.st_uid == os.getuid() and (created or (st.st_mode & 0o002 and not st.st_mode & 0o1000)):
            # ours (checked on the open descriptor): shared by every user, and sticky so that nobody can
            # remove or replace another user's files in it
            os.fchmod(dfd, 0o1777)
            st = os.fstat(dfd)
        self.warnings = self._dir_warnings(st)
        return dfd

    def _open_existing_dir(self, flags):
        try:
            return os.open(self.path, flags)
        except OSError as e:
            try:
                st = os.lstat(self.path)
                what = "it is a symbolic link" if stat.S_ISLNK(st.st_mode) else (
                    "it is not a directory" if not stat.S_ISDIR(st.st_mode) else "it cannot be opened (%s)" % e.strerror)
            except OSError:
                st, what = None, "it cannot be opened (%s)" % (e.strerror or e)
            raise LeaseError(self._unusable(None, what, st))

    def _dir_warnings(self, st):
        out = []
        if st.st_uid not in (0, os.getuid()):
            out.append("the lease directory %s belongs to %s, who can remove or rewrite every lease in it; an "
                       "admin can make it root's: sudo chown root %s (or use the enforced mode: docs/architecture.md)"
                       % (self.path, uid_name(st.st_uid), self.path))
        if st.st_mode & 0o002 and not st.st_mode & 0o1000:
            out.append("the lease directory %s is writable by every user without the sticky bit, so any user can "
                       "remove another's leases; its owner can fix it: chmod +t %s" % (self.path, self.path))
        return out

    # -- locking
    def _open_lock(self):
        flags = os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK
        try:
            fd = os.open(LEASE_LOCK, flags, dir_fd=self._dfd)
        except FileNotFoundError:
            try:
                fd = os.open(LEASE_LOCK, flags | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=self._dfd)
                os.fchmod(fd, 0o644)  # created by this call (umask must not make it unreadable to others)
            except FileExistsError:
                fd = self._reopen(LEASE_LOCK, flags)
            except OSError as e:
                raise LeaseError("cannot create %s: %s (the lease directory must be writable by every user of "
                                 "this machine; set MESHRUN_LEASE_DIR to use another)" % (self._where(LEASE_LOCK), e.strerror))
        except OSError:
            fd = self._reopen(LEASE_LOCK, flags)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise LeaseError(self._unusable(LEASE_LOCK, "it is not a regular file", st))
        return fd

    def _reopen(self, name, flags):
        try:
            return os.open(name, flags, dir_fd=self._dfd)
        except OSError as e:
            try:
                st = os.stat(name, dir_fd=self._dfd, follow_symlinks=False)
            except OSError:
                st = None
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise LeaseError(self._unusable(name, "it is a symbolic link", st))
            raise LeaseError(self._unusable(name, "it cannot be opened (%s)" % (e.strerror or e), st))

    def _flock(self, fd, timeout):
        import fcntl

        deadline = now() + timeout
        delay = 0.002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise
            if now() >= deadline:
                holder = _flock_holder(os.fstat(fd)) or "a process this user cannot see"
                raise LeaseError(
                    "the GPU lease table at %s has been locked for more than %ss by %s; meshrun hands out no "
                    "GPUs until it is free. If that process is stuck, its owner or root can end it"
                    % (self.path, _fmt_secs(timeout), holder))
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def __enter__(self):
        if self._dfd is None:
            self._dfd = self._open_dir()
        try:
            self._lfd = self._open_lock()
            self._flock(self._lfd, _env_float(self.env, "MESHRUN_LEASE_LOCK_TIMEOUT", LOCK_TIMEOUT))
        except BaseException:
            self._close_fds()
            raise
        return self

    def __exit__(self, *exc):
        self._close_fds()

    def _close_fds(self):
        for name in ("_tfd", "_lfd"):
            fd = getattr(self, name)
            if fd is not None:
                try:
                    os.close(fd)  # closing the lock's only descriptor releases the flock
                except OSError:
                    pass
                setattr(self, name, None)
        if self.hold_fd is None and self._dfd is not None:
            os.close(self._dfd)
            self._dfd = None

    def close(self):
        """Forget the hold (its flock goes with the descriptor) and the directory."""
        if self.hold_fd is not None:
            try:
                os.close(self.hold_fd)
            except OSError:
                pass
            self.hold_fd = self.hold_name = self.hold_rec = None
        self._close_fds()

    # -- the table (call only while locked)
    def _open_table(self):
        flags = _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK
        self.writable = True
        try:
            fd = os.open(LEASE_TABLE, os.O_RDWR | flags, dir_fd=self._dfd)
        except FileNotFoundError:
            try:
                fd = os.open(LEASE_TABLE, os.O_RDWR | os.O_CREAT | os.O_EXCL | flags, 0o666, dir_fd=self._dfd)
                os.fchmod(fd, 0o666)  # created by this call: every user's agent must be able to update it
            except FileExistsError:
                fd = self._reopen(LEASE_TABLE, os.O_RDWR | flags)
        except PermissionError:
            fd = self._reopen(LEASE_TABLE, os.O_RDONLY | flags)
            self.writable = False
        except OSError:
            fd = self._reopen(LEASE_TABLE, os.O_RDWR | flags)
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "it is not a regular file"
        elif st.st_nlink != 1:
            problem = "it has %d hard links (another file's content must never be written through it)" % st.st_nlink
        elif st.st_size > TABLE_MAX_BYTES:
            problem = "it is %d bytes, more than the %d a lease table can be" % (st.st_size, TABLE_MAX_BYTES)
        elif st.st_uid != os.getuid() and (st.st_mode & 0o666) != 0o666 and self.writable:
            problem = "it is not the shared table meshrun creates (mode 0666)"
        if problem:
            os.close(fd)
            raise LeaseError(self._unusable(LEASE_TABLE, problem, st))
        self._table_st = st
        return fd

    def _parse_table(self, raw):
        if not raw.strip():
            return _fresh_table()
        try:
            state = json.loads(raw.decode())
        except (ValueError, UnicodeDecodeError) as e:
            raise LeaseError(self._unusable(LEASE_TABLE, "it is not valid JSON (%s)" % e, self._table_st))
        if not isinstance(state, dict):
            raise LeaseError(self._unusable(LEASE_TABLE, "it holds a JSON %s, not an object" % type(state).__name__,
                                            self._table_st))
        if state.get("boot_id") != boot_id():
            return _fresh_table()  # a reboot: nobody can hold anything any more
        out = _fresh_table()
        out["seq"] = state.get("seq") if _is_int(state.get("seq")) else 0
        if not _is_int(state.get("seq")):
            self._warn("dropped the ticket counter of %s (not a number)" % self._where(LEASE_TABLE))
        gpus = state.get("gpus") if isinstance(state.get("gpus"), dict) else {}
        for k, rec in gpus.items():
            if _valid_legacy_lease(rec) and k.isdigit():
                out["gpus"][k] = rec
            else:
                self._warn("dropped a broken lease entry for GPU %s from %s" % (_clean(k, 20), self._where(LEASE_TABLE)))
        queue = state.get("queue") if isinstance(state.get("queue"), list) else []
        for t in queue:
            if _valid_legacy_ticket(t):
                out["queue"].append(t)
            else:
                self._warn("dropped a broken queue entry from %s" % self._where(LEASE_TABLE))
        usage = state.get("usage") if isinstance(state.get("usage"), dict) else {}
        for k, v in usage.items():
            if isinstance(v, list) and len(v) == 2 and _is_num(v[0]) and _is_num(v[1]) and len(k) <= 64:
                out["usage"][k] = [float(v[0]), float(v[1])]
        ended = state.get("ended") if isinstance(state.get("ended"), dict) else {}
        out["ended"] = dict((k, v) for k, v in ended.items() if _is_num(v) and k.startswith(HOLD_PREFIX))
        return out

    def _warn(self, msg):
        if msg not in self.warnings:
            self.warnings.append(msg)

    def load(self):
        """The state: the table, plus every live hold as a lease (``gpus``) or a ticket (``queue``)."""
        if self._tfd is None:
            self._tfd = self._open_table()
        raw = _read_fd(self._tfd, TABLE_MAX_BYTES + 1)
        self._table_size = len(raw)
        state = self._parse_table(raw)
        state["changed"] = self._scan_holds(state)
        return state

    def save(self, state):
        if not self.writable:
            raise LeaseError(self._unusable(LEASE_TABLE, "this user cannot write it", self._table_st))
        out = {
            "boot_id": state.get("boot_id") or boot_id(),
            "seq": state.get("seq", 0),
            "usage": state.get("usage", {}),
            "ended": state.get("ended", {}),
            # entries of older agents (their own leases); holds are never copied here
            "gpus": dict((k, r) for k, r in state["gpus"].items() if "hold" not in r),
            "queue": [t for t in state["queue"] if "hold" not in t],
        }
        data = (json.dumps(out, sort_keys=True) + "\n").encode()
        if len(data) > TABLE_MAX_BYTES:
            raise LeaseError(self._unusable(LEASE_TABLE, "it would grow past %d bytes" % TABLE_MAX_BYTES))
        _rewrite_in_place(self._tfd, data, self._table_size)
        self._table_size = len(data)

    # -- holds
    def _scan_holds(self, state):
        """Merge live holds into ``state``; account for and clean up dead ones. Returns True if the table
        changed (usage of holds that died)."""
        import fcntl

        changed = False
        t = now()
        present = set()
        for name in sorted(os.listdir(self._dfd)):
            if not (name.startswith(HOLD_PREFIX) and name.endswith(".json")):
                continue
            present.add(name)
            try:
                claimed_uid = int(name[len(HOLD_PREFIX):].split("-", 1)[0])
            except ValueError:
                self._warn("ignored %s: not a hold file meshrun writes" % _clean(name))
                continue
            if name == self.hold_name:
                rec = self.hold_rec
                live = True
            else:
                try:
                    fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC, dir_fd=self._dfd)
                except OSError as e:
                    self._warn("ignored %s: %s" % (_clean(name), e.strerror or e))
                    continue
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode) or st.st_size > HOLD_MAX_BYTES:
                        self._warn("ignored %s (%s): not a small regular file" % (_clean(name), _who(st)))
                        continue
                    if st.st_uid not in (claimed_uid, 0):
                        self._warn("ignored %s: it names uid %d but belongs to %s" % (_clean(name), claimed_uid, _who(st)))
                        continue
                    try:
                        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                        live = False
                    except OSError as e:
                        if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                            raise
                        live = True
                    raw = _read_fd(fd, HOLD_MAX_BYTES)
                finally:
                    os.close(fd)
                rec = self._parse_hold(name, raw, claimed_uid, quiet=not live)
                if not live:
                    if rec is not None and rec.get("state") == "leased" and name not in state["ended"]:
                        for idx in rec["gpus"]:
                            record_usage(state, dict(rec, since=rec.get("granted_at")), t)
                        changed = True
                    if st.st_uid == os.getuid():
                        if rec is not None and rec.get("state") == "leased":
                            self.append_usage(dict(rec, ended_by="reclaimed"), state["ended"].get(name, t))
                        try:
                            os.unlink(name, dir_fd=self._dfd)
                        except OSError:
                            pass
                    elif name not in state["ended"]:
                        state["ended"][name] = t  # another user's: they remove it; count its use once
                        changed = True
                    continue
            if rec is None:
                continue
            if rec["state"] == "leased":
                for idx in rec["gpus"]:
                    key = str(idx)
                    if key not in state["gpus"]:
                        state["gpus"][key] = dict(rec, since=rec.get("granted_at"), hold=name)
            else:
                state["queue"].append(dict(rec, gpus=rec["n"], hold=name))
        for name in [n for n in state["ended"] if n not in present]:
            del state["ended"][name]
            changed = True
        return changed

    def _parse_hold(self, name, raw, uid, quiet=False):
        why = None
        try:
            rec = json.loads(raw.decode()) if raw.strip() else None
        except (ValueError, UnicodeDecodeError):
            rec, why = None, "not valid JSON"
        if why is None and not isinstance(rec, dict):
            why = "not a JSON object"
        elif why is None:
            ok = (rec.get("state") in ("waiting", "leased") and _is_int(rec.get("ticket"))
                  and _is_int(rec.get("n"), 1, MAX_GPUS_PER_JOB) and _opt_str(rec.get("gpu_type"), 200)
                  and _opt_str(rec.get("job_id")) and _opt_str(rec.get("name")) and _opt_str(rec.get("user"))
                  and _opt_str(rec.get("job_dir")) and (rec.get("since") is None or _is_num(rec.get("since")))
                  and rec.get("boot_id") == boot_id())
            if ok and rec["state"] == "leased":
                g = rec.get("gpus")
                ok = (isinstance(g, list) and 0 < len(g) <= MAX_GPUS_PER_JOB and all(_is_int(i, 0, 1 << 20) for i in g)
                      and _is_num(rec.get("granted_at")))
            if not ok:
                why = "fields missing or of the wrong type"
        if why:
            if not quiet:
                self._warn("ignored %s: %s" % (_clean(name), why))
            return None
        rec["uid"] = uid  # whose it is comes from the file's name, checked against its owner, not its content
        if rec.get("user") is None:
            rec["user"] = uid_name(uid)
        return rec

    def take_ticket(self, state, meta, n, gpu_type, uid=None, for_peer=False):
        """Queue up (under the lock): a new hold file, flocked for as long as the job lives. Returns the
        ticket. ``uid`` (the lease service only): whose hold it is; the service hands the locked descriptor
        to that user (``lock_for_peer``) instead of keeping it."""
        import fcntl

        uid = os.getuid() if uid is None else uid
        state["seq"] += 1
        for _ in range(100):
            name = "%s%d-%s.json" % (HOLD_PREFIX, uid, os.urandom(8).hex())
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o644,
                             dir_fd=self._dfd)
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover
            raise LeaseError("cannot create a hold file in %s" % self.path)
        os.fchmod(fd, 0o644)  # created by this call
        if not for_peer:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rec = dict(meta)
        rec.update({"state": "waiting", "ticket": state["seq"], "n": n, "gpu_type": gpu_type, "uid": uid,
                    "user": uid_name(uid), "since": now(), "boot_id": boot_id(), "order": "fair-usage"})
        self.hold_fd, self.hold_name, self.hold_rec = fd, name, rec
        self._write_hold(rec)
        state["queue"].append(dict(rec, gpus=n, hold=name))
        return rec["ticket"]

    def lock_for_peer(self):
        """The lease service's side of a new hold: a read-only descriptor of it, flocked, for the user whose
        job it is (the flock, and so the lease, lives exactly as long as that user's processes keep the
        descriptor); the service keeps nothing open. Under the lock."""
        import fcntl

        fd = os.open(self.hold_name, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=self._dfd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(self.hold_fd)
        self.hold_fd = self.hold_name = self.hold_rec = None
        return fd

    def adopt_hold(self, fd, name, service):
        """A supervisor's side of a hold the lease service created for it."""
        self.hold_fd, self.hold_name, self.service = fd, name, service

    def _write_hold(self, rec):
        data = (json.dumps(rec, sort_keys=True) + "\n").encode()
        _rewrite_in_place(self.hold_fd, data, os.fstat(self.hold_fd).st_size)

    def grant(self, state, indices, names=None):
        """Our ticket becomes a lease on ``indices`` (under the lock); ``names``: their models, for the usage
        record."""
        rec = dict(self.hold_rec, state="leased", gpus=list(indices), granted_at=now())
        if names:
            rec["gpu_names"] = [_clean(n, 100) for n in names][:MAX_GPUS_PER_JOB]
        self._write_hold(rec)
        self.hold_rec = rec
        state["queue"] = [t for t in state["queue"] if t.get("hold") != self.hold_name]
        for idx in indices:
            state["gpus"][str(idx)] = dict(rec, since=rec["granted_at"], hold=self.hold_name)

    def drop_hold(self, state):
        """Give our lease or ticket back (under the lock): its use counts for fair share, the file goes."""
        rec = self.hold_rec
        if rec is not None and rec.get("state") == "leased":
            t = now()
            for _ in rec["gpus"]:
                record_usage(state, dict(rec, since=rec.get("granted_at")), t)
            self.append_usage(rec, t)
        try:
            os.unlink(self.hold_name, dir_fd=self._dfd)
        except OSError:
            pass
        fd = self.hold_fd
        self.hold_fd = self.hold_name = self.hold_rec = None
        os.close(fd)

    def update_hold(self, name, rec):
        """Rewrite a hold this process created for someone else (the lease service; under the lock)."""
        fd = os.open(name, os.O_RDWR | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK, dir_fd=self._dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise LeaseError("%s is not a hold of this service's" % self._where(name))
            _rewrite_in_place(fd, (json.dumps(rec, sort_keys=True) + "\n").encode(), st.st_size)
        finally:
            os.close(fd)

    def drop_named(self, state, name):
        """End a hold this process created for someone else (the lease service; under the lock)."""
        recs = [r for r in state["gpus"].values() if r.get("hold") == name]
        if recs:
            t = now()
            for _ in recs:
                record_usage(state, recs[0], t)
            self.append_usage(dict(recs[0], granted_at=recs[0].get("since")), t)
            for k in [k for k, r in state["gpus"].items() if r.get("hold") == name]:
                del state["gpus"][k]
            state["ended"].pop(name, None)
        state["queue"] = [tk for tk in state["queue"] if tk.get("hold") != name]
        try:
            os.unlink(name, dir_fd=self._dfd)
        except OSError:
            pass

    # -- the usage record (meshrun usage): append-only, one file per user, written only by that user
    def append_usage(self, rec, t):
        """Append one ended lease to this user's usage record (under the lock). Never fails the caller: the
        record is a report, not the lease."""
        line = {"v": 1, "uid": rec.get("uid", os.getuid()), "user": rec.get("user"), "job_id": rec.get("job_id"),
                "name": rec.get("name"), "host": rec.get("host") or hostname(), "gpus": rec.get("gpus"),
                "gpu_names": rec.get("gpu_names"), "gpu_type": rec.get("gpu_type"), "queued_at": rec.get("since"),
                "granted_at": rec.get("granted_at"), "ended_at": t}
        if rec.get("ended_by"):
            line["ended_by"] = rec["ended_by"]
        data = (json.dumps(line, sort_keys=True) + "\n").encode()
        name = "%s%d.jsonl" % (USAGE_PREFIX, os.getuid())
        try:
            fd = self._open_own_log(name)
            try:
                if os.fstat(fd).st_size + len(data) > USAGE_MAX_BYTES:
                    os.close(fd)
                    fd = None
                    os.rename(name, "%s%d.1.jsonl" % (USAGE_PREFIX, os.getuid()), src_dir_fd=self._dfd,
                              dst_dir_fd=self._dfd)
                    fd = self._open_own_log(name)
                os.write(fd, data)
            finally:
                if fd is not None:
                    os.close(fd)
        except (OSError, LeaseError) as e:
            self._warn("could not append to the usage record %s: %s" % (self._where(name), getattr(e, "strerror", None) or e))

    def _open_own_log(self, name):
        """This user's usage record, opened for appending through the directory: created exclusively if it
        is not there, never through a link, and used only if it is a regular file of ours with one link."""
        flags = os.O_WRONLY | os.O_APPEND | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC
        try:
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=self._dfd)
            os.fchmod(fd, 0o644)  # created by this call
            return fd
        except FileExistsError:
            fd = os.open(name, flags, dir_fd=self._dfd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.getuid():
            os.close(fd)
            raise LeaseError("it is not a regular file of this user's (%s)" % _who(st))
        return fd

    # -- entries of older agents (agent version < 4): live while their supervisor or session lives
    @staticmethod
    def holder_alive(rec):
        if pid_alive(rec.get("pid"), rec.get("pid_start")):
            return True
        sid = rec.get("sid")
        return bool(sid) and bool(session_members(sid))

    def reclaim(self, state):
        """Drop entries of older agents whose processes are all gone; returns what was dropped. (Holds need
        no reclaiming: ``load`` drops them as soon as their flock is free.)"""
        dropped = []
        t = now()
        for key in list(state["gpus"]):
            rec = state["gpus"][key]
            if "hold" not in rec and not self.holder_alive(rec):
                record_usage(state, state["gpus"].pop(key), t)
                dropped.append(("gpu", key, rec))
        keep = []
        for tk in state["queue"]:
            if "hold" in tk or pid_alive(tk.get("pid"), tk.get("pid_start")):
                keep.append(tk)
            else:
                dropped.append(("ticket", tk.get("ticket"), tk))
        state["queue"] = keep
        if not dropped and state.pop("changed", False):
            dropped.append(("holds", None, None))  # dead holds were accounted: the table changed
        return dropped


def _valid_usage(r):
    return (isinstance(r, dict) and _is_int(r.get("uid")) and isinstance(r.get("gpus"), list)
            and 0 < len(r["gpus"]) <= MAX_GPUS_PER_JOB and all(_is_int(i, 0, 1 << 20) for i in r["gpus"])
            and _is_num(r.get("granted_at")) and _is_num(r.get("ended_at")) and r["ended_at"] >= r["granted_at"]
            and (r.get("queued_at") is None or _is_num(r.get("queued_at")))
            and all(_opt_str(r.get(k), 4096) for k in ("user", "job_id", "name", "host", "gpu_type"))
            and (r.get("gpu_names") is None or (isinstance(r["gpu_names"], list)
                                                and all(isinstance(n, str) for n in r["gpu_names"]))))


def usage_records(path=None, env=None):
    """Every user's usage record in the lease directory (``meshrun usage``): (list of ended leases, warnings).

    The directory is shared with every user, so it is read as the lease table is: the directory opened
    without following a link, each ``usage-<uid>.jsonl`` through it without following one, used only if it
    is a regular file with one link owned by that uid (or root, whose records name their user), at most twice
    USAGE_MAX_BYTES; a line that is not a well-formed record is skipped. Whose a record is comes from the
    file's owner, not from its content."""
    env = os.environ if env is None else env
    path = path or lease_dir(env)
    out, warnings = [], []
    try:
        dfd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC)
    except FileNotFoundError:
        return out, warnings
    except OSError as e:
        return out, ["cannot read the lease directory %s: %s" % (path, e.strerror or e)]
    try:
        for name in sorted(os.listdir(dfd)):
            if not (name.startswith(USAGE_PREFIX) and name.endswith(".jsonl")):
                continue
            owner = name[len(USAGE_PREFIX):-len(".jsonl")].split(".", 1)[0]
            if not owner.isdigit():
                continue
            try:
                fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC, dir_fd=dfd)
            except OSError as e:
                warnings.append("ignored %s: %s" % (_clean(name), e.strerror or e))
                continue
            try:
                st = os.fstat(fd)
                if (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > 2 * USAGE_MAX_BYTES
                        or st.st_uid not in (int(owner), 0)):
                    warnings.append("ignored %s (%s): not a usage record of uid %s" % (_clean(name), _who(st), owner))
                    continue
                raw = _read_fd(fd, 2 * USAGE_MAX_BYTES)
            finally:
                os.close(fd)
            for line in raw.decode(errors="replace").splitlines():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if not _valid_usage(r):
                    continue
                if st.st_uid != 0:
                    r["uid"] = st.st_uid
                out.append(r)
    finally:
        os.close(dfd)
    return out, warnings


def _proc_owner(pid):
    try:
        return uid_name(os.stat("/proc/%d" % pid).st_uid)
    except OSError:
        return None


def _mib(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return 0.0


def foreign_busy(gpus, state, procs, share_below_mib=0.0):
    """{gpu uuid: [process, ...]}: GPUs that no live lease holds but processes are using (processes meshrun
    did not start). With ``share_below_mib``, a GPU whose processes use less memory than that in all is
    shared rather than counted busy (MESHRUN_SHARE_GPU_BELOW_MIB)."""
    leased = set(state["gpus"])
    by_uuid = dict((g["uuid"], g) for g in gpus)
    busy = {}
    for p in procs:
        g = by_uuid.get(p["gpu_uuid"])
        if g is not None and str(g["index"]) in leased:
            continue  # on a leased GPU: the lease already keeps it from others
        busy.setdefault(p["gpu_uuid"], []).append(p)
    if share_below_mib > 0:
        for uuid in [u for u, ps in busy.items() if sum(_mib(p.get("used_memory")) for p in ps) < share_below_mib]:
            del busy[uuid]
    return busy


def describe_foreign(gpus, busy, submitter_pids=()):
    """One line per busy GPU naming each process that meshrun did not start: pid, user, name, memory, and
    whether it is the process that submitted this job (or one of its parents, such as a notebook kernel)."""
    by_uuid = dict((g["uuid"], g) for g in gpus)
    lines, mine = [], False
    for uuid, procs in sorted(busy.items(), key=lambda kv: by_uuid.get(kv[0], {}).get("index", 0)):
        parts = []
        for p in procs:
            pid = p.get("pid")
            user = p.get("user") or _proc_owner(pid) or "another user (hidden)"
            mem = p.get("used_memory")
            what = "pid %s (%s, user %s%s)" % (pid, _clean(p.get("process_name") or "?", 80), _clean(user, 40),
                                               ", %s MiB" % mem if mem not in (None, "") else "")
            if pid in submitter_pids:
                mine = True
                what += (" - the process that submitted this job%s"
                         % ("" if pid == submitter_pids[0] else " (one of its parents, e.g. a notebook kernel)"))
            parts.append(what)
        lines.append("GPU %s is in use by %s" % (by_uuid.get(uuid, {}).get("index", uuid), "; ".join(parts)))
    if mine:
        lines.append("the submitting process holds a CUDA context (for example a decorated function called "
                     "directly before .submit()): end that process or submit before using the GPU in it, or set "
                     "MESHRUN_SHARE_GPU_BELOW_MIB=<MiB> to share GPUs with small contexts")
    return lines


def submitter_pids(env):
    out = []
    for p in (env.get("MESHRUN_SUBMITTER_PIDS") or "").split(","):
        if p.strip().isdigit():
            out.append(int(p))
    return tuple(out)


def ancestry(pid=None, limit=32):
    """``pid`` (this process by default) and its parents, nearest first, up to init."""
    pid = os.getpid() if pid is None else pid
    out = []
    while pid and pid > 1 and len(out) < limit:
        out.append(pid)
        st = _proc_stat(pid) if HAVE_PROC else None
        pid = st[1] if st else (os.getppid() if pid == os.getpid() else 0)
    return out


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
        fit = fit_gpus(free, tk["gpus"], tk.get("gpu_type"))
        if fit is None:
            break
        grants[tk["ticket"]] = [g["index"] for g in fit]
        taken = set(id(g) for g in fit)
        free = [g for g in free if id(g) not in taken]
    order = waiting
    return order, grants, usage


def snapshot(env=None, with_processes=True, leases=None, direct=False):
    """Everything ``meshrun gpus`` shows: inventory, leases, queue and foreign processes (from the lease
    service in the enforced mode). ``direct``: a process that starts no job afterwards asks NVML itself
    (one library call instead of two nvidia-smi runs, ~20 ms each) where it can (see ``nvml_query``)."""
    env = os.environ if env is None else env
    try:
        svc = lease_service(env) if leases is None else None
        if svc:
            return service_call(svc, {"op": "snapshot"})[0]
    except LeaseError as e:
        gpus, source, _ = discover_gpus(env)
        return {"gpus": gpus, "source": source, "error": str(e), "leases": {}, "queue": [], "foreign": {},
                "mode": "enforced", "warnings": []}
    nv = None
    if direct and apple_gpu(env) is None and env.get("MESHRUN_GPUS") is None and not env.get("FAKE_NVIDIA_SMI"):
        nv = nvml_query(with_processes)
    # nvidia-smi answers in ~20 ms per question: ask for the processes while the inventory is being read
    ahead = _start(NVIDIA_APPS) if with_processes and apple_gpu(env) is None and nv is None else None
    gpus, source, err = discover_gpus(env, nv[0] if nv else None)
    procs, perr = gpu_processes(gpus, ahead, nv[1] if nv else None) if with_processes else ([], None)
    leases = leases or Leases(lease_dir(env), env)
    try:
        with leases:
            state = leases.load()
            if leases.reclaim(state) and leases.writable:
                leases.save(state)
    except LeaseError as e:
        return {"gpus": gpus, "source": source, "error": str(e), "leases": {}, "queue": [], "foreign": {},
                "mode": "cooperative", "warnings": leases.warnings}
    busy = foreign_busy(gpus, state, procs, _env_float(env, "MESHRUN_SHARE_GPU_BELOW_MIB", 0.0))
    for plist in busy.values():
        for p in plist:
            p.setdefault("user", _proc_owner(p["pid"]))
    # the queue in the order it is served, each ticket with its place and the GPUs its user holds now
    held = held_by_owner(state)
    order, grants, usage = serve_order(gpus, state, set(busy))
    queue = [dict(_public(t), position=i + 1, held=held.get(_owner(t), 0),
                  recent_gpu_hours=round(usage.get(str(_owner(t)), 0.0) / 3600.0, 4))
             for i, t in enumerate(order)]
    held_by_user = {}
    for rec in state["gpus"].values():
        name = str(rec.get("user") or rec.get("uid"))
        held_by_user[name] = held_by_user.get(name, 0) + 1
    # what the queue works from: each user's recent use (GPU-hours, halving every FAIR_HALF_LIFE), and the
    # tickets that would start now
    recent = dict((uid_name(int(k)) if k.isdigit() else k, round(v / 3600.0, 4)) for k, v in usage.items())
    return {
        "host": hostname(),
        "agent_version": AGENT_VERSION,
        "gpus": gpus,
        "source": source,
        "error": err,
        "process_error": perr,
        "leases": dict((k, _public(r)) for k, r in state["gpus"].items()),
        "queue": queue,
        "queue_policy": queue_policy(state),
        "held_by_user": held_by_user,
        "recent_gpu_hours": recent,
        "starts_next": [t.get("job_id") for t in order if t["ticket"] in grants],
        "foreign": busy,
        "lease_dir": leases.path,
        "mode": "cooperative",
        "liveness": "flock on each job's hold file",
        "warnings": leases.warnings,
        "notes": gpu_notes(gpus),
        "time": now(),
    }


def _public(rec):
    """A lease or ticket as ``meshrun gpus --json`` shows it (without the agent's bookkeeping)."""
    return dict((k, v) for k, v in rec.items() if k not in ("boot_id", "hold", "order"))


# --------------------------------------------------------------------------------------------------
# the lease service (enforced mode)
#
# For labs that want more than the cooperative table: a small service run by root (a systemd unit,
# installed by `sudo meshrun lease-service install`) keeps the same lease table in a directory only it
# can read (0700), and every user's agent leases GPUs through its Unix socket. The service knows who asks
# from the kernel (SO_PEERCRED), never from the request. A hold it creates for a job is handed to the
# asking user as a read-only, flocked descriptor (SCM_RIGHTS): the lease lives exactly as long as that
# user's processes keep it (a restart of the service loses nothing), and the user cannot change it.

LEASE_SERVICE_CONF = "/etc/meshrun/lease-service.json"
DEFAULT_SERVICE_SOCKET = "/run/meshrun/lease.sock"
DEFAULT_SERVICE_DIR = "/var/lib/meshrun/leases"
SERVICE_REQUEST_MAX = 64 << 10


def lease_service(env=None):
    """The lease service's socket when GPUs on this machine are leased through one, else None.

    ``MESHRUN_LEASE_SERVICE`` names it (empty: none); otherwise the machine's LEASE_SERVICE_CONF, a file of
    root's written by the install command, says so."""
    env = os.environ if env is None else env
    if "MESHRUN_LEASE_SERVICE" in env:
        return env.get("MESHRUN_LEASE_SERVICE") or None
    try:
        st = os.lstat(LEASE_SERVICE_CONF)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise LeaseError("%s must be a regular file of root's that only root can write (%s); meshrun hands "
                         "out no GPUs until an admin fixes it" % (LEASE_SERVICE_CONF, _who(st)))
    conf = read_json(LEASE_SERVICE_CONF)
    return (conf or {}).get("socket") or DEFAULT_SERVICE_SOCKET


def _peer(sock):
    """(pid, uid, gid) of the process at the other end of a Unix socket, from the kernel."""
    import struct

    raw = sock.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_PEERCRED", 17), struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def _recv_line(sock, limit, fds=None):
    """Read one JSON line (and, with ``fds``, any descriptors passed along with it)."""
    import array

    buf = b""
    while not buf.endswith(b"\n"):
        if fds is None:
            chunk = sock.recv(65536)
        else:
            chunk, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(data[: len(data) - len(data) % a.itemsize])
                    fds.extend(a)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            raise ValueError("request too large")
    return json.loads(buf.decode()) if buf.strip() else None


def service_call(path, req, timeout=10.0):
    """One request to the lease service: (reply, passed descriptor or None). The service must be root's."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    fds = []
    try:
        try:
            s.connect(path)
        except OSError as e:
            raise LeaseError("the GPU lease service at %s does not answer (%s); this machine leases GPUs only "
                             "through it, so none are handed out. An admin can check it: systemctl status "
                             "meshrun-lease" % (path, e.strerror or e))
        pid, uid, _ = _peer(s)
        if uid != 0:
            raise LeaseError("the GPU lease service socket %s is served by %s (pid %d), not root: not used"
                             % (path, uid_name(uid), pid))
        s.sendall((json.dumps(req) + "\n").encode())
        try:
            rep = _recv_line(s, 16 << 20, fds)
        except (OSError, ValueError) as e:
            raise LeaseError("the GPU lease service at %s gave no usable answer (%s)" % (path, e))
        if not isinstance(rep, dict):
            raise LeaseError("the GPU lease service at %s gave no usable answer" % path)
        if rep.get("error"):
            for fd in fds:
                os.close(fd)
            raise LeaseError(rep["error"])
        fd = fds.pop(0) if fds else None
        for extra in fds:
            os.close(extra)
        return rep, fd
    finally:
        s.close()


class LeaseService:
    """The root side of the enforced mode: answers ticket/poll/release/snapshot requests."""

    def __init__(self, sock_path, state_dir, env=None):
        self.sock_path = sock_path
        self.env = dict(os.environ if env is None else env)
        self.leases = Leases(state_dir, self.env, shared=False)
        self._procs = (0.0, [])

    def _gpu_procs(self, gpus):
        if not _real_gpus(gpus):
            return []
        t, procs = self._procs
        if now() - t > 1.0:
            procs = gpu_processes(gpus)[0]
            self._procs = (now(), procs)
        return procs

    def handle(self, conn):
        pid, uid, _ = _peer(conn)
        req = _recv_line(conn, SERVICE_REQUEST_MAX)
        if not isinstance(req, dict):
            raise ValueError("a request is one JSON object on one line")
        op = req.get("op")
        if op == "snapshot":
            return self.snapshot(), None
        if op == "ticket":
            return self.ticket(uid, pid, req)
        if op in ("poll", "release"):
            name = req.get("hold")
            prefix = "%s%d-" % (HOLD_PREFIX, uid)
            if not (isinstance(name, str) and name.startswith(prefix) and name.endswith(".json")
                    and len(name) < 100 and "/" not in name):
                raise ValueError("%s: not a hold of %s's" % (_clean(str(name), 100), uid_name(uid)))
            return (self.poll(uid, name, req) if op == "poll" else self.release(name)), None
        raise ValueError("unknown op %r (ticket, poll, release, snapshot)" % _clean(str(op), 40))

    def ticket(self, uid, pid, req):
        n = req.get("n")
        if not _is_int(n, 1, MAX_GPUS_PER_JOB):
            raise ValueError("n must be a number of GPUs from 1 to %d" % MAX_GPUS_PER_JOB)
        gpu_type = req.get("gpu_type")
        if not _opt_str(gpu_type, 100):
            raise ValueError("gpu_type must be a string of up to 100 characters")
        meta = {"pid": pid, "host": hostname()}
        for k in ("job_id", "name", "job_dir"):
            if not _opt_str(req.get(k), 4096):
                raise ValueError("%s must be a string" % k)
            meta[k] = req.get(k)
        gpus = discover_gpus(self.env)[0]
        if len([g for g in gpus if gpu_matches(g, gpu_type)]) < n:
            raise ValueError("the job asks for %d%s GPU(s) and this machine has %d" % (
                n, " " + gpu_type if gpu_type else "", len([g for g in gpus if gpu_matches(g, gpu_type)])))
        with self.leases:
            state = self.leases.load()
            self.leases.reclaim(state)
            ticket = self.leases.take_ticket(state, meta, n, gpu_type, uid=uid, for_peer=True)
            name = self.leases.hold_name
            fd = self.leases.lock_for_peer()
            self.leases.save(state)
        return {"ticket": ticket, "hold": name}, fd

    def poll(self, uid, name, req):
        gpus = discover_gpus(self.env)[0]
        procs = self._gpu_procs(gpus)
        share = _env_float(self.env, "MESHRUN_SHARE_GPU_BELOW_MIB", 0.0)
        with self.leases:
            state = self.leases.load()
            changed = bool(self.leases.reclaim(state))
            mine = [r for r in state["gpus"].values() if r.get("hold") == name]
            if mine:
                idx = sorted(set(i for r in mine for i in r["gpus"]))
                return {"granted": idx, "gpus": [g for g in gpus if g["index"] in idx]}
            ticket = [t for t in state["queue"] if t.get("hold") == name]
            if not ticket:
                raise ValueError("no live ticket %s (its job has ended)" % name)
            busy = foreign_busy(gpus, state, procs, share)
            order, grants, _ = serve_order(gpus, state, set(busy))
            t = ticket[0]
            if t["ticket"] in grants:
                idx = grants[t["ticket"]]
                rec = dict(t, state="leased", gpus=idx, granted_at=now(),
                           gpu_names=[g.get("name") or "" for g in gpus if g["index"] in idx])
                for k in ("hold",):
                    rec.pop(k, None)
                rec["n"] = t["n"]
                self.leases.update_hold(name, rec)
                if changed:
                    self.leases.save(state)
                return {"granted": idx, "gpus": [g for g in gpus if g["index"] in idx]}
            if changed:
                self.leases.save(state)
            ahead = [x["ticket"] for x in order]
            ahead = ahead[: ahead.index(t["ticket"])] if t["ticket"] in ahead else ahead
            free = [g for g in gpus if str(g["index"]) not in state["gpus"] and g["uuid"] not in busy]
            pids = tuple(p for p in (req.get("submitter_pids") or []) if _is_int(p))
            return {"waiting": True, "free": len(free), "total": len(gpus), "busy": len(busy), "ahead": len(ahead),
                    "foreign": describe_foreign(gpus, busy, pids) if busy else []}

    def release(self, name):
        with self.leases:
            state = self.leases.load()
            self.leases.reclaim(state)
            self.leases.drop_named(state, name)
            self.leases.save(state)
        return {"released": name}

    def snapshot(self):
        snap = snapshot(dict(self.env, MESHRUN_LEASE_SERVICE=""), leases=self.leases)
        snap["mode"] = "enforced"
        snap["lease_service"] = self.sock_path
        return snap

    def serve(self):
        """Accept requests until killed. The socket is created afresh (0666: every user may ask) in a
        directory that must be root's and not writable by others."""
        d = os.path.dirname(os.path.abspath(self.sock_path))
        os.makedirs(d, exist_ok=True)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise SystemExit("meshrun lease service: %s must be a directory of %s's that others cannot write (%s)"
                             % (d, user_name(), _who(st)))
        with self.leases:  # fail early, with the reason, if the state directory is unusable
            self.leases.load()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = "%s.%d" % (self.sock_path, os.getpid())
        try:
            os.unlink(tmp)
        except OSError:
            pass
        sock.bind(tmp)
        os.chmod(tmp, 0o666)
        sock.listen(128)
        os.replace(tmp, self.sock_path)
        _log("GPU lease service: listening on %s, leases in %s" % (self.sock_path, self.leases.path))
        while True:
            conn, _ = sock.accept()
            fd = None
            try:
                conn.settimeout(5)
                try:
                    rep, fd = self.handle(conn)
                except (ValueError, LeaseError, OSError) as e:
                    rep = {"error": str(e)}
                data = (json.dumps(rep) + "\n").encode()
                if fd is not None:
                    import array

                    conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
                else:
                    conn.sendall(data)
            except Exception as e:  # one bad client must not take the service down
                _log("request failed: %s: %s" % (type(e).__name__, e))
            finally:
                if fd is not None:
                    os.close(fd)
                conn.close()


SYSTEMD_UNIT = """[Unit]
Description=meshrun GPU lease service (every user's GPU leases on this machine)
Documentation=https://github.com/meshrun/meshrun/blob/main/docs/architecture.md

[Service]
Type=simple
ExecStart=%(python)s %(agent)s lease-service %(socket)s %(state_dir)s
RuntimeDirectory=meshrun
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=yes
StateDirectory=meshrun/leases
StateDirectoryMode=0700
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""


def install_lease_service(root="/", python="/usr/bin/python3", start=True):
    """Install the enforced mode (as root): the agent under /usr/local/lib/meshrun, the machine's
    LEASE_SERVICE_CONF, and the systemd unit meshrun-lease.service (enabled and started when systemd
    runs). Returns the lines to print."""
    def at(p):
        return os.path.join(root, p.lstrip("/"))

    agent = "/usr/local/lib/meshrun/agent.py"
    unit = "/etc/systemd/system/meshrun-lease.service"
    for d in (os.path.dirname(agent), os.path.dirname(LEASE_SERVICE_CONF), os.path.dirname(unit)):
        os.makedirs(at(d), mode=0o755, exist_ok=True)
    with open(os.path.abspath(__file__), "rb") as f:
        atomic_write(at(agent), f.read(), 0o644)
    atomic_write(at(LEASE_SERVICE_CONF), (json.dumps({"socket": DEFAULT_SERVICE_SOCKET}, indent=1) + "\n").encode(),
                 0o644)
    atomic_write(at(unit), (SYSTEMD_UNIT % {"python": python, "agent": agent, "socket": DEFAULT_SERVICE_SOCKET,
                                            "state_dir": DEFAULT_SERVICE_DIR}).encode(), 0o644)
    out = ["installed %s, %s and %s" % (agent, LEASE_SERVICE_CONF, unit)]
    if start and root == "/" and os.path.isdir("/run/systemd/system"):
        for argv in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "meshrun-lease.service"]):
            res, err = _run(argv, timeout=60)
            if res is None:
                out.append("%s failed: %s" % (" ".join(argv), err))
                return out
        out.append("meshrun-lease.service is running: every user's GPU leases now go through %s"
                   % DEFAULT_SERVICE_SOCKET)
    else:
        out.append("systemd is not running here: start the service with: %s %s lease-service %s %s"
                   % (python, agent, DEFAULT_SERVICE_SOCKET, DEFAULT_SERVICE_DIR))
    return out


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
    delay = 0.001
    while True:
        for d, _, _ in sorted(os.walk(path), key=lambda w: -len(w[0])):
            try:
                os.rmdir(d)
            except OSError:
                pass
        if not os.path.isdir(path) or time.time() > end:
            return not os.path.isdir(path)
        time.sleep(delay)  # EBUSY while the last process's exit completes: about a millisecond
        delay = min(delay * 2, 0.02)


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


CLONE_INTO_CGROUP = 0x200000000
_SYS_CLONE3 = 435  # the same number on x86_64 and arm64 (and every architecture that got it with Linux 5.3)
_CLONE3 = []  # type: list  # [syscall] once set up; [None] where clone3 cannot be used here (not Linux, refused once)


def _clone3():
    if not _CLONE3:
        fn = None
        if sys.platform.startswith("linux") and os.uname().machine in ("x86_64", "aarch64"):
            try:
                import ctypes

                # PyDLL: the GIL stays held across the call, as os.fork holds it across fork()
                fn = ctypes.PyDLL(None, use_errno=True).syscall
                fn.restype = ctypes.c_long
            except Exception:  # pragma: no cover - no ctypes
                fn = None
        _CLONE3.append(fn)
    return _CLONE3[0]


def fork_into_cgroup(path):
    """``os.fork()`` whose child is born in cgroup ``path`` (clone3 with CLONE_INTO_CGROUP, Linux 5.7+): the
    pid, 0 in the child; None where that cannot be done here (then fork and :func:`cgroup_enter`).

    Moving a running process into a cgroup makes the kernel wait for an RCU grace period (the writer side of
    its threadgroup lock), 5-15 ms on an otherwise idle machine, for every job; a child born in its cgroup
    is not moved. Only for a child that execs soon: the raw clone skips the C library's own fork bookkeeping
    (its atfork handlers, the thread id it caches), which a child running arbitrary code may rely on."""
    fn = _clone3()
    if fn is None:
        return None
    import ctypes
    import struct

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    # struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid,
    # set_tid_size, cgroup
    args = ctypes.create_string_buffer(struct.pack("11Q", CLONE_INTO_CGROUP, 0, 0, 0, int(signal.SIGCHLD),
                                                   0, 0, 0, 0, 0, fd), 88)
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    pid = fn(ctypes.c_long(_SYS_CLONE3), args, ctypes.c_size_t(88))
    if pid == 0:
        api.PyOS_AfterFork_Child()
        os.close(fd)
        return 0
    err = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    os.close(fd)
    if pid < 0:
        if err in (errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.E2BIG, errno.EOPNOTSUPP):
            _CLONE3[:] = [None]  # an older kernel, or a seccomp filter (containers often refuse clone3)
        return None
    return pid


def spawn_in_cgroup(argv, env, cwd, cgroup, keep=()):
    """Start ``argv`` (found on the PATH of ``env``) with ``env`` in ``cwd``, born in cgroup ``cgroup``: as
    ``subprocess.Popen(argv, env=env, cwd=cwd, close_fds=True, pass_fds=keep)`` (standard streams ours,
    SIGPIPE and SIGXFSZ back to their defaults), and SIGKILLed when this process dies. Returns its pid; None
    where a child cannot be born in a cgroup here (see :func:`fork_into_cgroup`). Raises OSError, naming
    ``cwd`` or ``argv[0]``, when it cannot start."""
    try:
        hi = max(os.sysconf("SC_OPEN_MAX"), 1024)
    except (ValueError, OSError):  # pragma: no cover
        hi = 65536
    r, w = os.pipe()  # close-on-exec: a successful exec closes it; a failure is written on it
    pid = fork_into_cgroup(cgroup)
    if pid == 0:
        stage = "chdir"
        try:
            os.close(r)
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM, signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(s, signal.SIG_DFL)
            os.chdir(cwd)
            stage = "exec"
            top = 3
            for fd in sorted(set(keep) | {w}):
                os.closerange(top, fd)
                top = fd + 1
            os.closerange(top, max(hi, top))
            for fd in keep:  # passed on through the exec (as Popen's pass_fds)
                os.set_inheritable(fd, True)
            os.execvpe(argv[0], argv, env)
        except OSError as e:
            os.write(w, ("%s:%d" % (stage, e.errno or 0)).encode())
        except BaseException:  # noqa: B902 - never return into the supervisor's code
            os.write(w, b"exec:0")
        finally:
            os._exit(127)
    os.close(w)
    try:
        if pid is None:
            return None
        msg = read_to_end(r)
    finally:
        os.close(r)
    if msg:
        os.waitpid(pid, 0)
        stage, _, num = msg.decode().partition(":")
        code = int(num) if num.isdigit() else 0
        raise OSError(code, os.strerror(code) if code else "could not start", cwd if stage == "chdir" else argv[0])
    return pid


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


def _waiting_msg(n, gpu_type, free, total, busy, ahead, foreign_lines):
    msg = "waiting for %s: %d of %d free%s, %d job(s) ahead in the queue" % (
        "%d %s GPU(s)" % (n, gpu_type) if gpu_type else "%d GPU(s)" % n, free, total,
        " (%d busy with processes meshrun did not start)" % busy if busy else "", ahead)
    return msg + "".join("\n  " + line for line in foreign_lines)


# --------------------------------------------------------------------------------------------------
# the distributed env contract: computed here, on the node, for every backend (the one place it is derived)

#: what every node of a job sees; WORLD_SIZE = NNODES x NPROC_PER_NODE, NPROC_PER_NODE = max(GPUS_PER_NODE, 1)
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "GPUS_PER_NODE", "NPROC_PER_NODE", "WORLD_SIZE")

#: where each scheduler puts the values, read in order (the first one set wins). "#NAME" counts the items of
#: a comma-separated list, "^NAME" takes the first line. A backend names its scheduler in launch.json
#: ("scheduler"); without one, the agent's own environment and launch.json's "dist" give the values.
SCHEDULER_VARS = {
    "slurm": {
        "NNODES": ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"),
        "NODE_RANK": ("SLURM_NODEID",),
        # chosen once for all nodes by the batch step (`_agent.py rendezvous`), which srun passes on; honoured
        # only when MESHRUN_MASTER_OF is this job's SLURM_JOB_ID
        "MASTER_ADDR": ("MESHRUN_MASTER_ADDR",),
        "MASTER_PORT": ("MESHRUN_MASTER_PORT",),
        "GPUS_PER_NODE": ("SLURM_GPUS_ON_NODE", "#SLURM_STEP_GPUS", "#SLURM_JOB_GPUS"),
    },
    "skypilot": {
        "NNODES": ("SKYPILOT_NUM_NODES",),
        "NODE_RANK": ("SKYPILOT_NODE_RANK",),
        "MASTER_ADDR": ("^SKYPILOT_NODE_IPS",),
        "GPUS_PER_NODE": ("SKYPILOT_NUM_GPUS_PER_NODE",),
    },
    "dstack": {
        "NNODES": ("DSTACK_NODES_NUM",),
        "NODE_RANK": ("DSTACK_NODE_RANK",),
        "MASTER_ADDR": ("DSTACK_MASTER_NODE_IP",),
        "MASTER_PORT": ("MESHRUN_MASTER_PORT",),
        "GPUS_PER_NODE": ("DSTACK_GPUS_PER_NODE",),
    },
}
# (Kubernetes runs command jobs without the agent: the backend writes the contract into the pods' environment
# with meshrun.dist_env, NODE_RANK from the Indexed Job's completion index; a function job's agent reads it there.)


def _scheduler_value(names, environ):
    for name in names:
        how, name = (name[0], name[1:]) if name[0] in "#^" else ("", name)
        v = environ.get(name)
        if v is None or not v.strip():
            continue
        if how == "#":
            return str(len([x for x in v.split(",") if x.strip()]))
        if how == "^":
            return v.strip().splitlines()[0].strip()
        return v.strip()
    return None


def dist_env(launch, environ, leased=None):
    """The distributed env contract for this node, as a dict of strings (:data:`DIST_VARS`).

    Each value is, in order: the job's own ``env`` (the user's choice wins); the scheduler's own variables
    (``launch["scheduler"]``, see :data:`SCHEDULER_VARS`); for ``GPUS_PER_NODE``, the number of GPUs the
    agent leased here (``leased``, when it leases); for a backend that names no scheduler, the agent's
    environment (a launcher may export ``NODE_RANK`` per node); ``launch["dist"]`` (what the backend fixed
    at submit); and the defaults: ``NNODES`` = the spec's nodes, ``NODE_RANK`` 0, ``MASTER_ADDR``
    127.0.0.1, ``MASTER_PORT`` a port free on this host (also for "0"), ``GPUS_PER_NODE`` the spec's
    ``gpus``. ``NPROC_PER_NODE`` and ``WORLD_SIZE`` follow from those unless the job's env sets them."""
    own = launch.get("env") or {}
    table = SCHEDULER_VARS.get(launch.get("scheduler") or "", {})
    dist = launch.get("dist") or {}
    given = dict((k, _scheduler_value(v, environ)) for k, v in table.items())
    if launch.get("scheduler") == "slurm" and environ.get("MESHRUN_MASTER_OF") != environ.get("SLURM_JOB_ID"):
        given.pop("MASTER_ADDR"), given.pop("MASTER_PORT")  # inherited from another job, not chosen for this one
    sources = [own, given]
    if leased is not None:
        sources.append({"GPUS_PER_NODE": str(leased)})
    if not table:
        sources.append(environ)
    sources.append(dist)
    out = {}
    for k in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE"):
        for src in sources:
            v = src.get(k)
            if v is not None and str(v) != "":
                out[k] = str(v)
                break
    out.setdefault("NNODES", str(int(launch.get("nodes") or 1)))
    out.setdefault("NODE_RANK", "0")
    out.setdefault("MASTER_ADDR", "127.0.0.1")
    if out.get("MASTER_PORT", "0") == "0":
        out["MASTER_PORT"] = str(free_port())
    out.setdefault("GPUS_PER_NODE", str(int(launch.get("gpus") or 0)))
    try:
        nproc = max(int(out["GPUS_PER_NODE"]), 1)
        world = int(out["NNODES"]) * nproc
    except ValueError:
        nproc, world = 1, ""
    out["NPROC_PER_NODE"] = str(own.get("NPROC_PER_NODE") or nproc)
    out["WORLD_SIZE"] = str(own.get("WORLD_SIZE") or world)
    return dict((k, out[k]) for k in DIST_VARS)


def dist_shell(scheduler, defaults):
    """POSIX shell text exporting the contract from a scheduler's variables (:data:`SCHEDULER_VARS`, plain
    names only), for a job that runs without the agent (a dstack command job); ``defaults`` holds a value
    for each of NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT and GPUS_PER_NODE."""
    table = SCHEDULER_VARS[scheduler]
    words = []
    for k in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE"):
        value = str(defaults[k])
        if not value or not all(c.isalnum() or c in "._:-" for c in value):
            raise ValueError("a default of the shell contract must be a plain word, got %r" % (value,))
        for name in reversed(table.get(k, ())):
            if name[0] in "#^":
                raise ValueError("%s cannot be read by the shell contract" % name)
            value = "${%s:-%s}" % (name, value)
        words.append('%s="%s"' % (k, value))
    return ("export " + " ".join(words) + ' && export NPROC_PER_NODE="$(( GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1 ))"'
            ' && export WORLD_SIZE="$(( NNODES * NPROC_PER_NODE ))"')


def free_port(host=""):
    """A TCP port free on this host right now (bind to port 0)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def slurm_first_host(nodelist):
    """The first host of a Slurm hostlist: ``"gpu[07-09,12],cpu1"`` -> ``"gpu07"``,
    ``"r[1-2]-n[3-4]"`` -> ``"r1-n3"``."""
    out, depth, group = [], 0, []
    for c in nodelist.strip():
        if depth == 0 and c == ",":
            break
        if c == "[":
            depth, group = 1, []
        elif c == "]" and depth:
            depth = 0
            first = "".join(group).split(",")[0].split("-")[0]
            out.append(first)
        elif depth:
            group.append(c)
        else:
            out.append(c)
    return "".join(out)


def rendezvous(environ):
    """Slurm's batch step, on the allocation's first node, before srun starts every node: the address of
    that node (its ``NodeAddr``, else its name) and a port free there, as ``export`` shell text."""
    host = slurm_first_host(environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or "")
    addr = host
    if host:
        try:
            p = subprocess.run(["scontrol", "-o", "show", "node", host], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, universal_newlines=True, timeout=30)
            for word in p.stdout.split():
                if word.startswith("NodeAddr=") and len(word) > 9:
                    addr = word[9:]
        except (OSError, subprocess.SubprocessError):
            pass
    addr = addr or "127.0.0.1"
    return "export MESHRUN_MASTER_ADDR=%s MESHRUN_MASTER_PORT=%d MESHRUN_MASTER_OF=%s\n" % (
        _sh_quote(addr), free_port(), _sh_quote(environ.get("SLURM_JOB_ID") or ""))


def _sh_quote(s):
    return "'" + s.replace("'", "'\"'\"'") + "'"


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
        # multi-node: one supervisor per node, each with its NODE_RANK (dist_env); node 0 owns the
        # job's plain record files, node R writes state.rankR.json, exit.rankR.json, output.rankR.log ...
        self.rank = 0
        if int(self.launch.get("nodes") or 1) > 1:
            try:
                self.rank = int(dist_env(self.launch, self.env)["NODE_RANK"])
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
        self.leases = Leases(lease_dir(self.env), self.env)
        self._last_wait = None

    # -- records
    def _state(self, state, **extra):
        rec = {
            "state": state,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "sid": self.sid,
            "host": hostname(),
            "user": user_name(),
            "since": now(),
            "agent_version": AGENT_VERSION,
        }
        if getattr(self, "_alive_fd", None) is not None:
            rec["alive_lock"] = True  # this supervisor holds a flock on .started while it lives
        rec.update(extra)
        write_json(self._path(STATE), rec, mode=0o600)

    def _exit(self, state, exit_code=None, reason=None, signal_num=None):
        """Write the exit record, once. On a full disk (ENOSPC) the record goes into the space reserved at
        start (``exit.json.reserve``), so the end is recorded, and says the disk is full, rather than the
        job reading "lost"."""
        path = self._path(EXIT)
        reserve = path + ".reserve"
        if os.path.exists(path):
            _remove_quietly(reserve)
            return
        rec = {
            "state": state,
            "exit_code": exit_code,
            "signal": signal_num,
            "reason": reason,
            "started_at": self.started_at,
            "ended_at": now(),
            "gpus": self.gpus,
            "host": hostname(),
        }
        rec.update(result_digest(self._path(RESULT)) if state == "succeeded" else {})
        try:
            # the reserved room goes before the record appears: whoever sees the job ended sees it gone
            write_json(path, rec, mode=0o600, before_replace=lambda: _remove_quietly(reserve))
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            if "ENOSPC" not in (reason or ""):
                rec["reason"] = "the disk is full (ENOSPC) at %s: %s" % (self.job_dir, reason or "the job " + state)
            try:
                _write_into(reserve, rec)
                os.replace(reserve, path)
            except OSError as e2:
                _log("could not write the exit record (%s; %s)" % (e, e2))

    def _reserve_exit(self):
        """Set aside room for the exit record while there is some: a job may fill the disk."""
        try:
            fd = os.open(self._path(EXIT) + ".reserve", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b" " * EXIT_RESERVE)  # real blocks, not a sparse file: overwriting them needs none
            finally:
                os.close(fd)
        except OSError:
            pass  # already full: the record is then tried the ordinary way only

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
        try:
            svc = lease_service(self.env)
        except LeaseError as e:
            raise _Fail(str(e))
        if svc:
            return self._acquire_from_service(svc, n, gpu_type)
        gpus, source, err = discover_gpus(self.env)
        groups = gpu_groups(gpus, gpu_type)
        most = max([len(grp) for grp in groups] or [0])
        if most < n:
            what = "%d %s GPU(s)" % (n, gpu_type) if gpu_type else "%d GPU(s)" % n
            have = "%d GPU(s)%s" % (most, " of type %s" % gpu_type if gpu_type else "")
            if len(groups) > 1:
                have += " of one kind (a job never mixes vendors or models: %s)" % ", ".join(
                    "%d x %s" % (len(grp), grp[0].get("name")) for grp in groups)
            detail = " (%s)" % err if err and not gpus else ""
            raise _Fail("the job asks for %s and this machine has %s%s" % (what, have, detail))
        check_foreign = _real_gpus(gpus)
        share_below = _env_float(self.env, "MESHRUN_SHARE_GPU_BELOW_MIB", 0.0)
        mine_pids = submitter_pids(self.env)
        meta = {
            "job_id": self.launch.get("job_id"),
            "name": self.launch.get("name"),
            "pid": self.pid,
            "pid_start": self.pid_start,
            "sid": self.sid,
            "job_dir": self.job_dir,
            "host": hostname(),
        }
        delay, warned = 0.01, set()
        while True:
            procs = gpu_processes(gpus)[0] if check_foreign else []
            try:
                with self.leases:
                    state = self.leases.load()
                    changed = bool(self.leases.reclaim(state))
                    for w in self.leases.warnings:
                        if w not in warned:
                            _log("warning: " + w)
                            warned.add(w)
                    if self.leases.hold_fd is None:
                        self.ticket = self.leases.take_ticket(state, meta, n, gpu_type)
                        changed = True  # the ticket counter moved
                    busy = foreign_busy(gpus, state, procs, share_below)
                    order, grants, _ = serve_order(gpus, state, set(busy))
                    mine = grants.get(self.ticket)
                    if mine is not None:
                        by_index = dict((g["index"], g) for g in gpus)
                        self.leases.grant(state, mine, [by_index[i].get("name") or "" for i in mine])
                        if changed:
                            self.leases.save(state)
                        self.ticket = None
                        by_index = dict((g["index"], g) for g in gpus)
                        return [by_index[i] for i in mine]
                    if changed:
                        self.leases.save(state)
                    ahead = [t["ticket"] for t in order]
                    ahead = ahead[: ahead.index(self.ticket)] if self.ticket in ahead else ahead
                    free = [g for g in gpus if str(g["index"]) not in state["gpus"] and g["uuid"] not in busy]
            except LeaseError as e:
                raise _Fail(str(e))
            self._waiting(_waiting_msg(n, gpu_type, len(free), len(gpus), len(busy), len(ahead),
                                       describe_foreign(gpus, busy, mine_pids) if busy else []), len(ahead))
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _waiting(self, msg, ahead):
        if msg != self._last_wait:
            _log(msg)
            self._state("queued", reason=msg, position=ahead + 1)
            self._last_wait = msg

    def _acquire_from_service(self, svc, n, gpu_type):
        """The enforced mode: a ticket from the root lease service, polled until it is granted."""
        req = {"op": "ticket", "n": n, "gpu_type": gpu_type, "job_id": self.launch.get("job_id"),
               "name": self.launch.get("name"), "job_dir": self.job_dir}
        try:
            rep, fd = service_call(svc, req)
            if fd is None:
                raise LeaseError("the GPU lease service at %s handed out no hold" % svc)
            self.leases.adopt_hold(fd, rep["hold"], svc)
            self.ticket = rep.get("ticket")
            delay = 0.01
            while True:
                rep, _ = service_call(svc, {"op": "poll", "hold": rep.get("hold") or self.leases.hold_name,
                                            "submitter_pids": list(submitter_pids(self.env))})
                if rep.get("granted") is not None:
                    self.ticket = None
                    return rep["gpus"]
                self._waiting(_waiting_msg(n, gpu_type, rep.get("free", 0), rep.get("total", 0), rep.get("busy", 0),
                                           rep.get("ahead", 0), rep.get("foreign") or []), rep.get("ahead", 0))
                time.sleep(delay)
                delay = min(delay * 1.5, 0.5)
        except LeaseError as e:
            raise _Fail(str(e))

    def _release(self):
        if self.leases.hold_fd is None:
            return  # held nothing, waited for nothing: no need to touch the machine-wide lock
        if self.leases.service:
            try:
                service_call(self.leases.service, {"op": "release", "hold": self.leases.hold_name})
            except LeaseError as e:
                _log("could not tell the GPU lease service that the job ended: %s" % e)
            finally:
                self.leases.close()  # the flock goes with the descriptor: the GPUs are free either way
            return
        try:
            with self.leases:
                state = self.leases.load()
                self.leases.reclaim(state)
                self.leases.drop_hold(state)
                self.leases.save(state)
        except Exception as e:  # never let clean-up hide the job's own outcome
            _log("could not record the end of the GPU lease: %s" % e)
        finally:
            self.leases.close()  # the flock goes with the descriptor: the GPUs are free either way
        self.ticket = None

    # -- object-store data: the stager (stage.py in the job folder) before and after the job
    def _stage_env(self):
        """The stager's interpreter (``MESHRUN_DATA_PYTHON``, else this one) and environment: the node's (its
        endpoint and credentials) with the job's env; never the job's marker, so it is no process of the job."""
        env = dict(self.env)
        env.pop(WARM_ENV, None)
        env.update(self.launch.get("env") or {})
        return env.get("MESHRUN_DATA_PYTHON") or sys.executable, env

    def _stage(self, step, *extra):
        """Run the stager's ``step`` to its end, its messages into the job's log; returns (exit code, last
        message). A signal (cancel, time limit) ends it and goes on as it would have."""
        python, env = self._stage_env()
        argv = [python, os.path.join(self.job_dir, STAGE), step, self.job_dir] + list(extra)
        last = ""
        try:
            p = subprocess.Popen(argv, env=env, cwd=self.job_dir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        except OSError as e:
            return 127, "cannot run the data stager with %s: %s" % (python, e.strerror or e)
        try:
            for line in iter(p.stdout.readline, b""):
                text = line.decode("utf-8", "replace").rstrip("\n")
                sys.stderr.write(text + "\n")
                sys.stderr.flush()
                if text.strip():
                    last = text.strip()
            return p.wait(), last
        except BaseException:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                _quietly(os.killpg, p.pid, signal.SIGKILL)
                _quietly(p.wait)
            raise
        finally:
            p.stdout.close()

    def _stage_in(self):
        data = self.launch.get("data") or {}
        if not data.get("inputs"):
            return
        self._state("starting", reason="downloading the job's inputs")
        code, last = self._stage("in")
        if code != 0:
            raise _Fail("staging the inputs failed: %s" % (last.replace("meshrun data: ", "", 1) or "exit %d" % code))

    def _start_sync(self):
        outs = (self.launch.get("data") or {}).get("outputs") or []
        if self.rank or not any(o.get("every") for o in outs):
            return
        python, env = self._stage_env()
        try:
            self._sync = subprocess.Popen([python, os.path.join(self.job_dir, STAGE), "sync", self.job_dir], env=env,
                                          cwd=self.job_dir, stdin=subprocess.DEVNULL, start_new_session=True,
                                          close_fds=True)
        except OSError as e:
            _log("cannot start the periodic uploads: %s" % (e.strerror or e))

    def _stage_out(self, state, reason):
        """Upload the outputs whose policy covers ``state`` (node 0 only); a failed upload fails a job that
        succeeded. Returns (state, reason)."""
        sync = getattr(self, "_sync", None)
        if sync is not None:
            _quietly(os.killpg, sync.pid, signal.SIGTERM)
            try:
                sync.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _quietly(os.killpg, sync.pid, signal.SIGKILL)
                _quietly(sync.wait)
            except ChildProcessError:
                pass
        if self.rank or not (self.launch.get("data") or {}).get("outputs"):
            return state, reason
        cur = read_json(self._path(STATE))
        rec = dict(cur) if isinstance(cur, dict) and cur.get("pid") == self.pid else {"state": "running"}
        rec.pop("since", None)
        self._state(rec.pop("state"), **dict(rec, uploading=True, reason="uploading the job's outputs"))
        code, last = self._stage("out", "--state", state)
        if code != 0:
            why = "uploading the outputs failed: %s" % (last.replace("meshrun data: ", "", 1) or "exit %d" % code)
            if state == "succeeded":
                return "failed", why
            return state, "%s; %s" % (reason, why) if reason else why
        return state, reason

    # -- the job's environment
    def _job_env(self):
        env = dict(self.env)
        env.pop(WARM_ENV, None)
        env.update(self.launch.get("env") or {})
        env["MESHRUN_JOB_ID"] = str(self.launch.get("job_id") or "")
        env["MESHRUN_JOB_DIR"] = self.job_dir
        if env.get("WANDB_RUN_ID") == env["MESHRUN_JOB_ID"] and env.get("WANDB_TAGS"):
            # a W&B run meshrun tracks: the host the job landed on, known only here
            env["WANDB_TAGS"] += ",host:" + hostname().replace(",", "_")
        if self.launch.get("name") is not None:
            env["MESHRUN_JOB_NAME"] = self.launch["name"]
        env.setdefault("PYTHONUNBUFFERED", "1")
        leased = len(self.gpus) if self.launch.get("lease", True) is not False else None
        env.update(dist_env(self.launch, self.env, leased))
        if self.launch.get("mask_gpus", True):
            env.update(mask_env(self.gpus))
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
                _WARM["file"] = self.env.get(WARM_ENV)
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

        # the job's processes inherit the lease's hold (its flock keeps the GPUs leased while any of them
        # lives, even if this supervisor is killed)
        hold = (self.leases.hold_fd,) if self.leases.hold_fd is not None else ()
        if cg:  # born in its cgroup where the kernel allows (no move, which costs milliseconds)
            try:
                pid = spawn_in_cgroup(argv, env, cwd, cg, hold)
            except OSError as e:
                if e.filename == cwd and not os.path.isdir(cwd):
                    raise _Fail(_no_workdir(cwd))
                raise _Fail("failed to start: %s: %s" % (argv[0], e.strerror or e))
            if pid is not None:
                os.write(w, b"c")
                return pid
        try:
            p = subprocess.Popen(argv, env=env, cwd=cwd, preexec_fn=pre, close_fds=True, pass_fds=hold)
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
        reap_children()

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
        self._reserve_exit()
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM):
            signal.signal(s, self._on_signal)
        grace = float(self.launch.get("grace_period") or 10)
        state, code, reason, signum = "failed", None, None, None
        try:
            if os.path.exists(os.path.join(self.job_dir, CANCEL)):
                raise _Stop("cancel")
            self._state("queued" if self.launch.get("gpus") else "starting")
            self._stage_in()
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
            self._start_sync()
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
            try:
                state, reason = self._stage_out(state, reason)
            except Exception as e:  # never let the uploads hide the job's own outcome
                _log("uploading the outputs failed: %s: %s" % (type(e).__name__, e))
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
    if disk_full(job_dir):
        return "exited with code %d; the disk is full (ENOSPC) at %s" % (code, job_dir)
    return "exited with code %d" % code


EXIT_RESERVE = 16384  # bytes set aside at start for the exit record (written there when the disk is full)


def disk_full(path):
    """True when the filesystem holding ``path`` has (almost) no room left for this user."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


def log_tail(path, max_chars=4000):
    """The end of a job's log for a failure message: at most ``max_chars`` characters, read from the end of
    the file (a log may be gigabytes), with carriage-return progress collapsed to the state a terminal
    would show last (``"10%\\r50%\\r100%"`` reads ``"100%"``). "" when there is no log."""
    try:
        f = open(path, "rb")
    except OSError:
        return ""
    with f:
        size = f.seek(0, 2)
        # utf-8 takes at most 4 bytes a character; more for progress lines that collapse to less
        want = max_chars * 4 + 16384
        start = max(0, size - want)
        f.seek(start)
        data = f.read(want)
    return tail_text(data.decode("utf-8", "replace"), max_chars, cut=start > 0)


def tail_text(text, max_chars=4000, cut=False):
    """``log_tail`` for text already read (``cut``: it is not the whole output)."""
    if cut:
        text = text.lstrip("\ufffd")  # a character cut in two by the seek
    lines = []
    for line in text.split("\n"):
        if "\r" in line:
            parts = [p for p in line.split("\r") if p]
            line = parts[-1] if parts else ""
        lines.append(line)
    out = "\n".join(lines)
    if len(out) > max_chars:
        out, cut = out[-max_chars:], True
    return ("[...]\n" if cut and out else "") + out


def _remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _write_into(path, rec):
    """Overwrite the already allocated file ``path`` in place with ``rec`` (no new blocks needed)."""
    data = (json.dumps(rec, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY)
    try:
        room = os.fstat(fd).st_size
        if len(data) > room:  # shorten the reason (and drop the GPU list) to fit the reserved space
            rec = dict(rec, gpus=[g.get("index") if isinstance(g, dict) else g for g in rec.get("gpus") or []])
            rec["reason"] = (rec.get("reason") or "")[:max(0, room // 2)]
            data = (json.dumps(rec, sort_keys=True) + "\n").encode()
        view, off = memoryview(data), 0
        while off < len(view):
            off += os.pwrite(fd, view[off:], off)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


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
            before = set(sys.modules)
            code = _run_function(job_dir, launch, rank)
            learn_warm(_WARM["file"], before)
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
        fd = os.open(sup._path(STARTED), os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o600)
    except FileExistsError:
        return 0
    # held for as long as this supervisor lives: whether it does is asked of the kernel (a LOCK_NB probe),
    # not of /proc, so a caller in another PID namespace or under hidepid, or after PID reuse, still knows
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        sup._alive_fd = fd
    except OSError:
        os.close(fd)
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
    return start_agent([python or sys.executable, os.path.abspath(__file__), "run", job_dir], env)


def start_agent(argv, env=None):
    """Start ``argv`` (this agent, as a supervisor or a fork server) detached: a session of its own, no
    terminal, no inherited descriptors. Returns the Popen (the caller reaps it)."""
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
        if supervisor_alive(job_dir, st, rank):
            return st
        # the supervisor is gone without an exit record: killed (kill -9, OOM killer, reboot)
        ex = read_json(os.path.join(job_dir, rank_name(EXIT, rank)))  # it may have finished between the two reads
        if isinstance(ex, dict):
            return _with_containment(ex, job_dir, rank)
        reason = "the job's supervisor (pid %s on %s) died without writing an exit record" % (
            st.get("pid"), st.get("host"))
        if st.get("host") in (None, hostname()):
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


def supervisor_alive(job_dir, st, rank=0):
    """Whether the supervisor that wrote state record ``st`` still lives: its flock on ``.started`` when it
    holds one (agent version 4 on this host), else its pid and start time."""
    if st.get("alive_lock") and st.get("host") in (None, hostname()):
        import fcntl

        try:
            fd = os.open(os.path.join(job_dir, rank_name(STARTED, rank)), os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
        except OSError:
            fd = None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return False
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    return True
            finally:
                os.close(fd)
    return pid_alive(st.get("pid"), st.get("pid_start"))


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


def _uploading(job_dir, st):
    """The job's supervisor ``st`` is alive and uploading the job's outputs (state.json says so)."""
    cur = read_json(os.path.join(job_dir, STATE))
    return (isinstance(cur, dict) and bool(cur.get("uploading")) and cur.get("pid") == st.get("pid")
            and pid_alive(st.get("pid"), st.get("pid_start")))


def cancel(job_dir, grace=None, wait=True):
    """Cancel a job: ask its supervisor to stop (it ends every process of the job and frees the GPUs); if
    the supervisor is gone, end what is left of the job ourselves, reclaim its GPUs and write the exit record.

    A job no supervisor has started yet (its submitter may have died mid-submit) is claimed here, so that
    none ever will: it ends cancelled before it runs."""
    if os.path.exists(os.path.join(job_dir, EXIT)):
        return job_status(job_dir)
    write_json(os.path.join(job_dir, CANCEL), {"user": user_name(), "time": now()}, mode=0o600)
    try:
        os.close(os.open(os.path.join(job_dir, STARTED), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
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
        while now() < deadline or _uploading(job_dir, st):  # outputs the policy uploads on cancel: let them go up
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

#: the file where function jobs record the installed packages they imported, for the fork server to import
#: ahead of the next job ("warm imports"); set by the local backend, beside the server's socket
WARM_ENV = "MESHRUN_WARM_FILE"
WARM_MAX = 32  # modules a server keeps warm at the most
_WARM = {"file": None}  # in a function job's worker: where to record what it imported (set before the fork)


def _installed_module(name):
    """Whether top-level module ``name`` (already imported) comes from an installed distribution (site- or
    dist-packages), not from the job's own folder or the standard library: only those are worth warming
    and safe to keep across jobs (a user's own module may change between two jobs)."""
    mod = sys.modules.get(name)
    f = getattr(mod, "__file__", None) or ""
    return (os.sep + "site-packages" + os.sep in f or os.sep + "dist-packages" + os.sep in f) and name != "meshrun"


def _own_folder(path):
    """Whether the folder holding ``path`` is ours and nobody else may write to it."""
    try:
        d = os.stat(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    return d.st_uid == os.getuid() and not d.st_mode & 0o022


def read_own_json(path, max_bytes=64 << 10):
    """JSON from ``path`` only when it is this user's own: a regular file (not followed through a link) of
    ours that nobody else may write, in a folder of ours that nobody else may write; else None. What decides
    which packages a fork server imports must never be chosen by another user."""
    if not _own_folder(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022 or st.st_size > max_bytes:
            return None
        return json.loads(os.read(fd, max_bytes + 1).decode())
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def learn_warm(path, before):
    """Record in ``path`` the installed top-level packages this process imported since ``before`` (a set
    of module names): the fork server imports them ahead of the next job."""
    new = sorted({n.split(".")[0] for n in sys.modules} - {n.split(".")[0] for n in before})
    new = [n for n in new if not n.startswith("_") and _installed_module(n)]
    if not path or not new or not _own_folder(path):
        return
    data = read_own_json(path)
    data = data if isinstance(data, dict) else {}
    mods = [m for m in data.get("modules", []) if isinstance(m, str)]
    unsafe = set(m for m in data.get("unsafe", []) if isinstance(m, str))
    add = [n for n in new if n not in mods and n not in unsafe]
    if not add:
        return
    data["modules"] = (mods + add)[:WARM_MAX]
    try:
        write_json(path, data, mode=0o600)
    except OSError:
        pass


def fork_unsafe():
    """Why forking this process for a job would be unsafe now, or None: a Python thread besides this one
    (it may hold a lock the child inherits taken), or an open GPU device (a CUDA/ROCm context, which a forked
    child cannot use). Native thread pools a library starts at import are left to the library (PyTorch's
    DataLoader forks after them too)."""
    import threading

    if threading.active_count() > 1:
        return "a Python thread is running (%s)" % ", ".join(t.name for t in threading.enumerate()
                                                           if t is not threading.current_thread())
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            target = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            continue
        if target.startswith(("/dev/nvidia", "/dev/kfd", "/dev/dri/")):
            return "%s is open (a GPU context)" % target
    return None


def warm_up(path):
    """Import the modules ``path`` lists (see :func:`learn_warm`), one by one; a module after whose import
    forking is unsafe is marked so in the file and this process starts again without it. Returns
    {module: (file, mtime_ns)} of those imported, to notice a module upgraded under a running server."""
    data = read_own_json(path) if path else None
    if not isinstance(data, dict):
        return {}
    unsafe = [m for m in data.get("unsafe", []) if isinstance(m, str)]
    if sys.flags.no_site:
        import site

        site.main()
    warm = {}
    for name in [m for m in data.get("modules", []) if isinstance(m, str) and m not in unsafe][:WARM_MAX]:
        try:
            __import__(name)
        except Exception:
            continue
        why = fork_unsafe()
        if why:
            data["unsafe"] = unsafe + [name]
            data.setdefault("why", {})[name] = why
            try:
                write_json(path, data, mode=0o600)
            except OSError:
                return None  # cannot remember it: serve nothing warm rather than loop
            os.execv(sys.executable, [sys.executable] + sys.argv)
        f = getattr(sys.modules.get(name), "__file__", None)
        try:
            warm[name] = (f, os.stat(f).st_mtime_ns) if f else (None, None)
        except OSError:
            warm[name] = (f, None)
    return warm


def _warm_changed(warm):
    """A warm module whose file changed since it was imported (an upgrade), or None."""
    for name, (f, mtime) in warm.items():
        if f is None:
            continue
        try:
            if os.stat(f).st_mtime_ns != mtime:
                return name
        except OSError:
            return name
    return None


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


_WARNED = set()  # type: set


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


def current_rlimits(pid=None):
    """{"RLIMIT_NAME": [soft, hard]} for every resource limit this system has (one name per resource), of this
    process or of process ``pid`` (``prlimit``: a process of our own uid). OSError when ``pid``'s cannot be
    read."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return {}
    get = resource.getrlimit if pid is None else (lambda res: resource.prlimit(pid, res))
    out, seen = {}, set()
    for name in sorted(n for n in dir(resource) if n.startswith("RLIMIT_")):
        res = getattr(resource, name)
        if res in seen:
            continue  # RLIMIT_OFILE is RLIMIT_NOFILE
        try:
            out[name] = list(get(res))
        except ValueError:
            continue
        except OSError:
            if pid is not None:
                raise
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


def listen_aside(path):
    """A unix socket listening beside ``path`` (at ``path.<pid>``), created 0600 whatever the umask: (the
    socket, its name). The caller moves it to ``path`` once it accepts."""
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
    return sock, tmp


def serve(path, idle=600.0):
    """Accept spawn requests on a unix socket until idle for ``idle`` seconds.

    ``path`` must be in a directory only this user can write (the local backend checks its private socket
    directory before it starts a server); the socket itself is created 0600, and every connection is
    checked with ``SO_PEERCRED``: a peer of another uid is answered with an error and nothing is started."""
    try:  # warm what every supervisor and function job will import, so forks start ready
        import binascii  # noqa: F401
        import fcntl  # noqa: F401
        import hashlib  # noqa: F401
        import pickle  # noqa: F401
        import pwd  # noqa: F401
        import resource  # noqa: F401
        import traceback  # noqa: F401
        import types  # noqa: F401

        import cloudpickle  # noqa: F401
    except Exception:
        pass
    warm_file = os.environ.get(WARM_ENV)
    warm = warm_up(warm_file)
    if warm is None:
        warm = {}
    warm_seen = _mtime(warm_file)
    handed_over = False
    _libc()
    user_name()  # every supervisor records it
    os.setsid() if os.getsid(0) != os.getpid() else None
    try:
        os.chdir("/")  # hold no directory of whoever started us (each job has its own cwd in launch.json)
    except OSError:
        pass
    sock, tmp = listen_aside(path)
    os.replace(tmp, path)  # the socket appears only once it accepts
    ino = os.stat(path).st_ino

    def still_ours():
        return same_inode(path, ino)

    def maybe_hand_over():
        nonlocal warm_seen, handed_over
        seen = _mtime(warm_file)
        if seen == warm_seen or handed_over:
            return
        warm_seen = seen
        data = read_own_json(warm_file)
        want = set(data.get("modules", [])) - set(data.get("unsafe", [])) if isinstance(data, dict) else set()
        if want - set(warm):
            # a job imported packages this server does not have: a successor imports them all, then takes
            # the socket over (this one serves until then, and ends when it sees that)
            _spawn_detached([sys.executable] + sys.argv)
            handed_over = True

    spare = None
    want_spare = now()  # when to fork the next spare: a moment after a job was handed over, not during it
    last = now()
    try:
        while now() - last < idle:
            if spare is not None and spare.gone:  # killed while it waited: fork another
                spare.close()
                spare = None
            if spare is None and now() >= want_spare and not handed_over and not fork_unsafe():
                spare = Spare((sock,), _become_supervisor, SPARE_NAME)
            sock.settimeout(1.0 if spare is not None else max(0.01, min(1.0, want_spare - now())))
            try:
                conn, _ = sock.accept()
            except socket.timeout:
                reap_children()
                if not still_ours():
                    return  # removed, or another server took the path over
                maybe_hand_over()
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
                stale = _warm_changed(warm)
                why = (fork_unsafe()
                       or (("%s changed on disk since this server imported it" % stale) if stale else None)
                       or limits_out_of_reach(req.get("rlimits")))
                if why:
                    # never fork a job from a state it cannot trust: the submitter starts it directly, and the
                    # next submit starts a fresh server
                    conn.sendall((json.dumps({"error": "not forking: " + why}) + "\n").encode())
                    os.unlink(path) if still_ours() else None
                    return
                pid = None
                if spare is not None and spare.is_ready():
                    work = {k: req.get(k) for k in ("job_dir", "env", "umask", "rlimits")}
                    pid = spare.pid if spare.hand((json.dumps(work) + "\n").encode()) else None
                    spare.close()  # used up either way
                    spare, want_spare = None, now() + SPARE_AFTER
                if pid is None:
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
            reap_children()
            maybe_hand_over()
    finally:
        if spare is not None:
            spare.close()
        if still_ours():
            try:
                os.unlink(path)
            except OSError:
                pass
        sock.close()


def _mtime(path):
    try:
        return os.stat(path).st_mtime_ns if path else None
    except OSError:
        return None


def _spawn_detached(argv):
    """Start ``argv`` in a session of its own, its standard streams on /dev/null (reaped by reap_children)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            fd = os.open(os.devnull, os.O_RDWR)
            for n in (0, 1, 2):
                os.dup2(fd, n)
            os.closerange(3, 65536)
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    return pid


def same_inode(path, ino):
    """Whether ``path`` is still the file (a server's socket) that had inode ``ino``: not removed, not replaced."""
    try:
        return os.stat(path).st_ino == ino
    except OSError:
        return False


def reap_children():
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


def limits_out_of_reach(rlimits):
    """Why a child of this process could not take on the submitter's ``rlimits`` (a hard limit above this
    process's own, which only a privileged process may raise), or None. A warm server steps aside for such a
    submitter: a server it starts itself has its limits."""
    if not rlimits or _may_raise_hard_limits():
        return None
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return None
    for name, pair in sorted(rlimits.items()):
        res = getattr(resource, name, None) if str(name).startswith("RLIMIT_") else None
        if res is None:
            continue
        try:
            want, have = int(pair[1]), resource.getrlimit(res)[1]
        except (ValueError, OSError, TypeError, IndexError):
            continue
        if _rl_min(want, have) != want:
            return "the submitter's hard %s (%s) is above this server's (%s)" % (name, _rl(pair, 1), _rl((0, have), 1))
    return None


CAP_SYS_RESOURCE = 24


def _may_raise_hard_limits():
    """Whether this process may raise a hard resource limit: it has CAP_SYS_RESOURCE (root usually has, not
    always: a container may drop it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


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
    code = 70
    try:
        for c in close:
            try:
                c.close()
            except Exception:
                pass
        code = _supervise(job_dir, env, umask, rlimits)
    except BaseException:
        import traceback

        traceback.print_exc()
    os._exit(code)


def _supervise(job_dir, env, umask=None, rlimits=None):
    """In a child of the fork server: become the job's supervisor, with the submitter's environment, umask
    and resource limits; returns its exit code."""
    os.setsid()
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    notes = _take_on_limits(umask, rlimits)
    if notes and not os.path.exists(os.path.join(job_dir, STARTED)):
        # the job's log is where its owner looks; the supervisor appends to it from here on
        fd = os.open(os.path.join(job_dir, LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, "".join("[meshrun] %s\n" % n for n in notes).encode())
        finally:
            os.close(fd)
    return run_job(job_dir, env)


class Spare(object):
    """A child forked ahead of a server's next piece of work, waiting on a socket pair for it: the fork server's
    next job supervisor, the command server's next command. The fork, and the copy-on-write faults of the
    work's first steps (:func:`populate_memory`), are done while the server is idle.

    In the child, once it is ready, ``become(sock, name)`` runs: ``sock`` is its end of the pair, on which the
    work comes (its end, when the server replaced or ended the spare), ``name`` the process name to take back
    from ``spare_name`` (what ps shows while it waits); it returns the child's exit code. ``close``: what the
    child must not hold (the server's listening socket)."""

    def __init__(self, close, become, spare_name):
        here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.pid = os.fork()
        if self.pid == 0:
            code = 70
            try:
                for c in tuple(close) + (here,):
                    c.close()
                populate_memory()
                there.sendall(b"r")  # ready: the server hands work only to a spare that has said so
                code = become(there, set_name(spare_name))
            except BaseException:  # a spare must never return into the server's loop
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        there.close()
        self.sock = here
        self.ready = self.gone = False

    def is_ready(self):
        """Whether it has its copies made and waits (work never waits for them)."""
        if not self.ready and not self.gone:
            import select

            if select.select([self.sock], [], [], 0)[0]:
                got = self.sock.recv(1)
                self.ready, self.gone = got == b"r", got == b""  # gone: it ended (killed)
        return self.ready

    def hand(self, data, fds=()):
        """Send it the work (``fds``: file descriptors that go along, ``SCM_RIGHTS``); False when it is gone
        (it is closed then)."""
        import array

        try:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
            sent = self.sock.sendmsg([data], anc)
            if sent < len(data):
                self.sock.sendall(data[sent:])
            return True
        except OSError:
            self.close()
            return False

    def close(self):
        self.sock.close()  # a spare still waiting sees the end, and exits


def _become_supervisor(sock, name):
    """What the fork server's spare does with its job (a JSON line): supervise it, as :func:`_fork_supervisor`'s
    child does."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1 << 20)
        if not chunk:
            return 0  # the server replaced or ended us
        buf += chunk
    sock.close()
    set_name(name)
    req = json.loads(buf.decode())
    return _supervise(req["job_dir"], req.get("env"), req.get("umask"), req.get("rlimits"))


SPARE_NAME = "meshrun-nextjob"  # the fork server's spare, in ps

#: seconds after a job was handed over before the next spare is forked (not while that job starts)
SPARE_AFTER = 0.1


# --------------------------------------------------------------------------------------------------
# command line (for remote callers and for debugging)


# --------------------------------------------------------------------------------------------------
# the job's records on their way back (meshrun/_transport.py reads them)

#: the records a job folder holds for its submitter (``meshrun.RESULT_FILES``)
RECORDS = (EXIT, STATE, RESULT, ERROR_JSON, ERROR_PKL)
#: errors a retry cannot fix: ``run --emit-records`` exits with EXIT_NO_RETRY for them
NO_RETRY = ("VersionMismatch", "PayloadError", "ResultTooLarge")
EXIT_NO_RETRY = 3
FRAME = "::meshrun-records:"
FRAME_WIDTH = 1000  # base64 characters a line


def frame_records(nonce, job_id, rank, files):
    """The records ``files`` (name -> bytes) as lines for a log stream::

        ::meshrun-records:<nonce>:<rank>:<i>/<n>:<base64 of the gzipped JSON body, part i of n>::
        ::meshrun-records:<nonce>:<rank>:sha256=<hex of the JSON body>::

    Every line names the job's nonce (a random token the submitter chose, so output of the job, such as
    another job's log it prints, never passes for these records), its part and the count, and the last one
    the body's checksum: a cut or altered frame is detected, never read as a result. Each line is whole and
    found anywhere in a line, so a log service that prefixes or colours lines does not break it."""
    import base64
    import gzip
    import hashlib

    if not nonce or not all(c.isalnum() or c in "_-" for c in nonce):
        raise ValueError("a records nonce is letters, digits, _ and -, got %r" % (nonce,))
    body = json.dumps({"version": 2, "job_id": job_id, "rank": int(rank),
                       "files": dict((k, base64.b64encode(v).decode("ascii")) for k, v in files.items())},
                      sort_keys=True).encode()
    text = base64.b64encode(gzip.compress(body, 6, mtime=0)).decode("ascii")
    parts = [text[i:i + FRAME_WIDTH] for i in range(0, len(text), FRAME_WIDTH)] or [""]
    lines = ["%s%s:%d:%d/%d:%s::" % (FRAME, nonce, rank, i + 1, len(parts), p) for i, p in enumerate(parts)]
    lines.append("%s%s:%d:sha256=%s::" % (FRAME, nonce, rank, hashlib.sha256(body).hexdigest()))
    return "".join(line + "\n" for line in lines)


def collect_records(job_dir, rank=0, max_result=None):
    """This node's records (name -> bytes); a result larger than ``max_result`` bytes is replaced by a
    ``ResultTooLarge`` error (the channel it would travel through cannot carry it)."""
    files = {}
    for name in RECORDS:
        try:
            with open(os.path.join(job_dir, rank_name(name, rank)), "rb") as f:
                files[name] = f.read()
        except OSError:
            pass
    if max_result is None:
        return files
    result = files.get(RESULT)
    if result is not None and len(result) > max_result:
        msg = ("the function's return value takes %d bytes pickled, more than the %d bytes a result may take "
               "through the job's log; write large results to storage and return their location instead"
               % (len(result), max_result))
        del files[RESULT]
        files[ERROR_JSON] = json.dumps({"type": "ResultTooLarge", "message": msg, "traceback": ""}).encode()
        try:
            ex = json.loads(files.get(EXIT, b"{}").decode() or "{}")
        except ValueError:
            ex = {}
        for k in ("result_bytes", "result_sha256"):
            ex.pop(k, None)
        ex.update({"state": "failed", "exit_code": 1, "reason": "ResultTooLarge: " + msg})
        files[EXIT] = json.dumps(ex, sort_keys=True).encode()
        sys.stderr.write("[meshrun] %s\n" % msg)
    if len(files.get(ERROR_PKL, b"")) > max_result:
        del files[ERROR_PKL]  # the error.json text still says what went wrong
    return files


def _pump(path, pos, out):
    """Copy what was appended to ``path`` since ``pos`` to ``out``; returns (new position, last byte)."""
    last = b""
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            for chunk in iter(lambda: f.read(65536), b""):
                pos += len(chunk)
                out.write(chunk)
                last = chunk[-1:]
    except FileNotFoundError:
        pass
    out.flush()
    return pos, last


def run_emitting(job_dir, nonce, inputs=None, max_result=None):
    """``run DIR --emit-records NONCE``: for a backend whose only way back is the job's log stream.

    Copies the job's inputs from ``inputs`` (a read-only folder, e.g. a Kubernetes Secret) into ``job_dir``;
    runs the job under a supervisor of its own (``run DIR``), forwarding SIGTERM/SIGINT/SIGHUP to it; streams
    this node's ``output.log`` to stdout while it runs; then prints this node's records framed
    (:func:`frame_records`). A job whose launch.json names no ``cwd`` runs in this process's working
    directory. Exits 0 when the job succeeded, EXIT_NO_RETRY on errors a retry cannot fix, else 1."""
    job_dir = os.path.abspath(job_dir)
    if not os.path.isdir(job_dir):
        os.makedirs(job_dir)
    if inputs:
        import shutil

        for name in sorted(os.listdir(inputs)):
            src = os.path.join(inputs, name)
            if os.path.isfile(src) and not name.startswith(".."):
                shutil.copyfile(src, os.path.join(job_dir, name))
    launch = read_json(os.path.join(job_dir, LAUNCH), {}) or {}
    if not launch.get("cwd"):
        launch["cwd"] = os.getcwd()
        write_json(os.path.join(job_dir, LAUNCH), launch)
    rank = 0
    if int(launch.get("nodes") or 1) > 1:
        try:
            rank = int(dist_env(dict(launch, dist={"MASTER_PORT": "1"}), os.environ)["NODE_RANK"])
        except ValueError:
            rank = 0
    out = getattr(sys.stdout, "buffer", sys.stdout)
    out.flush()
    sup = os.fork()  # the supervisor: this very interpreter, with its flags (no second start-up)
    if sup == 0:
        code = 1
        try:
            fd = os.open(os.devnull, os.O_RDONLY)
            os.dup2(fd, 0)
            code = run_job(job_dir)
        except BaseException as e:  # noqa: B902 - the supervisor's own failure, said in the log
            _log("the supervisor failed: %s: %s" % (type(e).__name__, e))
        finally:
            os._exit(code)

    def forward(signum, frame):
        try:
            os.kill(sup, signum)
        except OSError:
            pass

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)
    log, pos, last = os.path.join(job_dir, rank_name(LOG, rank)), 0, b"\n"
    while True:
        try:
            done = os.waitpid(sup, os.WNOHANG)[0] == sup
        except ChildProcessError:
            done = True
        pos, tail = _pump(log, pos, out)
        last = tail or last
        if done:
            break
        time.sleep(0.1)
    files = collect_records(job_dir, rank, max_result)
    out.write((("\n" if last != b"\n" else "") + frame_records(nonce, launch.get("job_id") or "", rank,
                                                                files)).encode())
    out.flush()
    ex, err = {}, {}
    try:
        ex = json.loads(files.get(EXIT, b"{}").decode() or "{}")
        err = json.loads(files.get(ERROR_JSON, b"{}").decode() or "{}")
    except ValueError:
        pass
    if err.get("type") in NO_RETRY:
        return EXIT_NO_RETRY
    return 0 if ex.get("state") == "succeeded" and ERROR_JSON not in files else 1


def exit_records(job_dirs):
    """``records DIR...``: each folder's exit records, one per node (None where missing), by folder."""
    out = {}
    for d in job_dirs:
        launch = read_json(os.path.join(d, LAUNCH), {}) or {}
        try:
            nodes = max(int(launch.get("nodes") or 1), 1)
        except (TypeError, ValueError):
            nodes = 1
        out[d] = [read_json(os.path.join(d, rank_name(EXIT, r))) for r in range(nodes)]
    return out


def _run_command(rest):
    """``run DIR [--emit-records NONCE] [--inputs DIR] [--max-result BYTES]``"""
    opts, args = {}, []
    it = iter(rest)
    for a in it:
        if a in ("--emit-records", "--inputs", "--max-result"):
            opts[a] = next(it, "")
        else:
            args.append(a)
    if len(args) != 1:
        sys.stderr.write("usage: _agent.py run DIR [--emit-records NONCE|@FILE [--inputs DIR] [--max-result BYTES]]\n")
        return 2
    if "--emit-records" not in opts:
        return run_job(args[0])
    limit, nonce = opts.get("--max-result"), opts["--emit-records"]
    if nonce.startswith("@"):  # kept in a file (a Secret) rather than on the command line
        with open(nonce[1:]) as f:
            nonce = f.read().strip()
    return run_emitting(args[0], nonce, opts.get("--inputs"), int(limit) if limit else None)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.stderr.write("usage: _agent.py version|gpus|run DIR [--emit-records NONCE]|records DIR...|submit DIR|status DIR...|cancel DIR|serve SOCK|lease-service SOCK DIR|rendezvous\n")
        return 2
    cmd, rest = argv[0], argv[1:]
    out = sys.stdout
    if cmd == "version":
        py, cp = _version_tuple()
        out.write(json.dumps({"agent_version": AGENT_VERSION, "python": py, "cloudpickle": cp,
                              "executable": sys.executable, "host": hostname(),
                              "user": user_name()}) + "\n")
        return 0
    if cmd == "gpus":
        out.write(json.dumps(snapshot(direct=True)) + "\n")
        return 0
    if cmd == "run":
        return _run_command(rest)
    if cmd == "records":
        out.write(json.dumps(exit_records(rest)) + "\n")
        return 0
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
    if cmd == "rendezvous":
        out.write(rendezvous(os.environ))
        return 0
    if cmd == "lease-service":
        if len(rest) < 2:
            sys.stderr.write("usage: _agent.py lease-service SOCKET STATE_DIR\n")
            return 2
        LeaseService(rest[0], rest[1]).serve()
        return 0
    if cmd == "serve":
        serve(rest[0], float(rest[1]) if len(rest) > 1 else 600.0)
        return 0
    sys.stderr.write("unknown command %r\n" % cmd)
    return 2


if __name__ == "__main__":
    sys.exit(main())
