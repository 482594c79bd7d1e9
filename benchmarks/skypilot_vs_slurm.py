"""Launch latency on the repo's test Slurm cluster: meshrun through SkyPilot vs meshrun's own Slurm backend,
measured in one run on the same cluster.

    .venv/bin/python benchmarks/skypilot_vs_slurm.py [--repeat 3] [--out benchmarks/results/skypilot_vs_slurm.json]

Sets up what the end-to-end tests use (backends/skypilot/scripts/skypilot-slurm.sh up, which starts the
Slurm cluster), a throwaway SkyPilot home with its own API server, and measures, submit to result:

  skypilot  launch    a command on a new SkyPilot cluster (`sky launch`: allocation + runtime setup + job)
  skypilot  exec      a command on that cluster, already up (`sky exec`)
  skypilot  function  a Python function on that cluster (`sky exec`)
  skypilot  sdk_exec_raw  `echo hi` straight through SkyPilot's SDK (exec + follow the log): SkyPilot's share
  slurm     command   the same command through meshrun's Slurm backend (sbatch), if it is installed
  slurm     function  the same function through meshrun's Slurm backend

The Slurm half is skipped with a note when the slurm backend is not installed. Everything it started is
stopped at the end (clusters, API server, the login node), and the JSON records the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "backends" / "skypilot" / "scripts" / "skypilot-slurm.sh"
CATALOGS = [REPO.parent / "shared" / "catalogs" / "v8", REPO / "shared" / "catalogs" / "v8"]


def square(x):
    return x * x


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def facts() -> dict[str, str]:
    out = subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True, check=True).stdout
    return {k: v.strip("'") for k, _, v in (l.partition("=") for l in out.splitlines()) if k}


def summary(xs: list[float]) -> dict[str, float]:
    return {"runs": len(xs), "median_s": round(statistics.median(xs), 2), "min_s": round(min(xs), 2),
            "max_s": round(max(xs), 2), "all_s": [round(x, 2) for x in xs]}


def ratios(sky: dict) -> dict[str, float]:
    """meshrun's cost over SkyPilot's own, medians of the same run (1.0: meshrun adds nothing)."""
    raw = sky["sdk_exec_raw"]["median_s"]
    return {"exec_over_sdk": round(sky["exec"]["median_s"] / raw, 3),
            "function_over_sdk": round(sky["function"]["median_s"] / raw, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="exec/function/slurm runs (launch runs once)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "skypilot_vs_slurm.json"))
    a = ap.parse_args(argv)
    a.out = os.path.abspath(a.out)  # the benchmark works in a scratch folder

    t0 = time.perf_counter()
    subprocess.run(["bash", str(SCRIPT), "up"], check=True, stdout=subprocess.DEVNULL)
    setup_s = time.perf_counter() - t0
    f = facts()
    home = Path(tempfile.mkdtemp(prefix="meshrun-skybench-"))
    (home / ".slurm").mkdir()
    shutil.copyfile(f["SKY_SLURM_CONFIG"], home / ".slurm" / "config")
    sys.path.insert(0, str(REPO / "backends" / "skypilot" / "tests"))
    from conftest import SkyEnv, end_processes, pick_api_port, processes_with_home  # the suite's own helpers

    env = SkyEnv(home, pick_api_port())
    for src in CATALOGS:
        if src.is_dir():
            from meshrun_skypilot import install_catalog

            install_catalog(src, home / ".sky" / "catalogs" / "v8")
            break
    os.environ.update(env.environ())
    os.environ["MESHRUN_HOME"] = str(home / "meshrun")
    work = home / "work"
    work.mkdir()
    os.chdir(work)

    import meshrun

    results: dict[str, object] = {
        "what": "submit -> result latency of a trivial job on the test Slurm cluster (2 cores, shared machine)",
        "command": "python benchmarks/skypilot_vs_slurm.py " + " ".join(argv or sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": os.getloadavg()},
        "setup_s": round(setup_s, 2),
    }
    cluster = f"mr-bench-{os.getpid()}"
    try:
        t0 = time.perf_counter()
        env.start_server()
        from sky.client import sdk

        sdk.get(sdk.check(("slurm",), False))
        results["api_server_start_and_check_s"] = round(time.perf_counter() - t0, 2)
        meshrun.configure({"backends": {"skypilot": {"port": env.port, "infra": f["SKY_SLURM_INFRA"]}}})
        opts = {"skypilot": {"cluster": cluster}}
        sky: dict[str, object] = {}
        s, _ = timed(lambda: meshrun.run("echo hi", backend="skypilot", backend_options=opts).result(timeout=1800))
        sky["launch"] = summary([s])
        execs, funcs = [], []
        for _ in range(a.repeat):
            s, _ = timed(lambda: meshrun.run("echo hi", backend="skypilot", backend_options=opts).result(timeout=900))
            execs.append(s)
            spec = meshrun.JobSpec(function=square, args=(7,), backend_options=opts)
            s, v = timed(lambda: meshrun.submit(spec, backend="skypilot").result(timeout=900))
            assert v == 49
            funcs.append(s)
        sky["exec"] = summary(execs)
        sky["function"] = summary(funcs)
        # the same command straight through SkyPilot's SDK, as `sky exec CLUSTER 'echo hi'` does it (submit,
        # then follow the log to the end): SkyPilot's own share of the numbers above
        import sky as sky_mod

        raws = []
        for _ in range(a.repeat):
            def raw():
                job_id, _ = sdk.get(sdk.exec(sky_mod.Task(run="echo hi"), cluster_name=cluster))
                return sdk.tail_logs(cluster, job_id, follow=True, output_stream=open(os.devnull, "w"))
            s, rc = timed(raw)
            assert rc == 0, rc
            raws.append(s)
        sky["sdk_exec_raw"] = summary(raws)
        results["skypilot"] = sky
        results["ratios"] = ratios(sky)
        print(f"[bench] skypilot: {json.dumps(sky)}", file=sys.stderr)
        sdk.get(sdk.down(cluster))

        try:
            meshrun.get_backend("slurm")
            have_slurm = True
        except meshrun.MeshrunError as e:
            have_slurm = False
            results["slurm"] = {"skipped": f"meshrun's slurm backend is not installed here: {e}"}
        if have_slurm:
            cmds, fns = [], []
            for _ in range(a.repeat):
                s, _ = timed(lambda: meshrun.run("echo hi", backend="slurm").result(timeout=600))
                cmds.append(s)
                s, v = timed(lambda: meshrun.submit(meshrun.JobSpec(function=square, args=(7,)),
                                                    backend="slurm").result(timeout=600))
                assert v == 49
                fns.append(s)
            results["slurm"] = {"command": summary(cmds), "function": summary(fns)}
    finally:
        left = env.stop()
        end_processes(processes_with_home(str(home)))
        subprocess.run(["bash", str(SCRIPT), "down"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results["ended_after_api_stop"] = [c[:100] for _, c in left]
        results["machine"]["loadavg_after"] = os.getloadavg()  # type: ignore[index]
        shutil.rmtree(home, ignore_errors=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
