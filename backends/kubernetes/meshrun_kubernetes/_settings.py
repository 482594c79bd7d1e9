"""Typed settings: the ``[backends.kubernetes]`` table (and ``MESHRUN_KUBERNETES_<KEY>`` variables), and the
per-job ``backend_options["kubernetes"]``. Unknown keys are errors that list the valid ones.

Both are declared models (``KubernetesBackend.settings_model`` / ``options_model``) the core validates.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Mapping, Optional

from pydantic import BeforeValidator, Field

import meshrun.backend as mb

from ._names import label_key_problem, label_value_problem, name_problem

def _listify(v: Any) -> Any:
    """Environment variables arrive as text: accept JSON for lists and tables, and 'a,b' for lists."""
    if isinstance(v, str):
        s = v.strip()
        if s.startswith(("[", "{")):
            try:
                return json.loads(s)
            except ValueError:
                raise ValueError(f"not valid JSON: {s!r}") from None
        return [p.strip() for p in s.split(",") if p.strip()]
    return v


def _tableify(v: Any) -> Any:
    if isinstance(v, str):
        s = v.strip()
        try:
            return json.loads(s) if s else {}
        except ValueError:
            raise ValueError(f"expected a JSON table, got {s!r}") from None
    return v


def _check_name(v: Any, label: bool = False) -> Any:
    if v is None:
        return v
    p = name_problem(v, label=label)
    if p:
        raise ValueError(p)
    return v


def _check_labels(v: Any) -> Any:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise ValueError("expected a table of text to text")
    for k, x in v.items():
        p = label_key_problem(k)
        if p:
            raise ValueError(f"key {k!r}: {p}")
        if not isinstance(x, str):
            raise ValueError(f"the value of {k!r} must be text")
    return dict(v)


def _check_label_values(v: Any) -> Any:
    v = _check_labels(v)
    for k, x in v.items():
        p = label_value_problem(x)
        if p:
            raise ValueError(f"the value of {k!r} {p}")
    return v


_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


def _check_tolerations(v: Any) -> Any:
    v = _listify(v) if isinstance(v, str) else v
    if v is None:
        return []
    if not isinstance(v, (list, tuple)):
        raise ValueError("expected a list of tolerations such as {key = 'nvidia.com/gpu', operator = 'Exists'}")
    out = []
    for i, t in enumerate(v):
        if not isinstance(t, Mapping):
            raise ValueError(f"toleration {i} must be a table")
        extra = set(t) - _TOLERATION_KEYS
        if extra:
            raise ValueError(f"toleration {i} has unknown keys {sorted(extra)}; the keys are {sorted(_TOLERATION_KEYS)}")
        if t.get("operator", "Equal") not in ("Equal", "Exists"):
            raise ValueError(f"toleration {i}: operator must be Equal or Exists")
        if t.get("effect") not in (None, "", "NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise ValueError(f"toleration {i}: effect must be NoSchedule, PreferNoSchedule or NoExecute")
        out.append(dict(t))
    return out


def _check_queue(v: Any) -> Any:
    """A LocalQueue name is a DNS subdomain that also has to fit in a label value (63 characters)."""
    if v is None:
        return v
    _check_name(v, label=False)
    if len(v) > 63:
        raise ValueError("must be at most 63 characters (it is written in the kueue.x-k8s.io/queue-name label)")
    return v


def _check_key(v: Any) -> Any:
    p = label_key_problem(v)
    if p:
        raise ValueError(p)
    return v


def _check_resource(v: Any) -> Any:
    if label_key_problem(v) or "/" not in str(v):
        raise ValueError("expected an extended resource name such as nvidia.com/gpu or amd.com/gpu")
    return v


def _check_products(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, str) or not isinstance(v, (list, tuple)):
        raise ValueError("expected a list of node label values")
    for x in v:
        if not x or label_value_problem(x):
            raise ValueError(f"{x!r} is not a valid label value")
    return list(v)


def _check_workdir(v: Any) -> Any:
    if v is not None and (not isinstance(v, str) or not v.startswith("/") or "\x00" in v):
        raise ValueError("expected an absolute path inside the container")
    return v


def _check_secrets(v: Any) -> Any:
    v = _listify(v)
    for s in v or []:
        _check_name(s, label=False)
    return v or []


ENV_FROM_KINDS = {"secret": "secretRef", "configmap": "configMapRef"}


def _check_env_from(v: Any) -> Any:
    """``["s3-credentials", "configmap/s3-endpoint"]``: Secrets (``NAME`` or ``secret/NAME``) and ConfigMaps
    (``configmap/NAME``) whose keys become a data job's environment (``envFrom``)."""
    if v is None:
        return None
    v = _listify(v)
    if isinstance(v, str) or not isinstance(v, (list, tuple)):
        raise ValueError("expected a list of Secret names (or 'configmap/NAME' for a ConfigMap)")
    for x in v:
        if not isinstance(x, str):
            raise ValueError(f"expected text, got {x!r}")
        kind, _, name = x.rpartition("/")
        if kind and kind.lower() not in ENV_FROM_KINDS:
            raise ValueError(f"{x!r}: expected NAME, secret/NAME or configmap/NAME")
        p = name_problem(name, label=False)
        if p:
            raise ValueError(f"{x!r}: the name {p}")
    return list(v)


def env_from(entries: Any) -> list[dict[str, Any]]:
    """The container's ``envFrom`` for entries checked by :func:`_check_env_from`."""
    out = []
    for x in entries or ():
        kind, _, name = x.rpartition("/")
        out.append({ENV_FROM_KINDS[(kind or "secret").lower()]: {"name": name}})
    return out


# the kinds of value both models take, each with its rule (settings may also come as text: MESHRUN_KUBERNETES_*)
LabelName = Annotated[Optional[str], BeforeValidator(lambda v: _check_name(v, label=True))]  # namespace, account
Subdomain = Annotated[Optional[str], BeforeValidator(_check_name)]  # a DNS subdomain: PriorityClass, domain
QueueName = Annotated[Optional[str], BeforeValidator(_check_queue)]
Tolerations = Annotated[list[dict[str, Any]], BeforeValidator(_check_tolerations)]
EnvFrom = Annotated[Optional[list[str]], BeforeValidator(_check_env_from)]
PullPolicy = Optional[Literal["Always", "IfNotPresent", "Never"]]
Labels = Annotated[dict[str, str], BeforeValidator(_check_label_values)]
Annotations = Annotated[dict[str, str], BeforeValidator(_check_labels)]
LabelsText = Annotated[dict[str, str], BeforeValidator(lambda v: _check_label_values(_tableify(v)))]
AnnotationsText = Annotated[dict[str, str], BeforeValidator(lambda v: _check_labels(_tableify(v)))]


class KubernetesSettings(mb.BackendSettings):
    """``[backends.kubernetes]``: where and how to talk to the cluster, and job defaults."""

    kubeconfig: Optional[str] = None  # default: $KUBECONFIG, else ~/.kube/config
    context: Optional[str] = None  # a context of the kubeconfig (default: its current-context)
    in_cluster: Optional[bool] = None  # None: in-cluster config when no kubeconfig exists and running in a pod
    namespace: LabelName = None  # default: the context's namespace, else "default"
    image: Optional[str] = None  # default container image when the spec has none
    image_pull_policy: PullPolicy = None
    image_pull_secrets: Annotated[list[str], BeforeValidator(_check_secrets)] = Field(default_factory=list)
    queue: QueueName = None  # Kueue LocalQueue; None: no Kueue
    priority_class: Subdomain = None
    workload_priority_class: Subdomain = None
    kueue_version: Literal["v1beta1", "v1beta2"] = "v1beta1"
    gpu_resource: Annotated[str, BeforeValidator(_check_resource)] = "nvidia.com/gpu"
    gpu_label: Annotated[str, BeforeValidator(_check_key)] = "nvidia.com/gpu.product"
    # {"H100": ["NVIDIA-H100-80GB-HBM3"]}
    gpu_products: Annotated[dict[str, list[str]], BeforeValidator(
        lambda v: _tableify(v) if isinstance(v, str) and v.strip().startswith("{") else v)] = Field(default_factory=dict)
    node_selector: LabelsText = Field(default_factory=dict)
    tolerations: Tolerations = Field(default_factory=list)
    service_account: LabelName = None
    labels: LabelsText = Field(default_factory=dict)
    annotations: AnnotationsText = Field(default_factory=dict)
    multi_node: Literal["indexed", "jobset"] = "indexed"
    master_port: int = Field(29500, ge=1, le=65535)
    cluster_domain: Subdomain = None  # e.g. "cluster.local": makes MASTER_ADDR fully qualified
    ttl_after_finished: Optional[int] = Field(7 * 86400, ge=0)
    python: str = "python3"  # the interpreter in the image that runs function jobs
    workdir: Optional[str] = None
    result_max_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    request_timeout: float = Field(30.0, gt=0)
    # Secrets ("NAME") and ConfigMaps ("configmap/NAME") whose keys become the environment of a job with
    # inputs/outputs (its S3 endpoint and credentials: docs/data.md); referenced by name only
    data_env_from: EnvFrom = None


class KubernetesOptions(mb.BackendOptions):
    """``backend_options["kubernetes"]`` of one job."""

    namespace: LabelName = None  # namespace to run in
    queue: QueueName = None  # Kueue LocalQueue name (kueue.x-k8s.io/queue-name)
    priority_class: Subdomain = None  # PriorityClass of the pods (spec.priorityClassName)
    workload_priority_class: Subdomain = None  # Kueue WorkloadPriorityClass (kueue.x-k8s.io/priority-class)
    node_selector: Labels = Field(default_factory=dict)  # extra node selector labels
    tolerations: Tolerations = Field(default_factory=list)  # extra pod tolerations
    service_account: LabelName = None  # service account of the pods
    labels: Labels = Field(default_factory=dict)  # extra labels on the Job and its pods
    annotations: Annotations = Field(default_factory=dict)  # extra annotations on the Job and its pods
    multi_node: Optional[Literal["indexed", "jobset"]] = None  # Indexed Job + headless Service, or a JobSet
    # values of the GPU product node label that match the job's gpu_type
    gpu_products: Annotated[Optional[list[str]], BeforeValidator(_check_products)] = None
    image_pull_policy: PullPolicy = None  # Always, IfNotPresent or Never
    workdir: Annotated[Optional[str], BeforeValidator(_check_workdir)] = None  # working directory in the container
    ttl_after_finished: Optional[int] = Field(-1, ge=-1)  # seconds a finished Job is kept; -1: the setting
    data_env_from: EnvFrom = None  # Secrets/ConfigMaps for a data job's environment; replaces the setting's


def load_job_options(spec: Any) -> KubernetesOptions:
    """``backend_options["kubernetes"]`` as a typed object; a bad key or value raises SpecError naming it."""
    return KubernetesOptions.load("kubernetes", spec.options_for("kubernetes"))
