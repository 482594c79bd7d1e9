"""From Kubernetes objects to ``meshrun.backend.JobStatus``: one translation, pure functions.

Inputs are what the API server returns: the Job (or JobSet), its pods, and its Kueue Workload. The order
of the checks is the table below (first match wins):

| what the cluster says                                          | JobState   |
|----------------------------------------------------------------|------------|
| no Job any more                                                | LOST (CANCELLED if meshrun cancelled it) |
| ``metadata.deletionTimestamp`` set                             | CANCELLED  |
| condition ``Complete`` (JobSet: ``Completed``)                 | SUCCEEDED  |
| condition ``Failed``, reason ``DeadlineExceeded``              | TIMEOUT    |
| condition ``Failed``, the failed pod was evicted or preempted  | PREEMPTED  |
| condition ``Failed``, other reasons                            | FAILED (with the pod's exit code and reason) |
| ``spec.suspend`` with Kueue                                    | PENDING "waiting for Kueue admission: <Kueue's reason>"; TIMEOUT/PREEMPTED/CANCELLED/FAILED when Kueue deactivated it |
| ``spec.suspend`` without Kueue                                 | PENDING "suspended" |
| a pod running                                                  | RUNNING    |
| pods pending: image pull failing, unschedulable, creating      | PENDING with that reason |
| no pods yet                                                    | PENDING    |
"""

from __future__ import annotations

import calendar
import time
from typing import Any, Mapping, Sequence

import meshrun.backend as mb

from . import _kueue
from ._manifests import COMPLETION_INDEX, CONTAINER

S = mb.JobState
IMAGE_PULL = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
CREATE_FAIL = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError")


def ts(text: Any) -> float | None:
    """An RFC 3339 timestamp of the API ("2024-03-21T13:43:00Z") as seconds since the epoch."""
    if not text:
        return None
    try:
        base = str(text).rstrip("Z").split(".")[0]
        return float(calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return None


def _conds(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {c.get("type"): c for c in ((obj.get("status") or {}).get("conditions") or []) if c.get("status") == "True"}


def _one_line(text: Any) -> str:
    return " ".join(str(text or "").split())


def _container(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            return cs
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return statuses[0] if statuses else {}


def _pod_name(pod: Mapping[str, Any]) -> str:
    return (pod.get("metadata") or {}).get("name", "?")


def pod_index(pod: Mapping[str, Any]) -> int:
    meta = pod.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get(COMPLETION_INDEX) or (meta.get("labels") or {}).get(COMPLETION_INDEX)
    try:
        return int(raw) if raw is not None else 0
    except ValueError:
        return 0


def _created(pod: Mapping[str, Any]) -> float:
    return ts((pod.get("metadata") or {}).get("creationTimestamp")) or 0.0


def disrupted(pod: Mapping[str, Any]) -> str | None:
    """Why the pod was evicted or preempted, or None."""
    st = pod.get("status") or {}
    for c in st.get("conditions") or []:
        if c.get("type") == "DisruptionTarget" and c.get("status") == "True":
            return f"{c.get('reason', 'Disrupted')}: {_one_line(c.get('message'))}".rstrip(": ")
    if st.get("reason") in ("Evicted", "Preempting", "Shutdown", "NodeShutdown", "Terminated"):
        return f"{st.get('reason')}: {_one_line(st.get('message'))}".rstrip(": ")
    return None


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    cs = _container(pod)
    return (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}


def rank0_pod(pods: Sequence[Mapping[str, Any]], *, prefer_phase: str | None = None) -> Mapping[str, Any] | None:
    """The pod of node 0 that matters: of the given phase if there is one, else the newest."""
    zero = [p for p in pods if pod_index(p) == 0]
    if not zero:
        return None
    if prefer_phase:
        chosen = [p for p in zero if (p.get("status") or {}).get("phase") == prefer_phase]
        if chosen:
            return max(chosen, key=_created)
    return max(zero, key=_created)


def _failure(pods: Sequence[Mapping[str, Any]]) -> tuple[str, int | None, bool]:
    """(description, exit code, disrupted) of the most recent failed pod."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    if not failed:
        return "", None, False
    pod = max(failed, key=_created)
    why = disrupted(pod)
    term = _terminated(pod)
    code = term.get("exitCode")
    if why:
        return f"pod {_pod_name(pod)} {why}", code, True
    if term:
        text = f"pod {_pod_name(pod)}: container exited with code {code}"
        if term.get("reason") and term.get("reason") not in ("Error", "Completed"):
            text += f" ({term['reason']})"
        if term.get("message"):
            text += f": {_one_line(term['message'])[:300]}"
        return text, code, False
    st = pod.get("status") or {}
    return f"pod {_pod_name(pod)}: {st.get('reason') or 'failed'} {_one_line(st.get('message'))}".strip(), code, False


def _pending_reason(pods: Sequence[Mapping[str, Any]]) -> str:
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            w = (cs.get("state") or {}).get("waiting") or {}
            if w.get("reason") in IMAGE_PULL:
                return f"pulling the image failed: {w['reason']}: {_one_line(w.get('message'))}".rstrip(": ")
            if w.get("reason") in CREATE_FAIL:
                return f"cannot create the container: {w['reason']}: {_one_line(w.get('message'))}".rstrip(": ")
    for pod in pods:
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False":
                return f"unschedulable: {_one_line(c.get('message')) or c.get('reason', '')}"
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            w = (cs.get("state") or {}).get("waiting") or {}
            if w.get("reason"):
                return f"starting: {w['reason']}"
    return "starting: pods are being scheduled" if pods else "waiting for the Job's pods to be created"


def map_status(obj: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]], *, workload: Mapping[str, Any] | None,
               kueue: bool, queue: str | None = None, cancelled: bool = False) -> mb.JobStatus:
    if obj is None:
        if cancelled:
            return mb.JobStatus(S.CANCELLED, reason="cancelled (the Job was deleted)")
        return mb.JobStatus(S.LOST, reason="the Job no longer exists in the cluster (deleted by someone, or "
                                                "removed by its ttlSecondsAfterFinished before its outcome was read)")
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    kind = obj.get("kind", "Job")
    started = ts(status.get("startTime"))
    ended = ts(status.get("completionTime"))
    nodes = sorted({n for n in ((p.get("spec") or {}).get("nodeName") for p in pods) if n})
    where = ",".join(nodes) or None
    if meta.get("deletionTimestamp"):
        return mb.JobStatus(S.CANCELLED, reason="cancelled (the Job is being deleted)", started_at=started,
                                 ended_at=ts(meta["deletionTimestamp"]), where=where)
    conds = _conds(obj)
    done = "Completed" if kind == "JobSet" else "Complete"
    if done in conds:
        return mb.JobStatus(S.SUCCEEDED, exit_code=0, started_at=started,
                                 ended_at=ended or ts(conds[done].get("lastTransitionTime")), where=where)
    if "Failed" in conds:
        c = conds["Failed"]
        end = ts(c.get("lastTransitionTime"))
        what, code, was_disrupted = _failure(pods)
        if c.get("reason") == "DeadlineExceeded":
            limit = ((obj.get("spec") or {}).get("activeDeadlineSeconds"))
            text = f"exceeded its time limit ({limit}s): {_one_line(c.get('message'))}" if limit else \
                f"exceeded its time limit: {_one_line(c.get('message'))}"
            return mb.JobStatus(S.TIMEOUT, reason=text, exit_code=code, started_at=started, ended_at=end,
                                     where=where)
        text = f"{c.get('reason', 'Failed')}: {_one_line(c.get('message'))}"
        if what:
            text += f"; {what}"
        state = S.PREEMPTED if was_disrupted else S.FAILED
        return mb.JobStatus(state, reason=text, exit_code=code, started_at=started, ended_at=end, where=where)
    if (obj.get("spec") or {}).get("suspend"):
        if kueue:
            wl = None
            if workload is not None:
                try:
                    wl = _kueue.parse("Workload", workload)
                except ValueError as e:
                    return mb.JobStatus(S.PENDING, reason=f"waiting for Kueue admission (Workload not "
                                                               f"understood: {e})")
            waiting, reason = _kueue.pending_reason(wl, queue)
            detail = {"workload": (workload or {}).get("metadata", {}).get("name")} if workload else {}
            return mb.JobStatus(S(waiting), reason=reason, started_at=None, detail=detail)
        return mb.JobStatus(S.PENDING, reason="suspended (spec.suspend is true)")
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")
            and (p.get("status") or {}).get("phase") in ("Pending", "Running")]
    running = [p for p in live if (p.get("status") or {}).get("phase") == "Running"]
    evicted = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed" and disrupted(p)]
    note = ""
    if evicted:
        last = max(evicted, key=_created)
        note = f" (pod {_pod_name(last)} {disrupted(last)}; replaced)"
    finishing = [t for t in ("FailureTarget", "SuccessCriteriaMet") if t in conds]
    if finishing:
        c = conds[finishing[0]]
        return mb.JobStatus(S.RUNNING, reason=f"finishing: {c.get('reason')}: {_one_line(c.get('message'))}",
                                 started_at=started, where=where)
    if running:
        n = len(running)
        total = (obj.get("spec") or {}).get("parallelism") or 1
        pods_text = f"{n} of {total} pods running" if total > 1 else None
        first = min((ts((p.get("status") or {}).get("startTime")) or started or 0) for p in running) or started
        return mb.JobStatus(S.RUNNING, reason=(pods_text or "") + note if (pods_text or note) else None,
                                 started_at=first, where=where,
                                 detail={"pods": [_pod_name(p) for p in running]})
    return mb.JobStatus(S.PENDING, reason=_pending_reason(live) + note, where=where)
