"""The local backend with real processes: results, failures, cancel, time limits, re-attach, hostile input."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import meshrun
from meshrun import JobState

@pytest.fixture(autouse=True)
def _local_backend(monkeypatch):
    """These tests are about the local backend: pin it, whatever other backends are installed."""
    monkeypatch.setenv("MESHRUN_BACKEND", "local")


HOSTILE = [
    "it's",
    'say "hi"',
    "$(touch /tmp/meshrun-pwned)",
    "`id`",
    "a; rm -rf /tmp/nothing",
    "line1\nline2",
    "tab\there",
    "ünïcødé ✓ 日本",
    "--flag=--other",
    "  leading and trailing  ",
    "back\\slash",
    "$HOME ${PATH} %s %n",
    "*",
    "",
]


@meshrun.job(cpus=1)
def add(a, b):
    print(f"adding {a} and {b}")
    return a + b


@meshrun.job
def explode(msg):
    raise KeyError(msg)


def test_plain_call_runs_in_process():
    assert add(2, 3) == 5
    assert add.__name__ == "add"


def test_function_job_result_and_logs():
    job = add.submit(2, 3)
    assert isinstance(job, meshrun.Job)
    assert job.result(timeout=60) == 5
    assert job.status() is JobState.SUCCEEDED
    assert "adding 2 and 3" in job.logs()
    assert job.done()


def test_failure_carries_the_remote_traceback():
    job = explode.submit("missing")
    with pytest.raises(meshrun.JobFailed) as e:
        job.result(timeout=60)
    assert e.value.remote_type == "KeyError"
    assert "raise KeyError(msg)" in e.value.remote_traceback
    assert "Remote traceback" in str(e.value)
    assert job.status() is JobState.FAILED


def test_command_failure_shows_exit_code_and_output():
    job = meshrun.run(["bash", "-c", "echo about to fail; exit 7"], name="failing")
    with pytest.raises(meshrun.JobFailed) as e:
        job.result(timeout=60)
    assert e.value.exit_code == 7
    assert "about to fail" in str(e.value)
    assert job.record.reason == "exited with code 7"


def test_command_not_found_is_a_clear_failure():
    job = meshrun.run(["/no/such/program", "x"])
    with pytest.raises(meshrun.JobFailed) as e:
        job.result(timeout=60)
    assert "failed to start" in str(e.value) and "/no/such/program" in str(e.value)


def test_map_and_gather():
    jobs = add.map([1, 2, 3], [10, 20, 30])
    assert len(jobs) == 3
    assert meshrun.gather(jobs, timeout=60) == [11, 22, 33]
    assert len({j.record.array_id for j in jobs}) == 1


def test_job_is_awaitable():
    async def main():
        return await add.submit(20, 22)

    assert asyncio.run(main()) == 42


def test_hostile_strings_reach_the_job_byte_for_byte(tmp_path):
    out = tmp_path / "seen.json"
    script = (
        "import json, os, sys; "
        "json.dump({'argv': sys.argv[1:], 'env': {k: os.environ[k] for k in os.environ if k.startswith('H_')}, "
        f"'name': os.environ.get('MESHRUN_JOB_NAME')}}, open({str(out)!r}, 'w'))"
    )
    env = {f"H_{i}": v for i, v in enumerate(HOSTILE)}
    name = "n'a\"m$(e)\n;`x` ✓"
    job = meshrun.run([sys.executable, "-c", script, *HOSTILE], env=env, name=name)
    assert job.result(timeout=60) == 0
    seen = json.loads(out.read_text())
    assert seen["argv"] == HOSTILE
    assert seen["env"] == env
    assert seen["name"] == name
    assert job.name == name
    assert not os.path.exists("/tmp/meshrun-pwned")


def test_hostile_strings_in_function_arguments():
    @meshrun.job
    def echo(*args, **kwargs):
        return args, kwargs

    args = tuple(HOSTILE)
    kwargs = {"x": "\x01\x02 $(y)"}
    assert echo.submit(*args, **kwargs).result(timeout=60) == (args, kwargs)


def test_shell_string_commands_run_with_bash(tmp_path):
    job = meshrun.run(f"echo one > {tmp_path}/a && echo two >> {tmp_path}/a")
    job.result(timeout=60)
    assert (tmp_path / "a").read_text() == "one\ntwo\n"


def test_setup_workdir_and_files(tmp_path):
    src = tmp_path / "data.txt"
    src.write_text("payload")
    work = tmp_path / "work"
    work.mkdir()
    job = meshrun.run(["bash", "-c", "cat setup.out in/data.txt; pwd"], workdir=str(work),
                      setup=["echo 'set up' > setup.out"], files={"in/data.txt": str(src)})
    job.result(timeout=60)
    out = job.logs()
    assert "set up" in out and "payload" in out and str(work) in out


def test_failed_setup_fails_the_job():
    job = meshrun.run(["echo", "never"], setup=["exit 4"])
    with pytest.raises(meshrun.JobFailed) as e:
        job.result(timeout=60)
    assert e.value.exit_code == 4
    assert "never" not in job.logs()


def test_missing_file_source_is_a_spec_error(tmp_path):
    with pytest.raises(meshrun.SpecError) as e:
        meshrun.run(["true"], files={"x": str(tmp_path / "absent")})
    assert e.value.field == "files.x"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_cancel_ends_children_and_grandchildren(tmp_path, helpers):
    pids = tmp_path / "pids"
    script = textwrap.dedent(
        f"""
        sleep 1000 & echo $! >> {pids}
        bash -c 'sleep 1000 & echo $! >> {pids}; sleep 1000' & echo $! >> {pids}
        python3 -c 'import os, time; os.setpgid(0, 0); open("{pids}", "a").write(str(os.getpid()) + "\\n"); time.sleep(1000)' &
        trap '' TERM   # the main script ignores SIGTERM: cancel must escalate to SIGKILL
        echo $$ >> {pids}
        wait
        """
    )
    job = meshrun.run(["bash", "-c", script], env={"X": "1"})
    helpers.wait_until(lambda: pids.exists() and len(pids.read_text().split()) >= 5, 30, what="children to start")
    time.sleep(0.2)
    started = [int(p) for p in pids.read_text().split()]
    assert all(_alive(p) for p in started)
    spec_grace = 1.0
    meshrun.get_backend("local").settings  # the grace period is the backend's; cancel waits for it
    t0 = time.monotonic()
    job.cancel()
    assert job.status() is JobState.CANCELLED
    helpers.wait_until(lambda: not any(_alive(p) for p in started), 20, what="every process of the job to end")
    assert time.monotonic() - t0 < 60
    with pytest.raises(meshrun.JobCancelled):
        job.result(timeout=5)
    del spec_grace


def test_time_limit_stops_the_job_and_reports_timeout(tmp_path, helpers):
    marker = tmp_path / "child"
    job = meshrun.run(["bash", "-c", f"sleep 1000 & echo $! > {marker}; wait"], time_limit=1)
    with pytest.raises(meshrun.JobTimeout) as e:
        job.result(timeout=60)
    assert job.status() is JobState.TIMEOUT
    assert "time limit" in str(e.value)
    helpers.wait_until(lambda: not _alive(int(marker.read_text())), 10, what="the child to be killed")


SUBMITTER = textwrap.dedent(
    """
    import os, sys, time
    import meshrun

    def slow(x):            # defined in __main__: travels by value
        time.sleep(float(os.environ.get("SLOW", "2")))
        return {"x": x, "pid": os.getpid()}

    job = meshrun.JobFunction(slow, {"name": "survivor"}).submit(42)
    print(job.id, flush=True)
    time.sleep(1000)        # killed with SIGKILL by the test while the job runs
    """
)


def test_kill_9_of_the_submitter_then_reattach_gets_the_result(tmp_path):
    script = tmp_path / "submitter.py"
    script.write_text(SUBMITTER)
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "SLOW": "1.5"})
    job_id = p.stdout.readline().strip()
    assert job_id
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    job = meshrun.Job.attach(job_id)
    assert job.name == "survivor"
    result = job.result(timeout=60)
    assert result["x"] == 42 and result["pid"] != p.pid
    assert meshrun.Job.attach(job_id[:8]).id == job_id  # a unique prefix of the id will do


def test_supervisor_killed_means_lost_not_running():
    job = meshrun.run(["sleep", "1000"])
    st = _wait_state(job, JobState.RUNNING)
    rec = json.loads((job.job_dir / "state.json").read_text())
    os.kill(rec["pid"], signal.SIGKILL)
    st = _wait_state(job, JobState.LOST)
    assert "died without writing an exit record" in job.record.reason
    with pytest.raises(meshrun.JobLost):
        job.result(timeout=5)
    # the job's own process died with its supervisor (no orphan left on the machine)
    assert not _alive(rec["child"]) or _wait_dead(rec["child"])
    del st


def _wait_dead(pid: int, timeout: float = 10) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _wait_state(job: meshrun.Job, state: JobState, timeout: float = 30) -> JobState:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = job.status()
        if st is state:
            return st
        time.sleep(0.02)
    raise AssertionError(f"job {job.id} did not reach {state} (is {job.status()}: {job.record.reason})")


def test_logs_follow_streams_until_the_end():
    job = meshrun.run(["bash", "-c", "for i in 1 2 3; do echo line $i; sleep 0.2; done"])
    chunks = list(job.logs(follow=True))
    assert "".join(chunks).split() == ["line", "1", "line", "2", "line", "3"]
    assert job.status() is JobState.SUCCEEDED


def test_version_mismatch_is_a_clear_failure():
    job = add.submit(1, 1)
    job.wait(60)
    # re-run the same payload with a header claiming another Python
    d = job.job_dir
    payload = (d / "payload.pkl").read_bytes()
    header, body = payload.split(b"\n", 1)
    stamp = json.loads(header)
    stamp["python"] = "2.7"
    spec = meshrun.JobSpec(function=add.__meshrun_function__, args=(1, 1))
    job2 = meshrun.submit(spec.replace(name="mismatch"), backend="local")
    job2.wait(60)
    (job2.job_dir / "payload.pkl").write_bytes(json.dumps(stamp).encode() + b"\n" + body)
    for f in ("exit.json", "state.json", "result.pkl", ".started"):
        (job2.job_dir / f).unlink(missing_ok=True)
    from meshrun import _agent

    subprocess.run([sys.executable, _agent.__file__, "run", str(job2.job_dir)], check=False, timeout=60)
    err = json.loads((job2.job_dir / "error.json").read_text())
    assert err["type"] == "VersionMismatch"
    assert "Python 2.7" in err["message"] and "cloudpickle" in err["message"]


def test_job_keeps_running_after_the_submitter_exits(tmp_path):
    out = tmp_path / "done"
    code = (f"import meshrun; j = meshrun.run(['bash', '-c', 'sleep 1; echo ok > {out}']); print(j.id)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    job_id = r.stdout.strip()
    assert r.returncode == 0, r.stderr
    job = meshrun.Job.attach(job_id)
    assert job.result(timeout=60) == 0
    assert out.read_text() == "ok\n"


def test_job_repr_and_html():
    job = add.submit(1, 2)
    job.result(timeout=60)
    assert job.id in repr(job) and "succeeded" in repr(job)
    html = job._repr_html_()
    assert "meshrun.Job" in html and job.id in html and "succeeded" in html


def test_no_zombies_left_by_many_jobs():
    jobs = [meshrun.run(["true"]) for _ in range(10)]
    meshrun.wait(jobs, timeout=60)
    time.sleep(0.3)
    me = os.getpid()
    zombies = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] == "Z" and int(fields[1]) == me:
                zombies.append(int(name))
    assert zombies == []


def test_retries_resubmit_a_failed_job_and_keep_each_attempts_output(tmp_path):
    marker = tmp_path / "tried"
    job = meshrun.run(["bash", "-c", f"if [ -e {marker} ]; then echo second; else touch {marker}; echo first; exit 3; fi"],
                      retries=2, name="flaky")
    assert job.result(timeout=60) == 0
    rec = job.record
    assert rec.attempt == 2
    assert [h["event"] for h in rec.history].count("retry") == 1
    assert "first" in (job.job_dir / "attempts" / "1" / "output.log").read_text()
    assert job.logs().strip() == "second"
    always = meshrun.run(["bash", "-c", "exit 5"], retries=2)
    with pytest.raises(meshrun.JobFailed) as e:
        always.result(timeout=60)
    assert e.value.exit_code == 5
    assert always.record.attempt == 3
    assert [h["event"] for h in always.record.history].count("retry") == 2


def test_status_is_a_read_and_the_retry_happens_where_the_job_is_advanced(tmp_path):
    from meshrun.testing import wait_until

    marker = tmp_path / "tried"
    job = meshrun.run(["bash", "-c", f"if [ -e {marker} ]; then echo second; else touch {marker}; exit 3; fi"],
                      retries=1, name="flaky")
    # the first attempt fails; reading the status says so, and that a retry is due, but resubmits nothing
    wait_until(lambda: "a retry is due" in (job.refresh().reason or ""), timeout=60,
               what="the first attempt to fail")
    for _ in range(3):
        assert not job.done() and "attempt 1 failed" in (job.reason or "")
    assert [h["event"] for h in job.history].count("retry") == 0 and job.record.attempt == 1
    assert (job.job_dir / "exit.json").exists()  # the failed attempt's records are where it left them
    # advancing the job (what wait() does every round) archives the attempt and submits it again
    job.advance()
    assert [h["event"] for h in job.history].count("retry") == 1 and job.record.attempt == 2
    assert job.result(timeout=60) == 0 and job.logs().strip() == "second"
    assert (job.job_dir / "attempts" / "1" / "exit.json").exists()


def test_cancel_of_a_job_whose_retry_is_due_ends_it_without_the_retry():
    from meshrun.testing import wait_until

    job = meshrun.run(["bash", "-c", "exit 3"], retries=2)
    wait_until(lambda: "a retry is due" in (job.refresh().reason or ""), timeout=60, what="the attempt to fail")
    job.cancel()
    assert job.status() is JobState.CANCELLED and "before its retry" in (job.reason or "")
    job.advance()
    assert job.record.attempt == 1 and [h["event"] for h in job.history].count("retry") == 0


def test_a_job_that_starts_within_a_slow_submit_is_submitted_before_it_runs(monkeypatch):
    """The history is in time order: a backend that starts the job inside submit() (local, ssh) and returns late
    must still show 'submitted' before 'running' (the submit is stamped when the hand-over began)."""
    from meshrun._local import LocalBackend
    from meshrun.testing import wait_until

    real = LocalBackend.submit

    def slow_submit(self, sub, offer=None):
        bid = real(self, sub, offer)
        wait_until(lambda: (sub.job_dir / "state.json").exists(), timeout=60, what="the job's start")
        time.sleep(0.3)  # returns well after the job started, as a loaded machine or a slow link would
        return bid

    monkeypatch.setattr(LocalBackend, "submit", slow_submit)
    job = meshrun.run(["bash", "-c", "sleep 1"], retries=1)
    assert job.wait(timeout=60) is meshrun.JobState.SUCCEEDED
    events = [h["event"] for h in job.history]
    assert events.index("submitted") < events.index("running"), events


def test_a_cpu_job_is_placed_without_asking_for_the_gpu_inventory(monkeypatch):
    """The local backend is always there (``always_available``): placement asks its offers straight away, and a
    job without GPUs places without running nvidia-smi/amd-smi (tens of milliseconds); a GPU job still asks."""
    from meshrun import _agent
    from meshrun._local import LocalBackend

    asked = []
    real = _agent.discover_gpus
    monkeypatch.setattr(_agent, "discover_gpus", lambda env=None: asked.append(1) or real(env))
    monkeypatch.setattr(LocalBackend, "check", lambda self: pytest.fail("placement called local check()"))
    p = meshrun.plan(meshrun.JobSpec(command=["true"], cpus=1), backends=["local"])
    assert p.chosen is not None and p.chosen.backend == "local" and asked == []
    meshrun.plan(meshrun.JobSpec(command=["true"], gpus=1), backends=["local"], raise_on_empty=False)
    assert asked, "a GPU job's offer must come from the GPU inventory"


def test_following_a_local_job_wakes_when_its_supervisor_exits(helpers):
    """What `meshrun run` and `logs -f` wait on between looks at a local job: its supervisor's pidfd, which
    is readable as the supervisor exits, right after it wrote the exit record; a wait for it does not last its
    whole timeout. Once it fired (or where there is none) waits only sleep."""
    from meshrun import _agent

    job = meshrun.run(["sleep", "1"])
    w = _agent.ExitWatch(job.job_dir)
    if w.spent:
        pytest.skip("no pidfd here (Linux 5.3+, Python 3.9+): waits only sleep")
    helpers.wait_until(lambda: (w.wait(0.01), w.fd)[1] is not None, what="the supervisor's pid in state.json")
    t0 = time.monotonic()
    w.wait(120)
    assert time.monotonic() - t0 < 60 and (job.job_dir / "exit.json").exists()
    assert w.fd is None  # fired and closed: from here on it only sleeps
    t0 = time.monotonic()
    w.wait(0.2)
    assert time.monotonic() - t0 >= 0.2
    assert job.wait(timeout=60) is JobState.SUCCEEDED
