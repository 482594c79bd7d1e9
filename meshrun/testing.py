"""Helpers for testing meshrun and its backends against real processes and services.

The start of the kit a backend's own suite uses (docs/writing-a-backend.md): polling with a deadline instead
of fixed sleeps, running the ``meshrun`` command line, and the small distributed program that checks the env
contract end to end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, TypeVar

T = TypeVar("T")

# a gloo all-reduce across every rank of a torchrun launch: prints "rank R of W on node N sum S"
GLOO_ALLREDUCE = """\
import os
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank()) + 1.0])
dist.all_reduce(t)
print("rank %d of %d on node %s sum %g" % (dist.get_rank(), dist.get_world_size(), os.environ["NODE_RANK"], t.item()),
      flush=True)
dist.destroy_process_group()
"""


def load_script(name: str) -> Any:
    """A program of the checkout's ``scripts/`` folder (e.g. ``import_corpus.py``) as a module, for tests
    that run the same checks it does."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def wait_until(pred: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> T:
    """Poll ``pred`` until it returns something truthy (returned); fail with AssertionError after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def run_cli(*args: str, check: bool = True, timeout: float = 120, env: Mapping[str, str] | None = None,
            python: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m meshrun ARGS`` in a fresh process (this interpreter by default); with ``check``, a non-zero exit
    fails with its output. ``env`` is added to this process's environment."""
    p = subprocess.run([python or sys.executable, "-m", "meshrun", *args], capture_output=True, text=True,
                       timeout=timeout, env=None if env is None else {**os.environ, **env})
    if check and p.returncode != 0:
        raise AssertionError(f"meshrun {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def assert_no_gpu_overlap(records: list[dict]) -> None:
    """Records of GPU jobs, each ``{"gpus": "0,1", "start": t0, "end": t1, "job": id}`` (written by the jobs
    themselves): no GPU was held by two jobs at the same time."""
    by_gpu: dict[str, list[tuple[float, float, str]]] = {}
    for r in records:
        assert r["gpus"], f"a GPU job ran without GPUs: {r}"
        for g in r["gpus"].split(","):
            by_gpu.setdefault(g, []).append((r["start"], r["end"], r["job"]))
    for g, spans in by_gpu.items():
        spans.sort()
        for (_, e1, j1), (s2, _, j2) in zip(spans, spans[1:]):
            assert s2 >= e1, f"GPU {g} was held by {j1} and {j2} at the same time"
