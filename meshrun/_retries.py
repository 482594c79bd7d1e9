"""How many retries a job has left: a read of its spec file and its history, light enough for the places that
only read jobs (``meshrun ls``, ``status``, ``wait`` see a job end); :mod:`meshrun._attempts` does the retrying."""

from __future__ import annotations

import json
from pathlib import Path

from ._state import JobState

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._backend import JobStatus
    from ._store import JobRecord

RETRY_STATES = (JobState.FAILED, JobState.PREEMPTED, JobState.LOST)


def spec_retries(job_dir: Path | str) -> int:
    """The ``retries`` of the job's spec.json, read as JSON (the spec model and pydantic are not loaded): 0 when
    the file is unreadable or the value is not one ``JobSpec`` accepts (a whole number from 0 to 100), as
    ``JobSpec.retries`` defaults to 0. The file is one meshrun wrote from a validated spec."""
    try:
        data = json.loads((Path(job_dir) / "spec.json").read_bytes())
    except (OSError, ValueError):
        return 0
    v = data.get("retries", 0) if isinstance(data, dict) else 0
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 100:
        return 0
    return v


def retries_left(rec: JobRecord, job_dir: Path, status: JobStatus) -> int:
    """How many retries the job has left if its attempt ended with ``status`` (0: this outcome is final).
    A read: it looks at the spec and the history, and changes nothing."""
    if status.state not in RETRY_STATES or not rec.backend:
        return 0
    retries = spec_retries(job_dir)
    if not retries:
        return 0
    used = sum(1 for h in rec.history if h.get("event") == "retry")
    return max(0, retries - used)
