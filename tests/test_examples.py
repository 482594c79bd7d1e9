"""The examples run as documented: each one is run with the command its header gives, on the local backend
(CPU and gloo where there is no GPU). The two-node DDP run is in backends/slurm/tests/test_env_contract.py."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _local_backend(monkeypatch):
    """These tests are about the local backend: pin it, whatever other backends are installed."""
    monkeypatch.setenv("MESHRUN_BACKEND", "local")


REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
# torchrun and meshrun of this interpreter's environment first on PATH, as for a user of the venv
PATH = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin")


def header_commands(name: str) -> list[str]:
    """The commands an example's header tells people to run (its indented `meshrun ...`, `python ...` and
    `bash ...` lines), comments cut."""
    text = (EXAMPLES / name).read_text()
    lines = re.findall(r"^(?:#)? {4,}((?:[A-Z_]+=\S+ )*(?:meshrun|python|bash) .*)$", text, re.M)
    return [re.sub(r"\s+#\s.*$", "", line).strip() for line in lines]


def run_example(command: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    """Run one header command from the repository's root; `meshrun` and `python` are this interpreter's."""
    argv = shlex.split(command)
    if argv[0] == "meshrun":
        argv = [sys.executable, "-m", "meshrun", *argv[1:]]
    elif argv[0] == "python":
        argv[0] = sys.executable
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                       env={**os.environ, "PATH": PATH, **env})
    assert p.returncode == 0, f"{command}\n-> {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def test_quickstart_cpu_only():
    env = {k: v for k, v in os.environ.items() if k != "MESHRUN_GPUS"}
    p = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True, text=True,
                       timeout=300, env={**env, "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    assert "final loss" in p.stdout and "hello from" in p.stdout and "no GPUs here" in p.stdout


def test_quickstart_with_declared_gpus():
    p = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "MESHRUN_GPUS": "0,1"})
    assert p.returncode == 0, p.stderr
    assert "GPU job" in p.stdout and "CUDA_VISIBLE_DEVICES=0 " in p.stdout


def test_every_example_says_how_to_run_it():
    for f in sorted(EXAMPLES.iterdir()):
        if f.suffix in (".py", ".sh", ".yaml"):
            assert header_commands(f.name), f"{f.name}: no command to run it in its header"


def test_sweep_gathers_a_table_best_first_with_the_failed_points():
    [command] = header_commands("sweep.py")
    out = run_example(command).stdout
    rows = [line.split() for line in out.splitlines() if re.match(r"\s*[\d.]+\s+[\d.]+\s+", line)]
    assert len(rows) == 8, out
    losses = [float(r[2]) for r in rows if r[2] != "failed"]
    assert len(losses) == 6 and losses == sorted(losses), out
    assert [r[0] for r in rows if r[2] == "failed"] == ["2.0", "2.0"], out
    assert "lr=2.0 is too large" in out and f"best: lr={rows[0][0]} momentum={rows[0][1]}" in out


@pytest.mark.slow
def test_ddp_training_with_torchrun_on_one_node():
    pytest.importorskip("torch")
    local, _slurm = header_commands("ddp_train.py")
    assert "--backend" not in local and "NPROC_PER_NODE=2" in local
    out = run_example(local).stdout
    assert "rank 0 of 2 on node 0" in out and "rank 1 of 2 on node 0" in out, out
    assert "weights identical on all 2 ranks: True" in out, out


@pytest.mark.slow
def test_skypilot_task_file_runs_through_meshrun_run():
    pytest.importorskip("torch")
    local = header_commands("task.yaml")[0]
    assert local == "meshrun run examples/task.yaml"
    out = run_example(local).stdout
    assert "setup: Python" in out and "in examples/" in out, out  # setup ran first, in the task's workdir
    assert "after 10 steps" in out and "weights identical on all 2 ranks: True" in out, out  # envs reached run


@pytest.mark.slow
def test_bandwidth_check(tmp_path):
    pytest.importorskip("torch")
    [here, _slurm] = header_commands("bandwidth.sh")
    assert here == "bash examples/bandwidth.sh"
    # the header's command with a short sweep (this checks the script, not the machine), and a bar so high that
    # the check must fail
    p = subprocess.run(shlex.split(here) + ["-e", "64K", "-w", "1", "-n", "2"], capture_output=True, text=True,
                       cwd=REPO, timeout=300, env={**os.environ, "PATH": PATH, "OUT": str(tmp_path),
                                                   "MIN_BUSBW": "1e9"})
    out = p.stdout
    assert p.returncode == 1, f"{p.stdout}\n{p.stderr}"
    assert out.count("# all_reduce") == 1 and "busbw" in out, out
    assert re.search(r"peak all_reduce busbw [\d.e+-]+ GB/s at \d+ B .* on 2 ranks; expected at least 1e\+09", out), out
    assert (tmp_path / "bench.jsonl").is_file()
    p = subprocess.run([*shlex.split(here), "--no-such-option"], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PATH": PATH}, timeout=120)
    assert p.returncode == 2 and "peak" not in p.stdout  # a failing bench stops the script
