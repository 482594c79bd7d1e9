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
