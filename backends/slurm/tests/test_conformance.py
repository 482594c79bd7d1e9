"""The backend conformance suite (meshrun.testing.BackendContract) on the test Slurm cluster (2+ nodes with 4
fake GPUs each, through gres), in each of the backend's three modes: sbatch, slurmrestd and a login node."""

from __future__ import annotations

import pytest

from meshrun.testing import BackendContract

from .test_login import login_node, via_login  # noqa: F401  (fixtures)
from .test_rest import rest  # noqa: F401  (fixture)

pytestmark = pytest.mark.service


class SlurmContract(BackendContract):
    nodes = 2
    gpus = 4


class TestSbatchContract(SlurmContract):
    label = "slurm (sbatch)"

    @pytest.fixture
    def contract_backend(self, slurm):
        return "slurm"


class TestRestContract(SlurmContract):
    label = "slurm (slurmrestd)"

    @pytest.fixture
    def contract_backend(self, rest):
        return "slurm"


class TestLoginNodeContract(SlurmContract):
    label = "slurm (login node)"
    cannot = {"env_contract_2_nodes": "rank 1's output stays on the cluster in login-node mode (only rank 0's log "
                                      "and the result records come back), so the check cannot read its env"}

    @pytest.fixture
    def contract_backend(self, via_login):
        return "slurm"
