"""JobState: where a job is in its life, and what the host agent's records say of it (their own module so
that reading the job store, and a local job's end, loads nothing else)."""

from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    """Where a job is in its life. TIMEOUT, PREEMPTED and CANCELLED stay distinct from FAILED."""

    SUBMITTING = "submitting"  # meshrun is handing it to a backend
    PENDING = "pending"  # accepted, waiting for resources (a queue, a GPU lease, provisioning)
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    PREEMPTED = "preempted"
    LOST = "lost"  # the backend no longer knows the job and no outcome was recorded
    UNKNOWN = "unknown"  # the backend could not be asked just now (it may still be fine)

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def ok(self) -> bool:
        return self is JobState.SUCCEEDED

    def __str__(self) -> str:
        return self.value


_TERMINAL = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT, JobState.PREEMPTED, JobState.LOST}
)


# the host agent's record states (state.json / exit.json), as every backend reads them
AGENT_STATES = {
    "starting": JobState.PENDING,
    "pending": JobState.PENDING,
    "queued": JobState.PENDING,
    "running": JobState.RUNNING,
    "succeeded": JobState.SUCCEEDED,
    "failed": JobState.FAILED,
    "cancelled": JobState.CANCELLED,
    "timeout": JobState.TIMEOUT,
    "lost": JobState.LOST,
}


def agent_status_fields(rec: dict) -> dict:
    """One agent status record (``exit.json``/``state.json``) as the fields of a ``JobStatus``."""
    state = AGENT_STATES.get(str(rec.get("state")), JobState.UNKNOWN)
    where = rec.get("host")
    gpus = rec.get("gpus")
    if gpus and where:
        where = f"{where} GPU {','.join(str(g.get('index', g)) if isinstance(g, dict) else str(g) for g in gpus)}"
    return {
        "state": state,
        "reason": rec.get("reason"),
        "exit_code": rec.get("exit_code"),
        "started_at": rec.get("started_at"),
        "ended_at": rec.get("ended_at"),
        "where": where,
        "detail": {k: rec[k] for k in ("pid", "position", "gpu_uuids", "containment", "cgroup") if k in rec},
    }
