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

import meshrun.backend as mb

__all__ = ["KubernetesBackend"]


__getattr__ = mb.lazy_exports(__name__, {"KubernetesBackend": "._backend"})
