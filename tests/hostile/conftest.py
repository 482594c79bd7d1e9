"""Two real OS users on one machine: ``alice`` (the victim, running meshrun as she normally would) and
``bob`` (a hostile local user). The tests here replay attacks a local user could try through anything
meshrun shares (the lease directory, fork-server sockets, job stores, terminal output, remote helpers)
and assert that each one now fails.

The users are created for the test session (``useradd``) and removed when the test run ends (the root
conftest.py's ``session_services``); the tests need root to do that and are skipped without it. Everything the two users share lives under a fresh directory in /tmp
that both can reach; each user's own files live in a private 0700 directory of theirs."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshrun.testing import wait_until

REPO = Path(__file__).resolve().parents[2]
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"


def _user_python() -> str:
    """An interpreter every user may run with this environment's packages: the test interpreter may live in
    a directory only root can enter (e.g. under /root), so use the system python3 of the same version with
    this environment's site-packages on PYTHONPATH."""
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(cand):
            v = subprocess.run([cand, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True).stdout.strip()
            if v == "%d.%d" % sys.version_info[:2]:
                return cand
    return sys.executable


PY = _user_python()
SITE = [p for p in sys.path if p.endswith("site-packages")]


@dataclass
class User:
    name: str
    uid: int
    gid: int
    home: Path
    private: Path  # a 0700 directory of this user's, for MESHRUN_HOME and such

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment for this user that imports meshrun from this checkout."""
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "PYTHONPATH": os.pathsep.join([str(REPO)] + [str(p) for p in sorted((REPO / "backends").glob("*"))
                                                         if p.is_dir()] + SITE),
            "MESHRUN_HOME": str(self.private / "meshrun-home"),
            "MESHRUN_CONFIG": str(self.private / "no-config.toml"),
            "LANG": "C.UTF-8",
            "MESHRUN_CLI_SERVER": "0",  # no command server outlives a test (test_client.py starts its own)
        }
        env.update(extra)
        return env

    def run(self, argv, *, env=None, check=False, timeout=120, **kw) -> subprocess.CompletedProcess:
        """Run argv as this user (runuser, no login shell): returns the completed process, text mode."""
        return subprocess.run([RUNUSER, "-u", self.name, "--", *map(str, argv)], env=env or self.env(),
                              capture_output=True, text=True, timeout=timeout, check=check, **kw)

    def popen(self, argv, *, env=None, **kw) -> subprocess.Popen:
        return subprocess.Popen([RUNUSER, "-u", self.name, "--", *map(str, argv)], env=env or self.env(), **kw)

    def python(self, code: str, *args, env=None, timeout=120) -> subprocess.CompletedProcess:
        """Run Python code as this user with an interpreter they may run (``PY``) and this checkout's meshrun."""
        return self.run([PY, "-c", code, *args], env=env, timeout=timeout)


def _ensure_user(name: str, root: Path, services) -> User:
    services.use("hostile-users", was_up=True)
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True)
        services.created_user("hostile-users", name)  # removed (with its processes) when the test run ends
        pw = pwd.getpwnam(name)
    home = Path(pw.pw_dir)
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, pw.pw_uid, pw.pw_gid)
    private = root / name
    private.mkdir(mode=0o700)
    os.chown(private, pw.pw_uid, pw.pw_gid)
    os.chmod(private, 0o700)
    (private / "no-config.toml").write_text("")
    os.chown(private / "no-config.toml", pw.pw_uid, pw.pw_gid)
    return User(name, pw.pw_uid, pw.pw_gid, home, private)


@pytest.fixture(scope="session")
def hostile_root():
    if os.geteuid() != 0:
        pytest.skip("needs root to create two OS users")
    root = Path(f"/tmp/meshrun-hostile-{uuid.uuid4().hex[:8]}")
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


# one pair of users per test run (several runs on one machine must not remove each other's users)
_SUFFIX = "%d" % (os.getpid() % 100000)
NAMES = {"alice": "mra" + _SUFFIX, "bob": "mrb" + _SUFFIX}


@pytest.fixture(scope="session")
def alice(hostile_root, session_services) -> User:
    """The victim: an ordinary OS user running meshrun as usual (named ``mra<pid>``)."""
    return _ensure_user(NAMES["alice"], hostile_root, session_services)


@pytest.fixture(scope="session")
def bob(hostile_root, session_services) -> User:
    """The attacker: another ordinary OS user of the same machine (named ``mrb<pid>``)."""
    return _ensure_user(NAMES["bob"], hostile_root, session_services)


@pytest.fixture
def shared_dir(hostile_root) -> Path:
    """A fresh directory both users can reach (0755, root's), for things like a lease directory's parent."""
    d = hostile_root / f"shared-{uuid.uuid4().hex[:8]}"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    return d


# A job submitted as one of the users: argv (JSON), GPUs, name, seconds to wait (0: do not wait); prints
# {id, state, reason}, with state "refused" when placement refuses it before it starts.
JOB = r"""
import json, sys, meshrun
try:
    j = meshrun.run(json.loads(sys.argv[1]), gpus=int(sys.argv[2]), name=sys.argv[3])
except meshrun.NoPlacementError as e:
    print(json.dumps({"id": None, "state": "refused", "reason": str(e)}))
    sys.exit(0)
if float(sys.argv[4]) > 0:
    try:
        j.wait(timeout=float(sys.argv[4]))
    except TimeoutError:
        pass
j.refresh()
print(json.dumps({"id": j.id, "state": j.record.state.value, "reason": j.record.reason}))
"""


def wait_for(pred, timeout: float = 60.0) -> None:
    wait_until(pred, timeout, 0.1)


RACER = r"""
import json, sys
import meshrun
out, n, k, var = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
code = ("import json, os, sys, time, uuid; t0 = time.time(); time.sleep(0.2); "
        "rec = {'gpus': os.environ.get(sys.argv[2]), 'hip': os.environ.get('HIP_VISIBLE_DEVICES'), "
        "'cuda': os.environ.get('CUDA_VISIBLE_DEVICES'), 'start': t0, 'end': time.time(), 'user': os.getuid(), "
        "'job': os.environ.get('MESHRUN_JOB_ID')}; "
        "open(os.path.join(sys.argv[1], uuid.uuid4().hex + '.json'), 'w').write(json.dumps(rec))")
jobs = [meshrun.run(["python3", "-c", code, out, var], gpus=1 + (i + k) % 2, name=f"r{k}-{i}") for i in range(n)]
meshrun.wait(jobs, timeout=240)
print(json.dumps([j.id for j in jobs if j.status() is not meshrun.JobState.SUCCEEDED]))
"""


def race(users: list[User], env_of, out: Path, n: int, var: str = "CUDA_VISIBLE_DEVICES") -> list[dict]:
    """One submitter per entry of ``users``, all at once, each running ``n`` GPU jobs of 1 or 2 GPUs that record
    the GPUs they were shown (``var``), by whom and when, into ``out``: the records, once every job succeeded."""
    out.mkdir()
    os.chmod(out, 0o1777)
    procs = [u.popen([PY, "-c", RACER, str(out), str(n), str(k), var], env=env_of(u), stdout=subprocess.PIPE, text=True)
             for k, u in enumerate(users)]
    for p in procs:
        stdout, _ = p.communicate(timeout=300)
        assert p.returncode == 0 and json.loads(stdout.strip().splitlines()[-1]) == []
    return [json.loads(f.read_text()) for f in out.glob("*.json")]
