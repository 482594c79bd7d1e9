"""The Slurm backend against a real Slurm 22.05 cluster (scripts/slurm-cluster.sh): GPUs through gres, two
nodes with torch.distributed, arrays, cancel, time limits, a slurmctld restart, requeue, hostile input."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

import meshrun
import meshrun.backend as mb

from .conftest import CLUSTER

pytestmark = pytest.mark.service
JS = meshrun.JobState
HOSTILE = "it's \"quoted\" $(touch /tmp/pwned) `id`; rm -rf ~ #hash \\back\nnew line ünïcödé ✓ %j"


def scontrol(jid: str) -> str:
    return subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True).stdout


def alive(pid) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, TypeError):
        return False


def wait_state(job, states, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if job.status() in states:
            return job.record.state
        time.sleep(0.1)
    raise AssertionError(f"job {job.id} still {job.record.state} ({job.record.reason}) after {timeout}s")


# ---- a job Slurm itself must stop at its time limit (1 minute, checked every 30 s): start it first ----

@pytest.fixture(scope="module")
def slurm_timeout_job(slurm_cluster, tmp_path_factory):
    home = tmp_path_factory.mktemp("timeout-home")
    old = {k: os.environ.get(k) for k in ("MESHRUN_HOME", "MESHRUN_CONFIG")}
    os.environ["MESHRUN_HOME"] = str(home)
    cfg = home / "config.toml"
    cfg.write_text("")
    os.environ["MESHRUN_CONFIG"] = str(cfg)
    try:
        meshrun.configure()
        job = meshrun.run(["sleep", "600"], backend="slurm", name="slurm-enforced-limit",
                          backend_options={"slurm": {"time": "1m"}})
        started = time.monotonic()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        meshrun.configure()
    return {"home": home, "id": job.id, "backend_id": job.backend_id, "started": started}


@pytest.fixture(autouse=True)
def _start_the_timeout_job_first(slurm_timeout_job):
    pass


# ---- GPUs -------------------------------------------------------------------------------------------

def gpu_env():
    import os

    return {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "GPUS_PER_NODE", "WORLD_SIZE",
                                           "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID")}


def test_gpu_job_sees_exactly_its_gres_gpus(slurm, slurm_cluster):
    jobs = [meshrun.submit(meshrun.JobSpec(function=gpu_env, gpus=n, backend="slurm")) for n in (2, 3, 0)]
    two, three, none = meshrun.gather(jobs, timeout=120)
    assert two["CUDA_VISIBLE_DEVICES"] == two["SLURM_JOB_GPUS"] and len(two["CUDA_VISIBLE_DEVICES"].split(",")) == 2
    assert len(three["CUDA_VISIBLE_DEVICES"].split(",")) == 3
    assert two["GPUS_PER_NODE"] == "2" and two["WORLD_SIZE"] == "2" and two["NODE_RANK"] == "0"
    assert three["GPUS_PER_NODE"] == "3"
    assert none["CUDA_VISIBLE_DEVICES"] is None and none["GPUS_PER_NODE"] == "0"  # Slurm gives a CPU job no GPU
    assert two["MASTER_ADDR"] == "127.0.0.1" and two["MASTER_PORT"].isdigit()
    assert "gres/gpu=2" in scontrol(jobs[0].backend_id) or "gpu:2" in scontrol(jobs[0].backend_id)
    assert slurm.calls["sbatch"] == 3


def test_offers(slurm, slurm_cluster):
    gpus = int(slurm_cluster["SLURM_GPUS"])
    (o,) = slurm.offers(meshrun.JobSpec(command=["true"], gpus=1))
    assert o.fits and o.where.endswith("/" + slurm_cluster["SLURM_PARTITION"]) and o.gpus == 1
    assert o.expected_start is not None and "sbatch --test-only" in o.start_note
    (o,) = slurm.offers(meshrun.JobSpec(command=["true"], gpus=gpus + 1))
    assert not o.fits and f"{gpus} GPUs" in o.reason
    (o,) = slurm.offers(meshrun.JobSpec(command=["true"], nodes=99))
    assert not o.fits and "99 node" in o.reason
    (o,) = slurm.offers(meshrun.JobSpec(command=["true"], memory="10TiB"))
    assert not o.fits and "MB of memory" in o.reason
    (o,) = slurm.offers(meshrun.JobSpec(command=["true"], gpus="h100:1"))
    assert not o.fits and "h100" in o.reason
    (o,) = slurm.offers(meshrun.JobSpec(command=["true"], backend_options={"slurm": {"partition": "nosuch"}}))
    assert not o.fits and "nosuch" in o.reason
    with pytest.raises(meshrun.NoPlacementError, match="GPUs"):
        meshrun.run(["true"], gpus=gpus + 1, backend="slurm")
    meshrun.configure({"prices": {f"slurm:{slurm_cluster['SLURM_PARTITION']}": {"default": 2.5}}})
    (o,) = meshrun.offers(meshrun.JobSpec(command=["true"], gpus=2), ["slurm"])
    assert o.price_per_hour == 5.0


# ---- two nodes --------------------------------------------------------------------------------------

def allreduce():
    import os

    import torch
    import torch.distributed as dist

    env = {k: os.environ[k] for k in meshrun.DIST_ENV_VARS}
    dist.init_process_group("gloo", init_method=f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
                            rank=int(env["NODE_RANK"]), world_size=int(env["WORLD_SIZE"]))
    t = torch.tensor([float(env["NODE_RANK"]) + 1.0])
    dist.all_reduce(t)
    dist.destroy_process_group()
    return {"env": env, "sum": t.item(), "node": os.environ.get("SLURMD_NODENAME"),
            "problems": meshrun.check_dist_env(os.environ)}


def test_two_node_job_env_and_gloo_allreduce(slurm):
    job = meshrun.submit(meshrun.JobSpec(function=allreduce, nodes=2, cpus=1, time_limit=240, backend="slurm"))
    r0 = job.result(timeout=240)
    r1 = pickle.loads((job.job_dir / "result.rank1.pkl").read_bytes())
    assert r0["sum"] == r1["sum"] == 3.0  # 1 + 2 across the two nodes
    assert {r0["node"], r1["node"]} == set(job.record.where.replace("node[", "").rstrip("]").split("-")) or \
        r0["node"] != r1["node"]
    assert r0["env"]["NODE_RANK"] == "0" and r1["env"]["NODE_RANK"] == "1"
    for r in (r0, r1):
        assert r["problems"] == []
        assert r["env"]["NNODES"] == "2" and r["env"]["WORLD_SIZE"] == "2" and r["env"]["GPUS_PER_NODE"] == "0"
    assert r0["env"]["MASTER_ADDR"] == r1["env"]["MASTER_ADDR"] and r0["env"]["MASTER_PORT"] == r1["env"]["MASTER_PORT"]


def node_info():
    import os

    return os.environ["NODE_RANK"], os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ["SLURMD_NODENAME"]


def test_two_node_gpu_job_each_node_gets_its_gres(slurm):
    job = meshrun.submit(meshrun.JobSpec(function=node_info, nodes=2, gpus=2, backend="slurm"))
    rank0 = job.result(timeout=120)
    rank1 = pickle.loads((job.job_dir / "result.rank1.pkl").read_bytes())
    assert rank0[0] == "0" and rank1[0] == "1" and rank0[2] != rank1[2]
    assert len(rank0[1].split(",")) == 2 and len(rank1[1].split(",")) == 2


def test_a_failing_node_fails_the_job_and_is_named(slurm):
    job = meshrun.run(["bash", "-c", 'if [ "$NODE_RANK" = 1 ]; then exit 7; fi; sleep 60'], nodes=2,
                      backend="slurm")
    assert job.wait(timeout=120) is JS.FAILED, job.reason
    assert job.record.exit_code == 7 and job.reason.startswith("node 1:"), job.reason


# ---- arrays -----------------------------------------------------------------------------------------

def square(x):
    return x * x


def test_map_of_20_is_one_job_array(slurm):
    fn = meshrun.job(backend="slurm", backend_options={"slurm": {"array_parallelism": 6}})(square)
    before = slurm.calls["sbatch"]
    jobs = fn.map(range(20))
    assert slurm.calls["sbatch"] == before + 1
    base = {j.backend_id.split("_")[0] for j in jobs}
    assert len(base) == 1 and [j.backend_id.split("_")[1] for j in jobs] == [str(i) for i in range(20)]
    assert "ArrayTaskThrottle=6" in scontrol(jobs[0].backend_id) or "%6" in scontrol(jobs[0].backend_id)
    assert meshrun.gather(jobs, timeout=240) == [i * i for i in range(20)]
    assert all(j.record.state is JS.SUCCEEDED for j in jobs)


def test_status_is_one_squeue_for_many_queued_jobs(slurm):
    fn = meshrun.job(backend="slurm", backend_options={"slurm": {"sbatch": ["--hold"]}})(square)
    jobs = fn.map(range(40))
    ids = [mb.JobRef.of(j) for j in jobs]
    for _ in range(3):
        slurm._squeue_at = -1e9
        before = dict(slurm.calls)
        st = slurm.status(ids)
        spent = {k: v - before.get(k, 0) for k, v in slurm.calls.items() if v != before.get(k, 0)}
        assert spent == {"squeue": 1}, spent
        assert {s.state for s in st.values()} == {JS.PENDING}
        assert all(s.reason.startswith("JobHeldUser") for s in st.values())
    # within query_interval, a poll costs no scheduler call at all
    before = sum(slurm.calls.values())
    slurm.status(ids)
    assert sum(slurm.calls.values()) == before


# ---- outcomes ---------------------------------------------------------------------------------------

def test_command_exit_code_and_logs(slurm):
    job = meshrun.run(["bash", "-c", "echo out; echo err >&2; exit 3"], backend="slurm")
    assert job.wait(timeout=60) is JS.FAILED
    assert job.record.exit_code == 3
    with pytest.raises(meshrun.JobFailed, match="code 3"):
        job.result()
    assert "out\n" in job.logs() and "err\n" in job.logs()


def test_function_exception_has_remote_traceback(slurm):
    def boom():
        raise ValueError("bad value 42")

    job = meshrun.submit(meshrun.JobSpec(function=boom, backend="slurm"))
    with pytest.raises(meshrun.JobFailed) as e:
        job.result(timeout=60)
    assert e.value.remote_type == "ValueError" and "bad value 42" in str(e.value)


def test_logs_follow(slurm):
    job = meshrun.run(["bash", "-c", "for i in 1 2 3; do echo line $i; sleep 0.7; done"], backend="slurm")
    wait_state(job, {JS.RUNNING, JS.SUCCEEDED})
    chunks, first_at = [], None
    for c in job.logs(follow=True):
        chunks.append(c)
        if first_at is None and "line 1" in c:
            first_at = time.monotonic()
    ended = time.monotonic()
    text = "".join(chunks)
    assert "line 1" in text and "line 3" in text
    assert first_at is not None and ended - first_at > 0.5  # the first line came while the job still ran
    assert job.wait(timeout=30) is JS.SUCCEEDED


def test_cancel_running_job(slurm):
    job = meshrun.run(["bash", "-c", "trap '' TERM; sleep 300"], backend="slurm", name="to-cancel")
    wait_state(job, {JS.RUNNING})
    deadline = time.monotonic() + 30
    while not (job.job_dir / "state.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = json.loads((job.job_dir / "state.json").read_text()).get("child")
    job.cancel()
    assert job.record.state is JS.CANCELLED, job.record.reason
    assert "CANCELLED" in job.record.reason
    assert re.search(r"JobState=(CANCELLED|COMPLETING)", scontrol(job.backend_id))
    # the job ignores SIGTERM: Slurm kills it after KillWait; then nothing of it is left
    end = time.monotonic() + 30
    while time.monotonic() < end and not (
            "JobState=CANCELLED" in scontrol(job.backend_id) and not alive(child)):
        time.sleep(0.2)
    assert "JobState=CANCELLED" in scontrol(job.backend_id) and not alive(child)
    with pytest.raises(meshrun.JobCancelled):
        job.result()


def test_cancel_pending_job(slurm):
    job = meshrun.run(["true"], backend="slurm", backend_options={"slurm": {"sbatch": ["--hold"]}})
    assert wait_state(job, {JS.PENDING}) is JS.PENDING
    assert job.record.reason.startswith("JobHeldUser")
    job.cancel()
    assert job.record.state is JS.CANCELLED


def test_time_limit_reports_timeout(slurm):
    job = meshrun.run(["sleep", "60"], backend="slurm", time_limit=2)
    assert job.wait(timeout=60) is JS.TIMEOUT
    with pytest.raises(meshrun.JobTimeout):
        job.result()
    assert "--time=00:01:00" in (job.job_dir / "job.sbatch").read_text()


def test_status_survives_a_slurmctld_restart(slurm):
    job = meshrun.run(["bash", "-c", "sleep 6; echo finished"], backend="slurm")
    wait_state(job, {JS.RUNNING})
    seen = []
    stop = threading.Event()

    def poll():
        b = meshrun.get_backend("slurm")
        while not stop.is_set():
            b._squeue_at = -1e9
            seen.append(b.status([mb.JobRef.of(job)])[job.backend_id].state)
            time.sleep(0.1)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    p = subprocess.run(["bash", str(CLUSTER), "restart-ctld"], capture_output=True, text=True, timeout=120)
    stop.set()
    t.join(10)
    assert p.returncode == 0, p.stderr
    assert set(seen) <= {JS.RUNNING, JS.UNKNOWN, JS.SUCCEEDED}, seen
    assert job.wait(timeout=60) is JS.SUCCEEDED
    assert "finished" in job.logs()
    end = time.monotonic() + 30  # meshrun saw the exit record; Slurm agrees once the job is completed
    while "JobState=COMPLETED" not in scontrol(job.backend_id) and time.monotonic() < end:
        time.sleep(0.2)
    assert "JobState=COMPLETED" in scontrol(job.backend_id)


def restart_count():
    import os
    import time

    if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
        time.sleep(30)
    return os.environ.get("SLURM_RESTART_COUNT", "0")


def test_requeued_job_runs_again_and_reports_the_second_run(slurm):
    job = meshrun.submit(meshrun.JobSpec(function=restart_count, backend="slurm"))
    wait_state(job, {JS.RUNNING})
    while not (job.job_dir / "state.json").exists():
        time.sleep(0.05)
    p = subprocess.run(["scontrol", "requeue", job.backend_id], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    # Slurm holds a requeued job back until the old run's credential has expired (cred_expire, 30 s on the
    # test cluster: BeginTime); status says so. Starting it sooner (scontrol update StartTime=now) only makes
    # Slurm refuse the launch ("Job credential revoked") and end the job FAILED, which meshrun reports as is.
    end = time.monotonic() + 30
    while not (job.status() is JS.PENDING and "BeginTime" in (job.reason or "")) and time.monotonic() < end:
        assert not job.record.terminal, job.history
        time.sleep(0.1)
    assert job.record.state is JS.PENDING and "BeginTime" in job.reason, job.history
    assert job.wait(timeout=180) is JS.SUCCEEDED, job.history
    assert job.result() == "1"
    assert (job.job_dir / "requeue-1").is_dir()
    assert "requeued" in job.logs()


# ---- re-attach ----------------------------------------------------------------------------------------

def test_find_by_name_when_the_id_is_unknown(slurm, meshrun_home):
    job = meshrun.run(["sleep", "30"], backend="slurm")
    _found_by_name_alone(job, meshrun_home)


def _found_by_name_alone(job, meshrun_home):
    """A fresh backend that knows nothing of the job (its id marker removed) finds it, sees it, cancels it."""
    bid = job.backend_id
    (job.job_dir / "slurm.json").unlink()
    meshrun.configure({"backends": {"slurm": {"query_interval": 0.3}}})  # a fresh backend, nothing cached
    b = meshrun.get_backend("slurm")
    assert b.find(job.id, job.job_dir) == bid
    assert (job.job_dir / "slurm.json").exists()  # found once, remembered in the job's folder
    ref = mb.JobRef(bid, job.id, job.job_dir)
    assert b.status([ref])[bid].state in (JS.PENDING, JS.RUNNING)
    b.cancel(ref)


def test_find_array_member(slurm):
    jobs = meshrun.job(backend="slurm", backend_options={"slurm": {"sbatch": ["--hold"]}})(square).map([1, 2, 3])
    (jobs[2].job_dir / "slurm.json").unlink()
    meshrun.configure({})
    assert meshrun.get_backend("slurm").find(jobs[2].id, jobs[2].job_dir) == jobs[2].backend_id


def test_reattach_from_another_process(slurm, meshrun_home):
    job = meshrun.run(["bash", "-c", "sleep 2; echo from-afar"], backend="slurm")
    code = (f"import meshrun; j = meshrun.Job.attach({job.id!r}); print(j.wait(timeout=60).value); "
            f"print(j.backend_id)")
    p = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ})
    assert p.stdout.split() == ["succeeded", job.backend_id], p.stderr


# ---- hostile input ----------------------------------------------------------------------------------

def echo_all(*args, **kwargs):
    import os
    import sys

    return {"args": args, "kwargs": kwargs, "name": os.environ.get("MESHRUN_JOB_NAME"),
            "env": os.environ.get("HOSTILE"), "cwd": os.getcwd(), "argv": sys.argv}


def test_hostile_strings_reach_the_job_unchanged(slurm, tmp_path, monkeypatch):
    home = tmp_path / "home it's \"q\" $(touch pwn) #1 %j ü"
    monkeypatch.setenv("MESHRUN_HOME", str(home))
    meshrun.configure({"backends": {"slurm": {"query_interval": 0.3}}})
    workdir = tmp_path / "wd; $(id) 'x' \"y\" ü"
    workdir.mkdir()
    comment = "--comment=" + HOSTILE.replace("\n", " ")
    spec = meshrun.JobSpec(function=echo_all, args=(HOSTILE, "--time=99"), kwargs={"k": HOSTILE}, name=HOSTILE,
                           env={"HOSTILE": HOSTILE}, workdir=str(workdir), backend="slurm",
                           backend_options={"slurm": {"sbatch": [comment]}})
    job = meshrun.submit(spec)
    r = job.result(timeout=90)
    assert r["args"] == (HOSTILE, "--time=99") and r["kwargs"] == {"k": HOSTILE}
    assert r["name"] == HOSTILE and r["env"] == HOSTILE and r["cwd"] == str(workdir)
    assert not Path("/tmp/pwned").exists() and not (workdir / "pwn").exists()
    info = subprocess.run(["scontrol", "show", "job", job.backend_id], capture_output=True, text=True).stdout
    assert "Comment=" + HOSTILE.replace("\n", " ")[len(""):] in info
    assert re.search(r"TimeLimit=(UNLIMITED|\S+)", info)
    # a command job: argv reaches the program as is, no shell in between
    job = meshrun.run(["printf", "%s\\0", HOSTILE, "$HOME", "a;b"], backend="slurm", name=HOSTILE,
                      env={"X": HOSTILE})
    assert job.wait(timeout=60) is JS.SUCCEEDED, job.reason
    assert job.logs().split("\0")[:3] == [HOSTILE, "$HOME", "a;b"]


def test_a_job_folder_slurm_cannot_take_is_a_clear_error(slurm, tmp_path, monkeypatch):
    monkeypatch.setenv("MESHRUN_HOME", str(tmp_path / "back\\slash"))
    meshrun.configure({})
    with pytest.raises(meshrun.BackendError, match="backslash"):
        meshrun.run(["true"], backend="slurm")


@pytest.mark.parametrize("opts", [{"partition": "debug; rm -rf /"}, {"account": "$(id)"},
                                  {"sbatch": ["--comment=x\nmore"]}, {"sbatch": ["--output=/etc/passwd"]},
                                  {"qos": "a b"}, {"constraint": "x\n#SBATCH --uid=0"}])
def test_hostile_options_are_refused_naming_the_field(slurm, opts):
    spec = meshrun.JobSpec(command=["true"], backend_options={"slurm": opts})
    with pytest.raises(meshrun.SpecError) as e:
        slurm.offers(spec)
    assert e.value.field == f"backend_options.slurm.{next(iter(opts))}"
    # through placement the same error is the reason the job cannot be placed; nothing is submitted
    before = slurm.calls["sbatch"]
    with pytest.raises(meshrun.MeshrunError, match=re.escape(f"backend_options.slurm.{next(iter(opts))}")):
        meshrun.run(["true"], backend="slurm", backend_options={"slurm": opts})
    assert slurm.calls["sbatch"] == before


# ---- status without a job folder, and Slurm's own time limit (kept last: it needs a minute) ------------

def test_no_false_lost(slurm):
    from meshrun_slurm._backend import Target

    t = Target("x", Path("/nonexistent"), "/nonexistent", 1, time.time())
    st = slurm._combine("999999", t, [], None, None)
    assert st.state is JS.UNKNOWN
    old = Target("x", Path("/nonexistent"), "/nonexistent", 1, time.time() - 3600)
    assert slurm._combine("999999", old, [], None, None).state is JS.LOST
    assert slurm._combine("999999", old, [], None, "squeue failed").state is JS.UNKNOWN
    assert slurm.status(["999999"])["999999"].state is JS.UNKNOWN  # never submitted here: not LOST either


def test_slurm_enforced_time_limit_reports_timeout(slurm_timeout_job, monkeypatch):
    monkeypatch.setenv("MESHRUN_HOME", str(slurm_timeout_job["home"]))
    meshrun.configure({})
    job = meshrun.Job.attach(slurm_timeout_job["id"])
    left = 200 - (time.monotonic() - slurm_timeout_job["started"])
    assert job.wait(timeout=max(left, 10)) is JS.TIMEOUT, job.reason
    assert job.reason.startswith("TIMEOUT")
    with pytest.raises(meshrun.JobTimeout):
        job.result()
    assert "TIME LIMIT" in job.logs()


def test_the_users_comment_is_kept_and_the_job_still_found(slurm, meshrun_home):
    job = meshrun.run(["sleep", "30"], backend="slurm",
                      backend_options={"slurm": {"sbatch": ["--comment my own note"]}})
    p = slurm._run(["squeue", "--noheader", "-j", job.backend_id, "--format=%k"], check=False)
    assert p.stdout.strip() == "my own note"
    _found_by_name_alone(job, meshrun_home)
