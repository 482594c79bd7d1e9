"""Against a real dstack server (started by scripts/dstack-server.sh on 127.0.0.1; offline, SQLite, no
backends and no fleets): plans come back with no offers, runs wait or fail for lack of capacity, and are
listed, stopped, re-attached. Nothing runs a container here; a function job's task is run locally,
standing in for dstack's runner, with its output written where dstack's log storage keeps it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from meshrun.testing import files_holding
from meshrun.testing import wait_until as _wait_until

import meshrun
from meshrun_dstack import _client, _translate

pytestmark = pytest.mark.service


def wait_for(pred, timeout=60.0, interval=0.5, what="condition"):
    return _wait_until(pred, timeout, interval, what)


def backend():
    return meshrun.get_backend("dstack")


def submission(spec, tmp_path, job_id=None):
    """A command job's Submission with its launch description, for calling the backend directly (the
    core would not submit where the plan has no offer)."""
    job_id = job_id or ("t" + uuid.uuid4().hex[:11])
    d = tmp_path / "jobs" / job_id
    d.mkdir(parents=True)
    launch = {"job_id": job_id, "name": spec.display_name, "kind": "command", "env": dict(spec.env),
              "cwd": str(tmp_path), "setup": [], "gpus": 0, "gpu_type": None, "nodes": 1, "time_limit": None,
              "argv": list(spec.command)}
    (d / "launch.json").write_text(json.dumps(launch))
    return meshrun.Submission(job_id=job_id, job_dir=d, spec=spec, launch=launch)


RETRY = {"dstack": {"retry": "1h"}}


# ---- connection ---------------------------------------------------------------------------------------


def test_check_reports_server_user_and_api_version(dstack):
    av = backend().check()
    assert av.ok, av.reason
    assert av.detail["server_version"] == "0.22.5" and av.detail["api_version"] == "0.22.5"
    assert av.detail["user"] == dstack.user and av.detail["project"] == "main"


def test_bad_token_is_a_clear_authentication_error(dstack, monkeypatch):
    monkeypatch.setenv("MESHRUN_DSTACK_TOKEN", "bad-token-0123456789")
    meshrun.configure()
    b = backend()
    av = b.check()
    assert not av.ok and "authentication failed" in av.reason and "refused the token" in av.reason
    with pytest.raises(_client.DstackAuthError) as e:
        b.status(["meshrun-whatever"])
    with pytest.raises(meshrun.NoPlacementError) as e2:
        meshrun.run(["true"], backend="dstack")
    for text in (av.reason, str(e.value), str(e2.value)):
        assert "bad-token-0123456789" not in text
    assert "authentication failed" in str(e2.value)


def test_unreachable_server_is_unavailable_not_a_crash(dstack, monkeypatch):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setenv("MESHRUN_DSTACK_ENDPOINT", f"http://127.0.0.1:{port}")
    meshrun.configure()
    b = backend()
    av = b.check()
    assert not av.ok and "cannot reach the dstack server" in av.reason
    st = b.status(["meshrun-x"])["meshrun-x"]
    assert st.state is meshrun.JobState.UNKNOWN and "cannot reach" in st.reason


def test_unknown_project_is_named(dstack, monkeypatch):
    monkeypatch.setenv("MESHRUN_DSTACK_PROJECT", "no-such-project")
    meshrun.configure()
    b = backend()
    av = b.check()
    assert not av.ok and "project 'no-such-project' does not exist" in av.reason
    o = b.offers(meshrun.JobSpec(command=["true"]))[0]
    assert not o.fits and "no-such-project" in o.reason


def test_incompatible_api_level_is_refused_with_the_servers_reason(dstack, monkeypatch):
    monkeypatch.setenv("MESHRUN_DSTACK_API_VERSION", "0.99.0")
    meshrun.configure()
    av = backend().check()
    assert not av.ok
    assert "0.99.0" in av.reason and "incompatible" in av.reason.lower() and "0.22.5" in av.reason


# ---- plans ----------------------------------------------------------------------------------------------


def test_plan_has_no_offers_and_says_why(dstack):
    spec = meshrun.JobSpec(command=["python", "train.py"], gpus="H100:8", memory="64GiB", nodes=2,
                           time_limit="1h", backend_options={"dstack": {"spot_policy": "auto", "max_price": 40}})
    offers = backend().offers(spec)
    assert len(offers) == 1
    o = offers[0]
    assert not o.fits and o.backend == "dstack" and o.nodes == 2 and o.gpus == 8
    assert o.reason.startswith("no capacity: ") and "no fleets" in o.reason
    # the core says the same when asked to run there
    with pytest.raises(meshrun.NoPlacementError) as e:
        meshrun.run(["python", "train.py"], backend="dstack", gpus=1)
    assert "no capacity" in str(e.value) and "no fleets" in str(e.value)


def test_with_retry_the_plan_is_a_queue(dstack):
    o = backend().offers(meshrun.JobSpec(command=["true"], backend_options=RETRY))[0]
    assert o.fits and o.expected_start is None and "waits for capacity" in o.start_note
    assert "no capacity" in o.start_note


def test_a_task_the_server_rejects_is_a_spec_error(dstack):
    # valid for dstack's models, refused by the server's own checks at planning time
    spec = meshrun.JobSpec(command=["true"], backend_options={"dstack": {"fleets": ["Bad Fleet Name"]}})
    try:
        offers = backend().offers(spec)
    except meshrun.SpecError as e:
        assert "dstack" in str(e)
    else:
        assert not offers[0].fits and offers[0].reason


# ---- runs -----------------------------------------------------------------------------------------------


def test_retry_run_waits_is_listed_is_stopped_and_ends_cancelled(dstack):
    job = meshrun.run(["python", "train.py"], backend="dstack", name="wait for me", backend_options=RETRY)
    rec = job.refresh()
    name = rec.backend_id
    assert name == _translate.run_name(job.id)
    st = wait_for(lambda: (s := backend().status([name])[name]).reason and s, what="a status with a reason")
    assert st.state is meshrun.JobState.PENDING
    job.refresh()
    assert job.refresh().state is meshrun.JobState.PENDING
    listed = backend().client().list_runs()
    assert name in [r["run_spec"]["run_name"] for r in listed]
    # a batch of more than a few ids goes through the list
    statuses = backend().status([name, "meshrun-gone-1", "meshrun-gone-2", "meshrun-gone-3"])
    assert statuses[name].state is meshrun.JobState.PENDING
    assert statuses["meshrun-gone-1"].state is meshrun.JobState.LOST
    assert backend().find(job.id) == name
    # following the log of a waiting run ends when the run does
    import threading

    followed: list = []
    follower = threading.Thread(target=lambda: followed.extend(backend().logs(name, follow=True)), daemon=True)
    follower.start()
    job.cancel()
    follower.join(timeout=60)
    assert not follower.is_alive() and followed == []
    rec = job.refresh()
    assert rec.state is meshrun.JobState.CANCELLED, rec.reason
    assert "stopped by user" in rec.reason
    run = backend().client().get_run(name)
    assert run["status"] == "terminated" and run["termination_reason"] == "stopped_by_user"


def test_run_without_retry_fails_with_dstacks_reason(dstack, tmp_path):
    b = backend()
    sub = submission(meshrun.JobSpec(command=["echo", "hi"]), tmp_path)
    name = b.submit(sub)
    st = wait_for(lambda: (s := b.status([name])[name]).terminal and s, timeout=90, what="the run to fail")
    assert st.state is meshrun.JobState.FAILED
    assert "no capacity" in st.reason and "No matching fleet found" in st.reason
    assert st.detail["job_termination_reason"] == "failed_to_start_due_to_no_capacity"
    assert "".join(b.logs(name)) == ""
    assert list(b.logs(name, follow=True)) == []  # follow ends: the run is finished


def test_resubmitting_the_same_job_reattaches(dstack, tmp_path):
    b = backend()
    sub = submission(meshrun.JobSpec(command=["true"], backend_options=RETRY), tmp_path)
    name = b.submit(sub)
    assert b.submit(sub) == name  # e.g. after a lost response: the same run, not a second one
    assert [r["run_spec"]["run_name"] for r in b.client().list_runs()].count(name) == 1
    assert b.find(sub.job_id) == name and b.find("nosuchjob") is None
    b.cancel(name)
    wait_for(lambda: b.status([name])[name].state is meshrun.JobState.CANCELLED, what="the cancel")


def test_status_is_right_after_a_server_restart(dstack):
    job = meshrun.run(["sleep", "1000"], backend="dstack", backend_options=RETRY)
    name = job.refresh().backend_id
    wait_for(lambda: backend().status([name])[name].state is meshrun.JobState.PENDING, what="pending")
    url = dstack.url
    dstack.down()
    try:
        st = backend().status([name])[name]
        assert st.state is meshrun.JobState.UNKNOWN and "cannot reach" in st.reason
        assert job.refresh().state is meshrun.JobState.PENDING  # UNKNOWN is not an outcome
    finally:
        dstack.up()
    assert dstack.url == url  # the same server, back on its port
    st = wait_for(lambda: (s := backend().status([name])[name]).state is not meshrun.JobState.UNKNOWN and s,
                  what="status after the restart")
    assert st.state is meshrun.JobState.PENDING, st
    job.cancel()
    assert job.refresh().state is meshrun.JobState.CANCELLED


# ---- token hygiene --------------------------------------------------------------------------------------


def test_token_appears_nowhere(dstack, tmp_path, caplog, capfd, monkeypatch):
    token = dstack.user_token
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    job = meshrun.run(["echo", "secret-free"], backend="dstack", backend_options=RETRY)
    backend().status([job.refresh().backend_id])
    backend().offers(meshrun.JobSpec(command=["true"]))
    job.cancel()
    texts = []
    # errors of every kind: auth, validation, not found
    for bad in ({"MESHRUN_DSTACK_TOKEN": token + "x"}, {}):
        for k, v in bad.items():
            monkeypatch.setenv(k, v)
        meshrun.configure()
        try:
            backend().client().apply({"run_name": "Bad Name", "configuration": {"type": "task"}})
        except meshrun.MeshrunError as e:
            texts.append(str(e))
            texts.append(repr(e))
        texts.append(str(backend().check()))
    assert texts and any("authentication failed" in t for t in texts)
    out, err = capfd.readouterr()
    texts += [caplog.text, out, err, repr(backend()), str(backend().config)]
    for t in texts:
        assert token not in t
    # the job store: its database and every job folder
    home = Path(os.environ["MESHRUN_HOME"])
    files = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.name == "jobs.db" for p in files)
    for p in files:
        assert token.encode() not in p.read_bytes(), p
    # the server's own log (it prints the admin token at start, never a user's)
    assert token not in dstack.log.read_text(errors="replace")


# ---- a function job, with dstack's runner played locally ------------------------------------------------


def echo_back(*args, **kwargs):
    import os as _os

    print("hello from the task", flush=True)
    return {"args": list(args), "kwargs": kwargs, "env": _os.environ.get("HOSTILE"),
            "name": _os.environ.get("MESHRUN_JOB_NAME"), "rank": _os.environ.get("NODE_RANK")}


HOSTILE = "it's $HOME ${{ secrets.x }} $$ `id` \"q\" \n ✓"


def spy_uploads(b, monkeypatch):
    """The file archives the backend uploads to the server, by archive id (what dstack's runner unpacks)."""
    uploaded: dict[str, bytes] = {}
    real_upload = b.client().upload_archive

    def spy(name, data):
        archive = real_upload(name, data)
        uploaded[archive["id"]] = data
        return archive

    monkeypatch.setattr(b.client(), "upload_archive", spy)
    return uploaded


def play_runner(dstack, b, name, uploaded, tmp_path, secrets=None):
    """What dstack does with the job of run ``name`` (stopped before it got an instance) once it runs: the
    job spec the server keeps, its env interpolated with the project's ``secrets`` (the server's own
    interpolator, as it does when the job starts), its file archives unpacked at their paths, its commands run
    in a folder of their own, and their output written into the server's log storage. Returns the finished
    process and the log file."""
    run = b.client().get_run(name)
    job_spec = run["jobs"][0]["job_spec"]
    sub_id = run["jobs"][0]["job_submissions"][-1]["id"]
    for fa in job_spec["file_archives"]:
        target = Path(fa["path"])
        with tarfile.open(fileobj=io.BytesIO(uploaded[fa["id"]])) as t:
            for m in t.getmembers():
                rel = m.name.split("/", 1)[1] if "/" in m.name else ""
                m.name = rel or "."
                t.extract(m, target, filter="data")
    from dstack._internal.utils.interpolator import VariablesInterpolator

    interp = VariablesInterpolator({"secrets": secrets or {}})
    env = {k: interp.interpolate_or_error(v) for k, v in job_spec["env"].items()}
    env.update(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", HOME=str(tmp_path),
               DSTACK_NODE_RANK="0", DSTACK_NODES_NUM="1", DSTACK_GPUS_PER_NODE="0")
    workdir = tmp_path / "container-workdir"
    workdir.mkdir()
    p = subprocess.run(job_spec["commands"], env=env, cwd=workdir, capture_output=True, text=True, timeout=120)
    log_file = dstack.server_dir / "projects" / "main" / "logs" / name / sub_id / "job.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = datetime.now(timezone.utc)
    with open(log_file, "w") as f:
        for i, line in enumerate(p.stdout.splitlines(keepends=True)):
            ts = (t0 + timedelta(milliseconds=i)).isoformat()
            f.write(json.dumps({"timestamp": ts, "log_source": "stdout", "message": line}) + "\n")
    return p, log_file


def test_function_job_round_trip_through_the_servers_job_spec_and_log(dstack, tmp_path, monkeypatch):
    """Submit a function job (the server keeps its job spec), then do what dstack's runner would: unpack
    the file archives, run the job spec's commands with its environment, and write the output into the
    server's log storage. The result then comes back through the server's logs API."""
    b = backend()
    uploaded = spy_uploads(b, monkeypatch)
    # a decorated function, submitted the usual way (placement: the named backend's queued offer)
    fn = meshrun.job(name=HOSTILE, env={"HOSTILE": HOSTILE}, backend="dstack",
                     backend_options={"dstack": {"retry": "1h", "image": "scratch"}})(echo_back)
    job = fn.submit(HOSTILE, ["x"], k=HOSTILE)
    name = job.refresh().backend_id
    assert job.refresh().state is meshrun.JobState.PENDING
    b.cancel(name)
    wait_for(lambda: b.status([name])[name].terminal, what="the stop")
    p, log_file = play_runner(dstack, b, name, uploaded, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr

    # the submitter's part, through the server's API
    text = "".join(b.logs(name))
    assert "hello from the task" in text and "meshrun-records" not in text
    b.fetch_results(name, job.job_dir)
    exit_rec = json.loads((job.job_dir / "exit.json").read_text())
    assert exit_rec["state"] == "succeeded"
    import pickle

    result = pickle.loads((job.job_dir / "result.pkl").read_bytes())
    assert result == {"args": [HOSTILE, ["x"]], "kwargs": {"k": HOSTILE}, "env": HOSTILE, "name": HOSTILE,
                      "rank": "0"}
    assert meshrun.map_agent_status(exit_rec).state is meshrun.JobState.SUCCEEDED

    # the same log cut short, then altered, in the server's log storage: detected, nothing written or unpickled
    (job.job_dir / "result.pkl").unlink()
    entries = log_file.read_text().splitlines(keepends=True)
    frame = [i for i, e in enumerate(entries) if "::meshrun-records:" in e]
    log_file.write_text("".join(entries[:frame[-1]]))  # the checksum line is lost
    with pytest.raises(meshrun.BackendError, match="cut short"):
        b.fetch_results(name, job.job_dir)
    rec = json.loads(entries[frame[0]])
    rec["message"] = rec["message"].replace("A", "B", 1)
    entries[frame[0]] = json.dumps(rec) + "\n"
    log_file.write_text("".join(entries))
    with pytest.raises(meshrun.BackendError, match="checksum|decoded"):
        b.fetch_results(name, job.job_dir)
    assert not (job.job_dir / "result.pkl").exists()


# ---- a job with object-store inputs/outputs, its credentials in the dstack project's secrets ------------------


def test_data_job_round_trip_credentials_from_dstack_secrets_written_nowhere(dstack, s3, tmp_path, monkeypatch,
                                                                             meshrun_home):
    """A command job with inputs and outputs: the server keeps references to the project's secrets in its job
    spec, never their values; played as dstack's runner would (the references filled in, the job folder with
    the agent and the stager unpacked), it stages its inputs from the S3 server and uploads its outputs; its
    records come back through the server's log."""
    secrets = {"mr_s3_key": s3.access_key, "mr_s3_secret": s3.secret, "mr_s3_endpoint": s3.endpoint}
    monkeypatch.setenv("MESHRUN_DSTACK_DATA_SECRETS", json.dumps(
        {"AWS_ACCESS_KEY_ID": "mr_s3_key", "AWS_SECRET_ACCESS_KEY": "mr_s3_secret",
         "AWS_ENDPOINT_URL": "mr_s3_endpoint"}))
    meshrun.configure()
    b = backend()
    uploaded = spy_uploads(b, monkeypatch)
    s3.client.put_object(Bucket=s3.bucket, Key="set/a.txt", Body=b"alpha\n")
    spec = meshrun.JobSpec(
        command='mkdir -p out && cat data/a.txt > out/seen.txt && echo "$V" >> out/seen.txt',
        env={"V": "${{ secrets.mr_s3_key }} $x"}, name="data", time_limit=600,
        inputs={f"s3://{s3.bucket}/set/": "data/"}, outputs={"out/": f"s3://{s3.bucket}/results/"},
        backend="dstack", backend_options={"dstack": {"retry": "1h", "image": "scratch"}})
    job = meshrun.submit(spec)
    name = job.refresh().backend_id
    b.cancel(name)
    wait_for(lambda: b.status([name])[name].terminal, what="the stop")
    run = b.client().get_run(name)
    env = run["jobs"][0]["job_spec"]["env"]
    assert env["AWS_SECRET_ACCESS_KEY"] == "${{ secrets.mr_s3_secret }}"
    p, _ = play_runner(dstack, b, name, uploaded, tmp_path, secrets=secrets)
    assert p.returncode == 0, p.stdout + p.stderr
    got = s3.client.get_object(Bucket=s3.bucket, Key="results/seen.txt")["Body"].read()
    assert got == b"alpha\n${{ secrets.mr_s3_key }} $x\n"  # the spec's own text is never interpolated
    text = "".join(b.logs(name))
    assert "inputs ready: 1 object(s)" in text and "outputs uploaded" in text and "meshrun-records" not in text
    b.fetch_results(name, job.job_dir)
    assert json.loads((job.job_dir / "exit.json").read_text())["state"] == "succeeded"
    # the server's run, the job store, what meshrun shows and the task's own folders hold no credential
    needles = [*s3.needles, s3.endpoint]
    shown = json.dumps(b.client().get_run(name)) + text + b.native(meshrun.Submission(
        job_id=job.id, job_dir=job.job_dir, spec=spec, launch=json.loads((job.job_dir / "launch.json").read_text())))
    assert [n for n in needles if n in shown] == []
    assert files_holding([meshrun_home, tmp_path / "task-root", tmp_path / "container-workdir"], needles) == []
