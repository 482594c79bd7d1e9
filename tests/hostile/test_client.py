"""Attacks on what a meshrun client shares with other local users, replayed as two real OS users.

* the warm fork server's socket: a planted socket directory, a listener of another user at the socket path
  (checked with SO_PEERCRED by the client) and a client of another user at the server (checked by the
  server);
* the job store: readable by others when MESHRUN_HOME is loose, or with entries planted in it;
* terminal output: another user's job name with escape sequences reaching ``meshrun gpus``, ``ls``, ``status``;
* jobs started through the warm fork server take the submitter's umask and resource limits, not the server's.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from meshrun.testing import wait_until as _wait_until

if TYPE_CHECKING:
    from .conftest import User


def _reachable_by_others(path: str) -> bool:
    p = Path(os.path.realpath(path))
    if not os.stat(p).st_mode & stat.S_IXOTH:
        return False
    return all(os.stat(d).st_mode & stat.S_IXOTH for d in p.parents)


# The users run meshrun with this interpreter. A virtual environment under a private directory (/root) cannot
# be run by them; then the system interpreter of the same version runs it with this environment's packages.
if _reachable_by_others(sys.executable):
    PY, EXTRA_PATH = sys.executable, ""
else:
    PY = shutil.which("python3", path="/usr/bin:/usr/local/bin") or "/usr/bin/python3"
    EXTRA_PATH = sysconfig.get_paths()["purelib"]

SECRET = "alice-secret-token-7f3a"
EVIL = ["\x1b]52;c;ZXZpbA==\x07", "\x1b[2J", "\x1b]0;title\x07", "\r\u202eevil\x9b31m"]


@pytest.fixture(scope="module", autouse=True)
def _interpreter_runs():
    v = subprocess.run([PY, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True)
    if v.stdout.strip() != "%d.%d" % sys.version_info[:2]:
        pytest.skip(f"no interpreter of this Python version that other users can run ({PY})")


def env_of(user: User, **extra: str) -> dict[str, str]:
    """The user's environment, for the local backend (whatever other backends are installed)."""
    env = user.env(**{"MESHRUN_BACKEND": "local", **extra})
    if EXTRA_PATH:
        env["PYTHONPATH"] += os.pathsep + EXTRA_PATH
        env["PATH"] = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    return env


def as_user(user: User, argv, *, env=None, prefix: str = "", timeout=120, **kw) -> subprocess.CompletedProcess:
    """Run argv as ``user``; ``prefix`` is shell run first in the same process (``umask 077; ulimit -Sn 200``)."""
    argv = [str(a) for a in argv]
    if prefix:
        argv = ["/bin/bash", "-c", prefix + '\nexec "$@"', "bash", *argv]
    return user.run(argv, env=env or env_of(user), timeout=timeout, **kw)


def py(user: User, code: str, *args, env=None, prefix: str = "", timeout=120) -> subprocess.CompletedProcess:
    return as_user(user, [PY, "-c", code, *args], env=env, prefix=prefix, timeout=timeout)


def cli(user: User, *args, env=None, prefix: str = "", timeout=120) -> subprocess.CompletedProcess:
    return as_user(user, [PY, "-m", "meshrun", *args], env=env, prefix=prefix, timeout=timeout)


def wait_until(pred, timeout=30.0, what="condition"):
    return _wait_until(pred, timeout, 0.05, what)


def socket_dir_of(user: User) -> Path:
    return Path(f"/tmp/meshrun-{user.uid}")


def remove_path(p: Path) -> None:
    if p.is_symlink() or p.is_file() or p.is_socket():
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _no_socket_dirs_left(alice, bob):
    """The users' socket directories go with them (their servers exit once their socket is gone)."""
    yield
    for user in (alice, bob):
        remove_path(socket_dir_of(user))


@pytest.fixture
def clean_sockets(alice):
    """No socket directory of alice's before and after the test (her warm fork servers exit once their
    socket is gone)."""
    remove_path(socket_dir_of(alice))
    yield socket_dir_of(alice)
    remove_path(socket_dir_of(alice))


def server_path(user: User, env=None) -> str:
    """Where ``user``'s fork server listens (this creates their private socket directory if missing)."""
    r = py(user, "from meshrun._config import get_config; from meshrun._local import fork_server_path;"
                 "print(fork_server_path(get_config().home, warn=False))", env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def shared_for(user: User, parent: Path, name: str, mode: int = 0o755) -> Path:
    d = parent / name
    d.mkdir()
    os.chown(d, user.uid, user.gid)
    os.chmod(d, mode)
    return d


LISTENER = r"""
import json, os, socket, sys, time
path, log = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o777)
s.listen(16)
s.settimeout(0.1)
state = {"pid": os.getpid(), "connections": 0, "received": ""}
def save():
    with open(log + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(log + ".tmp", log)
save()
end = time.time() + 300
while time.time() < end and not os.path.exists(log + ".stop"):
    try:
        c, _ = s.accept()
    except socket.timeout:
        continue
    state["connections"] += 1
    c.settimeout(3)
    try:
        while True:
            b = c.recv(65536)
            if not b:
                break
            state["received"] += b.decode("latin-1")
    except socket.timeout:
        pass
    c.close()
    save()
"""


class Listener:
    """A unix socket listener run by ``user`` at ``path``: counts connections and keeps every byte received."""

    def __init__(self, user: User, path: Path | str, log_dir: Path):
        self.log = log_dir / f"listener-{uuid.uuid4().hex[:6]}.json"
        self.proc = user.popen([PY, "-c", LISTENER, str(path), str(self.log)], env=env_of(user),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: self.log.exists() or self.proc.poll() is not None, what="the listener")
        assert self.log.exists(), self.proc.stderr.read().decode() if self.proc.stderr else ""

    def state(self) -> dict:
        return json.loads(self.log.read_text())

    def stop(self) -> None:
        Path(str(self.log) + ".stop").write_text("")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.state()["pid"], 9)
            self.proc.wait(timeout=10)


def alice_jobs(alice: User, env=None) -> list[dict]:
    r = cli(alice, "ls", "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# ---- 1. the fork server's socket directory ----------------------------------------------------------------


@pytest.mark.parametrize("planted", ["bob-dir-0777", "bob-dir-0700", "symlink-to-bob-dir", "alice-dir-0755"])
def test_a_planted_socket_directory_is_not_used(alice, bob, shared_dir, clean_sockets, planted):
    """Bob creates /tmp/meshrun-<alice's uid> (or a symlink there) and listens at the very socket path alice's
    fork server would use, before alice submits: alice's job still runs (started directly), bob gets no
    connection and not one byte, nothing of alice's is created in his directory, and alice is told why."""
    sock_name = os.path.basename(server_path(alice))
    remove_path(clean_sockets)
    bob_area = shared_for(bob, shared_dir, "bob", 0o755)
    if planted == "symlink-to-bob-dir":
        target = bob_area / "sockets"
        assert as_user(bob, ["mkdir", "-m", "777", target]).returncode == 0
        assert as_user(bob, ["ln", "-s", target, clean_sockets]).returncode == 0
        listen_at = target / sock_name
    elif planted == "alice-dir-0755":  # her own mistake: refused with the fix, and never chmodded for her
        assert as_user(alice, ["mkdir", "-m", "755", clean_sockets]).returncode == 0
        listen_at = None
    else:
        mode = planted.rsplit("-", 1)[1]
        assert as_user(bob, ["mkdir", "-m", mode, clean_sockets]).returncode == 0
        if mode == "0700":  # bob listens there and then closes his directory
            assert as_user(bob, ["chmod", "777", clean_sockets]).returncode == 0
        listen_at = clean_sockets / sock_name
    listener = Listener(bob, listen_at, bob_area) if listen_at else None
    if planted == "bob-dir-0700":
        assert as_user(bob, ["chmod", "700", clean_sockets]).returncode == 0
    before = clean_sockets.lstat()
    try:
        r = cli(alice, "run", "--name", "hijack-me", "--", "/bin/sh", "-c", 'echo "token=$TOKEN ok"',
                env=env_of(alice, TOKEN=SECRET))
        assert r.returncode == 0, r.stderr
        assert f"token={SECRET} ok" in r.stdout
        assert str(clean_sockets) in r.stderr and "fix:" in r.stderr, r.stderr
        assert r.stderr.count("not using the fork server") == 1
        r2 = cli(alice, "run", "--", "/bin/echo", "again", env=env_of(alice, TOKEN=SECRET))
        assert r2.returncode == 0 and "again" in r2.stdout, r2.stderr
        jobs = alice_jobs(alice)
        mine = [j for j in jobs if j["name"] == "hijack-me"]
        assert mine and mine[0]["state"] == "succeeded", mine
        assert all(j["state"] != "lost" for j in jobs)
    finally:
        if listener:
            listener.stop()
    if listener:
        got = listener.state()
        assert got["connections"] == 0 and got["received"] == "", got
        assert SECRET not in json.dumps(got)
        for p in listen_at.parent.iterdir():  # nothing of alice's in bob's directory
            assert p.lstat().st_uid == bob.uid, p
    after = clean_sockets.lstat()
    assert (after.st_uid, after.st_mode) == (before.st_uid, before.st_mode)  # never chmodded or chowned


def test_a_listener_of_another_user_gets_no_byte(alice, bob, shared_dir, clean_sockets):
    """SO_PEERCRED on the client: connected to a socket bob listens on, alice sends nothing (not her
    environment, not the job) and says whose socket it is."""
    bob_area = shared_for(bob, shared_dir, "bob", 0o755)
    listener = Listener(bob, bob_area / "agent.sock", bob_area)
    try:
        code = ("import sys; from meshrun import _agent;"
                "print(_agent.server_spawn(sys.argv[1], '/nonexistent-job', env={'TOKEN': sys.argv[2]}))")
        r = py(alice, code, bob_area / "agent.sock", SECRET)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "None"
        assert f"uid {bob.uid}" in r.stderr and "not using it" in r.stderr, r.stderr
        got = wait_until(lambda: (lambda s: s if s["connections"] else None)(listener.state()), what="the connection")
        assert got["connections"] == 1 and got["received"] == "", got
    finally:
        listener.stop()


def test_a_server_of_another_user_at_her_socket_path_is_refused(alice, bob, shared_dir, clean_sockets):
    """Even with bob's listener at alice's own socket path (which needs root's help: her socket directory is
    private), her submit sends him nothing; she starts a server of her own there and her jobs run."""
    path = Path(server_path(alice))
    bob_area = shared_for(bob, shared_dir, "bob", 0o755)
    listener = Listener(bob, bob_area / "planted.sock", bob_area)
    os.rename(bob_area / "planted.sock", path)
    try:
        for i in range(2):
            r = cli(alice, "run", "--", "/bin/sh", "-c", f'echo "run{i} token=$TOKEN"', env=env_of(alice, TOKEN=SECRET))
            assert r.returncode == 0, r.stderr
            assert f"run{i} token={SECRET}" in r.stdout
            if i == 0:
                assert f"{path} is served by uid {bob.uid}" in r.stderr, r.stderr
        wait_until(lambda: path.exists() and path.lstat().st_uid == alice.uid, what="alice's own server")
        assert all(j["state"] == "succeeded" for j in alice_jobs(alice)[:2])
    finally:
        listener.stop()
    got = listener.state()
    assert got["connections"] >= 1 and got["received"] == "", got


OLD_PATH = r"""
import hashlib, os, sys
from meshrun import _agent, _local
key = f"{sys.executable}|{_agent.AGENT_VERSION}|{_local.agent_file()}|{_local._agent_digest()}|{os.getuid()}"
print(os.path.join("/tmp", f"meshrun-{os.getuid()}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.sock"))
"""


def test_a_long_home_does_not_move_the_socket_to_a_predictable_place(alice, bob, shared_dir, clean_sockets):
    """The socket path of a MESHRUN_HOME too long for AF_UNIX used to be /tmp/meshrun-<uid>-<hash>.sock, which
    anyone could bind first: bob listens there, alice (with a long home) submits twice; her jobs come through
    her own server in her private directory and bob gets nothing."""
    home = alice.private / ("h" * 60) / ("o" * 60) / "meshrun-home"
    env = env_of(alice, MESHRUN_HOME=str(home), TOKEN=SECRET)
    old = py(alice, OLD_PATH, env=env).stdout.strip()
    assert old.startswith(f"/tmp/meshrun-{alice.uid}-")
    path = server_path(alice, env=env)
    assert os.path.dirname(path) == str(clean_sockets)
    listener = Listener(bob, old, shared_for(bob, shared_dir, "bob", 0o755))
    try:
        for i in range(2):
            r = cli(alice, "run", "--", "/bin/sh", "-c", f'echo "run{i} token=$TOKEN"', env=env)
            assert r.returncode == 0 and f"run{i} token={SECRET}" in r.stdout, r.stderr
            if i == 0:
                wait_until(lambda: os.path.exists(path), what="alice's fork server")
    finally:
        listener.stop()
        remove_path(Path(old))
    got = listener.state()
    assert got["connections"] == 0 and got["received"] == "", got


BOB_SPAWN = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    s.sendall((json.dumps({"op": "spawn", "job_dir": sys.argv[2], "env": {"PATH": "/usr/bin:/bin"}}) + "\n").encode())
except OSError as e:  # the server may answer and hang up before the request is all sent
    print("send:", e, file=sys.stderr)
buf = b""
while not buf.endswith(b"\n"):
    try:
        b = s.recv(65536)
    except OSError:
        break
    if not b:
        break
    buf += b
print(buf.decode().strip())
"""


def test_the_server_refuses_a_client_of_another_user(alice, bob, shared_dir, clean_sockets, helpers):
    """SO_PEERCRED on the server: bob reaching alice's fork server (through a link root made to it) and asking
    it to start a job folder he wrote gets a refusal, nothing runs as alice, and the supervisor her server
    keeps forked ahead (meshrun-nextjob) still waits for her next job."""
    path = Path(server_path(alice))
    r = cli(alice, "run", "--", "/bin/true")
    assert r.returncode == 0, r.stderr
    wait_until(path.exists, what="alice's fork server")

    def spares() -> list[int]:  # of this server: another MESHRUN_HOME's (an earlier test's) may end meanwhile
        return [p for s in helpers.serving(path) for p in helpers.children(s, "meshrun-nextjob")]

    spare = wait_until(spares, what="alice's fork-server spare")
    bob_area = shared_for(bob, shared_dir, "bob", 0o755)
    link = bob_area / "alice-server.sock"
    os.link(path, link)
    os.chmod(link, 0o777)
    job = bob_area / "job"
    mark = bob_area / "pwned"
    assert as_user(bob, ["mkdir", "-m", "777", job]).returncode == 0
    launch = {"kind": "command", "argv": ["/bin/sh", "-c", f"id -u > {mark}"], "lease": False, "gpus": 0}
    assert as_user(bob, ["/bin/sh", "-c", f"echo {shlex.quote(json.dumps(launch))} > {job}/launch.json; "
                                          f"chmod 666 {job}/launch.json; chmod 777 {bob_area}"]).returncode == 0
    r = py(bob, BOB_SPAWN, link, job)
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert "pid" not in reply and "refused" in reply.get("error", ""), reply
    assert not (job / ".started").exists() and not mark.exists()
    time.sleep(0.5)
    assert spares() == spare, "bob's request reached her spare"
    # the server itself still serves alice
    r = cli(alice, "run", "--", "/bin/echo", "still-serving")
    assert r.returncode == 0 and "still-serving" in r.stdout, r.stderr


# ---- 1b. the command server's socket (meshrun/_cliclient.py) -------------------------------------------------


def cli_server_path(user: User, env=None) -> str:
    r = py(user, "from meshrun._cliclient import server_path; print(server_path())", env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


BOB_COMMAND = r"""
import json, socket, sys
from meshrun._cliclient import frame, read_frame  # the protocol itself: refused for who he is, not for his bytes
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
req = {"argv": ["run", "--", "/bin/sh", "-c", "id -u > " + sys.argv[2]], "cwd": "/", "env": {"PATH": "/usr/bin:/bin"},
       "umask": 0, "streams": [1, 2], "key": sys.argv[3]}
fds = b"".join(n.to_bytes(4, sys.byteorder) for n in (1, 2))
try:
    s.sendmsg([frame(req)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
except OSError as e:
    print("send:", e, file=sys.stderr)
try:
    reply = read_frame(s)
except OSError:
    reply = None
print(json.dumps(reply or {}))
"""


def test_the_command_server_refuses_a_client_of_another_user(alice, bob, shared_dir, clean_sockets, helpers):
    """SO_PEERCRED on alice's command server: bob, reaching it through a link root made (her socket directory
    is private), asks it to run a command with his streams; he is refused, nothing runs as alice, and her
    own commands are still served."""
    env = env_of(alice, MESHRUN_CLI_SERVER="1")
    path = Path(cli_server_path(alice, env))
    r = cli(alice, "run", "--", "/bin/true", env=env)  # runs itself and starts her server
    assert r.returncode == 0, r.stderr
    wait_until(path.exists, timeout=60, what="alice's command server")
    key = py(alice, "from meshrun._cliclient import server_key; print(server_key())", env=env).stdout.strip()
    bob_area = shared_for(bob, shared_dir, "bob", 0o777)
    link = bob_area / "alice-cli.sock"
    os.link(path, link)
    os.chmod(link, 0o777)
    mark = bob_area / "pwned"
    before = len(alice_jobs(alice, env))

    def spares() -> list[int]:  # her server's child forked ahead for her next command (meshrun-spare in ps)
        return [p for s in helpers.serving(path) for p in helpers.children(s, "meshrun-spare")]

    spare = wait_until(spares, timeout=60, what="alice's spare")
    try:
        r = py(bob, BOB_COMMAND, link, mark, key)
        assert r.returncode == 0, r.stderr
        reply = json.loads(r.stdout)
        assert "pid" not in reply and "refused" in reply.get("error", ""), reply
        time.sleep(1)
        assert not mark.exists()
        assert spares() == spare, "bob's connection reached her spare"  # still waiting, for her alone
        assert len(alice_jobs(alice, env)) == before  # no job of bob's in her store
        r = cli(alice, "run", "--", "/bin/echo", "still-serving", env=env)
        assert r.returncode == 0 and "still-serving" in r.stdout, r.stderr
    finally:
        os.unlink(link)
        os.unlink(path)  # her server ends


def test_a_command_server_socket_of_another_user_gets_no_byte(alice, bob, shared_dir, clean_sockets):
    """Bob's listener at alice's command-server path (put there with root's help): her `meshrun run` sends him
    nothing (not her environment, not her streams), says whose socket it is, and runs the command itself."""
    env = env_of(alice, MESHRUN_CLI_SERVER="1", TOKEN=SECRET)
    path = Path(cli_server_path(alice, env))
    bob_area = shared_for(bob, shared_dir, "bob", 0o755)
    listener = Listener(bob, bob_area / "planted.sock", bob_area)
    os.rename(bob_area / "planted.sock", path)
    try:
        r = cli(alice, "run", "--", "/bin/sh", "-c", 'echo "token=$TOKEN"', env=env)
        assert r.returncode == 0 and f"token={SECRET}" in r.stdout, r.stderr
        assert f"{path} is served by uid {bob.uid}" in r.stderr, r.stderr
    finally:
        listener.stop()
        remove_path(path)
    got = listener.state()
    assert got["connections"] >= 1 and got["received"] == "", got


# ---- 2. the job store ----------------------------------------------------------------------------------------


STORE_HOLD = r"""
import sys, meshrun
job = meshrun.run(["/bin/echo", "--api-key=" + sys.argv[1]], name="with-a-key")
job.result(timeout=60)
print(job.id, flush=True)
sys.stdin.readline()  # the store stays open (jobs.db-wal and -shm exist) until told to go on
"""


def test_the_store_is_private_in_a_home_she_made_loose(alice, bob, shared_dir):
    """Alice made MESHRUN_HOME herself with mode 0777 and works with umask 000: the job index (and its -wal and
    -shm files), the job folders and their files are still hers alone, and a job's `--api-key=...` stays
    unreadable by bob."""
    area = shared_for(alice, shared_dir, "alice", 0o755)
    home = area / "meshrun-home"
    assert as_user(alice, ["mkdir", "-m", "777", home], prefix="umask 000").returncode == 0
    assert stat.S_IMODE(home.stat().st_mode) == 0o777
    env = env_of(alice, MESHRUN_HOME=str(home))
    holder = alice.popen(["/bin/bash", "-c", 'umask 000\nexec "$@"', "bash", PY, "-c", STORE_HOLD, SECRET], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job_id = holder.stdout.readline().strip()
        assert job_id, holder.stderr.read() if holder.poll() is not None else "no job id"
        job_dir = home / "jobs" / job_id
        files = {home: 0o700, home / "jobs": 0o700, job_dir: 0o700, home / "jobs.db": 0o600}
        for name in ("jobs.db-wal", "jobs.db-shm"):
            assert (home / name).exists(), name  # the store is open
            files[home / name] = 0o600
        for p in job_dir.iterdir():
            files[p] = 0o700 if p.is_dir() else 0o600
        assert (job_dir / "launch.json") in files and (job_dir / "output.log") in files
        for p, mode in files.items():
            st = p.lstat()
            assert st.st_uid == alice.uid and stat.S_IMODE(st.st_mode) & 0o077 == 0, (p, oct(st.st_mode))
            assert stat.S_IMODE(st.st_mode) & ~mode == 0, (p, oct(st.st_mode))
        steal = r"""
import os, sys
home = sys.argv[1]
tries = [home + "/jobs.db", home + "/jobs.db-wal", home + "/jobs.db-shm"] + sys.argv[2:]
for p in tries:
    try:
        with open(p, "rb") as f:
            print("READ", p, f.read(200))
    except OSError as e:
        print("DENIED", p, e.errno)
try:
    print("LISTED", os.listdir(home))
except OSError as e:
    print("DENIED", home, e.errno)
"""
        r = py(bob, steal, home, *(str(p) for p in files if p.is_file()))
        assert r.returncode == 0, r.stderr
        assert "READ" not in r.stdout and "LISTED" not in r.stdout, r.stdout
        assert SECRET not in r.stdout
        g = as_user(bob, ["grep", "-r", SECRET, home])
        assert g.returncode != 0 and SECRET not in g.stdout
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=60)
    err = holder.stderr.read()
    assert f"{home} was open to other users (mode 0777); made it 0700" in err, err


@pytest.mark.parametrize("planted", ["jobs.db symlink", "jobs.db-wal of bob", "jobs dir of bob", "home of bob"])
def test_the_store_refuses_a_home_or_entries_of_another_user(alice, bob, shared_dir, planted):
    """A MESHRUN_HOME that belongs to bob, or one alice left open in which bob planted the index, its WAL or
    the jobs folder: alice gets a clear error naming the path and its owner, and bob's files get nothing."""
    bob_area = shared_for(bob, shared_dir, "bob", 0o755)
    trap = bob_area / "trap"
    assert as_user(bob, ["/bin/sh", "-c", f"umask 000; : > {trap}; mkdir -m 777 {bob_area}/trapdir"]).returncode == 0
    if planted == "home of bob":
        home = bob_area / "home"
        assert as_user(bob, ["mkdir", "-m", "777", home]).returncode == 0
        entry, owner = home, bob.name
    else:
        area = shared_for(alice, shared_dir, "alice", 0o755)
        home = area / "meshrun-home"
        assert as_user(alice, ["mkdir", "-m", "777", home], prefix="umask 000").returncode == 0
        entry = home / planted.split()[0]
        cmd = {"jobs.db symlink": ["ln", "-s", trap, entry],
               "jobs.db-wal of bob": ["/bin/sh", "-c", f"umask 000; : > {entry}"],
               "jobs dir of bob": ["ln", "-s", f"{bob_area}/trapdir", entry]}[planted]
        assert as_user(bob, cmd).returncode == 0
        owner = "symlink" if "symlink" in planted or planted == "jobs dir of bob" else bob.name
    env = env_of(alice, MESHRUN_HOME=str(home))
    r = cli(alice, "run", "--", "/bin/echo", f"--api-key={SECRET}", env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert str(entry) in r.stderr and owner in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert trap.read_bytes() == b"" and list((bob_area / "trapdir").iterdir()) == []
    for p in bob_area.rglob("*"):
        assert p.lstat().st_uid == bob.uid, p
    if planted != "home of bob":
        assert stat.S_IMODE(home.stat().st_mode) == 0o700  # hers: tightened even though it is refused
    else:
        assert not (home / "jobs.db").exists()


# ---- 3. terminal output ------------------------------------------------------------------------------------------


def _assert_no_controls(text: str) -> None:
    for ch in ("\x1b", "\x07", "\x9b", "\r", "\u202e"):
        assert ch not in text, (ch, text)


def test_escape_sequences_in_names_never_reach_the_terminal(alice, bob, shared_dir):
    """Bob's job names carry escape sequences (OSC 52 clipboard write, clear screen, set title, a bidi
    override); alice's `meshrun gpus`, `ls` and `status` show them as visible escapes, with no ESC or BEL;
    `--json` keeps the exact text."""
    leases = shared_dir / "leases"
    leases.mkdir()
    os.chmod(leases, 0o777)
    extra = {"MESHRUN_LEASE_DIR": str(leases), "MESHRUN_GPUS": "0,1"}
    evil = "".join(EVIL)
    held = cli(bob, "run", "-d", "--gpus", "1", "--name", "holds" + evil, "--", "/bin/sleep", "120",
               env=env_of(bob, **extra))
    assert held.returncode == 0, held.stderr
    waits = cli(bob, "run", "-d", "--gpus", "2", "--name", "waits" + evil, "--", "/bin/true", env=env_of(bob, **extra))
    assert waits.returncode == 0, waits.stderr
    try:
        last = []

        def seen():
            r = cli(alice, "gpus", "--json", env=env_of(alice, **extra))
            last[:] = [r.stdout, r.stderr]
            snap = json.loads(r.stdout) if r.returncode == 0 else {}
            local = next(iter(snap.values()), {}) if snap else {}
            names = [rec.get("name") for rec in (local.get("leases") or {}).values()]
            queued = [t.get("name") for t in local.get("queue") or []]
            return ("holds" + evil) in names and ("waits" + evil) in queued
        try:
            wait_until(seen, timeout=60, what="bob's lease and ticket")
        except AssertionError:
            bobs = cli(bob, "ls", env=env_of(bob, **extra)).stdout
            raise AssertionError(f"alice's view of the GPUs: {last}; bob's jobs: {bobs}") from None
        r = cli(alice, "gpus", env=env_of(alice, **extra))
        assert r.returncode == 0, r.stderr
        _assert_no_controls(r.stdout + r.stderr)
        assert bob.name in r.stdout
        for shown in ("holds\\x1b]52;c;ZXZpbA==\\x07", "waits\\x1b]52", "\\x1b[2J", "\\u202eevil\\x9b31m"):
            assert shown in r.stdout, shown
    finally:
        for out in (held.stdout, waits.stdout):
            cli(bob, "cancel", out.strip(), env=env_of(bob, **extra))

    # alice's own job, named and run from text bob wrote (a shared task file, a sweep list ...)
    r = cli(alice, "run", "-d", "--name", evil, "--", "/bin/echo", evil)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    wait_until(lambda: cli(alice, "status", "--json", job_id).stdout.count('"succeeded"'), what="alice's job")
    for args in (["ls"], ["status", job_id]):
        out = cli(alice, *args)
        assert out.returncode == 0, out.stderr
        _assert_no_controls(out.stdout + out.stderr)
        assert "\\x1b]0;title\\x07" in out.stdout
    exact = json.loads(cli(alice, "status", "--json", job_id).stdout)
    assert exact["name"] == evil


# ---- 4. what a job inherits from the warm fork server ---------------------------------------------------------


# what a job sees: its umask, its open-files limits, and its supervisor's parent (the fork server, when it
# came through one)
PROBE = ('echo "umask=$(umask) nofile=$(ulimit -Sn)/$(ulimit -Hn) '
         'server=$(awk \'/^PPid/ {print $2}\' /proc/$PPID/status)"')


def _probe(alice: User, prefix: str, env=None) -> tuple[dict, str]:
    r = cli(alice, "run", "--", "/bin/bash", "-c", PROBE, prefix=prefix, env=env)
    assert r.returncode == 0, r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("umask=")][-1]
    return dict(kv.split("=", 1) for kv in line.split()), r.stdout


def _served(fields: dict, path: str) -> bool:
    try:
        cmd = Path(f"/proc/{fields['server']}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"serve" in cmd and path.encode() in cmd


def test_fork_server_jobs_get_the_submitters_umask_and_limits(alice, clean_sockets):
    """The server is warmed by a submit with umask 027; later submits with umask 077 and 022, and one with a
    lowered open-files limit, each get their own, through the same warm server."""
    path = server_path(alice)
    r = cli(alice, "run", "--", "/bin/true", prefix="umask 027")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: os.path.exists(path), what="alice's fork server")
    seen = []
    for prefix, want in (("umask 077", {"umask": "0077"}), ("umask 022", {"umask": "0022"}),
                         ("umask 022; ulimit -Sn 200", {"umask": "0022", "nofile": "200/"}),
                         ("umask 077; ulimit -n 300", {"umask": "0077", "nofile": "300/300"})):
        fields, out = _probe(alice, prefix)
        assert fields["umask"] == want["umask"], out
        if "nofile" in want:
            assert fields["nofile"].startswith(want["nofile"]) if want["nofile"].endswith("/") else \
                fields["nofile"] == want["nofile"], out
        assert _served(fields, path), (fields, "the job did not come through the warm fork server")
        seen.append(fields["server"])
    assert len(set(seen)) == 1  # one warm server served them all


def test_a_submitter_above_the_servers_limits_gets_them_and_the_server_steps_aside(alice, clean_sockets):
    """Warm servers started under a lower hard open-files limit (``ulimit -n 256``) cannot raise it for a later
    submitter with her usual limits (only a privileged process may): the fork server (and the command server)
    step aside, her job starts directly with exactly her limits, and a fresh server, started with them,
    serves the next job (a lower soft limit applied as before)."""
    env = env_of(alice, MESHRUN_HOME=str(alice.private / f"home-{uuid.uuid4().hex[:6]}"))
    path = server_path(alice, env=env)
    usual = as_user(alice, ["/bin/sh", "-c", "echo $(ulimit -Sn)/$(ulimit -Hn)"], env=env).stdout.strip()
    soft, hard = usual.split("/")
    assert hard == "unlimited" or int(hard) > 256, usual
    r = cli(alice, "run", "--", "/bin/true", prefix="ulimit -n 256", env=env)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: os.path.exists(path), what="alice's fork server")
    fields, out = _probe(alice, "", env=env)
    assert not _served(fields, path), fields  # started directly ...
    assert fields["nofile"] == usual and "could not set" not in out, out  # ... with her limits
    fields, out = wait_until(lambda: (lambda f: f if _served(f[0], path) else None)(_probe(alice, "ulimit -Sn 100",
                                                                                          env=env)),
                             what="a fresh fork server with her limits")
    assert fields["nofile"] == f"100/{hard}" and "could not set" not in out, out


# ---- the warm fork server imports only what its own user's jobs recorded --------------------------------


def test_a_warm_import_list_another_user_wrote_is_never_imported(alice: User, bob: User, hostile_root: Path):
    """The fork server imports the packages listed in its warm-imports file. Bob writes such a list naming a
    package that runs code when imported, where Alice's server would read it: her server must not import it.
    The same list written by Alice herself is imported (the test can see an import happen)."""
    from meshrun import _local

    base = hostile_root / f"warm-{uuid.uuid4().hex[:8]}"
    pkg = base / "lib" / "site-packages" / "mr_warm_evil"
    pkg.mkdir(parents=True)
    marks = base / "marks"
    marks.mkdir()
    os.chmod(marks, 0o1777)
    (pkg / "__init__.py").write_text(
        f"import os\nopen({str(marks)!r} + '/imported-by-%d' % os.getuid(), 'w').close()\n")
    for d in (base, base / "lib", pkg.parent, pkg):
        os.chmod(d, 0o755)
    os.chmod(pkg / "__init__.py", 0o644)
    listing = json.dumps({"modules": ["mr_warm_evil"]})
    # Bob's list: a file of his, in a folder of his, readable by everyone
    bobs = base / "bob"
    bobs.mkdir(mode=0o755)
    os.chown(bobs, bob.uid, bob.gid)
    assert bob.run(["sh", "-c", f"umask 022; printf '%s' {shlex.quote(listing)} > {bobs}/planted.warm.json"]).returncode == 0
    env = alice.env(PYTHONPATH=alice.env()["PYTHONPATH"] + os.pathsep + str(pkg.parent))
    agent = str(_local.agent_file())

    def serve(warm_file: Path) -> subprocess.CompletedProcess:
        sock = alice.private / f"w-{uuid.uuid4().hex[:6]}.sock"
        return alice.run([PY, agent, "serve", str(sock), "1"], env={**env, "MESHRUN_WARM_FILE": str(warm_file)},
                         timeout=60)

    p = serve(bobs / "planted.warm.json")
    assert p.returncode == 0, p.stderr
    assert not (marks / f"imported-by-{alice.uid}").exists(), "Alice's fork server imported Bob's list"
    # a link to it from Alice's own folder is not followed either
    link = alice.private / "linked.warm.json"
    os.symlink(bobs / "planted.warm.json", link)
    os.lchown(link, alice.uid, alice.gid)
    assert serve(link).returncode == 0
    assert not (marks / f"imported-by-{alice.uid}").exists(), "followed a link to Bob's list"
    # control: the same list, Alice's own, in her own folder, is imported
    mine = alice.private / "own.warm.json"
    assert alice.run(["sh", "-c", f"umask 077; printf '%s' {shlex.quote(listing)} > {mine}"]).returncode == 0
    assert serve(mine).returncode == 0
    assert (marks / f"imported-by-{alice.uid}").exists(), "the server did not import its own user's list"
