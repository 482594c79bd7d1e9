"""The SSH backend end to end against a pool of real OpenSSH servers (scripts/sshd-pool.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import meshrun
import pytest


pytestmark = pytest.mark.service
ALICE, BOB = "mrssh-alice", "mrssh-bob"
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # jobs' functions travel by value

REPORT = ("import json, os, socket, sys, time; t0 = time.time(); time.sleep(float(sys.argv[1])); "
          "print(json.dumps({'host': socket.gethostname(), 'cuda': os.environ.get('CUDA_VISIBLE_DEVICES'), "
          "'uid': os.getuid(), 'start': t0, 'end': time.time()}))")


def report_job(seconds: float, **fields) -> meshrun.JobSpec:
    return meshrun.JobSpec(command=["python3", "-c", REPORT, str(seconds)], backend="ssh", **fields)


def report_of(job: meshrun.Job) -> dict:
    return json.loads(job.logs().strip().splitlines()[-1])


def double_and_where(x):
    import socket

    return 2 * x, socket.gethostname(), os.getcwd(), open("hello.txt").read()


def fail_loudly(msg):
    raise ValueError(f"remote says: {msg}")


def test_command_and_function_jobs_round_trip(ssh_backend, workdir):
    b = ssh_backend(gpus=2)
    assert b.check().ok
    job = meshrun.run(["python3", "-c", REPORT, "0"], gpus=1, backend="ssh")
    assert job.wait(timeout=60) is meshrun.JobState.SUCCEEDED, job.reason
    rep = report_of(job)
    assert rep["cuda"] in ("0", "1") and rep["host"] == job.backend_id.split(":")[0]
    assert job.record.where.startswith(rep["host"])
    # a function job: payload up, result back, the synced working directory as its cwd
    fjob = meshrun.submit(meshrun.JobSpec(function=double_and_where, args=(21,), backend="ssh"))
    value, host, cwd, hello = fjob.result(timeout=60)
    assert value == 42 and host.startswith("host") and hello == "hello from the project\n"
    assert "/.meshrun/work/project-" in cwd
    err = meshrun.submit(meshrun.JobSpec(function=fail_loudly, args=("ünï $(x) 'q'",), backend="ssh"))
    with pytest.raises(meshrun.JobFailed) as ei:
        err.result(timeout=60)
    assert ei.value.remote_type == "ValueError" and "remote says: ünï $(x) 'q'" in str(ei.value)
    assert "fail_loudly" in (ei.value.remote_traceback or "")


def test_jobs_spread_to_free_gpus_then_queue_where_they_free_soonest(ssh_backend, workdir, ctl):
    """Three hosts with 2 GPUs each: three 2-GPU jobs land on three hosts at once; a fourth waits on the
    host whose job ends first (known from its time limit)."""
    b = ssh_backend(gpus=2)
    limits = {0: 60, 1: 15, 2: 60}
    # one placement for the three (submit_many): the backend notices the offer went stale and places again
    jobs = meshrun.submit_many([report_job(40 if i != 1 else 5, gpus=2, time_limit=limits[i]) for i in range(3)],
                               backend="ssh")
    hosts = [j.backend_id.split(":")[0] for j in jobs]
    assert sorted(hosts) == ["host1", "host2", "host3"], hosts  # submitted back to back, still spread
    ctl.wait_until(lambda: all(j.status() is meshrun.JobState.RUNNING for j in jobs), 30, what="all running")
    offers = b.offers(meshrun.JobSpec(command=["true"], gpus=2))
    assert all(o.fits and o.expected_start != 0 for o in offers), offers
    soonest = offers[0]
    assert soonest.where == hosts[1] and soonest.expected_start is not None and soonest.expected_start <= 15
    assert "queued" in soonest.start_note
    fourth = meshrun.submit(report_job(0, gpus=2))
    assert fourth.backend_id.split(":")[0] == hosts[1]
    assert fourth.status() in (meshrun.JobState.PENDING, meshrun.JobState.RUNNING)  # queued unless host2 is done
    assert fourth.wait(timeout=60) is meshrun.JobState.SUCCEEDED
    assert jobs[1].status() is meshrun.JobState.SUCCEEDED
    assert report_of(fourth)["start"] >= report_of(jobs[1])["end"]  # it waited for the GPUs
    assert report_of(fourth)["cuda"] == "0,1"
    for j in (jobs[0], jobs[2]):
        j.cancel()
        assert j.record.state is meshrun.JobState.CANCELLED
    snaps = b.gpus()
    assert set(snaps) == {"host1", "host2", "host3"}
    assert all(not s["leases"] and not s["queue"] for s in snaps.values()), snaps


def test_two_os_users_never_share_a_gpu(ssh_backend, make_config, client_env, workdir, pool):
    """Alice (this process) and Bob (a client running as another OS user) both submit to host1, which has
    2 GPUs, more 1-GPU jobs than fit at once: the host's leases keep them apart."""
    ssh_backend(user=ALICE, gpus={"host1": 2}, hosts=["host1"])
    bob_cfg = make_config(user=BOB, gpus={"host1": 2}, hosts=["host1"])
    bob_req = {"config": bob_cfg, "jobs": [{"command": ["python3", "-c", REPORT, "1.0"], "gpus": 1,
                                            "name": f"bob-{i}"} for i in range(3)], "timeout": 120}
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(client_env(BOB, bob_req)))
    t.start()
    alice = [meshrun.submit(report_job(1.0, gpus=1, name=f"alice-{i}")) for i in range(3)]
    meshrun.wait(alice, timeout=120)
    t.join(150)
    assert out, "Bob's client did not finish"
    runs = []
    for j in alice:
        assert j.record.state is meshrun.JobState.SUCCEEDED, j.reason
        runs.append(report_of(j))
    for j in out["jobs"]:
        assert j["state"] == "succeeded", j
        runs.append(json.loads(j["logs"].strip().splitlines()[-1]))
    uids = {r["uid"] for r in runs}
    assert uids == {pool["users"][ALICE]["uid"], pool["users"][BOB]["uid"]}
    for r in runs:
        assert r["cuda"] in ("0", "1") and r["host"] == "host1"
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            if a["start"] < b["end"] and b["start"] < a["end"]:
                assert a["cuda"] != b["cuda"], f"GPU {a['cuda']} shared by overlapping jobs: {a} {b}"


def test_foreign_gpu_processes_are_respected(ssh_backend, workdir, lease_root, helpers):
    """A process meshrun did not start holds GPU 0 (a fake nvidia-smi on the host says so): a 1-GPU job gets
    GPU 1, and a 2-GPU job cannot start now."""
    import shutil

    fakes = lease_root / "fakes"  # somewhere the test users can read
    fakes.mkdir()
    shutil.copy2(helpers.fakes / "nvidia-smi", fakes / "nvidia-smi")
    os.chmod(fakes, 0o755)
    os.chmod(fakes / "nvidia-smi", 0o755)
    fake = fakes / "fake-smi.json"
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        gpus = [{"index": i, "uuid": f"GPU-foreign-{i}", "name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559}
                for i in range(2)]
        fake.write_text(json.dumps({"gpus": gpus, "processes": [
            {"pid": sleeper.pid, "gpu_uuid": "GPU-foreign-0", "name": "someone-elses-training"}]}))
        os.chmod(fake, 0o644)
        env = {"host3": {"PATH": f"{fakes}:/usr/bin:/bin", "FAKE_NVIDIA_SMI": str(fake)}}
        assert _readable_by(ALICE, fakes / "nvidia-smi") and _readable_by(ALICE, fake)
        b = ssh_backend(hosts=["host3"], host_env=env, gpus=0)
        # no MESHRUN_GPUS on this host: the GPUs come from (the fake) nvidia-smi
        meshrun.configure({"backends": {"ssh": {**b.config, "hosts": [
            {**h, "env": {k: v for k, v in h["env"].items() if k != "MESHRUN_GPUS"}} for h in b.config["hosts"]]}}})
        b2 = meshrun.get_backend("ssh")
        snap = b2.gpus()["host3"]
        assert "GPU-foreign-0" in snap["foreign"], snap
        (two,) = b2.offers(meshrun.JobSpec(command=["true"], gpus="H100:2"))
        assert two.fits and two.expected_start != 0 and "did not start" in two.start_note
        job = meshrun.submit(report_job(0, gpus="H100:1"))
        assert job.wait(timeout=60) is meshrun.JobState.SUCCEEDED, job.reason
        assert report_of(job)["cuda"] == "1"
    finally:
        sleeper.kill()
        sleeper.wait()


def _readable_by(user: str, path: Path) -> bool:
    import shutil

    runuser = shutil.which("runuser", path="/usr/sbin:/sbin:/usr/bin:/bin") or "runuser"
    return subprocess.run([runuser, "-u", user, "--", "test", "-r", str(path)]).returncode == 0


def test_logs_follow_and_cancel_the_whole_remote_tree(ssh_backend, workdir, helpers, ctl):
    ssh_backend(gpus={"host2": 1}, hosts=["host2"])
    script = ("import subprocess, sys, time\n"
              "kids = [subprocess.Popen(['sleep', '300']) for _ in range(2)]\n"
              "grand = subprocess.Popen(['sh', '-c', 'sleep 300 & echo $!; wait'], stdout=subprocess.PIPE)\n"
              "print('pids', *[k.pid for k in kids], grand.pid, grand.stdout.readline().decode().strip(), flush=True)\n"
              "for i in range(1000):\n"
              "    print('tick', i, flush=True); time.sleep(0.1)\n")
    job = meshrun.run(["python3", "-c", script], gpus=1, backend="ssh")
    seen = ""
    for chunk in job.logs(follow=True):
        seen += chunk
        if "tick 3" in seen:
            break
    pids = [int(p) for p in next(line for line in seen.splitlines() if line.startswith("pids")).split()[1:]]
    assert all(helpers.proc_alive(p) for p in pids)  # the hosts share this machine's process table
    assert meshrun.get_backend("ssh").gpus()["host2"]["leases"]
    job.cancel()
    assert job.record.state is meshrun.JobState.CANCELLED
    ctl.wait_until(lambda: not any(helpers.proc_alive(p) for p in pids), 20, what="the job's processes to end")
    assert not meshrun.get_backend("ssh").gpus()["host2"]["leases"]
    # a finished job's follow ends by itself, with the whole output
    done = meshrun.run(["sh", "-c", "for i in 1 2 3; do echo line $i; sleep 0.2; done"], backend="ssh")
    text = "".join(done.logs(follow=True))
    assert text.splitlines() == ["line 1", "line 2", "line 3"]


HOSTILE_NAME = "it's \"quoted\" $(touch /tmp/meshrun-pwned); `id` && echo ü ✓\nnewline"
HOSTILE_ARGS = ["$(touch /tmp/meshrun-pwned)", "a'b\"c", ";|&<>*?~", "", " sp ", "line1\nline2", "ünï 日本 🚀",
                "\\", "-e", "--x=$HOME"]
HOSTILE_ENV = {"WEIRD": "$(touch /tmp/meshrun-pwned)'\"`;\n\tü", "EMPTY": "", "PATHISH": "a:b:$PATH"}
HOSTILE_FILE = "we'ird $(name);\u00fc.txt"


def test_hostile_strings_reach_the_job_byte_for_byte(ssh_backend, workdir):
    ssh_backend(gpus=0)
    (workdir / HOSTILE_FILE).write_text("payload ✓\n")
    code = ("import json, os, sys; print(json.dumps({'argv': sys.argv[1:], "
            "'env': {k: os.environ.get(k) for k in ('WEIRD', 'EMPTY', 'PATHISH')}, "
            f"'name': os.environ.get('MESHRUN_JOB_NAME'), 'file': open({HOSTILE_FILE!r}).read()}}))")
    job = meshrun.run(["python3", "-c", code] + HOSTILE_ARGS, name=HOSTILE_NAME, env=HOSTILE_ENV, backend="ssh")
    assert job.wait(timeout=60) is meshrun.JobState.SUCCEEDED, job.logs()
    got = json.loads(job.logs().strip().splitlines()[-1])
    assert got == {"argv": HOSTILE_ARGS, "env": HOSTILE_ENV, "name": HOSTILE_NAME, "file": "payload ✓\n"}
    # a shell-string command is run by bash on the host exactly as given
    sh = meshrun.run("printf '%s|' \"$WEIRD\" 'a b' $'x\\ty'", env=HOSTILE_ENV, backend="ssh")
    assert sh.wait(timeout=60) is meshrun.JobState.SUCCEEDED
    assert sh.logs() == HOSTILE_ENV["WEIRD"] + "|a b|x\ty|"
    assert not Path("/tmp/meshrun-pwned").exists()


def test_sync_is_incremental_with_excludes_and_a_size_guard(ssh_backend, workdir):
    b = ssh_backend(gpus=0, hosts=["host1"], sync_exclude=["data/", "*.ckpt"], max_sync_bytes="64KiB")
    (workdir / "pkg").mkdir()
    (workdir / "pkg" / "mod.py").write_text("X = 1\n")
    (workdir / ".git").mkdir()
    (workdir / ".git" / "HEAD").write_text("ref\n")
    (workdir / "__pycache__").mkdir()
    (workdir / "__pycache__" / "x.pyc").write_bytes(b"\0" * 10)
    (workdir / "data").mkdir()
    (workdir / "data" / "big.bin").write_bytes(b"\0" * 500_000)
    (workdir / "model.ckpt").write_bytes(b"\0" * 500_000)
    (workdir / ".meshrunignore").write_text("# comment\nscratch*\n")
    (workdir / "scratch-1.txt").write_text("no\n")
    h = b.host("host1")
    from meshrun_ssh._session import workdir_name
    from meshrun_ssh._settings import DEFAULT_EXCLUDE
    from meshrun_ssh._sync import scan

    def sync():
        pats = list(DEFAULT_EXCLUDE) + list(b.settings.sync_exclude)
        entries = scan(str(workdir), pats, max_bytes=b.settings.max_sync_bytes, max_files=100)
        return h.sync(f"{h.root}/work/{workdir_name(str(workdir))}", entries), entries

    rep, entries = sync()
    assert sorted(e.path for e in entries) == [".meshrunignore", "hello.txt", "pkg/mod.py"]
    assert rep["written"] == 3
    rep, _ = sync()
    assert rep["written"] == 0 and rep["bytes"] == 0  # nothing changed, nothing travels
    (workdir / "pkg" / "mod.py").write_text("X = 2\n")
    (workdir / "hello.txt").unlink()
    rep, _ = sync()
    assert rep["written"] == 1 and rep["removed"] == 1
    job = meshrun.run(["sh", "-c", "ls -A; cat pkg/mod.py"], backend="ssh")
    assert job.wait(timeout=60) is meshrun.JobState.SUCCEEDED
    assert job.logs().split() == [".meshrun-sync.json", ".meshrunignore", "pkg", "X", "=", "2"]
    # over the guard: a clear error naming the setting and the biggest files
    (workdir / "pkg" / "weights.bin").write_bytes(b"\0" * 100_000)
    with pytest.raises(meshrun.SpecError) as ei:
        meshrun.run(["true"], backend="ssh")
    msg = str(ei.value)
    assert ei.value.field == "workdir" and "max_sync_bytes" in msg and "pkg/weights.bin" in msg and "exclude" in msg
    # a job may opt out of the sync and name a directory on the host
    job = meshrun.run(["pwd"], backend="ssh", backend_options={"ssh": {"workdir": "/tmp", "sync": False}})
    assert job.wait(timeout=60) is meshrun.JobState.SUCCEEDED and job.logs().strip() == "/tmp"
    job = meshrun.run(["pwd"], backend="ssh", backend_options={"ssh": {"sync": False}})  # no sync: the home
    assert job.wait(timeout=60) is meshrun.JobState.SUCCEEDED and job.logs().strip() == "/home/mrssh-alice"
    with pytest.raises(meshrun.SpecError) as ei:
        meshrun.run(["true"], backend="ssh", backend_options={"ssh": {"hots": "x"}})
    assert ei.value.field == "backend_options.ssh.hots"


def sleepy_value(seconds, value):
    import time

    time.sleep(seconds)
    return value


def test_job_survives_sshd_crash_and_the_client_gets_its_result(ssh_backend, workdir, pool, ctl):
    """Kill host2's sshd (listener and every connection) while a job runs there; start it again: the job
    keeps running, the client reconnects by itself and gets the result."""
    b = ssh_backend(gpus=0, hosts=["host2"])
    job = meshrun.submit(meshrun.JobSpec(function=sleepy_value, args=(4, "survived ✓"), backend="ssh"))
    ctl.wait_until(lambda: job.status() is meshrun.JobState.RUNNING, 30, what="running")
    host2 = next(h for h in pool["hosts"] if h["name"] == "host2")
    conn = b.host("host2").conn
    gen = conn.generation
    ctl.kill_sshd(host2)
    ctl.wait_until(lambda: not conn.is_active(), 10, what="the connection to drop")
    # while it is down: reported, not raised
    (offer,) = b.offers(meshrun.JobSpec(command=["true"]))
    assert not offer.fits and "unreachable" in offer.reason
    assert "unreachable" in b.gpus()["host2"]
    threading.Timer(1.0, ctl.restart).start()
    assert job.result(timeout=90) == "survived ✓"
    assert conn.generation > gen  # a new transport, made by the client itself


def test_reattach_after_the_client_restarts(ssh_backend, make_config, client_env, workdir, tmp_path):
    """A client submits and dies without goodbye; a new process (this one) attaches by job id, follows
    status and logs, and gets the outcome; find() rediscovers the job on its host."""
    cfg = make_config(gpus=1, hosts=["host1", "host3"])
    first = client_env("root", {"config": cfg, "wait": False, "jobs": [
        {"command": ["sh", "-c", "sleep 1.5; echo finished on $(hostname)"], "gpus": 1, "name": "orphan"}]})
    (j,) = first["jobs"]
    assert j["state"] in ("pending", "running")
    second = client_env("root", {"config": cfg, "attach": [j["id"]], "timeout": 60}, home=first["home"])
    (k,) = second["jobs"]
    assert k["state"] == "succeeded" and k["logs"].startswith("finished on host")
    ssh_backend(gpus=1, hosts=["host1", "host3"])
    assert meshrun.get_backend("ssh").find(j["id"]) == j["backend_id"]
    assert meshrun.get_backend("ssh").find("nosuchjob") is None


def test_unreachable_hosts_are_reported_not_raised(ssh_backend, workdir, pool, make_config, capsys):
    cfg = make_config(gpus=1, hosts=["host1"], retries=2, connect_timeout=2)
    cfg["hosts"].append({"name": "ghost", "host": "127.0.0.1", "port": _closed_port(), "user": ALICE,
                         "key": pool["users"][ALICE]["key"]})
    meshrun.configure({"backends": {"ssh": cfg}})
    b = meshrun.get_backend("ssh")
    offers = b.offers(meshrun.JobSpec(command=["true"], gpus=1))
    assert [o.where for o in offers] == ["host1", "ghost"]
    assert offers[0].fits and not offers[1].fits and "connection refused" in offers[1].reason
    st = b.status(["ghost:abc", "nohost:abc"])
    assert st["ghost:abc"].state is meshrun.JobState.UNKNOWN and "unreachable" in st["ghost:abc"].reason
    assert st["nohost:abc"].state is meshrun.JobState.UNKNOWN
    from meshrun._cli import main

    assert main(["gpus", "--backend", "ssh"]) == 0
    out = capsys.readouterr().out
    assert "ghost: unreachable" in out and "host1" in out
    job = meshrun.run(["true"], gpus=1, backend="ssh")  # placement skips the dead host
    assert job.backend_id.startswith("host1:") and job.wait(timeout=60) is meshrun.JobState.SUCCEEDED


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_agent_installed_once_and_exec_mode(ssh_backend, make_config, workdir):
    """First contact installs the agent under the remote root (versioned by content); later backends reuse
    it. With persistent = false every request is its own exec of the helper, and jobs work the same."""
    b = ssh_backend(gpus=1, hosts=["host1"], remote_dir="~/.meshrun-agenttest")
    h = b.host("host1")
    h.conn.run(["rm", "-rf", ".meshrun-agenttest"])
    h.probe()
    assert h._uploaded and h.hello["agent_version"] == meshrun.agent_version()
    agent, helper = h.agent_files()  # content-addressed: agent-<sha256[:16]>.py, remote-<sha256[:16]>.py
    assert h.conn.exists(agent) and h.conn.exists(helper)
    b2 = ssh_backend(gpus=1, hosts=["host1"], remote_dir="~/.meshrun-agenttest", persistent=False)
    h2 = b2.host("host1")
    h2.probe()
    assert not h2._uploaded
    job = meshrun.run(["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"], gpus=1, backend="ssh")
    assert job.wait(timeout=60) is meshrun.JobState.SUCCEEDED and job.logs().strip() == "0"
    h2.conn.run(["rm", "-rf", ".meshrun-agenttest"])


def test_unusable_lease_dir_is_reported(make_config, workdir, lease_root):
    """A lease directory the remote user may not write makes GPU offers unfit, with the reason and the
    setting to change, instead of jobs that fail later."""
    locked = lease_root / "locked"
    locked.mkdir(mode=0o700)  # root's
    cfg = make_config(gpus=1, hosts=["host1"])
    cfg["hosts"][0]["lease_dir"] = str(locked / "leases")
    meshrun.configure({"backends": {"ssh": cfg}})
    (offer,) = meshrun.get_backend("ssh").offers(meshrun.JobSpec(command=["true"], gpus=1))
    assert not offer.fits and "GPU leases unusable" in offer.reason and "lease_dir" in offer.reason
    (cpu,) = meshrun.get_backend("ssh").offers(meshrun.JobSpec(command=["true"]))
    assert cpu.fits  # CPU jobs take no lease
    meshrun.configure()


def test_amd_gpus_on_an_ssh_host_are_leased_and_masked_by_the_same_agent(ssh_backend, workdir):
    """The agent the backend uploads serves AMD GPUs as it does locally: two declared AMD GPUs on host1,
    a job asking for "amd:2" gets both through ROCr's variables."""
    ssh_backend(hosts=["host1"], host_env={"host1": {"MESHRUN_GPUS": "amd:0-1"}})
    code = ("import json, os; print(json.dumps({k: os.environ.get(k) for k in "
            "('ROCR_VISIBLE_DEVICES', 'HIP_VISIBLE_DEVICES', 'CUDA_VISIBLE_DEVICES')}))")
    job = meshrun.run(["python3", "-c", code], gpus="amd:2", backend="ssh")
    assert job.wait(timeout=60) is meshrun.JobState.SUCCEEDED, job.reason
    assert json.loads(job.logs().strip().splitlines()[-1]) == {
        "ROCR_VISIBLE_DEVICES": "0,1", "HIP_VISIBLE_DEVICES": "0,1", "CUDA_VISIBLE_DEVICES": "0,1"}
