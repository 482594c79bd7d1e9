"""Placement speed: catalog load, planning over five backends and the whole catalog, `meshrun offers`.

    .venv/bin/python benchmarks/placement.py [--catalog DIR] [--repeat N] [--out FILE]

Targets: catalog load <= 200 ms (cold parse of the snapshot); a plan over 5 backends and the whole catalog
<= 10 ms once the catalog is loaded; `meshrun offers` answers in under a second. The five backends are
in-process stand-ins that answer at once (a workstation, an SSH pool, a Slurm cluster, a Kubernetes
cluster, and a cloud backend whose offers come from the catalog), so the numbers are placement's own cost:
gathering in threads, catalog matching, on-prem pricing and ranking. Results are written as JSON
(default benchmarks/results/placement.json) with the command that produced them.
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
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CATALOG = REPO.parent / "shared" / "catalogs" / "v8"

TARGETS = {"catalog_load_ms": 200.0, "plan_ms": 10.0, "cli_offers_s": 1.0}


def stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "median": round(statistics.median(s), 3),
        "p90": round(s[min(len(s) - 1, int(len(s) * 0.9))], 3),
        "min": round(s[0], 3),
        "max": round(s[-1], 3),
        "n": len(s),
    }


def timed(fn: Callable[[], Any], repeat: int, cpu: list[float] | None = None) -> list[float]:
    """Wall milliseconds per call; with ``cpu``, also this process's CPU milliseconds (all its threads), which
    other processes' load on a shared machine does not inflate."""
    out = []
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
        if cpu is not None:
            cpu.append((time.process_time() - c0) * 1000.0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", default=str(DEFAULT_CATALOG), help="a SkyPilot catalogs/v8 folder")
    ap.add_argument("--repeat", type=int, default=200, help="plans per spec")
    ap.add_argument("--cli-runs", type=int, default=7, help="`meshrun offers` runs")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "placement.json"))
    a = ap.parse_args(argv)

    home = tempfile.mkdtemp(prefix="meshrun-bench-")
    cfg = Path(home) / "config.toml"
    cfg.write_text(f'[placement]\nbackends = ["local", "skypilot"]\ncatalog_dir = "{a.catalog}"\n'
                   '[prices]\ndefault = 0.0\n[prices.slurm]\nH100 = 1.1\n')
    os.environ.update(MESHRUN_HOME=home, MESHRUN_CONFIG=str(cfg), MESHRUN_LEASE_DIR=str(Path(home) / "leases"))

    import meshrun
    from meshrun import JobSpec, Offer, _catalog, _plan
    from meshrun._backend import Availability, Backend

    # ---- catalog load, cold (parse) and warm (cache check)
    def cold() -> None:
        _catalog.clear_cache()
        _catalog.load_catalog(a.catalog)

    cold_cpu: list[float] = []
    cold_ms = timed(cold, 30, cold_cpu)
    warm_ms = timed(lambda: _catalog.load_catalog(a.catalog), 200)
    cat = _catalog.load_catalog(a.catalog)

    # ---- five in-process backends
    class Static(Backend):
        def __init__(self, name: str, make: Callable[[Any], list[Offer]]):
            super().__init__({})
            self.name = name  # type: ignore[misc]
            self.make = make

        def check(self) -> Availability:
            return Availability(True)

        def offers(self, spec: Any) -> list[Offer]:
            return self.make(spec)

        def submit(self, submission: Any, offer: Any = None) -> str:  # pragma: no cover - not submitted
            raise NotImplementedError

        def status(self, ids: Any) -> dict:  # pragma: no cover
            return {}

        def cancel(self, backend_id: str) -> None:  # pragma: no cover
            pass

        def logs(self, backend_id: str, *, follow: bool = False) -> Any:  # pragma: no cover
            return iter(())

    def res(s: Any) -> dict[str, Any]:
        r = s.resources
        return dict(gpus=r.gpus, gpu_type=r.gpu_type or ("H100" if r.gpus else None), cpus=r.cpus, memory=r.memory)

    makers = {
        "ws": lambda s: [Offer(backend="ws", where="desk", nodes=1, **res(s))],
        "ssh": lambda s: [Offer(backend="ssh", where=f"gpu-box-{i}", expected_start=None if i % 2 else 0.0,
                                start_note="queued" if i % 2 else "now", **res(s)) for i in range(4)],
        "slurm": lambda s: [Offer(backend="slurm", where=p, nodes=s.resources.nodes, expected_start=900.0 * (i + 1),
                                  start_note="sbatch --test-only", detail={"partition": p}, **res(s))
                            for i, p in enumerate(("gpu", "gpu-long", "debug"))],
        "kubernetes": lambda s: [Offer(backend="kubernetes", where=f"pool-{i}", expected_start=60.0, **res(s))
                                 for i in range(2)],
        "cloud": lambda s: meshrun.catalog_offers(s, catalog_dir=a.catalog, launcher="cloud"),
    }
    for name, make in makers.items():
        meshrun.register_backend(name, (lambda make=make, name=name: (lambda config=None: Static(name, make)))())
    names = list(makers)

    specs = {
        "cpu (every CPU row)": JobSpec(command=["true"]),
        "1 GPU, any type (every 1-GPU row)": JobSpec(command=["true"], gpus=1),
        "H100:1": JobSpec(command=["true"], gpus="H100:1"),
        "H100:8 x 2 nodes": JobSpec(command=["true"], gpus="H100:8", nodes=2),
    }
    plans: dict[str, Any] = {}
    for label, s in specs.items():
        for kw_label, kw in (("cost", {}), ("deadline 1h", {"deadline": "1h"}),
                             ("balanced", {"value_of_time": 5.0, "allow_spot": True})):
            p = meshrun.plan(s, backends=names, raise_on_empty=False, **kw)  # warm up
            n_offers = len(p.ranked) + len(p.rejected)
            cpu: list[float] = []
            ms = timed(lambda s=s, kw=kw: meshrun.plan(s, backends=names, raise_on_empty=False, **kw), a.repeat,
                       cpu)
            plans[f"{label}, {kw_label}"] = {"offers": n_offers, "ranked": len(p.ranked), "ms": stats(ms),
                                             "cpu_ms": stats(cpu), "chosen": p.chosen.key if p.chosen else None}

    # the whole catalog as fitting offers, ranked (the pure ranking at its largest)
    every = [Offer(backend="cloud", where=f"{vm.cloud}/{vm.region}", gpus=vm.gpus, gpu_type=vm.gpu or None,
                   cpus=vm.vcpus, price_per_hour=vm.price or vm.spot_price or 0.0, spot=vm.price is None,
                   expected_start=300.0, instance_type=vm.instance_type, region=vm.region)
             for vm in _catalog.iter_rows(cat)]
    every += [o for make in list(makers.values())[:4] for o in make(specs["H100:1"])]
    rank_ms = timed(lambda: _plan.rank(specs["H100:1"], every, allow_spot=True), a.repeat)

    # ---- `meshrun offers` wall time (local backend + catalog), a fresh process each run
    import resource

    def child_cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime

    # every installed backend (slow ones are cut off by the CLI's time budget) plus the catalog snapshot;
    # then the local backend alone
    (Path(home) / "cli.toml").write_text(f'[placement]\ncatalog_dir = "{a.catalog}"\n')
    cli_env = {**os.environ, "MESHRUN_GPUS": "0", "MESHRUN_CONFIG": str(Path(home) / "cli.toml")}
    cli_runs: dict[str, dict[str, Any]] = {}
    for label, args in (("all installed backends + catalog", ["offers", "--gpus", "1"]),
                        ("--backend local", ["offers", "--gpus", "1", "--backend", "local"])):
        wall, cpu_s = [], []
        for _ in range(a.cli_runs):
            c0, t0 = child_cpu(), time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "meshrun", *args], capture_output=True, text=True, env=cli_env)
            wall.append(time.perf_counter() - t0)
            cpu_s.append(child_cpu() - c0)
            if r.returncode not in (0, 1) or "local" not in r.stdout:
                print(r.stdout, r.stderr, file=sys.stderr)
                return 2
        cli_runs[label] = {"command": "meshrun " + " ".join(args), "wall_s": stats(wall), "cpu_s": stats(cpu_s),
                           "not_answering": sorted({ln.split()[0] for ln in r.stdout.splitlines()
                                                    if "did not answer" in ln})}
    cli = [v["wall_s"]["median"] for v in cli_runs.values()]
    py = []
    for _ in range(a.cli_runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"])
        py.append(time.perf_counter() - t0)

    plan_worst = max(v["ms"]["median"] for v in plans.values())
    plan_worst_cpu = max(v["cpu_ms"]["median"] for v in plans.values())
    result = {
        "benchmark": "placement",
        "command": "  ".join([".venv/bin/python benchmarks/placement.py"]
                             + ([f"--catalog {a.catalog}"] if a.catalog != str(DEFAULT_CATALOG) else [])),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "catalog": {"dir": a.catalog, "clouds": cat.clouds, "rows": len(cat),
                    "load_cold_ms": stats(cold_ms), "load_cold_cpu_ms": stats(cold_cpu),
                    "load_cached_ms": stats(warm_ms)},
        "plan_5_backends_plus_catalog": plans,
        "rank_whole_catalog": {"offers": len(every), "ms": stats(rank_ms)},
        "cli_offers": cli_runs,
        "python_startup_seconds": stats(py),
        "targets": TARGETS,
        "pass": {
            "catalog_load_ms": stats(cold_ms)["median"] <= TARGETS["catalog_load_ms"],
            "plan_ms (wall, worst median)": plan_worst <= TARGETS["plan_ms"],
            "plan_ms (cpu, worst median)": plan_worst_cpu <= TARGETS["plan_ms"],
            "cli_offers_s (wall, worst median)": max(cli) <= TARGETS["cli_offers_s"],
        },
        "note": "wall times depend on the machine's load (loadavg above); CPU times are this process's own",
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"catalog: {len(cat)} rows ({', '.join(cat.clouds)}); cold load {stats(cold_ms)['median']:.1f} ms "
          f"(target {TARGETS['catalog_load_ms']:.0f}), cached {stats(warm_ms)['median']:.3f} ms")
    for k, v in plans.items():
        print(f"plan {k:<48} {v['offers']:>4} offers  median {v['ms']['median']:6.2f} ms wall "
              f"(p90 {v['ms']['p90']:6.2f}), {v['cpu_ms']['median']:6.2f} ms CPU")
    print(f"rank of the whole catalog ({len(every)} offers): median {stats(rank_ms)['median']:.2f} ms")
    for k, v in cli_runs.items():
        print(f"{v['command']:<40} median {v['wall_s']['median']:.3f} s wall, {v['cpu_s']['median']:.3f} s CPU"
              + (f" (cut off: {', '.join(v['not_answering'])})" if v["not_answering"] else ""))
    print(f"python startup alone: {stats(py)['median']:.3f} s")
    print(f"load average {result['machine']['loadavg_1m_at_end']} on {os.cpu_count()} CPUs; pass: {result['pass']}")
    print(f"wrote {out}")
    return 0 if all(result["pass"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
