"""Failover against real services: a job pending past max_pending on Slurm moves to the SSH pool.

Needs root, the slurm and ssh backends installed, the test Slurm cluster (backends/slurm/scripts/
slurm-cluster.sh) and the sshd pool (backends/ssh/scripts/sshd-pool.sh); both scripts are only run, never
changed. The Slurm job is kept pending by its own ``--begin`` time two hours ahead (so other suites sharing
the cluster are not disturbed); the failover itself happens in a separate ``meshrun wait`` process that only
has the job id, as after a re-attach.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import meshrun
from meshrun import JobState

REPO = Path(__file__).resolve().parents[1]
SLURM_SCRIPT = REPO / "backends" / "slurm" / "scripts" / "slurm-cluster.sh"
POOL_SCRIPT = REPO / "backends" / "ssh" / "scripts" / "sshd-pool.sh"
POOL_DIR = os.environ.get("MRSSH_POOL_DIR", "/var/lib/meshrun-sshpool")
SCRATCH = os.environ.get("MRSSH_SCRATCH", "/var/tmp/meshrun-sshpool")
USER = "mrssh-alice"

# starting the cluster and the pool may take minutes on a fresh machine
pytestmark = [pytest.mark.service, pytest.mark.slow, pytest.mark.slurm_cluster, pytest.mark.timeout(900)]


def _missing() -> str | None:
    for mod, what in (("meshrun_slurm", "the slurm backend"), ("meshrun_ssh", "the ssh backend")):
        if importlib.util.find_spec(mod) is None:
            return f"{what} is not installed (pip install -e backends/{mod.split('_')[1]})"
    for script in (SLURM_SCRIPT, POOL_SCRIPT):
        if not script.exists():
            return f"{script.relative_to(REPO)} is missing"
    if os.geteuid() != 0:
        return "the Slurm cluster and the sshd pool need root to start"
    return None


@pytest.fixture(scope="module")
def services(session_services):
    """The Slurm cluster and the sshd pool, started by their own scripts (left as found afterwards: the pool at
    the end of this module, the cluster at the end of the test run)."""
    why = _missing()
    if why:
        pytest.skip(why)
    p = session_services.up("slurm-cluster", SLURM_SCRIPT, users=("slurmrest",), timeout=600)
    if p.returncode != 0:
        pytest.fail(f"slurm-cluster.sh up failed:\n{p.stdout}\n{p.stderr}")
    env = dict(os.environ, MRSSH_POOL_DIR=POOL_DIR, MRSSH_SCRATCH=SCRATCH)
    was_up = subprocess.run(["bash", str(POOL_SCRIPT), "status"], env=env, capture_output=True).returncode == 0
    with session_services.creating_users("sshd-pool-users", ("mrssh-alice", "mrssh-bob")):
        p = subprocess.run(["bash", str(POOL_SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        pytest.fail(f"sshd-pool.sh up failed:\n{p.stdout}\n{p.stderr}")
    pool = json.loads(Path(POOL_DIR, "pool.json").read_text())
    yield pool
    try:
        from meshrun_ssh import close_all

        close_all()
    except Exception:
        pass
    if not was_up and not os.environ.get("MRSSH_KEEP_POOL"):
        subprocess.run(["bash", str(POOL_SCRIPT), "down"], env=env, capture_output=True, timeout=300)


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def test_pending_past_max_pending_on_slurm_moves_to_the_ssh_pool(services, tmp_path, monkeypatch):
    pool = services
    leases = Path(SCRATCH) / "leases" / f"placement-{uuid.uuid4().hex[:10]}"
    leases.mkdir(parents=True)
    os.chmod(leases, 0o755)
    hosts = []
    for h in pool["hosts"]:
        d = leases / h["name"]
        d.mkdir()
        os.chmod(d, 0o1777)
        hosts.append({"name": h["name"], "host": h["address"], "port": h["port"], "user": USER,
                      "key": pool["users"][USER]["key"], "lease_dir": str(d), "env": {"MESHRUN_GPUS": "0-1"}})
    # a config file, so that the separate `meshrun wait` process sees the same backends and prices
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        "[backends.slurm]\nquery_interval = 0.3\n"
        "[backends.ssh]\n"
        f"hosts = {_toml(hosts)}\nknown_hosts = {_toml(pool['known_hosts'])}\nssh_config = \"/dev/null\"\n"
        "retries = 12\nretry_max_wait = 2.0\n"
        # Slurm is free and the pool costs $1 per GPU-hour: the plan puts Slurm first, the pool next
        "[prices.ssh]\ndefault = 1.0\n"
        # a loaded machine can take more than the default second to reach the pool over SSH: what is tested here
        # is the failover, not how fast a backend must answer
        "[placement]\nrespond_within = 30\n"
    )
    monkeypatch.setenv("MESHRUN_CONFIG", str(cfg))
    meshrun.configure()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    try:
        p = meshrun.plan(meshrun.JobSpec(command=["true"], gpus=1), backends=["slurm", "ssh"])
        assert [r.offer.backend for r in p.ranked][:1] == ["slurm"], p.explain_choice()
        assert "ssh" in {r.offer.backend for r in p.ranked}, p.to_dict()["rejected"]

        job = meshrun.run(
            ["bash", "-c", "echo moved to $(hostname)"], name="slurm-then-ssh", gpus=1, max_pending=5,
            backends=["slurm", "ssh"], time_limit="10m",
            # Slurm keeps it pending (BeginTime) for two hours: only this job waits, nothing else is blocked
            backend_options={"slurm": {"sbatch": ["--begin=now+2hours"]}},
        )
        assert job.backend == "slurm"
        slurm_id = job.backend_id
        assert job.status() is JobState.PENDING

        # another process, knowing only the job id, notices the wait, cancels it on Slurm and moves it
        out = subprocess.run([sys.executable, "-m", "meshrun", "wait", "--timeout", "240", job.id],
                             capture_output=True, text=True, timeout=300, env=dict(os.environ))
        assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"

        job = meshrun.Job.attach(job.id)
        assert job.status() is JobState.SUCCEEDED
        assert job.backend == "ssh" and job.record.attempt == 2
        assert "moved to" in job.logs()
        events = [h["event"] for h in job.history]
        assert events[:4] == ["placed", "submitted", "moved", "submitted"], events
        moved = next(h for h in job.history if h["event"] == "moved")
        assert moved["backend"] == "slurm" and moved["backend_id"] == slurm_id
        assert "longer than max_pending 5.0s" in moved["reason"] and moved["next"].startswith("ssh/")
        # the Slurm job is gone from the queue (cancelled there)
        q = subprocess.run(["squeue", "--noheader", "--jobs", str(slurm_id).split(".")[0], "--format=%T"],
                           capture_output=True, text=True)
        assert q.stdout.strip() in ("", "CANCELLED"), q.stdout
        # `meshrun status` shows both attempts
        st = subprocess.run([sys.executable, "-m", "meshrun", "status", job.id], capture_output=True, text=True,
                            timeout=60)
        assert "moved" in st.stdout and "slurm" in st.stdout and "ssh" in st.stdout and "attempt" in st.stdout
    finally:
        shutil.rmtree(leases, ignore_errors=True)
        meshrun.configure()
