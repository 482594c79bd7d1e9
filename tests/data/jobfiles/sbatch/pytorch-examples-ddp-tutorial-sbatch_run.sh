#!/bin/bash
# The #SBATCH header of distributed/ddp-tutorial-series/slurm/sbatch_run.sh, pytorch/examples (BSD-3-Clause).

#SBATCH --job-name=multinode-example
#SBATCH --nodes=4
#SBATCH --ntasks=4
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=4
