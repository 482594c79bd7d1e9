"""Job records, read as they are on disk: logs from the end (tail, byte caps, follow, failure tails of
gigabyte logs), the history at the agent's own times, a complete result outliving a lost exit record, and the
clean-up of what interrupted writes leave behind. Real jobs, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from meshrun.testing import run_cli, wait_until

import meshrun
from meshrun import JobState

MESHRUN = [sys.executable, "-m", "meshrun"]


@pytest.fixture(autouse=True)
def _local_backend(monkeypatch):
    monkeypatch.setenv("MESHRUN_BACKEND", "local")


cli = run_cli


def wait_for(pred, timeout: float = 60.0, what: str = "condition"):
    return wait_until(pred, timeout, what=what)


def read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ---- logs from the end ---------------------------------------------------------------------------


GIANT_LOG_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, sys
    import meshrun

    # one line of 1 GB (sparse: made with ftruncate on the job's stdout) and then a progress bar's last
    # states and the error, as a training script that writes \\r-progress would leave it
    code = (
        "import os, sys\\n"
        "os.ftruncate(1, 1 << 30)\\n"
        "sys.stdout.write('\\\\r'.join('step %d' % i for i in range(5000)) + '\\\\rstep 5000 100%\\\\n')\\n"
        "sys.stdout.write('RuntimeError: boom\\\\n')\\n"
        "sys.stdout.flush()\\n"
        "sys.exit(1)\\n"
    )
    job = meshrun.run([sys.executable, "-c", code], name="giant-log")
    job.wait(timeout=120)
    size = os.path.getsize(job.job_dir / "output.log")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        job.result()
        msg, kind = "", "none"
    except meshrun.JobFailed as e:
        msg, kind = str(e), type(e).__name__
    tail = job.logs(tail=1)
    capped = job.logs(max_bytes=64)
    short = job.log_tail(5)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"id": job.id, "size": size, "kind": kind, "msg": msg, "tail": tail, "capped": capped,
                      "short_len": len(short), "rss_growth_kib": after - before}))
    """
)


def test_a_1gb_single_line_log_gives_a_short_failure_message_in_little_memory(tmp_path):
    p = subprocess.run([sys.executable, "-c", GIANT_LOG_SCRIPT], capture_output=True, text=True, timeout=240,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["size"] > 1 << 30
    assert out["kind"] == "JobFailed"
    msg = out["msg"]
    assert len(msg) < 10_000
    assert "exited with code 1" in msg
    assert "RuntimeError: boom" in msg
    assert "step 5000 100%" in msg  # the progress bar's last state
    assert "step 4999" not in msg and "\r" not in msg  # overwritten states collapsed
    assert out["tail"] == "RuntimeError: boom\n"
    assert out["capped"].endswith("step 5000 100%\nRuntimeError: boom\n") and len(out["capped"]) <= 64
    assert out["short_len"] <= 4000 + 10
    # reading the end of a 1 GB log must not load it: a generous bound, not a timing
    assert out["rss_growth_kib"] < 200 * 1024, out["rss_growth_kib"]
    # and the command line reads from the end too
    assert cli("logs", "--tail", "1", out["id"]).stdout == "RuntimeError: boom\n"
    assert cli("logs", "--max-bytes", "19", out["id"]).stdout == "RuntimeError: boom\n"
    bad = cli("logs", "--max-bytes", "lots", out["id"], check=False)
    assert bad.returncode == 2 and "--max-bytes" in bad.stderr and "Traceback" not in bad.stderr


def test_logs_tail_lines_and_byte_caps():
    job = meshrun.run(["bash", "-c", "for i in $(seq 1 1000); do echo $i; done"], name="counting")
    assert job.wait(timeout=60) is JobState.SUCCEEDED
    assert job.logs(tail=3) == "998\n999\n1000\n"
    assert job.logs(tail=0) == ""
    assert job.logs(max_bytes=5) == "1000\n"
    assert job.logs(tail=3, max_bytes=9) == "999\n1000\n"  # whichever is shorter
    assert job.logs(tail=5000) == job.logs()
    assert job.logs().count("\n") == 1000
    assert cli("logs", "-n", "2", job.id).stdout == "999\n1000\n"
    for bad in ({"tail": -1}, {"tail": "3"}, {"max_bytes": -5}, {"tail": True}):
        with pytest.raises(meshrun.SpecError) as e:
            job.logs(**bad)
        assert next(iter(bad)) in str(e.value)


def test_follow_with_tail_starts_at_the_end_and_keeps_going(tmp_path):
    flag = tmp_path / "go"
    script = f"for i in $(seq 1 500); do echo old $i; done; while [ ! -e {flag} ]; do sleep 0.02; done; echo new 1; echo new 2"
    job = meshrun.run(["bash", "-c", script], name="follower")
    wait_for(lambda: "old 500" in job.logs(tail=1), what="the first part of the output")
    chunks = job.logs(follow=True, tail=2)
    got = next(chunks)
    assert got.startswith("old 499\nold 500\n") and "old 498" not in got
    flag.touch()
    rest = "".join(chunks)
    assert (got + rest).endswith("new 1\nnew 2\n")
    assert job.wait(timeout=60) is JobState.SUCCEEDED


def test_failure_message_collapses_progress_and_is_capped_in_characters():
    script = r"printf 'epoch 1: 10%%\repoch 1: 50%%\repoch 1: 100%%\n'; head -c 20000 /dev/zero | tr '\0' x; echo; echo 'ValueError: bad lr'; exit 3"
    job = meshrun.run(["bash", "-c", script], name="progress")
    with pytest.raises(meshrun.JobFailed) as e:
        job.result(timeout=60)
    msg = str(e.value)
    assert "ValueError: bad lr" in msg and "exited with code 3" in msg
    assert len(msg) < 4000 + 500  # characters, not lines: the 20,000-character line is cut
    assert "\r" not in msg
    quick = meshrun.run(["bash", "-c", r"printf 'a 10%%\ra 100%%\nthe end\n'; exit 2"], name="short-progress")
    with pytest.raises(meshrun.JobFailed) as e:
        quick.result(timeout=60)
    assert "a 100%\nthe end" in str(e.value) and "a 10%" not in str(e.value)


# ---- history at the agent's own times ------------------------------------------------------------


def test_history_uses_the_times_the_agent_recorded(tmp_path):
    flag = tmp_path / "finish"
    job = meshrun.run(["bash", "-c", f"while [ ! -e {flag} ]; do sleep 0.02; done"], name="timed")
    state_file = job.job_dir / "state.json"
    st = wait_for(lambda: (lambda s: s if s and s.get("state") == "running" else None)(read_json(state_file)),
                  what="the agent to record running")
    time.sleep(0.3)  # look later than the start, so a poll time would differ from the agent's
    assert job.status() is JobState.RUNNING
    running = [h for h in job.history if h["event"] == "running"]
    assert running and running[0]["time"] == st["started_at"]
    assert job.record.started_at == st["started_at"]
    flag.touch()
    ex = wait_for(lambda: read_json(job.job_dir / "exit.json"), what="the exit record")
    time.sleep(0.3)
    assert job.wait(timeout=60) is JobState.SUCCEEDED
    ended = [h for h in job.history if h["event"] == "succeeded"]
    assert ended and ended[0]["time"] == ex["ended_at"]
    assert job.record.ended_at == ex["ended_at"]
    times = [h["time"] for h in job.history]
    assert times == sorted(times)
    shown = json.loads(cli("status", "--json", job.id).stdout)["history"]
    assert [h["time"] for h in shown if h["event"] in ("running", "succeeded")] == [st["started_at"], ex["ended_at"]]


def test_a_job_that_ended_before_anyone_looked_still_gets_its_running_time():
    job = meshrun.run(["bash", "-c", "echo quick"], name="unseen")
    ex = wait_for(lambda: read_json(job.job_dir / "exit.json"), what="the exit record")
    time.sleep(0.2)
    assert job.wait(timeout=60) is JobState.SUCCEEDED
    events = {h["event"]: h["time"] for h in job.history}
    assert events["running"] == ex["started_at"] and events["succeeded"] == ex["ended_at"]


# ---- a complete result outlives a missing exit record --------------------------------------------


@meshrun.job
def forty_two():
    return {"answer": 42}


def _end_without_exit_record(job) -> None:
    """What a supervisor killed between the worker's end and its exit record leaves: the result and a
    running state record of a dead supervisor, no exit record."""
    wait_for(lambda: (job.job_dir / "exit.json").exists(), what="the exit record")
    st = read_json(job.job_dir / "state.json")
    wait_for(lambda: not Path(f"/proc/{st['pid']}").exists(), what="the supervisor to end")
    (job.job_dir / "exit.json").unlink()
    st["state"] = "running"
    (job.job_dir / "state.json").write_text(json.dumps(st))


def test_a_complete_result_is_returned_when_the_exit_record_is_missing():
    job = forty_two.submit()
    _end_without_exit_record(job)
    assert job.result(timeout=60) == {"answer": 42}
    assert job.status() is JobState.SUCCEEDED
    assert "result is complete" in job.reason


def test_a_torn_result_without_exit_record_is_still_lost():
    job = forty_two.submit()
    _end_without_exit_record(job)
    res = job.job_dir / "result.pkl"
    res.write_bytes(res.read_bytes()[:-1])
    with pytest.raises(meshrun.JobLost) as e:
        job.result(timeout=60)
    assert "died without writing an exit record" in str(e.value)


# ---- leftovers of interrupted writes -------------------------------------------------------------


def test_temp_files_of_dead_writers_are_cleaned_when_the_job_ends(tmp_path):
    flag = tmp_path / "finish"
    job = meshrun.run(["bash", "-c", f"while [ ! -e {flag} ]; do sleep 0.02; done"], name="leftovers")
    wait_for(lambda: (job.job_dir / "state.json").exists(), what="the job to start")
    old = time.time() - 3600
    stale = job.job_dir / f"exit.json.tmp.{dead_pid()}"
    stale_store = job.job_dir / f".spec.json.tmp.{dead_pid()}"
    live = job.job_dir / f"state.json.tmp.{os.getpid()}"
    fresh = job.job_dir / f"result.pkl.tmp.{dead_pid()}"
    for p in (stale, stale_store, live, fresh):
        p.write_text("partial")
    for p in (stale, stale_store, live):
        os.utime(p, (old, old))
    flag.touch()
    assert job.wait(timeout=60) is JobState.SUCCEEDED
    assert not stale.exists() and not stale_store.exists()
    assert live.exists()  # its writer is alive
    assert fresh.exists()  # too young to tell (a writer elsewhere on a shared filesystem)
    assert not (job.job_dir / "exit.json.reserve").exists()  # the exit record's reserved room is given back


def test_the_exit_records_reserved_room_is_gone_before_the_record_appears(tmp_path, monkeypatch):
    """A reader that sees the exit record (the job has ended) never sees the reserved room still there: it is
    removed before the record is renamed into place, not after."""
    from meshrun import _agent

    d = tmp_path / "job"
    d.mkdir()
    (d / "launch.json").write_text(json.dumps({"job_id": "j", "kind": "command", "argv": ["true"]}))
    sup = _agent.Supervisor(str(d))
    sup._reserve_exit()
    assert (d / "exit.json.reserve").exists()
    seen = []
    real_replace = os.replace

    def replace(src, dst):  # what a reader sees at the moment the record appears
        if str(dst) == str(d / "exit.json"):
            seen.append((d / "exit.json.reserve").exists())
        return real_replace(src, dst)

    monkeypatch.setattr(_agent.os, "replace", replace)
    sup._exit("succeeded", 0)
    monkeypatch.undo()
    assert seen == [False]
    assert json.loads((d / "exit.json").read_text())["state"] == "succeeded"
    assert not (d / "exit.json.reserve").exists()
