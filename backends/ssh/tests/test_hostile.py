"""The SSH backend on a host shared with a hostile user (two real OS users of the sshd pool: mrssh-alice,
the victim, and mrssh-bob): the agent and helper it runs are content-addressed and run only from bytes
whose SHA-256 was checked in the same process; a remote_dir other users may write to is refused with
the fix; and the probe never blocks or fills its memory on records a lease points it at."""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import meshrun

from .conftest import ALICE, BOB, RUNUSER, SCRATCH, wait_until

pytestmark = pytest.mark.service
JS = meshrun.JobState


def _dir(owner: str, mode: int) -> Path:
    d = Path(SCRATCH) / f"hostile-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    shutil.chown(d, owner, owner)
    os.chmod(d, mode)
    return d


def _as(user: str, *argv: str) -> None:
    subprocess.run([RUNUSER, "-u", user, "--", *argv], check=True, capture_output=True, timeout=30)


def _evil(marker: Path) -> str:
    """A stand-in program that would leave ``marker`` behind if it ever ran."""
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"


@pytest.fixture
def cleanup():
    dirs: list[Path] = []
    yield dirs
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def test_planted_agent_and_helper_are_replaced_not_run(ssh_backend, cleanup):
    """A file at the content-addressed path of the helper (other content) or the agent (a symbolic link to
    another user's file) is never run, whether it was there before the first contact or swapped in later:
    every start of the helper checks both hashes in the process that then runs them."""
    root = _dir(ALICE, 0o700)
    bob_dir = _dir(BOB, 0o755)
    cleanup += [root, bob_dir]
    marker = Path(SCRATCH) / f"planted-ran-{uuid.uuid4().hex[:8]}"
    cleanup.append(marker)
    b = ssh_backend(gpus=0, hosts=["host1"], remote_dir=str(root), persistent=False)
    h = b.host("host1")
    agent, helper = (Path(p) for p in h.agent_files())
    want = {p: hashlib.sha256(data).hexdigest() for p, data in zip((agent, helper), h_files(h))}

    def plant() -> None:
        _as(BOB, "sh", "-c", f"printf '%s' \"$1\" > {bob_dir}/evil.py", "sh", _evil(marker))
        _as(ALICE, "mkdir", "-p", "-m", "0700", str(agent.parent))
        _as(ALICE, "sh", "-c", f"printf '%s' \"$1\" > {helper}", "sh", _evil(marker))
        _as(ALICE, "ln", "-sfn", f"{bob_dir}/evil.py", str(agent))

    plant()
    assert h.probe()["host"] and h.hello["agent_version"] == meshrun.agent_version()
    assert h._uploaded and not marker.exists()
    for p, sha in want.items():
        assert not p.is_symlink() and hashlib.sha256(p.read_bytes()).hexdigest() == sha
        assert p.stat().st_uid == h.hello["uid"] and not p.stat().st_mode & 0o077

    plant()  # swapped after the helper was installed: the next start checks again
    h._uploaded = False
    assert h.probe()["host"] and h._uploaded and not marker.exists()


def h_files(h) -> list[bytes]:
    from meshrun_ssh._session import _bundle

    b = _bundle()
    return [b.files[b.agent_name], b.files[b.helper_name]]


def test_shared_remote_dir_is_refused_with_the_fix(ssh_backend, cleanup):
    """A remote_dir every user may write to (no sticky bit), or an agent folder another user created
    first in a shared sticky directory, is refused before anything runs there, naming the path, its owner
    and mode and the fix."""
    open_root = _dir("root", 0o777)
    sticky = _dir("root", 0o1777)
    cleanup += [open_root, sticky]
    marker = Path(SCRATCH) / f"planted-ran-{uuid.uuid4().hex[:8]}"
    cleanup.append(marker)

    b = ssh_backend(gpus=0, hosts=["host1"], remote_dir=str(open_root))
    with pytest.raises(meshrun.BackendError) as e:
        b.host("host1").probe()
    msg = str(e.value)
    assert f"{open_root} (owner root, mode 0777)" in msg and "other users may write to it" in msg
    assert f"chmod go-w {open_root}" in msg and "remote_dir" in msg
    assert not (open_root / "agent").exists()  # refused before anything was created there

    _as(BOB, "mkdir", "-m", "0777", str(sticky / "agent"))
    b = ssh_backend(gpus=0, hosts=["host1"], remote_dir=str(sticky))
    h = b.host("host1")
    for p in h.agent_files():
        _as(BOB, "sh", "-c", f"printf '%s' \"$1\" > {p}", "sh", _evil(marker))
    with pytest.raises(meshrun.BackendError) as e:
        h.probe()
    msg = str(e.value)
    assert f"{sticky}/agent (owner {BOB}, mode 0777)" in msg and "belongs to another user" in msg
    assert not marker.exists()


def test_probe_is_not_stalled_by_planted_records(ssh_backend, ctl, cleanup, workdir):
    """Bob holds a real GPU lease whose job folder he opens to everyone, then puts a FIFO where its
    launch.json was and a symbolic link to /dev/zero where its state.json was. Alice's probe of the host
    answers (no blocked open, no endless read), reports why it skipped those records, and her offers work."""
    bob_root = _dir(BOB, 0o755)
    cleanup.append(bob_root)
    bb = ssh_backend(user=BOB, gpus=2, hosts=["host1"], remote_dir=str(bob_root))
    job = meshrun.run(["sleep", "300"], gpus=1, backend="ssh", time_limit=600)
    bid = job.backend_id
    planted = False
    try:
        wait_until(lambda: job.status() is JS.RUNNING, 60, what="bob's job to run")
        job_dir = Path(bb.host("host1").job_dir(job.id))
        _as(BOB, "chmod", "755", str(bob_root / "jobs"), str(job_dir))
        state = (job_dir / "state.json").read_text()  # put back before the cancel, which reads it
        _as(BOB, "sh", "-c", f"cd {job_dir} && rm launch.json && mkfifo -m 644 launch.json && "
                             "ln -sfn /dev/zero state.json")
        planted = True

        ab = ssh_backend(user=ALICE, gpus=2, hosts=["host1"])
        snap = ab.host("host1").probe()
        (idx,) = [i for i, rec in snap["leases"].items() if rec.get("job_dir") == str(job_dir)]
        assert snap["leases"][idx]["uid"] == _uid(BOB)
        why = snap["lease_ends_skipped"][idx]
        assert "launch.json is not a regular file" in why and "state.json is a symbolic link" in why
        assert idx not in snap["lease_ends"]
        (offer,) = ab.offers(meshrun.JobSpec(command=["true"], gpus=1))
        assert offer.fits and offer.detail["free"] == 1
        assert ab.host("host1").probe()["leases"]  # the helper still answers
    finally:
        if planted:  # the link first; then release any reader still blocked in open() on the FIFO
            _as(BOB, "rm", "-f", str(job_dir / "state.json"))
            _as(BOB, "sh", "-c", f"printf '%s' \"$1\" > {job_dir}/state.json", "sh", state)
            try:
                os.close(os.open(job_dir / "launch.json", os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            _as(BOB, "rm", "-f", str(job_dir / "launch.json"))
        bb.cancel(bid)
        assert bb.status([bid])[bid].state is JS.CANCELLED  # (the job's process tree is gone)


def _uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


def test_checked_record_reader_refuses_what_a_lease_may_point_at(tmp_path):
    """The probe's reader, on real files: a record too large, of another owner, not JSON, a FIFO or a
    symbolic link is refused with the reason; a small regular JSON file of the expected owner is read."""
    sys.modules.setdefault("_agent", importlib.import_module("meshrun._agent"))
    from meshrun_ssh import _remote

    ok = tmp_path / "ok.json"
    ok.write_text('{"time_limit": 5}')
    assert _remote.read_json_checked(str(ok)) == {"time_limit": 5}
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (_remote.RECORD_MAX + 1))
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    link = tmp_path / "link.json"
    link.symlink_to("/dev/zero")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    cases = {big: "more than", fifo: "not a regular file", link: "symbolic link", bad: "JSON object"}
    for path, why in cases.items():
        with pytest.raises(_remote.Unreadable, match=why):
            _remote.read_json_checked(str(path))
    with pytest.raises(_remote.Unreadable, match="belongs to uid"):
        _remote.read_json_checked(str(ok), owner=os.getuid() + 1)
