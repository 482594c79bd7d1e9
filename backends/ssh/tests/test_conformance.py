"""The backend conformance suite (meshrun.testing.BackendContract) on the test pool of sshd hosts, each with
fake GPUs declared through MESHRUN_GPUS."""

from __future__ import annotations

import pytest

from meshrun.testing import BackendContract

pytestmark = pytest.mark.service


class TestSSHContract(BackendContract):
    label = "ssh pool"
    nodes = 1
    gpus = 2
    cannot = {"env_contract_2_nodes": "the ssh backend runs single-node jobs (one host of the pool each)"}

    @pytest.fixture
    def contract_backend(self, ssh_backend, workdir):
        ssh_backend(gpus=2)
        return "ssh"
