"""PyTorch DDP training, launched by torchrun through meshrun's distributed env contract.

A tiny model trained for a few steps with DistributedDataParallel: NCCL, one process per GPU, where the job
has GPUs; gloo on CPUs otherwise. Every node of a meshrun job gets NNODES, NODE_RANK, NPROC_PER_NODE,
MASTER_ADDR and MASTER_PORT, so the same torchrun line starts it on one node or many, on any backend.
Run from the repository's root (the quotes matter: the job's shell expands the variables, on each node):

    meshrun run --shell -e NPROC_PER_NODE=2 -- 'torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" examples/ddp_train.py'
    meshrun run --shell --backend slurm --nodes 2 -- 'torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" examples/ddp_train.py'

The first runs on this machine (one node; NPROC_PER_NODE is its GPU count, or 1 without GPUs, and
`-e NPROC_PER_NODE=2` makes it two CPU ranks); the second on two Slurm nodes (add `--gpus 8` for eight GPUs
each). From Python: `meshrun.run('torchrun ... examples/ddp_train.py', nodes=2, gpus=8)`.
Each rank prints its loss; rank 0 checks that every rank ended with the same weights (DDP kept them in sync).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun set RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = DDP(torch.nn.Linear(8, 1).to(device), device_ids=[local_rank] if cuda else None)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    true_w = torch.arange(8, dtype=torch.float32, device=device) / 8

    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard of the data
    for step in range(args.steps):
        x = torch.randn(64, 8, generator=gen).to(device)
        y = x @ true_w + 0.5
        loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
        opt.zero_grad()
        loss.backward()  # DDP all-reduces the gradients here
        opt.step()
    print(f"rank {rank} of {world} on node {os.environ.get('NODE_RANK', '?')}: loss {loss.item():.4f} "
          f"after {args.steps} steps ({'nccl' if cuda else 'gloo'})", flush=True)

    # every rank must hold the same weights: gather them on all ranks and compare
    w = torch.cat([p.detach().flatten() for p in model.parameters()])
    every = [torch.zeros_like(w) for _ in range(world)]
    dist.all_gather(every, w)
    if rank == 0:
        same = all(torch.equal(every[0], other) for other in every[1:])
        print(f"weights identical on all {world} ranks: {same}", flush=True)
        if not same:
            raise SystemExit("DDP ranks diverged")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
