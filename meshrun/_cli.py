"""The ``meshrun`` command: run, show, ls, status, logs, cancel, gpus, backends, offers, catalog, doctor, bench,
data."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from ._display import is_terminal, print_kv, print_table, safe_text, state_style
from ._units import format_duration, format_size

TYPE_CHECKING = False  # typing is not imported at run time (the CLI must start fast)
if TYPE_CHECKING:
    import argparse
    from typing import Any, Callable, Sequence

EPILOG = """examples:
  meshrun run --gpus 2 -- python train.py --lr 0.1
  meshrun run -d --name sweep -- bash -c 'echo $HOSTNAME'
  meshrun run task.yaml --env HF_TOKEN       (a SkyPilot task YAML or a dstack .dstack.yml)
  meshrun run --input s3://lab-data/set/=data/ --output 'out/=s3://lab-out/run1/;on=success,failure' -- ./train.sh
  meshrun show --native -b slurm task.yaml   (what the backend would submit)
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
    g.add_argument("--offers-timeout", dest="offers_timeout", type=float, metavar="SECONDS",
                   help="the longest a backend's offers are waited for (offers: about 1s; run: 10s, but a "
                        "backend not named alone is skipped as not responding after [placement] respond_within, 1s)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("object-store data (docs/data.md)")
    g.add_argument("--input", dest="inputs", action="append", default=[], metavar="URL=PATH",
                   help="an object (s3://bucket/key) or a prefix (s3://bucket/prefix/) the job reads, downloaded "
                        "to PATH under its working directory before it starts, through the node's cache "
                        "(repeatable; the last = separates URL and PATH)")
    g.add_argument("--output", dest="outputs", action="append", default=[], metavar="PATH=URL[;on=WHEN,..][;every=T]",
                   help="a file or folder the job writes, uploaded to URL (s3://bucket/prefix/) when it ends; "
                        "on=: the ends that upload it (success, failure, cancel; default success); every=: also "
                        "while it runs, e.g. 15m (repeatable; quote it: ; is the shell's too)")


def _data_fields(a: argparse.Namespace) -> dict[str, Any]:
    """``inputs``/``outputs`` from --input/--output (only those given); a bad one is a SpecError naming it."""
    if not (getattr(a, "inputs", None) or getattr(a, "outputs", None)):
        return {}
    from ._data import DataError, parse_flags
    from ._errors import SpecError

    try:
        inputs, outputs = parse_flags(a.inputs, a.outputs)
    except DataError as e:
        raise SpecError(e.field, e.message) from None
    return {k: v for k, v in (("inputs", inputs), ("outputs", outputs)) if v}


def _plan_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """The placement flags given, as PlacementOptions keywords (each flag's dest is its option's name)."""
    from ._options import FIELDS

    return {k: v for k in FIELDS if (v := getattr(a, k, None)) is not None}


def _args_run(sub: Any) -> None:
    import argparse

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
    _add_data_args(r)
    _add_placement_args(r)
    r.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- COMMAND [ARGS...], or a job file: a SkyPilot task YAML or a dstack task (.dstack.yml)")


def _args_show(sub: Any) -> None:
    sh = sub.add_parser("show", help="what meshrun reads from a job file, or (--native) what a backend would submit",
                        description="Print the JobSpec meshrun reads from FILE (a SkyPilot task YAML, a dstack task, "
                                    "or a JobSpec as JSON); with --native, what the backend would submit for it "
                                    "(sbatch script, SkyPilot task YAML, dstack run spec, Kubernetes manifests), "
                                    "without submitting anything. Secret values are never shown.")
    sh.add_argument("file", metavar="FILE")
    sh.add_argument("--native", action="store_true", help="print what the backend would submit")
    sh.add_argument("--backend", "-b", help="the backend (default: the one placement would choose)")
    sh.add_argument("--env", "-e", action="append", default=[], metavar="KEY=VALUE", help="environment variable")


def _args_ls(sub: Any) -> None:
    ls = sub.add_parser("ls", help="list jobs")
    ls.add_argument("--limit", "-l", type=int, default=30, help="show at most this many jobs, newest first "
                    "(default 30; 0: all)")
    ls.add_argument("--state", "-s", action="append", help="only jobs in this state (repeatable)")
    ls.add_argument("--json", action="store_true")


def _args_tensorboard(sub: Any) -> None:
    import argparse

    tb = sub.add_parser("tensorboard", help="start TensorBoard over a job's or a sweep's log folders",
                        epilog="Arguments after the id go to tensorboard (e.g. --port 6007).")
    tb.add_argument("job_or_sweep", help="a job id, or the sweep id of a .map (its jobs' WANDB_RUN_GROUP)")
    tb.add_argument("--print", dest="print_only", action="store_true", help="print the log folder and exit")
    tb.add_argument("tb_args", nargs=argparse.REMAINDER)


def _args_status(sub: Any) -> None:
    st = sub.add_parser("status", help="show one job in detail")
    st.add_argument("job_id")
    st.add_argument("--json", action="store_true")


def _args_logs(sub: Any) -> None:
    lg = sub.add_parser("logs", help="print a job's output")
    lg.add_argument("job_id")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    lg.add_argument("--tail", "-n", type=int, metavar="LINES", help="start at the last LINES lines")
    lg.add_argument("--max-bytes", metavar="SIZE", help='at most this much from the end, e.g. "1MiB" or 4096')


def _args_cancel(sub: Any) -> None:
    c = sub.add_parser("cancel", help="cancel jobs (the whole process tree; frees their GPUs)")
    c.add_argument("job_ids", nargs="+")


def _args_wait(sub: Any) -> None:
    w = sub.add_parser("wait", help="wait for jobs to end; exit code 0 if all succeeded")
    w.add_argument("job_ids", nargs="+")
    w.add_argument("--timeout", type=float)


def _args_gpus(sub: Any) -> None:
    g = sub.add_parser("gpus", help="who holds which GPU on this machine (or a backend's hosts)")
    g.add_argument("--json", action="store_true")
    g.add_argument("--backend", "-b", default="local", help="local (default) or a backend with hosts, e.g. ssh")


def _args_backends(sub: Any) -> None:
    b = sub.add_parser("backends", help="installed backends and whether they can be used")
    b.add_argument("--json", action="store_true")
    b.add_argument("--fresh", action="store_true",
                   help=f"check every backend now (otherwise a check younger than {BACKENDS_TTL:g}s is shown, "
                        "with its age)")


def _args_offers(sub: Any) -> None:
    o = sub.add_parser("offers", help="where a job of this shape could run, ranked")
    _add_resource_args(o)
    _add_data_args(o)
    _add_placement_args(o)
    o.add_argument("--json", action="store_true")


def _args_catalog(sub: Any) -> None:
    cat = sub.add_parser("catalog", help="the cloud price catalog: which one is used, how old; update it",
                         description="Cloud prices come from SkyPilot-format catalog tables. A dated snapshot ships "
                                     "with meshrun; `meshrun catalog update` fetches current ones.")
    cat.add_argument("action", nargs="?", choices=["show", "update"], default="show",
                     help="show (default): the catalog in use, its age and clouds; update: fetch current tables")
    cat.add_argument("--clouds", help="update: comma-separated clouds to fetch (default: the GPU clouds)")
    cat.add_argument("--source", help="update: base URL of a catalogs/v8 folder (default: $MESHRUN_CATALOG_URL or "
                                      "SkyPilot's public catalog repository)")
    cat.add_argument("--json", action="store_true")


def _args_lease_service(sub: Any) -> None:
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


def _args_doctor(sub: Any) -> None:
    dr = sub.add_parser("doctor", help="check the job store, GPU leases, fork server, backends and GPU tools")
    dr.add_argument("--rebuild", action="store_true",
                    help="rebuild the job index from the job folders (the old file is kept beside it)")
    dr.add_argument("--json", action="store_true")


def _args_bench(sub: Any) -> None:
    import argparse

    be = sub.add_parser("bench", help="collective bandwidth benchmark (nccl-tests compatible busbw)",
                        add_help=False)
    be.add_argument("bench_args", nargs=argparse.REMAINDER)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``meshrun`` parser, with every subcommand (``meshrun --help``) or, given ``only``, with that one
    alone: a command line that names its subcommand parses the same either way, without building ~15
    subparsers and their help first (a good part of a CLI start). Built once per process (the warm command
    server builds the served ones before it forks: its children parse at once)."""
    if only in _PARSERS:
        return _PARSERS[only]
    import argparse

    from ._version import __version__

    p = argparse.ArgumentParser(
        prog="meshrun",
        description="Define a job once; run it on this machine, SSH workstations, Slurm, Kubernetes or the cloud.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"meshrun {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    for name, (add_args, _) in COMMANDS.items():
        if only is None or name == only:
            add_args(sub)
    _PARSERS[only] = p
    return p


_PARSERS: dict[str | None, argparse.ArgumentParser] = {}


# The reading commands' command lines, parsed without argparse (importing it and building a parser is a good
# part of a start these commands must keep short): each command's options as {flag: (dest, kind)} with kind
# bool (a switch), int, float, str or list (repeatable), its defaults, and its positional (a name; "+": one or
# more). Only plain command lines take this path: an unknown or abbreviated flag, "--flag=value", a value or
# argument that starts with "-", "--", -h or a missing argument go to argparse, which then answers exactly as
# it always did. tests/test_cli_fast_paths.py checks that both parse every such command line alike.
_FAST: dict[str, tuple[dict[str, tuple[str, Any]], dict[str, Any], tuple[str, str] | None]] = {
    "ls": ({"--limit": ("limit", int), "-l": ("limit", int), "--state": ("state", list), "-s": ("state", list),
            "--json": ("json", bool)}, {"limit": 30, "state": None, "json": False}, None),
    "status": ({"--json": ("json", bool)}, {"json": False}, ("job_id", "1")),
    "logs": ({"--follow": ("follow", bool), "-f": ("follow", bool), "--tail": ("tail", int), "-n": ("tail", int),
              "--max-bytes": ("max_bytes", str)}, {"follow": False, "tail": None, "max_bytes": None}, ("job_id", "1")),
    "cancel": ({}, {}, ("job_ids", "+")),
    "wait": ({"--timeout": ("timeout", float)}, {"timeout": None}, ("job_ids", "+")),
    "gpus": ({"--json": ("json", bool), "--backend": ("backend", str), "-b": ("backend", str)},
             {"json": False, "backend": "local"}, None),
    "backends": ({"--json": ("json", bool), "--fresh": ("fresh", bool)}, {"json": False, "fresh": False}, None),
}


def _fast_args(argv: list[str]) -> Any:
    """``argv`` of a reading command parsed as argparse would parse it (a ``types.SimpleNamespace`` with the
    same attributes as argparse's Namespace), or None: let argparse do it."""
    if not argv or argv[0] not in _FAST:
        return None
    flags, defaults, positional = _FAST[argv[0]]
    out: dict[str, Any] = dict(defaults)
    args: list[str] = []
    block = 0  # runs of positional arguments: argparse takes a "+" positional only as one run
    i, last_positional = 1, False
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("-"):
            if tok not in flags:
                return None
            dest, kind = flags[tok]
            if kind is bool:
                out[dest] = True
            else:
                if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                    return None
                value = argv[i + 1]
                try:
                    out[dest] = ([*(out[dest] or []), value] if kind is list else kind(value))
                except ValueError:
                    return None
                i += 1
            last_positional = False
        else:
            if not last_positional:
                block += 1
            args.append(tok)
            last_positional = True
        i += 1
    if positional is None:
        if args:
            return None
    else:
        name, nargs = positional
        if not args or block > 1 or (nargs == "1" and len(args) > 1):
            return None
        out[name] = args[0] if nargs == "1" else args
    from types import SimpleNamespace

    return SimpleNamespace(cmd=argv[0], **out)


def main(argv: Sequence[str] | None = None) -> int:
    """``meshrun ARGV``. Run as a program (no ``argv``), ``run`` and ``offers`` go through this user's warm
    command server when one answers (meshrun/_cliclient.py)."""
    program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # every argument after the word goes to its own parser
        from .bench._cli import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "dashboard":  # likewise (an optional extra: nothing of it loads otherwise)
        from ._dashboard import main as dashboard_main

        return dashboard_main(argv[1:])
    if argv and argv[0] == "usage":  # likewise: meshrun/_usage.py parses its own options
        return cmd_usage(argv[1:])
    if program and argv and argv[0] in ("run", "offers"):  # _cliclient.SERVED (not imported for the others)
        from . import _cliclient

        if _cliclient.enabled():
            rc = _cliclient.call(argv)
            if rc is not None:
                return rc
            try:
                return _main(argv)
            finally:
                _cliclient.start()  # warm for the next command
    return _main(argv)


def _main(argv: list[str]) -> int:
    args = _fast_args(argv)
    if args is None:
        parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
        args = parser.parse_args(argv)
    if not args.cmd:
        parser.print_help()
        return 2
    from ._errors import JobNotFound, MeshrunError

    try:
        return int(COMMANDS[args.cmd][1](args) or 0)
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
    explicit = bool(command) and command[0] == "--"
    if explicit:
        command = command[1:]
    if not command:
        raise SpecError("command", "nothing to run: give the command after --, e.g. meshrun run -- python train.py")
    job_file = not explicit and _is_job_file(command[0])
    if job_file and len(command) > 1:  # `meshrun run task.yaml --env K=V`: flags after the file, as sky takes them
        a = _more_run_flags(a, command[1:])
    env = {}
    for item in a.env:
        k, sep, v = item.partition("=")
        if not sep:
            raise SpecError("env", f"expected KEY=VALUE, got {item!r}")
        env[k] = v
    fields: dict[str, Any] = {**_resource_fields(a), **_data_fields(a)}
    if a.name:
        fields["name"] = a.name
    if a.workdir:
        fields["workdir"] = a.workdir
    if a.setup:
        fields["setup"] = a.setup
    if a.track is not None:
        fields["track"] = False if a.track.strip().lower() in ("none", "") else a.track
    if job_file:
        from ._jobfile import specs_from_job_file

        specs = [_override(s, fields) for s in specs_from_job_file(command[0], env=env)]
    else:
        if env:
            fields["env"] = env
        specs = [JobSpec(command=" ".join(command) if a.shell else command, **fields)]
    if len(specs) > 1 and a.detach:
        raise SpecError("detach", f"{command[0]} is a pipeline of {len(specs)} tasks, run as a chain (each starts "
                        "when the previous one succeeded): leave out --detach so meshrun can start each in turn")
    from ._gather import quiet

    rc = 0
    for i, spec in enumerate(specs):
        with quiet() if a.json else contextlib.nullcontext():  # --json: stdout and stderr stay machine-readable
            job = _scheduler.submit(spec, backend=a.backend, **_plan_kwargs(a))
        if a.detach:
            if a.json:
                print(json.dumps(_job_json(job)))
            else:
                print(job.id)
            return 0
        step = f" (task {i + 1} of {len(specs)})" if len(specs) > 1 else ""
        print(f"meshrun: job {job.id}{step} submitted to {job.backend}", file=sys.stderr)
        rc = _follow(job)
        if rc != 0:
            if i + 1 < len(specs):
                print(f"meshrun: the pipeline stops here; {len(specs) - i - 1} task(s) not started", file=sys.stderr)
            return rc
    return rc


def cmd_show(a: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from . import _scheduler
    from ._errors import SpecError
    from ._backend import Feature
    from ._gather import spec_for_offer
    from ._registry import get_backend
    from ._spec import JobSpec
    from ._store import Store

    env = dict(item.partition("=")[::2] for item in a.env)
    if a.file.endswith(".json"):
        try:
            specs = [JobSpec.from_json(Path(a.file).read_text())]
        except OSError as e:
            raise SpecError("", f"cannot read {a.file}: {e.strerror or e}") from None
        if env:
            specs = [specs[0].replace(env={**specs[0].env, **env})]
    else:
        from ._jobfile import specs_from_job_file

        specs = specs_from_job_file(a.file, env=env)
    for i, spec in enumerate(specs):
        if len(specs) > 1:
            print(f"# task {i + 1} of {len(specs)}")
        if not a.native:
            print(spec.to_json(indent=2))
            continue
        if a.backend:  # that backend's rendering, whether or not it is up now (no offer: its defaults)
            name, offer = a.backend, None
            if spec.secrets and Feature.SECRETS not in get_backend(name).features:
                raise SpecError("secrets", f"the {name} backend cannot pass secrets to a job without writing them "
                                "down, so it would not be given this job")
        else:
            name, offer, _ = _scheduler.choose(spec)
        spec = spec_for_offer(spec, offer)
        with tempfile.TemporaryDirectory(prefix="meshrun-show-") as tmp:
            sub = _scheduler.prepare(spec, store=Store(tmp), backend=name).submission
            try:
                text = get_backend(name).native(sub, offer)
            except NotImplementedError as e:
                raise SpecError("backend", str(e)) from None
        print(f"# what the {name} backend would submit" + (f" ({offer.key})" if offer is not None else ""))
        print(text.rstrip("\n"))
    return 0


def _is_job_file(arg: str) -> bool:
    return arg.endswith((".yaml", ".yml")) and os.path.isfile(arg)


def _more_run_flags(a: argparse.Namespace, rest: list[str]) -> argparse.Namespace:
    """The run flags given after a job file, merged into ``a`` (repeatable ones add to those before)."""
    import argparse

    from ._errors import SpecError

    more = build_parser("run").parse_args(["run", *rest])
    if more.command:
        raise SpecError("command", f"a job file takes no command after it; got {' '.join(more.command)!r} "
                        "(flags go before or after the file)")
    merged = argparse.Namespace(**vars(a))
    for k, v in vars(more).items():
        if k in ("cmd", "command"):
            continue
        if isinstance(v, list) and isinstance(getattr(a, k, None), list):
            setattr(merged, k, [*getattr(a, k), *v])
        elif v not in (None, False, []):
            setattr(merged, k, v)
    return merged


def _override(spec: Any, fields: dict[str, Any]) -> Any:
    """A job file's spec with the command line's fields over it. A new resource request replaces the file's
    (what it kept for SkyPilot or dstack included)."""
    if not fields:
        return spec
    gpu: dict[str, tuple[str, ...]] = {"skypilot": ("accelerators", "any_of", "ordered", "instance_type"),
                                       "dstack": ("resources",)}
    kept: dict[str, dict[str, tuple[str, ...]]] = {"gpus": gpu, "gpu_type": gpu, "cpus": {"skypilot": ("cpus",), "dstack": ("resources",)},
            "memory": {"skypilot": ("memory",), "dstack": ("resources",)}}
    drop = {(b, k) for field, by in kept.items() if field in fields for b, keys in by.items() for k in keys}
    if drop:
        options = {b: {k: v for k, v in o.items() if (b, k) not in drop} for b, o in spec.backend_options.items()}
        spec = spec.replace(backend_options=options)
    return spec.replace(**fields)


def _follow(job: Any) -> int:
    """Stream a job's output while it runs; Ctrl-C detaches (the job keeps running)."""
    from ._state import JobState

    shown_state = None
    status_line = is_terminal(sys.stderr)
    wake = None
    if job.backend == "local":  # its supervisor runs here: its exit (the job's end) wakes the wait below
        from ._agent import ExitWatch

        wake = ExitWatch(job.job_dir)
    try:
        start = time.monotonic()
        nap = 0.002  # a job that starts at once is seen at once (every 2 ms for 0.1 s); then backing off to 1 s
        while True:
            st = job.advance()  # waiting: a job pending past max_pending moves on
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
            pause = min(nap, 1.0, 0.05 + (time.monotonic() - start) / 20)
            wake.wait(pause) if wake is not None else time.sleep(pause)
            if time.monotonic() - start > 0.1:
                nap *= 1.5
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
    finally:
        if wake is not None:
            wake.close()
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
    from ._state import JobState
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
    from ._state import JobState
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
    if a.backend == "local":  # this machine: straight from the agent, without loading any backend
        from ._localenv import local_gpus

        snaps: Any = local_gpus()
    else:
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
        rows.append([str(g.get("label", g["index"])), g.get("name") or "-", format_size(g.get("memory")), holder, job, since,
                     g.get("uuid", "")])
    title = f"{host} ({snap.get('source')})" if many or snap.get("source") else host
    if snap.get("mode"):
        title += f", leases: {snap['mode']}"
    print_table(["GPU", "NAME", "MEMORY", "HOLDER", "JOB / PROCESSES", "SINCE", "UUID"], rows, title=title,
                styles={3: lambda v: "green" if v == "free" else ("red" if v == "foreign" else "yellow")})
    for note in snap.get("notes") or []:
        print(safe_text(note))
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


BACKENDS_TTL = 60.0  # seconds `meshrun backends` shows the last check instead of checking again


def _backends_cache() -> str:
    from ._config import get_config

    return str(get_config().home / "backends-checked.json")


def _backends_seen() -> list[Any]:
    """What a kept ``meshrun backends`` answer depends on, cheaply: this interpreter, its import path, when
    each site-packages folder last changed (a backend installed or removed) and the config file's state."""
    from ._config import config_path

    seen: list[Any] = [sys.executable, list(sys.path)]
    for p in sys.path:
        if p.endswith(("site-packages", "dist-packages")):
            try:
                seen.append(os.stat(p).st_mtime_ns)
            except OSError:
                seen.append(None)
    try:
        st = os.stat(config_path())
        seen.append([str(config_path()), st.st_mtime_ns, st.st_size])
    except OSError:
        seen.append(None)
    import hashlib

    # the settings that come from the environment (hashed: some are tokens)
    mine = sorted((k, v) for k, v in os.environ.items() if k.startswith(("MESHRUN_", "SKYPILOT_", "DSTACK_", "KUBECONFIG",
                                                                          "SLURM_CONF", "PATH")))
    seen.append(hashlib.sha256(json.dumps(mine).encode()).hexdigest())
    return seen


def _print_backends(out: list[dict[str, Any]], as_json: bool, checked_at: float, cached: bool) -> None:
    if as_json:
        print(json.dumps([dict(r, checked_at=checked_at) for r in out] if cached else out, indent=2))
        return
    rows = [[r["name"], r["status"], r["version"] or ("built in" if r["name"] == "local" else "-"), r["detail"]]
            for r in out]
    print_table(["BACKEND", "STATUS", "VERSION", "DETAIL"], rows,
                styles={1: lambda v: {"ready": "green", "unavailable": "yellow", "failed to load": "red",
                                      "error": "red", "not responding": "red"}.get(v, "dim")})
    if cached:
        print(f"checked {format_duration(max(0.0, time.time() - checked_at))} ago "
              "(meshrun backends --fresh checks again)")


def cmd_backends(a: argparse.Namespace) -> int:
    """Every backend and whether it can be used. Each installed one is loaded and checked in its own thread;
    one that has not answered within ``[placement] respond_within`` (1 s; this machine gets 2 s more) is
    shown as not responding and remembered so (a later answer forgets it), so this answers within ~2 s.
    The result is kept for ``BACKENDS_TTL`` seconds: a second ``meshrun backends`` within that time shows it,
    with its age, without loading a single plugin (``--fresh`` checks again)."""
    if not a.fresh:
        try:  # read here, not with the agent's read_json: importing the agent is most of a cached answer's time
            with open(_backends_cache(), "rb") as f:
                kept = json.loads(f.read().decode())
        except (OSError, ValueError):
            kept = None
        if (isinstance(kept, dict) and isinstance(kept.get("rows"), list) and kept.get("seen") == _backends_seen()
                and 0 <= time.time() - float(kept.get("time") or 0) < BACKENDS_TTL):
            _print_backends(kept["rows"], a.json, float(kept["time"]), cached=True)
            return 0
    import threading

    from . import _agent, _registry
    from ._gather import LOCAL_GRACE, still_asking
    from ._options import respond_limits

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
        out.append({"name": info.name, "status": status, "version": info.version, "detail": detail})
    _print_backends(out, a.json, time.time(), cached=False)
    if all(r["status"] not in ("not responding", "error") for r in out):  # a backend still asked: ask again
        try:
            os.makedirs(os.path.dirname(_backends_cache()), mode=0o700, exist_ok=True)
            _agent.write_json(_backends_cache(), {"time": time.time(), "seen": _backends_seen(), "rows": out},
                              mode=0o600)
        except OSError:
            pass  # a read-only home: the next call checks again
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
    from ._gather import cli_offers_timeout, quiet, still_asking
    from ._options import PlacementOptions
    from ._placement import plan
    from ._spec import JobSpec

    spec = JobSpec(command=["true"], backend=a.backend, **_resource_fields(a), **_data_fields(a))
    kw = _plan_kwargs(a)
    if a.backend:
        kw["backends"] = [a.backend]
    # answer within about a second of the command starting: a backend slower than what is left is listed as
    # not answering (a submit waits longer, [placement] offers_timeout)
    if kw.get("offers_timeout") is None and not a.backend:  # one named backend: wait for its answer
        kw["offers_timeout"] = cli_offers_timeout()
    with quiet() if a.json else contextlib.nullcontext():
        p = plan(spec, raise_on_empty=False, options=PlacementOptions.of(**kw))
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
        from ._install import extra_hint

        raise MeshrunError(f"meshrun tensorboard needs the tensorboard package: {extra_hint('track')} "
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


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench._cli import main as bench_main

    return bench_main(list(a.bench_args))


def _args_data(sub: Any) -> None:
    d = sub.add_parser("data", help="this machine's object-store data cache: size, use, pruning (docs/data.md)")
    dsub = d.add_subparsers(dest="data_cmd", metavar="ACTION", required=True)
    c = dsub.add_parser("cache", help="show this machine's data cache, or prune it",
                        description="The cache of staged inputs on THIS machine, for this user (MESHRUN_DATA_CACHE, "
                                    "else ~/.cache/meshrun/data): objects, size, what jobs' inputs still link, "
                                    "partial downloads, the oldest use and the limits. Each node has its own: run it "
                                    "there to see or prune a node's.")
    c.add_argument("--prune", nargs="?", const="", default=None, metavar="SIZE",
                   help="remove the least recently used objects no job's input links until the cache holds at "
                        "most SIZE (e.g. 50G, 20%% of its file system, 0 for all it may remove); without SIZE, "
                        "down to its limits (MESHRUN_DATA_CACHE_MAX, MESHRUN_DATA_CACHE_FREE); partial downloads "
                        "untouched for a day go too")
    c.add_argument("--json", action="store_true")


def cmd_data(a: argparse.Namespace) -> int:
    from . import _stage
    from ._errors import MeshrunError

    root = _stage.cache_root()
    if not os.path.isdir(os.path.join(root, "objects")):
        if a.json:
            print(json.dumps({"root": root, "objects": 0, "bytes": 0}))
        else:
            print(f"no data cache at {root} on this machine yet")
        return 0
    try:
        cache = _stage.Cache(root)
        pruned = None
        if a.prune is not None:
            target = None
            if a.prune:
                target = _stage.parse_limit(a.prune, _stage.limits(cache)["total"], "--prune", none=False)
            pruned = _stage.evict(cache, target=target, scan=True)
        r = _stage.report(cache)
    except _stage.StageError as e:
        raise MeshrunError(str(e)) from None
    if a.json:
        print(json.dumps({**r, "pruned": pruned}, indent=2))
        return 0
    lim = r["limits"]
    if pruned is not None:
        print(f"removed {pruned['objects']} object(s), {format_size(pruned['bytes'])}"
              + (f"; {format_size(pruned['short'])} more is in use (linked from jobs' inputs) or being staged"
                 if pruned["short"] else ""))
    print_kv([
        ("cache", f"{r['root']} (this machine's)"),
        ("objects", f"{r['objects']}, {format_size(r['bytes'])}"),
        ("in use", f"{r['linked_objects']}, {format_size(r['linked_bytes'])} (linked from jobs' inputs: not "
                   "removed while linked)"),
        ("partial", f"{r['partial_files']} file(s), {format_size(r['partial_bytes'])}"),
        ("oldest use", _age(r["oldest_use"])),
        ("limit", "none" if lim["max"] is None else format_size(lim["max"])),
        ("keep free", f"{format_size(lim['free'])} of {format_size(lim['total'])} "
                      f"({format_size(lim['available'])} free now)"),
    ])
    return 0


def _args_dashboard(sub: Any) -> None:
    import argparse

    sub.add_parser("dashboard", help="a web dashboard of jobs, GPUs, offers and bench results (docs/dashboard.md)",
                   add_help=False).add_argument("dashboard_args", nargs=argparse.REMAINDER)


def cmd_dashboard(a: argparse.Namespace) -> int:
    from ._dashboard import main as dashboard_main

    return dashboard_main(list(a.dashboard_args))


def _args_usage(sub: Any) -> None:
    import argparse

    sub.add_parser("usage", help="GPU-hours by user, host, GPU type and sweep; waits, idle GPUs, spend, fair share",
                   add_help=False).add_argument("usage_args", nargs=argparse.REMAINDER)


def cmd_usage(a: Any) -> int:
    from ._usage import main as usage_main

    return usage_main(a if isinstance(a, list) else list(a.usage_args))


# Every subcommand: its name -> (the function that adds its subparser, the function that runs it), in the
# order ``meshrun --help`` lists them. A new subcommand is a ``_args_<name>(sub)`` that calls
# ``sub.add_parser("<name>", ...)``, a ``cmd_<name>(args) -> int``, and one line here; only the subcommand a
# command line names is built, so it costs the other commands nothing.
COMMANDS: dict[str, tuple[Callable[[Any], None], Callable[[argparse.Namespace], int]]] = {
    "run": (_args_run, cmd_run),
    "show": (_args_show, cmd_show),
    "ls": (_args_ls, cmd_ls),
    "tensorboard": (_args_tensorboard, cmd_tensorboard),
    "status": (_args_status, cmd_status),
    "logs": (_args_logs, cmd_logs),
    "cancel": (_args_cancel, cmd_cancel),
    "wait": (_args_wait, cmd_wait),
    "gpus": (_args_gpus, cmd_gpus),
    "backends": (_args_backends, cmd_backends),
    "offers": (_args_offers, cmd_offers),
    "catalog": (_args_catalog, cmd_catalog),
    "lease-service": (_args_lease_service, cmd_lease_service),
    "doctor": (_args_doctor, cmd_doctor),
    "bench": (_args_bench, cmd_bench),
    "data": (_args_data, cmd_data),
    "dashboard": (_args_dashboard, cmd_dashboard),
    "usage": (_args_usage, cmd_usage),
}


if __name__ == "__main__":  # pragma: no cover
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
