"""Login-node mode: Slurm's tools reached over SSH (the SSH backend's connection code), job folders staged to
the cluster and results fetched back. The "login node" is an sshd on 127.0.0.1 (scripts/login-sshd.sh)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import meshrun

from .conftest import SCRIPTS

pytestmark = pytest.mark.service
JS = meshrun.JobState

pytest.importorskip("meshrun_ssh")


@pytest.fixture(scope="module")
def login_node(slurm_cluster):
    if shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists():
        pytest.skip("sshd is not installed")
    p = subprocess.run(["bash", str(SCRIPTS / "login-sshd.sh"), "up"], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        pytest.fail(f"login-sshd.sh up failed: {p.stderr}")
    facts = dict(line.split("=", 1) for line in p.stdout.split() if "=" in line)
    remote = Path("/var/tmp") / f"meshrun-slurm-login-{uuid.uuid4().hex[:8]}"
    yield facts, remote
    shutil.rmtree(remote, ignore_errors=True)
    import meshrun_ssh

    meshrun_ssh.close_all()
    subprocess.run(["bash", str(SCRIPTS / "login-sshd.sh"), "down"], capture_output=True, timeout=60)


@pytest.fixture
def via_login(slurm, login_node):
    facts, remote = login_node
    meshrun.configure({"backends": {"slurm": {
        "login_host": {"host": facts["LOGIN_HOST"], "port": int(facts["LOGIN_PORT"]), "user": facts["LOGIN_USER"],
                       "key": facts["LOGIN_KEY"]},
        "ssh": {"known_hosts": facts["LOGIN_KNOWN_HOSTS"]},
        "remote_dir": str(remote), "python": sys.executable, "query_interval": 0.3}}})
    b = meshrun.get_backend("slurm")
    assert not b.shared_filesystem
    return b, remote


def where_am_i(x):
    import os

    return x, os.getcwd(), os.environ.get("CUDA_VISIBLE_DEVICES"), open("data.txt").read()


def test_function_job_through_a_login_node(via_login, tmp_path):
    b, remote = via_login
    (Path.cwd() / "data.txt").write_text("staged\n")
    job = meshrun.submit(meshrun.JobSpec(function=where_am_i, args=(7,), gpus=1, files={"data.txt": "data.txt"},
                                         backend="slurm"))
    x, cwd, cuda, data = job.result(timeout=120)
    assert x == 7 and data == "staged\n" and cuda is not None and len(cuda.split(",")) == 1
    assert cwd == f"{remote}/jobs/{job.id}" and cwd != str(job.job_dir)
    assert (job.job_dir / "exit.json").exists() and (job.job_dir / "result.pkl").exists()  # fetched back
    assert b.calls["sbatch"] == 1 and b.calls["squeue"] >= 0


def padded():
    return ["padding " * 200, 42]


def test_a_result_cut_on_the_cluster_is_joblost_and_never_unpickled(via_login):
    """The job's status comes from the agent's exit records (``_agent.py records`` on the login node); the
    result fetched back is checked against the size and checksum in its exit record before unpickling."""
    from meshrun.testing import wait_until

    b, remote = via_login
    job = meshrun.submit(meshrun.JobSpec(function=padded, backend="slurm"))
    d = f"{remote}/jobs/{job.id}"
    wait_until(lambda: b._read(f"{d}/exit.json") is not None, 120, what="the exit record on the cluster")
    data = b._read(f"{d}/result.pkl")
    assert data and json.loads(b._read(f"{d}/exit.json"))["result_bytes"] == len(data)
    b.runner.put_bytes(data[: len(data) // 2], f"{d}/result.pkl")
    with pytest.raises(meshrun.JobLost, match="truncated") as e:
        job.result(timeout=120)
    assert "not unpickled" in str(e.value)
    records = b._exit_records([b._target(job.record.backend_id)])
    assert records[job.id][0]["state"] == "succeeded"


def test_command_job_logs_cancel_and_array_through_a_login_node(via_login):
    b, remote = via_login
    job = meshrun.run(["bash", "-c", "echo one; sleep 0.5; echo two; exit 4"], backend="slurm")
    assert job.wait(timeout=90) is JS.FAILED and job.record.exit_code == 4
    assert job.logs() .startswith("one\ntwo\n")
    long = meshrun.run(["sleep", "300"], backend="slurm")
    long.cancel()
    assert long.record.state is JS.CANCELLED
    jobs = meshrun.job(backend="slurm")(pow).map([2, 3, 4], [2, 2, 2])
    assert meshrun.gather(jobs, timeout=120) == [4, 9, 16]
    assert len({j.backend_id.split("_")[0] for j in jobs}) == 1
    (o,) = b.offers(meshrun.JobSpec(command=["true"], gpus=2))
    assert o.fits and o.expected_start is not None
