"""How fast ``meshrun dashboard`` answers on a store of 10,000 jobs, and whether its memory stays flat.

A job store of ``--jobs`` jobs is generated (folders with spec.json, plan.json with ranked and rejected offers,
output.log; index rows with histories, sweeps, several users, backends and states), ``meshrun dashboard`` is
started on it as its own process, and each page is fetched over HTTP ``--rounds`` times, the time measured
from sending the request to the last byte: the first page of the jobs list, a filtered page, a page deep in
the list, a job page, and the JSON the live updates poll. Then the live-update endpoints are polled
``--polls`` times and the server's resident memory is compared before and after.

Targets (issue "dashboard"): the first page <= 300 ms and a job page <= 200 ms on 10,000 jobs.

    .venv/bin/python benchmarks/dashboard_pages.py [--jobs 10000] [--rounds 30] [--out benchmarks/results/dashboard_pages.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
TOKEN = "bench-token-0123456789abcdef"
TARGETS_MS = {"first page": 300.0, "job page": 200.0}


def generate(home: Path, n: int) -> str:
    """A store of ``n`` jobs; returns the id of a job with a full page (plan, history, log)."""
    from meshrun._backend import JobState
    from meshrun._store import _COLUMNS, JobRecord, Store, _row_values, new_job_id

    store = Store(home)
    store.open()
    rnd = random.Random(1)
    states = [JobState.SUCCEEDED] * 6 + [JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT, JobState.LOST]
    backends = ["local", "ssh", "slurm", "kubernetes", "skypilot"]
    users = ["ada", "grace", "alan", "edsger"]
    now = time.time()
    plan = {"version": 1, "created_at": now, "objective": "cost", "inputs": {"runtime": 3600},
            "explanation": "slurm/gpu (1xH100): cheapest of 3 fitting offers", "max_pending": None, "launch": {},
            "ranked": [{"backend": b, "where": f"{b}/gpu", "gpus": 1, "gpu_type": "H100", "nodes": 1,
                        "total_price_per_hour": p, "expected_start": 0, "key": f"{b}/gpu", "spot": False}
                       for b, p in (("slurm", 0.0), ("ssh", 0.0), ("skypilot", 2.49))],
            "rejected": [{"backend": "skypilot", "where": f"aws ({k} regions)", "count": k,
                          "reason": f"over the max price ({k})"} for k in range(1, 40)]}
    spec = json.dumps({"command": ["python", "train.py", "--lr", "0.1"], "gpus": 1, "name": "train"})
    log = "".join(f"step {i} loss {1 / (i + 1):.4f}\n" for i in range(20000)).encode()
    rows = []
    sweep = None
    for i in range(n):
        jid = new_job_id()
        d = store.job_dir(jid)
        d.mkdir(mode=0o700)
        (d / "spec.json").write_text(spec)
        if i % 7 == 0:
            (d / "plan.json").write_text(json.dumps(plan))
        if i % 100 == 0:
            sweep = new_job_id()
        created = now - (n - i) * 30
        st = rnd.choice(states)
        hist = [{"time": created, "event": "placed", "offer": "slurm/gpu", "why": "cheapest"},
                {"time": created + 1, "event": "submitted", "backend": "slurm", "backend_id": str(i)},
                {"time": created + 5, "event": "running", "where": "node1"},
                {"time": created + 600, "event": st.value, "reason": None}]
        rows.append(_row_values(JobRecord(
            id=jid, name=f"train-{i % 500}", kind="command", summary="python train.py --lr 0.1",
            backend=rnd.choice(backends), backend_id=str(i), state=st, reason=None, exit_code=0, where="node1",
            created_at=created, submitted_at=created + 1, started_at=created + 5, ended_at=created + 600,
            array_id=sweep if i % 3 == 0 else None, array_index=i % 100 if i % 3 == 0 else None, attempt=1,
            history=hist, user=rnd.choice(users), pid=None)))
    c = store._conn()
    c.execute("BEGIN")
    c.executemany(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", rows)
    c.execute("COMMIT")
    full = rows[-7 - (n - 1) % 7][0] if n > 7 else rows[0][0]  # one with a plan.json
    (store.job_dir(full) / "output.log").write_bytes(log)
    (store.job_dir(full) / "plan.json").write_text(json.dumps(plan))
    return str(full)


def fetch(port: int, path: str) -> tuple[float, int, int]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    t0 = time.perf_counter()
    c.request("GET", path, headers={"Cookie": f"meshrun_dashboard_{port}={TOKEN}"})
    r = c.getresponse()
    body = r.read()
    dt = time.perf_counter() - t0
    c.close()
    if r.status != 200:
        raise SystemExit(f"GET {path}: {r.status} {body[:500]!r}")
    return dt * 1000, r.status, len(body)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--polls", type=int, default=3000, help="live-update requests for the memory check")
    ap.add_argument("--out", default=str(HERE / "results" / "dashboard_pages.json"))
    a = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="meshrun-dashboard-bench-"))
    t0 = time.perf_counter()
    job = generate(root / "home", a.jobs)
    gen_s = time.perf_counter() - t0
    (root / "config.toml").write_text("")
    env = dict(os.environ, MESHRUN_HOME=str(root / "home"), MESHRUN_CONFIG=str(root / "config.toml"),
               MESHRUN_LEASE_DIR=str(root / "leases"))
    proc = subprocess.Popen([sys.executable, "-m", "meshrun", "dashboard", "--port", "0", "--no-browser",
                             "--token", TOKEN], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        port = int(line.split("127.0.0.1:", 1)[1].split("/", 1)[0])
        pages = {
            "first page": "/",
            "first page, filtered (state, user, name)": "/?state=failed&user=ada&name=train-1",
            "page 150 of 200": "/?page=150",
            "job page": f"/job/{job}",
            "live update: jobs JSON": "/api/jobs?page=1",
            "live update: job JSON": f"/api/job/{job}",
            "live update: log tail": f"/api/job/{job}/log",
        }
        cold = {name: round(fetch(port, path)[0], 2) for name, path in pages.items()}  # the first of each
        samples: dict[str, list[float]] = {name: [] for name in pages}
        sizes: dict[str, int] = {}
        for _ in range(a.rounds):
            for name, path in random.sample(list(pages.items()), len(pages)):
                ms, _, size = fetch(port, path)
                samples[name].append(ms)
                sizes[name] = size
        rss_before = rss_kib(proc.pid)
        for i in range(a.polls):
            fetch(port, ("/api/jobs?page=1", f"/api/job/{job}", f"/api/job/{job}/log")[i % 3])
        rss_after = rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)

    results = {}
    for name, xs in samples.items():
        xs.sort()
        results[name] = {"median_ms": round(statistics.median(xs), 2), "p95_ms": round(xs[int(0.95 * (len(xs) - 1))], 2),
                         "max_ms": round(xs[-1], 2), "first_ms": cold[name], "bytes": sizes[name]}
    targets = {name: {"target_ms": lim, "median_ms": results[name]["median_ms"], "p95_ms": results[name]["p95_ms"],
                      "passed": results[name]["p95_ms"] <= lim} for name, lim in TARGETS_MS.items()}
    out = {
        "benchmark": "dashboard_pages",
        "command": " ".join(["python benchmarks/dashboard_pages.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "store": {"jobs": a.jobs, "generated_in_s": round(gen_s, 1)},
        "rounds": a.rounds,
        "pages": results,
        "targets": targets,
        "memory": {"live_update_requests": a.polls, "rss_kib_before": rss_before, "rss_kib_after": rss_after,
                   "growth_kib": rss_after - rss_before},
    }
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0 if all(t["passed"] for t in targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
