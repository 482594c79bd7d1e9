"""Fixtures of the SkyPilot suite.

Every SkyPilot test runs with its own SkyPilot home (``HOME`` of this process and of the API server it
starts): the catalog snapshot of ``shared/catalogs`` copied where SkyPilot reads catalogs, an API server on
a free port started once per session, and nothing of the user's real ``~/.sky``. At the end of the session
the server is stopped and no process that SkyPilot started for this home (API server, ``subprocess_daemon.py``,
ssh clients) may be left; the end-to-end module also checks that nothing of the Slurm login user is left.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
SCRIPTS = HERE.parent / "scripts"


def snapshot_dir() -> Path | None:
    """The price catalog snapshot that ships inside the meshrun package."""
    import meshrun

    p = Path(meshrun.__file__).resolve().parent / "catalogs" / "v8"
    return p if p.is_dir() else None


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def pick_api_port() -> int:
    """A port for the API server whose companion queue-manager port (SkyPilot derives it) is free too."""
    for _ in range(200):
        port = random.randint(47000, 49000)
        queue = 50000 + (50011 - 50000 + (port - 46580)) % 10000
        if _free(port) and _free(queue):
            return port
    raise RuntimeError("no free port pair for the SkyPilot API server")


def processes_with_home(home: str) -> list[tuple[int, str]]:
    """Live processes (other than this one) whose environment has HOME=<home>: what SkyPilot started for it."""
    out = []
    want = f"HOME={home}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{name}/environ").read_bytes()
            if want not in env.split(b"\0"):
                continue
            stat = Path(f"/proc/{name}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                continue
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out.append((int(name), cmd.strip()))
    return out


def end_processes(procs: list[tuple[int, str]]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, _ in procs:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and _alive(p) for p, _ in procs):
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class SkyEnv:
    """The SkyPilot home of this test session."""

    def __init__(self, home: Path, port: int):
        self.home = home
        self.port = port
        self.started_server = False

    def environ(self) -> dict[str, str]:
        return {"HOME": str(self.home), "SKYPILOT_API_SERVER_LOCAL_PORT": str(self.port),
                "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}

    def apply(self):
        """Context: this process's environment points at the session's SkyPilot home and server."""
        import contextlib

        @contextlib.contextmanager
        def cm():
            saved = {k: os.environ.get(k) for k in self.environ()}
            os.environ.update(self.environ())
            try:
                yield self
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

        return cm()

    def start_server(self) -> None:
        from meshrun_skypilot._server import ApiServer
        from meshrun_skypilot._backend import SkyPilotSettings

        srv = ApiServer(SkyPilotSettings(port=self.port))
        with self.apply():
            if not srv.health()[0]:
                t0 = time.monotonic()
                srv.start()
                self.started_server = True
                print(f"[skypilot] API server on port {self.port} started in {time.monotonic() - t0:.1f}s")

    def stop(self) -> list[tuple[int, str]]:
        """Stop the API server and end what SkyPilot left for this home; returns what had to be killed
        after `sky api stop` (ssh clients, subprocess_daemon.py)."""
        if "sky" in __import__("sys").modules or self.started_server:
            with self.apply():
                try:
                    from sky.client import sdk

                    sdk.api_stop()
                except Exception as e:  # report below through the process check
                    print(f"[skypilot] sky api stop: {type(e).__name__}: {e}")
        time.sleep(0.5)
        left = processes_with_home(str(self.home))
        end_processes(left)
        return left


@pytest.fixture(scope="session")
def sky_env(tmp_path_factory) -> SkyEnv:
    home = tmp_path_factory.mktemp("skyhome")
    env = SkyEnv(home, pick_api_port())
    snap = snapshot_dir()
    if snap is not None:
        from meshrun_skypilot._catalog import install_catalog

        install_catalog(snap, home / ".sky" / "catalogs" / "v8")
    yield env
    left = env.stop()
    survivors = processes_with_home(str(home))
    assert not survivors, f"SkyPilot processes survived the session's teardown: {survivors}"
    if left:
        print(f"[skypilot] ended {len(left)} process(es) that outlived `sky api stop`: "
              + "; ".join(c[:80] for _, c in left))


@pytest.fixture(autouse=True)
def sky_home(sky_env, monkeypatch) -> SkyEnv:
    """Every test of this suite runs with the session's SkyPilot home (HOME, API server port) in its
    environment, so SkyPilot (imported on first use, with paths fixed at import) never sees the real ~/.sky."""
    for k, v in sky_env.environ().items():
        monkeypatch.setenv(k, v)
    return sky_env


@pytest.fixture
def free_api_port() -> int:
    return pick_api_port()


@pytest.fixture
def sky_server(sky_home) -> SkyEnv:
    """The session's API server, started on first use."""
    sky_home.start_server()
    return sky_home


@pytest.fixture
def backend(sky_server, meshrun_home):
    """The skypilot backend of this test's meshrun config, on the session's API server."""
    import meshrun

    meshrun.configure({"backends": {"skypilot": {"port": sky_server.port}}})
    return meshrun.get_backend("skypilot")


# ---- SkyPilot on the repo's test Slurm cluster (test_e2e.py, test_data.py) -------------------------------

SCRIPT = SCRIPTS / "skypilot-slurm.sh"
SLURM_CLUSTER_SCRIPT = REPO / "backends" / "slurm" / "scripts" / "slurm-cluster.sh"
SKY_USER = os.environ.get("SKY_SLURM_USER", "meshsky")


def _facts(out: str) -> dict[str, str]:
    facts = {}
    for line in out.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            facts[k] = v.strip("'")
    return facts


def _user_processes(user: str) -> list[str]:
    p = subprocess.run(["ps", "-o", "pid=,args=", "-u", user], capture_output=True, text=True)
    return [l.strip() for l in p.stdout.splitlines() if l.strip()]


@pytest.fixture(scope="module")
def slurm_sky(sky_env, session_services):
    """SkyPilot on the repo's test Slurm cluster, for one test module: `skypilot-slurm.sh up`, its client config
    in the session's SkyPilot home and `sky check`; at the module's end every cluster of this home is taken
    down, the login node stopped, and no process of its user may be left. Returns the script's facts."""
    if os.geteuid() != 0:
        pytest.skip("the SkyPilot-on-Slurm setup needs root (bash backends/skypilot/scripts/skypilot-slurm.sh up)")
    if shutil.which("sinfo") is None and shutil.which("apt-get") is None:
        pytest.skip("no Slurm here")
    t0 = time.monotonic()
    # `up` also starts the Slurm cluster: stopped at the end of the test run if it was not up before, like the
    # users `up` creates
    session_services.use("slurm-cluster", was_up=True)
    cluster_was_up = subprocess.run(["bash", str(SLURM_CLUSTER_SCRIPT), "status"], capture_output=True).returncode == 0
    with session_services.creating_users("slurm-cluster", ("slurmrest",)), \
            session_services.creating_users("skypilot-login-user", (SKY_USER,)):
        p = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=900)
    session_services.use("slurm-cluster", was_up=cluster_was_up, down=["bash", str(SLURM_CLUSTER_SCRIPT), "down"])
    if p.returncode != 0:
        pytest.fail(f"skypilot-slurm.sh up failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    facts = _facts(subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True, check=True).stdout)
    (sky_env.home / ".slurm").mkdir(exist_ok=True)
    shutil.copyfile(facts["SKY_SLURM_CONFIG"], sky_env.home / ".slurm" / "config")
    with sky_env.apply():
        sky_env.start_server()
        from sky.client import sdk

        enabled = sdk.get(sdk.check(("slurm",), False))
    print(f"[skypilot] Slurm set up and checked in {time.monotonic() - t0:.1f}s: {enabled}")
    yield facts
    # teardown: clusters of this home, the login node, and everything SkyPilot left for its user
    with sky_env.apply():
        from sky.client import sdk

        try:
            for c in sdk.get(sdk.status(all_users=True)) or []:
                sdk.get(sdk.down(c["name"] if isinstance(c, dict) else c.name))
        except Exception as e:
            print(f"[skypilot] teardown: {type(e).__name__}: {e}")
        # leave the session's SkyPilot home as it was: no cloud enabled (the offline tests rely on it)
        (sky_env.home / ".slurm" / "config").unlink(missing_ok=True)
        try:
            sdk.get(sdk.check(("slurm",), False))
        except Exception as e:
            print(f"[skypilot] teardown: sky check: {type(e).__name__}: {e}")
    subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, text=True, timeout=300)
    left = _user_processes(facts["SKY_SLURM_USER"])
    assert not left, f"processes of {facts['SKY_SLURM_USER']} survived the teardown: {left}"


@pytest.fixture
def sky(slurm_sky, sky_server, meshrun_home, tmp_path, monkeypatch):
    """The skypilot backend launching onto the test Slurm cluster, from a fresh working folder."""
    import meshrun

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    meshrun.configure({"backends": {"skypilot": {"port": sky_server.port, "infra": slurm_sky["SKY_SLURM_INFRA"],
                                                  "idle_minutes": 15}}})
    return meshrun.get_backend("skypilot")
