"""Screenshots of each ``meshrun dashboard`` page for the docs (docs/img/dashboard-*.png).

Runs real local jobs in a job store of its own (two declared GPUs: one job holds both, a second waits in the
queue), starts ``meshrun dashboard`` on it with the recorded bench results, and photographs every page with
Playwright driving Debian's chromium (scripts/install.sh installs both).

    .venv/bin/python scripts/dashboard_screenshots.py [--out docs/img] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKEN = "screenshot-token-0123456789"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "img"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="meshrun-dashboard-shots-"))
    (root / "config.toml").write_text("")
    os.environ.update(MESHRUN_HOME=str(root / "home"), MESHRUN_LEASE_DIR=str(root / "leases"),
                      MESHRUN_CONFIG=str(root / "config.toml"), MESHRUN_GPUS="0,1")
    import meshrun

    gate = root / "go"
    wait = f"while [ ! -e {gate} ]; do echo tick $(date +%T); sleep 1; done"
    jobs = [meshrun.run("echo preparing data; sleep 0.2; echo done", name="prepare-data"),
            meshrun.run("echo loading; echo 'ValueError: bad shard 3' >&2; exit 3", name="eval-shard-3")]
    for j in jobs:
        j.wait(60)
    sweep = meshrun.submit_many([meshrun.JobSpec(command=["bash", "-c", f"echo lr {lr}"], name=f"sweep-lr-{lr}")
                                 for lr in (0.1, 0.03, 0.01)], backend="local")
    meshrun.wait(sweep, timeout=60)
    train = meshrun.run(wait, gpus=2, name="train-llm", backend="local")
    while train.status().value != "running":
        time.sleep(0.1)
    queued = meshrun.run(wait, gpus=1, name="finetune", backend="local")
    proc = subprocess.Popen([sys.executable, "-m", "meshrun", "dashboard", "--port", "0", "--no-browser", "--token",
                             TOKEN, "--refresh", "0.5", "--bench",
                             str(REPO / "benchmarks/results/bench_allreduce_h200x2.jsonl")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().split("dashboard: ", 1)[1].split("/?", 1)[0]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=a.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{base}/?token={TOKEN}")
            shots = {"jobs": "/", "job": f"/job/{jobs[1].id}", "gpus": "/gpus", "offers": "/offers?gpus=1",
                     "bench": "/bench"}
            for name, path in shots.items():
                page.goto(base + path)
                page.wait_for_timeout(1500)  # a live update has come in
                page.screenshot(path=str(out / f"dashboard-{name}.png"), full_page=name != "bench")
                print(out / f"dashboard-{name}.png")
            browser.close()
    finally:
        gate.touch()
        for j in (train, queued):
            j.cancel()
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
