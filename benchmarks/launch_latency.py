"""Launch latency on the local backend: submit -> result of a no-op function.

Side by side, interleaved round by round in one run (the machine is shared and noisy, so ratios matter):

  * meshrun:      noop.submit().result()                  (local backend, warm fork server)
  * python -c:    subprocess.run([python, "-c", "pass"])  (the floor of any fresh-process launcher)
  * submitit:     LocalExecutor.submit(noop).result()     (polls for the result once a second)

and `import meshrun` (median wall time of a fresh interpreter importing it, minus a bare interpreter).

Targets: meshrun median <= 0.1 s and >= 10x faster than submitit; import meshrun <= 150 ms.

    .venv/bin/python benchmarks/launch_latency.py [--rounds 25] [--out benchmarks/results/launch_latency.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def noop():
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "launch_latency.json"))
    ap.add_argument("--no-submitit", action="store_true", help="skip submitit (if it is not installed)")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="meshrun-bench-"))
    os.environ["MESHRUN_HOME"] = str(tmp / "home")
    os.environ["MESHRUN_LEASE_DIR"] = str(tmp / "leases")
    import meshrun

    job = meshrun.job(noop, backend="local")
    job.submit().result(timeout=60)  # warm-up: starts the fork server, imports, creates the store
    executor = None
    if not a.no_submitit:
        import submitit

        executor = submitit.LocalExecutor(folder=str(tmp / "submitit"))
        executor.update_parameters(timeout_min=5)
        executor.submit(noop).result()

    times: dict[str, list[float]] = {"meshrun": [], "python_c": [], "submitit": []}
    for _ in range(a.rounds):
        t = time.perf_counter()
        job.submit().result(timeout=60)
        times["meshrun"].append(time.perf_counter() - t)

        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times["python_c"].append(time.perf_counter() - t)

        if executor is not None:
            t = time.perf_counter()
            executor.submit(noop).result()
            times["submitit"].append(time.perf_counter() - t)

    imports, full, bare = [], [], []
    for _ in range(max(10, a.rounds // 2)):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import meshrun"], check=True)
        imports.append(time.perf_counter() - t)
        t = time.perf_counter()  # with the first use of the API, which loads pydantic and cloudpickle
        subprocess.run([sys.executable, "-c", "import meshrun; meshrun.job; meshrun.Job; import cloudpickle"],
                       check=True)
        full.append(time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append(time.perf_counter() - t)

    med = {k: statistics.median(v) for k, v in times.items() if v}
    import_ms = (statistics.median(imports) - statistics.median(bare)) * 1000
    result = {
        "benchmark": "launch_latency",
        "command": "python benchmarks/launch_latency.py --rounds %d" % a.rounds,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "rounds": a.rounds,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "p90_s": {k: round(sorted(v)[int(0.9 * (len(v) - 1))], 4) for k, v in times.items() if v},
        "import_meshrun_ms": round(import_ms, 1),
        "import_meshrun_and_first_use_ms": round((statistics.median(full) - statistics.median(bare)) * 1000, 1),
        "ratios": {
            "meshrun_vs_python_c": round(med["meshrun"] / med["python_c"], 3),
            **({"submitit_vs_meshrun": round(med["submitit"] / med["meshrun"], 1)} if "submitit" in med else {}),
        },
        "targets": {"meshrun_median_s": 0.1, "faster_than_submitit_x": 10, "import_ms": 150},
    }
    result["pass"] = (
        med["meshrun"] <= 0.1
        and ("submitit" not in med or med["submitit"] / med["meshrun"] >= 10)
        and import_ms <= 150
    )
    meshrun.get_backend("local").stop_server()  # the warm fork server would otherwise idle out by itself
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
