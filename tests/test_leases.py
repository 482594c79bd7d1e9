"""GPU leases on a shared machine, with real processes: racing submitters (also of another OS user), the
queue (fair share across OS users, FCFS within one), reclaim after SIGKILL, foreign GPU processes, masking,
and `meshrun gpus`."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import meshrun
from meshrun.testing import assert_no_gpu_overlap, wait_until
from meshrun import JobState, _agent

@pytest.fixture(autouse=True)
def _local_backend(monkeypatch):
    """These tests are about the local backend: pin it, whatever other backends are installed."""
    monkeypatch.setenv("MESHRUN_BACKEND", "local")


AGENT = _agent.__file__


def _record_job(out_dir: Path, sleep: float) -> list[str]:
    """A command that records (its GPUs, start, end) into out_dir, holding the GPUs for ``sleep`` s. The
    record appears whole (written aside, then renamed), so a test polling for it never reads it half-written."""
    code = (
        "import json, os, sys, time, uuid; t0 = time.time(); time.sleep(float(sys.argv[2])); "
        "rec = {'gpus': os.environ.get('CUDA_VISIBLE_DEVICES'), 'uuids': os.environ.get('MESHRUN_GPU_UUIDS'), "
        "'start': t0, 'end': time.time(), 'user': os.getuid(), 'job': os.environ.get('MESHRUN_JOB_ID')}; "
        "p = os.path.join(sys.argv[1], uuid.uuid4().hex + '.json'); "
        "open(p + '.part', 'w').write(json.dumps(rec)); os.rename(p + '.part', p)"
    )
    return ["python3", "-c", code, str(out_dir), str(sleep)]


@pytest.fixture
def shared_lease_dir(monkeypatch):
    """A lease directory every user of the machine can reach (tmp_path is private to root)."""
    d = Path(f"/tmp/meshrun-test-leases-{os.getpid()}-{time.time_ns()}")
    monkeypatch.setenv("MESHRUN_LEASE_DIR", str(d))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def other_user(session_services):
    """A second OS user (created if we are root; removed at the end of the test run), for cross-user lease tests."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second OS user")
    name = "mrlease"
    session_services.use("lease-test-user", was_up=True)  # another run that made the user keeps it while we run
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/bin/bash", name], check=True)
        session_services.created_user("lease-test-user", name)
    return name


SUBMITTER = textwrap.dedent(
    """
    import json, sys
    import meshrun
    out, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    jobs = [meshrun.run(json.loads(sys.argv[4]), gpus=1 + (i + k) % 3, name=f"racer-{k}-{i}") for i in range(n)]
    meshrun.wait(jobs, timeout=240)
    bad = [j.id for j in jobs if j.status() is not meshrun.JobState.SUCCEEDED]
    print(json.dumps(bad))
    """
)


@pytest.mark.slow
def test_racing_submitters_of_two_users_never_share_a_gpu(tmp_path, shared_lease_dir, other_user, monkeypatch):
    monkeypatch.setenv("MESHRUN_GPUS", "0-7")
    out = Path(f"/tmp/meshrun-race-{os.getpid()}-{time.time_ns()}")
    out.mkdir(mode=0o777)
    os.chmod(out, 0o777)
    try:
        script = tmp_path / "submitter.py"
        script.write_text(SUBMITTER)
        cmd = json.dumps(_record_job(out, 0.25))
        procs = [
            subprocess.Popen([sys.executable, str(script), str(out), "4", str(k), cmd], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "MESHRUN_HOME": str(tmp_path / f"home{k}")})
            for k in range(6)
        ]
        # the other user drives the host agent directly (its lease rules are the whole story; it needs
        # nothing but the system python3), racing the meshrun clients above for the same 8 GPUs
        agent = Path(f"/tmp/meshrun-agent-{os.getpid()}.py")
        shutil.copy(AGENT, agent)
        os.chmod(agent, 0o755)
        other_dirs = []
        for i in range(6):
            d = out / f"other-{i}"
            d.mkdir()
            (d / "launch.json").write_text(json.dumps({
                "job_id": f"other-{i}", "name": f"other-{i}", "kind": "command", "argv": _record_job(out, 0.25),
                "env": {}, "cwd": "/tmp", "gpus": 1 + i % 3, "nodes": 1,
            }))
            os.system(f"chown -R {other_user} {d}")
            other_dirs.append(d)
        env = {"PATH": "/usr/bin:/bin", "MESHRUN_LEASE_DIR": str(shared_lease_dir), "MESHRUN_GPUS": "0-7"}
        others = [
            subprocess.Popen([shutil.which("runuser") or "/usr/sbin/runuser", "-u", other_user, "--", "/usr/bin/python3", str(agent), "run", str(d)],
                             env=env)
            for d in other_dirs
        ]
        for p in others:
            assert p.wait(240) == 0
        for p in procs:
            stdout, _ = p.communicate(timeout=240)
            assert p.returncode == 0
            assert json.loads(stdout.strip().splitlines()[-1]) == []
        for d in other_dirs:
            assert json.loads((d / "exit.json").read_text())["state"] == "succeeded"
        records = [json.loads(f.read_text()) for f in out.glob("*.json")]
        assert len(records) == 6 * 4 + 6
        assert {r["user"] for r in records} == {0, pwd.getpwnam(other_user).pw_uid}
        assert_no_gpu_overlap(records)
        # nothing is left leased afterwards
        snap = _agent.snapshot()
        assert snap["leases"] == {} and snap["queue"] == []
    finally:
        shutil.rmtree(out, ignore_errors=True)
        Path(f"/tmp/meshrun-agent-{os.getpid()}.py").unlink(missing_ok=True)


def test_job_sees_exactly_its_gpus(monkeypatch, tmp_path):
    monkeypatch.setenv("MESHRUN_GPUS", "0,1,2,3")
    out = tmp_path / "rec"
    out.mkdir()
    job = meshrun.run(_record_job(out, 0), gpus=2)
    job.result(timeout=60)
    rec = json.loads(next(out.glob("*.json")).read_text())
    assert len(rec["gpus"].split(",")) == 2
    assert rec["uuids"].count("GPU-declared") == 2
    cpu = meshrun.run(["bash", "-c", 'echo "[$CUDA_VISIBLE_DEVICES]"'])
    cpu.result(timeout=60)
    assert cpu.logs().strip() == "[]"  # CPU jobs are kept off every GPU


def test_fcfs_queue_and_no_overtaking(monkeypatch, tmp_path):
    monkeypatch.setenv("MESHRUN_GPUS", "0,1")
    out = tmp_path / "rec"
    out.mkdir()
    first = meshrun.run(_record_job(out, 1.0), gpus=2, name="first")
    _wait(lambda: first.status() is JobState.RUNNING)
    second = meshrun.run(_record_job(out, 0.3), gpus=2, name="second")
    _wait(lambda: "waiting for 2 GPU(s)" in (second.refresh().reason or ""))
    third = meshrun.run(_record_job(out, 0.1), gpus=1, name="third")
    _wait(lambda: third.refresh().reason and "1 job(s) ahead" in third.record.reason)
    assert second.status() is JobState.PENDING
    meshrun.wait([first, second, third], timeout=60)
    recs = {r["job"]: r for r in (json.loads(f.read_text()) for f in out.glob("*.json"))}
    # the 1-GPU job did not jump ahead of the 2-GPU job waiting before it
    assert recs[third.id]["start"] >= recs[second.id]["start"]
    assert recs[second.id]["start"] >= recs[first.id]["end"]
    assert "waiting for 2 GPU(s)" in second.logs()


def _ticket(ticket, uid, gpus, order="fair-usage"):
    return {"ticket": ticket, "uid": uid, "user": f"u{uid}", "gpus": gpus, "job_id": f"t{ticket}", "order": order}


def _state(held: dict[int, int], queue: list[dict], *, since: float = 0.0, usage=None) -> dict:
    leases, i = {}, 0
    for uid, n in held.items():
        for _ in range(n):
            leases[str(i)] = {"uid": uid, "user": f"u{uid}", "since": since}
            i += 1
    return {"gpus": leases, "queue": queue, "usage": dict(usage or {})}


def test_serve_order_fair_share_head_of_line_and_older_agents():
    gpus = [{"index": i, "uuid": f"GPU-{i}", "name": "declared"} for i in range(6)]
    H = _agent.FAIR_HALF_LIFE
    # user 1 holds 3 of 6 GPUs for 100 s (300 GPU-s of recent use): user 2's later tickets go first
    st = _state({1: 3}, [_ticket(1, 1, 1), _ticket(2, 2, 1), _ticket(3, 1, 1), _ticket(4, 2, 1)])
    order, grants, usage = _agent.serve_order(gpus, st, set(), t=100.0)
    assert [t["ticket"] for t in order] == [2, 4, 1, 3]
    assert list(grants) == [2, 4, 1] and usage == {"1": 300.0}
    # ended leases count too, halving every FAIR_HALF_LIFE: user 1 ran 2 GPUs for an hour, an hour ago
    # (3600 GPU-s left); user 2 holds 1 GPU since 1000 s (1000 GPU-s): user 2 goes first
    st = _state({2: 1}, [_ticket(5, 1, 1), _ticket(6, 2, 1)], since=2 * H - 1000.0, usage={"1": [2 * H, H]})
    order, _, usage = _agent.serve_order(gpus, st, set(), t=2 * H)
    assert [t["ticket"] for t in order] == [6, 5] and usage == {"1": H, "2": 1000.0}
    # ... and a day later that is forgotten: user 2, still holding its GPU, now has more
    order, _, _ = _agent.serve_order(gpus, st, set(), t=2 * H + 86400.0)
    assert [t["ticket"] for t in order] == [5, 6]
    # head of line: the first ticket in fair order that does not fit blocks everyone behind it
    st = _state({1: 3}, [_ticket(1, 1, 1), _ticket(2, 2, 4)])
    order, grants, _ = _agent.serve_order(gpus, st, set(), t=10.0)
    assert [t["ticket"] for t in order] == [2, 1] and grants == {}
    # one user alone: plain first come, first served (a 1-GPU ticket never overtakes a 2-GPU one)
    st = _state({1: 5}, [_ticket(7, 1, 2), _ticket(8, 1, 1)])
    order, grants, _ = _agent.serve_order(gpus, st, set(), t=10.0)
    assert [t["ticket"] for t in order] == [7, 8] and grants == {}
    # a ticket of an older agent (FCFS, no "order" marker) on the machine: all waiters serve in ticket
    # order, so that the old and the new agent agree on who is first
    st = _state({1: 3}, [_ticket(1, 1, 1), _ticket(2, 2, 1, order=None)])
    assert _agent.queue_policy(st) == "fifo"
    order, grants, _ = _agent.serve_order(gpus, st, set(), t=10.0)
    assert [t["ticket"] for t in order] == [1, 2] and sorted(grants) == [1, 2]


def test_ended_leases_are_remembered_as_recent_use():
    st = _state({}, [])
    _agent.record_usage(st, {"uid": 7, "since": 100.0}, 400.0)  # one GPU for 300 s
    _agent.record_usage(st, {"uid": 7, "since": 100.0}, 400.0)
    assert st["usage"] == {"7": [600.0, 400.0]}
    later = 400.0 + _agent.FAIR_HALF_LIFE
    assert _agent.usage_by_owner(st, later) == {"7": 300.0}
    _agent.record_usage(st, {"uid": 8, "since": later}, later + 0.5)  # even half a GPU-second counts
    assert set(st["usage"]) == {"7", "8"}
    _agent.record_usage(st, {"uid": 9, "since": 0.0}, 400.0 + 24 * _agent.FAIR_HALF_LIFE)
    assert set(st["usage"]) == {"9"}  # a day later the others' use has decayed away and left the file


def test_one_user_alone_is_served_first_come_first_served(monkeypatch, tmp_path):
    monkeypatch.setenv("MESHRUN_GPUS", "0,1")
    out = tmp_path / "rec"
    out.mkdir()
    holder = meshrun.run(["sleep", "1000"], gpus=2, name="holder")
    _wait(lambda: holder.status() is JobState.RUNNING)
    jobs = []
    for i, n in enumerate([2, 1, 2, 1]):  # sizes such that no two neighbours can start together
        jobs.append(meshrun.run(_record_job(out, 0.2), gpus=n, name=f"w{i}"))
        _wait(lambda job=jobs[-1], want=f"{i} job(s) ahead": want in (job.refresh().reason or ""))
    snap = _agent.snapshot()
    assert snap["queue_policy"] == "fair"
    assert [t["job_id"] for t in snap["queue"]] == [j.id for j in jobs]
    assert [t["held"] for t in snap["queue"]] == [2] * 4
    holder.cancel()
    meshrun.wait(jobs, timeout=60)
    recs = {r["job"]: r for r in (json.loads(f.read_text()) for f in out.glob("*.json"))}
    starts = [recs[j.id]["start"] for j in jobs]
    assert starts == sorted(starts), "a user's own jobs started out of their arrival order"
    assert_no_gpu_overlap(list(recs.values()))


def _other_user_job(other_user: str, out: Path, name: str, argv: list[str], gpus: int) -> tuple[Path, list[str]]:
    """A job directory for the other OS user and the command that runs it with the system python3 and
    nothing but the host agent (as a user of another meshrun, or of none, would)."""
    d = out / name
    d.mkdir()
    (d / "launch.json").write_text(json.dumps({
        "job_id": name, "name": name, "kind": "command", "argv": argv, "env": {}, "cwd": "/tmp",
        "gpus": gpus, "nodes": 1,
    }))
    subprocess.run(["chown", "-R", other_user, str(d)], check=True)
    agent = out / "agent.py"
    if not agent.exists():
        shutil.copy(AGENT, agent)
        os.chmod(agent, 0o755)
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return d, [runuser, "-u", other_user, "--", "/usr/bin/python3", str(agent), "run", str(d)]


def test_fair_share_across_os_users(shared_lease_dir, other_user, monkeypatch, capfd):
    """User A (us) holds all 4 GPUs in one job and queues another 4-GPU job; then user B queues one. When
    A's first job ends, B's job gets the GPUs, though A asked first and neither holds any GPU at that
    moment: A has recent GPU use, B has none."""
    monkeypatch.setenv("MESHRUN_GPUS", "0-3")
    out = Path(f"/tmp/meshrun-fair-{os.getpid()}-{time.time_ns()}")
    out.mkdir(mode=0o777)
    os.chmod(out, 0o777)
    b_proc = None
    try:
        a1 = meshrun.run(["sleep", "1000"], gpus=4, name="a-first")
        _wait(lambda: a1.status() is JobState.RUNNING)
        a3 = meshrun.run(_record_job(out, 0), gpus=4, name="a-second")
        _wait(lambda: "waiting for 4 GPU(s)" in (a3.refresh().reason or ""))
        b_dir, b_cmd = _other_user_job(other_user, out, "b-job", _record_job(out, 0.3), 4)
        env = {"PATH": "/usr/bin:/bin", "MESHRUN_LEASE_DIR": str(shared_lease_dir), "MESHRUN_GPUS": "0-3"}
        b_proc = subprocess.Popen(b_cmd, env=env)
        # B's ticket is in the queue once its job says what it waits for (the supervisor's first "queued",
        # without a reason, comes before it takes the ticket)
        _wait(lambda: "waiting for 4 GPU(s)" in ((_agent.read_json(str(b_dir / "state.json")) or {}).get("reason")
                                                 or ""))
        # B (no recent use) is now first in line although it came second; and A's job knows it
        snap = _agent.snapshot()
        assert [(t["job_id"], t["user"], t["held"]) for t in snap["queue"]] == [
            ("b-job", other_user, 0), (a3.id, pwd.getpwuid(os.getuid()).pw_name, 4)], snap
        assert snap["queue"][0]["recent_gpu_hours"] == 0 and snap["queue"][1]["recent_gpu_hours"] > 0
        assert snap["held_by_user"] == {pwd.getpwuid(os.getuid()).pw_name: 4}
        _wait(lambda: "1 job(s) ahead" in (a3.refresh().reason or ""))
        from meshrun._cli import main

        assert main(["gpus"]) == 0
        text = capfd.readouterr().out
        assert "fair share" in text and text.index("b-job") < text.index("a-second")
        a1.cancel()
        assert b_proc.wait(120) == 0
        a3.result(timeout=120)
        recs = {r["job"]: r for r in (json.loads(f.read_text()) for f in out.glob("*.json"))}
        b_rec = recs["b-job"]
        assert b_rec["user"] == pwd.getpwnam(other_user).pw_uid
        assert recs[a3.id]["start"] >= b_rec["end"], "A's second job got the GPUs before B's"
        assert_no_gpu_overlap([b_rec, recs[a3.id]])
        assert json.loads((b_dir / "exit.json").read_text())["state"] == "succeeded"
        # A's ended lease is remembered as recent use (4 GPUs for a few seconds), B's too
        usage = _agent.snapshot()
        st = _agent.read_json(str(Path(usage["lease_dir"]) / "leases.json"))
        assert set(st["usage"]) == {str(os.getuid()), str(pwd.getpwnam(other_user).pw_uid)}
    finally:
        if b_proc is not None and b_proc.poll() is None:
            b_proc.kill()
            b_proc.wait()
        shutil.rmtree(out, ignore_errors=True)


def test_sigkill_of_the_lease_holder_frees_its_gpus(monkeypatch):
    monkeypatch.setenv("MESHRUN_GPUS", "0")
    holder = meshrun.run(["sleep", "1000"], gpus=1, name="holder")
    _wait(lambda: holder.status() is JobState.RUNNING)
    waiter = meshrun.run(["true"], gpus=1, name="waiter")
    _wait(lambda: "waiting" in (waiter.refresh().reason or ""))
    snap = meshrun.get_backend("local").gpus()
    assert snap["leases"]["0"]["job_id"] == holder.id
    st = json.loads((holder.job_dir / "state.json").read_text())
    os.kill(st["pid"], signal.SIGKILL)  # the supervisor dies; its job's process dies with it
    assert waiter.result(timeout=60) == 0
    assert holder.status() is JobState.LOST


def test_foreign_gpu_processes_are_respected(fake_gpus, tmp_path):
    fake = fake_gpus(4)
    out = tmp_path / "rec"
    out.mkdir()
    squatter = subprocess.Popen(["sleep", "1000"], start_new_session=True)  # someone else's training run
    try:
        fake.add_process(squatter.pid, 0)
        job = meshrun.run(_record_job(out, 0), gpus=3)
        job.result(timeout=60)
        rec = json.loads(next(out.glob("*.json")).read_text())
        assert sorted(rec["gpus"].split(",")) == ["1", "2", "3"]
        assert rec["uuids"].split(",") == [fake.gpus[i]["uuid"] for i in (1, 2, 3)]
        whole = meshrun.run(["true"], gpus=4)
        _wait(lambda: "busy with processes meshrun did not start" in (whole.refresh().reason or ""))
        snap = meshrun.get_backend("local").gpus()
        assert fake.gpus[0]["uuid"] in snap["foreign"]
        squatter.kill()
        squatter.wait()
        assert whole.result(timeout=60) == 0
    finally:
        squatter.kill()
        squatter.wait()


def test_gpu_type_and_impossible_requests(fake_gpus):
    fake_gpus(["NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"])
    job = meshrun.run(["bash", "-c", "echo $CUDA_VISIBLE_DEVICES"], gpus="H100:2")
    job.result(timeout=60)
    assert job.logs().strip() == "1,2"
    # the local backend refuses what this machine can never run, before starting anything
    with pytest.raises(meshrun.NoPlacementError) as e:
        meshrun.run(["true"], gpus="A100:2", backend="local")
    assert "1 A100 GPU(s)" in str(e.value)
    with pytest.raises(meshrun.NoPlacementError):
        meshrun.run(["true"], gpus=8, backend="local")


def test_cli_gpus_shows_holders_queue_and_foreign(fake_gpus, capfd):
    fake = fake_gpus(2)
    squatter = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    try:
        fake.add_process(squatter.pid, 1)
        holder = meshrun.run(["sleep", "1000"], gpus=1, name="the-holder")
        _wait(lambda: holder.status() is JobState.RUNNING)
        waiting = meshrun.run(["true"], gpus=1, name="the-waiter")
        _wait(lambda: "waiting" in (waiting.refresh().reason or ""))
        from meshrun._cli import main

        assert main(["gpus"]) == 0
        text = capfd.readouterr().out
        assert "the-holder" in text and holder.id in text
        assert "foreign" in text and f"pid {squatter.pid}" in text
        assert f"pid {squatter.pid} python (root, 1000 MiB)" in text  # its name, user and GPU memory
        assert "the-waiter" in text  # the queue
        assert main(["gpus", "--json"]) == 0
        snap = json.loads(capfd.readouterr().out)
        (host,) = snap
        assert snap[host]["leases"]["0"]["name"] == "the-holder"
        holder.cancel()
        waiting.cancel()
    finally:
        squatter.kill()
        squatter.wait()


def _wait(pred, timeout: float = 90.0) -> None:
    wait_until(pred, timeout)


def test_a_gpu_held_by_the_submitter_itself_is_named_at_once(fake_gpus, monkeypatch):
    """The notebook deadlock: the submitting process (here this test) holds a context on the only GPU. The
    waiting job says so at once: that pid, its name, user and memory, that it is the submitter, and the
    remedy; with the sharing policy set above that context's size, the job runs beside it."""
    fake = fake_gpus(1)
    fake.add_process(os.getpid(), 0, name="python-kernel")
    job = meshrun.run(["true"], gpus=1, name="self-held")
    _wait(lambda: "waiting" in (job.refresh().reason or ""))
    reason = job.record.reason
    assert f"GPU 0 is in use by pid {os.getpid()} (python-kernel, user root, 1000 MiB)" in reason, reason
    assert "the process that submitted this job" in reason and "MESHRUN_SHARE_GPU_BELOW_MIB" in reason
    job.cancel()
    assert job.wait(timeout=60) is JobState.CANCELLED
    monkeypatch.setenv("MESHRUN_SHARE_GPU_BELOW_MIB", "2000")  # 1000 MiB in all: shared
    assert meshrun.run(["true"], gpus=1, name="shared").wait(timeout=60) is JobState.SUCCEEDED
    monkeypatch.setenv("MESHRUN_SHARE_GPU_BELOW_MIB", "500")  # more than allowed: waits again
    big = meshrun.run(["true"], gpus=1, name="not-shared")
    _wait(lambda: "waiting" in (big.refresh().reason or ""))
    big.cancel()
