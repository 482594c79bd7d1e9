"""Containment as an ordinary user: without a cgroup of their own the agent must notice and fall back to
tracking the job's processes itself; inside a cgroup delegated to them (as ``systemd-run --user --scope -p
Delegate=yes`` or an admin gives) it must use it. Either way cancel ends a job's escaped processes."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest

from meshrun import _agent

# run as the test user with the system's python3: the host agent alone (stdlib only), as the SSH backend runs it
PY = shutil.which("python3", path="/usr/bin:/usr/local/bin") or "/usr/bin/python3"
AGENT_DIR = str(Path(_agent.__file__).resolve().parent)

JOB = """
import json, os, sys, time
sys.path.insert(0, %r)
import _agent

job_dir, pidfile = sys.argv[1], sys.argv[2]
print(json.dumps(list(_agent.containment_available())), flush=True)
os.makedirs(job_dir)
_agent.write_json(os.path.join(job_dir, "launch.json"), {
    "job_id": os.path.basename(job_dir), "kind": "command", "gpus": 1, "grace_period": 1, "cwd": job_dir,
    "argv": ["bash", "-c", "setsid sleep 1000 & echo $! > %%s; sleep 1000" %% pidfile]})
_agent.spawn(job_dir)
end = time.time() + 60
while not (os.path.exists(pidfile) and open(pidfile).read().strip()):
    assert time.time() < end, "the job did not start"
    time.sleep(0.02)
escapee = int(open(pidfile).read())
st = _agent.read_json(os.path.join(job_dir, "state.json"))
# bash writes $! right after its fork, maybe before the child has called setsid(): wait for it
while _agent.proc_session(escapee) == st["sid"]:
    assert time.time() < end, "the escapee never left the job's session"
    time.sleep(0.02)
ex = _agent.cancel(job_dir)
print(json.dumps({"state": ex["state"], "containment": st["containment"], "cgroup": st.get("cgroup"),
                  "escapee": escapee, "escapee_alive": _agent.pid_alive(escapee)}), flush=True)
""" % AGENT_DIR


def _env(user, shared_dir: Path) -> dict[str, str]:
    leases = shared_dir / "leases"
    leases.mkdir(exist_ok=True)
    os.chmod(leases, 0o777)
    return user.env(MESHRUN_GPUS="0", MESHRUN_LEASE_DIR=str(leases))


def _run(user, shared_dir, **kw):
    tag = uuid.uuid4().hex[:6]
    job_dir, pidfile = user.private / f"job-{tag}", user.private / f"escapee-{tag}"
    p = user.run([PY, "-c", JOB, str(job_dir), str(pidfile)], env=_env(user, shared_dir), timeout=180, **kw)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.strip().splitlines()
    return json.loads(lines[0]), json.loads(lines[-1])


def test_an_ordinary_user_without_a_delegated_cgroup_gets_the_subreaper(alice, shared_dir):
    own = _agent.proc_cgroup()
    d = _agent.cgroup_dir(own)
    if d is not None and os.stat(d).st_uid == alice.uid:  # pragma: no cover - not on this machine
        pytest.skip("this cgroup belongs to the test user")
    available, result = _run(alice, shared_dir)
    assert available[0] == "subreaper"
    assert "not delegated" in available[1] or "no cgroup" in available[1] or "not visible" in available[1]
    assert result["containment"] == "subreaper"
    assert result["state"] == "cancelled"
    assert not result["escapee_alive"] and not _agent.pid_alive(result["escapee"])


@pytest.fixture
def delegated(alice):
    """A cgroup v2 delegated to alice the way systemd delegates one: the directory, cgroup.procs,
    cgroup.threads and cgroup.subtree_control are hers."""
    base, why = _agent.delegated_cgroup()
    if base is None:
        pytest.skip(f"no cgroup v2 to delegate here: {why}")
    d = Path(base) / f"meshrun-test-delegated-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    for name in ("", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control"):
        os.chown(d / name, alice.uid, alice.gid)
    yield d
    _agent.cgroup_kill(str(d))  # the test user's fork server lives in there too
    end = time.monotonic() + 20
    while _agent.cgroup_populated(str(d)) and time.monotonic() < end:
        time.sleep(0.05)
    _agent.cgroup_remove(str(d))


def test_a_delegated_cgroup_is_used(alice, shared_dir, delegated):
    def enter():  # runs in the child before runuser: alice's processes start inside her cgroup
        fd = os.open(str(delegated / "cgroup.procs"), os.O_WRONLY)
        os.write(fd, b"0")
        os.close(fd)

    available, result = _run(alice, shared_dir, preexec_fn=enter)
    assert available == ["cgroup", str(delegated)]
    assert result["containment"] == "cgroup"
    assert result["cgroup"].startswith(str(delegated) + "/meshrun-")
    assert result["state"] == "cancelled"
    assert not result["escapee_alive"] and not _agent.pid_alive(result["escapee"])
    assert not os.path.exists(result["cgroup"]), "the job's cgroup was not removed"
