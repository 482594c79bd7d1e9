"""``meshrun usage``: who used which GPUs, where, for how long, how long they waited and at what price.

Two sources, joined by job id:

* the lease directory's usage record (``usage-<uid>.jsonl``, appended by each user's agent when a lease of
  theirs ends; ``_agent.usage_records`` reads it as carefully as the lease table): every user's GPU leases on
  this machine, with the time each waited in the queue here;
* the job store (this user's jobs on every backend): GPUs asked for, start and end, the wait between submit
  and start, the sweep (the jobs of one ``map``/``submit_many``) and the price of the offer it ran on.

A job found in both is counted once, from the lease record (the GPUs it held), with the store's sweep and
price. The numbers are clipped to the period: a job that ran across its start counts only its part inside.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from . import _agent

#: the dimensions a report is broken down by, in the order they are printed
DIMENSIONS = ("user", "host", "gpu_type", "sweep")


@dataclass(frozen=True)
class Use:
    """One job's (or one lease's) use of GPUs."""

    job_id: str
    user: str
    host: str  # "<backend>:<where>"
    gpu_type: str
    sweep: str  # the array id of a map/submit_many, else "-"
    gpus: int  # GPUs held at once (all nodes)
    start: float
    end: float
    wait: float | None  # seconds between asking for the GPUs and getting them
    price_per_hour: float | None  # the whole job's, when its backend is priced
    source: str  # "lease record" or "job store"

    def seconds_in(self, since: float, until: float) -> float:
        return max(0.0, min(self.end, until) - max(self.start, since))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _offer_price(job_dir: Path | None, backend: str | None, where: str | None) -> tuple[float | None, str | None]:
    """(total $/h, GPU type) of the offer the job ran on, from its plan.json: the first ranked offer of its
    backend (and place, when recorded)."""
    plan = _read_json(job_dir / "plan.json") if job_dir else None
    offers = [o for o in (plan or {}).get("ranked") or [] if isinstance(o, dict) and o.get("backend") == backend]
    if where:
        offers = [o for o in offers if o.get("where") and str(where).startswith(str(o["where"]))] or offers
    if not offers:
        return None, None
    price = offers[0].get("total_price_per_hour")
    return (float(price) if isinstance(price, (int, float)) else None), offers[0].get("gpu_type")


def uses_from_store(records: Iterable[Any], now: float) -> list[Use]:
    """The store's GPU jobs that started (a running job counts up to ``now``)."""
    out = []
    for r in records:
        if r.started_at is None or r.job_dir is None:
            continue
        launch = _read_json(Path(r.job_dir) / "launch.json") or {}
        gpus = int(launch.get("gpus") or 0) * int(launch.get("nodes") or 1)
        if gpus <= 0:
            continue
        price, offer_type = _offer_price(Path(r.job_dir), r.backend, r.where)
        wait = r.started_at - r.submitted_at if r.submitted_at is not None else None
        out.append(Use(job_id=r.id, user=r.user or "?", host=f"{r.backend}:{r.where or '-'}",
                       gpu_type=launch.get("gpu_type") or offer_type or "any", sweep=r.array_id or "-", gpus=gpus,
                       start=r.started_at, end=r.ended_at if r.ended_at is not None else now,
                       wait=max(0.0, wait) if wait is not None else None, price_per_hour=price, source="job store"))
    return out


def uses_from_leases(records: Iterable[Mapping[str, Any]], store_uses: Mapping[str, Use],
                     price_per_gpu_hour: Any = 0.0) -> list[Use]:
    """Ended leases of every user on this machine; a job also in the store takes its sweep and price from
    there, others are priced by the local backend's ``price_per_gpu_hour``."""
    out = []
    for r in records:
        names = [n for n in (r.get("gpu_names") or []) if n]
        gpu_type = r.get("gpu_type") or (names[0] if names else "any")
        job = store_uses.get(str(r.get("job_id")))
        n = len(r["gpus"])
        if job is not None:
            price = job.price_per_hour
        else:
            per_gpu = _local_price(price_per_gpu_hour, gpu_type)
            price = per_gpu * n if per_gpu else None
        queued = r.get("queued_at")
        out.append(Use(job_id=str(r.get("job_id") or "-"), user=str(r.get("user") or _agent.uid_name(r["uid"])),
                       host=f"local:{r.get('host') or socket.gethostname()}", gpu_type=gpu_type,
                       sweep=job.sweep if job else "-", gpus=n, start=float(r["granted_at"]),
                       end=float(r["ended_at"]),
                       wait=max(0.0, r["granted_at"] - queued) if isinstance(queued, (int, float)) else None,
                       price_per_hour=price, source="lease record"))
    return out


def _local_price(prices: Any, gpu_type: str) -> float:
    if isinstance(prices, (int, float)):
        return float(prices)
    if isinstance(prices, Mapping):
        for k, v in prices.items():
            if k != "default" and _agent.gpu_matches({"name": gpu_type}, k):
                return float(v)
        return float(prices.get("default", 0.0))
    return 0.0


def combine(store_uses: Sequence[Use], lease_uses: Sequence[Use]) -> list[Use]:
    """Every use once: the lease records, and the store's jobs they do not cover."""
    leased = {u.job_id for u in lease_uses}
    return list(lease_uses) + [u for u in store_uses if u.job_id not in leased]


def _row(key: str, uses: Sequence[Use], since: float, until: float) -> dict[str, Any]:
    secs = [u.seconds_in(since, until) for u in uses]
    waits = [u.wait for u in uses if u.wait is not None and since <= u.start < until]
    priced = [(u.price_per_hour or 0.0) * s / 3600.0 for u, s in zip(uses, secs) if u.price_per_hour]
    return {
        "key": key,
        "jobs": sum(1 for s in secs if s > 0),
        "gpu_hours": round(sum(u.gpus * s for u, s in zip(uses, secs)) / 3600.0, 4),
        "wait_mean_s": round(sum(waits) / len(waits), 1) if waits else None,
        "wait_max_s": round(max(waits), 1) if waits else None,
        "spend": round(sum(priced), 4) if priced else None,
    }


def report(uses: Sequence[Use], since: float, until: float, *, gpus_here: int | None = None,
           host: str | None = None, snapshot: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The usage report as plain data (``--json`` prints it as is)."""
    inside = [u for u in uses if u.seconds_in(since, until) > 0 or (u.start == u.end and since <= u.start < until)]
    out: dict[str, Any] = {"since": since, "until": until, "total": _row("all", inside, since, until)}
    for dim in DIMENSIONS:
        groups: dict[str, list[Use]] = {}
        for u in inside:
            groups.setdefault(getattr(u, dim), []).append(u)
        out[f"by_{dim}"] = sorted((_row(k, v, since, until) for k, v in groups.items()),
                                  key=lambda r: (-r["gpu_hours"], r["key"]))
    if gpus_here is not None:
        host = host or socket.gethostname()
        used = sum(u.gpus * u.seconds_in(since, until) for u in inside if u.host == f"local:{host}") / 3600.0
        capacity = gpus_here * (until - since) / 3600.0
        out["idle"] = {"host": host, "gpus": gpus_here, "capacity_gpu_hours": round(capacity, 4),
                       "leased_gpu_hours": round(used, 4), "idle_gpu_hours": round(max(0.0, capacity - used), 4),
                       "idle_fraction": round(max(0.0, capacity - used) / capacity, 4) if capacity else None}
    if snapshot is not None:
        out["fair_share"] = {
            "half_life_s": _agent.FAIR_HALF_LIFE,
            "recent_gpu_hours": snapshot.get("recent_gpu_hours") or {},
            "queue": [{k: t.get(k) for k in ("position", "user", "job_id", "name", "gpus", "gpu_type",
                                              "recent_gpu_hours")} for t in snapshot.get("queue") or []],
            "starts_next": snapshot.get("starts_next") or [],
            "policy": snapshot.get("queue_policy"),
        }
    out["uses"] = [asdict(u) for u in inside]
    return out


def csv_text(rep: Mapping[str, Any]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["dimension", "key", "jobs", "gpu_hours", "wait_mean_s", "wait_max_s", "spend"])
    for dim in ("total",) + tuple(f"by_{d}" for d in DIMENSIONS):
        rows = [rep[dim]] if dim == "total" else rep[dim]
        for r in rows:
            w.writerow([dim.removeprefix("by_"), r["key"], r["jobs"], r["gpu_hours"], _blank(r["wait_mean_s"]),
                        _blank(r["wait_max_s"]), _blank(r["spend"])])
    return buf.getvalue()


def _blank(v: Any) -> Any:
    return "" if v is None else v


def print_report(rep: Mapping[str, Any]) -> None:
    from ._display import print_table, safe_text
    from ._units import format_duration

    def fmt(r: Mapping[str, Any]) -> list[str]:
        return [safe_text(r["key"]), str(r["jobs"]), f"{r['gpu_hours']:.2f}",
                format_duration(r["wait_mean_s"]) if r["wait_mean_s"] is not None else "-",
                format_duration(r["wait_max_s"]) if r["wait_max_s"] is not None else "-",
                f"${r['spend']:.2f}" if r["spend"] is not None else "-"]

    span = f"{_when(rep['since'])} to {_when(rep['until'])}"
    t = rep["total"]
    print(f"GPU usage {span}: {t['gpu_hours']:.2f} GPU-hours in {t['jobs']} job(s)"
          + (f", ${t['spend']:.2f}" if t["spend"] is not None else ""))
    for dim in DIMENSIONS:
        rows = rep[f"by_{dim}"]
        if rows:
            print_table([dim.upper().replace("_", " "), "JOBS", "GPU-H", "MEAN WAIT", "MAX WAIT", "SPEND"],
                        [fmt(r) for r in rows], title=f"by {dim.replace('_', ' ')}")
    idle = rep.get("idle")
    if idle:
        frac = f" ({100 * idle['idle_fraction']:.0f}%)" if idle["idle_fraction"] is not None else ""
        print(f"idle: {safe_text(idle['host'])} had {idle['gpus']} GPU(s), {idle['capacity_gpu_hours']:.2f} GPU-hours; "
              f"{idle['leased_gpu_hours']:.2f} leased, {idle['idle_gpu_hours']:.2f} idle{frac}")
    fair = rep.get("fair_share")
    if fair:
        recent = ", ".join(f"{safe_text(u)} {h:.2f}" for u, h in sorted(fair["recent_gpu_hours"].items(),
                                                                      key=lambda kv: kv[1])) or "nobody"
        print(f"fair share (recent GPU-hours, halving every {fair['half_life_s'] / 3600:g}h; least goes first): {recent}")
        if fair["queue"]:
            nxt = set(fair["starts_next"])
            print_table(["#", "USER", "JOB", "GPUS", "RECENT GPU-H", "NEXT"],
                        [[str(q["position"]), safe_text(q["user"]), safe_text(f"{q['job_id']} ({q['name']})"),
                          f"{q['gpus']}{' ' + q['gpu_type'] if q.get('gpu_type') else ''}",
                          f"{q['recent_gpu_hours'] or 0:.2f}", "starts now" if q["job_id"] in nxt else "waits"]
                         for q in fair["queue"]], title="what the queue does next")
        else:
            print("queue: empty")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def plot_png(rep: Mapping[str, Any], path: str) -> str | None:
    """GPU-hours by user and by GPU type as a PNG; an error message when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--png needs matplotlib, which is not installed (pip install matplotlib); the report is above"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, dim in zip(axes, ("user", "gpu_type")):
        rows = rep[f"by_{dim}"]
        ax.bar([str(r["key"]) for r in rows], [r["gpu_hours"] for r in rows])
        ax.set_title(f"GPU-hours by {dim.replace('_', ' ')}")
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{_when(rep['since'])} to {_when(rep['until'])}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def parse_when(value: str, now: float) -> float:
    """``--since``/``--until``: a duration back from now ("7d", "24h", "90m"), a date ("2026-12-01",
    "2026-12-01T08:00") or "now"."""
    from datetime import datetime

    from ._units import parse_duration

    if value.strip().lower() == "now":
        return now
    try:
        return now - parse_duration(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ValueError(f"expected a duration back from now (7d, 24h) or a date (2026-12-01), got {value!r}") from None


def main(argv: Sequence[str]) -> int:
    """``meshrun usage [--since 7d] [--until DATE] [--json | --csv] [--png FILE]``."""
    import argparse

    p = argparse.ArgumentParser(prog="meshrun usage", description=(
        "GPU-hours by user, host/backend, GPU type and sweep over a period, queue waiting times, idle capacity "
        "of this machine's GPUs, spend where backends are priced, each user's recent use as the fair-share queue "
        "sees it and what the queue would start next."))
    p.add_argument("--since", default="7d", help="start of the period: a duration back from now (7d, 24h) or a date "
                                                 "(default: 7d)")
    p.add_argument("--until", default="now", help="end of the period: a duration back from now, a date or now "
                                                  "(the default)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="the report as JSON")
    fmt.add_argument("--csv", action="store_true", help="the tables as CSV")
    p.add_argument("--png", metavar="FILE", help="also plot GPU-hours by user and GPU type into FILE (needs matplotlib)")
    a = p.parse_args(list(argv))
    now = time.time()
    try:
        since = parse_when(a.since, now)
        until = parse_when(a.until, now)
    except ValueError as e:
        print(f"meshrun usage: {e}", file=sys.stderr)
        return 2
    from ._errors import MeshrunError

    try:
        rep = build(since, until, now)
    except MeshrunError as e:
        print(f"meshrun: error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(rep, indent=2, sort_keys=True))
    elif a.csv:
        sys.stdout.write(csv_text(rep))
    else:
        for w in rep.get("warnings") or []:
            print(f"warning: {w}", file=sys.stderr)
        print_report(rep)
    if a.png:
        err = plot_png(rep, a.png)
        if err:
            print(f"meshrun usage: {err}", file=sys.stderr)
            return 1
    return 0


def build(since: float, until: float, now: float) -> dict[str, Any]:
    """The report for this user's store and this machine's lease directory."""
    from ._config import get_config
    from ._localenv import agent_env, local_gpus
    from ._store import get_store

    table = get_config().backend("local")
    env = agent_env(table.get("lease_dir"), table.get("share_gpu_below_mib"))
    store_uses = uses_from_store(get_store().list(limit=None), now)
    records, warnings = _agent.usage_records(env=env)
    lease_uses = uses_from_leases(records, {u.job_id: u for u in store_uses}, table.get("price_per_gpu_hour", 0.0))
    snap = local_gpus()
    rep = report(combine(store_uses, lease_uses), since, until, gpus_here=len(snap.get("gpus") or []),
                 snapshot=snap)
    rep["warnings"] = warnings + [w for w in snap.get("warnings") or []]
    if os.environ.get("MESHRUN_LEASE_SERVICE") or os.path.exists(_agent.LEASE_SERVICE_CONF):
        rep["warnings"].append("GPUs here are leased through the lease service: its usage record is in "
                               f"{_agent.DEFAULT_SERVICE_DIR}, readable by root only")
    return rep
