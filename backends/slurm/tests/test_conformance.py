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


_SAME_SCRIPT = ("the same batch script and agent as the sbatch column (where it passes); this mode changes only how "
                "meshrun {what}, which the other checks of this column exercise")
_REST = _SAME_SCRIPT.format(what="submits, asks about and cancels jobs")
_LOGIN = _SAME_SCRIPT.format(what="reaches the cluster (over SSH) and brings records and logs back")


class TestRestContract(SlurmContract):
    label = "slurm (slurmrestd)"
    cannot = {c: _REST for c in ("env_contract_1_node", "env_contract_2_nodes", "gpu_count", "time_limit",
                                 "logs_follow_ends", "corrupted_result_detected")}

    @pytest.fixture
    def contract_backend(self, rest):
        return "slurm"


class TestLoginNodeContract(SlurmContract):
    label = "slurm (login node)"
    cannot = {"env_contract_2_nodes": "rank 1's output stays on the cluster in login-node mode (only rank 0's log "
                                      "and the result records come back), so the check cannot read its env",
              **{c: _LOGIN for c in ("env_contract_1_node", "gpu_count", "time_limit")}}

    @pytest.fixture
    def contract_backend(self, via_login):
        return "slurm"
