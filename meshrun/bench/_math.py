"""The arithmetic of the benchmark, exactly as nccl-tests does it. Pure Python, no torch.

Every number here can be checked by hand:

* a size sweep goes ``size = min; while size <= max: ...; size *= factor`` (or ``+= step`` when the
  factor is 1), the loop of nccl-tests' ``-b/-e/-f/-i``;
* for each requested size the element counts of the collective are those of nccl-tests'
  ``*GetCollByteCount`` functions: all_gather, reduce_scatter and alltoall round the per-rank count down
  to a multiple of 16 bytes, so the size that is reported is ``max(send bytes, receive bytes)``;
* ``algbw = size / time`` in GB/s with GB = 1e9 bytes; ``busbw = algbw x factor`` with the factor
  ``2(n-1)/n`` for all_reduce, ``(n-1)/n`` for all_gather, reduce_scatter and alltoall, ``1`` for
  broadcast and sendrecv;
* the table is printed with nccl-tests' own column widths and its ``getFloatStr`` rounding.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "alltoall", "broadcast", "sendrecv")
MODES = ("out-of-place", "in-place")

# collective -> the nccl-tests binary that measures it
NCCL_TESTS_BINARY = {c: f"{c}_perf" for c in COLLECTIVES}

# dtype name -> (bytes per element, nccl-tests' name for it)
DTYPES: dict[str, tuple[int, str]] = {
    "float32": (4, "float"),
    "float16": (2, "half"),
    "bfloat16": (2, "bfloat16"),
    "float64": (8, "double"),
    "int8": (1, "int8"),
    "uint8": (1, "uint8"),
    "int32": (4, "int32"),
    "int64": (8, "int64"),
}
DTYPE_ALIASES = {
    "float": "float32",
    "fp32": "float32",
    "half": "float16",
    "fp16": "float16",
    "bf16": "bfloat16",
    "double": "float64",
    "fp64": "float64",
    "int": "int32",
    "char": "int8",
}

# the largest integer each dtype holds exactly (and, for the integer types, without overflow in a sum):
# the correctness check uses small integer values so that every partial sum is exact
EXACT_LIMIT = {
    "float32": 2**24,
    "float16": 2**11,
    "bfloat16": 2**8,
    "float64": 2**53,
    "int8": 127,
    "uint8": 254,  # 255 is the poison value for uint8
    "int32": 2**31 - 1,
    "int64": 2**63 - 1,
}


def canonical_dtype(name: str) -> str:
    key = str(name).strip().lower()
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return key


def canonical_collective(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    key = {"allreduce": "all_reduce", "allgather": "all_gather", "reducescatter": "reduce_scatter",
           "all_to_all": "alltoall", "all2all": "alltoall", "bcast": "broadcast", "send_recv": "sendrecv",
           "p2p": "sendrecv"}.get(key, key)
    if key not in COLLECTIVES:
        raise ValueError(f"unknown collective {name!r}; choose from: {', '.join(COLLECTIVES)}")
    return key


def parse_collectives(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """"all", "all_reduce,all_gather" or a list -> canonical names, in the order given, without repeats."""
    if value is None:
        return ("all_reduce",)
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for it in items:
        it = str(it).strip()
        if not it:
            continue
        names = COLLECTIVES if it.lower() == "all" else (canonical_collective(it),)
        for n in names:
            if n not in out:
                out.append(n)
    if not out:
        raise ValueError("no collective given; choose from: all, " + ", ".join(COLLECTIVES))
    return tuple(out)


# ---- sizes -----------------------------------------------------------------------------------------

_BYTES_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_BYTE_UNITS = {
    "": 1, "b": 1,
    # bare K/M/G/T are binary, as in nccl-tests (-e 8G is 8 GiB)
    "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
    "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
    # explicit decimal units
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
}


def parse_bytes(value: object) -> int:
    """Bytes from 8, "64K", "8G" (binary, as nccl-tests reads them), "512MiB" or "1GB" (decimal)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number of bytes such as 8, 64K, 8G or 512MiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size must not be negative, got {value}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"expected a number of bytes, got {value!r}")
        return int(value)
    m = _BYTES_RE.match(str(value))
    if not m or m.group(2).lower() not in _BYTE_UNITS:
        raise ValueError(f"expected a number of bytes such as 8, 64K, 8G or 512MiB, got {value!r}")
    n = float(m.group(1)) * _BYTE_UNITS[m.group(2).lower()]
    if n > 2**50:
        raise ValueError(f"size {value!r} is too large")
    return int(n)


def sweep(min_bytes: int, max_bytes: int, factor: int = 2, step_bytes: int | None = None) -> list[int]:
    """The requested sizes, in nccl-tests' loop order."""
    if min_bytes < 1:
        raise ValueError(f"the smallest size must be at least 1 byte, got {min_bytes}")
    if max_bytes < min_bytes:
        raise ValueError(f"the largest size ({max_bytes}) is below the smallest ({min_bytes})")
    if factor is None or factor <= 1:
        if not step_bytes or step_bytes < 1:
            raise ValueError("give a factor of at least 2 or a step of at least 1 byte")
    elif factor != int(factor):
        raise ValueError(f"the factor must be a whole number (nccl-tests' -f), got {factor}")
    out = []
    size = min_bytes
    while size <= max_bytes:
        out.append(size)
        size = size * int(factor) if factor and factor > 1 else size + int(step_bytes or 0)
        if len(out) > 100000:
            raise ValueError("that sweep has more than 100000 sizes")
    return out


@dataclass(frozen=True)
class Counts:
    """Element counts of one collective at one requested size (nccl-tests' GetCollByteCount)."""

    send: int  # elements in each rank's send buffer
    recv: int  # elements in each rank's receive buffer
    param: int  # the count passed to the collective (per rank for all_gather/reduce_scatter/alltoall)
    send_inplace_offset: int  # in-place: the send pointer is recvbuff + offset x rank (elements)
    recv_inplace_offset: int  # in-place: the receive pointer is recvbuff + offset x rank (elements)
    elt_size: int

    @property
    def size(self) -> int:
        """The size nccl-tests reports: max(send, receive) bytes."""
        return max(self.send, self.recv) * self.elt_size

    @property
    def send_bytes(self) -> int:
        return self.send * self.elt_size

    @property
    def recv_bytes(self) -> int:
        return self.recv * self.elt_size


def counts(collective: str, size: int, elt_size: int, nranks: int) -> Counts:
    coll = canonical_collective(collective)
    if nranks < 1:
        raise ValueError("nranks must be at least 1")
    count = size // elt_size
    align = ~(max(16 // elt_size, 1) - 1)
    if coll in ("all_reduce", "broadcast", "sendrecv"):
        return Counts(count, count, count, 0, 0, elt_size)
    base = (count // nranks) & align
    if coll == "all_gather":
        return Counts(base, base * nranks, base, base, 0, elt_size)
    if coll == "reduce_scatter":
        return Counts(base * nranks, base, base, 0, base, elt_size)
    # alltoall
    return Counts(base * nranks, base * nranks, base, 0, 0, elt_size)


def busbw_factor(collective: str, nranks: int) -> float:
    coll = canonical_collective(collective)
    n = int(nranks)
    if n < 1:
        raise ValueError("nranks must be at least 1")
    if coll == "all_reduce":
        return 2.0 * (n - 1) / n
    if coll in ("all_gather", "reduce_scatter", "alltoall"):
        return (n - 1) / n
    return 1.0


def algbw(size: int, seconds: float) -> float:
    """GB/s (1 GB = 1e9 bytes) for ``size`` bytes in ``seconds``."""
    if seconds <= 0:
        return float("inf") if size else 0.0
    return size / 1.0e9 / seconds


def busbw(collective: str, size: int, seconds: float, nranks: int) -> float:
    return algbw(size, seconds) * busbw_factor(collective, nranks)


def reduce_times(times: Sequence[float], how: str = "avg") -> float:
    """Per-rank times reduced as nccl-tests' ``-a``: avg (its default), min, max, or rank0."""
    if not times:
        raise ValueError("no times to reduce")
    if how == "avg":
        return sum(times) / len(times)
    if how == "min":
        return min(times)
    if how == "max":
        return max(times)
    if how == "rank0":
        return times[0]
    raise ValueError(f"unknown reduction {how!r}; choose avg, min, max or rank0")


def sum_table(nranks: int, modulus: int) -> list[int]:
    """T[c] = sum over ranks s of ((c + 3 s) mod m): the exact reduced value at an index i with
    i mod m = c, for the check pattern value(rank, i) = (i + 3 rank) mod m."""
    return [sum((c + 3 * s) % modulus for s in range(nranks)) for c in range(modulus)]


def pattern_modulus(dtype: str, nranks: int) -> int:
    """The modulus m of the check pattern: values 0..m-1, small enough that a sum over all ranks is exact."""
    limit = EXACT_LIMIT[canonical_dtype(dtype)]
    return max(1, min(16, limit // max(nranks, 1) + 1))


def poison_value(dtype: str) -> int:
    """A value the check pattern never produces, written into outputs before the checked run."""
    return 255 if canonical_dtype(dtype) == "uint8" else -1


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    if not s:
        raise ValueError("no values")
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


# ---- nccl-tests' text formatting ----------------------------------------------------------------------


def float_str(value: float | None, width: int) -> str:
    """nccl-tests' getFloatStr: the most decimals (2, 1, 0) that fit the width, else scientific."""
    if value is None:
        return "n/a".rjust(width)
    for fmt in ("%*.2f", "%*.1f", "%*.0f"):
        s = fmt % (width, value)
        if len(s) <= width:
            return s
    s = ("%*.1e" if width >= 7 else "%*.0e") % (width, value)
    return s[:width]


def table_header() -> list[str]:
    blank = ("", "", "", "", "")
    return [
        "# %10s  %12s  %8s  %6s  %6s           out-of-place                       in-place          " % blank,
        "# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s  %6s  %7s  %6s  %6s  %6s " % (
            "size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong", "time", "algbw",
            "busbw", "#wrong"),
        "# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s  %6s  %7s  %6s  %6s  %6s " % (
            "(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)", ""),
    ]


def line_preamble(size: int, count: int, type_name: str, op_name: str, root: int) -> str:
    return "%12d  %12d  %8s  %6s  %6s" % (size, count, type_name, op_name, "%6i" % root)


def line_body(time_us: float | None, algbw_gbs: float | None, busbw_gbs: float | None,
              wrong: int | None, available: bool = True) -> str:
    if not available:
        return "  %7s  %6s  %6s  %6s" % ("n/a", "n/a", "n/a", "n/a")
    t = float_str(time_us, 7)
    a = float_str(algbw_gbs, 6)
    b = float_str(busbw_gbs, 6)
    if wrong is None:
        return "  %7s  %6s  %6s    N/A" % (t, a, b)
    return "  %7s  %6s  %6s  %6g" % (t, a, b, float(wrong))


def redop_and_root(collective: str) -> tuple[str, int]:
    coll = canonical_collective(collective)
    if coll in ("all_reduce", "reduce_scatter", "sendrecv"):
        return "sum", -1
    if coll == "broadcast":
        return "none", 0
    return "none", -1
