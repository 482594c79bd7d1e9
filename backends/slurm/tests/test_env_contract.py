"""The env contract on Slurm: GPUs asked through sbatch's own options are refused (gpus= is the one way), and the
README's torchrun line runs the DDP example (examples/ddp_train.py) on two nodes of the test cluster."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import meshrun
from meshrun_slurm._options import job_options

README = Path(__file__).resolve().parents[3] / "README.md"
DDP_EXAMPLE = README.parent / "examples" / "ddp_train.py"


@pytest.mark.parametrize("option", [
    "--gres=gpu:2", "--gres=gpu:a100:2", "--gres=nvme:1,gpu:1", "--gres=gpu", "--gre=gpu:2", "--gpus=2", "-G2",
    "--gpus-per-node=a100:2", "--gpus-per-task=1", "--gpus-per-n=1", "--tres-per-task=gres/gpu:1",
])
def test_sbatch_options_asking_for_gpus_are_refused_with_a_pointer_to_gpus(option):
    with pytest.raises(meshrun.SpecError) as e:
        job_options({"sbatch": [option]})
    assert e.value.field == "backend_options.slurm.sbatch" and "gpus=" in str(e.value) and option in str(e.value)
    with pytest.raises(meshrun.SpecError, match="gpus="):
        job_options({"sbatch": {option.lstrip("-").split("=")[0]: option.split("=", 1)[1]}} if "=" in option
                    else {"sbatch": [option]})


def test_the_sbatch_setting_refuses_them_too():
    meshrun.configure({"backends": {"slurm": {"sbatch": ["--mail-type=END", "--gpus-per-node=1"]}}})
    with pytest.raises(meshrun.ConfigError, match="gpus="):
        meshrun.get_backend("slurm").settings


def test_other_gres_and_gpu_binding_options_pass():
    opts = job_options({"sbatch": ["--gres=nvme:1", "--gpu-bind=closest", "--mem-per-gpu=4G", "--cpus-per-gpu=2"]})
    assert opts.sbatch == ("--gres=nvme:1", "--gpu-bind=closest", "--mem-per-gpu=4G", "--cpus-per-gpu=2")


def readme_torchrun_line() -> str:
    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index("## Distributed jobs"):], re.S).group(1)
    return re.sub(r"\\\n\s*", "", block).strip()


def test_readme_torchrun_line_on_two_nodes_runs_the_ddp_example(slurm):
    """examples/ddp_train.py's two-node command, as its header gives it, from the repository's root: the README's
    torchrun line, DDP over gloo between two Slurm nodes."""
    pytest.importorskip("torch")
    two_nodes = next(line.strip() for line in DDP_EXAMPLE.read_text().splitlines()
                     if line.strip().startswith("meshrun run") and "--nodes 2" in line)
    assert "--backend slurm" in two_nodes and shlex.split(two_nodes)[-1].startswith(readme_torchrun_line()[:-8])
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    p = subprocess.run([sys.executable, "-m", "meshrun", *shlex.split(two_nodes)[1:]], capture_output=True,
                       text=True, timeout=240, cwd=DDP_EXAMPLE.parents[1],
                       env={**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", "MESHRUN_SLURM_QUERY_INTERVAL": "0.3"})
    job = meshrun.Job.attach(re.search(r"job (\S+) submitted to slurm", p.stderr).group(1))
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr}\n{job.logs()}"
    rank0 = (job.job_dir / "output.log").read_text()
    rank1 = (job.job_dir / "output.rank1.log").read_text()
    assert "rank 0 of 2 on node 0: loss" in rank0 and "weights identical on all 2 ranks: True" in rank0, rank0
    assert "rank 1 of 2 on node 1: loss" in rank1, rank1
