"""The backend conformance suite (meshrun.testing.BackendContract) for Kubernetes: there is no live cluster
here, so no check can run a job. What the recorded API exchanges cover instead is listed in
docs/backends/kubernetes.md (test_end_to_end.py: submit, Kueue wait, result from the pod log, logs; test_client.py:
batched status, cancel, find)."""

from __future__ import annotations

import pytest

from meshrun.testing import CHECKS, BackendContract

NO_CLUSTER = "no live Kubernetes cluster here (the backend is tested against recorded API exchanges)"
REPLAYED = {
    "function_result_and_exception": "a function's result read back from the pod log: test_end_to_end.py",
    "logs_follow_ends": "plain and followed logs: test_end_to_end.py",
    "batched_status": "the status of many jobs in three requests: test_client.py",
    "idempotent_cancel": "a foreground delete: test_client.py",
    "env_contract_2_nodes": "the Indexed Job's env: test_manifests.py golden files",
}


class TestKubernetesContract(BackendContract):
    label = "kubernetes (recorded exchanges)"
    cannot = {c: NO_CLUSTER + (f"; replayed instead: {REPLAYED[c]}" if c in REPLAYED else "") for c in CHECKS}

    @pytest.fixture
    def contract_backend(self):
        return "kubernetes"
