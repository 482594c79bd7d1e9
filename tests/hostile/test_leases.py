"""The machine-wide GPU lease directory under attack by another local user (issue: "no user can act as
another"). Alice is the victim: she runs meshrun as usual. Bob is a second real OS user who plants links,
FIFOs, broken tables and stuck locks in the shared lease directory, or hides his processes from her
(hidepid, PID namespaces). Each test replays one attack and asserts that it now fails: nothing of Alice's
is written, chmodded or created through Bob's paths, a live lease is never handed out twice, and a table
Bob broke is reported (naming the file, its owner and the fix) with no GPU handed out rather than
treated as empty."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from meshrun.testing import assert_no_gpu_overlap

from .conftest import JOB, PY, User, race, wait_for as _wait_for

pytestmark = pytest.mark.slow



@pytest.fixture
def lease_dir(shared_dir) -> Path:
    """A lease directory as an admin (or the first meshrun user) leaves it: root's, 1777."""
    d = shared_dir / "leases"
    d.mkdir()
    os.chmod(d, 0o1777)
    return d


def _env(user: User, lease_dir: Path, gpus: str = "0-1", **extra: str) -> dict[str, str]:
    return user.env(MESHRUN_LEASE_DIR=str(lease_dir), MESHRUN_GPUS=gpus, MESHRUN_BACKEND="local", **extra)


def _job(user: User, lease_dir: Path, argv, gpus=1, name="job", wait=60.0, **env) -> dict:
    """Submit a command job as ``user``, wait up to ``wait`` s, return {id, state, reason}."""
    p = user.run([PY, "-c", JOB, json.dumps(argv), str(gpus), name, str(wait)],
                 env=_env(user, lease_dir, **env), timeout=wait + 60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def _agent_job(user: User, lease_dir: Path, gpus=1) -> dict:
    """Run one GPU job straight through the host agent as ``user`` (as the SSH backend does), bypassing
    placement: returns its exit record."""
    d = user.private / f"agent-job-{time.time_ns()}"
    d.mkdir()
    (d / "launch.json").write_text(json.dumps({"job_id": d.name, "name": "direct", "kind": "command",
                                                "argv": ["true"], "env": {}, "cwd": str(d), "gpus": gpus}))
    os.system(f"chown -R {user.name} {d}")
    user.run([PY, str(Path(__file__).parents[2] / "meshrun" / "_agent.py"), "run", str(d)],
                 env=_env(user, lease_dir), timeout=120)
    return json.loads((d / "exit.json").read_text())


FAILED = ("failed", "refused")


def _gpus(user: User, lease_dir: Path, *args: str, timeout=60, **env) -> subprocess.CompletedProcess:
    return user.run([PY, "-m", "meshrun", "gpus", *args], env=_env(user, lease_dir, **env),
                    timeout=timeout)


@pytest.fixture
def bashrc(alice) -> Path:
    """Alice's ~/.bashrc, the file Bob would like her to make writable or to write into."""
    rc = alice.home / ".bashrc"
    rc.write_text("# alice's shell start-up\n")
    os.chown(rc, alice.uid, alice.gid)
    os.chmod(rc, 0o644)
    (alice.home / ".bash_profile").unlink(missing_ok=True)
    yield rc


def _untouched(rc: Path, alice: User) -> None:
    st = rc.stat()
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_uid == alice.uid
    assert rc.read_text() == "# alice's shell start-up\n"
    assert not (alice.home / ".bash_profile").exists()


def _plant(bob: User, *shell: str) -> None:
    p = bob.run(["sh", "-c", " && ".join(shell)])
    assert p.returncode == 0, p.stderr


def _hard_link(bob: User, src: Path, dst: Path) -> None:
    """Bob hard-links Alice's ``src`` as ``dst`` (possible where fs.protected_hardlinks is off)."""
    prot = Path("/proc/sys/fs/protected_hardlinks")
    old = prot.read_text().strip()
    prot.write_text("0")
    try:
        _plant(bob, f"ln {src} {dst}")
    finally:
        prot.write_text(old)


@pytest.mark.parametrize("layout", ["sticky", "legacy-0777"])
def test_lock_symlink_is_not_followed(alice, bob, lease_dir, bashrc, layout):
    """Attack 1a: Bob makes `lock` a link to Alice's ~/.bashrc (or to a ~/.bash_profile that does not
    exist). Before: her agent fchmodded .bashrc to 0666 (or created .bash_profile). Now: refused, named."""
    if layout == "legacy-0777":  # the old layout: world-writable without the sticky bit, lock already there
        os.chmod(lease_dir, 0o777)
        assert _gpus(alice, lease_dir).returncode == 0
        assert (lease_dir / "lock").exists()
        os.chmod(lease_dir, 0o777)  # as the old layout left it (root's, so Alice cannot add the sticky bit)
        _plant(bob, f"rm -f {lease_dir}/lock")
    _plant(bob, f"ln -s {bashrc} {lease_dir}/lock")
    out = _gpus(alice, lease_dir)
    assert "lock" in out.stdout + out.stderr and "symbolic link" in out.stdout + out.stderr
    res = _job(alice, lease_dir, ["true"], gpus=1)
    assert res["state"] in FAILED and "symbolic link" in res["reason"] and "rm " in res["reason"]
    ex = _agent_job(alice, lease_dir)
    assert ex["state"] == "failed" and "symbolic link" in ex["reason"]
    _untouched(bashrc, alice)
    _plant(bob, f"rm -f {lease_dir}/lock", f"ln -s {alice.home}/.bash_profile {lease_dir}/lock")
    res = _job(alice, lease_dir, ["true"], gpus=1)
    assert res["state"] in FAILED and "symbolic link" in res["reason"]
    _untouched(bashrc, alice)


def test_table_links_and_temp_names_are_not_written_through(alice, bob, lease_dir, bashrc):
    """Attack 1b: Bob plants `leases.json.tmp.<pid>` links (the old agent's temporary names) and then
    `leases.json` itself as a link, or as a hard link, to Alice's file. Nothing of hers is written."""
    # temporary names for every pid the next jobs could get: the agent no longer writes any in this directory
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    base = max(300, os.getpid() - 200)
    _plant(bob, f"cd {lease_dir} && for p in $(seq {base} {min(base + 3000, pid_max)}); do "
                f"ln -s {bashrc} leases.json.tmp.$p; done")
    for k in range(3):
        assert _job(alice, lease_dir, ["true"], gpus=1, name=f"j{k}")["state"] == "succeeded"
    _untouched(bashrc, alice)
    # the table itself as a symbolic link
    (lease_dir / "leases.json").unlink()
    _plant(bob, f"ln -s {bashrc} {lease_dir}/leases.json")
    res = _job(alice, lease_dir, ["true"], gpus=1)
    assert res["state"] in FAILED and "leases.json" in res["reason"] and "symbolic link" in res["reason"]
    _untouched(bashrc, alice)
    # ... and as a hard link (possible where fs.protected_hardlinks is off)
    (lease_dir / "leases.json").unlink()
    _hard_link(bob, bashrc, lease_dir / "leases.json")
    res = _job(alice, lease_dir, ["true"], gpus=1)
    assert res["state"] in FAILED and "hard links" in res["reason"]
    _untouched(bashrc, alice)


@pytest.mark.parametrize("broken, expect", [
    ("fifo", "not a regular file"),
    ("dev-zero", "symbolic link"),
    ("garbage", "not valid JSON"),
    ("list", "not an object"),
    ("huge", "bytes"),
    ("unreadable", "cannot be opened (Permission denied)"),
])
def test_broken_table_fails_closed_with_the_fix(alice, bob, lease_dir, broken, expect):
    """Attack 4: the table replaced by a FIFO (agents blocked forever), a link to /dev/zero (memory), or
    content that is not a table. Now: every user is told at once what is wrong, whose file it is and how to
    fix it, and no GPU is handed out (a table that cannot be read is never taken for an empty one)."""
    t = lease_dir / "leases.json"
    make = {
        "fifo": f"mkfifo {t}",
        "dev-zero": f"ln -s /dev/zero {t}",
        "garbage": f"printf '{{\"gpus\": {{\"0\": ' > {t} && chmod 666 {t}",
        "list": f"echo '[1, 2, 3]' > {t} && chmod 666 {t}",
        "huge": f"truncate -s 50M {t} && chmod 666 {t}",
        "unreadable": f"echo '{{}}' > {t} && chmod 600 {t}",
    }[broken]
    _plant(bob, make)
    t0 = time.monotonic()
    out = _gpus(alice, lease_dir, timeout=30)
    text = out.stdout + out.stderr
    assert expect in text and bob.name in text and "rm -rf" in text, text
    res = _job(alice, lease_dir, ["true"], gpus=1, wait=30)
    assert res["state"] in FAILED and expect in res["reason"] and "no GPUs" in res["reason"], res
    ex = _agent_job(alice, lease_dir)  # the agent itself fails closed too (a table broken after placement)
    assert ex["state"] == "failed" and expect in ex["reason"] and "no GPUs" in ex["reason"], ex
    assert time.monotonic() - t0 < 90  # nothing blocked on the FIFO (a generous bound, not a benchmark)
    # CPU jobs take no lease and still run
    assert _job(alice, lease_dir, ["true"], gpus=0)["state"] == "succeeded"


def test_wrong_shaped_entries_are_dropped_with_a_warning(alice, bob, lease_dir):
    """Valid JSON of the wrong shape used to make every GPU submit fail with a raw TypeError. Now broken
    entries are dropped (and said), the rest of the table is kept."""
    bad = {"boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(), "seq": "x",
           "gpus": {"0": "nope", "1": {"pid": "1"}}, "queue": [{"ticket": 1}], "usage": {"0": "a"}}
    (lease_dir / "leases.json").write_text(json.dumps(bad))
    os.chown(lease_dir / "leases.json", bob.uid, bob.gid)
    os.chmod(lease_dir / "leases.json", 0o666)
    out = _gpus(alice, lease_dir)  # said where it is seen first (the table is not changed by looking)
    assert "dropped a broken lease entry for GPU 0" in out.stderr and "GPU 1" in out.stderr, out.stderr
    res = _job(alice, lease_dir, ["true"], gpus=2)
    assert res["state"] == "succeeded", res
    log = alice.run([PY, "-m", "meshrun", "logs", res["id"]], env=_env(alice, lease_dir)).stdout
    assert "dropped a broken lease entry" in log and "dropped a broken queue entry" in log


def test_stuck_lock_names_its_holder(alice, bob, lease_dir):
    """Attack 4: Bob holds the flock forever. Before: every agent waited forever, nobody told. Now: a
    bounded wait, then an error naming the holding process and its user."""
    assert _gpus(alice, lease_dir).returncode == 0  # the lock file exists
    holder = bob.popen([PY, "-c",
                        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                        "fcntl.flock(fd, fcntl.LOCK_EX); print(os.getpid(), flush=True); time.sleep(120)",
                        str(lease_dir / "lock")], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(holder.stdout.readline())
        out = _gpus(alice, lease_dir, MESHRUN_LEASE_LOCK_TIMEOUT="1")
        text = out.stdout + out.stderr
        assert "locked for more than 1s" in text and f"user {bob.name}" in text, text
        res = _job(alice, lease_dir, ["true"], gpus=1, MESHRUN_LEASE_LOCK_TIMEOUT="1")
        assert res["state"] in FAILED and f"user {bob.name}" in res["reason"]
        # with the default wait, placement says the same instead of "did not answer"
        p = alice.run([PY, "-m", "meshrun", "run", "--gpus", "1", "--", "true"], env=_env(alice, lease_dir))
        assert p.returncode != 0 and f"pid {pid}" in p.stderr and f"user {bob.name}" in p.stderr, p.stderr
    finally:
        subprocess.run(["kill", "-9", str(pid)])
        holder.kill()
        holder.wait()
    assert _job(alice, lease_dir, ["true"], gpus=1)["state"] == "succeeded"


def _holds(lease_dir: Path, uid: int) -> list[Path]:
    return sorted(lease_dir.glob(f"hold-{uid}-*.json"))


def test_bob_cannot_remove_or_forge_alices_lease(alice, bob, lease_dir):
    """Bob removes Alice's hold file, or forges one in her name: neither frees or takes her GPU. Holds he
    forges in his own name only lie about his own use (he could as well run a job)."""
    job = alice.popen([PY, "-c", JOB, json.dumps(["sleep", "60"]), "1", "long", "0"],
                      env=_env(alice, lease_dir, gpus="0"), stdout=subprocess.PIPE, text=True)
    first = json.loads(job.communicate(timeout=60)[0].strip().splitlines()[-1])
    _wait_for(lambda: _holds(lease_dir, alice.uid))
    hold = _holds(lease_dir, alice.uid)[0]
    p = bob.run(["rm", "-f", str(hold)])
    assert hold.exists()  # the sticky bit: only Alice (or root) can remove it
    p = bob.run(["sh", "-c", f"echo '{{}}' > {hold}"])
    assert p.returncode != 0 and json.loads(hold.read_text())["state"] == "leased"
    # a forged hold in Alice's name (owned by Bob) is ignored, and so is Bob's own hold with nobody on it
    forged = {"state": "leased", "ticket": 1, "n": 1, "gpus": [0], "granted_at": time.time(), "boot_id": "x"}
    _plant(bob, f"echo '{json.dumps(forged)}' > {lease_dir}/hold-{alice.uid}-forged.json")
    out = json.loads(_gpus(alice, lease_dir, "--json", gpus="0").stdout)
    snap = next(iter(out.values()))
    assert list(snap["leases"]) == ["0"] and snap["leases"]["0"]["job_id"] == first["id"]
    assert any("forged" in w for w in snap["warnings"])
    # Bob's job on the same GPU waits for Alice's
    waiting = json.loads(bob.run([PY, "-c", JOB, json.dumps(["true"]), "1", "bobs", "3"],
                                 env=_env(bob, lease_dir, gpus="0")).stdout.strip().splitlines()[-1])
    assert waiting["state"] == "pending" and "waiting for 1 GPU" in (waiting["reason"] or "")
    alice.run([PY, "-m", "meshrun", "cancel", first["id"]], env=_env(alice, lease_dir, gpus="0"))
    bob.run([PY, "-m", "meshrun", "wait", waiting["id"]], env=_env(bob, lease_dir, gpus="0"), timeout=60)
    st = bob.run([PY, "-m", "meshrun", "status", waiting["id"]], env=_env(bob, lease_dir, gpus="0"))
    assert "succeeded" in st.stdout


HIDE = {
    "hidepid": ["unshare", "-m", "sh", "-c", 'mount -t proc -o hidepid=2 proc /proc && exec "$@"', "hide"],
    "pid-namespace": ["unshare", "-p", "-f", "--mount-proc"],
}


@pytest.mark.parametrize("hide", sorted(HIDE))
def test_hidden_processes_do_not_free_a_live_lease(alice, bob, lease_dir, hide):
    """Attack 3: under hidepid=2 (or in a PID namespace of her own) Alice cannot see Bob's processes.
    Before: his live lease looked dead to her agent and his GPU was handed to her job. Now: liveness is a
    flock on his hold file, which she can probe without seeing his processes; and the lease outlives his
    supervisor while the job's own processes live (they inherit the hold)."""
    pidfile = bob.private / f"grandchild-{hide}.pid"
    bobs = bob.popen([PY, "-c", JOB, json.dumps(["bash", "-c", f"sleep 300 & echo $! > {pidfile}; wait"]), "1",
                      "bobs", "0"],
                     env=_env(bob, lease_dir, gpus="0"), stdout=subprocess.PIPE, text=True)
    bob_job = json.loads(bobs.communicate(timeout=60)[0].strip().splitlines()[-1])
    _wait_for(lambda: any(json.loads(h.read_text()).get("state") == "leased" for h in _holds(lease_dir, bob.uid)))
    # kill -9 Bob's supervisor (its direct child dies with it): the job's grandchild (sleep 300) lives on
    # and keeps the GPU
    _wait_for(lambda: pidfile.exists() and pidfile.read_text().strip())
    child = int(pidfile.read_text())
    state = json.loads((bob.private / "meshrun-home" / "jobs" / bob_job["id"] / "state.json").read_text())
    os.kill(state["pid"], signal.SIGKILL)
    jobs = alice.private / "meshrun-home" / "jobs"
    before = set(jobs.glob("*"))
    alices = subprocess.Popen([*HIDE[hide], "runuser", "-u", alice.name, "--", PY, "-c", JOB,
                               json.dumps(["true"]), "1", "alices", "120"], env=_env(alice, lease_dir, gpus="0"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        try:
            _wait_for(lambda: any("waiting for 1 GPU" in (json.loads(s.read_text()).get("reason") or "")
                                  for s in jobs.glob("*/state.json") if s.parent not in before and s.stat().st_size),
                      timeout=60)
        except AssertionError:
            alices.kill()
            out, err = alices.communicate()
            logs = {p.parent.name: p.read_text() for p in jobs.glob("*/output.log")}
            raise AssertionError(f"her job never waited: {out} {err} {logs}")
        time.sleep(2)  # she keeps waiting: the GPU stays Bob's
        assert not [e for e in jobs.glob("*/exit.json") if e.parent not in before]
        os.kill(child, signal.SIGKILL)  # his last process ends: now the GPU is free
        out, err = alices.communicate(timeout=120)
    finally:
        alices.kill()
    assert alices.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["state"] == "succeeded", res


def test_two_users_racing_for_declared_amd_gpus_never_share_one(alice, bob, lease_dir, shared_dir):
    """Alice and Bob, two submitters each, race for three declared AMD GPUs (``MESHRUN_GPUS=amd:0-2``) in the
    shared lease directory: no GPU is ever held by two jobs at once, each job sees its GPUs through
    ROCR_VISIBLE_DEVICES (physical indices) and HIP/CUDA_VISIBLE_DEVICES from 0, and nothing stays leased."""
    recs = race([alice, bob, alice, bob], lambda u: _env(u, lease_dir, gpus="amd:0-2"), shared_dir / "amd-records",
                3, var="ROCR_VISIBLE_DEVICES")
    assert len(recs) == 12 and {r["user"] for r in recs} == {alice.uid, bob.uid}
    for r in recs:
        n = len(r["gpus"].split(","))
        assert set(r["gpus"].split(",")) <= {"0", "1", "2"} and r["hip"] == r["cuda"] == ",".join(map(str, range(n)))
    assert_no_gpu_overlap(recs)
    snap = json.loads(_gpus(alice, lease_dir, "--json", gpus="amd:0-2").stdout)
    (host,) = snap.values()
    assert host["leases"] == {} and host["queue"] == [] and [g["label"] for g in host["gpus"]] == [
        "amd:0", "amd:1", "amd:2"]


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "bobs-file", "fifo"])
def test_a_planted_usage_record_is_never_written_through(alice, bob, lease_dir, bashrc, plant):
    """Bob plants `usage-<alice's uid>.jsonl` (the name Alice's agent appends her ended leases to) as a link to
    her ~/.bashrc, a file of his, or a FIFO: her jobs still run, nothing of hers is written, and his file
    gains nothing (her record is just not kept, with a warning)."""
    target = lease_dir / f"usage-{alice.uid}.jsonl"
    if plant == "hardlink":
        _hard_link(bob, bashrc, target)
    else:
        _plant(bob, {"symlink": f"ln -s {bashrc} {target}", "bobs-file": f"touch {target} && chmod 666 {target}",
                     "fifo": f"mkfifo -m 666 {target}"}[plant])
    assert _job(alice, lease_dir, ["true"], gpus=1, name="recorded")["state"] == "succeeded"
    _untouched(bashrc, alice)
    if plant == "bobs-file":
        assert target.read_text() == ""
    # what she reads back skips it too: whose a record is comes from the file's owner
    p = alice.python("import json, meshrun._agent as a; print(json.dumps(a.usage_records()))",
                     env=_env(alice, lease_dir))
    records, warnings = json.loads(p.stdout)
    assert records == [] and any(target.name in w for w in warnings), p.stdout + p.stderr
