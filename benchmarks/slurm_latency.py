"""Slurm latency, side by side in one run: meshrun vs submitit vs ``sbatch --wait`` vs Slurm's own floor.

    python benchmarks/slurm_latency.py [--rounds 12] [--map-rounds 3] [--queued 1000] [--out FILE]

Against the cluster of ``backends/slurm/scripts/slurm-cluster.sh`` (started with ``up`` if it is not up):

* one no-op job, submit -> result, in rounds, the methods in rotating order each round:
  - floor:  ``sbatch --wrap true``, then ``scontrol show job`` every 20 ms until COMPLETED;
  - python floor: the same with ``python -c 'import cloudpickle'`` (this interpreter) as the job: what any
    Python-based runner pays at the least;
  - sbatch --wait: ``sbatch --wait --wrap true`` (it sleeps 2 s before its first check);
  - submitit: ``executor.submit(noop).result()``;
  - meshrun: ``noop.submit().result()`` on the slurm backend;
  - meshrun command: the floor's own job, ``meshrun.run(["true"]).wait()``: what meshrun adds around it;
* 20 jobs: meshrun ``.map`` (one job array) vs submitit ``map_array`` vs a raw ``sbatch --array=0-19``
  polled with squeue every 20 ms (the array floor);
* status of many queued jobs: ``--queued`` jobs submitted held (one array through ``.map``), then
  ``status()`` of all of them with the caches cleared, counting scheduler calls per poll.

The JSON (``benchmarks/results/slurm_latency.json`` by default) holds every sample, medians, means and the
ratios the targets are stated in. Ratios are measured within this one run, so a busy machine slows every
method alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "backends" / "slurm" / "scripts" / "slurm-cluster.sh"


def noop(x=None):
    return x


def sh(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def cluster_facts() -> dict:
    facts = {}
    p = sh(["bash", str(CLUSTER), "env"])
    for line in p.stdout.splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            facts[k] = v.replace("\\ ", " ")
    return facts


def _sbatch_and_poll(work: str, name: str, wrap: str) -> float:
    """Submit ``wrap`` as a batch job, then poll ``scontrol show job`` every 20 ms until COMPLETED."""
    t0 = time.perf_counter()
    p = sh(["sbatch", "--parsable", f"--chdir={work}", "--output=/dev/null", f"--job-name={name}", "--wrap", wrap])
    jid = p.stdout.strip().split(";")[0]
    while True:
        out = sh(["scontrol", "show", "job", jid]).stdout
        m = re.search(r"JobState=(\S+)", out)
        if m and m.group(1) == "COMPLETED":
            return time.perf_counter() - t0
        if m and m.group(1) in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            raise RuntimeError(f"{name} job {jid} ended {m.group(1)}")
        time.sleep(0.02)


def floor_once(work: str) -> float:
    return _sbatch_and_poll(work, "bench-floor", "true")


def sbatch_wait_once(work: str) -> float:
    t0 = time.perf_counter()
    p = sh(["sbatch", "--wait", f"--chdir={work}", "--output=/dev/null", "--job-name=bench-wait", "--wrap", "true"])
    if p.returncode != 0:
        raise RuntimeError(p.stderr)
    return time.perf_counter() - t0


def make_submitit(folder: str, partition: str):
    import submitit

    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(slurm_partition=partition, timeout_min=10, cpus_per_task=1, nodes=1, tasks_per_node=1,
                         name="bench-submitit")
    return ex


def submitit_once(ex) -> float:
    t0 = time.perf_counter()
    job = ex.submit(noop, 1)
    assert job.result() == 1
    return time.perf_counter() - t0


BREAKDOWN: list[dict] = []


def meshrun_once(fn) -> float:
    t0w, t0 = time.time(), time.perf_counter()
    job = fn.submit(1)
    t1 = time.perf_counter()
    assert job.result(timeout=120) == 1
    total = time.perf_counter() - t0
    try:
        ex = json.loads((job.job_dir / "exit.json").read_text())
        BREAKDOWN.append({
            "submit_returned_s": round(t1 - t0, 4),
            "function_started_s": round(ex["started_at"] - t0w, 4),
            "exit_record_written_s": round(ex["ended_at"] - t0w, 4),
            "result_in_hand_s": round(total, 4),
        })
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return total


def meshrun_command_once() -> float:
    """The floor's own job (``true``) as a meshrun command job: what meshrun adds around the same job."""
    import meshrun

    t0 = time.perf_counter()
    job = meshrun.run(["true"], backend="slurm", name="bench-meshrun-command")
    assert job.wait(timeout=120) is meshrun.JobState.SUCCEEDED
    return time.perf_counter() - t0


def python_floor_once(work: str) -> float:
    """The floor for any Python-based runner: a batch job that starts this interpreter and imports
    cloudpickle (what a function job needs at the least), polled like the floor."""
    return _sbatch_and_poll(work, "bench-pyfloor", f"{sys.executable} -c 'import cloudpickle'")


def array_floor_once(work: str, n: int) -> float:
    t0 = time.perf_counter()
    p = sh(["sbatch", "--parsable", f"--array=0-{n - 1}", f"--chdir={work}", "--output=/dev/null",
            "--job-name=bench-array-floor", "--wrap", "true"])
    jid = p.stdout.strip().split(";")[0]
    while True:
        out = sh(["squeue", "--noheader", "--array", "--states=all", f"--jobs={jid}", "--format=%T"]).stdout.split()
        if len(out) == n and all(s == "COMPLETED" for s in out):
            return time.perf_counter() - t0
        time.sleep(0.02)


def meshrun_map_once(fn, n: int) -> float:
    import meshrun

    t0 = time.perf_counter()
    jobs = fn.map(range(n))
    res = meshrun.gather(jobs, timeout=300)
    assert res == list(range(n)), res
    return time.perf_counter() - t0


def submitit_map_once(ex, n: int) -> float:
    t0 = time.perf_counter()
    jobs = ex.map_array(noop, list(range(n)))
    res = [j.result() for j in jobs]
    assert res == list(range(n))
    return time.perf_counter() - t0


def summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {
        "n": len(xs),
        "median_s": round(statistics.median(xs), 4),
        "mean_s": round(statistics.fmean(xs), 4),
        "min_s": round(xs[0], 4),
        "max_s": round(xs[-1], 4),
        "p90_s": round(xs[min(len(xs) - 1, int(0.9 * len(xs)))], 4),
        "samples_s": [round(x, 4) for x in xs],
    }


def queued_status(fn, backend, n: int, polls: int = 5) -> dict:
    """Submit ``n`` held jobs (one array), then poll their status with every cache cleared."""
    import meshrun

    held = fn.options(backend_options={"slurm": {"sbatch": ["--hold"]}})
    t0 = time.perf_counter()
    jobs = held.map(range(n))
    submit_s = time.perf_counter() - t0
    ids = [j.backend_id for j in jobs]
    per_poll = []
    times = []
    try:
        for _ in range(polls):
            backend._squeue_at = -1e9  # as if query_interval had passed
            backend._sacct_at.clear()
            before = sum(backend.calls[k] for k in ("squeue", "sacct", "scontrol", "sinfo"))
            t = time.perf_counter()
            st = backend.status(ids)
            times.append(time.perf_counter() - t)
            per_poll.append(sum(backend.calls[k] for k in ("squeue", "sacct", "scontrol", "sinfo")) - before)
            states = {s.state.value for s in st.values()}
            assert states == {"pending"}, states
        # the core's wait loop: one refresh of all jobs is one status() call for the backend
        backend._squeue_at = -1e9
        before = sum(backend.calls[k] for k in ("squeue", "sacct", "scontrol", "sinfo"))
        try:
            meshrun.wait(jobs, timeout=0.001)
        except TimeoutError:
            pass
        wait_calls = sum(backend.calls[k] for k in ("squeue", "sacct", "scontrol", "sinfo")) - before
        reason = jobs[0].refresh().reason
    finally:
        sh(["scancel", ids[0].split("_")[0]])
    return {
        "jobs": n,
        "submit_s": round(submit_s, 3),
        "scheduler_calls_per_poll": per_poll,
        "max_scheduler_calls_per_poll": max(per_poll + [wait_calls]),
        "scheduler_calls_in_one_wait_round": wait_calls,
        "status_call_s": summary(times),
        "example_reason": reason,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--map-rounds", type=int, default=3)
    ap.add_argument("--map-size", type=int, default=20)
    ap.add_argument("--queued", type=int, default=1000)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "slurm_latency.json"))
    args = ap.parse_args()

    if shutil.which("sbatch") is None or sh(["bash", str(CLUSTER), "status"]).returncode != 0:
        print("starting the test cluster ...", file=sys.stderr)
        subprocess.run(["bash", str(CLUSTER), "up"], check=True)
    facts = cluster_facts()
    partition = facts.get("SLURM_PARTITION", "debug")

    work = tempfile.mkdtemp(prefix="slurm-bench-", dir=os.environ.get("SLURM_BENCH_DIR", "/tmp"))
    os.chmod(work, 0o755)
    os.environ["MESHRUN_HOME"] = os.path.join(work, "meshrun-home")
    os.environ["MESHRUN_CONFIG"] = os.path.join(work, "config.toml")
    Path(os.environ["MESHRUN_CONFIG"]).write_text(f'[backends.slurm]\npartition = "{partition}"\n')
    os.chdir(work)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    import meshrun

    fn = meshrun.job(backend="slurm", name="bench-meshrun")(noop)
    backend = meshrun.get_backend("slurm")
    ex = make_submitit(os.path.join(work, "submitit"), partition)

    methods = {
        "floor": lambda: floor_once(work),
        "python_floor": lambda: python_floor_once(work),
        "sbatch_wait": lambda: sbatch_wait_once(work),
        "submitit": lambda: submitit_once(ex),
        "meshrun": lambda: meshrun_once(fn),
        "meshrun_command": meshrun_command_once,
    }
    print("warming up (imports, slurmctld's first scheduling pass) ...", file=sys.stderr)
    for f in methods.values():
        f()
    BREAKDOWN.clear()
    samples: dict[str, list[float]] = {k: [] for k in methods}
    order = list(methods)
    for r in range(args.rounds):
        rot = order[r % len(order):] + order[: r % len(order)]
        for name in rot:
            samples[name].append(methods[name]())
            time.sleep(0.05)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {samples[k][-1]:.3f}s" for k in order),
              file=sys.stderr)

    n = args.map_size
    maps: dict[str, list[float]] = {"array_floor": [], "submitit_map_array": [], "meshrun_map": []}
    mapf = {
        "array_floor": lambda: array_floor_once(work, n),
        "submitit_map_array": lambda: submitit_map_once(ex, n),
        "meshrun_map": lambda: meshrun_map_once(fn, n),
    }
    morder = list(mapf)
    for r in range(args.map_rounds):
        rot = morder[r % len(morder):] + morder[: r % len(morder)]
        for name in rot:
            maps[name].append(mapf[name]())
            time.sleep(0.2)
        print(f"map round {r + 1}/{args.map_rounds}: " + ", ".join(f"{k} {maps[k][-1]:.2f}s" for k in morder),
              file=sys.stderr)

    queued = queued_status(fn, backend, args.queued) if args.queued else None

    single = {k: summary(v) for k, v in samples.items()}
    mapped = {k: summary(v) for k, v in maps.items()}
    fl, mr, si = single["floor"], single["meshrun"], single["submitit"]
    result = {
        "benchmark": "slurm_latency",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_at_end": os.getloadavg()},
        "cluster": {k: facts.get(k) for k in ("SLURM_VERSION", "SLURM_NODES", "SLURM_CPUS", "SLURM_GPUS",
                                              "SLURM_ACCT", "SLURM_PARTITION")},
        "single_noop_submit_to_result": single,
        "meshrun_breakdown": {
            "note": "seconds after meshrun's submit() was called, median over the rounds",
            **{k: round(statistics.median(b[k] for b in BREAKDOWN), 4) for k in
               (BREAKDOWN[0] if BREAKDOWN else {})},
            "samples": BREAKDOWN,
        },
        "map": {"size": n, **mapped},
        "status_of_queued_jobs": queued,
        "ratios": {
            "meshrun_vs_floor_median": round(mr["median_s"] / fl["median_s"], 3),
            "meshrun_vs_floor_mean": round(mr["mean_s"] / fl["mean_s"], 3),
            "meshrun_vs_python_floor_median": round(mr["median_s"] / single["python_floor"]["median_s"], 3),
            "python_floor_vs_floor_median": round(single["python_floor"]["median_s"] / fl["median_s"], 3),
            "meshrun_command_vs_floor_median": round(single["meshrun_command"]["median_s"] / fl["median_s"], 3),
            "meshrun_vs_submitit_median": round(mr["median_s"] / si["median_s"], 3),
            "meshrun_vs_sbatch_wait_median": round(mr["median_s"] / single["sbatch_wait"]["median_s"], 3),
            "meshrun_map_vs_submitit_map_array_median": round(
                mapped["meshrun_map"]["median_s"] / mapped["submitit_map_array"]["median_s"], 3),
            "meshrun_map_vs_array_floor_median": round(
                mapped["meshrun_map"]["median_s"] / mapped["array_floor"]["median_s"], 3),
        },
        "targets": {
            "meshrun_within_1.05x_floor": mr["median_s"] <= 1.05 * fl["median_s"],
            "meshrun_faster_than_submitit": mr["median_s"] < si["median_s"],
            "map_no_slower_than_submitit": mapped["meshrun_map"]["median_s"] <= mapped["submitit_map_array"]["median_s"],
            "queued_status_at_most_2_calls_per_poll": bool(queued) and queued["max_scheduler_calls_per_poll"] <= 2,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratios": result["ratios"], "targets": result["targets"],
                      "medians": {k: v["median_s"] for k, v in {**single, **mapped}.items()}}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
