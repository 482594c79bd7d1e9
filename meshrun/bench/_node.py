"""The benchmark job's entry point on each node: start one worker per GPU (or per CPU rank), torchrun-style.

Every backend starts one process per node with the distributed env contract (MASTER_ADDR, MASTER_PORT,
NNODES, NODE_RANK, GPUS_PER_NODE, WORLD_SIZE). :func:`node_main` is that process: it records what the node
is (host, GPUs, ``nvidia-smi topo -m``), starts the workers with RANK = NODE_RANK x procs_per_node + local
rank, waits for them (stopping them all as soon as one fails), and on node 0 returns the result that global
rank 0 wrote, with NCCL's algorithm choices and, when asked, the nccl-tests comparison added.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from . import _ncclt
from ._options import BenchError, BenchOptions


def _cmd(argv: list[str], timeout: float = 30.0) -> tuple[str | None, str | None]:
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)
    if p.returncode != 0:
        return None, (p.stderr or p.stdout).decode(errors="replace").strip() or f"exit {p.returncode}"
    return p.stdout.decode(errors="replace"), None


def node_info(cuda: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"host": socket.gethostname()}
    if cuda:
        topo, err = _cmd(["nvidia-smi", "topo", "-m"])
        info["topology"] = topo if topo is not None else f"(nvidia-smi topo -m failed: {err})"
        q, err = _cmd(["nvidia-smi", "--query-gpu=index,name,uuid,pci.bus_id,driver_version,memory.total",
                       "--format=csv,noheader"])
        if q is not None:
            gpus = []
            for line in q.strip().splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) >= 6:
                    gpus.append({"index": parts[0], "name": parts[1], "uuid": parts[2], "pci_bus_id": parts[3],
                                 "driver_version": parts[4], "memory": parts[5]})
            info["gpus"] = gpus
            if gpus:
                info["driver_version"] = gpus[0]["driver_version"]
    return info


def _contract() -> tuple[int, int, str, int, int]:
    from .._launch import check_dist_env

    problems = check_dist_env(os.environ)
    if problems:
        raise BenchError("the job's environment does not honour meshrun's distributed contract: "
                         + "; ".join(problems))
    e = os.environ
    return int(e["NNODES"]), int(e["NODE_RANK"]), e["MASTER_ADDR"], int(e["MASTER_PORT"]), int(e["GPUS_PER_NODE"])


def _meshrun_path() -> str:
    import meshrun

    return os.path.dirname(os.path.dirname(os.path.abspath(meshrun.__file__)))


def node_main(options: dict[str, Any]) -> dict[str, Any]:
    opts = BenchOptions.from_dict(options)
    nnodes, node_rank, addr, port, gpn = _contract()
    cuda = opts.device == "cuda"
    if cuda:
        procs = gpn
        if procs < 1:
            raise BenchError("the job was given no GPUs (GPUS_PER_NODE=0): ask for GPUs (--gpus-per-node N) or "
                             "measure gloo on CPUs (--device cpu)")
    else:
        procs = opts.procs_per_node or 2
    world = nnodes * procs
    run_dir = tempfile.mkdtemp(prefix="meshrun-bench-")
    try:
        with open(os.path.join(run_dir, "options.json"), "w") as f:
            json.dump(opts.to_dict(), f)
        info = node_info(cuda)
        with open(os.path.join(run_dir, "node.json"), "w") as f:
            json.dump(info, f)
        print(f"[bench] node {node_rank}/{nnodes} on {info['host']}: starting {procs} "
              f"{'GPU' if cuda else 'CPU'} rank(s) of {world}", flush=True)
        workers = _start(opts, run_dir, procs, world, nnodes, node_rank, addr, port, cuda)
        _wait(workers, run_dir)
        if node_rank != 0:
            return {"node_rank": node_rank, "host": info["host"]}
        path = os.path.join(run_dir, "result.json")
        if not os.path.exists(path):
            raise BenchError("rank 0 finished without writing its result")
        with open(path) as f:
            result = json.load(f)
        meta = result.setdefault("meta", {})
        meta.setdefault("node_info", {}).setdefault(str(node_rank), info)
        if cuda:
            log = ""
            try:
                with open(os.path.join(run_dir, "nccl.rank0.log"), errors="replace") as f:
                    log = f.read()
            except OSError:
                pass
            if log:
                from ._worker import attach_nccl_choices

                attach_nccl_choices(result, log, opts.elt_size)
            meta["nccl_debug_log"] = bool(log)
        if opts.compare_nccl_tests:
            result["nccl_tests"] = compare_nccl_tests(opts, nnodes, gpn if cuda else 0)
        return result
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _start(opts: BenchOptions, run_dir: str, procs: int, world: int, nnodes: int, node_rank: int, addr: str,
           port: int, cuda: bool) -> list[subprocess.Popen]:
    base = dict(os.environ)
    base.update(opts.env)
    path = _meshrun_path()
    base["PYTHONPATH"] = path + (os.pathsep + base["PYTHONPATH"] if base.get("PYTHONPATH") else "")
    base["PYTHONUNBUFFERED"] = "1"
    collect_nccl = cuda and opts.nccl_info and "NCCL_DEBUG" not in base
    workers = []
    for local in range(procs):
        rank = node_rank * procs + local
        env = dict(base)
        env.update({
            "RANK": str(rank), "LOCAL_RANK": str(local), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(procs),
            "NODE_RANK": str(node_rank), "NNODES": str(nnodes), "MASTER_ADDR": addr, "MASTER_PORT": str(port),
        })
        if not cuda:
            env.setdefault("OMP_NUM_THREADS", "1")
        if collect_nccl:
            env["NCCL_DEBUG"] = "INFO"
            env["NCCL_DEBUG_SUBSYS"] = "INIT,TUNING"
            env["NCCL_DEBUG_FILE"] = os.path.join(run_dir, f"nccl.rank{rank}.log")
        workers.append(subprocess.Popen([sys.executable, "-m", "meshrun.bench._worker", run_dir], env=env,
                                        stdin=subprocess.DEVNULL))
    return workers


def _wait(workers: list[subprocess.Popen], run_dir: str) -> None:
    failed: tuple[int, int] | None = None
    while True:
        alive = False
        for i, p in enumerate(workers):
            rc = p.poll()
            if rc is None:
                alive = True
            elif rc != 0 and failed is None:
                failed = (i, rc)
        if failed is not None or not alive:
            break
        time.sleep(0.05)
    if failed is None:
        return
    # one rank failed: give the others a moment to write their own reason, then stop them
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(p.poll() is None for p in workers):
        time.sleep(0.05)
    for p in workers:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(p.poll() is None for p in workers):
        time.sleep(0.05)
    for p in workers:
        if p.poll() is None:
            p.kill()
            p.wait()
    raise BenchError(_failure_message(run_dir, failed))


def _failure_message(run_dir: str, failed: tuple[int, int]) -> str:
    errors = []
    for name in os.listdir(run_dir):
        if name.startswith("error.rank") and name.endswith(".json"):
            try:
                with open(os.path.join(run_dir, name)) as f:
                    errors.append(json.load(f))
            except (OSError, ValueError):
                pass
    if errors:
        # an agreed stop (every rank says the same) or a bench error says it best; else the earliest crash
        agreed = [e for e in errors if e.get("type") in ("Abort", "BenchError")]
        pick = min(agreed or errors, key=lambda e: (e.get("time") or 0))
        if pick.get("type") in ("Abort", "BenchError"):
            return pick.get("message") or "a rank stopped the benchmark"
        tb = (pick.get("traceback") or "").strip().splitlines()
        tail = ("\n" + "\n".join(tb[-6:])) if tb else ""
        return f"rank {pick.get('rank')} failed: {pick.get('type')}: {pick.get('message')}{tail}"
    i, rc = failed
    return f"local rank {i} exited with code {rc} (see the job's output for its traceback)"


def compare_nccl_tests(opts: BenchOptions, nnodes: int, gpus: int) -> dict[str, Any]:
    """Run nccl-tests on this node with the same sweep; {"runs": [...]} or {"error": why not}."""
    path = os.path.expanduser(opts.compare_nccl_tests or "")
    if opts.device != "cuda":
        return {"error": "nccl-tests measures NCCL on GPUs; this run used gloo on CPUs"}
    if nnodes != 1:
        return {"error": "nccl-tests runs across nodes only under MPI; the comparison is made on single-node runs"}
    if not os.path.exists(path):
        return {"error": f"no nccl-tests at {path} on {socket.gethostname()}"}
    runs: list[dict[str, Any]] = []
    for coll in opts.collectives:
        binary = _ncclt.find_binary(path, coll)
        if binary is None:
            if os.path.isdir(path):
                runs.append({"collective": coll, "error": f"no {coll}_perf in {path}"})
            continue
        argv = _ncclt.argv(binary, coll, min_bytes=opts.min_bytes, max_bytes=opts.max_bytes, factor=opts.factor,
                           step_bytes=opts.step_bytes, gpus=gpus, warmup=opts.warmup, iters=opts.iters,
                           dtype=opts.dtype, check=opts.check, average=opts.average)
        env = dict(os.environ)
        env.update(opts.env)
        print(f"[bench] nccl-tests: {' '.join(argv)}", flush=True)
        t0 = time.time()
        try:
            p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                               timeout=max(opts.timeout * 3, 600))
            out, rc = p.stdout.decode(errors="replace"), p.returncode
        except (OSError, subprocess.TimeoutExpired) as e:
            runs.append({"collective": coll, "command": argv, "error": f"{type(e).__name__}: {e}"})
            continue
        parsed = _ncclt.parse(out, coll)
        run = {"collective": coll, "command": argv, "returncode": rc, "output": out, "seconds": time.time() - t0}
        run.update(parsed)
        if rc != 0:
            run["error"] = f"exited with code {rc}"
        runs.append(run)
    if not runs:
        return {"error": f"{path} measures none of: {', '.join(opts.collectives)}"}
    return {"path": path, "runs": runs}
