"""The env contract on Slurm: GPUs asked through sbatch's own options are refused (gpus= is the one way), and the
README's torchrun line runs on two nodes of the test cluster."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from meshrun.testing import GLOO_ALLREDUCE

import meshrun
from meshrun_slurm._options import job_options

README = Path(__file__).resolve().parents[3] / "README.md"

TRAIN = GLOO_ALLREDUCE


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


def test_readme_torchrun_line_on_two_nodes(slurm):
    pytest.importorskip("torch")
    Path("train.py").write_text(TRAIN)  # the slurm fixture's working folder, seen by every node
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    job = meshrun.run(readme_torchrun_line(), nodes=2, cpus=1, backend="slurm", time_limit=240,
                      env={"PATH": path, "OMP_NUM_THREADS": "1"})
    assert job.result(timeout=240) == 0, job.logs()
    rank0 = (job.job_dir / "output.log").read_text()
    rank1 = (job.job_dir / "output.rank1.log").read_text()
    assert "rank 0 of 2 on node 0 sum 3" in rank0, rank0
    assert "rank 1 of 2 on node 1 sum 3" in rank1, rank1
