"""Manifests: pure functions from (spec, submission, settings, options) to the objects meshrun creates.

Nothing here talks to a cluster or reads a file: the same inputs always give the same dicts, which the
tests compare with golden files and validate against the official Kubernetes schemas.

What a job becomes:

* single node: a ``batch/v1`` Job (one pod, ``restartPolicy: Never``);
* several nodes: an Indexed Job (``completionMode: Indexed``, ``completions = parallelism = nodes``) and a
  headless Service whose name is the pods' ``subdomain``, so pod ``<job>-0`` has the stable DNS name
  ``<job>-0.<job>.<namespace>.svc`` (``MASTER_ADDR``) and ``NODE_RANK`` is the pod's completion index; or,
  with ``multi_node = "jobset"``, a JobSet (``jobset.x-k8s.io/v1alpha2``) that makes its own Service and
  restarts the whole group on failure;
* function jobs, and jobs with object-store inputs/outputs: run under meshrun's host agent, plus a Secret
  holding the agent, ``launch.json``, the pickled payload (functions) and the stager ``stage.py`` (data jobs),
  mounted read-only into the pod. A data job's container also gets ``envFrom`` the Secrets and ConfigMaps
  named by ``data_env_from`` (its S3 endpoint and credentials, by reference only: docs/data.md).

With Kueue, the Job (or JobSet) carries ``kueue.x-k8s.io/queue-name`` and is created suspended; Kueue
admits it by unsuspending it. Without Kueue the backend unsuspends it itself once its Secret and Service
exist, so a pod never starts before its inputs.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import meshrun.backend as mb

from ._names import cpu_quantity, dns1123_label, escape_expansion, label_value, memory_quantity

PREFIX = "meshrun.dev"
LABEL_JOB_ID = f"{PREFIX}/job-id"
LABEL_NAME = f"{PREFIX}/name"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
ANN_NAME = f"{PREFIX}/name"
ANN_LABELS = f"{PREFIX}/labels"
ANN_ATTEMPT = f"{PREFIX}/attempt"
ANN_KIND = f"{PREFIX}/kind"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY = "kueue.x-k8s.io/priority-class"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
JOBSET_API = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "node"

CONTAINER = "job"
IN_DIR = "/meshrun/in"
JOB_DIR = "/meshrun/job"
NONCE_FILE = "records.nonce"  # in the Secret: the nonce node 0 frames its records with

NAME_MAX = 48  # leaves room for "-<index>" (Indexed Job hostnames) and "-node-0-<index>" (JobSet) in 63
AGENT_GRACE = 15  # seconds the agent gives a function job between SIGTERM and SIGKILL
POD_GRACE = 30  # terminationGracePeriodSeconds: longer than the agent's, so it records the outcome


@dataclass(frozen=True)
class Target:
    """Where a job goes and how: the resolved settings and options, everything rendering needs."""

    namespace: str
    image: str
    queue: str | None = None
    priority_class: str | None = None
    workload_priority_class: str | None = None
    multi_node: str = "indexed"
    gpu_resource: str = "nvidia.com/gpu"
    gpu_label: str = "nvidia.com/gpu.product"
    gpu_products: tuple[str, ...] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    service_account: str | None = None
    image_pull_policy: str | None = None
    image_pull_secrets: Sequence[str] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    master_port: int = 29500
    cluster_domain: str | None = None
    ttl_after_finished: int | None = None
    python: str = "python3"
    workdir: str | None = None
    result_max_bytes: int = 4 * 1024 * 1024
    env_from: Sequence[Mapping[str, Any]] = ()  # a data job's envFrom (Secret and ConfigMap references)


@dataclass(frozen=True)
class Manifests:
    """The objects of one job, in creation order: the workload (Job or JobSet), then its helpers."""

    name: str
    namespace: str
    workload: dict[str, Any]
    service: dict[str, Any] | None = None
    secret: dict[str, Any] | None = None
    master_addr: str = "127.0.0.1"

    @property
    def kind(self) -> str:
        return self.workload["kind"]

    @property
    def backend_id(self) -> str:
        return backend_id(self.namespace, self.name, self.kind)

    def objects(self) -> list[dict[str, Any]]:
        return [o for o in (self.workload, self.secret, self.service) if o is not None]


def backend_id(namespace: str, name: str, kind: str = "Job") -> str:
    return f"{namespace}/jobsets/{name}" if kind == "JobSet" else f"{namespace}/{name}"


def parse_backend_id(bid: str) -> tuple[str, str, str]:
    """(namespace, name, kind) of a backend id written by :func:`backend_id`."""
    parts = str(bid).split("/")
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1], "Job"
    if len(parts) == 3 and parts[1] == "jobsets" and parts[0] and parts[2]:
        return parts[0], parts[2], "JobSet"
    raise ValueError(f"not a kubernetes backend id: {bid!r} (expected NAMESPACE/NAME or NAMESPACE/jobsets/NAME)")


def job_name(submission_name: str) -> str:
    """The object name of a job: ``meshrun-<job id>``, sanitised to a DNS-1123 label if it is not one."""
    return dns1123_label(submission_name, NAME_MAX, fallback="meshrun")


def master_address(name: str, namespace: str, nodes: int, multi_node: str, cluster_domain: str | None) -> str:
    if nodes <= 1:
        return "127.0.0.1"
    host = f"{name}-{REPLICATED_JOB}-0-0" if multi_node == "jobset" else f"{name}-0"
    addr = f"{host}.{name}.{namespace}.svc"
    return f"{addr}.{cluster_domain}" if cluster_domain else addr


def dist_values(spec: Any, master_addr: str, port: int) -> dict[str, str]:
    """The distributed-training contract for node 0 (each pod's NODE_RANK comes from its completion index)."""
    import meshrun

    return meshrun.dist_env(nnodes=spec.resources.nodes, node_rank=0, master_addr=master_addr,
                            master_port=port, gpus_per_node=spec.resources.gpus)


def _meta_labels(job_id: str, display: str, t: Target) -> dict[str, str]:
    labels = {LABEL_MANAGED: "meshrun", LABEL_JOB_ID: label_value(job_id), LABEL_NAME: label_value(display)}
    for k, v in {**t.labels}.items():
        labels.setdefault(k, v)
    return labels


def has_data(spec: Any) -> bool:
    """Whether the job moves object-store data (its inputs/outputs are staged by the agent's stager)."""
    return bool(getattr(spec, "inputs", None) or getattr(spec, "outputs", None))


def runs_agent(spec: Any) -> bool:
    """Whether the pod runs the job under meshrun's host agent (function jobs and data jobs)."""
    return spec.kind == "function" or has_data(spec)


def _container_command(spec: Any, t: Target) -> list[str]:
    if runs_agent(spec):
        # the agent copies the Secret's files into the job folder, runs the job, streams its output as the pod
        # log and ends it with node 0's records framed with the job's nonce (kept in the Secret)
        return mb.agent_command(t.python, f"{IN_DIR}/_agent.py", JOB_DIR, f"@{IN_DIR}/{NONCE_FILE}", inputs=IN_DIR,
                                max_result=t.result_max_bytes)
    if isinstance(spec.command, str):
        argv = ["/bin/bash", "-c", spec.command]
    else:
        argv = list(spec.command)
    if spec.setup:
        # setup commands run first; the command itself is exec'd with its argv untouched (as the host agent)
        script = ('set -e\nfor __mr_s in "${@:2:$1}"; do /bin/bash -c "$__mr_s"; done\n'
                  'shift "$(( $1 + 1 ))"\nexec "$@"')
        argv = ["/bin/bash", "-c", script, "meshrun-setup", str(len(spec.setup)), *spec.setup, *argv]
    return [escape_expansion(a) for a in argv]


def _env(spec: Any, job_id: str, dist: Mapping[str, str], multi: bool) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": escape_expansion(v)} for k, v in spec.env.items()]
    given = set(spec.env)
    extra: list[tuple[str, Any]] = [
        ("MESHRUN_JOB_ID", job_id),
        ("MESHRUN_JOB_NAME", spec.display_name),
    ]
    for k, v in dist.items():
        if k == "NODE_RANK" and multi:
            extra.append((k, {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}))
        else:
            extra.append((k, v))
    extra.append(("PYTHONUNBUFFERED", "1"))
    for k, v in extra:
        if k in given:
            continue  # the user's value wins, as with the host agent
        if isinstance(v, dict):
            env.append({"name": k, "valueFrom": v})
        else:
            env.append({"name": k, "value": escape_expansion(str(v))})
    return env


def _resources(spec: Any, t: Target) -> dict[str, Any]:
    r = spec.resources
    req: dict[str, str] = {}
    lim: dict[str, str] = {}
    if r.cpus:
        req["cpu"] = lim["cpu"] = cpu_quantity(r.cpus)
    if r.memory:
        req["memory"] = lim["memory"] = memory_quantity(r.memory)
    if r.disk:
        req["ephemeral-storage"] = memory_quantity(r.disk)
    if r.gpus:
        lim[t.gpu_resource] = str(r.gpus)
    out: dict[str, Any] = {}
    if req:
        out["requests"] = req
    if lim:
        out["limits"] = lim
    return out


def _pod_template(spec: Any, *, job_id: str, name: str, t: Target, dist: Mapping[str, str],
                  subdomain: str | None) -> dict[str, Any]:
    r = spec.resources
    multi = r.nodes > 1
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": t.image,
        "command": _container_command(spec, t),
        "env": _env(spec, job_id, dist, multi),
    }
    if has_data(spec) and t.env_from:
        container["envFrom"] = [dict(x) for x in t.env_from]
    if t.image_pull_policy:
        container["imagePullPolicy"] = t.image_pull_policy
    if t.workdir:
        container["workingDir"] = t.workdir
    res = _resources(spec, t)
    if res:
        container["resources"] = res
    mounts: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    if runs_agent(spec):
        mounts += [{"name": "meshrun-in", "mountPath": IN_DIR, "readOnly": True},
                   {"name": "meshrun-job", "mountPath": JOB_DIR}]
        volumes += [{"name": "meshrun-in", "secret": {"secretName": name, "defaultMode": 0o444}},
                    {"name": "meshrun-job", "emptyDir": {}}]
    if r.gpus:
        # NCCL and data loaders need more shared memory than a container's default 64 MiB
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    if multi:
        container["ports"] = [{"name": "rendezvous", "containerPort": t.master_port, "protocol": "TCP"}]
    if mounts:
        container["volumeMounts"] = mounts
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,  # no service variables in the env: nothing for $(VAR) to pick up
        "terminationGracePeriodSeconds": POD_GRACE,
        "containers": [container],
    }
    if subdomain:
        pod["subdomain"] = subdomain
    if t.service_account:
        pod["serviceAccountName"] = t.service_account
    if t.priority_class:
        pod["priorityClassName"] = t.priority_class
    if t.node_selector:
        pod["nodeSelector"] = dict(t.node_selector)
    if r.gpus and r.gpu_type:
        values = list(t.gpu_products) or [r.gpu_type]
        pod["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": t.gpu_label, "operator": "In", "values": values}]}]}}}
    if t.tolerations:
        pod["tolerations"] = [dict(x) for x in t.tolerations]
    if t.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in t.image_pull_secrets]
    if volumes:
        pod["volumes"] = volumes
    return {
        "metadata": {
            "labels": _meta_labels(job_id, spec.display_name, t),
            "annotations": {ANN_NAME: spec.display_name},
        },
        "spec": pod,
    }


def _job_spec(spec: Any, *, template: dict[str, Any], t: Target, backoff: int, nodes: int) -> dict[str, Any]:
    js: dict[str, Any] = {"backoffLimit": backoff}
    if nodes > 1:
        js.update({"completionMode": "Indexed", "completions": nodes, "parallelism": nodes})
    if spec.time_limit and not has_data(spec):
        # a data job's limit is the agent's: it starts once the inputs are in place, and outputs still go up
        js["activeDeadlineSeconds"] = max(1, int(math.ceil(spec.time_limit)))
    rules: list[dict[str, Any]] = [
        # a pod evicted or preempted (node drain, scheduler preemption) is replaced without using a retry
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
    if runs_agent(spec):
        rules.append({"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                           "values": [mb.NO_RETRY_EXIT]}})
    js["podFailurePolicy"] = {"rules": rules}
    js["template"] = template
    return js


def render(spec: Any, *, job_id: str, submission_name: str, target: Target, attempt: int = 1) -> Manifests:
    """The workload and Service for ``spec`` (the Secret of a function job comes from :func:`render_secret`)."""
    t = target
    name = job_name(submission_name)
    nodes = spec.resources.nodes
    jobset = nodes > 1 and t.multi_node == "jobset"
    master = master_address(name, t.namespace, nodes, t.multi_node, t.cluster_domain)
    dist = dist_values(spec, master, t.master_port)
    labels = _meta_labels(job_id, spec.display_name, t)
    if t.queue:
        labels[KUEUE_QUEUE] = t.queue
    if t.workload_priority_class:
        labels[KUEUE_PRIORITY] = t.workload_priority_class
    annotations = {ANN_NAME: spec.display_name, ANN_ATTEMPT: str(attempt)}
    if spec.labels:
        annotations[ANN_LABELS] = json.dumps(spec.labels, sort_keys=True, ensure_ascii=False)
    for k, v in t.annotations.items():
        annotations.setdefault(k, v)
    meta = {"name": name, "namespace": t.namespace, "labels": labels, "annotations": annotations}
    subdomain = name if nodes > 1 and not jobset else None
    template = _pod_template(spec, job_id=job_id, name=name, t=t, dist=dist, subdomain=subdomain)
    if jobset:
        child = _job_spec(spec, template=template, t=t, backoff=0, nodes=nodes)
        js: dict[str, Any] = {
            "suspend": True,
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True, "subdomain": name},
            "failurePolicy": {"maxRestarts": spec.retries},
            "replicatedJobs": [{
                "name": REPLICATED_JOB,
                "replicas": 1,
                "template": {"metadata": {"labels": _meta_labels(job_id, spec.display_name, t)}, "spec": child},
            }],
        }
        if t.ttl_after_finished is not None:
            js["ttlSecondsAfterFinished"] = t.ttl_after_finished
        workload = {"apiVersion": JOBSET_API, "kind": "JobSet", "metadata": meta, "spec": js}
        return Manifests(name=name, namespace=t.namespace, workload=workload, master_addr=master)
    job_spec = _job_spec(spec, template=template, t=t, backoff=spec.retries, nodes=nodes)
    job_spec = {"suspend": True, **job_spec}
    if t.ttl_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = t.ttl_after_finished
    workload = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
    service = None
    if nodes > 1:
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": t.namespace,
                         "labels": {LABEL_MANAGED: "meshrun", LABEL_JOB_ID: label_value(job_id)}},
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,  # pod 0's name resolves before it is ready
                "selector": {LABEL_JOB_ID: label_value(job_id)},
                "ports": [{"name": "rendezvous", "port": t.master_port, "targetPort": t.master_port,
                           "protocol": "TCP"}],
            },
        }
    return Manifests(name=name, namespace=t.namespace, workload=workload, service=service, master_addr=master)


def container_launch(launch: Mapping[str, Any], spec: Any, *, dist: Mapping[str, str], t: Target) -> dict[str, Any]:
    """``launch.json`` as the host agent inside the pod must see it: Kubernetes already gave the pod its
    GPUs (no leases, no masking), the Job's deadline enforces the time limit (the agent does for a data job,
    from when its inputs are in place), paths are the container's."""
    out = dict(launch)
    out.update({
        "lease": False,
        "mask_gpus": False,
        "time_limit": launch.get("time_limit") if has_data(spec) else None,
        "cwd": t.workdir,
        "sys_path": [],
        "dist": dict(dist),
        "grace_period": AGENT_GRACE,
    })
    return out


def secret_data(files: Mapping[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(v).decode("ascii") for k, v in sorted(files.items())}


def render_secret(m: Manifests, *, job_id: str, files: Mapping[str, bytes],
                  owner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The Secret holding the files of a job run under the agent; ``owner`` (the created Job) makes it go with the Job."""
    meta: dict[str, Any] = {
        "name": m.name,
        "namespace": m.namespace,
        "labels": {LABEL_MANAGED: "meshrun", LABEL_JOB_ID: label_value(job_id)},
    }
    if owner:
        meta["ownerReferences"] = [owner_reference(owner)]
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "immutable": True,
            "data": secret_data(files)}


def with_owner(obj: dict[str, Any], owner: Mapping[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(obj))
    out["metadata"]["ownerReferences"] = [owner_reference(owner)]
    return out


def owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    meta = owner.get("metadata") or {}
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"], "uid": meta["uid"],
            "blockOwnerDeletion": True}
