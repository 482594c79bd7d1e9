"""``meshrun.bench.run``: submit the benchmark as a meshrun job on any backend and return its result."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from . import _math
from ._options import BenchError, BenchOptions
from ._report import BenchResult


def _local_gpu_count() -> int:
    from .._registry import get_backend

    try:
        snap = get_backend("local").gpus()
    except Exception:
        return 0
    return len(snap.get("gpus") or [])


def build_spec(opts: BenchOptions, *, nodes: int = 1, gpus_per_node: int | None = None, gpu_type: str | None = None,
               name: str | None = None, time_limit: Any = None, cpus: Any = None, memory: Any = None,
               backend_options: Mapping[str, Any] | None = None, setup: Iterable[str] | None = None) -> Any:
    """The JobSpec that runs ``opts``: a function job, one process per node, that starts the ranks."""
    from .._spec import JobSpec
    from ._node import node_main

    fields: dict[str, Any] = {
        "function": node_main,
        "args": (opts.to_dict(),),
        "name": name or f"bench-{'-'.join(opts.collectives) if len(opts.collectives) < 3 else 'collectives'}",
        "nodes": nodes,
        "env": dict(opts.env),
        "labels": {"meshrun": "bench"},
    }
    if opts.device == "cuda":
        fields["gpus"] = gpus_per_node
        if gpu_type:
            fields["gpu_type"] = gpu_type
    if time_limit is not None:
        fields["time_limit"] = time_limit
    if cpus is not None:
        fields["cpus"] = cpus
    if memory is not None:
        fields["memory"] = memory
    if backend_options:
        fields["backend_options"] = {k: dict(v) for k, v in backend_options.items()}
    if setup:
        fields["setup"] = list(setup)
    return JobSpec(**fields)


def resolve_device(device: str, backend: str | None, gpus_per_node: int | None) -> tuple[str, int | None]:
    """"auto": GPUs when asked for or, on this machine, when it has some; else CPUs."""
    if device not in ("auto", "cuda", "gpu", "cpu"):
        raise BenchError(f"device must be auto, cuda or cpu, got {device!r}")
    if device == "gpu":
        device = "cuda"
    if device == "cpu":
        return "cpu", None
    if gpus_per_node is not None and gpus_per_node < (1 if device == "cuda" else 0):
        raise BenchError(f"gpus_per_node must be at least 1 for a GPU run, got {gpus_per_node}")
    if device == "auto":
        if gpus_per_node:
            return "cuda", gpus_per_node
        if gpus_per_node == 0:
            return "cpu", None
        if backend in (None, "local"):
            n = _local_gpu_count()
            return ("cuda", n) if n else ("cpu", None)
        return "cpu", None
    if gpus_per_node is None:
        if backend in (None, "local"):
            n = _local_gpu_count()
            if not n:
                raise BenchError("no GPUs on this machine (nvidia-smi found none); use --device cpu for gloo")
            return "cuda", n
        raise BenchError("say how many GPUs per node to use (gpus_per_node / --gpus-per-node)")
    return "cuda", gpus_per_node


def submit(
    collectives: str | Iterable[str] = ("all_reduce",),
    *,
    backend: str | None = None,
    nodes: int = 1,
    gpus_per_node: int | None = None,
    procs_per_node: int | None = None,
    device: str = "auto",
    gpu_type: str | None = None,
    name: str | None = None,
    time_limit: Any = None,
    cpus: Any = None,
    memory: Any = None,
    backend_options: Mapping[str, Any] | None = None,
    setup: Iterable[str] | None = None,
    plan: Mapping[str, Any] | None = None,
    **options: Any,
) -> tuple[Any, BenchOptions]:
    """Submit the benchmark job and return ``(job, options)`` at once (see :func:`run` for the arguments)."""
    from .._scheduler import submit as submit_job

    dev, gpn = resolve_device(device, backend, gpus_per_node)
    if "max_bytes" not in options:
        options["max_bytes"] = 128 * 1024**2 if dev == "cuda" else 1024**2
    try:
        names = _math.parse_collectives(collectives)
    except ValueError as e:
        raise BenchError(str(e)) from None
    opts = BenchOptions(collectives=names, device=dev, procs_per_node=procs_per_node if dev == "cpu" else None,
                        **options)
    if not isinstance(nodes, int) or nodes < 1:
        raise BenchError(f"nodes must be a whole number of at least 1, got {nodes!r}")
    spec = build_spec(opts, nodes=nodes, gpus_per_node=gpn, gpu_type=gpu_type, name=name, time_limit=time_limit,
                      cpus=cpus if cpus is not None else (opts.procs_per_node if dev == "cpu" and opts.procs_per_node
                                                          and backend not in (None, "local") else None),
                      memory=memory, backend_options=backend_options, setup=setup)
    job = submit_job(spec, backend=backend, **dict(plan or {}))
    return job, opts


def collect(job: Any, opts: BenchOptions | Mapping[str, Any], *, out_dir: str | Path | None = None,
            plot: bool = True, timeout: float | None = None) -> BenchResult:
    """Wait for a benchmark job and turn its outcome into a :class:`BenchResult` with its files written
    (into ``out_dir``, by default the job's folder ``bench/``)."""
    result = job.result(timeout=timeout)
    if not isinstance(result, dict) or "rows" not in result:
        raise BenchError(f"job {job.id} did not return a benchmark result (got {type(result).__name__})")
    options = opts.to_dict() if isinstance(opts, BenchOptions) else dict(opts)
    meta = result.setdefault("meta", {})
    meta["rank_list"] = result.get("ranks") or []
    meta["job"] = {"id": job.id, "backend": job.backend, "where": job.record.where}
    res = BenchResult.from_job_result(result, options, job_id=job.id)
    res.write(Path(out_dir) if out_dir is not None else Path(job.job_dir) / "bench", plot=plot)
    return res


def run(
    collectives: str | Iterable[str] = ("all_reduce",),
    *,
    min_bytes: int | str = 8,
    max_bytes: int | str | None = None,
    factor: int = 2,
    step_bytes: int | str | None = None,
    dtype: str = "float32",
    warmup: int = 5,
    iters: int = 20,
    modes: str | Iterable[str] = ("out-of-place", "in-place"),
    device: str = "auto",
    backend: str | None = None,
    nodes: int = 1,
    gpus_per_node: int | None = None,
    procs_per_node: int | None = None,
    gpu_type: str | None = None,
    graph: str = "auto",
    timer: str = "events",
    average: str = "avg",
    check: bool = True,
    pairwise: str | bool | None = None,
    pairwise_bytes: int | str | None = None,
    pairwise_threshold: float = 0.8,
    compare_nccl_tests: str | None = None,
    nccl_info: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
    time_limit: Any = None,
    name: str | None = None,
    out_dir: str | Path | None = None,
    plot: bool = True,
    progress: bool | Callable[[str], Any] = False,
    cpus: Any = None,
    memory: Any = None,
    backend_options: Mapping[str, Any] | None = None,
    setup: Iterable[str] | None = None,
    plan: Mapping[str, Any] | None = None,
) -> BenchResult:
    """Measure collectives with torch.distributed (NCCL on GPUs, gloo on CPUs) as a meshrun job.

    ``collectives``: "all", a comma list or names from all_reduce, all_gather, reduce_scatter, alltoall,
    broadcast, sendrecv. Sizes sweep ``min_bytes`` .. ``max_bytes`` by ``factor`` (or ``step_bytes``), as
    nccl-tests' -b/-e/-f/-i ("8G" is 8 GiB, as there). ``backend``/``nodes``/``gpus_per_node`` say where;
    ``device="auto"`` uses this machine's GPUs when it has some, else ``procs_per_node`` gloo ranks (2).
    ``pairwise="nodes"|"gpus"`` adds a sendrecv between every pair and flags the pairs below
    ``pairwise_threshold`` x the median. ``compare_nccl_tests`` is nccl-tests' build folder (or one binary)
    on the node, run with the same sweep. ``progress=True`` streams the job's output to stderr.
    Returns a :class:`BenchResult` whose files (JSON lines, table, PNG) are in ``out_dir`` (default: the
    job's folder, ``bench/``).
    """
    if pairwise is True:
        pairwise = "nodes" if nodes > 1 else "gpus"
    elif pairwise is False:
        pairwise = None
    options: dict[str, Any] = dict(
        min_bytes=min_bytes, factor=factor, step_bytes=step_bytes, dtype=dtype, warmup=warmup, iters=iters,
        modes=modes, graph=graph, timer=timer, average=average, check=check, pairwise=pairwise,
        pairwise_bytes=pairwise_bytes,
        pairwise_threshold=pairwise_threshold, compare_nccl_tests=compare_nccl_tests, nccl_info=nccl_info,
        env=dict(env or {}), timeout=timeout,
    )
    if max_bytes is not None:
        options["max_bytes"] = max_bytes
    job, opts = submit(collectives, backend=backend, nodes=nodes, gpus_per_node=gpus_per_node,
                       procs_per_node=procs_per_node, device=device, gpu_type=gpu_type, name=name,
                       time_limit=time_limit, cpus=cpus, memory=memory, backend_options=backend_options, setup=setup,
                       plan=plan, **options)
    if progress:
        write = progress if callable(progress) else _stderr
        _stream(job, write)
    return collect(job, opts, out_dir=out_dir, plot=plot)


def _stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def _stream(job: Any, write: Callable[[str], Any]) -> None:
    """Show the job's output while it runs (from when it starts); never fail the run over it."""
    from .._backend import JobState

    try:
        while job.status() in (JobState.PENDING, JobState.SUBMITTING):
            time.sleep(0.2)
        for chunk in job.logs(follow=True):
            write(chunk)
    except Exception as e:  # a backend without log following: just wait
        write(f"[bench] (cannot follow the job's output: {type(e).__name__}: {e})\n")
