"""Object-store inputs and outputs (docs/data.md) on an SSH host: the stager runs there with the host's own
profile (the endpoint and key pair in files of the remote user, named by the host's env), against the test
run's S3 server (conftest.py's s3_server)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import meshrun
import pytest
from meshrun.testing import files_holding, wait_until

pytestmark = pytest.mark.service
ALICE = "mrssh-alice"
SCRATCH = os.environ.get("MRSSH_SCRATCH", "/var/tmp/meshrun-sshpool")


def test_inputs_outputs_cancel_policy_and_corruption_on_an_ssh_host(ssh_backend, s3, s3_node, pool, workdir,
                                                                    meshrun_home, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k)  # the submitter has none: the host's profile is what counts
    host = f"{pool['net']}.1" if pool.get("mode") == "netns" else "127.0.0.1"
    base = Path(SCRATCH) / f"s3-{uuid.uuid4().hex[:8]}"
    env = s3_node(base, user=ALICE, host=host)
    ssh_backend(gpus=0, hosts=["host1"], host_env={"host1": env})

    s3.client.put_object(Bucket=s3.bucket, Key="in/a.txt", Body=b"alpha\n")
    s3.client.put_object(Bucket=s3.bucket, Key="in/deep/b.txt", Body=b"beta\n")
    job = meshrun.submit(meshrun.JobSpec(
        command="mkdir -p out && cat data/a.txt data/deep/b.txt > out/seen.txt && whoami >> out/seen.txt",
        backend="ssh", inputs={f"s3://{s3.bucket}/in/": "data/"}, outputs={"out/": f"s3://{s3.bucket}/res/"}))
    assert job.wait(timeout=120) is meshrun.JobState.SUCCEEDED, (job.reason, job.logs())
    assert s3.client.get_object(Bucket=s3.bucket, Key="res/seen.txt")["Body"].read() == \
        b"alpha\nbeta\n" + ALICE.encode() + b"\n"
    assert "inputs ready: 2 object(s)" in job.logs()

    # cancelled: the checkpoint folder goes up (its policy names cancel), the final one (success only) does not
    job2 = meshrun.submit(meshrun.JobSpec(
        command="mkdir -p ck fin && echo c > ck/c && echo f > fin/f && echo ready && sleep 600", backend="ssh",
        outputs={"ck/": {"destination": f"s3://{s3.bucket}/ck/", "on": ["cancel"]},
                 "fin/": f"s3://{s3.bucket}/fin/"}))
    wait_until(lambda: "ready" in job2.logs(), 60, what="the job to start")
    job2.cancel()
    assert job2.wait(timeout=120) is meshrun.JobState.CANCELLED
    assert s3.keys("ck/") == ["ck/c"] and s3.keys("fin/") == []

    # an object that is not what its ETag says fails the job before it starts
    job3 = meshrun.submit(meshrun.JobSpec(command="echo never", backend="ssh",
                                          inputs={s3.put_corrupted("bad/obj"): "obj"}))
    assert job3.wait(timeout=120) is meshrun.JobState.FAILED
    assert "checksum mismatch" in (job3.reason or "") and "never" not in job3.logs()

    # the key pair and the endpoint are in no file meshrun wrote, here or on the host
    needles = s3.needles
    remote_home = Path(pool["users"][ALICE]["home"])
    assert files_holding(meshrun_home, needles) == []
    assert files_holding(remote_home / ".meshrun", needles) == []
    assert files_holding(remote_home / ".cache" / "meshrun" / "data", needles) == []  # the host's default cache
