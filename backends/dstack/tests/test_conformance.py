"""The backend conformance suite (meshrun.testing.BackendContract) as far as the test dstack server goes: it
accepts, lists and stops runs, but has no fleets, so no run ever gets an instance and no job runs."""

from __future__ import annotations

import pytest

from meshrun.testing import CHECKS, BackendContract

pytestmark = pytest.mark.service

NO_FLEETS = "the test dstack server has no fleets: no run ever gets an instance, so no job runs here"


class TestDstackContract(BackendContract):
    label = "dstack (server without fleets)"
    runs_jobs = False
    timeout = 60.0
    backend_options = {"dstack": {"retry": "1h"}}  # the run waits for capacity instead of failing
    cannot = {c: NO_FLEETS for c in CHECKS if c not in ("idempotent_cancel", "batched_status")}

    @pytest.fixture
    def contract_backend(self, dstack):
        return "dstack"
