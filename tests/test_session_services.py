"""The test run stops what it started and removes the OS users it created, and nothing else: conftest.py's
SessionServices, driven here with a throwaway service (a `sleep` behind an up/status/down script) and, as root, a
throwaway OS user, in a private state folder, so the machine's real test services are never touched."""

from __future__ import annotations

import os
import pwd
import subprocess
import uuid

import pytest

SCRIPT = """#!/usr/bin/env bash
d=$(dirname "$0")
alive() { [ -s "$d/pid" ] && [ -d "/proc/$(cat "$d/pid")" ] && ! grep -q '^State:.*Z' "/proc/$(cat "$d/pid")/status"; }
case $1 in
  up) alive && exit 0
      setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $! >"$d/pid"
      if [ -n "${MKUSER:-}" ] && ! id "$MKUSER" >/dev/null 2>&1; then useradd -M -s /bin/false "$MKUSER"; fi ;;
  status) alive ;;
  down) alive && kill "$(cat "$d/pid")"; rm -f "$d/pid"; echo down >>"$d/downs" ;;
esac
"""


@pytest.fixture
def service(tmp_path):
    """A fake service: `bash script up|status|down`; .pid() its process, .downs() how often it was stopped."""
    d = tmp_path / "svc"
    d.mkdir()
    (d / "svc.sh").write_text(SCRIPT)

    class S:
        script = d / "svc.sh"

        @staticmethod
        def pid() -> int:
            return int((d / "pid").read_text())

        @staticmethod
        def downs() -> int:
            return len((d / "downs").read_text().split()) if (d / "downs").exists() else 0

    yield S
    subprocess.run(["bash", str(S.script), "down"], capture_output=True)


@pytest.fixture
def runs(session_services, tmp_path):
    """Make SessionServices of made-up test runs (by process id) sharing one private state folder."""
    kind = type(session_services)
    return lambda pid=None: kind(tmp_path / "state", pid=pid)


@pytest.fixture
def other_run():
    """The process id of another test run that is still going."""
    p = subprocess.Popen(["sleep", "120"])
    yield p.pid
    p.kill()
    p.wait()


def test_a_service_this_run_started_is_stopped_at_its_end(runs, service, helpers):
    run = runs()
    assert run.up("svc", service.script).returncode == 0
    pid = service.pid()
    assert helpers.proc_alive(pid)
    assert run.finish() == [f"svc: stopped (bash {service.script} down)"]
    helpers.wait_until(lambda: not helpers.proc_alive(pid), 10, what="the service to stop")
    assert service.downs() == 1 and not (run.state_dir / "svc").exists()


def test_a_service_found_running_is_left_running(runs, service, helpers):
    subprocess.run(["bash", str(service.script), "up"], check=True)  # up before the run, by someone else
    run = runs()
    assert run.up("svc", service.script).returncode == 0
    assert run.finish() == []
    assert helpers.proc_alive(service.pid()) and service.downs() == 0 and not (run.state_dir / "svc").exists()


def test_the_last_live_run_out_stops_it(runs, service, other_run, helpers):
    first, second = runs(), runs(pid=other_run)
    first.up("svc", service.script)
    second.up("svc", service.script)  # finds it up, but a run started it: whoever is last stops it
    assert first.finish() == [f"svc: left running, still used by test run(s) {other_run}"]
    assert helpers.proc_alive(service.pid())
    assert second.finish() == [f"svc: stopped (bash {service.script} down)"]
    assert service.downs() == 1


def test_a_run_that_died_without_finishing_does_not_keep_it_running(runs, service):
    dead = subprocess.Popen(["true"])
    dead.wait()
    crashed, run = runs(pid=dead.pid), runs()
    crashed.up("svc", service.script)  # and never finishes
    run.up("svc", service.script)
    assert run.finish() == [f"svc: stopped (bash {service.script} down)"]
    assert not (run.state_dir / "svc").exists()


def test_keep_leaves_it_recorded_for_a_later_run(runs, service, helpers):
    run = runs()
    run.up("svc", service.script)
    assert run.finish(keep=True) == []
    assert helpers.proc_alive(service.pid()) and (run.state_dir / "svc" / "started").exists()
    later = runs()
    later.up("svc", service.script)
    assert later.finish() == [f"svc: stopped (bash {service.script} down)"]


def test_a_run_that_used_nothing_does_nothing(runs):
    run = runs()
    assert run.finish() == [] and not run.state_dir.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create OS users")
def test_users_the_run_created_are_removed_and_others_kept(runs, service):
    by_script, by_test = f"mrt{uuid.uuid4().hex[:6]}", f"mrt{uuid.uuid4().hex[:6]}"
    run = runs()
    try:
        # the service's script creates one user; "nobody" was there before and is never removed
        run.up("svc", service.script, users=(by_script, "nobody"), env={**os.environ, "MKUSER": by_script})
        subprocess.run(["useradd", "-M", "-s", "/bin/false", by_test], check=True)  # as test_leases does
        run.created_user("test-user", by_test)
        assert run.finish() == [f"test-user: removed user {by_test}", f"svc: stopped (bash {service.script} down)",
                                f"svc: removed user {by_script}"]
        for user in (by_script, by_test):
            with pytest.raises(KeyError):
                pwd.getpwnam(user)
        pwd.getpwnam("nobody")
    finally:
        for user in (by_script, by_test):
            subprocess.run(["userdel", "-f", user], capture_output=True)
