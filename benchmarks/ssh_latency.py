"""SSH backend latency: submit -> running, side by side with a fresh OpenSSH round trip, in one run.

Interleaved round by round (the machine is shared and noisy, so the ratios are what count):

  * ssh_cli:    `ssh host true` with the OpenSSH client (a new connection each time: TCP, key exchange,
                authentication, a session, `true`)
  * warm:       meshrun.run(["sleep", "0.2"], backend="ssh") until job.status() says RUNNING, on the warm
                connection this process already holds (placement probe, workdir sync check, stage and start)
  * cold:       the same after dropping every connection, so it pays a new transport and the remote helper's
                start (the agent is already installed on the host: first contact is measured once, apart)
  * warm_exec:  the same as warm with persistent = false (one exec channel per request, the agent's own
                command line shape): shown for reference

Targets: warm <= 0.3 x ssh_cli and cold <= 1.5 x ssh_cli (medians).

Needs the test pool (root): `bash backends/ssh/scripts/sshd-pool.sh up` (started here if it is not running,
and stopped again at the end unless --keep-pool).

    .venv/bin/python benchmarks/ssh_latency.py [--rounds 20] [--host host1] [--keep-pool]
        [--out benchmarks/results/ssh_latency.json]
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

REPO = Path(__file__).resolve().parents[1]
POOL_DIR = os.environ.get("MRSSH_POOL_DIR", "/var/lib/meshrun-sshpool")
USER = "mrssh-alice"


POOL_SCRIPT = REPO / "backends" / "ssh" / "scripts" / "sshd-pool.sh"


def ensure_pool() -> tuple[dict, bool]:
    """The pool's description, and whether this run started it."""
    started = False
    if subprocess.run(["bash", str(POOL_SCRIPT), "status"], capture_output=True).returncode != 0:
        p = subprocess.run(["bash", str(POOL_SCRIPT), "up"], capture_output=True, text=True)
        sys.stderr.write(p.stdout + p.stderr)
        if p.returncode != 0:
            raise SystemExit("could not start the sshd pool (run as root)")
        started = True
    return json.loads(Path(POOL_DIR, "pool.json").read_text()), started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--host", default="host1")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ssh_latency.json"))
    ap.add_argument("--keep-pool", action="store_true", help="leave the pool running if this run started it")
    a = ap.parse_args()

    pool, started = ensure_pool()
    host = next(h for h in pool["hosts"] if h["name"] == a.host)
    user = pool["users"][USER]
    tmp = Path(tempfile.mkdtemp(prefix="meshrun-sshbench-"))
    os.environ["MESHRUN_HOME"] = str(tmp / "home")
    os.environ["MESHRUN_CONFIG"] = str(tmp / "none.toml")
    (tmp / "none.toml").write_text("")
    work = tmp / "project"
    work.mkdir()
    (work / "train.py").write_text("print('hello')\n")
    os.chdir(work)
    lease_dir = Path(pool["scratch"]) / f"bench-leases-{os.getpid()}"
    lease_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(lease_dir, 0o1777)

    import meshrun
    import meshrun_ssh

    table = {"hosts": [{"name": a.host, "host": host["address"], "port": host["port"], "user": USER,
                        "key": user["key"], "lease_dir": str(lease_dir), "env": {"MESHRUN_GPUS": "0-1"}}],
             "known_hosts": pool["known_hosts"], "ssh_config": "/dev/null",
             "remote_dir": "~/.meshrun-bench"}

    def configure(persistent: bool = True) -> None:
        meshrun.configure({"backends": {"ssh": dict(table, persistent=persistent)}})

    def submit_to_running() -> float:
        t = time.perf_counter()
        job = meshrun.run(["sleep", "0.2"], backend="ssh")
        while True:
            st = job.status()
            if st is meshrun.JobState.RUNNING or st.terminal:
                break
        dt = time.perf_counter() - t
        if st.terminal and st is not meshrun.JobState.SUCCEEDED:
            raise SystemExit(f"benchmark job ended {st}: {job.reason}")
        return dt

    # first contact: a host that has never seen this remote root (installs agent + helper)
    configure()
    conn = meshrun_ssh.connect(table["hosts"][0], config=table)
    conn.run(["rm", "-rf", ".meshrun-bench"])
    meshrun_ssh.close_all()
    configure()
    first_contact = submit_to_running()

    ssh_argv = ["ssh", "-F", user["ssh_config"], "-o", "BatchMode=yes", a.host, "true"]
    subprocess.run(ssh_argv, check=True)
    times: dict[str, list[float]] = {"ssh_cli": [], "warm": [], "cold": [], "warm_exec": []}
    for _ in range(3):  # warm-up
        submit_to_running()
    for _ in range(a.rounds):
        t = time.perf_counter()
        subprocess.run(ssh_argv, check=True)
        times["ssh_cli"].append(time.perf_counter() - t)

        times["warm"].append(submit_to_running())

        meshrun_ssh.close_all()
        configure()
        times["cold"].append(submit_to_running())

        configure(persistent=False)
        times["warm_exec"].append(submit_to_running())
        configure()
        submit_to_running()  # back to a warm helper for the next round

    med = {k: round(statistics.median(v), 4) for k, v in times.items()}
    p90 = {k: round(sorted(v)[int(0.9 * (len(v) - 1))], 4) for k, v in times.items()}
    ratios = {
        "warm_vs_ssh_cli": round(med["warm"] / med["ssh_cli"], 3),
        "cold_vs_ssh_cli": round(med["cold"] / med["ssh_cli"], 3),
        "warm_exec_vs_ssh_cli": round(med["warm_exec"] / med["ssh_cli"], 3),
    }
    targets = {"warm_vs_ssh_cli": 0.3, "cold_vs_ssh_cli": 1.5}
    result = {
        "benchmark": "ssh_latency",
        "command": "python benchmarks/ssh_latency.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_1min": round(os.getloadavg()[0], 2)},
        "setup": {"pool_mode": pool["mode"], "host": a.host, "address": f"{host['address']}:{host['port']}",
                  "openssh": subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip(),
                  "paramiko": __import__("paramiko").__version__, "job": "sleep 0.2 (CPU)"},
        "rounds": a.rounds,
        "median_s": med,
        "p90_s": p90,
        "first_contact_s": round(first_contact, 4),
        "ratios": ratios,
        "targets": targets,
        "pass": all(ratios[k] <= v for k, v in targets.items()),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    meshrun.configure()
    meshrun_ssh.close_all()
    import shutil

    shutil.rmtree(lease_dir, ignore_errors=True)
    if started and not a.keep_pool:
        subprocess.run(["bash", str(POOL_SCRIPT), "down"], capture_output=True)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
