"""NCCL helpers: what NCCL's debug log says it chose, and out-of-place calls on torch's communicator.

torch.distributed has no out-of-place all_reduce or broadcast, but NCCL has (nccl-tests measures both).
On CUDA the worker calls ``ncclAllReduce(send, recv, ...)`` and ``ncclBroadcast(send, recv, ...)`` through
ctypes on the very communicator torch created (``ProcessGroupNCCL._comm_ptr()``), on the current stream, and
only when the NCCL library torch loaded is already in this process (never a second copy). Where any of that
is missing the out-of-place column of those two collectives is reported as not available.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

# NCCL INFO AllReduce: 4194304 Bytes -> Algo RING proto SIMPLE channel{Lo..Hi}={0..15} [comm 0x...]
_TUNING = re.compile(
    r"NCCL INFO (AllReduce|AllGather|ReduceScatter|Broadcast|Reduce|AllToAll|SendRecv): (\d+) Bytes -> "
    r"Algo (\w+) proto (\w+)(?: channel\{Lo\.\.Hi\}=\{(\d+)\.\.(\d+)\})?"
)
_VERSION = re.compile(r"NCCL INFO NCCL version ([0-9][^\s]*)")

NCCL_FUNC = {
    "all_reduce": "AllReduce",
    "all_gather": "AllGather",
    "reduce_scatter": "ReduceScatter",
    "broadcast": "Broadcast",
}


def parse_tuning(text: str) -> dict[tuple[str, int], dict[str, Any]]:
    """{(NCCL function, bytes): {"algo", "proto", "channels"}} from NCCL's TUNING lines; where one size was
    seen with several choices, the most frequent wins."""
    seen: dict[tuple[str, int], Counter] = {}
    for m in _TUNING.finditer(text):
        func, nbytes, algo, proto, lo, hi = m.groups()
        chans = int(hi) - int(lo) + 1 if lo is not None and hi is not None else None
        seen.setdefault((func, int(nbytes)), Counter())[(algo.upper(), proto.upper(), chans)] += 1
    out = {}
    for key, cnt in seen.items():
        (algo, proto, chans), _ = cnt.most_common(1)[0]
        out[key] = {"algo": algo, "proto": proto, "channels": chans}
    return out


def nccl_version_from_log(text: str) -> str | None:
    m = _VERSION.search(text)
    return m.group(1) if m else None


def tuning_key(collective: str, param_count: int, elt_size: int) -> tuple[str, int] | None:
    """The (function, bytes) NCCL logs for one of our collectives: bytes = its count argument x element size
    (per rank for all_gather and reduce_scatter)."""
    func = NCCL_FUNC.get(collective)
    if func is None:
        return None
    return func, param_count * elt_size


# ---- direct calls -------------------------------------------------------------------------------------

_NCCL_DTYPE = {"int8": 0, "uint8": 1, "int32": 2, "int64": 4, "float16": 6, "float32": 7, "float64": 8,
               "bfloat16": 9}
_NCCL_SUM = 0


class DirectNccl:
    """ncclAllReduce / ncclBroadcast with separate send and receive buffers on torch's communicator."""

    def __init__(self, lib: Any, comm: int, torch: Any):
        self._lib = lib
        self._comm = comm
        self._torch = torch

    @classmethod
    def attach(cls, group: Any, device: Any, torch: Any) -> tuple["DirectNccl | None", str]:
        """(instance, "") or (None, why not)."""
        import ctypes

        try:
            backend = group._get_backend(device)
            get_ptr = getattr(backend, "_comm_ptr", None)
            if get_ptr is None:
                return None, "this torch does not expose its NCCL communicator (_comm_ptr)"
            comm = int(get_ptr() if callable(get_ptr) else get_ptr)
            if not comm:
                return None, "torch's NCCL communicator is not created yet"
        except Exception as e:  # pragma: no cover - depends on the torch build
            return None, f"cannot reach torch's NCCL communicator: {type(e).__name__}: {e}"
        path = _loaded_nccl()
        if path is None:
            return None, "no NCCL shared library is loaded in this process (torch may link it statically)"
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:  # pragma: no cover
            return None, f"cannot open {path}: {e}"
        try:
            ver = ctypes.c_int(0)
            if lib.ncclGetVersion(ctypes.byref(ver)) != 0:
                return None, "ncclGetVersion failed"
            want = torch.cuda.nccl.version()
            want_code = want[0] * 10000 + want[1] * 100 + want[2] if isinstance(want, tuple) else int(want)
            if ver.value != want_code:
                return None, f"the loaded NCCL ({ver.value}) is not the one torch reports ({want_code})"
        except Exception as e:  # pragma: no cover
            return None, f"cannot check the NCCL version: {type(e).__name__}: {e}"
        for name in ("ncclAllReduce", "ncclBroadcast"):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_int
        lib.ncclAllReduce.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                      ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.ncclBroadcast.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                      ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        lib.ncclGetErrorString.argtypes = [ctypes.c_int]
        return cls(lib, comm, torch), ""

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = self._lib.ncclGetErrorString(rc)
            raise RuntimeError(f"{what} failed: NCCL error {rc}: {msg.decode() if msg else '?'}")

    def all_reduce(self, send: Any, recv: Any, dtype: str) -> None:
        stream = self._torch.cuda.current_stream().cuda_stream
        rc = self._lib.ncclAllReduce(send.data_ptr(), recv.data_ptr(), send.numel(), _NCCL_DTYPE[dtype], _NCCL_SUM,
                                     self._comm, stream)
        self._check(rc, "ncclAllReduce")

    def broadcast(self, send: Any, recv: Any, dtype: str, root: int = 0) -> None:
        stream = self._torch.cuda.current_stream().cuda_stream
        rc = self._lib.ncclBroadcast(send.data_ptr(), recv.data_ptr(), recv.numel(), _NCCL_DTYPE[dtype], root,
                                     self._comm, stream)
        self._check(rc, "ncclBroadcast")


def _loaded_nccl() -> str | None:
    """The path of the libnccl already mapped into this process, if any."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and "/libnccl.so" in parts[-1]:
                    return parts[-1]
    except OSError:  # pragma: no cover - no /proc
        return None
    return None
