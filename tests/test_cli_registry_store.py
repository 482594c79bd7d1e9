"""The CLI, the plugin registry, the config, and the job store's consistency under kill -9."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

import meshrun
from meshrun import JobState

@pytest.fixture(autouse=True)
def _local_backend(monkeypatch):
    """These tests are about the local backend: pin it, whatever other backends are installed."""
    monkeypatch.setenv("MESHRUN_BACKEND", "local")


MESHRUN = [sys.executable, "-m", "meshrun"]


def cli(*args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([*MESHRUN, *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"meshrun {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def test_cli_run_streams_output_and_returns_the_exit_code():
    p = cli("run", "--name", "hello", "--", "bash", "-c", 'echo "hi $1"; exit 3', "x", "it's $(not run)", check=False)
    assert p.returncode == 3
    assert p.stdout == "hi it's $(not run)\n"
    assert "submitted to local" in p.stderr


def test_cli_detach_ls_status_logs_wait_cancel():
    jid = cli("run", "-d", "--name", "sleeper", "--env", "A=1 2", "--", "bash", "-c", "echo $A; sleep 1000").stdout.strip()
    assert len(jid) == 12
    job = meshrun.Job.attach(jid)
    end = time.monotonic() + 30
    while job.status() is not JobState.RUNNING and time.monotonic() < end:
        time.sleep(0.05)
    ls = cli("ls").stdout
    assert jid in ls and "sleeper" in ls and "running" in ls
    assert json.loads(cli("ls", "--json").stdout)[0]["id"] == jid
    st = cli("status", jid).stdout
    assert "sleeper" in st and "history" in st and "submitted" in st
    assert json.loads(cli("status", "--json", jid).stdout)["state"] == "running"
    end = time.monotonic() + 10
    while "1 2" not in cli("logs", jid).stdout and time.monotonic() < end:
        time.sleep(0.05)
    assert cli("logs", jid).stdout == "1 2\n"
    assert "cancelled" in cli("cancel", jid).stdout
    assert cli("wait", jid, check=False).returncode == 1
    assert "already cancelled" in cli("cancel", jid).stdout


def test_cli_errors_are_clear():
    p = cli("run", "--gpus", "H100:x", "--", "true", check=False)
    assert p.returncode == 2 and "gpus:" in p.stderr and "Traceback" not in p.stderr
    p = cli("status", "nosuchjob", check=False)
    assert p.returncode == 2 and "no job 'nosuchjob'" in p.stderr
    p = cli("run", check=False)
    assert p.returncode == 2 and "nothing to run" in p.stderr
    p = cli("run", "--backend", "nonexistent", "--", "true", check=False)
    assert p.returncode == 2 and "no backend named 'nonexistent'" in p.stderr


def test_cli_output_is_plain_when_piped():
    cli("run", "-d", "--", "true")
    out = cli("ls").stdout
    assert "\x1b[" not in out  # no colour codes into pipes
    assert out.splitlines()[0].split() == ["ID", "NAME", "STATE", "BACKEND", "WHERE", "SUBMITTED", "RUNTIME"]


def test_cli_follow_shows_progress_while_queued(monkeypatch, tmp_path):
    monkeypatch.setenv("MESHRUN_GPUS", "0")
    release = tmp_path / "release"
    blocker = meshrun.run(["bash", "-c", f"while [ ! -e {release} ]; do sleep 0.05; done"], gpus=1)
    end = time.monotonic() + 30
    while blocker.status() is not JobState.RUNNING and time.monotonic() < end:
        time.sleep(0.05)
    p = subprocess.Popen([*MESHRUN, "run", "--gpus", "1", "--", "echo", "got it"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while "waiting for 1 GPU(s)" not in seen:  # the queue position is shown while the job waits
            line = p.stderr.readline()
            assert line, f"meshrun run ended without showing progress: {seen}"
            seen += line
        assert "pending" in seen
    finally:
        release.touch()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and out.endswith("got it\n")


def test_backends_lists_broken_plugins_with_reason_and_hint(tmp_path):
    """A plugin whose import fails shows up with the reason and an install hint; nothing else breaks."""
    site = tmp_path / "site"
    dist = site / "meshrun_broken-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: meshrun-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[meshrun.backends]\nbroken = meshrun_broken:Backend\nslurm = meshrun_broken:Nope\n")
    (site / "meshrun_broken.py").write_text("import a_module_that_does_not_exist\n")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = cli("backends", env=env).stdout
    line = next(l for l in out.splitlines() if l.startswith("broken"))
    assert "failed to load" in line and "No module named 'a_module_that_does_not_exist'" in line
    assert next(l for l in out.splitlines() if l.startswith("local")).split()[1] == "ready"
    data = json.loads(cli("backends", "--json", env=env).stdout)
    by = {b["name"]: b for b in data}
    assert by["broken"]["status"] == "failed to load"
    # a known backend that fails to load gets its install hint
    assert "backends/slurm" in by["slurm"]["detail"] or by["slurm"]["status"] == "ready"
    # and jobs still run
    assert cli("run", "--backend", "local", "--", "true", env=env).returncode == 0


def test_config_unknown_keys_are_errors_listing_valid_ones(tmp_path, monkeypatch):
    cfg = tmp_path / "config.toml"
    cfg.write_text("defualt_backend = 'local'\n")
    monkeypatch.setenv("MESHRUN_CONFIG", str(cfg))
    with pytest.raises(meshrun.ConfigError) as e:
        meshrun.configure()
    assert "defualt_backend" in str(e.value) and "default_backend" in str(e.value)
    cfg.write_text("[backends.local]\ngrace_period = 2\nlease_dirr = '/x'\n")
    meshrun.configure()
    with pytest.raises(meshrun.ConfigError) as e:
        meshrun.get_backend("local")
    assert "lease_dirr" in str(e.value) and "lease_dir" in str(e.value) and "grace_period" in str(e.value)
    cfg.write_text("[backends.local]\ngrace_period = 2\n")
    monkeypatch.setenv("MESHRUN_LOCAL_GRACE_PERIOD", "3")
    meshrun.configure()
    assert meshrun.get_backend("local").settings.grace_period == 3.0


CHURN = textwrap.dedent(
    """
    import sys, meshrun
    i = 0
    while True:
        meshrun.run(["true"], name=f"churn-{i}")
        if i == 0:
            print("ready", flush=True)
        i += 1
    """
)


@pytest.mark.slow
def test_store_survives_kill_9_at_any_moment(tmp_path, meshrun_home, monkeypatch):
    """Kill a submitting process at random moments; the store stays consistent and every job resolves."""
    from meshrun import _agent

    # a job folder a killed submitter left without a started supervisor counts as never started after
    # SPAWN_GRACE (30 s); 10 s still leaves a start the fork server had in hand ample time on a busy machine
    monkeypatch.setattr(_agent, "SPAWN_GRACE", 10.0)
    script = tmp_path / "churn.py"
    script.write_text(CHURN)
    import random

    rnd = random.Random(7)
    for _ in range(8):
        p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(rnd.random() * 0.5)
        p.send_signal(signal.SIGKILL)
        p.wait()
    db = sqlite3.connect(str(meshrun_home / "jobs.db"))
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = db.execute("SELECT id, state, backend_id FROM jobs").fetchall()
    assert len(rows) >= 8
    for jid, state, bid in rows:
        assert (meshrun_home / "jobs" / jid / "spec.json").exists()
        assert (meshrun_home / "jobs" / jid / "launch.json").exists()
    # every job either ran or is reported as interrupted; none hangs in limbo
    import meshrun._job as jobmod

    jobmod.SUBMIT_GRACE = 0.0
    try:
        jobs = [meshrun.Job(jid) for jid, _, _ in rows]
        meshrun.wait(jobs, timeout=120)
    finally:
        jobmod.SUBMIT_GRACE = 60.0
    states = {j.record.state for j in jobs}
    assert states <= {JobState.SUCCEEDED, JobState.LOST}
    assert sum(j.record.state is JobState.SUCCEEDED for j in jobs) >= len(jobs) - 8
    for j in jobs:
        if j.record.state is JobState.LOST:
            assert "interrupted" in j.record.reason or "never started" in j.record.reason


def test_import_is_light():
    """`import meshrun` must not import pydantic, cloudpickle or rich (they load on first use)."""
    code = "import sys, meshrun; print(sorted(m for m in ('pydantic', 'cloudpickle', 'rich', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ls_says_how_many_more_there_are(capsys):
    from meshrun._cli import main

    jobs = [meshrun.run(["true"], name=f"n{i}") for i in range(4)]
    meshrun.wait(jobs, timeout=60)
    assert main(["ls", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "3 of 4 jobs shown" in out and "--limit 0" in out
    assert main(["ls", "--limit", "0"]) == 0
    out = capsys.readouterr().out
    assert all(j.id in out for j in jobs) and "jobs shown" not in out
    assert main(["ls", "--limit", "-1"]) == 2
