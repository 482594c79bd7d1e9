"""A backend that does not answer never makes a submit slow or silent.

Real processes throughout: the ``meshrun`` command with a test-only backend plugin installed through an
entry point (a ``*.dist-info`` folder on PYTHONPATH, as a real distribution would be), whose ``check()``
does what a file tells it (hang for 30 s, fail late, answer at once) and appends a line to a calls file on
every call; and the real Slurm backend pointed at a controller address with nothing listening.

This machine is given a price here (``LOCAL_PRICE``) and the jobs ask for a CPU: a free machine that can start a
job now settles it without asking any other backend (tests/test_placement.py), and these submits must ask.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MESHRUN = [sys.executable, "-m", "meshrun"]
LOCAL_PRICE = '[prices.local]\ncpu = 0.01\n'  # see above: so that placement asks every backend

PLUGIN = '''
import os
import time

from meshrun import Availability, Backend, Feature, Offer


def _log(what):
    with open(os.environ["SLOWPOKE_CALLS"], "a") as f:
        f.write(f"{what} {os.getpid()}\\n")


_log("import")
if open(os.environ["SLOWPOKE_MODE"]).read().strip() == "import-hang":
    time.sleep(30)


class Slowpoke(Backend):
    """check() reads SLOWPOKE_MODE: "hang" sleeps 30 s; "late-fail" / "late-ok" answer after 3 s; else at once."""

    name = "slowpoke"
    features = Feature.COMMANDS

    def check(self):
        _log("check")
        mode = open(os.environ["SLOWPOKE_MODE"]).read().strip()
        if mode == "hang":
            time.sleep(30)
        elif mode.startswith("late"):
            time.sleep(3)
            if mode == "late-fail":
                return Availability(False, "the controller refused the connection")
        return Availability(True)

    def offers(self, spec):
        _log("offers")
        return [Offer(backend="slowpoke", where="pool", fits=False, reason="slowpoke makes no real offers")]

    def submit(self, submission, offer=None):
        raise NotImplementedError

    def status(self, ids):
        return {}

    def cancel(self, backend_id):
        pass

    def logs(self, backend_id, *, follow=False):
        return iter(())
'''


class Env:
    def __init__(self, tmp_path: Path, home: Path):
        self.home = home
        site = tmp_path / "site"
        dist = site / "meshrun_slowpoke-1.0.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: meshrun-slowpoke\nVersion: 1.0\n")
        (dist / "entry_points.txt").write_text("[meshrun.backends]\nslowpoke = meshrun_slowpoke:Slowpoke\n")
        (site / "meshrun_slowpoke.py").write_text(PLUGIN)
        self.calls = tmp_path / "calls.txt"
        self.calls.write_text("")
        self.mode = tmp_path / "mode.txt"
        self.config = tmp_path / "config.toml"
        # placement considers this machine and the plugin only, whatever else is installed here
        self.configure('backends = ["local", "slowpoke"]')
        self.env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    "SLOWPOKE_CALLS": str(self.calls), "SLOWPOKE_MODE": str(self.mode),
                    "MESHRUN_CONFIG": str(self.config), "MESHRUN_BACKEND": ""}
        self.set_mode("hang")

    def configure(self, placement: str) -> None:
        self.config.write_text(f"{LOCAL_PRICE}[placement]\n{placement}\n")

    def set_mode(self, mode: str) -> None:
        self.mode.write_text(mode)

    def calls_made(self) -> list[str]:
        """The plugin's calls, imports left out."""
        return [w for w in (line.split()[0] for line in self.calls.read_text().splitlines()) if w != "import"]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([*MESHRUN, *args], capture_output=True, text=True, timeout=120, env=self.env)
        if check and p.returncode != 0:
            raise AssertionError(f"meshrun {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def submit(self, *extra: str) -> tuple[dict, subprocess.CompletedProcess]:
        """``meshrun run -d`` (no backend named); returns (the job folder's plan.json, the process)."""
        p = self.cli("run", "-d", "--cpus", "1", *extra, "--", "true")
        job_id = json.loads(p.stdout)["id"] if "--json" in extra else p.stdout.strip()
        st = json.loads(self.cli("status", "--json", job_id).stdout)
        assert st["backend"] == "local", st
        plan = json.loads((Path(st["job_dir"]) / "plan.json").read_text())
        plan["history"] = st["history"]
        return plan, p

    @property
    def memory(self) -> Path:
        return self.home / f"unresponsive-{os.getuid()}.json"

    def remembered(self) -> dict:
        if not self.memory.exists():
            return {}
        return json.loads(self.memory.read_text())["backends"]


def rejected(plan: dict, backend: str) -> list[str]:
    return [r["reason"] for r in plan["rejected"] if r["backend"] == backend]


@pytest.fixture
def env(tmp_path, meshrun_home) -> Env:
    return Env(tmp_path, meshrun_home)


def test_a_hanging_backend_is_skipped_said_remembered_and_not_asked_again(env):
    # first submit: the plugin hangs in check(); the job goes to this machine all the same
    plan, p = env.submit()
    assert rejected(plan, "slowpoke") == ["not responding (checking availability, >1s)"]
    lines = [line for line in p.stderr.splitlines() if "slowpoke" in line]
    assert len(lines) == 1, p.stderr
    assert "slowpoke is not responding (checking availability, >1s)" in lines[0]
    assert "not asked again for 1m" in lines[0]
    placed = next(h for h in plan["history"] if h["event"] == "placed")
    assert placed["not_responding"] == "slowpoke"
    assert env.calls_made() == ["check"]

    # remembered on disk, for this user only, with what it was doing and when
    mode = env.memory.stat().st_mode
    assert stat.S_IMODE(mode) == 0o600 and stat.S_ISREG(mode)
    mark = env.remembered()["slowpoke"]
    assert mark["doing"] == "checking availability" and mark["limit"] == 1.0
    assert mark["until"] - mark["time"] == pytest.approx(60.0)
    assert not list(env.home.glob("unresponsive-*.tmp.*"))

    # the next submit (a new process) does not call it at all, and says so
    plan, p = env.submit()
    assert env.calls_made() == ["check"]
    (why,) = rejected(plan, "slowpoke")
    assert why.startswith("not responding (checking availability, >1s; ") and "asked again in" in why
    assert "skipping slowpoke: not responding" in p.stderr

    # --json keeps stderr free of it (and stdout is the job's JSON)
    plan, p = env.submit("--json")
    assert "slowpoke" not in p.stderr and env.calls_made() == ["check"]

    # `meshrun backends` asks again (it is the way to look now) and shows it as not responding
    out = json.loads(env.cli("backends", "--json").stdout)
    row = next(b for b in out if b["name"] == "slowpoke")
    assert row["status"] == "not responding" and row["detail"].startswith("checking availability, >1s")
    assert next(b for b in out if b["name"] == "local")["status"] == "ready"
    assert env.calls_made() == ["check", "check"]
    table = env.cli("backends").stdout
    assert next(line for line in table.splitlines() if line.startswith("slowpoke")).split()[1:3] == [
        "not", "responding"]

    # once it answers, one success forgets it, and submits ask it again
    env.set_mode("ok")
    out = json.loads(env.cli("backends", "--json").stdout)
    assert next(b for b in out if b["name"] == "slowpoke")["status"] == "ready"
    assert "slowpoke" not in env.remembered()
    plan, p = env.submit()
    assert rejected(plan, "slowpoke") == ["slowpoke makes no real offers"]
    assert env.calls_made()[-2:] == ["check", "offers"] and "slowpoke" not in p.stderr


def _plan_then_wait_for_the_thread(env: Env) -> dict:
    """A process that plans (without waiting for the plugin), then lives on until the plugin's thread ends."""
    script = textwrap.dedent("""
        import json, sys, threading
        import meshrun
        p = meshrun.plan(meshrun.JobSpec(command=["true"]), raise_on_empty=False)
        why = [r for o, r in p.rejected if o.backend == "slowpoke"]
        for t in threading.enumerate():
            if t.name == "meshrun-offers-slowpoke":
                t.join(60)
        print(json.dumps({"chosen": p.chosen.backend, "why": why}))
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env.env)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["chosen"] == "local" and out["why"] == ["not responding (checking availability, >1s)"]
    assert "slowpoke is not responding" in p.stderr
    return out


def test_one_process_is_told_once(env):
    """A notebook or script that submits in a loop hears about the backend once, not at every submit."""
    script = textwrap.dedent("""
        import meshrun
        for _ in range(3):
            p = meshrun.plan(meshrun.JobSpec(command=["true"]), raise_on_empty=False)
            assert [r for o, r in p.rejected if o.backend == "slowpoke"][0].startswith("not responding")
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env.env)
    assert p.returncode == 0, p.stderr
    (line,) = [line for line in p.stderr.splitlines() if "slowpoke" in line]
    assert line.startswith("meshrun: gathering offers is slow (") and line.endswith(
        "slowpoke is not responding (checking availability, >1s): skipped, and not asked again for 1m")
    assert env.calls_made() == ["check"]


def test_a_plugin_whose_import_hangs_holds_up_nothing(env):
    env.set_mode("import-hang")
    plan, p = env.submit()
    assert rejected(plan, "slowpoke") == ["not responding (loading the plugin, >1s)"]
    assert "slowpoke is not responding (loading the plugin, >1s)" in p.stderr
    assert env.remembered()["slowpoke"]["doing"] == "loading the plugin"
    out = json.loads(env.cli("backends", "--json").stdout)
    by = {b["name"]: b for b in out}
    assert by["slowpoke"]["status"] == "not responding" and by["local"]["status"] == "ready"
    assert by["slowpoke"]["detail"].startswith("loading the plugin, >1s")


def test_a_late_answer_in_the_background_refreshes_the_memory(env):
    # it fails after 3 s: remembered with what it said
    env.set_mode("late-fail")
    _plan_then_wait_for_the_thread(env)
    mark = env.remembered()["slowpoke"]
    assert mark["reason"].startswith("the controller refused the connection (after ")
    assert "last answer: the controller refused the connection" in env.cli("backends").stdout  # asks again: 3 s

    # a minute later (the memory gone), it answers after 3 s: slow, but there; no memory of it is kept
    env.memory.unlink()
    env.set_mode("late-ok")
    _plan_then_wait_for_the_thread(env)
    assert "slowpoke" not in env.remembered()


def test_a_backend_named_alone_is_waited_for_with_a_line_that_says_so(env):
    env.set_mode("hang")
    env.submit()
    assert "slowpoke" in env.remembered()
    # `offers --backend` asks the named backend despite the memory, says what it waits for, and gives up at
    # the timeout
    p = env.cli("offers", "--backend", "slowpoke", "--offers-timeout", "2", "--json", check=False)
    assert p.returncode == 0, p.stderr
    why = [r["reason"] for r in json.loads(p.stdout)["rejected"] if r["offer"]["backend"] == "slowpoke"]
    assert why == ["not responding (checking availability, >2s)"]
    assert env.calls_made() == ["check", "check"]
    p = env.cli("offers", "--backend", "slowpoke", "--offers-timeout", "2", check=False)
    assert "still waiting for slowpoke (checking availability" in p.stderr, p.stderr
    assert "not responding (checking availability, >2s)" in p.stdout


def test_respond_within_0_turns_the_limit_and_the_memory_off(env):
    env.configure('backends = ["local", "slowpoke"]\nrespond_within = 0\noffers_timeout = 2')
    plan, _ = env.submit()
    assert rejected(plan, "slowpoke") == ["did not answer within 2s (offers_timeout; it was checking availability)"]
    assert not env.memory.exists()
    env.submit()
    assert env.calls_made() == ["check", "check"]  # asked, and waited for, every time


def test_a_table_of_limits_and_a_shorter_memory(env):
    env.configure('backends = ["local", "slowpoke"]\nskip_unresponsive_for = "5m"\n'
                  '[placement.respond_within]\nslowpoke = 2\ndefault = 1')
    plan, p = env.submit()
    assert rejected(plan, "slowpoke") == ["not responding (checking availability, >2s)"]
    assert "not asked again for 5m" in p.stderr
    mark = env.remembered()["slowpoke"]
    assert mark["limit"] == 2.0 and mark["until"] - mark["time"] == pytest.approx(300.0)


@pytest.mark.parametrize("placement, key", [
    ("respond_within = -1", "placement.respond_within"),
    ('respond_within = "fast"', "placement.respond_within"),
    ('[placement.respond_within]\nslowpoke = "x"', "placement.respond_within.slowpoke"),
    ('skip_unresponsive_for = "soon"', "placement.skip_unresponsive_for"),
])
def test_bad_settings_are_errors_naming_the_key(env, placement, key):
    env.configure(placement)
    p = env.cli("run", "-d", "--", "true", check=False)
    assert p.returncode == 2 and key in p.stderr, p.stderr
    assert env.calls_made() == []


def test_the_memory_is_never_written_through_a_link(env, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    env.home.mkdir(parents=True, exist_ok=True)
    env.memory.symlink_to(victim)
    plan, _ = env.submit()
    assert rejected(plan, "slowpoke") == ["not responding (checking availability, >1s)"]
    assert victim.read_text() == "keep me\n"
    assert not env.memory.is_symlink() and stat.S_IMODE(env.memory.stat().st_mode) == 0o600
    assert "slowpoke" in env.remembered()


def test_a_lock_file_someone_else_holds_costs_a_record_never_a_submit(env):
    """In a shared MESHRUN_HOME another user could create this user's lock file and hold a lock on it."""
    env.home.mkdir(parents=True, exist_ok=True)
    lock = Path(f"{env.memory}.lock")
    lock.touch(mode=0o666)
    os.chown(lock, 65534, 65534)  # nobody's
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(lock)!r}, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        plan, p = env.submit()
        assert rejected(plan, "slowpoke") == ["not responding (checking availability, >1s)"]
        assert "slowpoke is not responding (checking availability, >1s): skipped" in p.stderr
        assert "not asked again" not in p.stderr  # and it does not say so
        assert not env.memory.exists()  # not remembered: the lock is not this user's
    finally:
        holder.kill()
        holder.wait()


# ---- the real Slurm backend, its controller down ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("sinfo") is None, reason="Slurm's client tools are not installed")
def test_slurm_with_its_controller_down_costs_one_second_once(tmp_path, meshrun_home):
    """As after a reboot: Slurm is configured, its controller does not run (nothing listens at its address);
    sinfo alone would take ~9 s to give up."""
    conf = tmp_path / "slurm.conf"
    conf.write_text(textwrap.dedent(f"""\
        ClusterName=down
        SlurmctldHost=localhost(127.0.0.1)
        SlurmctldPort={_free_port()}
        AuthType=auth/munge
        NodeName=n1 CPUs=1 State=UNKNOWN
        PartitionName=debug Nodes=n1 Default=YES
    """))
    bin_dir = tmp_path / "bin"  # sinfo, counted on its way to the real one
    bin_dir.mkdir()
    calls = tmp_path / "sinfo-calls.txt"
    calls.write_text("")
    (bin_dir / "sinfo").write_text(f"#!/bin/sh\necho sinfo >> {calls}\nexec {shutil.which('sinfo')} \"$@\"\n")
    (bin_dir / "sinfo").chmod(0o755)
    config = tmp_path / "config.toml"
    config.write_text(LOCAL_PRICE + '[placement]\nbackends = ["local", "slurm"]\n')
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "MESHRUN_CONFIG": str(config)}

    def run() -> tuple[dict, str]:
        p = subprocess.run([*MESHRUN, "run", "-d", "--cpus", "1", "--", "true"], capture_output=True, text=True,
                           timeout=120, env=env)
        assert p.returncode == 0, p.stderr
        st = json.loads(subprocess.run([*MESHRUN, "status", "--json", p.stdout.strip()], capture_output=True,
                                       text=True, timeout=60, env=env, check=True).stdout)
        assert st["backend"] == "local"
        return json.loads((Path(st["job_dir"]) / "plan.json").read_text()), p.stderr

    try:
        _slurm_down_checks(run, calls, env, meshrun_home)
    finally:
        _wait_for_leftovers(str(conf))


def _wait_for_leftovers(marker: str, within: float = 60.0) -> None:
    """The Slurm calls placement stopped waiting for end on their own (sinfo gives up after ~9 s): wait for
    them, so the test leaves none behind (the warm fork server of the local backend is stopped by the
    fixture)."""
    import time

    end = time.monotonic() + within
    while time.monotonic() < end:
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
                comm, _, rest = Path(f"/proc/{pid}/stat").read_text().partition(" (")[2].rpartition(")")
                state = rest.split()[0]
            except (OSError, IndexError):
                continue
            if comm in ("sinfo", "scontrol") and marker.encode() in environ and state != "Z":
                alive.append(pid)
        if not alive:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes still running {within:g}s later: {alive}")


def _slurm_down_checks(run, calls: Path, env: dict, meshrun_home: Path) -> None:
    plan, err = run()
    assert rejected(plan, "slurm") == ["not responding (checking availability, >1s)"]
    assert "slurm is not responding (checking availability, >1s)" in err
    mark = json.loads((meshrun_home / f"unresponsive-{os.getuid()}.json").read_text())["backends"]["slurm"]
    assert mark["doing"] == "checking availability"
    assert calls.read_text().count("sinfo") == 1

    plan, err = run()
    assert rejected(plan, "slurm")[0].startswith("not responding (checking availability, >1s; ")
    assert "skipping slurm" in err
    assert calls.read_text().count("sinfo") == 1  # not asked again

    p = subprocess.run([*MESHRUN, "backends"], capture_output=True, text=True, timeout=60, env=env)
    assert next(line for line in p.stdout.splitlines() if line.startswith("slurm")).split()[1:3] == [
        "not", "responding"]
