"""Running an installed nccl-tests binary with the same sweep, and reading its table."""

from __future__ import annotations

import os
import re
from typing import Any

from . import _math

AVERAGE_FLAG = {"rank0": 0, "avg": 1, "min": 2, "max": 3}


def find_binary(path: str, collective: str) -> str | None:
    """``path`` is nccl-tests' build folder (holding all_reduce_perf, ...) or one binary; the binary that
    measures ``collective``, or None."""
    want = _math.NCCL_TESTS_BINARY[collective]
    if os.path.isdir(path):
        for name in (want, want + "_mpi"):
            p = os.path.join(path, name)
            if os.path.isfile(p) and os.access(p, os.X_OK):
                return p
        return None
    base = os.path.basename(path)
    if base.startswith(want) and os.path.isfile(path):
        return path
    return None


def argv(binary: str, collective: str, *, min_bytes: int, max_bytes: int, factor: int, step_bytes: int | None,
         gpus: int, warmup: int, iters: int, dtype: str, check: bool, average: str) -> list[str]:
    a = [binary, "-b", str(min_bytes), "-e", str(max_bytes)]
    if factor and factor > 1:
        a += ["-f", str(factor)]
    else:
        a += ["-i", str(step_bytes)]
    a += ["-g", str(gpus), "-w", str(warmup), "-n", str(iters), "-d", _math.DTYPES[dtype][1],
          "-c", "1" if check else "0", "-a", str(AVERAGE_FLAG[average])]
    if collective in ("all_reduce", "reduce_scatter"):
        a += ["-o", "sum"]
    if collective == "broadcast":
        a += ["-r", "0"]
    return a


_NUM = re.compile(r"^-?[0-9.]+(?:e[+-]?[0-9]+)?$", re.I)


def _num(tok: str) -> float | None:
    return float(tok) if _NUM.match(tok) else None


def parse(text: str, collective: str) -> dict[str, Any]:
    """Rows (one per size and mode) and header facts from nccl-tests' output."""
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {"devices": []}
    for line in text.splitlines():
        s = line.strip()
        if not s:
            continue
        if s.startswith("#"):
            m = re.match(r"#\s*nccl-tests version (\S+)(?:.*nccl-library=(\d+))?", s)
            if m:
                info["version"] = m.group(1)
                if m.group(2):
                    info["nccl_library"] = int(m.group(2))
            m = re.match(r"#\s*Avg bus bandwidth\s*:\s*([0-9.eE+-]+)", s)
            if m:
                info["avg_busbw"] = float(m.group(1))
            m = re.match(r"#\s*Out of bounds values\s*:\s*(\d+)", s)
            if m:
                info["out_of_bounds"] = int(m.group(1))
            if re.match(r"#\s+Rank\s+\d+", s):
                info["devices"].append(s.lstrip("# ").strip())
            continue
        toks = s.split()
        if len(toks) < 13 or not toks[0].isdigit() or not toks[1].isdigit():
            continue
        size, count = int(toks[0]), int(toks[1])
        type_name, redop, root = toks[2], toks[3], toks[4]
        for mode, (t, a, b, w) in (("out-of-place", toks[5:9]), ("in-place", toks[9:13])):
            tv, av, bv = _num(t), _num(a), _num(b)
            if tv is None:
                continue
            rows.append({
                "collective": collective, "size": size, "count": count, "type": type_name, "redop": redop,
                "root": int(root) if root.lstrip("-").isdigit() else root, "mode": mode, "time_us": tv,
                "algbw": av, "busbw": bv, "wrong": None if w == "N/A" else int(float(w)),
            })
    info["rows"] = rows
    return info
