"""One translation table for Slurm's states, and the parsers of squeue/sacct/sinfo/sbatch output."""

from __future__ import annotations

import pytest

import meshrun
from meshrun_slurm import _states as S

JS = meshrun.JobState

EXPECTED = {
    "PENDING": JS.PENDING, "CONFIGURING": JS.PENDING, "REQUEUED": JS.PENDING, "REQUEUE_HOLD": JS.PENDING,
    "REQUEUE_FED": JS.PENDING, "RESV_DEL_HOLD": JS.PENDING, "POWER_UP_NODE": JS.PENDING,
    "RUNNING": JS.RUNNING, "COMPLETING": JS.RUNNING, "SUSPENDED": JS.RUNNING, "STOPPED": JS.RUNNING,
    "SIGNALING": JS.RUNNING, "STAGE_OUT": JS.RUNNING, "RESIZING": JS.RUNNING, "UPDATE_DB": JS.RUNNING,
    "COMPLETED": JS.SUCCEEDED, "FAILED": JS.FAILED, "CANCELLED": JS.CANCELLED, "TIMEOUT": JS.TIMEOUT,
    "DEADLINE": JS.TIMEOUT, "PREEMPTED": JS.PREEMPTED, "NODE_FAIL": JS.FAILED, "BOOT_FAIL": JS.FAILED,
    "OUT_OF_MEMORY": JS.FAILED, "SPECIAL_EXIT": JS.FAILED, "REVOKED": JS.CANCELLED,
}


def test_table_covers_every_state():
    assert set(S.STATES) == set(EXPECTED)
    for name, want in EXPECTED.items():
        assert S.to_status(S.Row(id="1", state=name)).state is want, name
    assert set(S.COMPACT.values()) <= set(S.STATES)


def test_unknown_state_is_unknown_not_an_outcome():
    st = S.to_status(S.Row(id="1", state="SOMETHING_NEW"))
    assert st.state is JS.UNKNOWN and "SOMETHING_NEW" in st.reason


def test_pending_reason_is_shown_in_slurms_words():
    st = S.to_status(S.Row(id="1", state="PENDING", reason="Resources"))
    assert st.reason.startswith("Resources") and "free resources" in st.reason
    st = S.to_status(S.Row(id="1", state="PENDING", reason="Priority"))
    assert st.reason.startswith("Priority")
    st = S.to_status(S.Row(id="1", state="PENDING", reason="QOSGrpCpuLimit"))
    assert st.reason == "QOSGrpCpuLimit"


@pytest.mark.parametrize("state,word", [("OUT_OF_MEMORY", "memory"), ("NODE_FAIL", "node"), ("TIMEOUT", "time limit"),
                                        ("PREEMPTED", "preempted")])
def test_terminal_reasons_name_the_cause(state, word):
    st = S.to_status(S.Row(id="1", state=state, exit_code=0, signal=9))
    assert st.reason.startswith(state) and word in st.reason
    assert st.terminal


def test_parse_squeue():
    text = ("12|PENDING|Resources|N/A|N/A||meshrun-abc\n"
            "13_4|RUNNING|None|2026-11-29T18:10:43|2026-11-29T19:10:43|node[1-2]|meshrun-array-x|y\n"
            "14|COMPLETING|None|2026-11-29T18:10:43|2026-11-29T18:10:44|node1|wrap\n")
    rows = S.parse_squeue(text)
    assert rows["12"].state == "PENDING" and rows["12"].reason == "Resources" and rows["12"].start is None
    assert rows["13_4"].nodes == "node[1-2]" and rows["13_4"].name == "meshrun-array-x|y"
    assert rows["14"].state == "COMPLETING" and rows["14"].start is not None


def test_parse_sacct():
    text = ("15|CANCELLED by 0|0:15|None|2026-11-29T18:10:59|2026-11-29T18:11:00|node1|allocation\n"
            "16|FAILED|3:0|NonZeroExitCode|2026-11-29T18:10:59|2026-11-29T18:11:00|node2|failing\n"
            "17_[3-5%2]|PENDING|0:0|JobArrayTaskLimit|Unknown|Unknown|None assigned|arr\n"
            "18|OUT_OF_MEMORY|0:125|OutOfMemory|2026-11-29T18:10:59|2026-11-29T18:11:00|node1|big\n")
    rows = S.parse_sacct(text)
    assert rows["15"].state == "CANCELLED" and rows["15"].by == "0"
    assert S.to_status(rows["15"]).reason.startswith("CANCELLED") and "uid 0" in S.to_status(rows["15"]).reason
    assert rows["16"].exit_code == 3 and S.to_status(rows["16"]).exit_code == 3
    assert {"17_3", "17_4", "17_5"} <= set(rows) and rows["17_4"].nodes is None
    assert S.to_status(rows["18"]).state is JS.FAILED


def test_parse_sinfo_and_gres():
    groups = S.parse_sinfo("debug*|up|infinite|1|4|8000|gpu:4|mixed|node1\n"
                           "gpu|up|2-00:00:00|3|64|512000|gpu:a100:8(S:0-1),nvme:1|idle|g[1-3]\n")
    assert groups[0].default and groups[0].time_limit is None and groups[0].count == 1
    assert groups[1].time_limit == 2 * 86400 and groups[1].memory == 512000
    assert S.gpus_in_gres(groups[1].gres) == [("a100", 8)]
    assert S.gpus_in_gres(groups[1].gres, "A100") == [("a100", 8)]
    assert S.gpus_in_gres(groups[1].gres, "h100") == []
    assert S.gpus_in_gres("gpu:4") == [(None, 4)]
    assert S.gpus_in_gres("(null)") == []


def test_parse_test_only():
    est = S.parse_test_only("sbatch: Job 8 to start at 2026-11-29T18:11:08 using 1 processors on nodes node1 "
                            "in partition debug")
    assert est == {"start": "2026-11-29T18:11:08", "cpus": "1", "nodes": "node1", "partition": "debug"}
    assert S.parse_test_only("allocation failure: Requested node configuration is not available") is None


def test_ids_for_query_and_expand():
    assert S.ids_for_query(["12_1", "12_2", "13", "12_3"]) == ["12", "13"]
    assert S.expand_ids("9_[1-3,7]") == ["9_1", "9_2", "9_3", "9_7"]
    assert S.expand_ids("9_4") == ["9_4"]
