"""The container side of a function job, run here as the pod would run it: the Secret's files in a
read-only folder, the container's command (the agent: ``run JOB --inputs IN --emit-records @IN/records.nonce``),
the pod log on stdout. The submitter's side then reads the records back from that log exactly as it reads a
real pod's log (``meshrun.backend.extract_records``)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import cloudpickle
import meshrun
import pytest

import meshrun.backend as mb
from meshrun.testing import files_holding
from meshrun_kubernetes import KubernetesBackend
from meshrun_kubernetes import _manifests as mf

NONCE = "0123456789abcdef0123456789abcdef"


def payload(fn, *args, python=None, **kwargs) -> bytes:
    """A payload in the core's format: a JSON version header line, then cloudpickle of (fn, args, kwargs)."""
    header = {"python": python or "%d.%d" % sys.version_info[:2], "cloudpickle": cloudpickle.__version__,
              "meshrun": meshrun.__version__}
    return json.dumps(header, sort_keys=True).encode() + b"\n" + cloudpickle.dumps((fn, args, kwargs))


def stage(tmp_path, make_submission, fn, *args, nodes=1, data=None, result_max=None, **kwargs):
    spec = meshrun.JobSpec(function=fn, args=args, kwargs=kwargs, nodes=nodes, env={"GREETING": "hi $(x)"})
    sub = make_submission(spec, payload=data if data is not None else payload(fn, *args, **kwargs))
    cfg = {"namespace": "ml", "image": "python:3.11"}
    if result_max:
        cfg["result_max_bytes"] = result_max
    m, files = KubernetesBackend(cfg).render(sub, nonce=NONCE)
    src = tmp_path / "secret"
    src.mkdir()
    for name, content in files.items():
        (src / name).write_bytes(content)
        os.chmod(src / name, 0o444)
    workdir = tmp_path / "image-workdir"
    workdir.mkdir()
    return src, tmp_path / "job", workdir, m


def container_argv(m, src, job):
    """The container's command, with this machine's Python and folders for the pod's."""
    argv = m.workload["spec"]["template"]["spec"]["containers"][0]["command"]
    return [sys.executable] + [a.replace(mf.IN_DIR, str(src)).replace(mf.JOB_DIR, str(job)) for a in argv[1:]]


def run_boot(staged, env=None, timeout=60):
    src, job, workdir, m = staged
    e = {k: v for k, v in os.environ.items() if not k.startswith("MESHRUN_")}
    e.update({"GREETING": "hi $(x)", "PYTHONUNBUFFERED": "1"})
    e.update(env or {})
    return subprocess.run(container_argv(m, src, job), cwd=workdir, env=e,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)


def parse_block(log, nonce, rank=0):
    return mb.extract_records(log, nonce, rank)


def test_success_result_comes_back_through_the_log(tmp_path, make_submission):
    def work(x, y=1):
        import os

        print("working on", x, "in", os.getcwd(), os.environ["GREETING"], flush=True)
        return {"sum": x + y, "bytes": b"\x00\xff" * 10}

    staged = stage(tmp_path, make_submission, work, 41, y=1)
    workdir = staged[2]
    p = run_boot(staged)
    log = p.stdout.decode()
    assert p.returncode == 0, (log, p.stderr.decode())
    files = parse_block(log, NONCE)
    assert pickle.loads(files["result.pkl"]) == {"sum": 42, "bytes": b"\x00\xff" * 10}
    assert json.loads(files["exit.json"])["state"] == "succeeded"
    user = mb.strip_records(log)
    assert f"working on 41 in {workdir} hi $(x)" in user and "meshrun-records" not in user


def test_exception_becomes_error_json(tmp_path, make_submission):
    def boom():
        raise ValueError("bad learning rate")

    staged = stage(tmp_path, make_submission, boom)
    p = run_boot(staged)
    assert p.returncode == 1
    files = parse_block(p.stdout.decode(), NONCE)
    err = json.loads(files["error.json"])
    assert err["type"] == "ValueError" and "bad learning rate" in err["traceback"]
    assert isinstance(pickle.loads(files["error.pkl"]), ValueError)
    assert "result.pkl" not in files


def test_result_too_large_fails_without_retry(tmp_path, make_submission):
    def big():
        return "x" * 100_000

    staged = stage(tmp_path, make_submission, big, result_max=4096)
    p = run_boot(staged)
    assert p.returncode == 3  # the Job's podFailurePolicy fails the Job at once on 3
    files = parse_block(p.stdout.decode(), NONCE)
    assert json.loads(files["error.json"])["type"] == "ResultTooLarge"
    assert json.loads(files["exit.json"])["state"] == "failed"


def test_version_mismatch_fails_without_retry(tmp_path, make_submission):
    def f():
        return 1

    staged = stage(tmp_path, make_submission, f, data=payload(f, python="2.7"))
    p = run_boot(staged)
    assert p.returncode == 3
    err = json.loads(parse_block(p.stdout.decode(), NONCE)["error.json"])
    assert err["type"] == "VersionMismatch" and "2.7" in err["message"]


def test_node_rank_from_the_environment(tmp_path, make_submission):
    def rank():
        import os

        return (os.environ["NODE_RANK"], os.environ["NNODES"], os.environ["MASTER_ADDR"])

    staged = stage(tmp_path, make_submission, rank, nodes=2)
    p = run_boot(staged, env={"NODE_RANK": "1"})
    assert p.returncode == 0, p.stdout.decode()
    files = parse_block(p.stdout.decode(), NONCE, rank=1)
    assert parse_block(p.stdout.decode(), NONCE) is None  # only node 0's records are the job's
    assert pickle.loads(files["result.pkl"]) == ("1", "2", "meshrun-0a1b2c3d4e5f-0.meshrun-0a1b2c3d4e5f.ml.svc")
    assert (staged[1] / "result.rank1.pkl").exists()


def test_sigterm_stops_the_job_and_still_reports(tmp_path, make_submission):
    def sleepy():
        import time

        print("started", flush=True)
        time.sleep(60)

    src, job, workdir, m = stage(tmp_path, make_submission, sleepy)
    e = {k: v for k, v in os.environ.items() if not k.startswith("MESHRUN_")}
    p = subprocess.Popen(container_argv(m, src, job), cwd=workdir, env=e,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (job / "output.log").exists() or b"started" not in (job / "output.log").read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)  # what the kubelet does on deletion or activeDeadlineSeconds
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 1
    ex = json.loads(parse_block(out.decode(), NONCE)["exit.json"])
    assert ex["state"] == "cancelled"


def test_forged_and_truncated_frames(tmp_path, make_submission):
    def f():
        return 1

    log = run_boot(stage(tmp_path, make_submission, f)).stdout.decode()
    assert parse_block(log.replace(NONCE, "deadbeef"), NONCE) is None  # another nonce: not meshrun's frame
    lines = log.splitlines()
    with pytest.raises(mb.RecordError, match="cut short"):
        parse_block("\n".join(lines[:-1]), NONCE)  # the log lost its last line
    with pytest.raises(mb.RecordError, match="checksum|decoded"):
        parse_block(log.replace(lines[-2][-20:], lines[-2][-20:][::-1]), NONCE)


# ---- a job with object-store inputs and outputs, against a real S3 server (SeaweedFS) ---------------------


def pod_env(m, secrets, base):
    """The container's environment as the kubelet makes it: ``envFrom`` first (each Secret's keys, from
    ``secrets``: name -> its data), then ``env`` on top, each value expanded the kubelet's way."""
    from meshrun_kubernetes._names import expand

    c = m.workload["spec"]["template"]["spec"]["containers"][0]
    env = dict(base)
    for ref in c.get("envFrom", []):
        env.update(secrets[ref["secretRef"]["name"]])
    for e in c["env"]:
        env[e["name"]] = expand(e["value"], env)
    return env


def data_job(tmp_path, make_submission, s3, command, **kw):
    """A data job's pod, staged as the cluster would: the Secret's files, the env the manifest gives with the
    cluster's Secret ``s3-credentials`` (the S3 endpoint and key pair) through envFrom; nothing of this
    machine's environment."""
    spec = meshrun.JobSpec(command=command, env={"GREETING": "hi $(x)"}, **kw)
    sub = make_submission(spec)
    b = KubernetesBackend({"namespace": "ml", "image": "python:3.11", "data_env_from": ["s3-credentials"]})
    m, files = b.render(sub, nonce=NONCE)
    src = tmp_path / "secret"
    src.mkdir()
    for name, content in files.items():
        (src / name).write_bytes(content)
    home = tmp_path / "home"  # the container's home: the stager's cache goes under it
    home.mkdir()
    base = {"PATH": os.environ["PATH"], "HOME": str(home)}
    env = pod_env(m, {"s3-credentials": s3.env}, base)
    workdir = tmp_path / "image-workdir"
    workdir.mkdir()
    return b, sub, m, files, (src, tmp_path / "job", workdir), env


def test_a_data_job_stages_inputs_uploads_outputs_and_writes_no_credentials(tmp_path, make_submission, s3):
    s3.client.put_object(Bucket=s3.bucket, Key="set/a.txt", Body=b"alpha\n")
    s3.client.put_object(Bucket=s3.bucket, Key="set/sub/b.txt", Body=b"beta\n")
    b, sub, m, files, (src, job, workdir), env = data_job(
        tmp_path, make_submission, s3,
        'mkdir -p out && cat data/a.txt data/sub/b.txt > out/seen.txt && echo "$GREETING" >> out/seen.txt',
        inputs={f"s3://{s3.bucket}/set/": "data/"}, outputs={"out/": f"s3://{s3.bucket}/results/"},
        time_limit=600)
    assert not any(k.startswith("AWS_") for e in m.workload["spec"]["template"]["spec"]["containers"][0]["env"]
                   for k in [e["name"]])
    p = subprocess.run(container_argv(m, src, job), cwd=workdir, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=120)
    log = p.stdout.decode()
    assert p.returncode == 0, (log, p.stderr.decode())
    records = parse_block(log, NONCE)
    assert json.loads(records["exit.json"])["state"] == "succeeded"
    got = s3.client.get_object(Bucket=s3.bucket, Key="results/seen.txt")["Body"].read()
    assert got == b"alpha\nbeta\nhi $(x)\n"
    user = mb.strip_records(log)  # what the pod log shows, and fetch_results keeps as output.log
    assert "inputs ready: 2 object(s)" in user and "outputs uploaded" in user
    # the endpoint and the key pair are in no object meshrun made, no file it wrote, and not in the pod log
    needles = [*s3.needles, s3.endpoint]
    secret = mf.render_secret(m, job_id=sub.job_id, files=files)
    made = json.dumps([m.workload, secret]) + b.native(sub) + "".join(v.decode("latin-1") for v in files.values())
    assert [n for n in needles if n in made] == []
    assert [n for n in needles if n in log + p.stderr.decode()] == []
    assert files_holding([sub.job_dir, job, workdir], needles) == []


def test_a_data_job_whose_image_lacks_boto3_fails_saying_what_to_do(tmp_path, make_submission, s3):
    bare = tmp_path / "bare-python"  # the same Python without its site-packages: no boto3
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S -I \"$@\"\n")
    bare.chmod(0o755)
    ran = tmp_path / "ran"
    b, sub, m, files, (src, job, workdir), env = data_job(
        tmp_path, make_submission, s3, f"touch {ran}", inputs={f"s3://{s3.bucket}/x/": "x/"})
    env["MESHRUN_DATA_PYTHON"] = str(bare)
    p = subprocess.run(container_argv(m, src, job), cwd=workdir, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=120)
    assert p.returncode == 1 and not ran.exists()
    ex = json.loads(parse_block(p.stdout.decode(), NONCE)["exit.json"])
    assert ex["state"] == "failed"
    assert "boto3 is not installed" in ex["reason"] and "MESHRUN_DATA_PYTHON" in ex["reason"]


def test_a_cancelled_data_job_uploads_what_its_policy_says(tmp_path, make_submission, s3):
    started = tmp_path / "started"
    b, sub, m, files, (src, job, workdir), env = data_job(
        tmp_path, make_submission, s3, f"mkdir -p ck && echo 1 > ck/c1 && touch {started} && sleep 600",
        outputs={"ck/": {"destination": f"s3://{s3.bucket}/ck/", "on": ["cancel"]}})
    p = subprocess.Popen(container_argv(m, src, job), cwd=workdir, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)  # the kubelet, when the Job is deleted (cancel)
    out, _ = p.communicate(timeout=mf.POD_GRACE)  # within the pod's termination grace
    assert json.loads(parse_block(out.decode(), NONCE)["exit.json"])["state"] == "cancelled"
    assert s3.keys("ck/") == ["ck/c1"]
