"""Function payloads: cloudpickle of (fn, args, kwargs) behind a one-line JSON header that stamps the
Python and cloudpickle versions, so a mismatch on the other side fails with a clear message instead of a
random unpickling error."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

from ._errors import SpecError
from ._units import format_size

DEFAULT_MAX_BYTES = 512 * 1024**2


def versions() -> dict[str, str]:
    import cloudpickle

    from ._version import __version__

    return {
        "python": "%d.%d" % sys.version_info[:2],
        "cloudpickle": cloudpickle.__version__,
        "meshrun": __version__,
    }


def dumps(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
          max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    import cloudpickle

    target = getattr(fn, "__meshrun_function__", fn)
    try:
        body = cloudpickle.dumps((target, tuple(args), dict(kwargs)))
    except Exception as e:
        raise SpecError(
            "function",
            f"cannot pickle {getattr(target, '__qualname__', target)!r} with its arguments: "
            f"{type(e).__name__}: {e}. Objects such as open files, locks, sockets and live CUDA tensors cannot "
            "travel to a job; pass paths or plain data instead",
        ) from None
    if len(body) > max_bytes:
        raise SpecError(
            "args",
            f"the pickled function and arguments take {format_size(len(body))}, more than the "
            f"{format_size(max_bytes)} limit; pass large data as files (files=...) or paths instead",
        )
    stamp = versions()
    code = getattr(target, "__code__", None)
    if code is not None and not code.co_filename.startswith("<"):
        stamp["filename"] = code.co_filename  # restored on the other side for readable tracebacks
    header = json.dumps(stamp, sort_keys=True).encode() + b"\n"
    return header + body


def loads_result(data: bytes) -> Any:
    import pickle

    return pickle.loads(data)
