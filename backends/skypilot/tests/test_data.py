"""Object-store inputs and outputs (docs/data.md) through SkyPilot, onto the repo's test Slurm cluster: the
stager travels in the job's bundle and runs on the node under the host agent; the endpoint and the key pair go
from the submitter's environment to the node as SkyPilot secrets (the backend's ``data_env``), against the test
run's S3 server (conftest.py's s3_server). Two jobs: one that stages inputs and uploads outputs (launching the
cluster), one whose input is corrupted in the store (``sky exec`` on the same cluster)."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

import pytest

import meshrun
from meshrun.testing import files_holding

pytestmark = [pytest.mark.service, pytest.mark.slow, pytest.mark.timeout(1500)]
CLUSTER = f"mr-data-{uuid.uuid4().hex[:6]}"


def test_inputs_outputs_and_corruption_through_skypilot(sky, slurm_sky, s3, s3_node, meshrun_home, monkeypatch):
    user = slurm_sky["SKY_SLURM_USER"]
    # the node's Python with boto3 and its cache, files of the SkyPilot user; the key pair and the endpoint are
    # the submitter's AWS_* variables (the s3 fixture's), which reach the node as SkyPilot secrets only
    base = Path("/var/tmp") / f"meshrun-sky-s3-{uuid.uuid4().hex[:8]}"
    py = s3_node(base, user=user)["MESHRUN_DATA_PYTHON"]
    cache = base / "cache"
    cache.mkdir(mode=0o700)
    shutil.chown(cache, user, user)
    monkeypatch.setenv("MESHRUN_DATA_PYTHON", py)
    monkeypatch.setenv("MESHRUN_DATA_CACHE", str(cache))
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == s3.secret and os.environ["AWS_CONFIG_FILE"] == os.devnull
    opts = {"skypilot": {"cluster": CLUSTER}}

    s3.client.put_object(Bucket=s3.bucket, Key="in/a.txt", Body=b"alpha\n")
    s3.client.put_object(Bucket=s3.bucket, Key="in/deep/b.txt", Body=b"beta\n")
    job = meshrun.submit(meshrun.JobSpec(
        command='mkdir -p out && cat data/a.txt data/deep/b.txt > out/seen.txt && whoami >> out/seen.txt && '
                'echo "jobdir=$MESHRUN_JOB_DIR cwd=$PWD"',
        backend="skypilot", backend_options=opts,
        inputs={f"s3://{s3.bucket}/in/": "data/"}, outputs={"out/": f"s3://{s3.bucket}/res/"}))
    assert job.wait(timeout=900) is meshrun.JobState.SUCCEEDED, (job.reason, job.logs())
    assert s3.keys("res/") == ["res/seen.txt"]
    assert s3.client.get_object(Bucket=s3.bucket, Key="res/seen.txt")["Body"].read() == \
        b"alpha\nbeta\n" + user.encode() + b"\n"
    logs = job.logs()
    assert "inputs ready: 2 object(s)" in logs, logs
    where = re.search(r"jobdir=(\S+) cwd=(\S+)", logs)
    assert where, logs
    node_job_dir, node_cwd = Path(where.group(1)), Path(where.group(2))
    assert (node_job_dir / "stage.py").is_file() and (node_job_dir / ".outputs.json").is_file()
    assert (node_cwd / "data" / "deep" / "b.txt").read_bytes() == b"beta\n"

    # an object that is not what its checksums say fails the job before it starts (`sky exec`, same cluster)
    bad = meshrun.submit(meshrun.JobSpec(command="echo never", backend="skypilot", backend_options=opts,
                                         inputs={s3.put_corrupted("bad/obj"): "obj"}))
    assert bad.wait(timeout=600) is meshrun.JobState.FAILED, (bad.reason, bad.logs())
    assert "checksum mismatch" in (bad.reason or "") and "never" not in bad.logs()

    # the key pair and the endpoint are in no file meshrun wrote: the job store (spec, launch.json, logs, the
    # records), the working folder, the job folders and the cache on the node; nor in what meshrun shows
    needles = s3.needles
    assert files_holding(meshrun_home, needles) == []
    assert files_holding(Path.cwd(), needles) == []
    assert files_holding(node_job_dir.parent, needles) == []  # every rank's folder of the job
    assert files_holding(cache, needles) == []
    for j in (job, bad):
        shown = " ".join([j.reason or "", j.logs(), str(j.record.where or ""), repr(j.history)])
        assert [n for n in needles if n in shown] == []
