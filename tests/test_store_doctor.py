"""The job store when things go wrong: a disk filled by a job (a real small tmpfs), a truncated, garbled,
empty or missing index, and ``meshrun doctor`` checking and rebuilding it from the job folders."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshrun.testing import run_cli, wait_until

import meshrun
from meshrun import JobState

MESHRUN = [sys.executable, "-m", "meshrun"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _local_backend(monkeypatch):
    monkeypatch.setenv("MESHRUN_BACKEND", "local")


cli = run_cli


def wait_for(pred, timeout: float = 60.0, what: str = "condition"):
    return wait_until(pred, timeout, what=what)


def close_store() -> None:
    """Close this process's connections, as a process that exits would (the WAL is folded into jobs.db)."""
    from meshrun import _store

    with _store._stores_lock:
        for s in _store._stores.values():
            s.close()
        _store._stores.clear()


def one_clear_error(p: subprocess.CompletedProcess, *words: str) -> str:
    assert p.returncode == 2, (p.stdout, p.stderr)
    err = p.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


def finished_jobs(n: int = 2) -> list[meshrun.Job]:
    jobs = [meshrun.run(["bash", "-c", f"echo job {i}"], name=f"done-{i}") for i in range(n)]
    for j in jobs:
        assert j.wait(timeout=60) is JobState.SUCCEEDED
    return jobs


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ---- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(meshrun_home):
    """MESHRUN_HOME on a real 2 MiB tmpfs (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    meshrun_home.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(meshrun_home)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield meshrun_home
    close_store()
    for sock in meshrun_home.glob("agent-*.sock"):
        sock.unlink()
    subprocess.run(["umount", "-l", str(meshrun_home)], check=False)


def fill(path: Path) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_a_job_that_fills_the_disk_ends_saying_so_and_reading_still_works(small_disk):
    filler = "sleep 0.2; cat /dev/zero > \"$MESHRUN_JOB_DIR/../../fill\"; echo 'no space'; exit 1"
    job = meshrun.run(["bash", "-c", filler], name="filler")
    with pytest.raises(meshrun.JobFailed) as e:
        job.result(timeout=60)
    assert job.record.state is JobState.FAILED  # not "lost: supervisor died"
    assert "the disk is full (ENOSPC)" in str(e.value)
    ex = json.loads((job.job_dir / "exit.json").read_text())
    assert ex["state"] == "failed" and "ENOSPC" in ex["reason"]
    assert not (job.job_dir / "exit.json.reserve").exists()
    # read-only commands work on the full disk, from fresh processes
    close_store()
    ls = cli("ls")
    assert job.id in ls.stdout and "failed" in ls.stdout
    st = cli("status", job.id)
    assert "ENOSPC" in st.stdout and "history" in st.stdout
    assert cli("logs", job.id).returncode == 0
    # a write says what is wrong, once, and leaves nothing half-made
    one_clear_error(cli("run", "--", "echo", "hi", check=False), "full", str(small_disk))
    assert sorted(p.name for p in (small_disk / "jobs").iterdir()) == [job.id]


def test_a_fresh_process_reads_a_full_disk_store(small_disk):
    jobs = finished_jobs(2)
    close_store()
    for suffix in ("-wal", "-shm"):  # a cleanly closed index has folded its WAL in
        assert not (small_disk / f"jobs.db{suffix}").exists()
    fill(small_disk / "fill")
    ls = cli("ls")
    assert all(j.id in ls.stdout for j in jobs) and "succeeded" in ls.stdout
    assert "done-0" in cli("status", jobs[0].id).stdout
    assert cli("logs", jobs[1].id).stdout == "job 1\n"
    assert json.loads(cli("ls", "--json").stdout)[0]["state"] == "succeeded"


def test_a_running_job_on_a_full_disk_is_shown_and_its_end_recorded(small_disk, tmp_path):
    flag = tmp_path / "finish"  # outside the small disk
    job = meshrun.run(["bash", "-c", f"while [ ! -e {flag} ]; do sleep 0.02; done"], name="bystander")
    wait_for(lambda: (json.loads((job.job_dir / "state.json").read_text()) or {}).get("state") == "running"
             if (job.job_dir / "state.json").exists() else False, what="the job to run")
    close_store()
    fill(small_disk / "fill")  # someone else fills the disk while the job runs
    ls = cli("ls")  # the index says pending; the news cannot be written, but is shown
    assert job.id in ls.stdout and "running" in ls.stdout
    flag.touch()
    wait_for(lambda: (job.job_dir / "exit.json").exists(), what="the exit record")
    ex = json.loads((job.job_dir / "exit.json").read_text())
    assert ex["state"] == "succeeded" and "the disk is full (ENOSPC)" in ex["reason"]
    ls = cli("ls", "--json")
    assert json.loads(ls.stdout)[0]["state"] == "succeeded"
    assert meshrun.Job.attach(job.id).wait(timeout=60) is JobState.SUCCEEDED


def test_the_exit_record_uses_the_room_reserved_at_start(small_disk):
    from meshrun import _agent

    d = small_disk / "jobs" / "manual"
    d.mkdir(parents=True)
    (d / "launch.json").write_text(json.dumps({"job_id": "manual", "kind": "command", "argv": ["true"]}))
    d2 = small_disk / "jobs" / "noreserve"
    d2.mkdir()
    (d2 / "launch.json").write_text("{}")
    sup = _agent.Supervisor(str(d))
    sup._reserve_exit()
    assert (d / "exit.json.reserve").stat().st_size == _agent.EXIT_RESERVE
    fill(small_disk / "fill")
    with pytest.raises(OSError):  # the disk really is full
        (d / "probe").write_text("x" * 10000)
    sup._exit("failed", 1, "exited with code 1")
    ex = json.loads((d / "exit.json").read_text())
    assert ex["state"] == "failed" and ex["exit_code"] == 1
    assert ex["reason"].startswith("the disk is full (ENOSPC) at ") and ex["reason"].endswith("exited with code 1")
    assert not (d / "exit.json.reserve").exists()
    # without the reserve, the record cannot be written: the reader then says the disk is full
    fill(small_disk / "fill2")  # the reserve's room went back to the disk
    _agent.Supervisor(str(d2))._exit("failed", 1, "exited with code 1")  # does not raise
    assert not (d2 / "exit.json").exists()


def test_a_lost_supervisor_on_a_full_disk_says_the_disk_is_full(small_disk):
    from meshrun import _local

    d = small_disk / "jobs" / "gone"
    d.mkdir(parents=True)
    (d / "launch.json").write_text(json.dumps({"job_id": "gone", "kind": "command"}))
    (d / "state.json").write_text(json.dumps({"state": "running", "pid": dead_pid(), "pid_start": 1, "host": "h"}))
    fill(small_disk / "fill")
    st = _local.local_status(d)
    assert st.state is JobState.LOST and "the disk is full (ENOSPC)" in st.reason


# ---- a damaged or missing index ------------------------------------------------------------------


def test_a_truncated_index_gives_one_clear_error_and_doctor_rebuilds_it(meshrun_home):
    jobs = finished_jobs(2)
    close_store()
    db = meshrun_home / "jobs.db"
    assert db.stat().st_size > 4096
    os.truncate(db, 4096)
    one_clear_error(cli("ls", check=False), str(db), "damaged", "meshrun doctor --rebuild")
    one_clear_error(cli("status", jobs[0].id, check=False), str(db), "meshrun doctor --rebuild")
    with pytest.raises(meshrun.MeshrunError) as e:
        meshrun.Job.attach(jobs[0].id)
    assert str(db) in str(e.value)
    close_store()
    doc = cli("doctor", check=False)
    assert doc.returncode == 1 and "damaged" in doc.stdout
    rebuilt = cli("doctor", "--rebuild")
    assert "2 rebuilt" in rebuilt.stdout
    assert list(meshrun_home.glob("jobs.db.old-*"))  # the damaged file is kept
    rows = json.loads(cli("ls", "--json").stdout)
    assert {r["id"]: r["state"] for r in rows} == {j.id: "succeeded" for j in jobs}
    by_id = {r["id"]: r for r in rows}
    for j in jobs:
        ex = json.loads((j.job_dir / "exit.json").read_text())
        assert by_id[j.id]["started_at"] == ex["started_at"] and by_id[j.id]["ended_at"] == ex["ended_at"]
        assert by_id[j.id]["name"] == j.name and by_id[j.id]["backend"] == "local"
    assert cli("logs", jobs[0].id).stdout == "job 0\n"


def test_a_garbled_index_names_the_file_and_the_fix(meshrun_home):
    finished_jobs(1)
    close_store()
    db = meshrun_home / "jobs.db"
    db.write_bytes(b"this is not a database\n" * 500)
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    one_clear_error(cli("ls", check=False), str(db), "meshrun doctor --rebuild")
    one_clear_error(cli("run", "--", "true", check=False), str(db), "meshrun doctor --rebuild")


@pytest.mark.parametrize("how", ["empty", "missing"])
def test_an_empty_or_missing_index_beside_job_folders_says_so(meshrun_home, how):
    jobs = finished_jobs(2)
    close_store()
    db = meshrun_home / "jobs.db"
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    if how == "empty":
        db.write_bytes(b"")
    err = one_clear_error(cli("ls", check=False), "missing or empty", "meshrun doctor --rebuild")
    assert str(meshrun_home / "jobs") in err
    one_clear_error(cli("run", "--", "true", check=False), "missing or empty")  # no new index hides the old jobs
    cli("doctor", "--rebuild")
    assert {r["id"] for r in json.loads(cli("ls", "--json").stdout)} == {j.id for j in jobs}


def test_a_brand_new_store_needs_no_rebuild(meshrun_home):
    assert "no jobs yet" in cli("ls").stdout
    checks = {c["name"]: c for c in json.loads(cli("doctor", "--json", check=False).stdout)}
    assert checks["index"]["status"] == "ok" and "0 job(s)" in checks["index"]["detail"]
    assert not list(meshrun_home.glob("jobs.db.old-*"))


def test_rebuild_keeps_readable_rows_and_restores_the_missing_ones(meshrun_home):
    jobs = finished_jobs(2)
    close_store()
    db = sqlite3.connect(str(meshrun_home / "jobs.db"))
    db.execute("DELETE FROM jobs WHERE id = ?", (jobs[1].id,))
    db.commit()
    db.close()
    doc = json.loads(cli("doctor", "--json", check=False).stdout)
    warn = [c for c in doc if c["name"] == "index vs folders"]
    assert warn and jobs[1].id in warn[0]["detail"] and "meshrun doctor --rebuild" in warn[0]["detail"]
    missing = cli("status", jobs[1].id, check=False)
    assert missing.returncode == 2 and "meshrun doctor --rebuild" in missing.stderr
    out = cli("doctor", "--rebuild").stdout
    assert "1 row(s) kept, 1 rebuilt" in out
    kept = json.loads(cli("status", "--json", jobs[0].id).stdout)
    events = [h["event"] for h in kept["history"]]
    assert "submitted" in events and "rebuilt" not in events  # its own history, untouched
    back = json.loads(cli("status", "--json", jobs[1].id).stdout)
    assert back["state"] == "succeeded" and "rebuilt" in [h["event"] for h in back["history"]]


def test_a_running_job_survives_a_rebuild_and_can_still_be_cancelled(meshrun_home, tmp_path):
    job = meshrun.run(["bash", "-c", "sleep 300"], name="long")
    wait_for(lambda: job.status() is JobState.RUNNING, what="the job to run")
    close_store()
    for suffix in ("", "-wal", "-shm"):
        Path(str(meshrun_home / "jobs.db") + suffix).unlink(missing_ok=True)
    cli("doctor", "--rebuild")
    again = meshrun.Job.attach(job.id)
    assert again.status() is JobState.RUNNING and again.backend == "local"
    assert cli("cancel", job.id).returncode == 0
    assert again.wait(timeout=60) is JobState.CANCELLED


# ---- doctor's other checks -----------------------------------------------------------------------


def test_doctor_reports_each_part_and_cleans_leftover_temp_files(meshrun_home, fake_gpus):
    fake_gpus(2)
    job = finished_jobs(1)[0]
    old = time.time() - 3600
    stale = [job.job_dir / f"state.json.tmp.{dead_pid()}", job.job_dir / "exit.json.reserve"]
    live = job.job_dir / f"result.pkl.tmp.{os.getpid()}"
    for p in [*stale, live]:
        p.write_text("partial")
        os.utime(p, (old, old))
    p = cli("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(p.stdout)}
    assert checks["index"]["status"] == "ok" and "1 job(s)" in checks["index"]["detail"]
    assert "removed 2" in checks["temp files"]["detail"]
    assert not any(s.exists() for s in stale) and live.exists()
    assert checks["GPU leases"]["status"] == "ok" and "0 GPU(s) leased" in checks["GPU leases"]["detail"]
    assert checks["fork server"]["status"] == "ok" and "answers" in checks["fork server"]["detail"]
    assert checks["backend local"]["status"] == "ok"
    assert checks["GPU tools"]["status"] == "ok" and "2 GPU(s)" in checks["GPU tools"]["detail"]
    table = cli("doctor").stdout
    assert "CHECK" in table and "fork server" in table


def test_doctor_says_what_is_broken(meshrun_home, fake_gpus, monkeypatch, tmp_path):
    fake_gpus(1)
    monkeypatch.setenv("FAKE_NVIDIA_SMI", str(tmp_path / "no-driver.json"))  # nvidia-smi fails like a bad driver
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("MESHRUN_LEASE_DIR", str(blocker / "leases"))
    from meshrun._local import LocalBackend

    meshrun_home.mkdir(parents=True, exist_ok=True)
    path = LocalBackend()._server_path()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)  # a socket file nobody answers on
    dead.close()
    p = cli("doctor", "--json", check=False)
    assert p.returncode == 1
    checks = {c["name"]: c for c in json.loads(p.stdout)}
    assert checks["GPU tools"]["status"] == "error" and "exited with code 9" in checks["GPU tools"]["detail"]
    assert checks["GPU leases"]["status"] == "error" and "lease" in checks["GPU leases"]["detail"]
    assert checks["fork server"]["status"] == "warning" and path in checks["fork server"]["detail"]
    os.unlink(path)
