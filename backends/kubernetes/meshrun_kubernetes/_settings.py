"""Typed settings: the ``[backends.kubernetes]`` table (and ``MESHRUN_KUBERNETES_<KEY>`` variables), and the
per-job ``backend_options["kubernetes"]``. Unknown keys are errors that list the valid ones.

Both are declared models (``KubernetesBackend.settings_model`` / ``options_model``) the core validates.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Mapping, Optional

from pydantic import Field, field_validator

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


class KubernetesSettings(mb.BackendSettings):
    """``[backends.kubernetes]``: where and how to talk to the cluster, and job defaults."""

    kubeconfig: Optional[str] = None  # default: $KUBECONFIG, else ~/.kube/config
    context: Optional[str] = None  # a context of the kubeconfig (default: its current-context)
    in_cluster: Optional[bool] = None  # None: in-cluster config when no kubeconfig exists and running in a pod
    namespace: Optional[str] = None  # default: the context's namespace, else "default"
    image: Optional[str] = None  # default container image when the spec has none
    image_pull_policy: Optional[Literal["Always", "IfNotPresent", "Never"]] = None
    image_pull_secrets: list[str] = Field(default_factory=list)
    queue: Optional[str] = None  # Kueue LocalQueue; None: no Kueue
    priority_class: Optional[str] = None
    workload_priority_class: Optional[str] = None
    kueue_version: Literal["v1beta1", "v1beta2"] = "v1beta1"
    gpu_resource: str = "nvidia.com/gpu"
    gpu_label: str = "nvidia.com/gpu.product"
    gpu_products: dict[str, list[str]] = Field(default_factory=dict)  # {"H100": ["NVIDIA-H100-80GB-HBM3"]}
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    service_account: Optional[str] = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    multi_node: Literal["indexed", "jobset"] = "indexed"
    master_port: int = Field(29500, ge=1, le=65535)
    cluster_domain: Optional[str] = None  # e.g. "cluster.local": makes MASTER_ADDR fully qualified
    ttl_after_finished: Optional[int] = Field(7 * 86400, ge=0)
    python: str = "python3"  # the interpreter in the image that runs function jobs
    workdir: Optional[str] = None
    result_max_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    request_timeout: float = Field(30.0, gt=0)

    @field_validator("namespace", "service_account", mode="before")
    @classmethod
    def _v_label_names(cls, v: Any) -> Any:
        return _check_name(v, label=True)

    @field_validator("queue", mode="before")
    @classmethod
    def _v_queue(cls, v: Any) -> Any:
        return _check_queue(v)

    @field_validator("priority_class", "workload_priority_class", "cluster_domain", mode="before")
    @classmethod
    def _v_sub(cls, v: Any) -> Any:
        return _check_name(v, label=False)

    @field_validator("image_pull_secrets", mode="before")
    @classmethod
    def _v_secrets(cls, v: Any) -> Any:
        v = _listify(v)
        for s in v or []:
            _check_name(s, label=False)
        return v or []

    @field_validator("node_selector", mode="before")
    @classmethod
    def _v_ns(cls, v: Any) -> Any:
        return _check_label_values(_tableify(v))

    @field_validator("labels", mode="before")
    @classmethod
    def _v_labels(cls, v: Any) -> Any:
        return _check_label_values(_tableify(v))

    @field_validator("annotations", mode="before")
    @classmethod
    def _v_ann(cls, v: Any) -> Any:
        return _check_labels(_tableify(v))

    @field_validator("gpu_products", mode="before")
    @classmethod
    def _v_json_table(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().startswith("{"):
            return _tableify(v)
        return v

    @field_validator("tolerations", mode="before")
    @classmethod
    def _v_tol(cls, v: Any) -> Any:
        return _check_tolerations(v)

    @field_validator("gpu_label", mode="before")
    @classmethod
    def _v_gpu_label(cls, v: Any) -> Any:
        p = label_key_problem(v)
        if p:
            raise ValueError(p)
        return v

    @field_validator("gpu_resource", mode="before")
    @classmethod
    def _v_gpu_res(cls, v: Any) -> Any:
        p = label_key_problem(v)
        if p or "/" not in str(v):
            raise ValueError("expected an extended resource name such as nvidia.com/gpu or amd.com/gpu")
        return v


def _check_queue(v: Any) -> Any:
    """A LocalQueue name is a DNS subdomain that also has to fit in a label value (63 characters)."""
    if v is None:
        return v
    _check_name(v, label=False)
    if len(v) > 63:
        raise ValueError("must be at most 63 characters (it is written in the kueue.x-k8s.io/queue-name label)")
    return v


class KubernetesOptions(mb.BackendOptions):
    """``backend_options["kubernetes"]`` of one job."""

    namespace: Optional[str] = None  # namespace to run in
    queue: Optional[str] = None  # Kueue LocalQueue name (kueue.x-k8s.io/queue-name)
    priority_class: Optional[str] = None  # PriorityClass of the pods (spec.priorityClassName)
    workload_priority_class: Optional[str] = None  # Kueue WorkloadPriorityClass (kueue.x-k8s.io/priority-class)
    node_selector: dict[str, str] = Field(default_factory=dict)  # extra node selector labels
    tolerations: list[dict[str, Any]] = Field(default_factory=list)  # extra pod tolerations
    service_account: Optional[str] = None  # service account of the pods
    labels: dict[str, str] = Field(default_factory=dict)  # extra labels on the Job and its pods
    annotations: dict[str, str] = Field(default_factory=dict)  # extra annotations on the Job and its pods
    multi_node: Optional[Literal["indexed", "jobset"]] = None  # Indexed Job + headless Service, or a JobSet
    gpu_products: Optional[list[str]] = None  # values of the GPU product node label that match the job's gpu_type
    image_pull_policy: Optional[Literal["Always", "IfNotPresent", "Never"]] = None  # Always, IfNotPresent or Never
    workdir: Optional[str] = None  # working directory inside the container
    ttl_after_finished: Optional[int] = Field(-1, ge=-1)  # seconds a finished Job is kept; -1: the setting

    @field_validator("namespace", "service_account", mode="before")
    @classmethod
    def _v_names(cls, v: Any) -> Any:
        return _check_name(v, label=True)

    @field_validator("queue", mode="before")
    @classmethod
    def _v_queue(cls, v: Any) -> Any:
        return _check_queue(v)

    @field_validator("priority_class", "workload_priority_class", mode="before")
    @classmethod
    def _v_sub(cls, v: Any) -> Any:
        return _check_name(v, label=False)

    @field_validator("node_selector", "labels", mode="before")
    @classmethod
    def _v_labels(cls, v: Any) -> Any:
        return _check_label_values(v)

    @field_validator("annotations", mode="before")
    @classmethod
    def _v_ann(cls, v: Any) -> Any:
        return _check_labels(v)

    @field_validator("tolerations", mode="before")
    @classmethod
    def _v_tol(cls, v: Any) -> Any:
        return _check_tolerations(v)

    @field_validator("gpu_products", mode="before")
    @classmethod
    def _v_products(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, str) or not isinstance(v, (list, tuple)):
            raise ValueError("expected a list of node label values")
        for x in v:
            p = label_value_problem(x)
            if p or not x:
                raise ValueError(f"{x!r} is not a valid label value")
        return list(v)

    @field_validator("workdir", mode="before")
    @classmethod
    def _v_workdir(cls, v: Any) -> Any:
        if v is not None and (not isinstance(v, str) or not v.startswith("/") or "\x00" in v):
            raise ValueError("expected an absolute path inside the container")
        return v


def load_job_options(spec: Any) -> KubernetesOptions:
    """``backend_options["kubernetes"]`` as a typed object; a bad key or value raises SpecError naming it."""
    return KubernetesOptions.load("kubernetes", spec.options_for("kubernetes"))
