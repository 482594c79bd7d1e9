"""JobState: where a job is in its life (its own module so that reading the job store loads nothing else)."""

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
