"""Offers: where a job could run in the cluster and when it could start.

With Kueue (a ``queue`` is set): from the LocalQueue and its ClusterQueue (nominal quota per flavor,
quota reserved by admitted workloads, pending workloads) and the ResourceFlavors' node labels (which
GPU model each flavor is). Without Kueue: from the nodes' allocatable resources minus the requests of the
pods bound to them. Both are pure functions of the objects the API server returned.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Mapping, Sequence

import meshrun
import meshrun.backend as mb

from . import _kueue
from ._names import parse_quantity


def norm(text: str) -> str:
    return "".join(ch for ch in str(text).lower() if ch.isalnum())


def gpu_matches(product: str, gpu_type: str | None) -> bool:
    """Whether a GPU product label value ("NVIDIA-H100-80GB-HBM3") is the type asked for ("H100")."""
    return not gpu_type or norm(gpu_type) in norm(product)


def needs(spec: Any, gpu_resource: str) -> dict[str, float]:
    """What one node of the job asks for, by Kubernetes resource name."""
    r = spec.resources
    out: dict[str, float] = {}
    if r.gpus:
        out[gpu_resource] = float(r.gpus)
    if r.cpus:
        out["cpu"] = float(r.cpus)
    if r.memory:
        out["memory"] = float(r.memory)
    return out


def _fmt(res: str, v: float) -> str:
    if res == "memory":
        return meshrun.format_size(int(v))
    return f"{v:g}"


# ---- Kueue ------------------------------------------------------------------------------------------


def kueue_offer(base: mb.Offer, spec: Any, *, lq: Mapping[str, Any], cq: Mapping[str, Any] | None,
                flavors: Sequence[Mapping[str, Any]] | None, gpu_resource: str, gpu_label: str,
                cq_error: str | None = None) -> mb.Offer:
    m = _kueue
    local = m.parse("LocalQueue", lq)
    queue = local.metadata.name
    stopped = local.spec.stopPolicy not in (None, "None")
    if stopped:
        return base.rejected(f"Kueue LocalQueue {queue} is stopped (stopPolicy {local.spec.stopPolicy})")
    inactive = next((c for c in local.status.conditions if c.type == "Active" and c.status == "False"), None)
    if inactive is not None:
        return base.rejected(f"Kueue LocalQueue {queue} is inactive: {inactive.reason}: {inactive.message}")
    if cq is None:
        note = (f"queued in Kueue LocalQueue {queue}: {local.status.pendingWorkloads} pending, "
                f"{local.status.admittedWorkloads} admitted; quota unknown ({cq_error or 'ClusterQueue not read'})")
        return replace(base, expected_start=None, start_note=note,
                       detail={**base.detail, "queue": queue, "kueue": {"pending": local.status.pendingWorkloads}})
    cluster = m.parse("ClusterQueue", cq)
    name = cluster.metadata.name
    cohort = cluster.spec.cohortName or cluster.spec.cohort
    active = next((c for c in cluster.status.conditions if c.type == "Active"), None)
    if active is not None and active.status == "False":
        return base.rejected(f"ClusterQueue {name} is inactive: {active.reason}: {active.message}")
    products: dict[str, str] = {}
    for f in flavors or ():
        rf = m.parse("ResourceFlavor", f)
        if gpu_label in rf.spec.nodeLabels:
            products[rf.metadata.name] = rf.spec.nodeLabels[gpu_label]
    r = spec.resources
    per_node = needs(spec, gpu_resource)
    reserved = m.usage_by_flavor(cluster.status.flavorsReservation or cluster.status.flavorsUsage)
    fits_now = True
    notes = []
    matching_products: list[str] = []
    for res, amount in per_node.items():
        want = amount * r.nodes
        caps = m.flavor_capacity(cluster, res)
        if not caps:
            return base.rejected(f"ClusterQueue {name} has no quota for {res} (it covers: "
                                 f"{', '.join(sorted({x for g in cluster.spec.resourceGroups for x in g.coveredResources})) or 'nothing'})")
        if res == gpu_resource and r.gpu_type:
            typed = [c for c in caps if gpu_matches(products.get(c[0], c[0]), r.gpu_type)]
            if not typed:
                have = ", ".join(f"{f} ({products.get(f, 'no ' + gpu_label + ' label')})" for f, _, _ in caps)
                return base.rejected(f"no flavor of ClusterQueue {name} offers {r.gpu_type} GPUs (flavors: {have})")
            caps = typed
            matching_products = sorted({products[f] for f, _, _ in caps if f in products})
        best_cap = max((nom + (bl if bl is not None else (math.inf if cohort else 0.0))) for _, nom, bl in caps)
        if want > best_cap:
            return base.rejected(f"the job needs {_fmt(res, want)} {res} in all; the largest quota for it in "
                                 f"ClusterQueue {name} is {_fmt(res, best_cap)}")
        free = max(nom - reserved.get((f, res), 0.0) for f, nom, _ in caps)
        nominal = max(nom for _, nom, _ in caps)
        if want > free:
            fits_now = False
        notes.append(f"{_fmt(res, max(free, 0))} of {_fmt(res, nominal)} {res} free")
    pending = cluster.status.pendingWorkloads
    if fits_now and not pending:
        start, note = 0.0, f"now: quota free in ClusterQueue {name}"
    else:
        start = None
        note = f"queued in Kueue: {pending} pending workload(s) in ClusterQueue {name}; " + "; ".join(notes)
    detail = {**base.detail, "queue": queue, "cluster_queue": name,
              "kueue": {"pending": pending, "admitted": cluster.status.admittedWorkloads}}
    if matching_products:
        detail["gpu_products"] = matching_products
    return replace(base, expected_start=start, start_note=note, detail=detail)


# ---- plain Kubernetes: node allocatable minus requests ---------------------------------------------


def pod_requests(pod: Mapping[str, Any]) -> dict[str, float]:
    """What a pod holds on its node: the sum of its containers' requests (limits where a request is
    missing, as the API server defaults them), or the largest init container's, whichever is more."""
    spec = pod.get("spec") or {}

    def of(containers: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
        out = []
        for c in containers or ():
            res = c.get("resources") or {}
            merged = {**(res.get("limits") or {}), **(res.get("requests") or {})}
            vals = {}
            for k, v in merged.items():
                try:
                    vals[k] = parse_quantity(v)
                except ValueError:
                    pass
            out.append(vals)
        return out

    total: dict[str, float] = {}
    for vals in of(spec.get("containers") or ()):
        for k, v in vals.items():
            total[k] = total.get(k, 0.0) + v
    for vals in of(spec.get("initContainers") or ()):
        for k, v in vals.items():
            total[k] = max(total.get(k, 0.0), v)
    return total


def _ready(node: Mapping[str, Any]) -> bool:
    for c in (node.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def node_offer(base: mb.Offer, spec: Any, *, nodes: Sequence[Mapping[str, Any]],
               pods: Sequence[Mapping[str, Any]] | None, gpu_resource: str, gpu_label: str,
               node_selector: Mapping[str, str] | None = None) -> mb.Offer:
    r = spec.resources
    per_node = needs(spec, gpu_resource)
    used: dict[str, dict[str, float]] = {}
    for p in pods or ():
        n = (p.get("spec") or {}).get("nodeName")
        if not n:
            continue
        acc = used.setdefault(n, {})
        for k, v in pod_requests(p).items():
            acc[k] = acc.get(k, 0.0) + v
    capable, free, products = [], [], set()
    considered = 0
    for node in nodes:
        meta = node.get("metadata") or {}
        labels = meta.get("labels") or {}
        if (node.get("spec") or {}).get("unschedulable") or not _ready(node):
            continue
        if node_selector and any(labels.get(k) != v for k, v in node_selector.items()):
            continue
        if r.gpus and r.gpu_type and not gpu_matches(labels.get(gpu_label, ""), r.gpu_type):
            continue
        considered += 1
        alloc = {}
        for k, v in ((node.get("status") or {}).get("allocatable") or {}).items():
            try:
                alloc[k] = parse_quantity(v)
            except ValueError:
                pass
        if all(alloc.get(k, 0.0) >= v for k, v in per_node.items()):
            capable.append(meta.get("name"))
            if r.gpus and labels.get(gpu_label):
                products.add(labels[gpu_label])
            have = used.get(meta.get("name") or "", {})
            if all(alloc.get(k, 0.0) - have.get(k, 0.0) >= v for k, v in per_node.items()):
                free.append(meta.get("name"))
    what = ", ".join(f"{_fmt(k, v)} {k}" for k, v in per_node.items()) or "no resources"
    kind = f"{r.gpu_type} " if r.gpus and r.gpu_type else ""
    if len(capable) < r.nodes:
        return base.rejected(
            f"the cluster has {len(capable)} ready {kind}node(s) with {what} allocatable "
            f"({considered} ready node(s) considered); the job asks for {r.nodes}")
    detail = {**base.detail, "nodes_capable": len(capable)}
    if products:
        detail["gpu_products"] = sorted(products)
    if pods is None:
        return replace(base, expected_start=None, detail=detail,
                       start_note="unknown: the pods of other namespaces cannot be listed, so free capacity is unknown")
    detail["nodes_free"] = len(free)
    if len(free) >= r.nodes:
        return replace(base, expected_start=0.0, start_note=f"now: {len(free)} node(s) with room", detail=detail)
    return replace(base, expected_start=None, detail=detail,
                   start_note=f"waits for resources: {len(free)} of {len(capable)} capable node(s) have room now, "
                              f"the job needs {r.nodes}")
