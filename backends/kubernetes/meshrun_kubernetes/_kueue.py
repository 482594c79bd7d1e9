"""Kueue objects meshrun reads, as small typed models of their documented fields.

Kueue's CRDs are not in the core Kubernetes schemas, so what meshrun reads from them is type-checked
here instead: the fields of ``kueue.x-k8s.io`` ``Workload``, ``LocalQueue``, ``ClusterQueue`` and
``ResourceFlavor`` (v1beta1, and v1beta2 where a field was renamed: ``flavorUsage`` -> ``flavorsUsage``,
``cohort`` -> ``cohortName``) that meshrun uses, following Kueue's API reference. Other fields are
ignored. A Workload's conditions (Kueue's API reference, ``WorkloadStatus.conditions``):

* ``QuotaReserved``: quota reserved in a ClusterQueue (False with reason ``Pending`` or ``Inadmissible``
  and a message saying why, while waiting);
* ``Admitted``: quota reserved and every admission check passed; Kueue then unsuspends the Job;
* ``Evicted``: evicted (reasons ``Preempted``, ``PodsReadyTimeout``, ``AdmissionCheck``,
  ``ClusterQueueStopped``, ``LocalQueueStopped``, ``Deactivated``), with ``Preempted`` giving details;
* ``PodsReady``: all pods of the admitted workload are ready or have succeeded;
* ``Finished``: the Job ended (reason ``Succeeded``, ``Failed``, ``AdmissionChecksRejected``...).

The Workload of a Job is found by the ``kueue.x-k8s.io/job-uid`` label (the Job's uid) that Kueue puts
on it, or by its owner reference.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from ._names import parse_quantity

JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
_MODELS: dict[str, Any] = {}


def models() -> Any:
    """The model classes (built on first use: they need pydantic)."""
    if _MODELS:
        return _MODELS["ns"]
    from types import SimpleNamespace
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field, field_validator

    class _M(BaseModel):
        model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    Quantity = Union[str, int, float]

    def _q(v: Any) -> Any:
        if v is None:
            return v
        parse_quantity(v)  # raises for anything that is not a quantity
        return v

    class Condition(_M):
        type: str
        status: Literal["True", "False", "Unknown"]
        reason: str = ""
        message: str = ""
        lastTransitionTime: Optional[str] = None
        observedGeneration: Optional[int] = None

    class Meta(_M):
        name: str
        namespace: Optional[str] = None
        uid: Optional[str] = None
        labels: dict[str, str] = Field(default_factory=dict)
        ownerReferences: list[dict[str, Any]] = Field(default_factory=list)

    class PodSet(_M):
        name: str = "main"
        count: int = 1

    class WorkloadSpec(_M):
        podSets: list[PodSet] = Field(default_factory=list)
        queueName: str = ""
        priorityClassName: Optional[str] = None
        priority: Optional[int] = None
        active: Optional[bool] = None
        maximumExecutionTimeSeconds: Optional[int] = None

    class PodSetAssignment(_M):
        name: str
        flavors: dict[str, str] = Field(default_factory=dict)
        resourceUsage: dict[str, Quantity] = Field(default_factory=dict)
        count: Optional[int] = None

        @field_validator("resourceUsage")
        @classmethod
        def _v(cls, v: Any) -> Any:
            for x in v.values():
                _q(x)
            return v

    class Admission(_M):
        clusterQueue: str
        podSetAssignments: list[PodSetAssignment] = Field(default_factory=list)

    class AdmissionCheckState(_M):
        name: str
        state: Literal["Pending", "Ready", "Retry", "Rejected"]
        message: str = ""
        lastTransitionTime: Optional[str] = None

    class RequeueState(_M):
        count: Optional[int] = None
        requeueAt: Optional[str] = None

    class WorkloadStatus(_M):
        conditions: list[Condition] = Field(default_factory=list)
        admission: Optional[Admission] = None
        admissionChecks: list[AdmissionCheckState] = Field(default_factory=list)
        requeueState: Optional[RequeueState] = None

    class Workload(_M):
        apiVersion: str
        kind: Literal["Workload"]
        metadata: Meta
        spec: WorkloadSpec = Field(default_factory=WorkloadSpec)
        status: WorkloadStatus = Field(default_factory=WorkloadStatus)

        def condition(self, type_: str) -> Optional[Condition]:
            return next((c for c in self.status.conditions if c.type == type_), None)

        def is_true(self, type_: str) -> bool:
            c = self.condition(type_)
            return c is not None and c.status == "True"

    class ResourceUsage(_M):
        name: str
        total: Quantity = "0"
        borrowed: Quantity = "0"

        @field_validator("total", "borrowed")
        @classmethod
        def _v(cls, v: Any) -> Any:
            return _q(v)

    class FlavorUsage(_M):
        name: str
        resources: list[ResourceUsage] = Field(default_factory=list)

    class LocalQueueSpec(_M):
        clusterQueue: str = ""
        stopPolicy: Optional[str] = None

    class LocalQueueStatus(_M):
        conditions: list[Condition] = Field(default_factory=list)
        pendingWorkloads: int = 0
        reservingWorkloads: int = 0
        admittedWorkloads: int = 0
        flavorsReservation: list[FlavorUsage] = Field(default_factory=list)
        flavorUsage: list[FlavorUsage] = Field(default_factory=list)  # v1beta1
        flavorsUsage: list[FlavorUsage] = Field(default_factory=list)  # v1beta2

    class LocalQueue(_M):
        apiVersion: str
        kind: Literal["LocalQueue"]
        metadata: Meta
        spec: LocalQueueSpec = Field(default_factory=LocalQueueSpec)
        status: LocalQueueStatus = Field(default_factory=LocalQueueStatus)

    class ResourceQuota(_M):
        name: str
        nominalQuota: Quantity = "0"
        borrowingLimit: Optional[Quantity] = None
        lendingLimit: Optional[Quantity] = None

        @field_validator("nominalQuota", "borrowingLimit", "lendingLimit")
        @classmethod
        def _v(cls, v: Any) -> Any:
            return _q(v)

    class FlavorQuotas(_M):
        name: str
        resources: list[ResourceQuota] = Field(default_factory=list)

    class ResourceGroup(_M):
        coveredResources: list[str] = Field(default_factory=list)
        flavors: list[FlavorQuotas] = Field(default_factory=list)

    class ClusterQueueSpec(_M):
        resourceGroups: list[ResourceGroup] = Field(default_factory=list)
        cohort: Optional[str] = None  # v1beta1
        cohortName: Optional[str] = None  # v1beta2
        queueingStrategy: Optional[str] = None
        stopPolicy: Optional[str] = None

    class ClusterQueueStatus(_M):
        conditions: list[Condition] = Field(default_factory=list)
        flavorsReservation: list[FlavorUsage] = Field(default_factory=list)
        flavorsUsage: list[FlavorUsage] = Field(default_factory=list)
        pendingWorkloads: int = 0
        reservingWorkloads: int = 0
        admittedWorkloads: int = 0

    class ClusterQueue(_M):
        apiVersion: str
        kind: Literal["ClusterQueue"]
        metadata: Meta
        spec: ClusterQueueSpec = Field(default_factory=ClusterQueueSpec)
        status: ClusterQueueStatus = Field(default_factory=ClusterQueueStatus)

    class ResourceFlavorSpec(_M):
        nodeLabels: dict[str, str] = Field(default_factory=dict)

    class ResourceFlavor(_M):
        apiVersion: str
        kind: Literal["ResourceFlavor"]
        metadata: Meta
        spec: ResourceFlavorSpec = Field(default_factory=ResourceFlavorSpec)

    ns = SimpleNamespace(
        Condition=Condition, Workload=Workload, LocalQueue=LocalQueue, ClusterQueue=ClusterQueue,
        ResourceFlavor=ResourceFlavor, FlavorUsage=FlavorUsage,
    )
    _MODELS["ns"] = ns
    return ns


def parse(kind: str, obj: Mapping[str, Any]) -> Any:
    """``obj`` as the typed model of ``kind``; a ValueError says which field is wrong."""
    from pydantic import ValidationError

    model = getattr(models(), kind)
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        raise ValueError(f"{kind} {((obj or {}).get('metadata') or {}).get('name', '?')}: {loc}: {err.get('msg')}") \
            from None


def workload_for(workloads: list[Mapping[str, Any]], uid: str | None) -> Mapping[str, Any] | None:
    """The Kueue Workload of the Job (or JobSet) with ``uid``: by Kueue's job-uid label, else owner reference."""
    if not uid:
        return None
    for w in workloads:
        if ((w.get("metadata") or {}).get("labels") or {}).get(JOB_UID_LABEL) == uid:
            return w
    for w in workloads:
        for ref in (w.get("metadata") or {}).get("ownerReferences") or []:
            if ref.get("uid") == uid:
                return w
    return None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def pending_reason(wl: Any | None, queue: str | None) -> tuple[str, str]:
    """(state, reason) of a suspended Job from its Workload: "pending" with Kueue's reason while it waits,
    or a final state ("timeout", "preempted", "cancelled", "failed") when Kueue gave up on it."""
    if wl is None:
        return "pending", (f"waiting for Kueue admission: Kueue has not created a Workload for the Job yet "
                           f"(is Kueue managing this namespace, and does LocalQueue {queue!r} exist?)")
    evicted = wl.condition("Evicted")
    ev_text = ""
    if evicted is not None and evicted.status == "True":
        pre = wl.condition("Preempted")
        detail = pre.message if pre is not None and pre.status == "True" and pre.message else evicted.message
        ev_text = f"evicted ({evicted.reason}: {_one_line(detail)})"
    if wl.spec.active is False:
        words = " ".join(filter(None, [evicted.reason if evicted else "", evicted.message if evicted else ""]))
        key = "".join(ch for ch in words.lower() if ch.isalnum())
        if "maximumexecutiontime" in key:
            return "timeout", f"Kueue deactivated the workload: {_one_line(words)}"
        pre = wl.condition("Preempted")
        if "requeuing" in key and (pre is not None or "preempt" in key):
            return "preempted", f"Kueue deactivated the workload after repeated preemption: {_one_line(words)}"
        if "requeuing" in key or "podsreadytimeout" in key:
            return "failed", f"Kueue deactivated the workload: {_one_line(words)}"
        return "cancelled", "Kueue workload deactivated (spec.active is false)" + (f": {_one_line(words)}" if words else "")
    fin = wl.condition("Finished")
    if fin is not None and fin.status == "True" and fin.reason == "AdmissionChecksRejected":
        return "failed", f"Kueue rejected the workload: {_one_line(fin.message)}"
    reserved = wl.condition("QuotaReserved")
    admitted = wl.condition("Admitted")
    cq = wl.status.admission.clusterQueue if wl.status.admission else None
    if admitted is not None and admitted.status == "True":
        return "pending", f"admitted by Kueue (ClusterQueue {cq}); starting"
    if reserved is not None and reserved.status == "True":
        checks = ", ".join(f"{c.name}={c.state}" + (f" ({_one_line(c.message)})" if c.message else "")
                           for c in wl.status.admissionChecks)
        return "pending", (f"waiting for Kueue admission: quota reserved in ClusterQueue {cq}; "
                           f"admission checks: {checks or 'pending'}")
    prefix = f"{ev_text}; re-queued; " if ev_text else ""
    if reserved is not None:
        return "pending", f"waiting for Kueue admission: {prefix}{reserved.reason}: {_one_line(reserved.message)}"
    q = wl.spec.queueName or queue
    return "pending", f"waiting for Kueue admission: {prefix}not yet considered by Kueue (LocalQueue {q})"


# ---- offers from queue status -----------------------------------------------------------------------


def usage_by_flavor(usages: list[Any]) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for fu in usages:
        for r in fu.resources:
            out[(fu.name, r.name)] = parse_quantity(r.total)
    return out


def flavor_capacity(cq: Any, resource: str) -> list[tuple[str, float, float | None]]:
    """(flavor, nominal quota, borrowing limit or None) of ``resource`` in the ClusterQueue, in order."""
    out = []
    for rg in cq.spec.resourceGroups:
        if resource not in rg.coveredResources:
            continue
        for f in rg.flavors:
            for r in f.resources:
                if r.name == resource:
                    bl = parse_quantity(r.borrowingLimit) if r.borrowingLimit is not None else None
                    out.append((f.name, parse_quantity(r.nominalQuota), bl))
    return out
