"""meshrun backend for Kubernetes: batch/v1 Jobs (Indexed Jobs with a headless Service, or JobSet, for
several nodes), queued fairly through Kueue when a queue is configured.

    [backends.kubernetes]
    context = "lab"          # kubeconfig context (default: the current one); in a pod: in-cluster config
    namespace = "ml"
    image = "ghcr.io/lab/train:2024.06"
    queue = "team-a"         # Kueue LocalQueue

Importing this package does not import the ``kubernetes`` client: it is loaded on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KubernetesBackend"]


def __getattr__(name: str) -> Any:
    if name == "KubernetesBackend":
        from ._backend import KubernetesBackend

        globals()[name] = KubernetesBackend
        return KubernetesBackend
    raise AttributeError(f"module 'meshrun_kubernetes' has no attribute {name!r}")
