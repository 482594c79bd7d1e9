"""The ``meshrun`` command: run, ls, status, logs, cancel, gpus, backends, offers, catalog, doctor, bench."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Sequence

from ._display import is_terminal, print_kv, print_table, safe_text, state_style
from ._units import format_duration, format_size

EPILOG = """examples:
  meshrun run --gpus 2 -- python train.py --lr 0.1
  meshrun run -d --name sweep -- bash -c 'echo $HOSTNAME'
  meshrun ls
  meshrun logs -f JOB_ID
  meshrun logs --tail 50 JOB_ID
  meshrun gpus
  meshrun doctor
"""


def _add_resource_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resources")
    g.add_argument("--gpus", help='GPUs per node: a count (2) or type:count ("H100:8")')
    g.add_argument("--gpu-type", help='GPU model, e.g. "A100"')
    g.add_argument("--cpus", help="CPU cores per node")
    g.add_argument("--memory", help='memory per node, e.g. "32GiB"')
    g.add_argument("--nodes", type=int, help="number of nodes")
    g.add_argument("--time", dest="time_limit", help='time limit, e.g. "2h", "90m", "01:30:00"')


def _resource_fields(a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in ("gpus", "gpu_type", "cpus", "memory", "nodes", "time_limit"):
        v = getattr(a, k, None)
        if v is not None:
            out[k] = v
    return out


def _add_placement_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("placement (docs/placement.md)")
    g.add_argument("--backend", "-b", help="run on this backend (default: placement chooses)")
    g.add_argument("--objective", choices=["cost", "start", "balanced"],
                   help="cheapest (default), earliest start, or cost + value of time x wait")
    g.add_argument("--max-price", dest="max_price_per_hour", type=float, metavar="DOLLARS",
                   help="highest acceptable $/hour for all nodes together")
    g.add_argument("--deadline", help='the job must be expected to start within this, e.g. "1h", or by an ISO time')
    g.add_argument("--value-of-time", dest="value_of_time", type=float, metavar="DOLLARS",
                   help="$ an hour of waiting is worth (implies --objective balanced)")
    g.add_argument("--runtime", help='expected runtime for cost estimates (default "1h")')
    spot = g.add_mutually_exclusive_group()
    spot.add_argument("--spot", dest="allow_spot", action="store_true", default=None, help="allow spot offers")
    spot.add_argument("--no-spot", dest="allow_spot", action="store_false", help="exclude spot offers (default)")
    g.add_argument("--exclude", dest="exclude_backends", action="append", metavar="BACKEND",
                   help="never use this backend (repeatable)")
    g.add_argument("--region", dest="regions", action="append", metavar="REGION",
                   help='allowed cloud region, wildcards allowed ("us-*"; repeatable)')
    g.add_argument("--offers-timeout", dest="timeout", type=float, metavar="SECONDS",
                   help="the longest a backend's offers are waited for (offers: about 1s; run: 10s, but a "
                        "backend not named alone is skipped as not responding after [placement] respond_within, 1s)")


def _plan_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for k in ("objective", "max_price_per_hour", "deadline", "value_of_time", "runtime", "allow_spot",
              "exclude_backends", "regions", "timeout"):
        v = getattr(a, k, None)
        if v is not None:
            out[k] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(
        prog="meshrun",
        description="Define a job once; run it on this machine, SSH workstations, Slurm, Kubernetes or the cloud.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"meshrun {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    r = sub.add_parser("run", help="run a command as a job", epilog="Everything after -- is the command.")
    r.add_argument("--name", "-n", help="job name")
    r.add_argument("--env", "-e", action="append", default=[], metavar="KEY=VALUE", help="environment variable")
    r.add_argument("--workdir", "-w", help="working directory (default: the current one)")
    r.add_argument("--setup", action="append", default=[], help="shell command to run first (repeatable)")
    r.add_argument("--detach", "-d", action="store_true", help="print the job id and return at once")
    r.add_argument("--shell", action="store_true", help="run the command as one bash -c string")
    r.add_argument("--track", metavar="TOOLS", help='experiment tracking: "wandb,mlflow,tensorboard" (settings '
                   'from the [tracking] config table), or "none" (default: the tools that table lists)')
    r.add_argument("--json", action="store_true", help="print the job as JSON (with --detach)")
    _add_resource_args(r)
    _add_placement_args(r)
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...], or a task YAML file")

    ls = sub.add_parser("ls", help="list jobs")
    ls.add_argument("--limit", "-l", type=int, default=30, help="show at most this many jobs, newest first "
                    "(default 30; 0: all)")
    ls.add_argument("--state", "-s", action="append", help="only jobs in this state (repeatable)")
    ls.add_argument("--json", action="store_true")

    tb = sub.add_parser("tensorboard", help="start TensorBoard over a job's or a sweep's log folders",
                        epilog="Arguments after the id go to tensorboard (e.g. --port 6007).")
    tb.add_argument("job_or_sweep", help="a job id, or the sweep id of a .map (its jobs' WANDB_RUN_GROUP)")
    tb.add_argument("--print", dest="print_only", action="store_true", help="print the log folder and exit")
    tb.add_argument("tb_args", nargs=argparse.REMAINDER)

    st = sub.add_parser("status", help="show one job in detail")
    st.add_argument("job_id")
    st.add_argument("--json", action="store_true")

    lg = sub.add_parser("logs", help="print a job's output")
    lg.add_argument("job_id")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    lg.add_argument("--tail", "-n", type=int, metavar="LINES", help="start at the last LINES lines")
    lg.add_argument("--max-bytes", metavar="SIZE", help='at most this much from the end, e.g. "1MiB" or 4096')

    c = sub.add_parser("cancel", help="cancel jobs (the whole process tree; frees their GPUs)")
    c.add_argument("job_ids", nargs="+")

    w = sub.add_parser("wait", help="wait for jobs to end; exit code 0 if all succeeded")
    w.add_argument("job_ids", nargs="+")
    w.add_argument("--timeout", type=float)

    g = sub.add_parser("gpus", help="who holds which GPU on this machine (or a backend's hosts)")
    g.add_argument("--json", action="store_true")
    g.add_argument("--backend", "-b", default="local", help="local (default) or a backend with hosts, e.g. ssh")

    b = sub.add_parser("backends", help="installed backends and whether they can be used")
    b.add_argument("--json", action="store_true")

    o = sub.add_parser("offers", help="where a job of this shape could run, ranked")
    _add_resource_args(o)
    _add_placement_args(o)
    o.add_argument("--json", action="store_true")

    cat = sub.add_parser("catalog", help="the cloud price catalog: which one is used, how old; update it",
                         description="Cloud prices come from SkyPilot-format catalog tables. A dated snapshot ships "
                                     "with meshrun; `meshrun catalog update` fetches current ones.")
    cat.add_argument("action", nargs="?", choices=["show", "update"], default="show",
                     help="show (default): the catalog in use, its age and clouds; update: fetch current tables")
    cat.add_argument("--clouds", help="update: comma-separated clouds to fetch (default: the GPU clouds)")
    cat.add_argument("--source", help="update: base URL of a catalogs/v8 folder (default: $MESHRUN_CATALOG_URL or "
                                      "SkyPilot's public catalog repository)")
    cat.add_argument("--json", action="store_true")

    ls_ = sub.add_parser("lease-service", help="the enforced GPU lease mode: a root service every user leases through",
                         description="Install (as root) or run the GPU lease service. With it, every user's agent "
                                     "leases GPUs through a root-owned Unix socket and nobody can touch the lease "
                                     "table; without it, users share a cooperative table (docs/architecture.md).")
    ls_.add_argument("action", choices=["install", "run"],
                     help="install: the agent, /etc/meshrun/lease-service.json and a systemd unit (started when "
                          "systemd runs); run: serve in the foreground")
    ls_.add_argument("--root", default="/", help="install under this directory instead of / (packaging, tests)")
    ls_.add_argument("--python", default="/usr/bin/python3", help="interpreter the unit runs the agent with")
    ls_.add_argument("--no-start", action="store_true", help="install only; do not enable or start the unit")
    ls_.add_argument("--socket", default=None, help="run: socket path (default /run/meshrun/lease.sock)")
    ls_.add_argument("--state-dir", default=None, help="run: lease directory (default /var/lib/meshrun/leases)")
    dr = sub.add_parser("doctor", help="check the job store, GPU leases, fork server, backends and GPU tools")
    dr.add_argument("--rebuild", action="store_true",
                    help="rebuild the job index from the job folders (the old file is kept beside it)")
    dr.add_argument("--json", action="store_true")

    be = sub.add_parser("bench", help="collective bandwidth benchmark (nccl-tests compatible busbw)",
                        add_help=False)
    be.add_argument("bench_args", nargs=argparse.REMAINDER)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "bench":
        from .bench._cli import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    if not args.cmd:
        parser.print_help()
        return 2
    from ._errors import JobNotFound, MeshrunError

    try:
        return int(COMMANDS[args.cmd](args) or 0)
    except JobNotFound as e:
        print(f"meshrun: {safe_text(e, newlines=True)}", file=sys.stderr)
        return 2
    except MeshrunError as e:
        print(f"meshrun: error: {safe_text(e, newlines=True)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `meshrun logs ID | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


# ---- commands -------------------------------------------------------------------------------------


def cmd_run(a: argparse.Namespace) -> int:
    from . import _scheduler
    from ._errors import SpecError
    from ._spec import JobSpec

    command = list(a.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SpecError("command", "nothing to run: give the command after --, e.g. meshrun run -- python train.py")
    env = {}
    for item in a.env:
        k, sep, v = item.partition("=")
        if not sep:
            raise SpecError("env", f"expected KEY=VALUE, got {item!r}")
        env[k] = v
    fields: dict[str, Any] = _resource_fields(a)
    if a.name:
        fields["name"] = a.name
    if env:
        fields["env"] = env
    if a.workdir:
        fields["workdir"] = a.workdir
    if a.setup:
        fields["setup"] = a.setup
    if a.track is not None:
        fields["track"] = False if a.track.strip().lower() in ("none", "") else a.track
    if len(command) == 1 and command[0].endswith((".yaml", ".yml")) and os.path.isfile(command[0]):
        from ._taskyaml import spec_from_task_yaml

        spec = spec_from_task_yaml(command[0]).replace(**fields) if fields else spec_from_task_yaml(command[0])
    else:
        spec = JobSpec(command=" ".join(command) if a.shell else command, **fields)
    from ._placement import quiet

    with quiet() if a.json else contextlib.nullcontext():  # --json: stdout and stderr stay machine-readable
        job = _scheduler.submit(spec, backend=a.backend, **_plan_kwargs(a))
    if a.detach:
        if a.json:
            print(json.dumps(_job_json(job)))
        else:
            print(job.id)
        return 0
    print(f"meshrun: job {job.id} submitted to {job.backend}", file=sys.stderr)
    return _follow(job)


def _follow(job: Any) -> int:
    """Stream a job's output while it runs; Ctrl-C detaches (the job keeps running)."""
    from ._backend import JobState

    shown_state = None
    status_line = is_terminal(sys.stderr)
    try:
        start = time.monotonic()
        while True:
            st = job.status()
            if st is not JobState.PENDING and st is not JobState.SUBMITTING:
                break
            msg = f"meshrun: {job.id} {st.value}" + (f": {safe_text(job.reason)}" if job.reason else "")
            if msg != shown_state and (status_line or time.monotonic() - start > 1.0):
                if status_line:
                    sys.stderr.write("\r" + msg[:120].ljust(120))
                else:
                    sys.stderr.write(msg + "\n")
                sys.stderr.flush()
                shown_state = msg
            time.sleep(min(1.0, 0.05 + (time.monotonic() - start) / 20))
        if status_line and shown_state:
            sys.stderr.write("\r" + " " * 120 + "\r")
        for chunk in job.logs(follow=True):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        job.wait()
    except KeyboardInterrupt:
        print(f"\nmeshrun: detached; job {job.id} keeps running (meshrun cancel {job.id} to stop it)",
              file=sys.stderr)
        return 130
    rec = job.record
    if rec.state is JobState.SUCCEEDED:
        return 0
    print(f"meshrun: job {job.id} {rec.state.value}: {safe_text(rec.reason)}".rstrip(": "), file=sys.stderr)
    return rec.exit_code if isinstance(rec.exit_code, int) and 0 < rec.exit_code < 256 else 1


def _job_json(job: Any) -> dict[str, Any]:
    r = job.record
    return {
        "id": r.id,
        "name": r.name,
        "state": r.state.value,
        "reason": r.reason,
        "backend": r.backend,
        "backend_id": r.backend_id,
        "where": r.where,
        "exit_code": r.exit_code,
        "created_at": r.created_at,
        "started_at": r.started_at,
        "ended_at": r.ended_at,
        "attempt": r.attempt,
        "history": r.history,
        "job_dir": str(r.job_dir),
        "tracking": job.tracking,
    }


def _containment(job: Any) -> dict[str, Any] | None:
    """How the host agent holds the job's processes together ("cgroup": a cgroup of the job's own;
    "subreaper": the supervisor tracks them), from the agent's state.json in the job folder."""
    try:
        st = json.loads((job.job_dir / "state.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(st, dict) or not st.get("containment"):
        return None
    out = {"mode": st["containment"]}
    if st.get("cgroup"):
        out["cgroup"] = st["cgroup"]
    return out


def _age(ts: float | None) -> str:
    return "-" if not ts else format_duration(time.time() - ts) + " ago"


def cmd_ls(a: argparse.Namespace) -> int:
    from ._backend import JobState
    from ._job import Job, refresh
    from ._store import get_store

    store = get_store()
    states = [JobState(s) for s in a.state] if a.state else None
    if a.limit < 0:
        print("meshrun: --limit must be 0 (all) or more", file=sys.stderr)
        return 2
    recs = store.list(limit=a.limit or None, states=states)
    jobs = [Job(r.id, store=store, _record=r) for r in recs]
    refresh([j for j in jobs if not j.record.terminal])
    if a.json:
        print(json.dumps([_job_json(j) for j in jobs], indent=2))
        return 0
    from ._tracking import short_links

    rows = []
    tracked = [short_links(j.job_dir) for j in jobs]
    for j, t in zip(jobs, tracked):
        r = j.record
        runtime = format_duration((r.ended_at or time.time()) - r.started_at) if r.started_at else "-"
        rows.append([r.id, r.name, r.state.value, r.backend or "-", r.where or "-", _age(r.created_at), runtime])
        if any(tracked):  # a column only when some listed job is tracked
            rows[-1].append(t or "-")
    if not rows:
        print("no jobs yet (meshrun run -- CMD to start one)")
        return 0
    head = ["ID", "NAME", "STATE", "BACKEND", "WHERE", "SUBMITTED", "RUNTIME"] + (["TRACKED"] if any(tracked) else [])
    print_table(head, rows, styles={2: state_style})
    total = store.count(states=states) if a.limit and len(rows) >= a.limit else len(rows)
    if total > len(rows):
        print(f"{len(rows)} of {total} jobs shown, newest first (meshrun ls --limit 0 shows all)")
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    from ._job import Job

    job = Job.attach(a.job_id)
    job.refresh()
    from ._tracking import close_again

    close_again(job._store, job.id)  # a tracking server that was down when the job ended
    contained = _containment(job)
    if a.json:
        print(json.dumps(dict(_job_json(job), containment=contained), indent=2))
        return 0
    r = job.record
    pairs = [
        ("id", r.id),
        ("name", r.name),
        ("state", r.state.value + (f" ({r.reason})" if r.reason else "")),
        ("what", r.summary),
        ("backend", f"{r.backend or '-'}" + (f"  id {r.backend_id}" if r.backend_id else "")),
        ("where", r.where or "-"),
        ("submitted", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at))),
    ]
    if r.started_at:
        pairs.append(("runtime", format_duration((r.ended_at or time.time()) - r.started_at)))
    if r.exit_code is not None:
        pairs.append(("exit code", str(r.exit_code)))
    if r.attempt > 1:
        pairs.append(("attempt", str(r.attempt)))
    if contained:
        pairs.append(("containment", contained["mode"] + (f" ({contained['cgroup']})" if contained.get("cgroup") else "")))
    from ._tracking import link_lines

    pairs += link_lines(job.job_dir)
    pairs.append(("folder", str(r.job_dir)))
    print_kv(pairs)
    if r.history:
        print()
        rows = []
        for h in r.history:
            extra = {k: v for k, v in h.items() if k not in ("time", "event") and v not in (None, "")}
            rows.append([time.strftime("%H:%M:%S", time.localtime(h["time"])), h["event"],
                         ", ".join(f"{k}={v}" for k, v in extra.items())])
        print_table(["TIME", "EVENT", "DETAIL"], rows, title="history")
    return 0


def cmd_logs(a: argparse.Namespace) -> int:
    from ._errors import SpecError
    from ._job import Job

    max_bytes = None
    if a.max_bytes is not None:
        from ._units import parse_size

        try:
            max_bytes = int(a.max_bytes) if str(a.max_bytes).isdigit() else parse_size(a.max_bytes)
        except (ValueError, SpecError) as e:
            raise SpecError("--max-bytes", f"expected a size such as 4096 or 1MiB, got {a.max_bytes!r}") from e
    if a.tail is not None and a.tail < 0:
        raise SpecError("--tail", f"expected a number of lines >= 0, got {a.tail}")
    job = Job.attach(a.job_id)
    try:
        # chunk by chunk: a log may be far larger than memory
        for chunk in job._log_iter(a.follow, a.tail, max_bytes):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_doctor(a: argparse.Namespace) -> int:
    from ._doctor import run_checks

    checks = run_checks(rebuild=a.rebuild)
    if a.json:
        print(json.dumps([c.to_dict() for c in checks], indent=2))
    else:
        print_table(["CHECK", "STATUS", "DETAIL"], [[c.name, c.status, c.detail] for c in checks],
                    styles={1: lambda v: {"ok": "green", "warning": "yellow", "error": "red"}.get(v, "")})
    return 1 if any(c.status == "error" for c in checks) else 0


def cmd_cancel(a: argparse.Namespace) -> int:
    from ._backend import JobState
    from ._job import Job

    for jid in a.job_ids:
        job = Job.attach(jid)
        before = job.status()
        if before.terminal and before is not JobState.LOST:  # a lost job may have left processes behind
            print(f"{job.id}: already {before.value}")
            continue
        job.cancel()
        print(f"{job.id}: {job.record.state.value}")
    return 0


def cmd_wait(a: argparse.Namespace) -> int:
    from ._job import Job, wait

    jobs = [Job.attach(j) for j in a.job_ids]
    try:
        wait(jobs, timeout=a.timeout)
    except TimeoutError as e:
        print(f"meshrun: {e}", file=sys.stderr)
        return 124
    bad = [j for j in jobs if not j.record.state.ok]
    for j in jobs:
        print(f"{j.id}: {j.record.state.value}" + (f" ({safe_text(j.record.reason)})" if j.record.reason else ""))
    return 1 if bad else 0


def cmd_gpus(a: argparse.Namespace) -> int:
    from ._registry import get_backend

    b = get_backend(a.backend)
    if not hasattr(b, "gpus"):
        print(f"meshrun: the {a.backend} backend does not report GPU leases", file=sys.stderr)
        return 2
    snaps = b.gpus()
    if isinstance(snaps, dict) and "gpus" in snaps:
        snaps = {snaps.get("host", "local"): snaps}
    if a.json:
        print(json.dumps(snaps, indent=2, sort_keys=True))
        return 0
    for host, snap in snaps.items():
        _print_gpu_snapshot(host, snap, len(snaps) > 1)
        c = snap.get("containment") if isinstance(snap, dict) else None
        if c:  # how the agent holds a job's processes together here (docs/architecture.md, "Supervisor")
            how = "a cgroup per job under" if c.get("mode") == "cgroup" else "tracked by the supervisor:"
            print(f"containment: {c.get('mode')} ({how} {c.get('detail')})")
    unusable = [s for s in snaps.values() if isinstance(s, dict) and s.get("error") and "lease_dir" not in s]
    return 1 if unusable else 0


def _foreign_proc(p: dict[str, Any]) -> str:
    """A process meshrun did not start, as `meshrun gpus` lists it: pid, name, user, GPU memory, and whether it
    is this very process (or one of its parents, e.g. the notebook kernel that runs this command)."""
    from ._agent import ancestry

    bits = [b for b in (p.get("user") or "another user (hidden)",
                        f"{p['used_memory']} MiB" if p.get("used_memory") not in (None, "") else None) if b]
    mine = " - this process or one of its parents" if p.get("pid") in ancestry() else ""
    return f"pid {p['pid']} {p.get('process_name') or '?'} ({', '.join(bits)}){mine}"


def _print_gpu_snapshot(host: str, snap: dict[str, Any], many: bool) -> None:
    gpus = snap.get("gpus") or []
    if snap.get("unreachable"):
        print(safe_text(f"{host}: unreachable: {snap['unreachable']}"))
        return
    if not gpus:
        why = snap.get("error") or "no GPUs found"
        print(safe_text(f"{host + ': ' if many else ''}no GPUs ({why}); set MESHRUN_GPUS to declare some"))
        return
    for w in snap.get("warnings") or []:
        print(f"{host + ': ' if many else ''}warning: {w}", file=sys.stderr)
    if snap.get("error") and "lease_dir" not in snap:  # the lease table is unusable: say so, show nothing as free
        print(f"{host + ': ' if many else ''}{snap['error']}", file=sys.stderr)
        return
    leases = snap.get("leases") or {}
    foreign = snap.get("foreign") or {}
    rows = []
    for g in gpus:
        lease = leases.get(str(g["index"]))
        procs = foreign.get(g["uuid"]) or []
        if lease:
            holder = lease.get("user", "?")
            job = f"{lease.get('job_id')} ({lease.get('name')})"
            since = _age(lease.get("since"))
        elif procs:
            holder = "foreign"
            job = ", ".join(_foreign_proc(p) for p in procs)
            since = "-"
        else:
            holder, job, since = "free", "-", "-"
        rows.append([str(g["index"]), g.get("name") or "-", format_size(g.get("memory")), holder, job, since,
                     g.get("uuid", "")])
    title = f"{host} ({snap.get('source')})" if many or snap.get("source") else host
    if snap.get("mode"):
        title += f", leases: {snap['mode']}"
    print_table(["GPU", "NAME", "MEMORY", "HOLDER", "JOB / PROCESSES", "SINCE", "UUID"], rows, title=title,
                styles={3: lambda v: "green" if v == "free" else ("red" if v == "foreign" else "yellow")})
    queue = snap.get("queue") or []
    if queue:
        policy = snap.get("queue_policy")
        if not policy:  # an older agent (on an SSH host): first come, first served, in ticket order
            queue = sorted(queue, key=lambda t: t["ticket"])
        held: dict[Any, int] = {}  # GPUs per user now (older agents do not put it on the ticket)
        for rec in leases.values():
            held[rec.get("user")] = held.get(rec.get("user"), 0) + 1
        def recent(t: dict[str, Any]) -> str:
            h = t.get("recent_gpu_hours")
            return "-" if h is None else f"{h:.2f}"

        qrows = [[str(i + 1), t.get("user"), str(t.get("held", held.get(t.get("user"), 0))), recent(t),
                  f"{t.get('job_id')} ({t.get('name')})",
                  f"{t.get('gpus')}{' ' + t['gpu_type'] if t.get('gpu_type') else ''}", _age(t.get("since"))]
                 for i, t in enumerate(queue)]
        title = ("queue (fair share: the user with the least recent GPU use first, GPU-hours halving every hour; "
                 "first come first served within a user)" if policy == "fair" else "queue (first come, first served)")
        print_table(["#", "USER", "USER HOLDS", "RECENT GPU-H", "JOB", "GPUS", "WAITING SINCE"], qrows, title=title)


def cmd_lease_service(a: argparse.Namespace) -> int:
    from . import _agent

    if a.action == "run":
        _agent.LeaseService(a.socket or _agent.DEFAULT_SERVICE_SOCKET, a.state_dir or _agent.DEFAULT_SERVICE_DIR).serve()
        return 0
    if os.geteuid() != 0 and a.root == "/":
        print("meshrun: lease-service install must run as root (sudo meshrun lease-service install)", file=sys.stderr)
        return 2
    for line in _agent.install_lease_service(a.root, a.python, start=not a.no_start):
        print(line)
    return 0


def cmd_backends(a: argparse.Namespace) -> int:
    """Every backend and whether it can be used. Each installed one is loaded and checked in its own thread;
    one that has not answered within ``[placement] respond_within`` (1 s; this machine gets 2 s more) is
    shown as not responding and remembered so (a later answer forgets it), so this answers within ~2 s."""
    from . import _registry
    from ._placement import LOCAL_GRACE, respond_limits, still_asking

    limits = respond_limits()
    infos = _registry.list_backends(load=False)
    wake = threading.Event()
    probes = {}
    for info in infos:
        if info.installed:
            limit = limits.of(info.name) or limits.default or 1.0  # "off" still answers: waits the default
            probes[info.name] = _registry.Probe(
                info.name, _check_one, limit=limit, skip_for=limits.skip_for, record=info.name != "local",
                thread_name=f"meshrun-offers-{info.name}", wake=wake).start()
    t0 = time.monotonic()
    waits = {n: p.limit + (LOCAL_GRACE if n == "local" else 0.0) for n, p in probes.items()}
    while True:
        wake.clear()
        left = [waits[n] - (time.monotonic() - t0) for n, p in probes.items() if not p.done.is_set()]
        if not left or max(left) <= 0:
            break
        wake.wait(min(x for x in left if x > 0))
    rows = []
    out = []
    for info in infos:
        status, detail = "not installed", info.hint
        probe = probes.get(info.name)
        if probe is not None:
            if probe.give_up():
                status = "not responding"
                detail = f"{probe.doing}, >{probe.limit:g}s"
                old = _registry.unresponsive().get(info.name) if info.name != "local" else None
                if old and old.get("reason"):
                    detail += f"; last answer: {old['reason']}"
            else:
                status, detail = probe.result or ("error", probe.failure or "no answer")
        rows.append([info.name, status, info.version or ("built in" if info.name == "local" else "-"), detail])
        out.append({"name": info.name, "status": status, "version": info.version, "detail": detail})
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print_table(["BACKEND", "STATUS", "VERSION", "DETAIL"], rows,
                    styles={1: lambda v: {"ready": "green", "unavailable": "yellow", "failed to load": "red",
                                          "error": "red", "not responding": "red"}.get(v, "dim")})
    if still_asking():  # a backend that did not answer in time must not hold up the exit either
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _check_one(probe: Any) -> tuple[tuple[str, str], str | None]:
    """``meshrun backends``' question to one backend: ((status, detail), failure or None)."""
    from ._errors import BackendUnavailable
    from ._registry import backend_class, get_backend

    probe.doing = "loading the plugin"
    try:
        backend_class(probe.name)
    except BackendUnavailable as e:
        return ("failed to load", str(e)), None
    try:
        b = get_backend(probe.name)
        probe.doing = "checking availability"
        av = b.check()
    except Exception as e:
        return ("error", f"{type(e).__name__}: {e}"), f"{type(e).__name__}: {e}"
    if not av.ok:
        return ("unavailable", av.reason + (f" (hint: {av.hint})" if av.hint else "")), av.reason or "check failed"
    return ("ready", ", ".join(f"{k}={v}" for k, v in av.detail.items())), None


def cmd_offers(a: argparse.Namespace) -> int:
    from ._placement import cli_offers_timeout, plan, quiet, still_asking
    from ._spec import JobSpec

    spec = JobSpec(command=["true"], backend=a.backend, **_resource_fields(a))
    kw = _plan_kwargs(a)
    if a.backend:
        kw["backends"] = [a.backend]
    # answer within about a second of the command starting: a backend slower than what is left is listed as
    # not answering (a submit waits longer, [placement] offers_timeout)
    if kw.get("timeout") is None and not a.backend:  # one named backend: wait for its answer
        kw["timeout"] = cli_offers_timeout()
    with quiet() if a.json else contextlib.nullcontext():
        p = plan(spec, raise_on_empty=False, **kw)
    if a.json:
        print(json.dumps(p.to_dict(), indent=2))
        rc = 0
    else:
        p.print()
        if any(o.detail.get("source") == "catalog" for o in [*p.offers, *(o for o, _ in p.rejected)]):
            from ._catalog import catalog_info

            print(catalog_info(kw.get("catalog_dir")).age_text())
        rc = 0 if p.chosen is not None else 1
    if still_asking():  # a backend that did not answer in time must not hold up the exit either
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def cmd_tensorboard(a: argparse.Namespace) -> int:
    from ._errors import MeshrunError
    from ._store import get_store
    from ._tracking import tensorboard_logdir

    extra = list(a.tb_args)
    mine = extra[:extra.index("--")] if "--" in extra else extra
    print_only = a.print_only or "--print" in mine  # also after the id
    extra = [x for x in mine if x != "--print"] + (extra[extra.index("--") + 1:] if "--" in extra else [])
    logdir = tensorboard_logdir(get_store(), a.job_or_sweep)
    if print_only:
        print(logdir)
        return 0
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise MeshrunError("meshrun tensorboard needs the tensorboard package: pip install 'meshrun[track]' "
                           f"(or run tensorboard --logdir {logdir} yourself)")
    argv = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, *extra]
    print(f"meshrun: tensorboard --logdir {logdir}", file=sys.stderr)
    sys.stdout.flush()
    os.execv(sys.executable, argv)
    return 0  # pragma: no cover


def cmd_catalog(a: argparse.Namespace) -> int:
    from ._catalog import catalog_info, load_catalog

    if a.action == "update":
        from ._catalog_update import cli_progress, update_catalog

        clouds = [c.strip() for c in a.clouds.split(",") if c.strip()] if a.clouds else None
        r = update_catalog(clouds, source=a.source, progress=None if a.json else cli_progress())
        if a.json:
            print(json.dumps({"folder": str(r.folder), "source": r.source, "fetched": r.fetched,
                              "missing": r.missing}, indent=2))
            return 0
        print(f"updated {r.folder} from {r.source}: {', '.join(sorted(r.fetched))}")
        for cloud, why in sorted(r.missing.items()):
            print(f"  {cloud}: {why}")
        return 0
    info = catalog_info()
    cat = load_catalog()
    if a.json:
        print(json.dumps({"folder": str(info.root) if info.root else None, "kind": info.kind, "as_of": info.as_of,
                          "source": info.source, "clouds": {c: len(v) for c, v in cat.vms.items()},
                          "errors": cat.errors}, indent=2))
        return 0
    print(info.age_text())
    for c, rows in sorted(cat.vms.items()):
        print(f"  {c}: {len(rows)} priced instance types and regions")
    for e in cat.errors:
        print(f"  unreadable: {e}")
    return 0


COMMANDS = {
    "run": cmd_run,
    "ls": cmd_ls,
    "status": cmd_status,
    "logs": cmd_logs,
    "cancel": cmd_cancel,
    "wait": cmd_wait,
    "gpus": cmd_gpus,
    "backends": cmd_backends,
    "offers": cmd_offers,
    "catalog": cmd_catalog,
    "tensorboard": cmd_tensorboard,
    "lease-service": cmd_lease_service,
    "doctor": cmd_doctor,
}


if __name__ == "__main__":  # pragma: no cover
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
