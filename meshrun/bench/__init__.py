"""Collective bandwidth benchmark for distributed training, with nccl-tests' numbers, as a meshrun job.

    import meshrun.bench

    res = meshrun.bench.run("all_reduce", max_bytes="8G", backend="slurm", nodes=2, gpus_per_node=8)
    print(res.table())                 # nccl-tests-style table
    res.busbw("all_reduce", 1 << 30)   # GB/s, nccl-tests' definition
    res.files                          # {"jsonl": ..., "table": ..., "png": ...}

torch.distributed does the communication (NCCL on GPUs, gloo on CPUs); torch is imported only inside the
job, so ``import meshrun.bench`` stays light. See docs/bench.md for the definitions and what was measured.
"""

from __future__ import annotations

from ._api import collect, run, submit
from ._math import (
    COLLECTIVES,
    DTYPES,
    MODES,
    algbw,
    busbw,
    busbw_factor,
    counts,
    parse_bytes,
    sweep,
)
from ._options import BenchError, BenchOptions
from ._report import BenchResult, flag_slow

load = BenchResult.load

__all__ = [
    "COLLECTIVES",
    "DTYPES",
    "MODES",
    "BenchError",
    "BenchOptions",
    "BenchResult",
    "algbw",
    "busbw",
    "busbw_factor",
    "collect",
    "counts",
    "flag_slow",
    "load",
    "parse_bytes",
    "run",
    "submit",
    "sweep",
]
