"""The enforced lease mode: a root lease service every user's agent leases GPUs through. Played with two
real OS users: Bob cannot read or change the lease table, cannot end or forge Alice's lease, cannot pass
off a socket of his own as the service, and cannot change a hold the service gave him; a restart of the
service loses no lease; two users racing for the GPUs never share one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshrun import _agent

from meshrun.testing import assert_no_gpu_overlap as assert_no_overlap

from .conftest import JOB, PY, REPO, User, race, wait_for as _wait_for

pytestmark = pytest.mark.slow

AGENT = REPO / "meshrun" / "_agent.py"



class Service:
    def __init__(self, root: Path, gpus: str = "0-1"):
        self.dir = root / "run"
        self.dir.mkdir(mode=0o755, exist_ok=True)
        os.chmod(self.dir, 0o755)
        self.sock = self.dir / "lease.sock"
        self.state = root / "state"
        self.gpus = gpus
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the service and return once it listens: its own socket is in place (after a restart the
        killed service's socket is still there, refusing connections, until the new one replaces it)."""
        old = self._sock_inode()
        env = {"PATH": "/usr/bin:/bin", "MESHRUN_GPUS": self.gpus}
        self.proc = subprocess.Popen([PY, str(AGENT), "lease-service", str(self.sock), str(self.state)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + 60
        while self._sock_inode() in (None, old):
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < end, "the lease service did not start"
            time.sleep(0.05)

    def _sock_inode(self) -> int | None:
        try:
            return self.sock.stat().st_ino
        except FileNotFoundError:
            return None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def service(shared_dir):
    svc = Service(shared_dir)
    svc.start()
    yield svc
    svc.stop()


def _env(user: User, svc: Service, **extra: str) -> dict[str, str]:
    # the users' own view of the GPUs does not matter in the enforced mode: the service's does
    return user.env(MESHRUN_LEASE_SERVICE=str(svc.sock), MESHRUN_GPUS="0-1", MESHRUN_BACKEND="local", **extra)


def _job(user: User, svc: Service, argv, gpus=1, name="job", wait=60.0) -> dict:
    p = user.run([PY, "-c", JOB, json.dumps(argv), str(gpus), name, str(wait)], env=_env(user, svc), timeout=wait + 60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def _status(user: User, svc: Service, job_id: str) -> dict:
    code = ("import json, sys, meshrun; j = meshrun.Job(sys.argv[1]); j.refresh(); "
            "print(json.dumps({'state': j.record.state.value, 'reason': j.record.reason}))")
    p = user.run([PY, "-c", code, job_id], env=_env(user, svc))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def _snapshot(user: User, svc: Service) -> dict:
    p = user.run([PY, "-m", "meshrun", "gpus", "--json"], env=_env(user, svc))
    return next(iter(json.loads(p.stdout).values()))


def _held_by(user: User, svc: Service) -> list[str]:
    return sorted(k for k, r in _snapshot(user, svc)["leases"].items() if r.get("user") == user.name)


def test_users_cannot_touch_the_table_or_each_others_leases(alice, bob, service):
    bobs = _job(bob, service, ["sleep", "120"], gpus=1, name="bobs", wait=0)
    _wait_for(lambda: _held_by(bob, service) != [])
    snap = _snapshot(alice, service)
    assert snap["mode"] == "enforced" and [r["user"] for r in snap["leases"].values()] == [bob.name]
    # the table and the holds are root's alone
    p = bob.run(["ls", str(service.state)])
    assert p.returncode != 0 and "Permission denied" in p.stderr
    # the service knows who asks from the kernel: Bob's requests for Alice's holds are refused
    alices = _job(alice, service, ["sleep", "120"], gpus=1, name="alices", wait=0)
    _wait_for(lambda: _held_by(alice, service) != [])
    hold = next(r for r in _agent_leases(service).values() if r.get("uid") == alice.uid)["hold"]
    code = ("import json, sys; sys.path.insert(0, sys.argv[3]); import _agent\n"
            "for op in ('release', 'poll'):\n"
            "    try:\n"
            "        print(_agent.service_call(sys.argv[1], {'op': op, 'hold': sys.argv[2]}))\n"
            "    except _agent.LeaseError as e:\n"
            "        print('refused:', e)\n")
    p = bob.run([PY, "-c", code, str(service.sock), hold, str(AGENT.parent)])
    assert p.stdout.count("refused:") == 2 and f"not a hold of {bob.name}'s" in p.stdout, p.stdout + p.stderr
    assert _held_by(alice, service) != []
    # the hold Bob's own job got is read-only: he cannot rewrite it to claim more
    code = ("import os, sys; sys.path.insert(0, sys.argv[2]); import _agent\n"
            "rep, fd = _agent.service_call(sys.argv[1], {'op': 'ticket', 'n': 1})\n"
            "try:\n"
            "    os.write(fd, b'{\"state\": \"leased\", \"gpus\": [0, 1]}')\n"
            "    print('wrote')\n"
            "except OSError as e:\n"
            "    print('refused:', e.strerror)\n")
    p = bob.run([PY, "-c", code, str(service.sock), str(AGENT.parent)])
    assert "refused: Bad file descriptor" in p.stdout, p.stdout + p.stderr
    for who, job in ((alice, alices), (bob, bobs)):
        who.run([PY, "-m", "meshrun", "cancel", job["id"]], env=_env(who, service))
    _wait_for(lambda: _snapshot(alice, service)["leases"] == {})


def _agent_leases(svc: Service) -> dict:
    """The service's table as root reads it (the test is root): leases with their hold names."""
    leases = _agent.Leases(str(svc.state), {"MESHRUN_GPUS": svc.gpus}, shared=False)
    with leases:
        state = leases.load()
    return state["gpus"]


def test_a_socket_that_is_not_roots_is_not_trusted(alice, bob, shared_dir):
    """Bob points Alice at a socket of his (or squats the path): her agent refuses it, sends nothing."""
    d = shared_dir / "bobs"
    d.mkdir()
    os.chown(d, bob.uid, bob.gid)
    sock = d / "lease.sock"
    listener = bob.popen([PY, "-c",
                          "import socket, sys\n"
                          "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(5)\n"
                          "import os; os.chmod(sys.argv[1], 0o666); print('up', flush=True)\n"
                          "c, _ = s.accept(); c.settimeout(5)\n"
                          "try:\n"
                          "    print('got', len(c.recv(65536)), flush=True)\n"
                          "except OSError:\n"
                          "    print('got', 0, flush=True)\n", str(sock)], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "up"
        env = alice.env(MESHRUN_LEASE_SERVICE=str(sock), MESHRUN_GPUS="0-1", MESHRUN_BACKEND="local")
        p = alice.run([PY, "-m", "meshrun", "gpus"], env=env)
        assert p.returncode != 0 and "not root" in p.stderr and bob.name in p.stderr, p.stderr
        assert listener.stdout.readline().strip() == "got 0"  # connected, checked, hung up: not a byte sent
    finally:
        listener.kill()


def test_a_service_restart_loses_no_lease(alice, bob, service):
    """The holds live in the users' descriptors, not in the service: killing and restarting it keeps Bob's
    lease, and Alice's job still waits for it. A job whose supervisor is killed keeps its GPU while its
    processes live (they inherit the hold), and frees it once they are gone."""
    pidfile = bob.private / "svc-grandchild.pid"
    bobs = _job(bob, service, ["bash", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], gpus=2, name="bobs", wait=0)
    _wait_for(lambda: len(_held_by(bob, service)) == 2 and pidfile.exists() and pidfile.read_text().strip())
    service.stop()
    service.start()
    assert len(_held_by(bob, service)) == 2
    state = json.loads((bob.private / "meshrun-home" / "jobs" / bobs["id"] / "state.json").read_text())
    os.kill(state["pid"], signal.SIGKILL)
    waiting = _job(alice, service, ["true"], gpus=1, name="alices", wait=0)
    # Alice's job waits for Bob's GPUs, held by his job's orphaned process after the restart
    _wait_for(lambda: "waiting for 1 GPU" in (_status(alice, service, waiting["id"])["reason"] or ""))
    assert _status(alice, service, waiting["id"])["state"] == "pending"
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    p = alice.run([PY, "-m", "meshrun", "wait", waiting["id"]], env=_env(alice, service), timeout=90)
    assert p.returncode == 0, p.stdout + p.stderr


def test_two_users_racing_through_the_service_never_share_a_gpu(alice, bob, service, shared_dir):
    recs = race([alice, bob, alice, bob], lambda u: _env(u, service), shared_dir / "records", 4)
    assert len(recs) == 16 and {r["user"] for r in recs} == {alice.uid, bob.uid}
    assert_no_overlap(recs)
    _wait_for(lambda: _snapshot(alice, service)["leases"] == {} and _snapshot(alice, service)["queue"] == [])


def test_install_writes_the_agent_the_conf_and_a_unit(tmp_path):
    """`meshrun lease-service install` (here under a scratch root, without starting anything)."""
    p = subprocess.run([sys.executable, "-m", "meshrun", "lease-service", "install", "--root", str(tmp_path),
                        "--no-start"], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr
    agent = tmp_path / "usr/local/lib/meshrun/agent.py"
    conf = tmp_path / "etc/meshrun/lease-service.json"
    unit = tmp_path / "etc/systemd/system/meshrun-lease.service"
    assert agent.read_bytes() == AGENT.read_bytes() and oct(agent.stat().st_mode & 0o777) == "0o644"
    assert json.loads(conf.read_text()) == {"socket": "/run/meshrun/lease.sock"}
    text = unit.read_text()
    assert "ExecStart=/usr/bin/python3 /usr/local/lib/meshrun/agent.py lease-service /run/meshrun/lease.sock " \
           "/var/lib/meshrun/leases" in text and "RuntimeDirectoryPreserve=yes" in text
    if shutil.which("systemd-analyze"):
        # the unit's syntax, as systemd reads it (missing paths of the scratch root aside)
        v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert "Unknown" not in v.stderr and "Invalid" not in v.stderr, v.stderr
    assert "systemd is not running here" in p.stdout or "is running" in p.stdout
