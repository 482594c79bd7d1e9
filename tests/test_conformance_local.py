"""The backend conformance suite (meshrun.testing.BackendContract) against the local backend, with fake GPUs."""

from __future__ import annotations

import pytest

from meshrun.testing import BackendContract


class TestLocalContract(BackendContract):
    label = "local"
    nodes = 1
    gpus = 2
    timeout = 60.0
    cannot = {"env_contract_2_nodes": "one machine: the local backend runs single-node jobs"}

    @pytest.fixture
    def contract_backend(self, fake_gpus):
        fake_gpus(2)
        return "local"
