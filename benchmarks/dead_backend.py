"""A submit with one unreachable backend installed: Slurm configured, its controller down (as after a reboot).

Every installed backend is left in (no placement restriction); the Slurm client tools are pointed
(SLURM_CONF) at a controller address where nothing listens, so `sinfo` takes ~9 s to give up. Side by side,
interleaved round by round in one run, each a fresh `meshrun run -- echo hi` process (the job runs here):

  * before:      `[placement] respond_within = 0`: no time limit of its own and no memory, which is how
                 placement behaved before (each submit waits for sinfo to fail)
  * after, cold: the defaults, the memory of unresponsive backends removed first (the submit that finds out:
                 ~1 s for Slurm, then skipped)
  * after, warm: the defaults, right after (the next submit: Slurm remembered, not asked)
  * healthy:     no SLURM_CONF (sinfo fails at once): what a submit costs on this machine anyway

and `meshrun backends` with the defaults (target <= 2 s), and `sinfo` alone (the wait that is avoided).

Targets: after (cold) <= healthy + ~1 s; after (warm) ~ healthy; `meshrun backends` <= 2 s.

    .venv/bin/python benchmarks/dead_backend.py [--rounds 3] [--out benchmarks/results/dead_backend.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    took = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return took, p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dead_backend.json"))
    a = ap.parse_args()
    if shutil.which("sinfo") is None:
        raise SystemExit("this benchmark needs Slurm's client tools (sinfo) installed")

    tmp = Path(tempfile.mkdtemp(prefix="meshrun-bench-dead-"))
    home = tmp / "home"
    conf = tmp / "slurm.conf"
    conf.write_text(f"ClusterName=down\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort={free_port()}\n"
                    "AuthType=auth/munge\nNodeName=n1 CPUs=1 State=UNKNOWN\n"
                    "PartitionName=debug Nodes=n1 Default=YES\n")
    before_cfg, after_cfg = tmp / "before.toml", tmp / "after.toml"
    before_cfg.write_text("[placement]\nrespond_within = 0\n")
    after_cfg.write_text("")
    base = {**os.environ, "MESHRUN_HOME": str(home), "MESHRUN_LEASE_DIR": str(tmp / "leases")}
    base.pop("MESHRUN_BACKEND", None)
    dead = {**base, "SLURM_CONF": str(conf)}
    submit = [sys.executable, "-m", "meshrun", "run", "--", "echo", "hi"]
    memory = home / f"unresponsive-{os.getuid()}.json"

    timed(submit, {**base, "MESHRUN_CONFIG": str(after_cfg)})  # warm-up: the store, the fork server
    times: dict[str, list[float]] = {"before": [], "after_cold": [], "after_warm": [], "healthy": [], "backends": []}
    lines: dict[str, str] = {}
    for _ in range(a.rounds):
        took, p = timed(submit, {**dead, "MESHRUN_CONFIG": str(before_cfg)})
        times["before"].append(took)
        lines["before"] = p.stderr.strip()
        memory.unlink(missing_ok=True)
        took, p = timed(submit, {**dead, "MESHRUN_CONFIG": str(after_cfg)})
        times["after_cold"].append(took)
        lines["after_cold"] = p.stderr.strip()
        took, p = timed(submit, {**dead, "MESHRUN_CONFIG": str(after_cfg)})
        times["after_warm"].append(took)
        lines["after_warm"] = p.stderr.strip()
        took, p = timed([sys.executable, "-m", "meshrun", "backends"], {**dead, "MESHRUN_CONFIG": str(after_cfg)})
        times["backends"].append(took)
        lines["backends"] = next((ln for ln in p.stdout.splitlines() if ln.startswith("slurm")), "")
        took, _ = timed(submit, {**base, "MESHRUN_CONFIG": str(after_cfg)})
        times["healthy"].append(took)
    t = time.perf_counter()
    subprocess.run(["sinfo"], capture_output=True, env=dead, timeout=120)
    sinfo_alone = time.perf_counter() - t

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "dead_backend",
        "command": f"python benchmarks/dead_backend.py --rounds {a.rounds}",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "scenario": "every installed backend; Slurm's controller address has nothing listening (SLURM_CONF)",
        "rounds": a.rounds,
        "samples_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "sinfo_alone_s": round(sinfo_alone, 3),
        "ratios": {
            "before_vs_after_cold": round(med["before"] / med["after_cold"], 2),
            "before_vs_after_warm": round(med["before"] / med["after_warm"], 2),
            "after_cold_vs_healthy": round(med["after_cold"] / med["healthy"], 2),
            "after_warm_vs_healthy": round(med["after_warm"] / med["healthy"], 2),
        },
        "stderr": lines,
        "targets": {"after_cold_minus_healthy_s": 1.5, "after_warm_vs_healthy": 1.3, "backends_s": 2.0},
    }
    result["pass"] = (med["after_cold"] - med["healthy"] <= 1.5 and med["after_warm"] / med["healthy"] <= 1.3
                      and med["backends"] <= 2.0)
    for sock in home.glob("agent-*.sock"):  # the warm fork server stops when its socket goes
        sock.unlink()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
