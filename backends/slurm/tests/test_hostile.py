"""The host agent on the cluster (login-node mode), against another user and against planted files: a copy
at the upload path is trusted only after its full SHA-256 is checked, every job checks it again in the
process that runs it, and a remote_dir other users may write to is refused with the fix."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import meshrun

from .test_login import login_node  # noqa: F401  (the login node of the login-mode tests, reused)

pytestmark = pytest.mark.service
JS = meshrun.JobState

pytest.importorskip("meshrun_ssh")

RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
ATTACKER = "nobody"  # a second real OS user, always present


@pytest.fixture
def remote(login_node, slurm):  # noqa: F811
    """configure(remote_dir) -> the slurm backend through the login node, keeping its files in remote_dir."""
    facts, _ = login_node
    made = []

    def configure(remote_dir: Path):
        made.append(remote_dir)
        meshrun.configure({"backends": {"slurm": {
            "login_host": {"host": facts["LOGIN_HOST"], "port": int(facts["LOGIN_PORT"]),
                           "user": facts["LOGIN_USER"], "key": facts["LOGIN_KEY"]},
            "ssh": {"known_hosts": facts["LOGIN_KNOWN_HOSTS"]},
            "remote_dir": str(remote_dir), "python": sys.executable, "query_interval": 0.3}}})
        b = meshrun.get_backend("slurm")
        assert not b.shared_filesystem
        return b

    yield configure
    for d in made:
        shutil.rmtree(d.parent if d.parent.name.startswith("mr-hostile-") else d, ignore_errors=True)


def _agent_name() -> tuple[str, str]:
    sha = hashlib.sha256(Path(meshrun.agent_file()).read_bytes()).hexdigest()
    return f"agent-{sha[:16]}.py", sha


def _evil(marker: Path) -> str:
    """A stand-in agent that, if it ever ran, would leave ``marker`` behind (and pretend to succeed)."""
    return f"import pathlib, sys\npathlib.Path({str(marker)!r}).write_text('ran')\nsys.exit(0)\n"


def _scratch() -> Path:
    d = Path("/var/tmp") / f"mr-hostile-{uuid.uuid4().hex[:8]}"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    return d


def _as_attacker(*argv: str) -> None:
    subprocess.run([RUNUSER, "-u", ATTACKER, "--", *argv], check=True, capture_output=True, timeout=30)


@pytest.mark.parametrize("how", ["content", "symlink"])
def test_planted_agent_at_the_upload_path_is_replaced_not_run(remote, how):
    """A file already at the agent's upload path (other content; or a symbolic link to another user's
    file) is never run: the upload replaces it, and the job runs the genuine agent."""
    base = _scratch()
    rd = base / "remote"
    (rd / "agent").mkdir(parents=True, mode=0o700)
    marker = base / "tampered-agent-ran"
    name, sha = _agent_name()
    planted = rd / "agent" / name
    if how == "content":
        planted.write_text(_evil(marker))
    else:
        evil_dir = base / "attacker"
        evil_dir.mkdir(mode=0o755)
        shutil.chown(evil_dir, ATTACKER)
        _as_attacker("sh", "-c", f"printf '%s' \"$1\" > {evil_dir}/agent.py", "sh", _evil(marker))
        planted.symlink_to(evil_dir / "agent.py")
    b = remote(rd)
    job = meshrun.run(["sh", "-c", "echo genuine"], backend="slurm")
    assert job.wait(timeout=120) is JS.SUCCEEDED, job.record.reason
    assert job.logs().strip() == "genuine"
    assert not marker.exists()
    assert not planted.is_symlink() and hashlib.sha256(planted.read_bytes()).hexdigest() == sha
    st = planted.stat()
    assert st.st_uid == os.getuid() and not st.st_mode & 0o022
    assert b.calls["sbatch"] == 1


def test_agent_swapped_after_upload_is_refused_by_the_job(remote):
    """The job itself checks the agent's hash in the process that runs it: an agent swapped after the
    backend checked it (a check-then-run race) is not run; the job fails and says why."""
    base = _scratch()
    rd = base / "remote"
    marker = base / "swapped-agent-ran"
    b = remote(rd)
    first = meshrun.run(["true"], backend="slurm")
    assert first.wait(timeout=120) is JS.SUCCEEDED
    name, _ = _agent_name()
    path = rd / "agent" / name
    path.write_text(_evil(marker))  # after the backend's check (cached for this backend instance)
    job = meshrun.run(["sh", "-c", "echo should-not-run"], backend="slurm")
    assert job.wait(timeout=120) is JS.FAILED
    assert not marker.exists()
    assert "meshrun-boot: stale" in job.logs() and "should-not-run" not in job.logs()
    assert b.calls["sbatch"] == 2


def test_shared_remote_dir_is_refused_with_the_fix(remote):
    """A remote_dir every user may write to (no sticky bit), or an agent folder another user made first
    in a shared sticky remote_dir, is refused before anything is staged or submitted, naming the path, its
    owner and mode, and the fix."""
    base = _scratch()
    open_dir = base / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    b = remote(open_dir)
    with pytest.raises(meshrun.BackendError) as e:
        meshrun.run(["true"], backend="slurm")
    msg = str(e.value)
    assert f"{open_dir} (owner root, mode 0777)" in msg and "other users may write" in msg
    assert f"chmod go-w {open_dir}" in msg and "backends.slurm.remote_dir" in msg
    assert b.calls["sbatch"] == 0

    sticky = base / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    marker = base / "attacker-agent-ran"
    name, _ = _agent_name()
    _as_attacker("mkdir", "-m", "0777", str(sticky / "agent"))
    _as_attacker("sh", "-c", f"printf '%s' \"$1\" > {sticky}/agent/{name}", "sh", _evil(marker))
    b = remote(sticky)
    with pytest.raises(meshrun.BackendError) as e:
        meshrun.run(["true"], backend="slurm")
    msg = str(e.value)
    assert f"{sticky}/agent (owner {ATTACKER}, mode 0777)" in msg and "belongs to another user" in msg
    assert b.calls["sbatch"] == 0 and not marker.exists()


def test_planted_compiled_agent_in_the_cache_is_not_run(slurm, meshrun_home, tmp_path):
    """Shared-filesystem mode keeps the agent compiled in MESHRUN_HOME/slurm/agent/. A file planted at that
    cache path (a symbolic link to another user's compiled program) is not run: the cache is rebuilt."""
    import importlib.util
    import py_compile

    if slurm._python() != sys.executable:
        pytest.skip("the compiled agent is used only with this interpreter")
    src = Path(meshrun.agent_file())
    h = hashlib.sha256(src.read_bytes() + importlib.util.MAGIC_NUMBER).hexdigest()[:16]
    cache = meshrun_home / "slurm" / "agent" / f"_agent-{h}.{sys.implementation.cache_tag}.pyc"
    cache.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    marker = _scratch() / "cached-agent-ran"
    evil_dir = marker.parent / "attacker"
    evil_dir.mkdir(mode=0o755)
    shutil.chown(evil_dir, ATTACKER)
    _as_attacker("sh", "-c", f"printf '%s' \"$1\" > {evil_dir}/evil.py", "sh", _evil(marker))
    py_compile.compile(str(evil_dir / "evil.py"), cfile=str(evil_dir / "evil.pyc"), doraise=True)
    shutil.chown(evil_dir / "evil.pyc", ATTACKER)
    cache.symlink_to(evil_dir / "evil.pyc")
    try:
        job = meshrun.run(["sh", "-c", "echo genuine"], backend="slurm")
        assert job.wait(timeout=120) is JS.SUCCEEDED and job.logs().strip() == "genuine"
        assert not marker.exists() and not cache.is_symlink() and cache.stat().st_uid == os.getuid()
    finally:
        shutil.rmtree(marker.parent, ignore_errors=True)
