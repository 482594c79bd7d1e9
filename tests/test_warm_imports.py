"""Warm imports: the local fork server imports the installed packages function jobs use (torch & co.), so the
next job starts with them loaded; a package that makes forking unsafe, or one upgraded under the server, is
never forked from. Real fork servers, real jobs; the "installed packages" are folders under a
``site-packages`` directory put on PYTHONPATH."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import meshrun
from meshrun import _local
from meshrun.testing import wait_until


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A site-packages folder on PYTHONPATH (for the server this test's first submit starts, and its jobs)."""
    d = tmp_path / "lib" / "site-packages"
    d.mkdir(parents=True)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(d), os.environ.get("PYTHONPATH")])))
    return d


def _package(site: Path, name: str, body: str) -> Path:
    (site / name).mkdir()
    f = site / name / "__init__.py"
    f.write_text(body)
    return f


def _warm_file() -> Path:
    path = _local.fork_server_path(meshrun.get_config().home, warn=False)
    assert path is not None
    return Path(path + ".warm.json")


def _warm() -> dict:
    try:
        return json.loads(_warm_file().read_text())
    except (OSError, ValueError):
        return {}


def _run(fn):
    return fn.submit().result(timeout=60)


@meshrun.job()
def uses_probe():
    import mr_warm_probe

    return mr_warm_probe.VALUE


@meshrun.job()
def probe_is_loaded():
    import sys

    return "mr_warm_probe" in sys.modules


@meshrun.job()
def uses_threader():
    import mr_warm_threader  # noqa: F401

    return True


@meshrun.job()
def threader_is_loaded():
    import sys

    return "mr_warm_threader" in sys.modules


@meshrun.job()
def warm_file_in_env():
    import os

    return os.environ.get("MESHRUN_WARM_FILE")


def test_a_package_a_job_imported_is_warm_for_the_next_job(site):
    _package(site, "mr_warm_probe", "VALUE = 1\n")
    assert _run(probe_is_loaded) is False  # a cold server: nothing of the job's is loaded
    assert _run(uses_probe) == 1
    assert "mr_warm_probe" in _warm().get("modules", [])
    # the server hands over to a successor that has imported it; from then on jobs start with it loaded
    wait_until(lambda: _run(probe_is_loaded), timeout=60, what="a fork server with mr_warm_probe imported")
    # the job's environment does not carry the server's bookkeeping
    assert _run(warm_file_in_env) is None


def test_an_upgraded_package_is_never_served_stale(site):
    f = _package(site, "mr_warm_probe", "VALUE = 1\n")
    assert _run(uses_probe) == 1
    wait_until(lambda: _run(probe_is_loaded), timeout=60, what="a fork server with mr_warm_probe imported")
    f.write_text("VALUE = 2\n")  # pip install --upgrade, as far as the server can tell
    later = time.time() + 5
    os.utime(f, (later, later))
    assert _run(uses_probe) == 2  # the stale server does not fork it: the job starts afresh and sees the new one


def test_a_package_that_starts_a_thread_is_marked_unsafe_and_never_warmed(site):
    _package(site, "mr_warm_threader", "import threading, time\n"
                                       "threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n")
    assert _run(uses_threader) is True
    wait_until(lambda: "mr_warm_threader" in _warm().get("unsafe", []), timeout=60,
               what="the successor server to find the thread and mark the package")
    assert "Python thread" in _warm()["why"]["mr_warm_threader"]
    # the server started again without it: jobs still go through a warm server, and it is not loaded there
    path = _local.fork_server_path(meshrun.get_config().home, warn=False)
    wait_until(lambda: path is not None and os.path.exists(path), timeout=60, what="the restarted fork server")
    assert _run(threader_is_loaded) is False
    assert _run(uses_threader) is True  # the job itself may still use it


def test_warm_imports_can_be_switched_off(site):
    meshrun.configure({"backends": {"local": {"warm_imports": False}}})
    _package(site, "mr_warm_probe", "VALUE = 1\n")
    assert _run(uses_probe) == 1
    time.sleep(1.5)  # a server tick
    assert not _warm_file().exists()
