"""Parsing and formatting of sizes, durations and GPU requests. No third-party imports."""

from __future__ import annotations

import math
import re
import sys

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")

SIZE_HELP = 'a size such as "32GiB", "512MiB", "16GB" or a number of bytes'


def parse_size(value: object) -> int:
    """Bytes from "32GiB", "512MB", "1.5TiB" or an int. Raises ValueError with what is allowed."""
    if isinstance(value, bool):
        raise ValueError(f"expected {SIZE_HELP}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"expected {SIZE_HELP}, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected {SIZE_HELP}, got {type(value).__name__}")
    m = _SIZE_RE.match(value)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected {SIZE_HELP}, got {value!r}")
    n = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if not math.isfinite(n) or n > 2**62:
        raise ValueError(f"size {value!r} is too large")
    return int(n)


def format_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, f in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= f:
            v = n / f
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"


DURATION_HELP = 'a duration such as "90s", "45m", "1h30m", "2d", "01:30:00", "1-12:00:00" or seconds'
_DUR_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(d|h|m|s|ms)", re.I)
_DUR_FACTOR = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(value: object) -> float:
    """Seconds from "1h30m", "90s", "01:30:00", "1-00:00:00" (Slurm's D-HH:MM:SS), a timedelta or a number."""
    if isinstance(value, bool):
        raise ValueError(f"expected {DURATION_HELP}, got {value!r}")
    dt = sys.modules.get("datetime")  # a timedelta exists only once datetime is imported: not imported here
    if dt is not None and isinstance(value, dt.timedelta):
        secs = value.total_seconds()
    elif isinstance(value, (int, float)):
        secs = float(value)
    elif isinstance(value, str):
        s = value.strip()
        parsed = _parse_duration_str(s)
        if parsed is None:
            raise ValueError(f"expected {DURATION_HELP}, got {value!r}")
        secs = parsed
    else:
        raise ValueError(f"expected {DURATION_HELP}, got {type(value).__name__}")
    if not math.isfinite(secs) or secs <= 0:
        raise ValueError(f"must be a positive duration, got {value!r}")
    if secs > 366 * 86400:
        raise ValueError(f"must be at most a year, got {value!r}")
    return secs


def _parse_duration_str(s: str) -> float | None:
    if not s:
        return None
    try:
        return float(s)
    except ValueError:
        pass
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{1,2})(?::(\d{1,2}))?", s)
    if m:
        d, a, b, c = m.groups()
        if c is None:  # MM:SS
            secs = int(a) * 60 + int(b)
        else:
            secs = int(a) * 3600 + int(b) * 60 + int(c)
        return secs + int(d or 0) * 86400
    pos, total = 0, 0.0
    compact = s.replace(" ", "")
    for m in _DUR_PART.finditer(compact):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _DUR_FACTOR[m.group(2).lower()]
        pos = m.end()
    if pos != len(compact) or pos == 0:
        return None
    return total


def format_duration(secs: float | None) -> str:
    if secs is None:
        return "-"
    secs = float(secs)
    if secs < 1:
        return f"{secs * 1000:.0f}ms"
    if secs < 60:
        return f"{secs:.1f}s" if secs < 10 else f"{secs:.0f}s"
    m, s = divmod(int(round(secs)), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    if d:
        return f"{d}d{h}h" if h else f"{d}d"
    if h:
        return f"{h}h{m:02d}m" if m else f"{h}h"
    return f"{m}m{s:02d}s" if s else f"{m}m"


def slurm_time(secs: float) -> str:
    """Seconds as Slurm's D-HH:MM:SS (rounded up to whole minutes, Slurm's granularity)."""
    mins = max(1, math.ceil(secs / 60))
    d, rem = divmod(mins, 1440)
    h, m = divmod(rem, 60)
    return f"{d}-{h:02d}:{m:02d}:00" if d else f"{h:02d}:{m:02d}:00"


GPU_HELP = 'a GPU count (2) or a type and count ("H100:8", "MI300X:8", "A100-80GB:4"); a type alone means one GPU'
_GPU_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def parse_gpus(value: object) -> tuple[int, str | None]:
    """(count, type) from 2, "2", "H100:8", "H100"."""
    if value is None:
        return 0, None
    if isinstance(value, bool):
        raise ValueError(f"expected {GPU_HELP}, got {value!r}")
    if isinstance(value, int):
        count, gtype = value, None
    elif isinstance(value, float) and value.is_integer():
        count, gtype = int(value), None
    elif isinstance(value, str):
        s = value.strip()
        if s.isdigit():
            count, gtype = int(s), None
        elif ":" in s:
            gtype, _, c = s.rpartition(":")
            if not c.isdigit():
                raise ValueError(f"expected {GPU_HELP}, got {value!r}")
            count = int(c)
        else:
            gtype, count = s, 1
        if gtype is not None and not _GPU_TYPE_RE.match(gtype):
            raise ValueError(
                f"GPU type {gtype!r} may hold only letters, digits, '-', '_' and '.' (got {value!r})"
            )
    else:
        raise ValueError(f"expected {GPU_HELP}, got {type(value).__name__}")
    if count < 0:
        raise ValueError(f"GPU count must not be negative, got {value!r}")
    if count > 1024:
        raise ValueError(f"GPU count must be at most 1024 per node, got {value!r}")
    if gtype is not None and count == 0:
        raise ValueError(f"a GPU type needs a count of at least 1, got {value!r}")
    return count, gtype
