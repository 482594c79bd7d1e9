"""``meshrun bench``: the benchmark from the command line."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, Sequence

from . import _math

EPILOG = """examples:
  meshrun bench                                        # this machine: its GPUs (NCCL), else 2 gloo ranks
  meshrun bench -c all -b 8 -e 8G -f 2 -d bfloat16
  meshrun bench --backend slurm --nodes 2 --gpus-per-node 8 -c all_reduce -e 8G
  meshrun bench --backend slurm --nodes 16 --gpus-per-node 8 --pairwise --pairwise-threshold 0.9
  meshrun bench --gpus-per-node 8 --compare-nccl-tests ~/nccl-tests/build
  meshrun bench --device cpu --procs-per-node 4 -c all -e 1M --json

sizes take nccl-tests' suffixes: 8, 64K, 128M, 8G (binary), or 512MiB / 1GB.
busbw = algbw x 2(n-1)/n (all_reduce), (n-1)/n (all_gather, reduce_scatter, alltoall), 1 (broadcast,
sendrecv); algbw = size / time; GB/s = 1e9 bytes per second.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshrun bench",
        description="Collective bandwidth benchmark (nccl-tests' time, algbw, busbw), run as a meshrun job.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w = p.add_argument_group("what to measure")
    w.add_argument("-c", "--collectives", default="all_reduce",
                   help=f"comma list or 'all' ({', '.join(_math.COLLECTIVES)}); default all_reduce")
    w.add_argument("-b", "--min-bytes", default="8", help="smallest size (default 8)")
    w.add_argument("-e", "--max-bytes", default=None, help="largest size (default 128M on GPUs, 1M on CPUs)")
    w.add_argument("-f", "--factor", type=int, default=2, help="multiply the size by this each step (default 2)")
    w.add_argument("-i", "--step-bytes", default=None, help="add this to the size each step (with -f 1)")
    w.add_argument("-d", "--dtype", default="float32", help=f"element type ({', '.join(_math.DTYPES)})")
    w.add_argument("-w", "--warmup", type=int, default=5, help="warm-up calls per size and mode (default 5)")
    w.add_argument("-n", "--iters", type=int, default=20, help="timed calls per size and mode (default 20)")
    w.add_argument("--mode", default="both", choices=["both", "in-place", "out-of-place"],
                   help="in-place, out-of-place or both (default)")
    w.add_argument("-a", "--average", default="avg", choices=["avg", "min", "max", "rank0"],
                   help="how per-rank times are reduced (nccl-tests' -a; default avg)")
    w.add_argument("--no-check", dest="check", action="store_false", help="skip the correctness check")
    w.add_argument("--graph", default="auto", choices=["auto", "on", "off"],
                   help="launch the timed calls as one CUDA graph: auto (below 64 MiB), on, off")
    w.add_argument("--timer", default="events", choices=["events", "wall"],
                   help="GPU time from CUDA events after a common start (default), or the host clock")
    w.add_argument("--no-nccl-info", dest="nccl_info", action="store_false",
                   help="do not read NCCL's algorithm/protocol choice from its debug log")
    w.add_argument("--timeout", type=float, default=600.0,
                   help="seconds for the rendezvous and for any one collective (default 600)")

    pw = p.add_argument_group("slow-link hunt")
    pw.add_argument("--pairwise", nargs="?", const="auto", default=None, choices=["auto", "nodes", "gpus"],
                    help="sendrecv between every pair of nodes (auto with several nodes) or GPUs")
    pw.add_argument("--pairwise-bytes", default=None, help="size of each pairwise exchange (default 64M; 1M on CPUs)")
    pw.add_argument("--pairwise-threshold", type=float, default=0.8,
                    help="flag pairs below this fraction of the median busbw (default 0.8)")

    nt = p.add_argument_group("comparison")
    nt.add_argument("--compare-nccl-tests", metavar="PATH", default=None,
                    help="nccl-tests' build folder (or one *_perf binary) on the node: run it with the same sweep")

    wh = p.add_argument_group("where")
    wh.add_argument("--backend", "-B", default=None, help="meshrun backend (default: placement chooses; usually local)")
    wh.add_argument("--nodes", "-N", type=int, default=1, help="nodes (default 1)")
    wh.add_argument("--gpus-per-node", "-g", type=int, default=None, help="GPUs per node (one rank each)")
    wh.add_argument("--procs-per-node", "-p", type=int, default=None, help="gloo ranks per node on CPUs (default 2)")
    wh.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                    help="cuda (NCCL), cpu (gloo) or auto (GPUs when there are some)")
    wh.add_argument("--gpu-type", default=None, help='GPU model to ask for, e.g. "H100"')
    wh.add_argument("--time", dest="time_limit", default=None, help='job time limit, e.g. "30m"')
    wh.add_argument("--env", "-E", action="append", default=[], metavar="KEY=VALUE",
                    help="environment variable for the job (repeatable), e.g. NCCL_IB_HCA=mlx5")
    wh.add_argument("--name", default=None, help="job name")

    o = p.add_argument_group("output")
    o.add_argument("--out", "-o", default=None, help="folder for the files (default: the job's folder, bench/)")
    o.add_argument("--json", action="store_true", help="print JSON lines instead of the table")
    o.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw the PNG")
    o.add_argument("--quiet", "-q", action="store_true", help="do not show the job's progress (start-up lines, errors) while it runs")
    return p


#: a result row of the worker's table: size, count, type, ... (the final report prints the whole table)
_ROW = re.compile(r"^\s+(\d+)\s+\d+\s+\S+")


class _Progress:
    """The job's output while it runs, less the result table that the final report prints: table lines
    become one status line (rewritten in place on a terminal); anything else (node start-up, errors,
    warnings) passes through as it is."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.pending = ""
        self.collective = ""
        self.status_shown = False

    def __call__(self, chunk: str) -> None:
        self.pending += chunk
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.line(line)

    def line(self, line: str) -> None:
        if line.startswith("#"):
            head = line[1:].strip()
            if head and " " not in head and not head.startswith(("(", "-")):
                self.collective = head  # "# all_reduce" starts a collective's table
            return
        m = _ROW.match(line)
        if m:
            if self.tty:
                self.stream.write(f"\r\x1b[K[bench] {self.collective} {m.group(1)} B")
                self.stream.flush()
                self.status_shown = True
            return
        self.clear()
        self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.status_shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.status_shown = False

    def close(self) -> None:
        if self.pending:
            self.line(self.pending)
            self.pending = ""
        self.clear()


def main(argv: Sequence[str] | None = None) -> int:
    from .._errors import MeshrunError
    from ._api import run

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    env = {}
    for item in args.env:
        k, sep, v = item.partition("=")
        if not sep or not k:
            print(f"meshrun bench: error: --env expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        env[k] = v
    pairwise: Any = args.pairwise
    if pairwise == "auto":
        pairwise = True
    kw: dict[str, Any] = dict(
        min_bytes=args.min_bytes, factor=args.factor, step_bytes=args.step_bytes, dtype=args.dtype,
        warmup=args.warmup, iters=args.iters, modes=args.mode, device=args.device, backend=args.backend,
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node,
        gpu_type=args.gpu_type, graph=args.graph, timer=args.timer, average=args.average, check=args.check,
        pairwise=pairwise,
        pairwise_bytes=args.pairwise_bytes, pairwise_threshold=args.pairwise_threshold,
        compare_nccl_tests=args.compare_nccl_tests, nccl_info=args.nccl_info, env=env, timeout=args.timeout,
        time_limit=args.time_limit, name=args.name, out_dir=args.out, plot=args.plot,
    )
    progress = None if (args.quiet or args.json) else _Progress()
    kw["progress"] = progress or False
    if args.max_bytes is not None:
        kw["max_bytes"] = args.max_bytes
    if args.backend in (None, "local"):
        import importlib.util

        if importlib.util.find_spec("torch") is None:  # the job would only fail with an import error
            print(f"meshrun bench: error: the benchmark runs PyTorch collectives and {sys.executable} has no "
                  "torch: pip install torch (or name a backend whose machines have it: --backend)", file=sys.stderr)
            return 2
    try:
        res = run(args.collectives, **kw)
    except MeshrunError as e:
        print(f"meshrun bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if progress is not None:
            progress.close()
    if args.json:
        sys.stdout.write(res.to_jsonl())
    else:
        sys.stdout.write(res.report())
        sys.stdout.write("# files: " + "  ".join(f"{k}={v}" for k, v in res.files.items()) + "\n")
    sys.stdout.flush()
    if not res.ok:
        print(f"meshrun bench: {res.wrong} wrong element(s): the results are not correct", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
