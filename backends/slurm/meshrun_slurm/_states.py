"""Slurm's job states, one translation table, and the parsers of squeue/sacct output (all pure)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable

import meshrun
import meshrun.backend as mb

JS = mb.JobState

# Every state squeue, scontrol or sacct can print (Slurm 22.05 job_state_string and its flags).
STATES: dict[str, tuple[mb.JobState, str]] = {
    "PENDING": (JS.PENDING, "waiting in the Slurm queue"),
    "CONFIGURING": (JS.PENDING, "its nodes are being configured"),
    "RESV_DEL_HOLD": (JS.PENDING, "held while its reservation is deleted"),
    "REQUEUED": (JS.PENDING, "requeued by Slurm"),
    "REQUEUE_FED": (JS.PENDING, "requeued by the federation"),
    "REQUEUE_HOLD": (JS.PENDING, "requeued and held"),
    "RUNNING": (JS.RUNNING, "running"),
    "COMPLETING": (JS.RUNNING, "completing (Slurm is ending its processes)"),
    "SIGNALING": (JS.RUNNING, "being signalled"),
    "STAGE_OUT": (JS.RUNNING, "staging out"),
    "RESIZING": (JS.RUNNING, "being resized"),
    "SUSPENDED": (JS.RUNNING, "suspended by Slurm"),
    "STOPPED": (JS.RUNNING, "stopped by a signal (SIGSTOP)"),
    "UPDATE_DB": (JS.RUNNING, "being recorded in the accounting database"),
    "POWER_UP_NODE": (JS.PENDING, "its nodes are powering up"),
    "COMPLETED": (JS.SUCCEEDED, "completed"),
    "FAILED": (JS.FAILED, "failed"),
    "CANCELLED": (JS.CANCELLED, "cancelled"),
    "TIMEOUT": (JS.TIMEOUT, "reached its Slurm time limit"),
    "DEADLINE": (JS.TIMEOUT, "reached its deadline"),
    "PREEMPTED": (JS.PREEMPTED, "preempted"),
    "NODE_FAIL": (JS.FAILED, "one of its nodes failed"),
    "BOOT_FAIL": (JS.FAILED, "its node failed to boot"),
    "OUT_OF_MEMORY": (JS.FAILED, "ran out of memory"),
    "SPECIAL_EXIT": (JS.FAILED, "ended in Slurm's special-exit state"),
    "REVOKED": (JS.CANCELLED, "revoked (it runs on another cluster of the federation)"),
}

# squeue's compact codes, for the odd tool that prints them
COMPACT = {
    "PD": "PENDING", "CF": "CONFIGURING", "RQ": "REQUEUED", "RF": "REQUEUE_FED", "RH": "REQUEUE_HOLD",
    "RD": "RESV_DEL_HOLD", "R": "RUNNING", "CG": "COMPLETING", "SI": "SIGNALING", "SO": "STAGE_OUT",
    "RS": "RESIZING", "S": "SUSPENDED", "ST": "STOPPED", "CD": "COMPLETED", "F": "FAILED", "CA": "CANCELLED",
    "TO": "TIMEOUT", "DL": "DEADLINE", "PR": "PREEMPTED", "NF": "NODE_FAIL", "BF": "BOOT_FAIL",
    "OOM": "OUT_OF_MEMORY", "SE": "SPECIAL_EXIT", "RV": "REVOKED",
}

# what the common pending reasons mean, for people who do not speak Slurm
REASONS = {
    "Resources": "waiting for free resources",
    "Priority": "waiting behind jobs of higher priority",
    "Dependency": "waiting for a dependency",
    "DependencyNeverSatisfied": "its dependency can never be satisfied",
    "BeginTime": "waiting for its start time",
    "JobHeldUser": "held by its user (scontrol release)",
    "JobHeldAdmin": "held by an administrator",
    "ReqNodeNotAvail": "a requested node is not available",
    "PartitionDown": "the partition is down",
    "PartitionInactive": "the partition is inactive",
    "PartitionTimeLimit": "its time limit exceeds the partition's",
    "PartitionNodeLimit": "its node count is outside the partition's limits",
    "NodeDown": "a node it needs is down",
    "Reservation": "waiting for its reservation",
    "QOSMaxJobsPerUserLimit": "the QOS limit of running jobs per user is reached",
    "QOSMaxGRESPerUser": "the QOS limit of GPUs per user is reached",
    "AssocMaxJobsLimit": "the account's limit of running jobs is reached",
    "AssocGrpGRES": "the account's GPU limit is reached",
    "JobArrayTaskLimit": "the array's limit of tasks at once is reached",
    "BadConstraints": "its constraints cannot be satisfied",
    "launch failed requeued held": "its launch failed; requeued and held",
    "TimeLimit": "reached its time limit",
    "NonZeroExitCode": "exited with a nonzero code",
}

# reasons a job waits for; Slurm keeps the last one on a job that ended without running (not the cause)
WAITING_REASONS = frozenset({
    "Resources", "Priority", "Dependency", "BeginTime", "JobHeldUser", "JobHeldAdmin", "ReqNodeNotAvail",
    "Reservation", "JobArrayTaskLimit", "PartitionDown", "PartitionInactive", "NodeDown", "Licenses",
})

TERMINAL_SLURM = frozenset(k for k, (s, _) in STATES.items() if s.terminal)


@dataclass(frozen=True)
class Row:
    """One job as squeue or sacct reports it."""

    id: str
    state: str  # the base state, e.g. CANCELLED (sacct's "CANCELLED by 0" is split into state and by)
    reason: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    start: float | None = None
    end: float | None = None
    nodes: str | None = None
    name: str | None = None
    by: str | None = None  # "CANCELLED by <uid>"
    source: str = "squeue"


def base_state(text: str) -> tuple[str, str | None]:
    """("CANCELLED", "0") from "CANCELLED by 0"; compact codes are expanded; flags after '+' dropped."""
    text = (text or "").strip()
    by = None
    m = re.match(r"^(\S+)\s+by\s+(\S+)", text)
    if m:
        text, by = m.group(1), m.group(2)
    text = text.split("+", 1)[0].upper()
    return COMPACT.get(text, text), by


def parse_time(text: str | None) -> float | None:
    """Slurm's local ISO time ("2026-11-29T18:10:43"), or None for N/A, Unknown, None, blanks."""
    if not text:
        return None
    text = text.strip()
    if text in ("N/A", "Unknown", "None", "(null)", "0"):
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def _exit(text: str | None) -> tuple[int | None, int | None]:
    if not text or ":" not in text:
        return None, None
    a, _, b = text.partition(":")
    try:
        return int(a), int(b)
    except ValueError:
        return None, None


# squeue: id | state | reason | start | end | nodes | name  (the name last: it may hold anything)
SQUEUE_FORMAT = "%i|%T|%r|%S|%e|%N|%j"
SACCT_FIELDS = "JobID,State,ExitCode,Reason,Start,End,NodeList,JobName"


def parse_squeue(text: str) -> dict[str, Row]:
    rows = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("|", 6)
        if len(parts) < 7:
            continue
        jid, state, reason, start, end, nodes, name = parts
        st, _ = base_state(state)
        rows[jid.strip()] = Row(
            id=jid.strip(), state=st, reason=_clean(reason), start=parse_time(start), end=parse_time(end),
            nodes=_clean(nodes), name=name, source="squeue",
        )
    return rows


def parse_sacct(text: str) -> dict[str, Row]:
    """``sacct -X -P -n -o SACCT_FIELDS`` output; pending array ranges ("12_[3-9%2]") are expanded."""
    rows = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("|", 7)
        if len(parts) < 8:
            continue
        jid, state, exitcode, reason, start, end, nodes, name = parts
        st, by = base_state(state)
        code, sig = _exit(exitcode)
        for one in expand_ids(jid.strip()):
            rows[one] = Row(
                id=one, state=st, reason=_clean(reason), exit_code=code, signal=sig, start=parse_time(start),
                end=parse_time(end), nodes=_clean(nodes), name=name, by=by, source="sacct",
            )
    return rows


def _clean(v: str | None) -> str | None:
    v = (v or "").strip()
    return None if v in ("", "None", "(null)", "N/A", "None assigned") else v


def expand_ids(jid: str) -> list[str]:
    """"12_[3-5,8%2]" -> ["12_3", "12_4", "12_5", "12_8"]; anything else as is."""
    m = re.match(r"^(\d+)_\[([0-9,\-]+)(?:%\d+)?\]$", jid)
    if not m:
        return [jid]
    out: list[str] = []
    for part in m.group(2).split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(f"{m.group(1)}_{i}" for i in range(int(a), int(b) + 1))
        elif part:
            out.append(f"{m.group(1)}_{part}")
    return out


def describe_reason(reason: str | None) -> str | None:
    if not reason:
        return None
    hint = REASONS.get(reason)
    return f"{reason} ({hint})" if hint else reason


def to_status(row: Row) -> mb.JobStatus:
    """The meshrun status for one Slurm row, with Slurm's reason in its own words first."""
    state, what = STATES.get(row.state, (JS.UNKNOWN, f"in a state meshrun does not know ({row.state})"))
    reason: str | None
    if state is JS.PENDING:
        reason = describe_reason(row.reason) or what
        if row.state != "PENDING":
            reason = f"{row.state}: {what}" + (f"; {describe_reason(row.reason)}" if row.reason else "")
    elif state is JS.RUNNING:
        reason = None if row.state == "RUNNING" else f"{row.state}: {what}"
    else:
        reason = f"{row.state}: {what}"
        if row.by:
            reason += f" by uid {row.by}"
        if row.reason and row.reason not in ("None", row.state) and row.reason not in WAITING_REASONS:
            reason += f" ({describe_reason(row.reason)})"
        if row.exit_code is not None and (row.exit_code or row.signal):
            reason += f"; exit code {row.exit_code}" + (f", signal {row.signal}" if row.signal else "")
    exit_code = row.exit_code
    if row.signal and not exit_code:
        exit_code = 128 + row.signal
    return mb.JobStatus(
        state=state,
        reason=reason,
        exit_code=exit_code if state.terminal else None,
        started_at=row.start,
        ended_at=row.end if state.terminal else None,
        where=row.nodes,
        detail={"slurm_state": row.state, "source": row.source, **({"slurm_reason": row.reason} if row.reason else {})},
    )


def seconds_until(text: str, now: float | None = None) -> float | None:
    """Seconds from now to a Slurm local time (0 when it is already past)."""
    t = parse_time(text)
    if t is None:
        return None
    return max(0.0, t - (time.time() if now is None else now))


_TEST_ONLY = re.compile(r"Job\s+\d+\s+to start at\s+(\S+)\s+using\s+(\d+)\s+processors on nodes\s+(\S+)"
                        r"(?:\s+in partition\s+(\S+))?")


def parse_test_only(text: str) -> dict[str, str] | None:
    """``sbatch --test-only``: "sbatch: Job 8 to start at 2026-11-29T18:11:08 using 1 processors on nodes
    node1 in partition debug" -> {start, cpus, nodes, partition}."""
    m = _TEST_ONLY.search(text or "")
    if not m:
        return None
    return {"start": m.group(1), "cpus": m.group(2), "nodes": m.group(3), "partition": m.group(4) or ""}


@dataclass(frozen=True)
class NodeGroup:
    """One line of ``sinfo``: nodes of a partition that share their size."""

    partition: str
    default: bool
    available: str  # up / down / drain / inact
    time_limit: float | None  # seconds; None = infinite
    count: int
    cpus: int
    memory: int  # MB
    gres: str
    state: str
    nodes: str


SINFO_FORMAT = "%P|%a|%l|%D|%c|%m|%G|%T|%N"


def parse_sinfo(text: str) -> list[NodeGroup]:
    out = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 9:
            continue
        part, avail, limit, count, cpus, mem, gres, state, nodes = parts[:9]
        default = part.endswith("*")
        try:
            out.append(NodeGroup(
                partition=part.rstrip("*"), default=default, available=avail, time_limit=parse_limit(limit),
                count=int(count), cpus=int(re.sub(r"\D.*$", "", cpus) or 0),
                memory=int(re.sub(r"\D.*$", "", mem) or 0), gres=gres, state=state, nodes=nodes,
            ))
        except ValueError:
            continue
    return out


def parse_limit(text: str) -> float | None:
    """sinfo's time limit ("infinite", "1-00:00:00", "30:00") in seconds."""
    text = (text or "").strip()
    if text in ("infinite", "UNLIMITED", "n/a", "", "NONE"):
        return None
    try:
        return meshrun.parse_duration(text)
    except ValueError:
        return None


def gpus_in_gres(gres: str, gpu_type: str | None = None) -> list[tuple[str | None, int]]:
    """The GPU entries of a gres string: "gpu:a100:4(S:0-1),gpu:2,nvme:1" -> [("a100", 4), (None, 2)].
    With ``gpu_type`` only entries of that type (case-insensitive)."""
    out = []
    for item in re.split(r",(?![^()]*\))", gres or ""):
        item = re.sub(r"\(.*\)$", "", item.strip())
        if not item.startswith("gpu"):
            continue
        parts = item.split(":")
        if parts[0] != "gpu":
            continue
        if len(parts) == 2:
            typ, n = None, parts[1]
        elif len(parts) >= 3:
            typ, n = parts[1], parts[2]
        else:
            continue
        try:
            count = int(re.sub(r"\D.*$", "", n))
        except ValueError:
            continue
        if gpu_type and (typ is None or _norm(typ) != _norm(gpu_type)):
            continue
        out.append((typ, count))
    return out


def _norm(s: str) -> str:
    return "".join(c for c in s.lower() if c.isalnum())


def merge_rows(*sources: dict[str, Row]) -> dict[str, Row]:
    out: dict[str, Row] = {}
    for src in sources:
        out.update(src)
    return out


def ids_for_query(ids: Iterable[str]) -> list[str]:
    """Slurm job ids to ask about: array tasks "12_3" are asked about through their array "12"."""
    seen: dict[str, None] = {}
    for i in ids:
        seen.setdefault(i.split("_", 1)[0], None)
    return list(seen)
