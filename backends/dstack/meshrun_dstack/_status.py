"""dstack run and job statuses -> meshrun.backend.JobStatus: the one translation table.

A dstack run has a status (``RunStatus``) and, once it ends, a ``termination_reason``; each of its jobs
has submissions with their own status (``JobStatus``, which adds ``pulling`` and ``aborted``) and their
own termination reason and message. The run's status decides the meshrun state; a job's termination
reason refines how a finished run ended (a spot interruption is PREEMPTED, a max-duration stop is
TIMEOUT); the messages become the reason.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Mapping

import meshrun.backend as mb

S = mb.JobState

#: RunStatus -> JobState while the run is not finished
RUN_STATES: dict[str, Any] = {
    "pending": S.PENDING,  # waiting to be (re)submitted: retrying after no capacity, or scheduled
    "submitted": S.PENDING,  # accepted, looking for an instance
    "provisioning": S.PENDING,  # an instance is being started / the container prepared
    "running": S.RUNNING,
    "terminating": None,  # decided below: it keeps the state it had until it is terminated
    "terminated": S.CANCELLED,  # refined by the termination reason
    "failed": S.FAILED,  # refined by the termination reason
    "done": S.SUCCEEDED,
}

#: JobStatus (of the latest job submission) -> JobState, used while a run is active
JOB_STATES: dict[str, Any] = {
    "submitted": S.PENDING,
    "provisioning": S.PENDING,
    "pulling": S.PENDING,  # the container image is being pulled
    "running": S.RUNNING,
    "terminating": S.RUNNING,
    "terminated": S.CANCELLED,
    "aborted": S.CANCELLED,
    "failed": S.FAILED,
    "done": S.SUCCEEDED,
}

#: RunTerminationReason -> JobState for a finished run
RUN_TERMINATION: dict[str, Any] = {
    "all_jobs_done": S.SUCCEEDED,
    "job_failed": S.FAILED,
    "retry_limit_exceeded": S.FAILED,
    "stopped_by_user": S.CANCELLED,
    "aborted_by_user": S.CANCELLED,
    "server_error": S.FAILED,
    "gateway_error": S.FAILED,
}

#: JobTerminationReason -> JobState where it says more than the run's reason does
JOB_TERMINATION: dict[str, Any] = {
    "failed_to_start_due_to_no_capacity": S.FAILED,
    "interrupted_by_no_capacity": S.PREEMPTED,  # a spot instance taken back
    "instance_unreachable": S.FAILED,
    "instance_access_revoked": S.FAILED,
    "waiting_instance_limit_exceeded": S.FAILED,
    "waiting_runner_limit_exceeded": S.FAILED,
    "terminated_by_user": S.CANCELLED,
    "aborted_by_user": S.CANCELLED,
    "volume_error": S.FAILED,
    "gateway_error": S.FAILED,
    "scaled_down": S.CANCELLED,
    "done_by_runner": S.SUCCEEDED,
    "terminated_by_server": S.FAILED,
    "inactivity_duration_exceeded": S.CANCELLED,
    "terminated_due_to_utilization_policy": S.CANCELLED,
    "container_exited_with_error": S.FAILED,
    "ports_binding_failed": S.FAILED,
    "creating_container_error": S.FAILED,
    "executor_error": S.FAILED,
    "max_duration_exceeded": S.TIMEOUT,
    "log_quota_exceeded": S.FAILED,
}

#: job termination reasons that mean "no capacity" (shown as "no capacity: ...")
NO_CAPACITY = {"failed_to_start_due_to_no_capacity", "interrupted_by_no_capacity"}


def _ts(v: Any) -> float | None:
    if not v:
        return None
    try:
        return datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def latest_submission(run: Mapping[str, Any]) -> dict[str, Any] | None:
    """The latest submission of the run's first job (the master node of a multi-node task)."""
    jobs = run.get("jobs") or []
    for job in jobs[:1]:
        subs = job.get("job_submissions") or []
        if subs:
            return subs[-1]
    sub = run.get("latest_job_submission")
    return sub if isinstance(sub, dict) else None


def _where(sub: Mapping[str, Any] | None) -> str | None:
    if not sub:
        return None
    jpd = sub.get("job_provisioning_data") or {}
    if not jpd:
        return None
    parts = [str(jpd.get("backend") or ""), str(jpd.get("region") or "")]
    itype = (jpd.get("instance_type") or {}).get("name")
    where = "/".join(p for p in parts if p)
    if itype:
        where = f"{where} {itype}" if where else str(itype)
    if jpd.get("hostname"):
        where = f"{where} ({jpd['hostname']})"
    return where or None


def _reason(run: Mapping[str, Any], sub: Mapping[str, Any] | None) -> str | None:
    parts: list[str] = []
    jreason = (sub or {}).get("termination_reason")
    jmsg = (sub or {}).get("termination_reason_message") or (sub or {}).get("error")
    status_msg = run.get("status_message") or ""
    rreason = run.get("termination_reason")
    if status_msg and status_msg != run.get("status"):
        parts.append(status_msg)
    if rreason:
        parts.append(rreason.replace("_", " "))
    if run.get("error"):
        parts.append(str(run["error"]))
    if jreason:
        text = jmsg or jreason.replace("_", " ")
        if jreason in NO_CAPACITY:
            text = f"no capacity: {text}"
        elif jmsg:
            text = f"{jreason.replace('_', ' ')}: {jmsg}"
        if run.get("status") == "pending":
            text = f"last attempt: {text}"
        parts.append(text)
    if sub and sub.get("exit_status") not in (None, 0):
        parts.append(f"exit status {sub['exit_status']}")
    # the same words once
    seen: list[str] = []
    for p in parts:
        if p and all(p not in q for q in seen):
            seen = [q for q in seen if q not in p] + [p]
    return "; ".join(seen) or None


def map_run(run: Mapping[str, Any]) -> mb.JobStatus:
    """One dstack run (as ``/runs/get`` or ``/runs/list`` return it) as a meshrun JobStatus."""
    status = str(run.get("status") or "")
    sub = latest_submission(run)
    jstatus = str((sub or {}).get("status") or "")
    jreason = (sub or {}).get("termination_reason")
    state = RUN_STATES.get(status, S.UNKNOWN)
    if status == "terminating":
        state = S.RUNNING if (sub or {}).get("job_provisioning_data") else S.PENDING
    elif status in ("terminated", "failed", "done"):
        rreason = run.get("termination_reason")
        jstate = JOB_TERMINATION.get(jreason or "")
        if rreason in RUN_TERMINATION:
            state = RUN_TERMINATION[rreason]
            # the job's reason says more about how it ended (time limit, spot interruption), but a
            # user's stop stays a cancel whatever the last attempt had hit
            if state is not S.CANCELLED and jstate in (S.TIMEOUT, S.PREEMPTED):
                state = jstate
        elif jstate is not None:
            state = jstate
    elif status in ("provisioning", "running", "submitted"):
        # the job says where it really is: an image still pulling is not running yet; a failed or
        # terminating attempt under an active run is waiting for the next one
        if jstatus in ("submitted", "provisioning", "pulling"):
            state = S.PENDING
        elif jstatus == "running":
            state = S.RUNNING
        elif jstatus:
            state = S.PENDING if status != "running" or not (sub or {}).get("job_provisioning_data") else state
    exit_code = (sub or {}).get("exit_status")
    started = None
    if state in (S.RUNNING,) or (state.terminal and (sub or {}).get("job_provisioning_data")):
        started = _ts((sub or {}).get("submitted_at"))
    ended = _ts(run.get("last_processed_at")) if state.terminal else None
    if state.terminal and sub and sub.get("finished_at"):
        ended = _ts(sub.get("finished_at"))
    reason = _reason(run, sub)
    if state is S.PENDING and jstatus == "pulling":
        reason = reason or "pulling the container image"
    detail = {
        "dstack_status": status,
        "dstack_job_status": jstatus or None,
        "termination_reason": run.get("termination_reason"),
        "job_termination_reason": jreason,
    }
    return mb.JobStatus(
        state=state,
        reason=reason,
        exit_code=exit_code if isinstance(exit_code, int) else None,
        started_at=started,
        ended_at=ended,
        where=_where(sub),
        detail={k: v for k, v in detail.items() if v},
    )
