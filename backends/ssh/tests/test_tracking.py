"""Experiment tracking over SSH (docs/tracking.md): the run identity reaches a job on a pool host through the
env contract alone, and meshrun closes the MLflow runs of a sweep from the submitting side (the hosts never
reach the tracking server here)."""

from __future__ import annotations

import json

import pytest

import meshrun

pytestmark = pytest.mark.service

VARS = ("WANDB_RUN_ID", "WANDB_RUN_GROUP", "WANDB_NAME", "MLFLOW_RUN_ID", "TENSORBOARD_LOGDIR")
SHOW = "import json, os, sys; print(json.dumps({k: os.environ.get(k) for k in %r})); sys.exit(int(sys.argv[1]))" % (
    VARS,)

NAME = "it's \"a\" $(touch /tmp/pwned) `id`; ünï\nsweep"  # reaches the job unchanged, never through a shell


def test_a_tracked_sweep_over_ssh(ssh_backend, workdir, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    ssh_backend(gpus=1)
    track = {"wandb": {"mode": "offline"}, "mlflow": {"tracking_uri": mlflow_server, "experiment": "ssh"},
             "tensorboard": {"root": str(tmp_path / "tb")}}
    specs = [meshrun.JobSpec(command=["python3", "-c", SHOW, str(code)], name=NAME, backend="ssh", track=track)
             for code in (0, 4)]
    jobs = meshrun.submit_many(specs)
    meshrun.wait(jobs, timeout=120)
    assert [j.record.state for j in jobs] == [meshrun.JobState.SUCCEEDED, meshrun.JobState.FAILED]
    sweep = jobs[0].record.array_id
    for i, j in enumerate(jobs):
        seen = json.loads(j.logs().strip().splitlines()[-1])
        t = j.tracking
        assert seen == {"WANDB_RUN_ID": j.id, "WANDB_RUN_GROUP": sweep, "WANDB_NAME": f"{NAME}[{i}]",
                        "MLFLOW_RUN_ID": t["mlflow"]["run_id"], "TENSORBOARD_LOGDIR": t["tensorboard"]["logdir"]}
    client = MlflowClient(mlflow_server)
    runs = [client.get_run(j.tracking["mlflow"]["run_id"]) for j in jobs]
    assert [r.info.status for r in runs] == ["FINISHED", "FAILED"]
    assert runs[1].data.tags["meshrun.where"] == jobs[1].record.where
    assert client.get_run(jobs[0].tracking["mlflow"]["parent_run_id"]).info.status == "FAILED"
