"""The backend contract: small on purpose.

``check() -> Availability`` (cheap, never raises) · ``offers(spec) -> list[Offer]`` · ``submit(submission,
offer) -> backend job id`` · ``status(refs) -> {id: JobStatus}`` (batched) · ``cancel(ref)`` · ``logs(ref)``.
Every call about a submitted job gets a :class:`JobRef`: the backend's id carrying the job's folder, so a
backend never rebuilds a job's path from the configuration.

The core pickles, stages and collects results; a backend only gets the job's supervisor (the host agent,
``python3 _agent.py run JOB_DIR``) or the user's command running on the resources it offered, and maps its
states to :class:`JobState`.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Mapping, Sequence

from ._state import JobState as JobState  # defined apart: reading the job store needs nothing else here
from ._state import agent_status_fields

if TYPE_CHECKING:  # pragma: no cover
    from ._spec import JobSpec


@dataclass(frozen=True)
class JobStatus:
    """One backend's answer about one job."""

    state: JobState
    reason: str | None = None  # why it waits or how it ended, in the backend's words
    exit_code: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    where: str | None = None  # host, node list, pod, region
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.state.terminal


class Feature(enum.Flag):
    NONE = 0
    COMMANDS = enum.auto()
    FUNCTIONS = enum.auto()
    GPUS = enum.auto()
    MULTI_NODE = enum.auto()
    ARRAYS = enum.auto()  # submit_array is one native submission, not a loop
    LOGS_FOLLOW = enum.auto()
    REATTACH = enum.auto()  # find(job_id) can rediscover a job without its backend id
    SPOT = enum.auto()
    SECRETS = enum.auto()  # passes Submission.secrets to the job without writing them anywhere
    DATA = enum.auto()  # runs the spec's inputs/outputs (the agent's stager on the node, docs/data.md)


@dataclass(frozen=True)
class Availability:
    """Whether a backend can be used at all right now, and if not, why and how to fix it."""

    ok: bool
    reason: str = ""
    hint: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.ok


EXPECTED_NOW = 0.0


@dataclass(frozen=True, slots=True)
class Offer:
    """A place where a job could run, with its price and when it could start.

    ``price_per_hour`` is per node; ``total_price_per_hour`` multiplies by nodes. ``expected_start`` is in
    seconds from now: 0 means now, None means unknown. An offer with ``fits=False`` is kept (with its
    ``reason``) so placement can explain every rejection.
    """

    backend: str
    where: str
    gpus: int = 0
    gpu_type: str | None = None
    gpu_memory: int | None = None
    cpus: float | None = None
    memory: int | None = None
    nodes: int = 1
    price_per_hour: float = 0.0
    spot: bool = False
    expected_start: float | None = EXPECTED_NOW
    start_note: str = "now"
    fits: bool = True
    reason: str | None = None
    instance_type: str | None = None
    region: str | None = None
    launcher: str | None = None  # the backend that would launch it, when not ``backend`` itself
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def total_price_per_hour(self) -> float:
        return self.price_per_hour * self.nodes

    @property
    def key(self) -> str:
        """Stable identity of the offer, used for deterministic tie-breaking and history."""
        parts = [self.backend, self.where, self.instance_type or "", "spot" if self.spot else "on-demand"]
        return "/".join(p for p in parts if p)

    def rejected(self, reason: str) -> "Offer":
        return replace(self, fits=False, reason=reason)

    def describe(self) -> str:
        res = f"{self.nodes}x " if self.nodes > 1 else ""
        if self.gpus:
            res += f"{self.gpus}x{self.gpu_type or 'GPU'}"
        else:
            res += "CPU"
        price = f"${self.total_price_per_hour:.2f}/h"
        return f"{self.key} ({res}, {price}{', spot' if self.spot else ''})"


@dataclass
class Submission:
    """What a backend gets to submit: the job's id, its local folder (already holding ``launch.json`` and,
    for a function job, ``payload.pkl``), the spec, and the launch description the host agent reads."""

    job_id: str
    job_dir: Path
    spec: "JobSpec"
    launch: dict[str, Any]
    attempt: int = 1

    @property
    def secrets(self) -> dict[str, str]:
        """The job's secret environment variables with their values (``JobSpec.secrets``, a null one taken
        from this process's environment). A backend with ``Feature.SECRETS`` hands them to the job without
        writing them to the job folder, its logs or any file it keeps; they are not in ``launch``."""
        return self.spec.resolved_secrets()

    @property
    def name(self) -> str:
        """The name a backend should give the job so it can be found again: ``meshrun-<job id>``."""
        return f"meshrun-{self.job_id}"

    def files(self) -> list[Path]:
        """The files of the job folder a remote backend must place next to the job."""
        return sorted(p for p in self.job_dir.iterdir() if p.is_file() and p.name in STAGED_FILES)


class JobRef(str):
    """One submitted job as the core hands it to ``status``, ``cancel``, ``logs`` and ``fetch_results``: it *is*
    the backend's id for the job (a ``str``, so it keys the dict ``status`` returns), and carries the job's
    meshrun id (``job_id``) and its local folder (``job_dir``), the one the core made and ``submit`` was given.
    A backend reads what it kept about the job (ids, markers, the records' nonce) from ``job_dir``; it never
    rebuilds a job's path from the configuration. ``JobRef.of(job)`` makes one for a :class:`meshrun.Job`."""

    job_id: str
    job_dir: Path

    def __new__(cls, backend_id: str, job_id: str, job_dir: Path | str) -> "JobRef":
        self = super().__new__(cls, backend_id)
        self.job_id = job_id
        self.job_dir = Path(job_dir)
        return self

    @classmethod
    def of(cls, job: Any) -> "JobRef":
        """The reference of a submitted :class:`meshrun.Job` (ValueError before its backend accepted it)."""
        if job.backend_id is None:
            raise ValueError(f"job {job.id} has no backend id yet")
        return cls(job.backend_id, job.id, job.job_dir)

    @property
    def backend_id(self) -> str:
        return str.__str__(self)

    def __reduce__(self) -> Any:
        return (JobRef, (self.backend_id, self.job_id, self.job_dir))

    # repr() stays the id's own ('123_4'): backends name the id in their messages


STAGED_FILES = ("launch.json", "payload.pkl", "spec.json", "stage.py")

# files the agent writes that a remote backend brings back into the local job folder (the agent's RECORDS)
RESULT_FILES = ("exit.json", "state.json", "result.pkl", "error.json", "error.pkl")


class Backend(ABC):
    """Base class of every backend. Subclasses set ``name`` and implement the abstract methods.

    Constructors must not do I/O: the registry creates backends freely (``meshrun backends`` lists them).
    ``config`` is the backend's table from the meshrun config (``[backends.<name>]``), already merged
    with ``MESHRUN_<NAME>_<KEY>`` environment variables.
    """

    name: ClassVar[str] = ""
    features: ClassVar[Feature] = Feature.COMMANDS | Feature.FUNCTIONS
    #: without Feature.DATA: why the backend cannot run a spec's inputs/outputs (placement shows it)
    data_refusal: ClassVar[str] = ""
    install_hint: ClassVar[str] = ""
    #: the typed ``[backends.<name>]`` table (a ``meshrun.backend.BackendSettings`` subclass); the base loads it
    #: into ``self.settings`` when the backend is created, so a bad setting is a ConfigError naming the key
    settings_model: ClassVar[Any] = None
    #: the typed ``backend_options[<name>]`` of a job (a ``meshrun.backend.BackendOptions`` subclass); the core
    #: validates every job's options against it before placement, and ``self.options(spec)`` returns it
    options_model: ClassVar[Any] = None
    #: True for a backend that can always be used (this machine): placement then asks ``offers()`` straight
    #: away, without ``check()`` first (whose detail, e.g. the local GPU inventory, may cost more than the offer)
    always_available: ClassVar[bool] = False

    @property
    def poll_interval(self) -> tuple[float, float]:
        """How often to poll a job's status: (first interval, longest interval) in seconds. A backend
        overrides it with a class attribute (``poll_interval = (0.05, 5.0)``) or a property."""
        return (0.5, 10.0)

    @property
    def shared_filesystem(self) -> bool:
        """True when jobs see the submitter's filesystem (the job folder and the working directory at the
        same paths): the core then places ``files`` locally before submit, and results need no fetching.
        A backend overrides it with a class attribute or a property."""
        return False

    def __init__(self, config: Mapping[str, Any] | None = None):
        self.config: dict[str, Any] = dict(config or {})
        model = type(self).settings_model
        self.settings: Any = model.load(self.name, self.config) if model is not None else None

    def options(self, spec: "JobSpec") -> Any:
        """The job's ``backend_options[<name>]`` validated by ``options_model`` (None without a model)."""
        model = type(self).options_model
        return model.load(self.name, spec.options_for(self.name)) if model is not None else None

    # -- required
    @abstractmethod
    def check(self) -> Availability:
        """Cheap and never raising: can this backend be used right now?"""

    @abstractmethod
    def offers(self, spec: "JobSpec") -> list[Offer]:
        """Where this backend could run ``spec``, priced, with ``fits=False`` offers saying why not."""

    @abstractmethod
    def submit(self, submission: Submission, offer: Offer | None = None) -> str:
        """Start the job; return the backend's id for it."""

    @abstractmethod
    def status(self, refs: Sequence[JobRef]) -> dict[str, JobStatus]:
        """The status of many jobs at once (one call to the scheduler, not one per job), keyed by backend id.
        Each :class:`JobRef` carries the job's folder (``ref.job_dir``)."""

    @abstractmethod
    def cancel(self, ref: JobRef) -> None:
        """Stop the job and everything it started."""

    @abstractmethod
    def logs(self, ref: JobRef, *, follow: bool = False) -> Iterator[str]:
        """The job's output as text chunks; with ``follow``, keep yielding until the job ends."""

    # -- optional
    def submit_array(self, submissions: Sequence[Submission], offer: Offer | None = None) -> list[str]:
        """Submit many jobs of one shape; backends with native arrays override this."""
        return [self.submit(s, offer) for s in submissions]

    def fetch_results(self, ref: JobRef, job_dir: Path) -> None:
        """Bring the agent's records (``RESULT_FILES``) back into ``job_dir`` (``ref.job_dir``, or the folder of
        an attempt being kept); no-op on a shared filesystem. Write them with ``meshrun.backend.write_records``;
        from a log, read them with ``extract_records``."""

    def find(self, job_id: str, job_dir: Path) -> str | None:
        """The backend id of a meshrun job whose submitter died before recording it (found by the markers
        ``submit`` left in ``job_dir``, or by its name or label at the scheduler), or None."""
        return None

    def native(self, submission: Submission, offer: Offer | None = None) -> str:
        """What ``submit`` would hand the scheduler for ``submission``, as text a person can read and port
        (a batch script, a task YAML, manifests), without submitting anything; secret values are shown as
        ``<redacted>``. ``meshrun show --native`` prints it. Backends that can say override this."""
        raise NotImplementedError(f"the {self.name} backend cannot show what it submits")

    def close(self) -> None:
        """Release connections and helper processes."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def wait_interval(start: float, first: float, longest: float) -> float:
    """Polling back-off: begins at ``first`` and grows with the time already waited, up to ``longest``."""
    waited = time.monotonic() - start
    return min(longest, max(first, waited / 10.0))


def map_agent_status(rec: Mapping[str, Any]) -> JobStatus:
    """Translate one agent status record (``exit.json``/``state.json``) into a :class:`JobStatus`."""
    return JobStatus(**agent_status_fields(dict(rec)))
