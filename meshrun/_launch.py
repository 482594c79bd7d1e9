"""The distributed-training environment contract, the same on every backend.

Every node of a job sees:

    MASTER_ADDR     address of node 0 (reachable from every node)
    MASTER_PORT     a TCP port on node 0 free for the rendezvous
    NNODES          number of nodes
    NODE_RANK       this node's rank, 0 .. NNODES-1
    GPUS_PER_NODE   GPUs this node was given (0 for CPU jobs)
    WORLD_SIZE      NNODES x max(GPUS_PER_NODE, 1): one process per GPU, or one per node without GPUs

so this works unchanged everywhere::

    torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \\
             --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" train.py

RANK and LOCAL_RANK are not set: they belong to the processes torchrun (or the user) starts on each node.
"""

from __future__ import annotations

import socket
from typing import Mapping

CONTRACT = ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "GPUS_PER_NODE", "WORLD_SIZE")


def dist_env(
    *, nnodes: int, node_rank: int, master_addr: str, master_port: int, gpus_per_node: int
) -> dict[str, str]:
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(f"node_rank {node_rank} is outside 0..{nnodes - 1}")
    return {
        "MASTER_ADDR": str(master_addr),
        "MASTER_PORT": str(int(master_port)),
        "NNODES": str(int(nnodes)),
        "NODE_RANK": str(int(node_rank)),
        "GPUS_PER_NODE": str(int(gpus_per_node)),
        "WORLD_SIZE": str(int(nnodes) * max(int(gpus_per_node), 1)),
    }


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on this machine right now (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_dist_env(env: Mapping[str, str]) -> list[str]:
    """Problems with a distributed environment (empty when it honours the contract)."""
    problems = [f"{k} is not set" for k in CONTRACT if k not in env]
    if problems:
        return problems
    try:
        n, r, g, w = (int(env[k]) for k in ("NNODES", "NODE_RANK", "GPUS_PER_NODE", "WORLD_SIZE"))
        int(env["MASTER_PORT"])
    except ValueError as e:
        return [f"not a number: {e}"]
    if not 0 <= r < n:
        problems.append(f"NODE_RANK={r} is outside 0..{n - 1}")
    if w != n * max(g, 1):
        problems.append(f"WORLD_SIZE={w} but NNODES x max(GPUS_PER_NODE, 1) = {n * max(g, 1)}")
    return problems
