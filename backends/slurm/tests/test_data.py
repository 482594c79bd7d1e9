"""Object-store inputs and outputs (docs/data.md) on the Slurm test cluster: every node of a job stages its
inputs (one download per host's cache), node 0 uploads the outputs, with the nodes' profile (files named by
the environment), against the test run's S3 server (conftest.py's s3_server)."""

from __future__ import annotations

from pathlib import Path

import pytest

import meshrun
from meshrun.testing import files_holding, wait_until

pytestmark = pytest.mark.service


def test_inputs_outputs_cancel_policy_and_corruption_on_slurm(slurm, s3, s3_node, tmp_path, meshrun_home,
                                                              monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k)  # nothing secret in the environment sbatch passes on: the nodes' profile counts
    for k, v in s3_node(tmp_path / "node-profile").items():
        monkeypatch.setenv(k, v)
    s3.client.put_object(Bucket=s3.bucket, Key="in/a.txt", Body=b"alpha\n")
    s3.client.put_object(Bucket=s3.bucket, Key="in/deep/b.txt", Body=b"beta\n")
    job = meshrun.submit(meshrun.JobSpec(
        command='mkdir -p out && cat data/a.txt data/deep/b.txt > "out/node$NODE_RANK.txt"', backend="slurm",
        nodes=2, inputs={f"s3://{s3.bucket}/in/": "data/"}, outputs={"out/": f"s3://{s3.bucket}/res/"}))
    assert job.wait(timeout=180) is meshrun.JobState.SUCCEEDED, (job.reason, job.logs())
    assert s3.keys("res/") == ["res/node0.txt", "res/node1.txt"]
    assert s3.client.get_object(Bucket=s3.bucket, Key="res/node1.txt")["Body"].read() == b"alpha\nbeta\n"

    # cancelled: the checkpoint folder goes up (its policy names cancel), the final one (success only) does not
    job2 = meshrun.submit(meshrun.JobSpec(
        command="mkdir -p ck fin && echo c > ck/c && echo f > fin/f && echo ready && sleep 600", backend="slurm",
        outputs={"ck/": {"destination": f"s3://{s3.bucket}/ck/", "on": ["cancel"]},
                 "fin/": f"s3://{s3.bucket}/fin/"}))
    wait_until(lambda: "ready" in job2.logs(), 90, interval=0.2, what="the job to start")
    job2.cancel()
    assert job2.wait(timeout=120) is meshrun.JobState.CANCELLED
    wait_until(lambda: s3.keys("ck/") == ["ck/c"], 30, interval=0.2, what="the cancelled job's checkpoint")
    assert s3.keys("fin/") == []

    # an object that is not what its ETag says fails the job before it starts
    job3 = meshrun.submit(meshrun.JobSpec(command="echo never", backend="slurm",
                                          inputs={s3.put_corrupted("bad/obj"): "obj"}))
    assert job3.wait(timeout=120) is meshrun.JobState.FAILED
    assert "checksum mismatch" in (job3.reason or "") and "never" not in job3.logs()

    # the key pair and the endpoint are in no file meshrun wrote (job store, job folders, the working folder)
    needles = s3.needles
    assert files_holding(meshrun_home, needles) == []
    assert files_holding(Path.cwd(), needles) == []
