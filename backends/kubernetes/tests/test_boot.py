"""The container side of a function job, run here as the pod would run it: the Secret's files in a
read-only folder, ``python3 boot.py IN JOB``, the pod log on stdout. The submitter's side then reads
the result back from that log exactly as it reads a real pod's log."""

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

from meshrun_kubernetes import KubernetesBackend
from meshrun_kubernetes._results import ResultBlockError, ResultFilter, parse_block, strip_blocks

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
    return src, tmp_path / "job", workdir


def run_boot(src, job, workdir, env=None, timeout=60):
    e = {k: v for k, v in os.environ.items() if not k.startswith("MESHRUN_")}
    e.update({"GREETING": "hi $(x)", "PYTHONUNBUFFERED": "1"})
    e.update(env or {})
    return subprocess.run([sys.executable, str(src / "boot.py"), str(src), str(job)], cwd=workdir, env=e,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)


def test_success_result_comes_back_through_the_log(tmp_path, make_submission):
    def work(x, y=1):
        import os

        print("working on", x, "in", os.getcwd(), os.environ["GREETING"], flush=True)
        return {"sum": x + y, "bytes": b"\x00\xff" * 10}

    src, job, workdir = stage(tmp_path, make_submission, work, 41, y=1)
    p = run_boot(src, job, workdir)
    log = p.stdout.decode()
    assert p.returncode == 0, (log, p.stderr.decode())
    files = parse_block(log, NONCE)
    assert pickle.loads(files["result.pkl"]) == {"sum": 42, "bytes": b"\x00\xff" * 10}
    assert json.loads(files["exit.json"])["state"] == "succeeded"
    user = strip_blocks(log)
    assert f"working on 41 in {workdir} hi $(x)" in user and "meshrun-result" not in user


def test_exception_becomes_error_json(tmp_path, make_submission):
    def boom():
        raise ValueError("bad learning rate")

    src, job, workdir = stage(tmp_path, make_submission, boom)
    p = run_boot(src, job, workdir)
    assert p.returncode == 1
    files = parse_block(p.stdout.decode(), NONCE)
    err = json.loads(files["error.json"])
    assert err["type"] == "ValueError" and "bad learning rate" in err["traceback"]
    assert isinstance(pickle.loads(files["error.pkl"]), ValueError)
    assert "result.pkl" not in files


def test_result_too_large_fails_without_retry(tmp_path, make_submission):
    def big():
        return "x" * 100_000

    src, job, workdir = stage(tmp_path, make_submission, big, result_max=4096)
    p = run_boot(src, job, workdir)
    assert p.returncode == 3  # the Job's podFailurePolicy fails the Job at once on 3
    files = parse_block(p.stdout.decode(), NONCE)
    assert json.loads(files["error.json"])["type"] == "ResultTooLarge"
    assert json.loads(files["exit.json"])["state"] == "failed"


def test_version_mismatch_fails_without_retry(tmp_path, make_submission):
    def f():
        return 1

    src, job, workdir = stage(tmp_path, make_submission, f, data=payload(f, python="2.7"))
    p = run_boot(src, job, workdir)
    assert p.returncode == 3
    err = json.loads(parse_block(p.stdout.decode(), NONCE)["error.json"])
    assert err["type"] == "VersionMismatch" and "2.7" in err["message"]


def test_node_rank_from_the_environment(tmp_path, make_submission):
    def rank():
        import os

        return (os.environ["NODE_RANK"], os.environ["NNODES"], os.environ["MASTER_ADDR"])

    src, job, workdir = stage(tmp_path, make_submission, rank, nodes=2)
    p = run_boot(src, job, workdir, env={"NODE_RANK": "1"})
    assert p.returncode == 0, p.stdout.decode()
    files = parse_block(p.stdout.decode(), NONCE)
    assert pickle.loads(files["result.pkl"]) == ("1", "2", "meshrun-0a1b2c3d4e5f-0.meshrun-0a1b2c3d4e5f.ml.svc")
    assert (job / "result.rank1.pkl").exists()


def test_sigterm_stops_the_job_and_still_reports(tmp_path, make_submission):
    def sleepy():
        import time

        print("started", flush=True)
        time.sleep(60)

    src, job, workdir = stage(tmp_path, make_submission, sleepy)
    e = {k: v for k, v in os.environ.items() if not k.startswith("MESHRUN_")}
    p = subprocess.Popen([sys.executable, str(src / "boot.py"), str(src), str(job)], cwd=workdir, env=e,
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


def test_forged_and_truncated_blocks():
    body_log = "hello\n==== meshrun-result begin deadbeef\nAAAA\n==== meshrun-result end deadbeef sha256=" + "0" * 64
    assert parse_block(body_log, NONCE) is None  # another nonce: printed by the job, not by meshrun
    with pytest.raises(ResultBlockError):
        parse_block(f"==== meshrun-result begin {NONCE}\nAAAA\n", NONCE)
    with pytest.raises(ResultBlockError):
        parse_block(f"==== meshrun-result begin {NONCE}\neyJhIjogMX0=\n==== meshrun-result end {NONCE} sha256="
                    + "1" * 64 + "\n", NONCE)


def test_streaming_filter_hides_blocks_across_chunk_boundaries():
    log = ("epoch 1\nepoch 2 no newline yet", " done\n\n==== meshrun-result begin abc\nQUJD\nREVG\n",
           "==== meshrun-result end abc sha256=00\n")
    f = ResultFilter()
    out = "".join(f.feed_all(log))
    assert out == "epoch 1\nepoch 2 no newline yet done\n"
    text = "".join(log)
    for cut in range(1, len(text)):
        assert "".join(ResultFilter().feed_all([text[:cut], text[cut:]])) == out
    assert strip_blocks("a\n\nb\n") == "a\n\nb\n"  # blank lines of the job's own output stay
