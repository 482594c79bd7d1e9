"""A job is everything it started: containment by a cgroup of the job's own where one can be had, by the
supervisor (a child subreaper plus the job's marker in the environment) where not. Real processes escape
every way they can (setsid, double fork, nohup + disown, a daemon that closes its fds and changes session
and process group, 1000 children); after cancel, a time limit, or the main process simply exiting, none
of them may live, and the job's GPU lease must be released only after they are all gone.

Both mechanisms are tested on this machine: ``MESHRUN_CONTAINMENT=subreaper`` forces the fallback, and the
cgroup tests run where a cgroup v2 can be had (as root, or in a delegated subtree).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from meshrun.testing import wait_until as _wait_until

import meshrun
import meshrun.backend as mb
from meshrun import JobState, _agent

CAN_CGROUP = _agent.delegated_cgroup()[0] is not None
MECHANISMS = [
    pytest.param("cgroup", marks=pytest.mark.skipif(not CAN_CGROUP, reason="no cgroup v2 can be had here")),
    "subreaper",
]

ESCAPE = textwrap.dedent(
    """
    import os, signal, sys, time

    mode, pidfile = sys.argv[1], sys.argv[2]

    def hold():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
        with open(pidfile, "a") as f:
            f.write("%d %s\\n" % (os.getpid(), mode))
        while True:
            time.sleep(1000)

    if mode == "plain":          # started with nohup ... & disown by the job's shell
        hold()
    elif mode == "setsid":       # a child in a session of its own
        if os.fork() == 0:
            os.setsid()
            hold()
    elif mode == "double":       # double fork: the grandchild is orphaned at once
        if os.fork() == 0:
            if os.fork() == 0:
                hold()
            os._exit(0)
        os.wait()
    elif mode == "daemon":       # a classic daemon: new session, new process group, every fd closed
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.chdir("/")
                os.umask(0)
                os.closerange(0, 4096)
                os.open(os.devnull, os.O_RDWR)
                os.dup2(0, 1)
                os.dup2(0, 2)
                os.setpgid(0, 0)
                hold()
            os._exit(0)
        os.wait()
    """
)


@pytest.fixture(autouse=True)
def _local(monkeypatch):
    monkeypatch.setenv("MESHRUN_BACKEND", "local")
    monkeypatch.setenv("MESHRUN_GPUS", "0")  # one declared (fake) GPU to lease
    monkeypatch.setenv("MESHRUN_LOCAL_GRACE_PERIOD", "1")


@pytest.fixture(autouse=True)
def _no_survivors(tmp_path):
    """Whatever a failing test leaves behind is killed here (a passing one leaves nothing)."""
    yield
    pidfile = tmp_path / "pids"
    if not pidfile.exists():
        return
    mark = f"MESHRUN_JOB_DIR={tmp_path}".encode()
    for line in pidfile.read_text().splitlines():
        try:
            pid = int(line.split()[0])
            with open(f"/proc/{pid}/environ", "rb") as f:
                if mark in f.read():  # still one of this test's job processes, not a later one with its pid
                    os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


@pytest.fixture
def mechanism(request, monkeypatch):
    monkeypatch.setenv("MESHRUN_CONTAINMENT", request.param)
    return request.param


def wait_until(pred, timeout=30.0, what="condition"):
    return _wait_until(pred, timeout, what=what)


def lease_held(job_id: str) -> bool:
    """Whether the job holds a GPU lease: a hold file of its in the lease directory, in state "leased" (its
    supervisor removes it when it gives the lease back)."""
    for hold in Path(os.environ["MESHRUN_LEASE_DIR"]).glob("hold-*.json"):
        rec = _agent.read_json(str(hold)) or {}
        if rec.get("job_id") == job_id and rec.get("state") == "leased":
            return True
    return False


def read_pids(path: Path) -> dict[int, int]:
    """pid -> start time of every process listed in ``path`` (start time tells it from a later pid)."""
    out = {}
    for line in path.read_text().splitlines():
        pid = int(line.split()[0])
        out[pid] = _agent.proc_start(pid)
    return out


def alive(pids: dict[int, int]) -> list[int]:
    return [p for p, s in pids.items() if s is not None and _agent.pid_alive(p, s)]


def escape_script(tmp_path: Path, pidfile: Path, n: int, then: str) -> str:
    esc = tmp_path / "escape.py"
    esc.write_text(ESCAPE)
    py = sys.executable
    return textwrap.dedent(
        f"""
        {py} {esc} setsid {pidfile}
        {py} {esc} double {pidfile}
        nohup {py} {esc} plain {pidfile} >/dev/null 2>&1 & disown
        {py} {esc} daemon {pidfile}
        while [ "$(wc -l < {pidfile} 2>/dev/null || echo 0)" -lt {n} ]; do sleep 0.02; done
        {then}
        """
    )


def many_script(pidfile: Path, n: int, then: str) -> str:
    # each child ignores SIGTERM and sits in a session of its own
    return textwrap.dedent(
        f"""
        for i in $(seq {n}); do (trap '' TERM; exec setsid sleep 1000) & echo "$!" >> {pidfile}; done
        {then}
        """
    )


def watch_until_done(job, pids: dict[int, int], timeout: float = 120.0) -> None:
    """Until the job's exit record appears: whenever the lease is seen free, none of ``pids`` may live.

    The lease is read first and the processes second: a process alive at the second look was alive at
    the first one too, so the lease must have been held then."""
    exit_json = job.job_dir / "exit.json"
    end = time.monotonic() + timeout
    while not exit_json.exists():
        held = lease_held(job.id)
        left = alive(pids)
        assert held or not left, f"the GPU lease was released while {len(left)} process(es) of the job lived"
        assert time.monotonic() < end, "the job did not end"
        time.sleep(0.01)


def check_ended(job, pids: dict[int, int], mechanism: str) -> dict:
    assert not alive(pids), f"processes {alive(pids)[:10]} of the job outlived it"
    assert not lease_held(job.id)
    state = json.loads((job.job_dir / "state.json").read_text())
    assert state["containment"] == mechanism
    if mechanism == "cgroup":
        assert state["cgroup"].startswith(_agent.delegated_cgroup()[0])
        assert not os.path.exists(state["cgroup"]), "the job's cgroup was not removed"
    return state


@pytest.mark.parametrize("mechanism", MECHANISMS, indirect=True)
@pytest.mark.parametrize("how", ["cancel", "timeout", "exit"])
def test_escaped_processes_end_with_the_job(tmp_path, mechanism, how):
    pidfile = tmp_path / "pids"
    then = {"cancel": "sleep 1000", "timeout": "sleep 1000", "exit": "exit 0"}[how]
    job = meshrun.run(["bash", "-c", escape_script(tmp_path, pidfile, 4, then)], gpus=1,
                      time_limit=4 if how == "timeout" else None)
    wait_until(lambda: pidfile.exists() and len(pidfile.read_text().splitlines()) >= 4, what="escapees")
    pids = read_pids(pidfile)
    assert len(pids) == 4 and len(alive(pids)) == 4
    kinds = {line.split()[1]: int(line.split()[0]) for line in pidfile.read_text().splitlines()}
    assert set(kinds) == {"setsid", "double", "plain", "daemon"}
    # they really escaped: the setsid'd one and the daemon left the job's session, the daemon its process
    # group too, and the double-forked one was orphaned
    st = json.loads((job.job_dir / "state.json").read_text())
    assert _agent.proc_session(kinds["setsid"]) != st["sid"]
    assert _agent.proc_session(kinds["daemon"]) != st["sid"]
    assert os.getpgid(kinds["daemon"]) not in (st["sid"], _agent.proc_session(kinds["daemon"]))
    if how == "cancel":
        _agent.cancel(str(job.job_dir), wait=False)
    watch_until_done(job, pids)
    check_ended(job, pids, mechanism)
    expected = {"cancel": JobState.CANCELLED, "timeout": JobState.TIMEOUT, "exit": JobState.SUCCEEDED}[how]
    assert job.status() is expected


@pytest.mark.parametrize("mechanism", MECHANISMS, indirect=True)
@pytest.mark.parametrize("how", ["cancel", "exit"])
def test_a_thousand_children_end_with_the_job(tmp_path, mechanism, how):
    pidfile = tmp_path / "pids"
    n = 1000
    job = meshrun.run(["bash", "-c", many_script(pidfile, n, "sleep 1000" if how == "cancel" else "exit 0")],
                      gpus=1)
    wait_until(lambda: pidfile.exists() and len(pidfile.read_text().splitlines()) >= n, 120, what="children")
    pids = read_pids(pidfile)
    if how == "cancel":
        _agent.cancel(str(job.job_dir), wait=False)
    watch_until_done(job, pids, timeout=300)
    check_ended(job, pids, mechanism)


@pytest.mark.parametrize("mechanism", MECHANISMS, indirect=True)
def test_status_shows_the_containment(tmp_path, mechanism):
    job = meshrun.run(["sleep", "1000"])
    wait_until(lambda: job.status() is JobState.RUNNING, what="running")
    st = meshrun.get_backend("local").status([mb.JobRef.of(job)])[job.backend_id]
    assert st.detail["containment"] == mechanism
    out = subprocess.run([sys.executable, "-m", "meshrun", "status", job.id], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("containment")]
    assert line and mechanism in line[0], out.stdout
    gpus = subprocess.run([sys.executable, "-m", "meshrun", "gpus", "--json"], capture_output=True, text=True,
                          timeout=60)
    assert gpus.returncode == 0, gpus.stderr
    snap = next(iter(json.loads(gpus.stdout).values()))
    assert snap["containment"]["mode"] == mechanism
    job.cancel()
    assert job.status() is JobState.CANCELLED
    # the exit record keeps saying which mechanism the job ran under
    assert _agent.job_status(str(job.job_dir))["containment"] == mechanism


def test_containment_switch_is_checked(monkeypatch):
    monkeypatch.setenv("MESHRUN_CONTAINMENT", "jail")
    job = meshrun.run(["true"])
    with pytest.raises(meshrun.JobFailed, match="MESHRUN_CONTAINMENT must be one of auto, cgroup, subreaper"):
        job.result(timeout=60)


# ---- the supervisor killed: the job reads lost, and cancel still stops what it left -----------------


@pytest.mark.parametrize("mechanism", MECHANISMS, indirect=True)
def test_cancel_after_the_supervisor_was_killed(tmp_path, mechanism):
    pidfile = tmp_path / "pids"
    job = meshrun.run(["bash", "-c", escape_script(tmp_path, pidfile, 4, "sleep 1000")], gpus=1)
    wait_until(lambda: pidfile.exists() and len(pidfile.read_text().splitlines()) >= 4, what="escapees")
    pids = read_pids(pidfile)
    st = json.loads((job.job_dir / "state.json").read_text())
    os.kill(st["pid"], signal.SIGKILL)  # the OOM killer, an admin
    wait_until(lambda: job.status() is JobState.LOST, what="lost")
    assert "still run" in job.reason and "meshrun cancel" in job.reason
    assert alive(pids), "the escapees should have outlived their supervisor"
    # the job's processes hold its lease (they inherited the hold): the GPU goes to no one else meanwhile
    waiting = meshrun.run(["true"], gpus=1)
    time.sleep(1.5)
    assert not waiting.done(), "the GPU went to another job while the killed supervisor's job still ran on it"
    out = subprocess.run([sys.executable, "-m", "meshrun", "cancel", job.id], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cancelled" in out.stdout
    wait_until(lambda: not alive(pids), 20, what="the leftovers to be killed")
    # the GPU is free again: the next job gets it at once
    assert not lease_held(job.id)
    job.refresh()
    assert job.record.state is JobState.CANCELLED
    if mechanism == "cgroup":
        assert not os.path.exists(st["cgroup"])
    assert waiting.wait(timeout=60) is JobState.SUCCEEDED


# ---- cancel while the submitter died mid-submit (state "submitting") --------------------------------

DYING_SUBMITTER = textwrap.dedent(
    """
    import os, signal, sys
    import meshrun
    from meshrun import _local

    real = _local.LocalBackend.submit
    when = sys.argv[2]

    def submit(self, submission, offer=None):
        if when == "before":          # dies before the job was handed to the agent
            print(submission.job_id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        bid = real(self, submission, offer)
        print(bid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)   # the job runs; the store row never gets its backend id

    _local.LocalBackend.submit = submit
    meshrun.run(["bash", "-c", "touch %s; exec sleep 1000" % sys.argv[1]], gpus=1)
    """
)


def _die_mid_submit(tmp_path: Path, when: str) -> tuple[str, Path]:
    marker = tmp_path / "ran"
    p = subprocess.run([sys.executable, "-c", DYING_SUBMITTER, str(marker), when], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    return p.stdout.split()[0], marker


def test_cancel_stops_a_job_left_submitting(tmp_path, monkeypatch):
    from meshrun import _job

    monkeypatch.setattr(_job, "SUBMIT_PICKUP", 3600.0)  # here cancel itself must find the job, not status
    job_id, marker = _die_mid_submit(tmp_path, "after")
    job = meshrun.Job.attach(job_id)
    assert job.record.state is JobState.SUBMITTING and job.backend_id is None
    wait_until(marker.exists, what="the job to run")
    st = wait_until(lambda: _agent.read_json(str(job.job_dir / "state.json")), what="state.json")
    wait_until(lambda: lease_held(job_id), what="the lease")
    job.cancel()
    assert job.status() is JobState.CANCELLED
    assert job.backend_id == job_id
    assert [h["event"] for h in job.history][-3:] == ["reattached", "cancel", "cancelled"]
    assert (job.job_dir / "exit.json").exists()
    assert not _agent.pid_alive(st["pid"], st.get("pid_start"))
    assert not lease_held(job_id)
    assert not [p for p in _agent.session_members(st["sid"])]


def test_cancel_of_a_job_never_started_keeps_it_from_starting(tmp_path):
    job_id, marker = _die_mid_submit(tmp_path, "before")
    job = meshrun.Job.attach(job_id)
    assert job.record.state is JobState.SUBMITTING
    job.cancel()
    assert job.status() is JobState.CANCELLED
    # a supervisor started for it now (a late spawn) must not run it
    p = _agent._spawn_direct(str(job.job_dir))
    assert p.wait(timeout=60) == 0
    assert not marker.exists()
    assert _agent.job_status(str(job.job_dir))["state"] == "cancelled"


def test_status_picks_up_a_job_left_submitting(tmp_path):
    job_id, marker = _die_mid_submit(tmp_path, "after")
    job = meshrun.Job.attach(job_id)
    wait_until(marker.exists, what="the job to run")
    # no 60 s wait: the folder shows a live supervisor, so status looks at the job again
    wait_until(lambda: job.status() is JobState.RUNNING, 30, what="status to pick the job up")
    assert job.backend_id == job_id
    assert any(h["event"] == "reattached" for h in job.history)
    job.cancel()
    assert job.status() is JobState.CANCELLED


# ---- function jobs: the worker never runs supervisor code -----------------------------------------


@meshrun.job(gpus=1)
def close_stderr_and_raise(how):
    import os
    import sys

    if how == "sys":
        sys.stderr.close()
    else:
        os.close(2)
        os.close(1)
    raise ValueError("boom after closing stderr")


@meshrun.job(gpus=1)
def close_stderr_and_return(x):
    import sys

    sys.stderr.close()
    return x * 2


@meshrun.job
def raise_unprintable():
    class UnprintableError(Exception):  # defined here: travels with the function
        def __str__(self):
            raise RuntimeError("no str for you")

    raise UnprintableError("payload")


def _server_answers() -> bool:
    from meshrun._cliclient import answers

    return answers(meshrun.get_backend("local")._server_path())


@pytest.mark.parametrize("how", ["sys", "fd"])
def test_function_that_closes_stderr_and_raises(how):
    job = close_stderr_and_raise.submit(how)
    with pytest.raises(meshrun.JobFailed) as e:
        job.result(timeout=60)
    assert e.value.remote_type == "ValueError"
    assert "boom after closing stderr" in str(e.value)
    ex = json.loads((job.job_dir / "exit.json").read_text())
    assert ex["state"] == "failed" and ex["exit_code"] == 1
    assert "ValueError: boom after closing stderr" in ex["reason"]
    err = json.loads((job.job_dir / "error.json").read_text())
    assert err["type"] == "ValueError" and "Traceback" in err["traceback"]
    assert not lease_held(job.id)
    # the warm fork server survived and runs the next job (this home's first job may have started before its
    # server, which then comes up in the background: a loaded machine can take a moment)
    from meshrun.testing import wait_until

    wait_until(_server_answers, 30, 0.05, "the fork server")
    assert close_stderr_and_return.submit(21).result(timeout=60) == 42
    assert _server_answers()


def test_function_that_closes_stderr_and_returns():
    job = close_stderr_and_return.submit(4)
    assert job.result(timeout=60) == 8
    assert json.loads((job.job_dir / "exit.json").read_text())["state"] == "succeeded"


def test_exception_whose_str_raises_is_recorded():
    job = raise_unprintable.submit()
    with pytest.raises(meshrun.JobFailed) as e:
        job.result(timeout=60)
    msg = str(e.value)
    assert "UnprintableError" in msg
    assert "str() raised RuntimeError: no str for you" in msg
    assert "exited with code" not in msg


@meshrun.job(gpus=1)
def where_am_i():
    import os

    return os.getcwd()


def test_function_and_command_report_a_vanished_workdir_alike(tmp_path):
    import shutil

    blocker = meshrun.run(["sleep", "1000"], gpus=1)  # holds the only GPU: the next jobs queue
    wait_until(lambda: blocker.status() is JobState.RUNNING, what="the blocker")
    work = tmp_path / "work"
    work.mkdir()
    fn_job = where_am_i.options(workdir=str(work)).submit()
    cmd_job = meshrun.run(["pwd"], gpus=1, workdir=str(work))
    wait_until(lambda: (fn_job.job_dir / "state.json").exists() and (cmd_job.job_dir / "state.json").exists(),
               what="both to queue")
    shutil.rmtree(work)
    blocker.cancel()
    messages = []
    for job in (fn_job, cmd_job):
        with pytest.raises(meshrun.JobFailed) as e:
            job.result(timeout=60)
        messages.append(job.reason)
        assert f"the working directory {work} does not exist" in str(e.value)
        assert "Traceback" not in str(e.value)
    assert messages[0] == messages[1]


# ---- a process is alive until its last thread ends ---------------------------------------------------

MAIN_THREAD_EXITS = textwrap.dedent(
    """
    import ctypes, os, sys, threading, time

    def worker():
        open(sys.argv[1], "w").write(str(os.getpid()))
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.01)
        os._exit(0)

    threading.Thread(target=worker).start()
    time.sleep(0.2)
    ctypes.CDLL(None).syscall(60, 0)  # exit() of the main thread alone (x86-64 SYS_exit): it becomes a zombie
    """
)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the test calls SYS_exit by its x86-64 number")
def test_a_process_whose_main_thread_ended_lives_until_its_last_thread_does(tmp_path):
    started, stop = tmp_path / "started", tmp_path / "stop"
    # its own session: the test's session leader may live outside this PID namespace (getsid() gives 0 then)
    p = subprocess.Popen([sys.executable, "-c", MAIN_THREAD_EXITS, str(started), str(stop)], start_new_session=True)
    try:
        wait_until(started.exists, what="the worker thread")
        wait_until(lambda: _agent._proc_stat(p.pid)[0] == "Z", what="the main thread to end")
        # the main thread is a zombie, the process is not: it still runs (and could still use a GPU)
        assert _agent.pid_alive(p.pid)
        assert p.pid in _agent.session_members(os.getsid(p.pid))
        stop.touch()
        assert p.wait(timeout=30) == 0
        assert not _agent.pid_alive(p.pid)
    finally:
        p.kill()
        p.wait(timeout=30)


def test_a_marked_process_is_followed_until_it_has_ended(tmp_path):
    """A process found by the job's marker stays a member after the marker is gone from /proc (as when its
    memory, and with it its environment, is released while it still exits) until it has really ended."""
    go = tmp_path / "go"
    token = "t" + os.urandom(8).hex()
    code = ("import os, sys, time\n"
            "while not os.path.exists(sys.argv[1]): time.sleep(0.01)\n"
            "os.execve('/bin/sleep', ['sleep', '1000'], {})\n")  # the new program's environment has no marker
    p = subprocess.Popen([sys.executable, "-c", code, str(go)], env={**os.environ, _agent.TOKEN_ENV: token})
    try:
        c = _agent.Containment("subreaper", token=token)
        wait_until(lambda: p.pid in c.members(), what="the marked process to be found")
        go.touch()
        wait_until(lambda: p.pid not in _agent.marked_processes(token), what="the marker to disappear")
        assert p.pid in c.members()
        assert not c.empty()
        c.kill()
        wait_until(lambda: p.poll() is not None, what="the kill")
        assert c.empty() and p.pid not in c.members()
    finally:
        p.kill()


# ---- a command job is born in its cgroup (clone3 CLONE_INTO_CGROUP), not moved there after it started ----


@pytest.fixture
def fresh_cgroup():
    parent = _agent.delegated_cgroup()[0]
    if parent is None:
        pytest.skip("no cgroup v2 can be had here")
    path = os.path.join(parent, f"meshrun-test-born-{os.getpid()}")
    os.mkdir(path)
    yield path
    _wait_until(lambda: not _agent.cgroup_populated(path), timeout=10)
    os.rmdir(path)


def test_a_command_is_born_in_its_cgroup_with_its_argv_env_cwd_and_only_the_kept_descriptor(tmp_path, fresh_cgroup):
    if _agent.fork_into_cgroup.__globals__["_clone3"]() is None:
        pytest.skip("clone3 is not available on this machine (architecture)")
    out = tmp_path / "out"
    kept_r, kept = os.pipe()
    stray_r, stray = os.pipe()  # not kept: the job must not get it
    os.set_inheritable(stray, True)  # inheritable, but not kept: closed all the same
    hostile = "$(touch /tmp/pwned) 'q\" \n;x"
    script = ('import os, sys, json; fds = sorted(int(f) for f in os.listdir("/proc/self/fd")); '
              'json.dump({"cg": open("/proc/self/cgroup").read(), "argv": sys.argv[1:], "env": os.environ["X"], '
              '"cwd": os.getcwd(), "fds": fds}, open(sys.argv[2], "w"))')
    try:
        pid = _agent.spawn_in_cgroup([sys.executable, "-c", script, hostile, str(out)],
                                     {"X": hostile, "PATH": os.environ["PATH"]}, str(tmp_path), fresh_cgroup, (kept,))
        assert pid, "clone3 was refused here although the kernel offers it"
        _, status = os.waitpid(pid, 0)
    finally:
        for fd in (kept_r, kept, stray_r, stray):
            os.close(fd)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    got = json.loads(out.read_text())
    rel = fresh_cgroup[len(_agent.cgroup2_mount()[0]):] or "/"
    assert f"0::{rel}" in got["cg"].splitlines(), got["cg"]
    assert got["argv"] == [hostile, str(out)] and got["env"] == hostile and got["cwd"] == str(tmp_path)
    assert kept in got["fds"] and stray not in got["fds"], got["fds"]
    assert not os.path.exists("/tmp/pwned")


def test_a_command_that_cannot_start_in_its_cgroup_says_why(tmp_path, fresh_cgroup):
    if _agent.fork_into_cgroup.__globals__["_clone3"]() is None:
        pytest.skip("clone3 is not available on this machine (architecture)")
    with pytest.raises(OSError) as e:
        _agent.spawn_in_cgroup(["no-such-program-here"], {"PATH": "/usr/bin:/bin"}, str(tmp_path), fresh_cgroup)
    assert e.value.filename == "no-such-program-here" and e.value.errno == 2
    with pytest.raises(OSError) as e:
        _agent.spawn_in_cgroup(["true"], {"PATH": "/usr/bin:/bin"}, str(tmp_path / "gone"), fresh_cgroup)
    assert e.value.filename == str(tmp_path / "gone")
    assert not _agent.cgroup_populated(fresh_cgroup)


def test_where_clone3_is_refused_the_job_is_moved_into_its_cgroup_instead(tmp_path, monkeypatch):
    """A kernel or seccomp filter without clone3: spawn_in_cgroup says so (None) and the supervisor forks and
    moves the child, as before; the job still runs inside its cgroup."""
    if not CAN_CGROUP:
        pytest.skip("no cgroup v2 can be had here")
    monkeypatch.setattr(_agent, "_CLONE3", [None])
    assert _agent.spawn_in_cgroup(["true"], {}, str(tmp_path), str(tmp_path)) is None
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "launch.json").write_text(json.dumps({"kind": "command", "job_id": "clone3-refused",
                                                     "argv": ["sh", "-c", "cat /proc/self/cgroup > cg.txt"],
                                                     "cwd": str(tmp_path)}))
    # in a process of its own (a supervisor takes over signals and becomes a subreaper)
    code = ("import sys; from meshrun import _agent; _agent._CLONE3[:] = [None]; "
            "sys.exit(_agent.Supervisor(sys.argv[1]).run())")
    subprocess.run([sys.executable, "-c", code, str(job_dir)], check=True,
                   env=dict(os.environ, MESHRUN_CONTAINMENT="cgroup"))
    cg = json.loads((job_dir / "state.json").read_text())["cgroup"]
    rel = cg[len(_agent.cgroup2_mount()[0]):]
    assert f"0::{rel}" in (tmp_path / "cg.txt").read_text().splitlines()
