#!/bin/bash
# The #SBATCH header of distributed/minGPT-ddp/mingpt/slurm/sbatch_run.sh, pytorch/examples (BSD-3-Clause).

#SBATCH --job-name=multinode-example
#SBATCH --nodes=2
#SBATCH --ntasks=2
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=4
