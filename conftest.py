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

from meshrun.testing import wait_until

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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend store) on a free port, started once for the whole run by the
    first test that asks for it; its URI. Tests of experiment tracking (docs/tracking.md) use it."""
    import signal
    import socket
    import subprocess
    import urllib.request

    pytest.importorskip("mlflow")
    d = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    p = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
         "--default-artifact-root", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=open(d / "server.log", "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            if p.poll() is not None:
                raise AssertionError(f"mlflow server exited: {(d / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(uri + "/health", timeout=5) as r:
                    return bytes(r.read()).strip() == b"OK"
            except OSError:
                return False

        wait_until(up, timeout=180, interval=0.3, what="the mlflow server to answer")
        yield uri
    finally:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def wandb_runs():
    """read(folder) -> the run record of every offline W&B run under ``folder/wandb``, read with wandb's own
    datastore reader: [{"id", "name", "group", "tags", "project", "file"}]."""
    pytest.importorskip("wandb")
    import glob

    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    def read(root: Path) -> list[dict]:
        runs = []
        for f in sorted(glob.glob(str(Path(root) / "wandb" / "offline-run-*" / "run-*.wandb"))):
            ds = datastore.DataStore()
            ds.open_for_scan(f)
            while (data := ds.scan_data()) is not None:
                rec = pb.Record()
                rec.ParseFromString(data)
                if rec.WhichOneof("record_type") == "run":
                    r = rec.run
                    runs.append({"id": r.run_id, "name": r.display_name, "group": r.run_group,
                                 "tags": list(r.tags), "project": r.project, "file": f})
                    break
        return runs

    return read


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
