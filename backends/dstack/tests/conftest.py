"""Fixtures of the dstack backend's tests: a real ``dstack server`` (scripts/dstack-server.sh) on 127.0.0.1.

The server is started once per test session in its own temporary state folder (its own HOME and
DSTACK_SERVER_DIR, so nothing touches a user's ~/.dstack), in the background as soon as collection
shows that service tests will run, so its start-up overlaps the tests that run before them. Tests use a
non-admin user created for the session (its token is the one whose hygiene is checked: the server
prints only the admin token in its own log).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
import threading
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPT = ROOT / "scripts" / "dstack-server.sh"
SERVER_VENV = ROOT / ".server-venv"


class DstackServer:
    def __init__(self, state: Path):
        self.state = state
        self.env: dict[str, str] = {}
        self.user_token: str | None = None
        self.user = "meshrun-tester"

    # -- the script
    def _script(self, cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {**os.environ, "DSTACK_TEST_DIR": str(self.state)}
        return subprocess.run(["bash", str(SCRIPT), cmd], env=env, capture_output=True, text=True, timeout=timeout)

    def up(self) -> None:
        p = self._script("up")
        if p.returncode != 0:
            raise RuntimeError(f"dstack-server.sh up failed ({p.returncode}): {p.stderr[-3000:]}")
        self.env = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)

    def down(self) -> None:
        self._script("down", timeout=60)

    def restart(self) -> None:
        self.down()
        self.up()

    @property
    def url(self) -> str:
        return self.env["DSTACK_TEST_URL"]

    @property
    def admin_token(self) -> str:
        return self.env["DSTACK_TEST_TOKEN"]

    @property
    def server_dir(self) -> Path:
        return Path(self.env["DSTACK_TEST_SERVER_DIR"])

    @property
    def log(self) -> Path:
        return Path(self.env["DSTACK_TEST_LOG"])

    # -- the API, as the admin
    def api(self, path: str, body: dict, token: str | None = None) -> object:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token or self.admin_token}"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
        return json.loads(data) if data else None

    def ensure_user(self) -> str:
        if self.user_token is None:
            users = self.api("/api/users/list", {})
            names = [u["username"] for u in (users if isinstance(users, list) else users.get("users", []))]
            if self.user not in names:
                self.api("/api/users/create", {"username": self.user, "global_role": "user"})
                self.api("/api/projects/main/add_members",
                         {"members": [{"username": self.user, "project_role": "user"}]})
            self.user_token = self.api("/api/users/get_user", {"username": self.user})["creds"]["token"]
        return self.user_token


_server: DstackServer | None = None
_start_error: list[BaseException] = []
_started = threading.Event()


def _start_in_background() -> None:
    global _server
    if _server is not None:
        return
    _server = DstackServer(Path(tempfile.mkdtemp(prefix="meshrun-dstack-test-")))
    atexit.register(_stop_at_exit, _server)  # also when the session is interrupted before the fixture ends

    def run() -> None:
        try:
            _server.up()
        except BaseException as e:  # reported by the fixture
            _start_error.append(e)
        finally:
            _started.set()

    threading.Thread(target=run, name="dstack-server-start", daemon=True).start()


def _stop_at_exit(server: DstackServer) -> None:
    if server.state.exists():
        try:
            server.down()
        finally:
            shutil.rmtree(server.state, ignore_errors=True)


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: a run that skips these tests starts no server
def pytest_collection_modifyitems(session, config, items):
    mine = [i for i in items if str(i.path).startswith(str(HERE)) and i.get_closest_marker("service")]
    if mine and (SERVER_VENV / "bin" / "dstack").exists():
        _start_in_background()


@pytest.fixture(autouse=True)
def no_user_dstack_config(monkeypatch, tmp_path):
    """No test reads the machine user's ~/.dstack/config.yml (tests that want one write their own)."""
    monkeypatch.setenv("MESHRUN_DSTACK_DSTACK_CONFIG", str(tmp_path / "no-dstack-config.yml"))
    for k in ("MESHRUN_DSTACK_ENDPOINT", "MESHRUN_DSTACK_TOKEN", "MESHRUN_DSTACK_PROJECT"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="session")
def dstack_server():
    if not (SERVER_VENV / "bin" / "dstack").exists():
        pytest.fail("no dstack server installed: run backends/dstack/scripts/install.sh")
    _start_in_background()
    if not _started.wait(timeout=400):
        pytest.fail("the dstack server did not start in time")
    if _start_error:
        pytest.fail(f"the dstack server did not start: {_start_error[0]}")
    assert _server is not None
    yield _server
    _server.down()
    shutil.rmtree(_server.state, ignore_errors=True)


@pytest.fixture
def dstack(dstack_server, monkeypatch, tmp_path):
    """The meshrun config points at the test server as the session's non-admin user; returns the server."""
    import meshrun

    token = dstack_server.ensure_user()
    if not dstack_server.url:
        dstack_server.up()
    monkeypatch.setenv("MESHRUN_DSTACK_ENDPOINT", dstack_server.url)
    monkeypatch.setenv("MESHRUN_DSTACK_TOKEN", token)
    monkeypatch.setenv("MESHRUN_DSTACK_PROJECT", "main")
    monkeypatch.setenv("MESHRUN_DSTACK_DSTACK_CONFIG", str(tmp_path / "no-dstack-config.yml"))
    monkeypatch.setenv("MESHRUN_DSTACK_REMOTE_DIR", str(tmp_path / "task-root"))
    meshrun.configure()
    yield dstack_server
    meshrun.configure()
