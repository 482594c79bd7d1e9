"""Fixtures shared by every test suite in the repo (core and backends).

Every test runs with its own MESHRUN_HOME, lease directory and configuration, so tests never see each
other's jobs, the user's real job store, or the machine's real GPU leases.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytest.register_assert_rewrite("meshrun.testing")

from meshrun.testing import wait_until  # noqa: E402

# records the backend conformance suite's results (backend x check) in docs/conformance.json
pytest_plugins = ["meshrun.testing"]

REPO = Path(__file__).resolve().parent
FAKES = REPO / "tests" / "fakes"


@pytest.fixture(autouse=True)
def meshrun_home(tmp_path, monkeypatch):
    """An isolated job store, lease directory and config for each test."""
    home = tmp_path / "meshrun-home"
    leases = tmp_path / "leases"
    monkeypatch.setenv("MESHRUN_HOME", str(home))
    monkeypatch.setenv("MESHRUN_LEASE_DIR", str(leases))
    monkeypatch.setenv("MESHRUN_CONFIG", str(tmp_path / "no-such-config.toml"))
    monkeypatch.delenv("MESHRUN_GPUS", raising=False)
    monkeypatch.delenv("MESHRUN_BACKEND", raising=False)
    (tmp_path / "no-such-config.toml").write_text("")
    _reset_meshrun()
    yield home
    _cancel_leftover_jobs(home)
    _stop_fork_servers(home)
    _reset_meshrun()


def _cancel_leftover_jobs(home: Path) -> None:
    """A test that fails half-way must not leave its local jobs running: cancel whatever is still alive."""
    jobs = home / "jobs"
    if not jobs.is_dir() or "meshrun._agent" not in sys.modules:
        return
    from meshrun import _agent

    for d in jobs.iterdir():
        if (d / "state.json").exists() and not (d / "exit.json").exists():
            try:
                _agent.cancel(str(d), grace=1)
            except Exception:
                pass


def _reset_meshrun() -> None:
    if "meshrun._config" in sys.modules:
        from meshrun import _config, _registry, _store

        _registry.reset()
        _config._current = None
        with _store._stores_lock:
            for s in _store._stores.values():
                s.close()
            _store._stores.clear()


def _stop_fork_servers(home: Path) -> None:
    """Ask this test's warm fork server to exit (removing its socket makes it stop within a second)."""
    from meshrun import _local

    path = _local.fork_server_path(home, warn=False)
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


@pytest.fixture
def fake_gpus(tmp_path, monkeypatch):
    """Declare fake GPUs through a fake nvidia-smi on PATH. Call it with a count or a list of names; returns
    a helper whose ``.processes`` list (pid, gpu index) can be changed to fake foreign GPU processes."""

    class Fake:
        def __init__(self):
            self.path = tmp_path / "fake-nvidia-smi.json"
            self.gpus: list[dict] = []
            self.processes: list[dict] = []

        def __call__(self, n: int | list[str] = 4, name: str = "NVIDIA H100 80GB HBM3"):
            names = n if isinstance(n, list) else [name] * n
            self.gpus = [
                {"index": i, "uuid": f"GPU-fake-{i:04d}-{os.getpid()}", "name": nm, "memory_mib": 81559}
                for i, nm in enumerate(names)
            ]
            self.write()
            monkeypatch.setenv("FAKE_NVIDIA_SMI", str(self.path))
            monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ['PATH']}")
            return self

        def add_process(self, pid: int, gpu_index: int, name: str = "python"):
            self.processes.append({"pid": pid, "gpu_uuid": self.gpus[gpu_index]["uuid"], "name": name})
            self.write()

        def clear_processes(self):
            self.processes = []
            self.write()

        def write(self):
            self.path.write_text(json.dumps({"gpus": self.gpus, "processes": self.processes}))

    return Fake()




def proc_alive(pid: int) -> bool:
    """True for a live process, False for a dead or zombie one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.fixture
def helpers():
    class H:
        wait_until = staticmethod(wait_until)
        proc_alive = staticmethod(proc_alive)
        repo = REPO
        fakes = FAKES

    return H
