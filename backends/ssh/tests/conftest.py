"""Fixtures of the SSH backend's tests: a pool of real OpenSSH servers (scripts/sshd-pool.sh), backend
configurations pointing at it, and a way to run a meshrun client as another OS user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from meshrun.testing import wait_until as _wait_until

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE.parent / "scripts"
REPO = HERE.parents[2]
POOL_DIR = os.environ.get("MRSSH_POOL_DIR", "/var/lib/meshrun-sshpool")
SCRATCH = os.environ.get("MRSSH_SCRATCH", "/var/tmp/meshrun-sshpool")
ALICE, BOB = "mrssh-alice", "mrssh-bob"
RUNUSER = shutil.which("runuser", path="/usr/sbin:/sbin:/usr/bin:/bin") or "runuser"


def _pool_script(cmd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MRSSH_POOL_DIR=POOL_DIR, MRSSH_SCRATCH=SCRATCH)
    return subprocess.run(["bash", str(SCRIPTS / "sshd-pool.sh"), cmd], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="session")
def pool(session_services):
    """The running pool (started here if it is not running; stopped at the end if we started it; its test users
    removed at the end of the test run if this run created them)."""
    if os.geteuid() != 0:
        pytest.skip("the SSH pool needs root (network namespaces, sshd, test users)")
    was_up = _pool_script("status").returncode == 0
    with session_services.creating_users("sshd-pool-users", (ALICE, BOB)):
        p = _pool_script("up")
    if p.returncode != 0:
        raise RuntimeError(f"sshd-pool.sh up failed:\n{p.stdout}\n{p.stderr}")
    info = json.loads(Path(POOL_DIR, "pool.json").read_text())
    yield info
    from meshrun_ssh import close_all

    close_all()
    if not was_up and not os.environ.get("MRSSH_KEEP_POOL"):
        _pool_script("down")


@pytest.fixture
def lease_root(pool):
    """Per-test lease directories (one per host, world-writable like the machine-wide default), so no test
    sees another's leases."""
    root = Path(SCRATCH) / "leases" / uuid.uuid4().hex[:10]
    root.mkdir(parents=True)
    os.chmod(root, 0o755)
    for h in pool["hosts"]:
        d = root / h["name"]
        d.mkdir()
        os.chmod(d, 0o1777)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make_config(pool, lease_root):
    """make_config(user=ALICE, gpus={"host1": 2}, hosts=[...names], **settings) -> [backends.ssh] table."""

    def make(user: str = ALICE, gpus: int | dict = 2, hosts: list[str] | None = None, host_env: dict | None = None,
             **settings):
        u = pool["users"][user]
        entries = []
        for h in pool["hosts"]:
            if hosts is not None and h["name"] not in hosts:
                continue
            n = gpus.get(h["name"], 0) if isinstance(gpus, dict) else gpus
            env = {"MESHRUN_GPUS": f"0-{n - 1}" if n else "none"}
            env.update((host_env or {}).get(h["name"], {}))
            entries.append({"name": h["name"], "host": h["address"], "port": h["port"], "user": user,
                            "key": u["key"], "lease_dir": str(lease_root / h["name"]), "env": env})
        table = {"hosts": entries, "known_hosts": pool["known_hosts"], "ssh_config": "/dev/null",
                 "retries": 12, "retry_max_wait": 2.0}
        table.update(settings)
        return table

    return make


@pytest.fixture
def ssh_backend(make_config):
    """configure(**kw): point meshrun's ssh backend at the pool; returns the backend instance."""
    import meshrun

    def configure(**kw):
        meshrun.configure({"backends": {"ssh": make_config(**kw)}})
        return meshrun.get_backend("ssh")

    yield configure
    meshrun.configure()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A small project directory as the job's working directory."""
    d = tmp_path / "project"
    d.mkdir()
    (d / "hello.txt").write_text("hello from the project\n")
    monkeypatch.chdir(d)
    return d


# ---- running a meshrun client as another OS user -----------------------------------------------------


@pytest.fixture(scope="session")
def client_env(pool, tmp_path_factory):
    """A copy of what a meshrun client needs (meshrun, meshrun_ssh and their dependencies), readable by the
    test users, and an interpreter they may run. Returns run(user, request) -> reply (see client_script.py)."""
    base = Path(SCRATCH) / f"client-{os.getpid()}"
    lib = build_client_lib(base)
    python = _python_for(BOB)
    if python is None:
        pytest.skip(f"no Python {sys.version_info[0]}.{sys.version_info[1]} the test users may run")

    def run(user: str, request: dict, timeout: float = 120, home: str | None = None) -> dict:
        """Run client_script.py as ``user`` with its own job store (``home``: reuse one, as a restarted
        client would); the reply has the store's path under "home"."""
        if home is None:
            home = Path(SCRATCH) / f"home-{user}-{uuid.uuid4().hex[:8]}"
            home.mkdir(parents=True)
            shutil.chown(home, user, user)
        home = Path(home)
        req = base / f"req-{uuid.uuid4().hex[:8]}.json"
        req.write_text(json.dumps(request))
        os.chmod(req, 0o644)
        user_home = pool["users"][user]["home"] if user in pool["users"] else "/tmp"
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": user_home,
               "PYTHONPATH": str(lib), "MESHRUN_HOME": str(home), "MESHRUN_CONFIG": str(base / "none.toml"),
               "LANG": "C.UTF-8"}
        (base / "none.toml").write_text("")
        os.chmod(base / "none.toml", 0o644)
        argv = [python, "-s", str(base / "client_script.py"), str(req)]
        if user != "root":
            argv = [RUNUSER, "-u", user, "--"] + argv
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(home))
        if p.returncode != 0:
            raise AssertionError(f"client as {user} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        reply = json.loads(p.stdout.strip().splitlines()[-1])
        reply["home"] = str(home)
        return reply

    yield run
    shutil.rmtree(base, ignore_errors=True)
    for d in list(Path(SCRATCH).glob("home-mrssh-*")) + list(Path(SCRATCH).glob("home-root-*")):
        shutil.rmtree(d, ignore_errors=True)


def build_client_lib(base: Path) -> Path:
    """Copy meshrun, meshrun_ssh and the packages they import into ``base/lib`` (plus the client script),
    all world-readable: what a client running as another OS user needs."""
    if base.exists():
        shutil.rmtree(base)
    lib = base / "lib"
    lib.mkdir(parents=True)
    probe = ("import json, sys, meshrun, meshrun_ssh, paramiko, tenacity, pydantic, cloudpickle;"
             "import meshrun._job, meshrun._scheduler, meshrun._store, meshrun._config, meshrun._placement;"
             "import meshrun_ssh._backend, meshrun_ssh._conn, meshrun_ssh._session, meshrun_ssh._sync;"
             "import cryptography.hazmat.primitives.asymmetric.ed25519, nacl.signing, bcrypt;"
             "print(json.dumps([getattr(m, '__file__', None) for m in list(sys.modules.values())]))")
    files = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                      check=True, cwd=str(REPO)).stdout)
    roots = {p for p in sys.path if p and os.path.isdir(p) and "site-packages" in p}
    roots |= {str(REPO), str(REPO / "backends" / "ssh")}
    roots_by_depth = sorted(roots, key=len, reverse=True)  # the deepest root that holds a file wins
    tops: set[Path] = set()
    for f in files:
        if not f:
            continue
        for r in roots_by_depth:
            if f.startswith(r + os.sep):
                top = Path(r) / Path(os.path.relpath(f, r)).parts[0]
                tops.add(top)
                break
    for top in tops:
        dst = lib / top.name
        if dst.exists():
            continue
        if top.is_dir():
            shutil.copytree(top, dst, ignore=shutil.ignore_patterns("__pycache__", "tests"))
        else:
            shutil.copy2(top, dst)
    # their metadata too (paramiko asks importlib.metadata for its own version)
    import importlib.metadata as md
    import re

    norm = lambda n: re.sub(r"[-_.]+", "_", n).lower()  # noqa: E731
    by_top = md.packages_distributions()
    wanted = {norm(d) for t in tops for d in by_top.get(t.name.split(".")[0], [])}
    for r in roots:
        for info in Path(r).glob("*.dist-info"):
            if norm(info.name[: -len(".dist-info")].rsplit("-", 1)[0]) in wanted and not (lib / info.name).exists():
                shutil.copytree(info, lib / info.name)
    shutil.copy2(HERE / "client_script.py", base / "client_script.py")
    for dirpath, dirnames, filenames in os.walk(base):
        os.chmod(dirpath, 0o755)
        for fn in filenames:
            os.chmod(os.path.join(dirpath, fn), 0o644)
    os.chmod(base, 0o755)
    return lib


def _python_for(user: str) -> str | None:
    """An interpreter of this minor version that ``user`` may run (ours, else the system's)."""
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for cand in (sys.executable, os.path.realpath(sys.executable), f"/usr/bin/python{minor}", "/usr/bin/python3"):
        p = subprocess.run([RUNUSER, "-u", user, "--", cand, "-c",
                            "import sys; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True)
        if p.returncode == 0 and p.stdout.strip() == minor:
            return cand
    return None


# ---- sshd control -------------------------------------------------------------------------------------


def sshd_pids(pidfile: str) -> tuple[int | None, list[int]]:
    """(listener pid, pids of its descendants: the per-connection sshd processes and what they run)."""
    try:
        listener = int(Path(pidfile).read_text().strip())
    except (OSError, ValueError):
        return None, []
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            raw = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [listener]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return listener, out


def kill_sshd(host: dict) -> None:
    """Kill a host's sshd hard: the listener and every connection it serves (as a crash or reboot would)."""
    import signal

    listener, descendants = sshd_pids(host["pidfile"])
    for pid in ([listener] if listener else []) + descendants:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def restart_pool() -> None:
    p = _pool_script("up")
    assert p.returncode == 0, p.stdout + p.stderr


def wait_until(pred, timeout=30.0, interval=0.05, what="condition"):
    return _wait_until(pred, timeout, interval, what)


@pytest.fixture
def ctl():
    """Pool control for tests: kill_sshd(host), restart(), wait_until(pred, timeout, what=...)."""

    class Ctl:
        kill_sshd = staticmethod(kill_sshd)
        restart = staticmethod(restart_pool)
        wait_until = staticmethod(wait_until)

    return Ctl
