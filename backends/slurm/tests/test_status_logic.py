"""How the agent's exit records and Slurm's rows combine into one status (pure: no Slurm needed).

Slurm stops a job with signals for a time limit, a cancel, a node failure, preemption or OOM; the agent then
records "cancelled" or a death by signal, and Slurm's state must win. A record of the job's own outcome
(success, an exit code, the agent's own time limit) needs no scheduler call at all."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import meshrun
from meshrun_slurm import _states as S
from meshrun_slurm._backend import SlurmBackend, Target, _from_records

JS = meshrun.JobState
NOW = time.time()


def rec(state, code=None, sig=None, reason=None):
    now = time.time()
    return {"state": state, "exit_code": code, "signal": sig, "reason": reason or state, "started_at": now - 5,
            "ended_at": now, "host": "vm"}


@pytest.fixture
def backend(meshrun_home):
    return SlurmBackend({})


TARGET = Target("j1", Path("/nonexistent"), "/nonexistent", 1, NOW)


@pytest.mark.parametrize("record,want", [
    (rec("succeeded", 0), JS.SUCCEEDED),
    (rec("failed", 3), JS.FAILED),
    (rec("timeout", None), JS.TIMEOUT),
])
def test_own_outcomes_need_no_scheduler(record, want):
    st = _from_records([record])
    assert st is not None and st.state is want


@pytest.mark.parametrize("record", [rec("cancelled"), rec("failed", 143, 15), rec("failed", 137, 9),
                                    rec("failed", None)])
def test_outcomes_slurm_may_have_caused_need_slurm(record):
    assert _from_records([record]) is None


@pytest.mark.parametrize("slurm_state,want", [
    ("TIMEOUT", JS.TIMEOUT), ("CANCELLED", JS.CANCELLED), ("NODE_FAIL", JS.FAILED), ("PREEMPTED", JS.PREEMPTED),
    ("OUT_OF_MEMORY", JS.FAILED), ("DEADLINE", JS.TIMEOUT), ("BOOT_FAIL", JS.FAILED),
])
def test_slurm_wins_over_an_agent_stopped_by_a_signal(backend, slurm_state, want):
    row = S.Row(id="5", state=slurm_state, exit_code=0, signal=15)
    for agent in (rec("cancelled"), rec("failed", 137, 9)):
        st = backend._combine("5", TARGET, [agent], row, None)
        assert st.state is want and st.reason.startswith(slurm_state), st


def test_slurm_failed_with_an_agent_stopped_by_a_signal_stays_failed(backend, monkeypatch):
    agent = rec("cancelled", sig=15, reason="stopped by signal SIGTERM")
    row = S.Row(id="5", state="FAILED", exit_code=1)
    # squeue shows a job being requeued FAILED for a moment: not an outcome yet
    st = backend._combine("5", TARGET, [agent], row, None)
    assert st.state is JS.RUNNING and "requeue" in st.reason
    # still FAILED once Slurm had the time to requeue it: that is the outcome
    monkeypatch.setattr("meshrun_slurm._backend.REQUEUE_SETTLE", 0.0)
    st = backend._combine("5", TARGET, [agent], row, None)
    assert st.state is JS.FAILED and "SIGTERM" in st.reason


def test_requeued_job_with_an_old_exit_record_is_pending(backend):
    st = backend._combine("5", TARGET, [rec("cancelled")], S.Row(id="5", state="PENDING", reason="BeginTime"), None)
    assert st.state is JS.PENDING and st.reason.startswith("BeginTime")


def test_completing_job_is_running(backend):
    st = backend._combine("5", TARGET, [rec("cancelled")], S.Row(id="5", state="COMPLETING"), None)
    assert st.state is JS.RUNNING


def test_unreachable_slurm_is_unknown_not_an_outcome(backend):
    st = backend._combine("5", TARGET, [rec("cancelled")], None, "squeue failed: Unable to contact slurm controller")
    assert st.state is JS.UNKNOWN and "contact" in st.reason


def test_unconfirmed_exit_record_waits_for_slurm_then_counts(backend):
    assert backend._combine("5", TARGET, [rec("cancelled")], None, None).state is JS.UNKNOWN
    old = dict(rec("cancelled"), ended_at=time.time() - 3600)
    assert backend._combine("5", TARGET, [old], None, None).state is JS.CANCELLED


def test_completed_without_records_waits_for_the_filesystem(backend):
    row = S.Row(id="6", state="COMPLETED", exit_code=0)
    assert backend._combine("6", TARGET, [], row, None).state is JS.RUNNING
    backend._settle["6"] = time.monotonic() - 3600
    assert backend._combine("6", TARGET, [], row, None).state is JS.SUCCEEDED


def test_multi_node_records():
    ok = rec("succeeded", 0)
    assert _from_records([ok, ok]).state is JS.SUCCEEDED
    assert _from_records([ok, None]) is None  # node 1 still running
    st = _from_records([rec("cancelled"), rec("failed", 7, reason="exited with code 7")])
    assert st.state is JS.FAILED and st.reason == "node 1: exited with code 7"
