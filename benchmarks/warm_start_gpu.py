"""Submit -> first CUDA operation: a fresh ``python -c "import torch; torch.ones(1, device='cuda')"`` beside
meshrun function jobs through a fork server with warm imports (torch imported ahead by the server) and
without them, and a meshrun command job running the same one-liner. Side by side in one run: each round runs
every variant once, in turn; medians and ratios to the fresh process.

Target (issue "First contact"): a GPU function job's first CUDA operation within 0.6 s of submit when the
server is warm. Needs an NVIDIA GPU and torch with CUDA.

    python benchmarks/warm_start_gpu.py --rounds 8 --out benchmarks/results/warm_start_h100x1
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

ONE_LINER = ("import time, torch; torch.ones(1, device='cuda'); torch.cuda.synchronize(); "
             "print('FIRST_CUDA', repr(time.time()))")

# a driver: its own MESHRUN_HOME (so its own fork server), submits one job per line read on stdin and prints
# the seconds from submit to the job's first CUDA operation
DRIVER = r'''
import json, sys, time
import meshrun

mode = sys.argv[1]
meshrun.configure({"backends": {"local": {"warm_imports": mode == "function_warm"}}})

@meshrun.job(gpus=1)
def first_cuda():
    import time, torch
    torch.ones(1, device="cuda")
    torch.cuda.synchronize()
    return time.time()

@meshrun.job()
def torch_loaded():
    import sys
    return "torch" in sys.modules

if mode == "function_warm":
    first_cuda.submit().result(timeout=600)  # teaches the server torch
    end = time.time() + 120
    while not torch_loaded.submit().result(timeout=600):
        if time.time() > end:
            raise SystemExit("the fork server never got torch warm")
        time.sleep(0.5)
elif mode == "function_cold":
    first_cuda.submit().result(timeout=600)  # the same first job, so only warm imports differ
print("READY", flush=True)
for line in sys.stdin:
    t0 = time.time()
    if mode == "command":
        job = meshrun.run([sys.executable, "-c", %r], gpus=1)
        job.wait(timeout=600)
        out = job.logs()
        t1 = float(out.split("FIRST_CUDA")[1].split()[0])
    else:
        t1 = first_cuda.submit().result(timeout=600)
    print(json.dumps({"seconds": t1 - t0}), flush=True)
''' % ONE_LINER


def fresh() -> float:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", ONE_LINER], capture_output=True, text=True, check=True).stdout
    return float(out.split("FIRST_CUDA")[1].split()[0]) - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/warm_start_gpu")
    a = ap.parse_args()
    drivers = {}
    for mode in ("function_warm", "function_cold", "command"):
        home = tempfile.mkdtemp(prefix=f"meshrun-warm-{mode}-")
        env = {**os.environ, "MESHRUN_HOME": home, "MESHRUN_CONFIG": os.path.join(home, "config.toml")}
        Path(env["MESHRUN_CONFIG"]).write_text("")
        p = subprocess.Popen([sys.executable, "-c", DRIVER, mode], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        line = p.stdout.readline()
        if "READY" not in line:
            raise SystemExit(f"driver {mode} did not start: {line!r}")
        drivers[mode] = p
    samples: dict[str, list[float]] = {"fresh_python": [], **{m: [] for m in drivers}}
    for _ in range(a.rounds):
        samples["fresh_python"].append(fresh())
        for mode, p in drivers.items():
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write("go\n")
            p.stdin.flush()
            samples[mode].append(json.loads(p.stdout.readline())["seconds"])
    for p in drivers.values():
        assert p.stdin is not None
        p.stdin.close()
        p.wait(timeout=60)
    med = {k: statistics.median(v) for k, v in samples.items()}
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True).stdout.strip().splitlines()
    except OSError:
        gpu = []
    out = {
        "benchmark": "warm_start_gpu",
        "command": f"python benchmarks/warm_start_gpu.py --rounds {a.rounds}",
        "machine": {"gpus": gpu, "cpus": os.cpu_count(), "python": platform.python_version()},
        "median_seconds": {k: round(v, 3) for k, v in med.items()},
        "ratio_to_fresh_python": {k: round(v / med["fresh_python"], 3) for k, v in med.items()},
        "target": {"function_warm_seconds": 0.6, "met": med["function_warm"] <= 0.6},
        "samples": {k: [round(x, 3) for x in v] for k, v in samples.items()},
    }
    text = json.dumps(out, indent=2)
    print(text)
    Path(a.out + ".json").parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
