"""Experiment tracking follows the job: real W&B (offline), a real ``mlflow server`` (SQLite store) and real
TensorBoard event files, each read back with the tool's own reader. Jobs run on the local backend."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import meshrun
from meshrun import ConfigError, JobSpec, SpecError
from meshrun.testing import run_cli, wait_until

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return bytes(r.read())


def _job_functions():
    # defined in here, not at module level, so they travel by value (this test module is not importable by
    # name in the job's process)
    def _wandb_train(x: int) -> str:
        import os

        import wandb

        run = wandb.init()
        run.log({"x": x})
        run.finish()
        return os.environ["WANDB_RUN_ID"]

    def _wandb_fails_once(marker: str) -> str:
        import os

        import wandb

        run = wandb.init()
        run.log({"attempt": 2 if os.path.exists(marker) else 1})
        run.finish()
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("first attempt fails")
        return run.id

    def _mlflow_step(x: int, lr: float = 0.1) -> int:
        import time

        import mlflow

        mlflow.start_run()  # no arguments: MLFLOW_RUN_ID from meshrun
        mlflow.log_metric("x", x)
        if x == 1:
            raise ValueError("x=1 is bad")
        if x == 2:
            time.sleep(600)  # cancelled by the test
        mlflow.end_run()
        return x

    def _has_key(digest: str) -> bool:
        import hashlib
        import os

        # the keys themselves must not travel in the payload: the job compares a digest
        seen = os.environ.get("WANDB_API_KEY", "") + "|" + os.environ.get("MLFLOW_TRACKING_TOKEN", "")
        return hashlib.sha256(seen.encode()).hexdigest() == digest

    def _tb_step(x: int) -> None:
        import os

        from tensorboard.summary import Writer

        w = Writer(os.environ["TENSORBOARD_LOGDIR"])
        w.add_scalar("loss", float(x), step=0)
        w.close()

    return _wandb_train, _wandb_fails_once, _mlflow_step, _has_key, _tb_step


_wandb_train, _wandb_fails_once, _mlflow_step, _has_key, _tb_step = _job_functions()


# ---- what may be asked for ------------------------------------------------------------------------------


def test_track_accepts_names_lists_mappings_and_false():
    assert JobSpec(command=["true"]).track is None
    assert JobSpec(command=["true"], track="wandb, mlflow").track == {"wandb": {}, "mlflow": {}}
    assert JobSpec(command=["true"], track=["tensorboard"]).track == {"tensorboard": {}}
    assert JobSpec(command=["true"], track=False).track == {}
    s = JobSpec(command=["true"], track={"wandb": {"project": "p", "mode": "offline", "tags": "a,b"}})
    assert s.track == {"wandb": {"project": "p", "mode": "offline", "tags": ["a", "b"]}}
    assert JobSpec.from_json(s.to_json()).track == s.track


@pytest.mark.parametrize("track, words", [
    ("wandb,comet", ["unknown tracking tool 'comet'", "wandb, mlflow, tensorboard"]),
    ({"wandb": {"api_key": "x"}}, ["unknown setting 'api_key'", "WANDB_API_KEY"]),
    ({"wandb": {"mode": "fast"}}, ["mode must be one of", "offline"]),
    ({"wandb": {"tags": ["a,b"]}}, ["without commas", "WANDB_TAGS"]),
    ({"mlflow": {"tracking_uri": "http://me:pw@host:5000"}}, ["must not carry a password",
                                                              "MLFLOW_TRACKING_PASSWORD"]),
    (3, ["expected a tool name"]),
])
def test_bad_track_names_the_field_and_what_is_allowed(track, words):
    with pytest.raises(SpecError) as e:
        JobSpec(command=["true"], track=track)
    assert e.value.field == "track"
    for w in words:
        assert w in str(e.value)
    assert "pw@" not in str(e.value)


def test_a_bad_tracking_table_in_the_config_is_a_config_error():
    meshrun.configure({"default_backend": "local", "tracking": {"mlflow": {"experiment": "e", "uri": "x"}}})
    with pytest.raises(ConfigError) as e:
        meshrun.run(["true"])
    assert "unknown setting 'uri'" in str(e.value) and "tracking_uri" in str(e.value)


# ---- Weights & Biases, offline ------------------------------------------------------------------------


def test_wandb_map_is_one_group_each_run_named_and_tagged(tmp_path, monkeypatch, wandb_runs):
    monkeypatch.setenv("WANDB_SILENT", "true")
    train = meshrun.job(_wandb_train, name="train", backend="local", cpus=1,
                        track={"wandb": {"project": "sweep-test", "mode": "offline", "dir": str(tmp_path)}})
    jobs = train.map([1, 2])
    assert [j.result(timeout=180) for j in jobs] == [j.id for j in jobs]
    sweep = jobs[0].record.array_id

    def ended() -> list[dict] | None:  # W&B's own service process may still be writing a run's file
        got = wandb_runs(tmp_path)
        return got if sum(r["exit_code"] is not None for r in got) >= 2 else None

    listed = wait_until(ended, timeout=60, what="both W&B runs written out")
    runs = {r["id"]: r for r in listed}
    assert set(runs) == {j.id for j in jobs} and len(listed) == 2  # meshrun leaves a succeeded run to the job
    for i, j in enumerate(jobs):
        r = runs[j.id]
        assert r["name"] == f"train[{i}]"
        assert r["group"] == sweep
        assert r["project"] == "sweep-test"
        assert {"meshrun", "backend:local", f"host:{socket.gethostname()}", "price:$0.00/h"} <= set(r["tags"])
        assert j.tracking["wandb"]["run_id"] == j.id and j.tracking["wandb"]["group"] == sweep
        assert r["exit_code"] == 0 and not any(k.startswith("meshrun.") for k in r["summary"])
        assert "closed" not in j.tracking["wandb"]


def test_a_retried_job_resumes_the_same_wandb_run(tmp_path, monkeypatch, wandb_runs):
    monkeypatch.setenv("WANDB_SILENT", "true")
    job = meshrun.submit(JobSpec(function=_wandb_fails_once, args=(str(tmp_path / "marker"),), retries=1,
                                 track={"wandb": {"mode": "offline", "dir": str(tmp_path)}}), backend="local")
    assert job.result(timeout=180) == job.id
    assert job.record.attempt == 2
    runs = wandb_runs(tmp_path)
    assert len(runs) == 2  # one offline run folder per attempt, both the same run
    assert {r["id"] for r in runs} == {job.id}


_WANDB_SLEEPER = """
import os, time, wandb
run = wandb.init()
run.log({"step": 1})
open(os.environ["MARKER"], "w").close()
time.sleep(600)
"""


def test_meshrun_marks_the_wandb_run_of_a_failed_and_a_cancelled_job(tmp_path, monkeypatch, wandb_runs, wandb_tmp):
    monkeypatch.setenv("WANDB_SILENT", "true")
    track = {"wandb": {"project": "close-test", "mode": "offline", "dir": str(tmp_path)}}
    failed = meshrun.run(["bash", "-c", "exit 3"], name="never-calls-wandb", backend="local", track=track)
    marker = tmp_path / "started"
    cancelled = meshrun.run([sys.executable, "-c", _WANDB_SLEEPER], name="sleeper", backend="local", track=track,
                            env={"MARKER": str(marker)})
    assert failed.wait(timeout=120) is meshrun.JobState.FAILED
    wait_until(marker.exists, timeout=120, interval=0.3, what="the job's wandb.init()")
    cancelled.cancel()
    assert cancelled.status() is meshrun.JobState.CANCELLED

    runs = wandb_runs(tmp_path)
    # the killed job's own run folder holds no record its writer flushed; meshrun's closing run is the same run
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{cancelled.id}"))) == 2
    for job, state, code in ((failed, "failed", 3), (cancelled, "cancelled", 1)):
        closing = [r for r in runs if r["id"] == job.id]
        assert len(closing) == 1, runs
        r = closing[0]
        assert r["exit_code"] == code and r["summary"]["meshrun.state"] == state
        assert r["summary"]["meshrun.reason"] == (job.record.reason or state) != state
        assert r["summary"]["meshrun.where"] == (job.record.where or "")
        assert r["name"] == job.name and r["project"] == "close-test"
        assert {"meshrun", "backend:local", f"meshrun:{state}"} <= set(r["tags"])
        closed = job.tracking["wandb"]["closed"]
        assert closed["state"] == state and closed["exit_code"] == code
        assert Path(r["file"]).parent == Path(closed["folder"])
    assert "marked cancelled by meshrun" in run_cli("status", cancelled.id).stdout
    assert not list(wandb_tmp.glob("meshrun-wandb-*")), "the closing process's temporary folder was left behind"


def test_a_wandb_run_that_could_not_be_marked_is_noted_and_meshrun_status_marks_it_later(tmp_path, monkeypatch,
                                                                                         wandb_runs):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")  # no key and no server here: resuming the run fails
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_free_port()}")
    job = meshrun.run(["bash", "-c", "exit 4"], backend="local", track={"wandb": {"dir": str(tmp_path)}})
    assert job.wait(timeout=120) is meshrun.JobState.FAILED
    assert "W&B" in job.tracking["close_error"] and "closed" not in job.tracking["wandb"]
    assert "closing the run failed" in run_cli("status", job.id).stdout
    out = run_cli("status", job.id, env={"WANDB_MODE": "offline"}).stdout  # now it can be written
    assert "marked failed by meshrun" in out and "close_error" not in job.tracking
    [r] = wandb_runs(tmp_path)
    assert r["id"] == job.id and r["exit_code"] == 4 and r["summary"]["meshrun.state"] == "failed"


# ---- MLflow, a real server --------------------------------------------------------------------------


def test_mlflow_map_is_a_parent_run_with_a_child_per_job_closed_by_meshrun(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    meshrun.configure({"default_backend": "local",
                       "tracking": {"mlflow": {"tracking_uri": mlflow_server, "experiment": "meshrun-tests"}}})
    step = meshrun.job(_mlflow_step, cpus=1)
    jobs = step.map([0, 1, 2], lr=0.5)
    assert jobs[0].result(timeout=180) == 0
    with pytest.raises(meshrun.JobFailed):
        jobs[1].result(timeout=180)
    client = MlflowClient(mlflow_server)
    rid2 = jobs[2].tracking["mlflow"]["run_id"]
    wait_until(lambda: client.get_run(rid2).data.metrics.get("x") == 2.0, timeout=120, interval=0.5,
               what="the third job to log its metric")
    jobs[2].cancel()
    assert jobs[2].status() is meshrun.JobState.CANCELLED

    t = [j.tracking["mlflow"] for j in jobs]
    parent = t[0]["parent_run_id"]
    assert parent and all(x["parent_run_id"] == parent for x in t)
    exp = client.get_experiment_by_name("meshrun-tests")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert {r.info.run_id for r in children} == {x["run_id"] for x in t}
    runs = [client.get_run(x["run_id"]) for x in t]
    assert [r.info.status for r in runs] == ["FINISHED", "FAILED", "KILLED"]
    assert [r.data.metrics["x"] for r in runs] == [0.0, 1.0, 2.0]  # the jobs' own start_run() attached
    assert [r.data.params for r in runs] == [{"x": str(i), "lr": "0.5"} for i in range(3)]
    assert [r.data.tags["meshrun.job_id"] for r in runs] == [j.id for j in jobs]
    assert [r.data.tags["meshrun.state"] for r in runs] == ["succeeded", "failed", "cancelled"]
    assert "x=1 is bad" in runs[1].data.tags["meshrun.reason"] or "exit" in runs[1].data.tags["meshrun.reason"]
    p = client.get_run(parent)
    assert p.info.status == "FAILED" and p.data.tags["meshrun.sweep"] == jobs[0].record.array_id
    assert t[0]["url"] == f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/{t[0]['run_id']}"
    out = run_cli("status", jobs[1].id).stdout
    assert t[1]["run_id"] in out and t[1]["url"] in out
    assert json.loads(run_cli("status", jobs[1].id, "--json").stdout)["tracking"]["mlflow"] == t[1]
    listed = run_cli("ls").stdout
    assert "TRACKED" in listed and all(f"mlflow:{x['run_id'][:8]}" in listed for x in t)
    assert f'<a href="{t[0]["url"]}"' in jobs[0]._repr_html_()


def test_a_command_that_never_calls_mlflow_still_gets_its_run_closed(mlflow_server):
    from mlflow.tracking import MlflowClient

    job = meshrun.run(["bash", "-c", "exit 3"], backend="local", track={"mlflow": {"tracking_uri": mlflow_server}})
    assert job.wait(timeout=120) is meshrun.JobState.FAILED
    run = MlflowClient(mlflow_server).get_run(job.tracking["mlflow"]["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["meshrun.state"] == "failed"
    assert run.data.tags["meshrun.job_id"] == job.id and job.tracking["ended"]["state"] == "failed"


def test_a_server_down_when_the_job_ends_is_noted_and_meshrun_status_closes_the_run_later(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    gate = tmp_path / "go"
    job = meshrun.run(["bash", "-c", f"while [ ! -e {gate} ]; do sleep 0.1; done; exit 5"], backend="local",
                      track={"mlflow": {"tracking_uri": mlflow_server}})
    # the server "moves away" before the job ends: meshrun reads the URI the job was given from launch.json
    launch = job.job_dir / "launch.json"
    real = launch.read_text()
    launch.write_text(real.replace(mlflow_server, f"http://127.0.0.1:{_free_port()}"))
    gate.touch()
    assert job.wait(timeout=120) is meshrun.JobState.FAILED
    assert "MlflowException" in job.tracking["close_error"]
    rid = job.tracking["mlflow"]["run_id"]
    client = MlflowClient(mlflow_server)
    assert client.get_run(rid).info.status == "SCHEDULED"  # never started by the job, not closed yet
    assert "closing the run failed" in run_cli("status", job.id).stdout
    launch.write_text(real)  # the server is back
    out = run_cli("status", job.id).stdout
    assert "closing the run failed" not in out and "close_error" not in job.tracking
    assert client.get_run(rid).info.status == "FAILED"


# ---- no secrets stored ------------------------------------------------------------------------------


def test_keys_reach_the_job_but_never_the_store_logs_or_status(mlflow_server, tmp_path, monkeypatch, meshrun_home):
    monkeypatch.setenv("WANDB_API_KEY", "wk-s3cret-9f8e7d")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "mt-s3cret-1a2b3c")
    digest = hashlib.sha256(b"wk-s3cret-9f8e7d|mt-s3cret-1a2b3c").hexdigest()
    job = meshrun.submit(JobSpec(function=_has_key, args=(digest,), track={
        "mlflow": {"tracking_uri": mlflow_server}, "wandb": {"mode": "offline", "dir": str(tmp_path)},
        "tensorboard": {"root": str(tmp_path / "tb")}}), backend="local")
    assert job.result(timeout=120) is True
    shown = run_cli("status", job.id).stdout + run_cli("status", job.id, "--json").stdout + run_cli("ls").stdout
    shown += run_cli("logs", job.id).stdout
    for secret in ("wk-s3cret-9f8e7d", "mt-s3cret-1a2b3c"):
        assert secret not in shown
        for f in Path(meshrun_home).rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f
    assert set(job.tracking) >= {"mlflow", "wandb", "tensorboard"}


# ---- TensorBoard ------------------------------------------------------------------------------------


_TB_SCRIPT = """
import os
from tensorboard.summary import Writer
w = Writer(os.environ["TENSORBOARD_LOGDIR"])
for step in range(3):
    w.add_scalar("loss", 1.0 / (step + 1), step=step)
w.close()
assert os.environ["MESHRUN_TENSORBOARD_DIR"] == os.environ["TENSORBOARD_LOGDIR"]
"""


def _loss(logdir: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    ea = EventAccumulator(logdir)
    ea.Reload()
    return [(e.step, round(float(tensor_util.make_ndarray(e.tensor_proto)), 4)) for e in ea.Tensors("loss")]


def test_tensorboard_a_folder_per_job_under_one_per_sweep_and_meshrun_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    root = tmp_path / "tb"
    (tmp_path / "config.toml").write_text(f'default_backend = "local"\n[tracking.tensorboard]\nroot = "{root}"\n')
    env = {"MESHRUN_CONFIG": str(tmp_path / "config.toml")}
    # one job from the command line: the config table says where, --track says which tools
    jid = run_cli("run", "--track", "tensorboard", "-d", "--", sys.executable, "-c", _TB_SCRIPT, env=env).stdout.strip()
    monkeypatch.setenv("MESHRUN_CONFIG", env["MESHRUN_CONFIG"])
    meshrun.configure()
    job = meshrun.Job.attach(jid)
    assert job.wait(timeout=120) is meshrun.JobState.SUCCEEDED, job.logs()
    assert job.tracking["tensorboard"]["logdir"] == str(root / jid)
    assert _loss(str(root / jid)) == [(0, 1.0), (1, 0.5), (2, 0.3333)]
    assert run_cli("tensorboard", jid, "--print", env=env).stdout.strip() == str(root / jid)

    # a sweep: one folder, a log dir per job in it
    step = meshrun.job(_tb_step, cpus=1, track="tensorboard")
    jobs = step.map([1, 2])
    meshrun.wait(jobs, timeout=180)
    sweep = jobs[0].record.array_id
    assert all(j.record.state is meshrun.JobState.SUCCEEDED for j in jobs)
    assert sorted(os.listdir(root / sweep)) == [f"{i:03d}-{j.id}" for i, j in enumerate(jobs)]
    assert _loss(str(root / sweep / f"001-{jobs[1].id}")) == [(0, 2.0)]
    assert run_cli("tensorboard", sweep, "--print", env=env).stdout.strip() == str(root / sweep)

    # meshrun tensorboard SWEEP starts TensorBoard over the sweep's runs
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", "meshrun", "tensorboard", sweep, "--", "--port", str(port),
                          "--host", "127.0.0.1"], env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def runs() -> list[str] | None:
            assert p.poll() is None, "tensorboard exited"
            try:
                return sorted(json.loads(_get(f"http://127.0.0.1:{port}/data/runs")))
            except OSError:
                return None

        listed = wait_until(lambda: (r := runs()) and len(r) == 2 and r, timeout=120, interval=0.5,
                            what="TensorBoard to list the sweep's runs")
        assert listed == [f"{i:03d}-{j.id}" for i, j in enumerate(jobs)]
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=20)


def test_an_untracked_job_has_no_tracking_and_track_false_overrides_the_config(tmp_path):
    meshrun.configure({"default_backend": "local", "tracking": {"tensorboard": {"root": str(tmp_path / "tb")}}})
    job = meshrun.run(["true"], track=False)
    assert job.wait(timeout=60) is meshrun.JobState.SUCCEEDED
    assert job.tracking == {} and not (job.job_dir / "tracking.json").exists()
    assert "TENSORBOARD_LOGDIR" not in json.loads((job.job_dir / "launch.json").read_text())["env"]
    assert "TRACKED" not in run_cli("ls").stdout and "tracking" not in job._repr_html_()
    job = meshrun.run(["true"])
    assert job.wait(timeout=60) is meshrun.JobState.SUCCEEDED
    assert job.tracking["tensorboard"]["logdir"] == str(tmp_path / "tb" / job.id)


# ---- the example notebook ---------------------------------------------------------------------------


@pytest.mark.service
def test_the_tracking_notebook_runs_in_a_real_kernel(tmp_path, wandb_tmp):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("mlflow")
    nb = nbformat.read(Path(__file__).resolve().parents[1] / "examples" / "tracking.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    def text(i: int) -> str:
        return "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in nb.cells[i].outputs
                       if o.get("name") != "stderr")  # MLflow's and tqdm's log lines

    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
    assert text(2) == "[0.3585, 0.1216, 0.0115]"
    lines = text(3).splitlines()
    assert [ln.split()[:2] for ln in lines[:3]] == [["fit[0]", "FINISHED"], ["fit[1]", "FINISHED"],
                                                    ["fit[2]", "FINISHED"]]
    assert "'lr': '0.1'" in lines[1] and lines[3].startswith("parent: fit ") and lines[3].endswith("FINISHED")
    assert "mlflow" in nb.cells[4].outputs[0]["data"]["text/html"]
