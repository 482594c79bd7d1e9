"""The result of a benchmark run: rows, what ran, and the files for people (table, PNG) and machines (JSON lines)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import _math

ROW_RUN_FIELDS = ("ranks", "nodes", "gpus_per_node", "procs_per_node", "backend", "gpu_model", "nccl_version",
                  "torch_version", "cuda_version")


@dataclass
class BenchResult:
    """What :func:`meshrun.bench.run` returns.

    ``rows``: one dict per collective, size and mode (``collective``, ``size``, ``count``, ``mode``,
    ``time_us``, ``algbw``, ``busbw`` in GB/s, ``wrong``, ``nccl_algo``, ``nccl_proto``, ...);
    ``meta``: what ran (ranks, nodes, GPUs per node, GPU model, NCCL/torch versions, hosts, GPU topology);
    ``pairs``: the ``--pairwise`` measurements, with ``ratio`` to the median and ``slow``;
    ``nccl_tests``: the comparison run, if asked; ``files``: the files written.
    """

    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    pairs: list[dict[str, Any]] | None = None
    nccl_tests: dict[str, Any] | None = None
    job_id: str | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pairs:
            flag_slow(self.pairs, float(self.options.get("pairwise_threshold", 0.8)))

    @classmethod
    def from_job_result(cls, result: dict[str, Any], options: dict[str, Any],
                        job_id: str | None = None) -> "BenchResult":
        return cls(rows=list(result.get("rows") or []), meta=dict(result.get("meta") or {}), options=dict(options),
                   pairs=result.get("pairs"), nccl_tests=result.get("nccl_tests"), job_id=job_id)

    # ---- looking things up ------------------------------------------------------------------------------
    @property
    def collectives(self) -> list[str]:
        out: list[str] = []
        for r in self.rows:
            if r["collective"] not in out:
                out.append(r["collective"])
        return out

    def row(self, collective: str, size: int, mode: str = "in-place") -> dict[str, Any] | None:
        for r in self.rows:
            if r["collective"] == collective and r["size"] == size and r["mode"] == mode:
                return r
        return None

    def busbw(self, collective: str, size: int, mode: str = "in-place") -> float | None:
        r = self.row(collective, size, mode)
        return None if r is None else r.get("busbw")

    @property
    def wrong(self) -> int:
        """Wrong elements over every checked row (0 when all results were right)."""
        return sum(int(r["wrong"]) for r in self.rows if r.get("wrong") is not None)

    @property
    def ok(self) -> bool:
        return self.wrong == 0 and not any(p.get("wrong") for p in self.pairs or [])

    @property
    def slow_pairs(self) -> list[dict[str, Any]]:
        return [p for p in self.pairs or [] if p.get("slow")]

    def nccl_tests_rows(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for run in (self.nccl_tests or {}).get("runs", []):
            out.extend(run.get("rows") or [])
        return out

    def comparison(self) -> list[dict[str, Any]]:
        """Our rows side by side with nccl-tests' at the same collective, size and mode."""
        theirs = {(r["collective"], r["size"], r["mode"]): r for r in self.nccl_tests_rows()}
        out = []
        for r in self.rows:
            t = theirs.get((r["collective"], r["size"], r["mode"]))
            if t is None or r.get("time_us") is None:
                continue
            out.append({
                "collective": r["collective"], "size": r["size"], "mode": r["mode"],
                "time_us": r["time_us"], "nccl_tests_time_us": t["time_us"],
                "time_ratio": _ratio(r["time_us"], t["time_us"]),
                "busbw": r["busbw"], "nccl_tests_busbw": t["busbw"],
                "busbw_ratio": _ratio(r["busbw"], t["busbw"]),
                "wrong": r.get("wrong"), "nccl_tests_wrong": t.get("wrong"), "launch": r.get("launch"),
            })
        return out

    # ---- text ------------------------------------------------------------------------------------------------
    def describe(self) -> str:
        m = self.meta
        what = f"{m.get('ranks', '?')} rank(s) on {m.get('nodes', '?')} node(s)"
        if m.get("device") == "cuda":
            what += f", {m.get('gpus_per_node')} x {m.get('gpu_model') or 'GPU'} per node, NCCL {m.get('nccl_version')}"
        else:
            what += f", {m.get('procs_per_node')} CPU rank(s) per node, gloo"
        return what + f", torch {m.get('torch_version')}"

    def table(self, collective: str | None = None) -> str:
        """The nccl-tests-style table (all collectives, or one), with NCCL's algorithm/protocol last."""
        m = self.meta
        lines = [f"# meshrun bench: {self.describe()}"]
        opts = self.options
        if opts:
            lines.append(f"# dtype {m.get('dtype', opts.get('dtype'))}  warm-up {opts.get('warmup')}  iterations "
                         f"{opts.get('iters')}  time reduced across ranks: {opts.get('average', 'avg')}  "
                         f"check: {'on' if opts.get('check', True) else 'off'}")
        for i, info in enumerate(self.meta.get("rank_list") or []):
            lines.append("#  Rank %2d on %s %s %s" % (i, info.get("host"), info.get("device"),
                                                      info.get("gpu_uuid") or ""))
        colls = [collective] if collective else self.collectives
        for coll in colls:
            rows = [r for r in self.rows if r["collective"] == coll]
            if not rows:
                continue
            lines.append("#")
            lines.append(f"# {coll}")
            lines.extend(_math.table_header())
            sizes: list[int] = []
            for r in rows:
                if r["size"] not in sizes:
                    sizes.append(r["size"])
            for size in sizes:
                by_mode = {r["mode"]: r for r in rows if r["size"] == size}
                first = next(iter(by_mode.values()))
                text = _math.line_preamble(size, first["count"], first.get("type") or "", first.get("redop") or "",
                                           int(first.get("root", -1)))
                algo = ""
                for mode in _math.MODES:
                    got = by_mode.get(mode)
                    if got is None or got.get("time_us") is None:
                        text += _math.line_body(None, None, None, None, available=False)
                    else:
                        text += _math.line_body(got["time_us"], got["algbw"], got["busbw"], got.get("wrong"))
                        if got.get("nccl_algo"):
                            algo = f"{got['nccl_algo']}/{got['nccl_proto']}"
                if algo:
                    text += "  " + algo
                lines.append(text)
            measured = [r for r in rows if r.get("busbw") is not None]
            wrong = sum(int(r["wrong"]) for r in rows if r.get("wrong") is not None)
            avg = sum(r["busbw"] for r in measured) / len(measured) if measured else 0.0
            lines.append("# %-20s : %d %s" % ("Out of bounds values", wrong, "FAILED" if wrong else "OK"))
            lines.append("# %-20s : %g " % ("Avg bus bandwidth", round(avg, 4)))
            notes = sorted({r["note"] for r in rows if r.get("note")})
            for n in notes:
                lines.append(f"# note: {n}")
        return "\n".join(lines) + "\n"

    def comparison_table(self) -> str:
        comp = self.comparison()
        if not comp:
            err = (self.nccl_tests or {}).get("error")
            errs = [r.get("error") for r in (self.nccl_tests or {}).get("runs", []) if r.get("error")]
            why = err or "; ".join(errs) or "no sizes in common"
            return f"# nccl-tests comparison: {why}\n" if self.nccl_tests else ""
        lines = ["# meshrun vs nccl-tests (same sizes, warm-up, iterations and dtype)",
                 "# %-14s  %12s  %12s  %9s  %9s  %6s  %8s  %8s  %6s" % (
                     "collective", "size (B)", "mode", "time (us)", "nccl (us)", "t/t", "busbw", "nccl", "b/b")]
        for c in comp:
            lines.append("  %-14s  %12d  %12s  %9s  %9s  %6s  %8s  %8s  %6s" % (
                c["collective"], c["size"], c["mode"], _math.float_str(c["time_us"], 9).strip(),
                _math.float_str(c["nccl_tests_time_us"], 9).strip(), _fmt_ratio(c["time_ratio"]),
                _math.float_str(c["busbw"], 8).strip(), _math.float_str(c["nccl_tests_busbw"], 8).strip(),
                _fmt_ratio(c["busbw_ratio"])))
        return "\n".join(lines) + "\n"

    def pairs_table(self) -> str:
        if not self.pairs:
            return ""
        thr = float(self.options.get("pairwise_threshold", 0.8))
        level = self.pairs[0].get("level")
        lines = [f"# pairwise sendrecv between {level}, {self.pairs[0]['size']} bytes each way; slow = below "
                 f"{thr:g} x median ({_math.float_str(_median_bw(self.pairs), 6).strip()} GB/s)",
                 "# %-28s  %-28s  %9s  %8s  %6s  %6s  %s" % ("a", "b", "time (us)", "busbw", "ratio", "#wrong", "")]
        for p in self.pairs:
            lines.append("  %-28s  %-28s  %9s  %8s  %6s  %6s  %s" % (
                f"{p['a']} ({p['where_a']})", f"{p['b']} ({p['where_b']})",
                _math.float_str(p["time_us"], 9).strip(), _math.float_str(p["busbw"], 8).strip(),
                _fmt_ratio(p.get("ratio")), "N/A" if p.get("wrong") is None else p["wrong"],
                "SLOW" if p.get("slow") else ""))
        slow = self.slow_pairs
        lines.append(f"# {len(slow)} slow pair(s) of {len(self.pairs)}")
        return "\n".join(lines) + "\n"

    def report(self) -> str:
        """Everything for the terminal: the table, the comparison, the pairs."""
        parts = [self.table()]
        if self.nccl_tests is not None:
            parts.append(self.comparison_table())
        if self.pairs:
            parts.append(self.pairs_table())
        return "\n".join(p for p in parts if p)

    # ---- machines --------------------------------------------------------------------------------------------
    def records(self) -> Iterable[dict[str, Any]]:
        run_fields = {k: self.meta.get(k) for k in ROW_RUN_FIELDS}
        yield {"record": "run", "job_id": self.job_id, "options": self.options, "meta": self.meta}
        for r in self.rows:
            yield {"record": "result", **r, **run_fields}
        for p in self.pairs or []:
            yield {"record": "pair", **p, **run_fields}
        for run in (self.nccl_tests or {}).get("runs", []):
            info = {k: v for k, v in run.items() if k != "rows"}
            yield {"record": "nccl-tests-run", **info}
            for r in run.get("rows") or []:
                yield {"record": "nccl-tests", **r}
        if self.nccl_tests and self.nccl_tests.get("error"):
            yield {"record": "nccl-tests-run", "error": self.nccl_tests["error"]}
        for c in self.comparison():
            yield {"record": "comparison", **c}

    def to_jsonl(self) -> str:
        return "".join(json.dumps(rec, sort_keys=True, default=str) + "\n" for rec in self.records())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "BenchResult":
        """Read back a ``results.jsonl`` written by :meth:`write`."""
        rows, pairs, job_id = [], [], None
        meta: dict[str, Any] = {}
        options: dict[str, Any] = {}
        runs: dict[str, dict[str, Any]] = {}
        nt_error = None
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                rec = json.loads(line)
                kind = rec.pop("record", None)
                if kind == "run":
                    meta, options, job_id = rec.get("meta") or {}, rec.get("options") or {}, rec.get("job_id")
                elif kind == "result":
                    for k in ROW_RUN_FIELDS:
                        rec.pop(k, None)
                    rows.append(rec)
                elif kind == "pair":
                    for k in ROW_RUN_FIELDS:
                        rec.pop(k, None)
                    pairs.append(rec)
                elif kind == "nccl-tests-run":
                    if "collective" in rec:
                        runs[rec["collective"]] = {**rec, "rows": []}
                    else:
                        nt_error = rec.get("error")
                elif kind == "nccl-tests":
                    run = runs.setdefault(rec["collective"], {"collective": rec["collective"], "rows": []})
                    run["rows"].append(rec)
        nt = None
        if runs or nt_error:
            nt = {"runs": list(runs.values())}
            if nt_error:
                nt["error"] = nt_error
        return cls(rows=rows, meta=meta, options=options, pairs=pairs or None, nccl_tests=nt, job_id=job_id,
                   files={"jsonl": Path(path)})

    # ---- files -----------------------------------------------------------------------------------------------
    def write(self, out_dir: str | os.PathLike[str], *, plot: bool = True, stem: str = "bench") -> dict[str, Path]:
        """Write ``<stem>.jsonl``, ``<stem>.txt`` (the tables) and ``<stem>.png`` (busbw against size) into
        ``out_dir``; plus ``<stem>-pairs.png`` and ``<stem>-nccl-tests.txt`` when there is something to put there."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files: dict[str, Path] = {}
        p = out / f"{stem}.jsonl"
        p.write_text(self.to_jsonl())
        files["jsonl"] = p
        p = out / f"{stem}.txt"
        text = self.report()
        topo = self.topology_text()
        if topo:
            text += "\n" + topo
        p.write_text(text)
        files["table"] = p
        runs = (self.nccl_tests or {}).get("runs", [])
        if any(r.get("output") for r in runs):
            p = out / f"{stem}-nccl-tests.txt"
            p.write_text("".join(f"$ {' '.join(r.get('command') or [])}\n{r.get('output') or ''}\n" for r in runs))
            files["nccl_tests"] = p
        if plot:
            try:
                files["png"] = self.plot(out / f"{stem}.png")
                if self.pairs and len(self.pairs) > 1:
                    files["pairs_png"] = self.plot_pairs(out / f"{stem}-pairs.png")
            except ImportError as e:  # matplotlib missing: the rest is still useful
                files.pop("png", None)
                self.meta.setdefault("plot_error", str(e))
        self.files.update(files)
        return files

    def topology_text(self) -> str:
        parts = []
        for node, info in sorted((self.meta.get("node_info") or {}).items()):
            if info.get("topology"):
                parts.append(f"# GPU topology of node {node} ({info.get('host')}): nvidia-smi topo -m\n"
                             f"{info['topology'].rstrip()}\n")
        return "\n".join(parts)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """busbw against size, one line per collective (nccl-tests' numbers dashed, when compared)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
        theirs = self.nccl_tests_rows()
        colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3", "C4", "C5"])
        for i, coll in enumerate(self.collectives):
            color = colors[i % len(colors)]
            mode = _plot_mode([r for r in self.rows if r["collective"] == coll])
            pts = sorted((r["size"], r["busbw"]) for r in self.rows
                         if r["collective"] == coll and r["mode"] == mode and r.get("busbw") is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, color=color,
                        label=f"{coll} ({mode})")
            tp = sorted((r["size"], r["busbw"]) for r in theirs
                        if r["collective"] == coll and r["mode"] == mode and r.get("busbw") is not None)
            if tp:
                ax.plot([p[0] for p in tp], [p[1] for p in tp], linestyle="--", marker="x", markersize=3,
                        color=color, alpha=0.8, label=f"{coll} nccl-tests ({mode})")
        ax.set_xscale("log", base=2)
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _size_label(v)))
        ax.set_xlabel("size")
        ax.set_ylabel("bus bandwidth (GB/s, 1 GB = 1e9 B)")
        ax.set_title(f"meshrun bench: {self.describe()}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return Path(path)

    def plot_pairs(self, path: str | os.PathLike[str]) -> Path:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        units = sorted({p["a"] for p in self.pairs or []} | {p["b"] for p in self.pairs or []})
        idx = {u: i for i, u in enumerate(units)}
        grid = [[float("nan")] * len(units) for _ in units]
        for p in self.pairs or []:
            grid[idx[p["a"]]][idx[p["b"]]] = grid[idx[p["b"]]][idx[p["a"]]] = p["busbw"]
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(units), 1.0 + 0.6 * len(units)), dpi=120)
        im = ax.imshow(grid, cmap="viridis")
        for p in self.pairs or []:
            for (i, j) in ((idx[p["a"]], idx[p["b"]]), (idx[p["b"]], idx[p["a"]])):
                ax.text(j, i, ("!" if p.get("slow") else "") + _math.float_str(p["busbw"], 6).strip(),
                        ha="center", va="center", fontsize=7, color="red" if p.get("slow") else "white")
        ax.set_xticks(range(len(units)), [str(u) for u in units])
        ax.set_yticks(range(len(units)), [str(u) for u in units])
        level = (self.pairs or [{}])[0].get("level", "")
        ax.set_title(f"pairwise sendrecv busbw (GB/s) between {level}", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return Path(path)

    def __repr__(self) -> str:
        return (f"<BenchResult {', '.join(self.collectives)}: {len(self.rows)} rows, {self.describe()}, "
                f"wrong={self.wrong}>")


def flag_slow(pairs: list[dict[str, Any]], threshold: float) -> None:
    """Mark each pair with its ``ratio`` to the median busbw and ``slow`` when the ratio is below threshold."""
    med = _median_bw(pairs)
    for p in pairs:
        p["ratio"] = _ratio(p.get("busbw"), med)
        p["slow"] = p["ratio"] is not None and p["ratio"] < threshold


def _median_bw(pairs: list[dict[str, Any]]) -> float:
    vals = [p["busbw"] for p in pairs if p.get("busbw") is not None]
    return _math.median(vals) if vals else 0.0


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f}"


def _size_label(v: float) -> str:
    for unit, f in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if v >= f:
            return f"{v / f:g}{unit}"
    return f"{v:g}B"


def _plot_mode(rows: list[dict[str, Any]]) -> str:
    measured = {r["mode"] for r in rows if r.get("busbw") is not None}
    return "out-of-place" if "out-of-place" in measured else "in-place"
