"""What one benchmark run measures: validated on the submitting side, sent to the job as plain JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from .._errors import MeshrunError
from . import _math

GRAPH_CHOICES = ("auto", "on", "off")
AVERAGE_CHOICES = ("avg", "min", "max", "rank0")
PAIRWISE_CHOICES = ("nodes", "gpus", "ranks")

# graph "auto": the calls are launched one by one, as nccl-tests does; where the host took at least this
# fraction of the device time to launch them (torch.distributed costs some 25-45 us a call, more than a small
# collective takes), the GPU may have waited for Python, so they are timed again launched as one CUDA graph
GRAPH_AUTO_HOST_FRACTION = 0.7
TIMER_CHOICES = ("events", "wall")


class BenchError(MeshrunError):
    """The benchmark cannot run as asked (bad options, a size that does not fit, a rank that failed)."""


@dataclass
class BenchOptions:
    collectives: tuple[str, ...] = ("all_reduce",)
    min_bytes: int = 8
    max_bytes: int = 128 * 1024**2
    factor: int = 2
    step_bytes: int | None = None
    dtype: str = "float32"
    warmup: int = 5
    iters: int = 20
    modes: tuple[str, ...] = _math.MODES
    device: str = "cuda"  # "cuda" (NCCL, one process per GPU) or "cpu" (gloo, procs_per_node processes)
    procs_per_node: int | None = None  # CPU ranks per node (cpu); GPUs per node come from the job
    graph: str = "auto"
    timer: str = "events"  # CUDA events from a common start (events) or the host clock (wall); CPUs use wall
    average: str = "avg"
    check: bool = True
    pairwise: str | None = None
    pairwise_bytes: int | None = None
    pairwise_threshold: float = 0.8
    compare_nccl_tests: str | None = None
    nccl_info: bool = True  # read NCCL's algorithm/protocol choice from its debug log
    timeout: float = 600.0  # seconds for rendezvous and for any one collective to finish
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self.collectives = _math.parse_collectives(self.collectives)
            self.dtype = _math.canonical_dtype(self.dtype)
            self.min_bytes = _math.parse_bytes(self.min_bytes)
            self.max_bytes = _math.parse_bytes(self.max_bytes)
            self.step_bytes = None if self.step_bytes in (None, 0, "") else _math.parse_bytes(self.step_bytes)
            self.factor = int(self.factor) if self.factor is not None else 1
            _math.sweep(self.min_bytes, self.max_bytes, self.factor, self.step_bytes)
        except ValueError as e:
            raise BenchError(str(e)) from None
        modes = (self.modes,) if isinstance(self.modes, str) else tuple(self.modes)
        norm: list[str] = []
        for m in modes:
            m = str(m).strip().lower().replace("_", "-")
            m = {"both": "both", "oop": "out-of-place", "out": "out-of-place", "in": "in-place",
                 "inplace": "in-place", "outofplace": "out-of-place"}.get(m, m)
            if m == "both":
                norm.extend(_math.MODES)
            elif m in _math.MODES:
                norm.append(m)
            else:
                raise BenchError(f"unknown mode {m!r}; choose out-of-place, in-place or both")
        self.modes = tuple(x for x in _math.MODES if x in norm)
        if self.device not in ("cuda", "cpu"):
            raise BenchError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        for name in ("warmup", "iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "warmup" else 1):
                raise BenchError(f"{name} must be a whole number{' of at least 1' if name == 'iters' else ''}, "
                                 f"got {v!r}")
        if self.procs_per_node is not None and (not isinstance(self.procs_per_node, int) or self.procs_per_node < 1):
            raise BenchError(f"procs_per_node must be a whole number of at least 1, got {self.procs_per_node!r}")
        if self.graph not in GRAPH_CHOICES:
            raise BenchError(f"graph must be one of {', '.join(GRAPH_CHOICES)}, got {self.graph!r}")
        if self.timer not in TIMER_CHOICES:
            raise BenchError(f"timer must be one of {', '.join(TIMER_CHOICES)}, got {self.timer!r}")
        if self.average not in AVERAGE_CHOICES:
            raise BenchError(f"average must be one of {', '.join(AVERAGE_CHOICES)}, got {self.average!r}")
        if self.pairwise is not None and self.pairwise not in PAIRWISE_CHOICES:
            raise BenchError(f"pairwise must be one of {', '.join(PAIRWISE_CHOICES)}, got {self.pairwise!r}")
        if self.pairwise_bytes is not None:
            try:
                self.pairwise_bytes = _math.parse_bytes(self.pairwise_bytes)
            except ValueError as e:
                raise BenchError(str(e)) from None
            if self.pairwise_bytes < 1:
                raise BenchError("pairwise_bytes must be at least 1")
        if not 0 < float(self.pairwise_threshold) <= 1:
            raise BenchError(f"the pairwise threshold is a fraction of the median in (0, 1], got "
                             f"{self.pairwise_threshold!r}")
        self.pairwise_threshold = float(self.pairwise_threshold)
        if float(self.timeout) <= 0:
            raise BenchError("timeout must be positive")
        self.timeout = float(self.timeout)
        self.env = {str(k): str(v) for k, v in dict(self.env or {}).items()}

    @property
    def elt_size(self) -> int:
        return _math.DTYPES[self.dtype][0]

    @property
    def sizes(self) -> list[int]:
        return _math.sweep(self.min_bytes, self.max_bytes, self.factor, self.step_bytes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["collectives"] = list(self.collectives)
        d["modes"] = list(self.modes)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BenchOptions":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise BenchError(f"unknown benchmark option(s): {', '.join(unknown)}")
        return cls(**dict(data))
