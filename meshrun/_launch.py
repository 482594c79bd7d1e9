"""The distributed-training environment contract, the same on every backend.

Every node of a job sees:

    MASTER_ADDR     address of node 0 (reachable from every node)
    MASTER_PORT     a TCP port on node 0 free for the rendezvous
    NNODES          number of nodes
    NODE_RANK       this node's rank, 0 .. NNODES-1
    GPUS_PER_NODE   GPUs this node was given (0 for CPU jobs)
    NPROC_PER_NODE  max(GPUS_PER_NODE, 1): one process per GPU, or one per node without GPUs
    WORLD_SIZE      NNODES x NPROC_PER_NODE

so this works unchanged everywhere, for GPU and CPU jobs alike::

    torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \\
             --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" train.py

RANK and LOCAL_RANK are not set: they belong to the processes torchrun (or the user) starts on each node.

The values are computed in one place, the host agent's :func:`meshrun._agent.dist_env`, on each node, from
``launch.json`` (the spec's nodes and GPUs, what the backend fixed) and the scheduler's own variables
(:data:`meshrun._agent.SCHEDULER_VARS`); this module is its public face for backends that must write the
contract somewhere the agent does not run (a Kubernetes pod's environment).
"""

from __future__ import annotations

import socket
from typing import Mapping

from . import _agent

CONTRACT = _agent.DIST_VARS


def dist_env(
    *, nnodes: int, node_rank: int, master_addr: str, master_port: int, gpus_per_node: int
) -> dict[str, str]:
    """The contract for one node with these values (``master_port`` 0: a port free on this machine)."""
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(f"node_rank {node_rank} is outside 0..{nnodes - 1}")
    launch = {"nodes": int(nnodes), "gpus": int(gpus_per_node),
              "dist": {"NODE_RANK": str(int(node_rank)), "MASTER_ADDR": str(master_addr),
                       "MASTER_PORT": str(int(master_port))}}
    return _agent.dist_env(launch, {})


def dist_shell(scheduler: str, defaults: Mapping[str, object]) -> str:
    """Shell text exporting the contract from ``scheduler``'s own variables (the agent's table), for a job that
    runs without the host agent; ``defaults`` for NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE."""
    return _agent.dist_shell(scheduler, defaults)


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
        n, r, g, p, w = (int(env[k]) for k in ("NNODES", "NODE_RANK", "GPUS_PER_NODE", "NPROC_PER_NODE", "WORLD_SIZE"))
        int(env["MASTER_PORT"])
    except ValueError as e:
        return [f"not a number: {e}"]
    if not 0 <= r < n:
        problems.append(f"NODE_RANK={r} is outside 0..{n - 1}")
    if p != max(g, 1):
        problems.append(f"NPROC_PER_NODE={p} but max(GPUS_PER_NODE, 1) = {max(g, 1)}")
    if w != n * p:
        problems.append(f"WORLD_SIZE={w} but NNODES x NPROC_PER_NODE = {n * p}")
    return problems
