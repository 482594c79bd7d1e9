"""One rank of the benchmark: ``python -m meshrun.bench._worker RUN_DIR``.

Started by the node launcher (``_node.py``) once per GPU (NCCL) or ``procs_per_node`` times (gloo) on each
node, with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, NODE_RANK, NNODES, MASTER_ADDR and MASTER_PORT
in its environment. Reads ``RUN_DIR/options.json``; global rank 0 writes ``RUN_DIR/result.json``; a rank
that fails writes ``RUN_DIR/error.rank<R>.json``.

Timing follows nccl-tests' BenchTime: for each size and mode, a few warm-up calls and a synchronisation,
a barrier, then ``iters`` calls launched back to back, timed on the GPU with CUDA events from a common start
(the end of one more call, which every GPU leaves at the same moment) or, with timer "wall" and on CPUs,
with the host clock and a wait for the device; the elapsed time is divided by ``iters``. Where Python could not
launch the calls as fast as the GPU ran them (small sizes), they are timed again as one CUDA graph. The
per-rank times are reduced like nccl-tests' ``-a`` (average by default). After timing, the data is
initialised again, the collective runs once more, and every element of the output is compared with its
exact expected value (the count of wrong elements, summed over ranks).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
from typing import Any, Callable

from . import _math
from ._nccl import DirectNccl, nccl_version_from_log, parse_tuning, tuning_key
from ._options import GRAPH_AUTO_HOST_FRACTION, BenchError, BenchOptions

CHUNK = 1 << 24  # elements per step when filling and checking buffers (bounded scratch memory)
HEADROOM_CUDA = 1 << 30  # device memory left for NCCL's own buffers and the CUDA context
HEADROOM_CPU = 256 << 20


class Abort(Exception):
    """Every rank stops: the message says why (already agreed by all ranks)."""


def _env_int(name: str, default: int | None = None) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        if default is None:
            raise BenchError(f"{name} is not set: the benchmark worker is started by meshrun's node launcher")
        return default
    return int(v)


class Worker:
    def __init__(self, opts: BenchOptions, run_dir: str):
        import torch
        import torch.distributed as dist

        self.torch = torch
        self.dist = dist
        self.o = opts
        self.run_dir = run_dir
        self.rank = _env_int("RANK")
        self.world = _env_int("WORLD_SIZE")
        self.local_rank = _env_int("LOCAL_RANK")
        self.local_world = _env_int("LOCAL_WORLD_SIZE", 1)
        self.node_rank = _env_int("NODE_RANK", 0)
        self.nnodes = _env_int("NNODES", 1)
        self.cuda = opts.device == "cuda"
        self.dtype_name = opts.dtype
        self.dtype = getattr(torch, opts.dtype)
        self.elt = opts.elt_size
        self.m = _math.pattern_modulus(opts.dtype, self.world)
        self.poison = _math.poison_value(opts.dtype)
        self.direct: DirectNccl | None = None
        self.direct_why = "torch.distributed has no out-of-place form of this collective"
        self.host_group: Any = None
        self.lines: list[str] = []

    # ---- set-up ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        from datetime import timedelta

        torch, dist = self.torch, self.dist
        timeout = timedelta(seconds=self.o.timeout)
        if self.cuda:
            if not torch.cuda.is_available():
                raise BenchError(f"rank {self.rank} on {socket.gethostname()}: CUDA is not available to torch "
                                 f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                                 f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
            if torch.cuda.device_count() < self.local_world:
                raise BenchError(f"node {self.node_rank} ({socket.gethostname()}) sees "
                                 f"{torch.cuda.device_count()} GPU(s) but runs {self.local_world} GPU ranks")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            dist.init_process_group("nccl", init_method="env://", rank=self.rank, world_size=self.world,
                                    timeout=timeout, device_id=self.device)
            # host-side barriers and bookkeeping go through gloo, like nccl-tests' MPI barriers
            self.host_group = dist.new_group(backend="gloo", timeout=timeout)
        else:
            torch.set_num_threads(1)
            self.device = torch.device("cpu")
            dist.init_process_group("gloo", init_method="env://", rank=self.rank, world_size=self.world,
                                    timeout=timeout)
            self.host_group = dist.group.WORLD

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def barrier(self) -> None:
        self.dist.barrier(group=self.host_group)

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj, group=self.host_group)
        return out

    def agree(self, problem: str | None) -> None:
        """Every rank stops if any rank has a problem (so no rank is left waiting in a collective)."""
        problems = self.gather(problem)
        bad = [(r, p) for r, p in enumerate(problems) if p]
        if bad:
            r, p = bad[0]
            more = f" (and {len(bad) - 1} other rank(s))" if len(bad) > 1 else ""
            raise Abort(f"{p}{more}")

    def rank_info(self) -> dict[str, Any]:
        torch = self.torch
        info: dict[str, Any] = {
            "rank": self.rank,
            "node_rank": self.node_rank,
            "local_rank": self.local_rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.device),
        }
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            info["gpu"] = props.name
            uuid = getattr(props, "uuid", None)
            u = str(uuid) if uuid is not None else None
            info["gpu_uuid"] = (u if u.startswith("GPU-") else "GPU-" + u) if u else None
            info["gpu_memory"] = int(props.total_memory)
            info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
            try:
                info["pci_bus_id"] = "%04x:%02x:%02x.0" % (props.pci_domain_id, props.pci_bus_id,
                                                            props.pci_device_id)
            except AttributeError:
                pass
        if self.local_rank == 0:
            try:
                with open(os.path.join(self.run_dir, "node.json")) as f:
                    info["node_info"] = json.load(f)
            except (OSError, ValueError):
                pass
        return info

    # ---- memory ------------------------------------------------------------------------------------------
    def buffer_bytes(self, size: int) -> tuple[int, int]:
        """Send and receive buffer bytes needed to run every requested collective at ``size``."""
        send = recv = 0
        for coll in self.o.collectives:
            c = _math.counts(coll, size, self.elt, self.world)
            send, recv = max(send, c.send_bytes), max(recv, c.recv_bytes)
        if self.o.pairwise:
            pb = self.pair_size()
            send, recv = max(send, pb), max(recv, pb)
        return send, recv

    def pair_size(self) -> int:
        size = self.o.pairwise_bytes or (64 * 1024**2 if self.cuda else 1024**2)
        return max(size // self.elt, 1) * self.elt

    def scratch_bytes(self, size: int) -> int:
        n = min(CHUNK, max(size // self.elt, 1))
        return n * (8 + 8 + self.elt + 1) if self.o.check else 0

    def memory_problem(self, sizes: list[int]) -> str | None:
        from .._units import format_size

        largest = max(sizes + ([self.pair_size()] if self.o.pairwise else []))
        send, recv = self.buffer_bytes(largest)
        scratch = self.scratch_bytes(largest)
        if self.cuda:
            free, total = self.torch.cuda.mem_get_info(self.device)
            headroom, share = HEADROOM_CUDA, 1
            where = f"GPU {self.local_rank} ({self.torch.cuda.get_device_name(self.device)}) on {socket.gethostname()}"
        else:
            host_free, host_total = _host_memory()
            headroom, share = HEADROOM_CPU, max(self.local_world, 1)
            where = f"{socket.gethostname()} ({share} CPU rank(s) share its memory)"
            if host_free is None or host_total is None:
                return None
            free, total = host_free, host_total
        need = send + recv + scratch + headroom
        if need * share <= free:
            return None
        fits = [s for s in sizes if (sum(self.buffer_bytes(s)) + self.scratch_bytes(s) + headroom) * share <= free]
        coll = max(self.o.collectives, key=lambda c: sum(
            (_math.counts(c, largest, self.elt, self.world).send_bytes,
             _math.counts(c, largest, self.elt, self.world).recv_bytes)))
        hint = (f"the largest size that fits is {format_size(max(fits))} (--max-bytes {max(fits)})" if fits
                else "no size of this sweep fits")
        return (f"refusing to allocate: {coll} at {format_size(largest)} ({largest} bytes) needs "
                f"{format_size(need)} per rank (send buffer {format_size(send)} + receive buffer "
                f"{format_size(recv)} + check scratch {format_size(scratch)} + {format_size(headroom)} for the "
                f"communication library), but {where} has {format_size(int(free / share))} free"
                f"{'' if share == 1 else ' per rank'} of {format_size(total)}; {hint}")

    # ---- data ----------------------------------------------------------------------------------------------
    def fill(self, t: Any, start: int, src_rank: int) -> Any:
        """t[i] = (start + i + 3 src_rank) mod m: small integers, exact in every dtype."""
        torch = self.torch
        n = t.numel()
        for off in range(0, n, CHUNK):
            k = min(CHUNK, n - off)
            idx = torch.arange(start + off + 3 * src_rank, start + off + 3 * src_rank + k, device=self.device,
                               dtype=torch.int64)
            t[off:off + k].copy_(idx.remainder_(self.m))
        return t

    def poison_(self, t: Any) -> Any:
        return t.fill_(self.poison)

    def wrong_vs_pattern(self, t: Any, start: int, src_rank: int) -> int:
        torch = self.torch
        n = t.numel()
        bad = torch.zeros((), dtype=torch.int64, device=self.device)
        for off in range(0, n, CHUNK):
            k = min(CHUNK, n - off)
            idx = torch.arange(start + off + 3 * src_rank, start + off + 3 * src_rank + k, device=self.device,
                               dtype=torch.int64)
            exp = idx.remainder_(self.m).to(self.dtype)
            bad += (t[off:off + k] != exp).sum()
        return int(bad.item())

    def wrong_vs_sum(self, t: Any, start: int) -> int:
        torch = self.torch
        table = torch.tensor(_math.sum_table(self.world, self.m), dtype=torch.int64, device=self.device)
        n = t.numel()
        bad = torch.zeros((), dtype=torch.int64, device=self.device)
        for off in range(0, n, CHUNK):
            k = min(CHUNK, n - off)
            idx = torch.arange(start + off, start + off + k, device=self.device, dtype=torch.int64)
            exp = table[idx.remainder_(self.m)].to(self.dtype)
            bad += (t[off:off + k] != exp).sum()
        return int(bad.item())

    # ---- the collectives -------------------------------------------------------------------------------------
    def view(self, buf: Any, start: int, count: int) -> Any:
        return buf.view(self.dtype)[start:start + count]

    def case(self, coll: str, mode: str, c: _math.Counts) -> tuple[Callable[[], object] | None, Callable[[], object],
                                                                     Callable[[], int | None], str, str]:
        """(op, prepare, check, api, why-not) for one collective, mode and size. op is None when not available."""
        dist = self.dist
        r, n = self.rank, self.world
        S, R = self.sendbuf, self.recvbuf
        inplace = mode == "in-place"
        api = "torch.distributed"
        if coll == "all_reduce":
            if inplace:
                buf = self.view(R, 0, c.param)
                return (lambda: dist.all_reduce(buf), lambda: self.fill(buf, 0, r),
                        lambda: self.wrong_vs_sum(buf, 0), api, "")
            send, recv = self.view(S, 0, c.param), self.view(R, 0, c.param)
            if self.direct is None:
                return None, _noop, _none, "", self.direct_why
            d = self.direct
            return (lambda: d.all_reduce(send, recv, self.dtype_name),
                    lambda: (self.fill(send, 0, r), self.poison_(recv)),
                    lambda: self.wrong_vs_sum(recv, 0), "nccl", "")
        if coll == "broadcast":
            if inplace:
                buf = self.view(R, 0, c.param)
                return (lambda: dist.broadcast(buf, src=0),
                        lambda: self.fill(buf, 0, 0) if r == 0 else self.poison_(buf),
                        lambda: self.wrong_vs_pattern(buf, 0, 0), api, "")
            send, recv = self.view(S, 0, c.param), self.view(R, 0, c.param)
            if self.direct is None:
                return None, _noop, _none, "", self.direct_why
            d = self.direct
            return (lambda: d.broadcast(send, recv, self.dtype_name, 0),
                    lambda: (self.fill(send, 0, r), self.poison_(recv)),
                    lambda: self.wrong_vs_pattern(recv, 0, 0), "nccl", "")
        b = c.param
        # torch 2.13 renamed the tensor forms; the old names remain (deprecated) and are what older torch has
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        if coll == "all_gather":
            recv = self.view(R, 0, b * n)
            send = self.view(R, r * b, b) if inplace else self.view(S, 0, b)

            def check_ag() -> int:
                return sum(self.wrong_vs_pattern(recv[j * b:(j + 1) * b], 0, j) for j in range(n))

            return (lambda: all_gather(recv, send),
                    lambda: (self.poison_(recv), self.fill(send, 0, r)), check_ag, api, "")
        if coll == "reduce_scatter":
            if inplace:
                send = self.view(R, 0, b * n)
                recv = self.view(R, r * b, b)
            else:
                send, recv = self.view(S, 0, b * n), self.view(R, 0, b)
            if inplace:
                prep = lambda: self.fill(send, 0, r)  # noqa: E731
            else:
                prep = lambda: (self.fill(send, 0, r), self.poison_(recv))  # noqa: E731
            return (lambda: reduce_scatter(recv, send), prep,
                    lambda: self.wrong_vs_sum(recv, r * b), api, "")
        if coll == "alltoall":
            if inplace:
                buf = self.view(R, 0, b * n)
                # as in nccl-tests: in-place alltoall reads and writes one buffer at once, so its output is
                # not checked (N/A)
                return (lambda: dist.all_to_all_single(buf, buf), lambda: self.fill(buf, 0, r), _none, api, "")
            send, recv = self.view(S, 0, b * n), self.view(R, 0, b * n)

            def check_a2a() -> int:
                return sum(self.wrong_vs_pattern(recv[j * b:(j + 1) * b], r * b, j) for j in range(n))

            return (lambda: dist.all_to_all_single(recv, send),
                    lambda: (self.fill(send, 0, r), self.poison_(recv)), check_a2a, api, "")
        if coll == "sendrecv":
            if n < 2:
                return None, _noop, _none, "", "sendrecv needs at least 2 ranks"
            nxt, prv = (r + 1) % n, (r - 1) % n
            if inplace:
                buf = self.view(R, 0, c.param)
                send = recv = buf
            else:
                send, recv = self.view(S, 0, c.param), self.view(R, 0, c.param)
            op = self.exchange_op(send, recv, nxt, prv)
            if inplace:  # nccl-tests does not check in-place sendrecv either
                return op, lambda: self.fill(send, 0, r), _none, api, ""
            return (op, lambda: (self.fill(send, 0, r), self.poison_(recv)),
                    lambda: self.wrong_vs_pattern(recv, 0, prv), api, "")
        raise BenchError(f"unknown collective {coll!r}")

    def exchange_op(self, send: Any, recv: Any, to: int, frm: int) -> Callable[[], object]:
        dist = self.dist

        def op() -> None:
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, to), dist.P2POp(dist.irecv, recv, frm)])
            for q in reqs:
                q.wait()

        return op

    def measure(self, op: Callable[[], object]) -> tuple[float, str, float | None]:
        """(seconds per call on this rank, "eager" or "graph", eager seconds per call when a graph was used).

        Like nccl-tests' BenchTime: warm-up calls, one more call and a wait, a barrier, then ``iters`` calls
        launched back to back and timed (see :meth:`timed`).

        graph "auto": when launching the calls took the host at least GRAPH_AUTO_HOST_FRACTION of their device
        time on any rank (so the GPU may have waited for Python), they are captured as one CUDA graph and timed
        again by replaying it; "on" always does that, "off" never."""
        for _ in range(self.o.warmup):
            op()
        op()  # nccl-tests' "sync" call before the barrier
        self.sync()
        mode = self.o.graph if self.cuda else "off"
        if mode == "on":
            return self.timed_graph(op), "graph", None
        dt, host = self.timed(lambda: [op() for _ in range(self.o.iters)], op)
        if mode == "auto" and any(self.gather(host >= GRAPH_AUTO_HOST_FRACTION * dt)):
            return self.timed_graph(op), "graph", dt
        return dt, "eager", None

    def timed_graph(self, op: Callable[[], object]) -> float:
        torch = self.torch
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.graph(g, stream=stream, capture_error_mode="thread_local"):
            for _ in range(self.o.iters):
                op()
        g.replay()  # the first launch uploads the graph: keep it out of the time
        self.sync()
        dt, _ = self.timed(g.replay, g.replay)
        del g
        return dt

    def timed(self, calls: Callable[[], Any], first: Callable[[], Any]) -> tuple[float, float]:
        """(seconds per call, host seconds per call spent launching them) for ``calls`` (``iters`` calls).

        On GPUs (timer "events"): after a barrier, ``first`` (one more call, or one more graph replay) is
        launched, then a start event, the calls and an end event. The start event fires when ``first``
        completes, which is the same moment on every GPU (it is a collective), and by then the host has
        queued the next calls: the events time the calls from a common start, without a host barrier's skew
        or the first launch. With timer "wall" (and on CPUs): ``first`` and a wait, then the host clock around
        the calls and a wait for the device, as nccl-tests does."""
        torch = self.torch
        iters = self.o.iters
        self.barrier()
        if self.cuda and self.o.timer == "events":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            first()
            start.record()
            h0 = time.perf_counter()
            calls()
            host = time.perf_counter() - h0
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / iters, host / iters
        first()
        self.sync()
        t0 = time.perf_counter()
        calls()
        host = time.perf_counter() - t0
        self.sync()
        return (time.perf_counter() - t0) / iters, host / iters

    # ---- the sweep ------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        torch, o = self.torch, self.o
        t_start = time.time()
        self.setup()
        infos = self.gather(self.rank_info())
        self.node_infos = {}
        for i in infos:
            ni = i.pop("node_info", None)
            if ni:
                self.node_infos[str(i["node_rank"])] = ni
        sizes = o.sizes
        self.agree(self.memory_problem(sizes))
        send_b, recv_b = self.buffer_bytes(max(sizes))
        # round up to whole elements (views of the byte buffers by dtype)
        send_b = -(-max(send_b, self.elt) // self.elt) * self.elt
        recv_b = -(-max(recv_b, self.elt) // self.elt) * self.elt
        problem = None
        try:
            self.sendbuf = torch.empty(send_b, dtype=torch.uint8, device=self.device)
            self.recvbuf = torch.empty(recv_b, dtype=torch.uint8, device=self.device)
        except RuntimeError as e:  # out of memory despite the check (another process took it meanwhile)
            problem = f"rank {self.rank}: allocating {send_b} + {recv_b} bytes failed: {e}"
        self.agree(problem)
        if self.cuda:
            self.dist.all_reduce(torch.zeros(1, dtype=torch.uint8, device=self.device))  # the first call
            self.sync()
            if "out-of-place" in o.modes and {"all_reduce", "broadcast"} & set(o.collectives):
                d, why = DirectNccl.attach(self.dist.group.WORLD, self.device, torch)
                ok = self.gather(d is not None)
                if all(ok):
                    self.direct = d
                else:
                    self.direct_why = f"out-of-place needs NCCL's own call: {why or 'not available on every rank'}"
        rows: list[dict[str, Any]] = []
        if self.rank == 0:
            self.say(f"# meshrun bench: {self.world} rank(s) on {self.nnodes} node(s), "
                     f"{'NCCL' if self.cuda else 'gloo'}, {o.dtype}, warm-up {o.warmup}, iterations {o.iters}")
        for coll in o.collectives:
            rows.extend(self.sweep(coll, sizes))
        pairs = self.pairwise(infos) if o.pairwise else None
        self.sync()
        self.barrier()
        result = None
        if self.rank == 0:
            result = {
                "rows": rows,
                "pairs": pairs,
                "ranks": infos,
                "meta": self.meta(infos, t_start),
            }
        self.dist.destroy_process_group()
        return result or {}

    def sweep(self, coll: str, sizes: list[int]) -> list[dict[str, Any]]:
        o = self.o
        type_name = _math.DTYPES[o.dtype][1]
        redop, root = _math.redop_and_root(coll)
        rows = []
        seen: set[int] = set()
        if self.rank == 0:
            self.say(f"#\n# {coll}")
            for h in _math.table_header():
                self.say(h)
        for size in sizes:
            c = _math.counts(coll, size, self.elt, self.world)
            if c.param == 0 or c.size in seen:
                continue  # nothing to move at this size (or the same size as the last, after rounding)
            seen.add(c.size)
            line_rows = []
            for mode in _math.MODES:
                if mode not in o.modes:
                    continue
                line_rows.append(self.one(coll, mode, c, type_name, redop, root))
            rows.extend(line_rows)
            if self.rank == 0:
                by_mode = {r["mode"]: r for r in line_rows}
                text = _math.line_preamble(c.size, c.param, type_name, redop, root)
                for mode in _math.MODES:
                    r = by_mode.get(mode)
                    if r is None or r.get("time_us") is None:
                        text += _math.line_body(None, None, None, None, available=False)
                    else:
                        text += _math.line_body(r["time_us"], r["algbw"], r["busbw"], r["wrong"])
                self.say(text)
        return rows

    def one(self, coll: str, mode: str, c: _math.Counts, type_name: str, redop: str, root: int) -> dict[str, Any]:
        o = self.o
        op, prepare, check, api, why = self.case(coll, mode, c)
        row: dict[str, Any] = {
            "collective": coll, "size": c.size, "count": c.param, "dtype": o.dtype, "type": type_name,
            "redop": redop, "root": root, "mode": mode, "time_us": None, "algbw": None, "busbw": None,
            "wrong": None, "time_us_min": None, "time_us_max": None, "iters": o.iters, "warmup": o.warmup,
            "launch": None, "api": api or None,
        }
        if op is None:
            row["note"] = why
            return row
        dt, launch, eager_dt = self.measure(op)
        times = self.gather(dt)
        sec = _math.reduce_times(times, o.average)
        row.update({
            "time_us": sec * 1e6,
            "time_us_min": min(times) * 1e6,
            "time_us_max": max(times) * 1e6,
            "algbw": _math.algbw(c.size, sec),
            "busbw": _math.busbw(coll, c.size, sec, self.world),
            "launch": launch,
        })
        if eager_dt is not None:
            row["eager_time_us"] = _math.reduce_times(self.gather(eager_dt), o.average) * 1e6
        if o.check:
            prepare()
            self.sync()
            self.barrier()
            op()
            self.sync()
            wrong = check()
            self.sync()
            counts = self.gather(wrong)
            row["wrong"] = None if any(w is None for w in counts) else int(sum(counts))
        return row

    # ---- pairwise -------------------------------------------------------------------------------------------
    def pairwise(self, infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Bidirectional sendrecv between every pair of nodes (local rank k with local rank k, all at once)
        or of ranks (GPUs), one pair at a time, at ``pairwise_bytes``."""
        o = self.o
        size = self.pair_size()
        count = size // self.elt
        by_node: dict[int, list[int]] = {}
        for info in infos:
            by_node.setdefault(info["node_rank"], []).append(info["rank"])
        level = o.pairwise
        if level == "nodes" and len(by_node) < 2:
            level = "gpus"  # one node: the pairs are its GPUs
        if level == "nodes":
            units = sorted(by_node)
            members = {u: sorted(by_node[u]) for u in units}
        else:
            units = list(range(self.world))
            members = {u: [u] for u in units}
        pairs = [(a, b) for i, a in enumerate(units) for b in units[i + 1:]]
        send = self.view(self.sendbuf, 0, count)
        recv = self.view(self.recvbuf, 0, count)
        mine: list[tuple[int, float, int | None]] = []
        for k, (a, b) in enumerate(pairs):
            peer = None
            ma, mb = members[a], members[b]
            if self.rank in ma:
                peer = mb[ma.index(self.rank)] if ma.index(self.rank) < len(mb) else None
            elif self.rank in mb:
                peer = ma[mb.index(self.rank)] if mb.index(self.rank) < len(ma) else None
            self.barrier()
            if peer is not None:
                op = self.exchange_op(send, recv, peer, peer)
                dt = self.measure_pair(op)
                wrong = None
                if o.check:
                    self.fill(send, 0, self.rank)
                    self.poison_(recv)
                    self.sync()
                    op()
                    self.sync()
                    wrong = self.wrong_vs_pattern(recv, 0, peer)
                mine.append((k, dt, wrong))
            self.barrier()
        allm = self.gather(mine)
        out = []
        for k, (a, b) in enumerate(pairs):
            dts = [dt for per in allm for (kk, dt, _) in per if kk == k]
            wr = [w for per in allm for (kk, _, w) in per if kk == k]
            sec = _math.reduce_times(dts, o.average)
            bw = _math.algbw(size, sec)
            hosts_a = sorted({infos[r]["host"] for r in members[a]})
            hosts_b = sorted({infos[r]["host"] for r in members[b]})
            npairs = max(len(dts) // 2, 1)  # each rank pair is timed at both ends
            out.append({
                "level": level, "a": a, "b": b, "size": size, "time_us": sec * 1e6, "busbw": bw,
                "aggregate_busbw": bw * npairs, "rank_pairs": npairs,
                "wrong": None if (not o.check or any(w is None for w in wr)) else int(sum(wr)),
                "where_a": ",".join(hosts_a) if level == "nodes" else _where(infos[a]),
                "where_b": ",".join(hosts_b) if level == "nodes" else _where(infos[b]),
            })
        return out

    def measure_pair(self, op: Callable[[], object]) -> float:
        """Like :meth:`timed` for the two ranks of a pair (no barrier: the other ranks wait elsewhere)."""
        torch = self.torch
        for _ in range(self.o.warmup):
            op()
        op()
        self.sync()
        if self.cuda and self.o.timer == "events":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            op()
            start.record()
            for _ in range(self.o.iters):
                op()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / self.o.iters
        t0 = time.perf_counter()
        for _ in range(self.o.iters):
            op()
        self.sync()
        return (time.perf_counter() - t0) / self.o.iters

    # ---- what ran ------------------------------------------------------------------------------------------
    def meta(self, infos: list[dict[str, Any]], t_start: float) -> dict[str, Any]:
        torch = self.torch
        hosts = []
        for i in infos:
            if i["host"] not in hosts:
                hosts.append(i["host"])
        meta: dict[str, Any] = {
            "ranks": self.world,
            "nodes": self.nnodes,
            "hosts": hosts,
            "procs_per_node": self.local_world,
            "gpus_per_node": self.local_world if self.cuda else 0,
            "device": self.o.device,
            "backend": "nccl" if self.cuda else "gloo",
            "dtype": self.o.dtype,
            "torch_version": torch.__version__,
            "python": sys.version.split()[0],
            "started_at": t_start,
            "ended_at": time.time(),
            "check_modulus": self.m,
            "node_info": self.node_infos,
            "timer": self.o.timer if self.cuda else "wall",
            "graph": self.o.graph if self.cuda else "off",
            "graph_auto_host_fraction": GRAPH_AUTO_HOST_FRACTION,
        }
        if self.cuda:
            meta["gpu_model"] = infos[0].get("gpu")
            models = sorted({g for g in (i.get("gpu") for i in infos) if g})
            if len(models) > 1:
                meta["gpu_models"] = models
            meta["cuda_version"] = torch.version.cuda
            try:
                v = torch.cuda.nccl.version()
                meta["nccl_version"] = ".".join(str(x) for x in v[:3]) if isinstance(v, tuple) else str(v)
            except Exception:
                meta["nccl_version"] = None
            meta["nccl_env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")
                                and k not in ("NCCL_DEBUG_FILE",)}
            meta["out_of_place_api"] = "nccl" if self.direct is not None else None
            if self.direct is None:
                meta["out_of_place_note"] = self.direct_why
        return meta

    def say(self, text: str) -> None:
        self.lines.append(text)
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def _where(info: dict[str, Any]) -> str:
    if info.get("gpu_uuid"):
        return f"{info['host']} GPU {info['local_rank']}"
    return f"{info['host']} rank {info['rank']}"


def _noop() -> None:
    return None


def _none() -> None:
    return None


def _host_memory() -> tuple[int | None, int | None]:
    try:
        vals = {}
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, rest = line.partition(":")
                vals[k] = int(rest.split()[0]) * 1024
        return vals.get("MemAvailable"), vals.get("MemTotal")
    except (OSError, ValueError, IndexError):
        return None, None


def attach_nccl_choices(result: dict[str, Any], log_text: str, elt_size: int) -> None:
    """Add NCCL's algorithm/protocol/channels (from rank 0's debug log) to each row where NCCL reported it."""
    tuning = parse_tuning(log_text)
    ver = nccl_version_from_log(log_text)
    if ver and result.get("meta") is not None:
        result["meta"]["nccl_version_log"] = ver
    for row in result.get("rows", []):
        key = tuning_key(row["collective"], row["count"], elt_size)
        choice = tuning.get(key) if key else None
        if choice:
            row["nccl_algo"] = choice["algo"]
            row["nccl_proto"] = choice["proto"]
            row["nccl_channels"] = choice["channels"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_dir = argv[0]
    rank = os.environ.get("RANK", "?")
    try:
        with open(os.path.join(run_dir, "options.json")) as f:
            opts = BenchOptions.from_dict(json.load(f))
        w = Worker(opts, run_dir)
        result = w.run()
        if w.rank == 0:
            tmp = os.path.join(run_dir, "result.json.tmp")
            with open(tmp, "w") as f:
                json.dump(result, f)
            os.replace(tmp, os.path.join(run_dir, "result.json"))
        return 0
    except (Abort, BenchError) as e:
        _write_error(run_dir, rank, type(e).__name__, str(e), "")
        sys.stderr.write(f"[bench rank {rank}] {e}\n")
        return 3
    except BaseException as e:  # noqa: B902 - report anything, then fail
        tb = traceback.format_exc()
        _write_error(run_dir, rank, type(e).__name__, str(e), tb)
        sys.stderr.write(f"[bench rank {rank}] {tb}")
        return 1


def _write_error(run_dir: str, rank: str, etype: str, message: str, tb: str) -> None:
    try:
        path = os.path.join(run_dir, f"error.rank{rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"rank": rank, "type": etype, "message": message, "traceback": tb, "time": time.time()}, f)
        os.replace(path + ".tmp", path)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
