"""The distributed env contract: one function in the host agent, fed each scheduler's own variables, and the
README's torchrun line run for real as a CPU job."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from meshrun.testing import GLOO_ALLREDUCE

import meshrun
from meshrun import _agent

ROOT = Path(__file__).resolve().parents[1]


def readme_torchrun_line() -> str:
    """The torchrun line of the README's "Distributed jobs" section, as one line."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Distributed jobs"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return re.sub(r"\\\n\s*", "", block).strip()


TRAIN = GLOO_ALLREDUCE


def contract(launch, environ=None, leased=None):
    env = _agent.dist_env(launch, environ or {}, leased)
    assert meshrun.check_dist_env(env) == [], env
    return env


# ---- the function, per scheduler ------------------------------------------------------------------------


def test_one_node_defaults_cpu_and_gpu():
    env = contract({"nodes": 1, "gpus": 0})
    assert (env["NNODES"], env["NODE_RANK"], env["MASTER_ADDR"]) == ("1", "0", "127.0.0.1")
    assert (env["GPUS_PER_NODE"], env["NPROC_PER_NODE"], env["WORLD_SIZE"]) == ("0", "1", "1")
    assert 0 < int(env["MASTER_PORT"]) < 65536
    env = contract({"nodes": 1, "gpus": 4})
    assert (env["GPUS_PER_NODE"], env["NPROC_PER_NODE"], env["WORLD_SIZE"]) == ("4", "4", "4")
    # with leases, the GPUs this host gave the job
    assert contract({"nodes": 1, "gpus": 4}, leased=2)["NPROC_PER_NODE"] == "2"
    assert list(env) == list(meshrun.DIST_ENV_VARS)


def test_the_jobs_own_env_wins_and_derived_values_follow():
    env = contract({"nodes": 2, "gpus": 0, "env": {"MASTER_PORT": "4242", "NODE_RANK": "1", "GPUS_PER_NODE": "3"}})
    assert (env["MASTER_PORT"], env["NODE_RANK"], env["NPROC_PER_NODE"], env["WORLD_SIZE"]) == ("4242", "1", "3", "6")


def test_without_a_scheduler_the_agents_environment_then_dist():
    launch = {"nodes": 2, "gpus": 1, "dist": {"MASTER_ADDR": "head", "MASTER_PORT": "29500", "NODE_RANK": "0"}}
    env = contract(launch, {"NODE_RANK": "1"})  # a launcher exported the rank per node
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["NODE_RANK"], env["WORLD_SIZE"]) == ("head", "29500", "1", "2")
    # "0" means: a port free on this host
    assert contract({"nodes": 1, "dist": {"MASTER_PORT": "0"}})["MASTER_PORT"] != "0"


def test_a_jobs_scheduler_variables_count_only_when_launch_names_that_scheduler():
    # e.g. the local backend used from inside a Slurm allocation: Slurm's variables are not this job's
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "4", "SLURM_GPUS_ON_NODE": "8"}
    env = contract({"nodes": 1, "gpus": 0}, slurm)
    assert (env["NNODES"], env["NODE_RANK"], env["GPUS_PER_NODE"]) == ("1", "0", "0")


SLURM_NODE1 = {"SLURM_JOB_ID": "77", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2",
               "SLURM_JOB_NODELIST": "node[3-4]", "MESHRUN_MASTER_ADDR": "10.1.0.3", "MESHRUN_MASTER_PORT": "20077",
               "MESHRUN_MASTER_OF": "77", "NODE_RANK": "0", "GPUS_PER_NODE": "9"}


def test_slurm_node_rank_nodes_master_and_gpus_from_slurm():
    launch = {"nodes": 2, "gpus": 2, "scheduler": "slurm"}
    env = contract(launch, {**SLURM_NODE1, "SLURM_GPUS_ON_NODE": "2"})
    assert env == {"MASTER_ADDR": "10.1.0.3", "MASTER_PORT": "20077", "NNODES": "2", "NODE_RANK": "1",
                   "GPUS_PER_NODE": "2", "NPROC_PER_NODE": "2", "WORLD_SIZE": "4"}
    # GPUs: SLURM_GPUS_ON_NODE, else the step's or the job's GPU list, else the job's gpus
    assert contract(launch, {**SLURM_NODE1, "SLURM_STEP_GPUS": "0,1,2"})["GPUS_PER_NODE"] == "3"
    assert contract(launch, {**SLURM_NODE1, "SLURM_JOB_GPUS": "5"})["GPUS_PER_NODE"] == "1"
    assert contract({**launch, "gpus": 0}, SLURM_NODE1)["GPUS_PER_NODE"] == "0"  # not the inherited 9


def test_slurm_rendezvous_of_another_job_is_not_this_ones():
    env = contract({"nodes": 1, "scheduler": "slurm"}, {**SLURM_NODE1, "SLURM_JOB_ID": "78", "SLURM_NODEID": "0",
                                                         "SLURM_JOB_NUM_NODES": "1"})
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] != "20077"


def test_slurm_first_host_and_rendezvous_text():
    assert _agent.slurm_first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert _agent.slurm_first_host("rack[2-3]-n[010-011]") == "rack2-n010"
    assert _agent.slurm_first_host("login") == "login"
    # no scontrol knows this host: its name is the address; the text is eval'd by bash in the batch script
    env = {"SLURM_JOB_NODELIST": "no-such-node-h6[1-2]", "SLURM_JOB_ID": "9"}
    show = 'eval "$1"; echo "$MESHRUN_MASTER_ADDR $MESHRUN_MASTER_PORT $MESHRUN_MASTER_OF"'
    out = subprocess.run(["bash", "-c", show, "x", _agent.rendezvous(env)], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "no-such-node-h61" and out[1].isdigit() and out[2] == "9"


def test_skypilot():
    env = contract({"nodes": 2, "scheduler": "skypilot", "dist": {"MASTER_PORT": "29511"}},
                   {"SKYPILOT_NODE_RANK": "1", "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_IPS": "10.9.0.1\n10.9.0.2",
                    "SKYPILOT_NUM_GPUS_PER_NODE": "0", "MASTER_ADDR": "elsewhere"})
    assert env == {"MASTER_ADDR": "10.9.0.1", "MASTER_PORT": "29511", "NNODES": "2", "NODE_RANK": "1",
                   "GPUS_PER_NODE": "0", "NPROC_PER_NODE": "1", "WORLD_SIZE": "2"}


DSTACK = {"DSTACK_NODES_NUM": "2", "DSTACK_NODE_RANK": "1", "DSTACK_MASTER_NODE_IP": "10.0.0.5",
          "DSTACK_GPUS_PER_NODE": "4", "MESHRUN_MASTER_PORT": "29600"}


def test_dstack_and_its_shell_rendering_agree():
    env = contract({"nodes": 2, "scheduler": "dstack"}, DSTACK)
    assert env == {"MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29600", "NNODES": "2", "NODE_RANK": "1",
                   "GPUS_PER_NODE": "4", "NPROC_PER_NODE": "4", "WORLD_SIZE": "8"}
    text = meshrun.dist_shell("dstack", {"NNODES": 1, "NODE_RANK": 0, "MASTER_ADDR": "127.0.0.1",
                                         "MASTER_PORT": 29500, "GPUS_PER_NODE": 0})
    show = 'printf "%s\\n" ' + " ".join(f'"${k}"' for k in meshrun.DIST_ENV_VARS)
    for given, want in ((DSTACK, env), ({}, None)):
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DSTACK_") and k != "MESHRUN_MASTER_PORT"}
        out = subprocess.run(["sh", "-c", f"{text} && {show}"], env={**clean, **given}, capture_output=True,
                             text=True, check=True).stdout.split()
        got = dict(zip(meshrun.DIST_ENV_VARS, out))
        assert got == (want or {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "NNODES": "1", "NODE_RANK": "0",
                                "GPUS_PER_NODE": "0", "NPROC_PER_NODE": "1", "WORLD_SIZE": "1"})
    with pytest.raises(ValueError, match="plain word"):
        meshrun.dist_shell("dstack", {"NNODES": "$(id)", "NODE_RANK": 0, "MASTER_ADDR": "x", "MASTER_PORT": 1,
                                      "GPUS_PER_NODE": 0})


def test_public_dist_env_and_check():
    env = meshrun.dist_env(nnodes=2, node_rank=1, master_addr="h", master_port=29500, gpus_per_node=0)
    assert env["NPROC_PER_NODE"] == "1" and env["WORLD_SIZE"] == "2" and meshrun.check_dist_env(env) == []
    assert "NPROC_PER_NODE=0 but max(GPUS_PER_NODE, 1) = 1" in meshrun.check_dist_env({**env, "NPROC_PER_NODE": "0"})
    without = {k: v for k, v in env.items() if k != "NPROC_PER_NODE"}
    assert meshrun.check_dist_env(without) == ["NPROC_PER_NODE is not set"]


# ---- the README's line, for real --------------------------------------------------------------------------


def test_readme_torchrun_line_runs_a_cpu_job_on_the_local_backend(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    line = readme_torchrun_line()
    assert '--nproc-per-node "$NPROC_PER_NODE"' in line
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text(TRAIN)
    monkeypatch.chdir(work)
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    job = meshrun.run(line, backend="local", env={"PATH": path, "OMP_NUM_THREADS": "1"}, time_limit=300)
    assert job.result(timeout=300) == 0, job.logs()
    assert "rank 0 of 1 on node 0 sum 1" in job.logs()
