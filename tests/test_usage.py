"""`meshrun usage` over a generated job store and lease history: every number checked against totals worked
out by hand below; the usage record written by real GPU jobs; a record another user could plant is not read."""

from __future__ import annotations

import csv
import io
import json
import os
import pwd
import socket
import time
from datetime import datetime

import pytest

import meshrun
from meshrun import JobState, _agent
from meshrun._cli import main
from meshrun._store import get_store
from meshrun.testing import wait_until

H = 3600.0
T0 = float(int(time.time()) - 3 * 86400)  # the period: T0 .. T0 + 10 h
ME = pwd.getpwuid(os.getuid()).pw_name
HOST = socket.gethostname()
H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture(autouse=True)
def _local_backend(monkeypatch):
    monkeypatch.setenv("MESHRUN_BACKEND", "local")


def _lease(job_id, user, uid, gpus, names, queued, granted, ended, host=HOST):
    return {"v": 1, "uid": uid, "user": user, "job_id": job_id, "name": job_id, "host": host, "gpus": gpus,
            "gpu_names": names, "gpu_type": None, "queued_at": T0 + queued * H, "granted_at": T0 + granted * H,
            "ended_at": T0 + ended * H}


def _store_job(store, name, *, gpus, gpu_type, backend, where, price, sweep, submitted, started, ended, job_id=None):
    launch = {"job_id": job_id, "gpus": gpus, "gpu_type": gpu_type, "nodes": 1}
    plan = {"ranked": [{"backend": backend, "where": where, "total_price_per_hour": price, "gpu_type": gpu_type}]}
    rec = store.create(name=name, kind="command", summary=name, backend=backend, array_id=sweep, job_id=job_id,
                       files={"launch.json": json.dumps(launch).encode(), "plan.json": json.dumps(plan).encode()})
    store.update(rec.id, state=JobState.SUCCEEDED, where=where, submitted_at=T0 + submitted * H,
                 started_at=T0 + started * H, ended_at=T0 + ended * H)
    return rec.id


@pytest.fixture
def history(tmp_path, monkeypatch):
    """The generated history (hours from T0; the period is 0..10):

    lease records of this machine (usage-0.jsonl: root's, so each record names its user)
      L1  me     2 GPUs H100    queued 1.0, granted 1.5, ended 3.5 -> 4 GPU-h, waited 1800 s; also store job
                                                                     L1 (sweep sw2, $1/h for the job)
      L2  bob    1 GPU MI300X   queued 2, granted 2, ended 6       -> 4 GPU-h, waited 0; $2.5/GPU-h (config)
      L3  alice  1 GPU H100     granted -2, ended 1 (crosses T0)   -> 1 GPU-h; its wait is before the period;
                                                                     $1/GPU-h (config default)
      L4  bob    4 GPUs         granted 11, ended 12               -> outside the period
    job store (this user's jobs)
      S1  skypilot 2 x H100, sweep sw1, $8/h, submitted 4, started 4.25, ended 6.25 -> 4 GPU-h, 900 s, $16
      S2  skypilot 1 x H100, sweep sw1, $4/h, submitted 5, started 5.5, ended 7     -> 1.5 GPU-h, 1800 s, $6
      S3  local, CPU only                                                             -> nothing
      L1  local 2 x H100, sweep sw2: counted once, from its lease record above      -> $2 (2 h at $1/h)
    """
    leases = tmp_path / "leases"
    leases.mkdir()
    monkeypatch.setenv("MESHRUN_GPUS", "0-3")  # 4 GPUs here: 40 GPU-hours of capacity in the 10 h period
    (tmp_path / "no-such-config.toml").write_text(
        '[backends.local]\nprice_per_gpu_hour = {MI300X = 2.5, default = 1.0}\n')
    meshrun.configure()
    store = get_store()
    l1 = _store_job(store, "l1", gpus=2, gpu_type=None, backend="local", where=HOST, price=1.0, sweep="sw2",
                    submitted=1.0, started=1.5, ended=3.5)
    records = [
        _lease(l1, ME, os.getuid(), [0, 1], [H100, H100], 1.0, 1.5, 3.5),
        _lease("L2", "bob", 4001, [1000], ["MI300X"], 2, 2, 6),
        _lease("L3", "alice", 4002, [2], [H100], -2, -2, 1),
        _lease("L4", "bob", 4001, [0, 1, 2, 3], [H100] * 4, 11, 11, 12),
    ]
    (leases / "usage-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"cut": \n')
    _store_job(store, "s1", gpus=2, gpu_type="H100", backend="skypilot", where="aws/us-east-1", price=8.0, sweep="sw1",
               submitted=4, started=4.25, ended=6.25)
    _store_job(store, "s2", gpus=1, gpu_type="H100", backend="skypilot", where="aws/us-east-1", price=4.0, sweep="sw1",
               submitted=5, started=5.5, ended=7)
    _store_job(store, "s3", gpus=0, gpu_type=None, backend="local", where=HOST, price=0.0, sweep=None,
               submitted=1, started=1, ended=2)
    return leases


def _usage(capsys, *args: str) -> dict:
    since = datetime.fromtimestamp(T0).isoformat()
    until = datetime.fromtimestamp(T0 + 10 * H).isoformat()
    capsys.readouterr()
    assert main(["usage", "--since", since, "--until", until, *args]) == 0
    return capsys.readouterr().out


def _by(rep: dict, dim: str) -> dict:
    return {r["key"]: r for r in rep[f"by_{dim}"]}


def test_usage_totals_match_the_hand_computed_ones(history, capsys):
    rep = json.loads(_usage(capsys, "--json"))
    assert rep["total"] == {"key": "all", "jobs": 5, "gpu_hours": 14.5, "wait_mean_s": 1125.0, "wait_max_s": 1800.0,
                            "spend": 35.0}  # waits: L1 1800, L2 0, S1 900, S2 1800; spend 2 + 10 + 1 + 16 + 6
    users = _by(rep, "user")
    assert {k: (r["jobs"], r["gpu_hours"], r["spend"]) for k, r in users.items()} == {
        ME: (3, 9.5, 24.0), "bob": (1, 4.0, 10.0), "alice": (1, 1.0, 1.0)}
    assert (users[ME]["wait_mean_s"], users[ME]["wait_max_s"]) == (1500.0, 1800.0)
    assert users["alice"]["wait_mean_s"] is None  # L3 waited before the period
    assert {k: r["gpu_hours"] for k, r in _by(rep, "gpu_type").items()} == {H100: 5.0, "MI300X": 4.0, "H100": 5.5}
    assert {k: r["gpu_hours"] for k, r in _by(rep, "sweep").items()} == {"sw1": 5.5, "sw2": 4.0, "-": 5.0}
    assert {k: r["gpu_hours"] for k, r in _by(rep, "host").items()} == {
        f"local:{HOST}": 9.0, "skypilot:aws/us-east-1": 5.5}
    assert rep["idle"] == {"host": HOST, "gpus": 4, "capacity_gpu_hours": 40.0, "leased_gpu_hours": 9.0,
                           "idle_gpu_hours": 31.0, "idle_fraction": 0.775}
    assert rep["fair_share"]["half_life_s"] == _agent.FAIR_HALF_LIFE and rep["fair_share"]["queue"] == []
    # the same numbers as CSV, and as tables
    rows = list(csv.DictReader(io.StringIO(_usage(capsys, "--csv"))))
    assert {(r["dimension"], r["key"]): r["gpu_hours"] for r in rows}[("user", ME)] == "9.5"
    assert {(r["dimension"], r["key"]): r["spend"] for r in rows}[("total", "all")] == "35.0"
    text = _usage(capsys)
    assert "14.50 GPU-hours in 5 job(s), $35.00" in text and "31.00 idle (78%)" in text


def test_a_planted_or_linked_usage_record_is_not_read(history, capsys):
    """Another user can name a file after Alice's uid, or link one to a file she cannot read otherwise:
    whose a record is comes from the file's owner, and links are not followed."""
    bogus = _lease("forged", "alice", 4002, [0], [H100], 1, 1, 9)
    planted = history / "usage-4002.jsonl"  # named for uid 4002, owned by 4003
    planted.write_text(json.dumps(bogus) + "\n")
    os.chown(planted, 4003, 4003)
    (history / "usage-4004.jsonl").symlink_to(history / "usage-0.jsonl")
    records, warnings = _agent.usage_records(str(history))
    assert "forged" not in {r["job_id"] for r in records} and len(records) == 4
    assert any("usage-4002.jsonl" in w for w in warnings) and any("usage-4004.jsonl" in w for w in warnings)


def test_real_jobs_leave_a_usage_record_and_the_queue_shows_what_starts_next(monkeypatch, capsys):
    monkeypatch.setenv("MESHRUN_GPUS", "0-1")
    job = meshrun.run(["true"], gpus=2, name="recorded")
    job.result(timeout=60)
    (rec,), _ = _agent.usage_records()
    assert (rec["job_id"], rec["gpus"], rec["uid"], rec["gpu_names"]) == (job.id, [0, 1], os.getuid(),
                                                                          ["declared", "declared"])
    holder = meshrun.run(["sleep", "1000"], gpus=2, name="holder")
    try:
        wait_until(lambda: holder.status() is JobState.RUNNING, 30, 0.05)
        waiter = meshrun.run(["true"], gpus=1, name="waiter")
        wait_until(lambda: "waiting" in (waiter.refresh().reason or ""), 30, 0.05)
        rep = json.loads(_usage(capsys, "--json"))
        assert [(q["job_id"], q["user"]) for q in rep["fair_share"]["queue"]] == [(waiter.id, ME)]
        assert rep["fair_share"]["starts_next"] == [] and rep["fair_share"]["recent_gpu_hours"][ME] > 0
        assert rep["fair_share"]["policy"] == "fair"
    finally:
        holder.cancel()
    assert waiter.result(timeout=60) == 0
    records, _ = _agent.usage_records()
    assert [r["job_id"] for r in records] == [job.id, holder.id, waiter.id]
    # the first job is counted once (from its lease record), with the store's view of it
    rep = json.loads(_usage(capsys, "--json", "--since", "1h", "--until", "now"))
    assert {u["job_id"]: u["source"] for u in rep["uses"]}[job.id] == "lease record"


def test_png_plot_or_a_clear_word_without_matplotlib(history, capsys, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    png = tmp_path / "usage.png"
    _usage(capsys, "--png", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if it were not installed
    since = datetime.fromtimestamp(T0).isoformat()
    assert main(["usage", "--since", since, "--png", str(tmp_path / "none.png")]) == 1
    assert "--png needs matplotlib, which is not installed" in capsys.readouterr().err
    assert not (tmp_path / "none.png").exists()
