"""Experiment tracking on Slurm (docs/tracking.md): a `.map` that is one Slurm job array gets its W&B group,
MLflow parent and child runs and TensorBoard folders through the env contract, with no Slurm-specific code;
meshrun closes the MLflow runs when squeue/sacct report the ends."""

from __future__ import annotations

import pytest

import meshrun

pytestmark = pytest.mark.service


def _functions():
    # defined in here so they travel by value (the job's Python need not import this test module)
    def tracked(x: int) -> dict:
        import os

        import wandb
        from tensorboard.summary import Writer

        w = Writer(os.environ["TENSORBOARD_LOGDIR"])
        w.add_scalar("x", float(x), step=0)
        w.close()
        wandb.init().finish()
        if x == 1:
            raise SystemExit(3)
        return {k: os.environ.get(k) for k in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "WANDB_RUN_GROUP")}

    return tracked


tracked = _functions()


def test_a_tracked_map_on_slurm(slurm, mlflow_server, wandb_runs, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_SILENT", "true")
    track = {"wandb": {"mode": "offline", "dir": str(tmp_path)}, "tensorboard": {"root": str(tmp_path / "tb")},
             "mlflow": {"tracking_uri": mlflow_server, "experiment": "slurm"}}
    jobs = meshrun.job(tracked, name="tracked", backend="slurm", cpus=1, track=track).map([0, 1])
    meshrun.wait(jobs, timeout=240)
    assert [j.record.state for j in jobs] == [meshrun.JobState.SUCCEEDED, meshrun.JobState.FAILED]
    assert len({j.backend_id.split("_")[0] for j in jobs}) == 1  # one array
    sweep = jobs[0].record.array_id
    t = [j.tracking for j in jobs]
    assert jobs[0].result() == {"MLFLOW_RUN_ID": t[0]["mlflow"]["run_id"], "MLFLOW_TRACKING_URI": mlflow_server,
                                "WANDB_RUN_GROUP": sweep}

    client = MlflowClient(mlflow_server)
    assert [client.get_run(x["mlflow"]["run_id"]).info.status for x in t] == ["FINISHED", "FAILED"]
    assert client.get_run(t[0]["mlflow"]["parent_run_id"]).info.status == "FAILED"
    assert client.get_run(t[1]["mlflow"]["run_id"]).data.tags["meshrun.where"] == jobs[1].record.where

    groups = {r["id"]: (r["group"], r["name"]) for r in wandb_runs(tmp_path)}
    assert groups == {j.id: (sweep, f"tracked[{i}]") for i, j in enumerate(jobs)}

    for i, x in enumerate(t):
        assert x["tensorboard"]["logdir"] == str(tmp_path / "tb" / sweep / f"{i:03d}-{jobs[i].id}")
        ea = EventAccumulator(x["tensorboard"]["logdir"])
        ea.Reload()
        assert [e.step for e in ea.Tensors("x")] == [0]
