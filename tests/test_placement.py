"""Placement: ranking by cost and availability, constraints, explanations, gathering, prices and failover.

The scenarios use small in-process backends registered with ``meshrun.register_backend`` (a workstation pool,
a cluster with a queue estimate, a cloud priced from the catalog snapshot) next to the real local backend
with fake GPUs: they test placement itself, not any service.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

import meshrun
import meshrun.backend
from meshrun import (
    Availability,
    Backend,
    BackendError,
    Feature,
    JobSpec,
    JobState,
    JobStatus,
    NoPlacementError,
    Offer,
    SpecError,
)
from meshrun import _catalog, _registry
from meshrun._placement import Objective, rank

# the price catalog snapshot that ships inside the package
SNAP = _catalog.SHIPPED
needs_snapshot = pytest.mark.skipif(not SNAP.is_dir(), reason=f"the catalog snapshot is not at {SNAP}")
H = 3600.0


# ---- in-process test backends -------------------------------------------------------------------------


class Scripted(Backend):
    """A backend whose offers, submit outcome and job states are set by the test."""

    features = Feature.COMMANDS | Feature.FUNCTIONS | Feature.GPUS

    def __init__(self, name: str, make_offers: Callable[[Any], list[Offer]], *, submit_error: str | None = None,
                 state: JobState = JobState.PENDING, available: bool = True, delay: float = 0.0):
        super().__init__({})
        self.name = name  # type: ignore[misc]
        self.make_offers = make_offers
        self.submit_error = submit_error
        self.state = state
        self.available = available
        self.delay = delay
        self.submitted: list[tuple[str, Offer | None]] = []
        self.cancelled: list[str] = []

    def check(self) -> Availability:
        return Availability(True) if self.available else Availability(False, "no credentials", hint="log in first")

    def offers(self, spec: Any) -> list[Offer]:
        if self.delay:
            time.sleep(self.delay)
        return self.make_offers(spec)

    def submit(self, submission: Any, offer: Offer | None = None) -> str:
        if self.submit_error:
            raise BackendError(self.submit_error, backend=self.name)
        bid = f"{self.name}-{len(self.submitted) + 1}"
        self.submitted.append((submission.job_id, offer))
        return bid

    def status(self, ids: Sequence[str]) -> dict[str, JobStatus]:
        return {i: JobStatus(JobState.CANCELLED if i in self.cancelled else self.state,
                             reason="Priority" if self.state is JobState.PENDING else None) for i in ids}

    def cancel(self, backend_id: str) -> None:
        self.cancelled.append(backend_id)

    def logs(self, backend_id: str, *, follow: bool = False) -> Iterator[str]:
        return iter(())


@pytest.fixture
def register():
    """Register in-process backends for one test; they are removed afterwards."""
    names: list[str] = []

    def add(backend: Scripted) -> Scripted:
        meshrun.register_backend(backend.name, lambda config=None: backend)
        names.append(backend.name)
        return backend

    yield add
    for n in names:
        meshrun.unregister_backend(n)


def offer(backend: str = "b", where: str = "w", price: float = 1.0, start: float | None = 0.0, **kw: Any) -> Offer:
    return Offer(backend=backend, where=where, price_per_hour=price, expected_start=start,
                 start_note=kw.pop("start_note", "now" if start == 0 else "estimate"), **kw)


def spec(**kw: Any) -> JobSpec:
    return JobSpec(command=["true"], **kw)


def pool_offers(s: Any) -> list[Offer]:
    """A workstation pool where every GPU is leased: each host's start is unknown."""
    r = s.resources
    return [Offer(backend="pool", where=h, gpus=r.gpus, gpu_type=r.gpu_type or "H100", expected_start=None,
                  start_note="queued: 0 of 4 GPUs free") for h in ("ws1", "ws2")]


def cluster_offers(start: float = 3 * H) -> Callable[[Any], list[Offer]]:
    def make(s: Any) -> list[Offer]:
        r = s.resources
        return [Offer(backend="hpc", where="gpu", gpus=r.gpus, gpu_type=r.gpu_type or "H100", nodes=r.nodes,
                      expected_start=start, start_note="estimate from sbatch --test-only",
                      detail={"partition": "gpu"})]

    return make


def cloud_offers(s: Any) -> list[Offer]:
    return meshrun.catalog_offers(s, catalog_dir=SNAP, launcher="cloud")


def cheapest_catalog_price(gpu: str, count: int) -> float:
    best = []
    for cloud in ("lambda", "nebius"):
        with open(SNAP / cloud / "vms.csv", newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                if r["AcceleratorName"] == gpu and r["AcceleratorCount"] and float(r["AcceleratorCount"]) == count:
                    best.append(float(r["Price"]))
    return min(best)


# ---- the pure ranking ---------------------------------------------------------------------------------

A = offer("a", price=1.0, start=0.0)
B = offer("b", price=0.5, start=2 * H)
C = offer("c", price=0.0, start=None, start_note="queued")


def order(p: meshrun.Plan) -> list[str]:
    return [r.offer.backend for r in p.ranked]


def test_objectives_rank_by_their_formula():
    s = spec()
    assert order(rank(s, [A, B, C])) == ["c", "b", "a"]  # cost: price x runtime
    assert order(rank(s, [A, B, C], objective="start")) == ["a", "b", "c"]  # unknown start last
    # balanced: cost + value_of_time x wait; an unknown start counts as unknown_start (1 h by default)
    p = rank(s, [A, B, C], value_of_time=1.0)
    assert p.objective is Objective.BALANCED
    assert [round(r.score, 6) for r in p.ranked] == [1.0, 1.0, 2.5] and order(p) == ["a", "c", "b"]
    assert order(rank(s, [A, B, C], value_of_time=0.1)) == ["c", "b", "a"]
    assert order(rank(s, [A, B, C], value_of_time=1.0, unknown_start="10m")) == ["c", "a", "b"]
    with pytest.raises(SpecError, match="value_of_time"):
        rank(s, [A], objective="balanced")


def test_cost_uses_runtime_and_all_nodes():
    p = rank(spec(nodes=2), [offer("x", price=3.0, nodes=2)], runtime="90m")
    r = p.ranked[0]
    assert r.cost == pytest.approx(3.0 * 2 * 1.5)
    assert "$9.00 for 1h30m" in r.why and r.backend == "x"  # Ranked reads through to its offer


def test_deadline_means_expected_to_start_within_it():
    s = spec()
    p = rank(s, [A, B, C], deadline="1h")
    assert order(p) == ["a"]
    why = {o.backend: reason for o, reason in p.rejected}
    assert "after the deadline of 1h" in why["b"] and "2h" in why["b"]
    assert "start time is unknown" in why["c"]
    assert order(rank(s, [A, B, C], deadline=3 * H)) == ["b", "a"]
    assert order(rank(s, [A, B, C], deadline=timedelta(hours=3))) == ["b", "a"]
    assert order(rank(s, [A, B, C], deadline=datetime.now() + timedelta(hours=3))) == ["b", "a"]
    iso = (datetime.now() + timedelta(hours=3)).isoformat(timespec="seconds")
    assert rank(s, [A, B], deadline=iso).inputs["deadline"] == pytest.approx(3 * H, abs=5)
    with pytest.raises(SpecError, match="already past"):
        rank(s, [A], deadline=datetime.now() - timedelta(minutes=1))
    with pytest.raises(SpecError, match="deadline"):
        rank(s, [A], deadline="soon")


def test_constraints_reject_with_reasons():
    s = spec()
    offers = [
        offer("cloud", "lambda/us-east-1", price=2.0, region="us-east-1"),
        offer("cloud", "lambda/us-east-1", price=0.8, region="us-east-1", spot=True),
        offer("cloud", "nebius/eu-north1", price=1.5, region="eu-north1"),
        offer("local", "box", price=0.0),
    ]
    p = rank(s, offers)
    assert [r.offer.price_per_hour for r in p.ranked] == [0.0, 1.5, 2.0]
    assert any("spot" in why for _, why in p.rejected)
    assert [r.offer.price_per_hour for r in rank(s, offers, allow_spot=True).ranked] == [0.0, 0.8, 1.5, 2.0]
    p = rank(s, offers, regions=["us-*"], allow_spot=True)  # on-prem offers have no region and pass
    assert [r.offer.where for r in p.ranked] == ["box", "lambda/us-east-1", "lambda/us-east-1"]
    assert any("eu-north1 is not among the allowed regions" in why for _, why in p.rejected)
    p = rank(s, offers, max_price_per_hour=1.6)
    assert [r.offer.price_per_hour for r in p.ranked] == [0.0, 1.5]
    assert any("$2.00/h is above max_price_per_hour $1.60/h" in why for _, why in p.rejected)
    assert order(rank(s, offers, exclude_backends=["local"])) == ["cloud", "cloud"]
    assert order(rank(s, offers, backends=["local"])) == ["local"]


def test_bad_inputs_name_the_field_and_what_is_allowed():
    s = spec()
    cases = [
        (dict(objective="fastest"), "objective", "cost, start, balanced"),
        (dict(max_price_per_hour=-1), "max_price_per_hour", ">= 0"),
        (dict(value_of_time="lots"), "value_of_time", "number"),
        (dict(backends=["nope"]), "backends", "the backends are: local"),
        (dict(exclude_backends=["local", "nope"]), "exclude_backends", "nope"),
        (dict(regions=[""]), "regions", "region names"),
        (dict(allow_spot="yes"), "allow_spot", "true or false"),
        (dict(runtime="-1h"), "runtime", "duration"),
        (dict(backends=["local"], exclude_backends=["local"]), "exclude_backends", "both allowed"),
    ]
    for kw, field, text in cases:
        with pytest.raises(SpecError) as e:
            rank(s, [A], **kw)
        assert e.value.field == field and text in str(e.value), (kw, str(e.value))


def test_bad_placement_and_price_config_is_a_config_error():
    meshrun.configure({"placement": {"objective": "fast"}})
    with pytest.raises(meshrun.ConfigError, match="placement.objective"):
        rank(spec(), [A])
    meshrun.configure({"placement": {"objectiv": "cost"}})
    with pytest.raises(meshrun.ConfigError, match="valid ones are: objective"):
        rank(spec(), [A])
    meshrun.configure({"prices": {"H100": -2}})
    with pytest.raises(meshrun.ConfigError, match=r"prices.H100: must be a number >= 0 \(\$ per GPU-hour\)"):
        meshrun.offers(spec(), ["local"])
    meshrun.configure({"prices": {"ssh": {"cpu": "cheap"}}})
    with pytest.raises(meshrun.ConfigError, match="prices.ssh.cpu"):
        meshrun.offers(spec(), ["local"])


def test_ties_are_broken_deterministically():
    offers = [offer(b, w, price=1.0, start=0.0) for b in ("cloud", "ssh", "local", "slurm") for w in ("x", "y")]
    first = [r.offer.key for r in rank(spec(), offers).ranked]
    assert first[:2] == ["local/x/on-demand", "local/y/on-demand"]  # least overhead first, then its own order
    groups = [offers[i:i + 2] for i in range(0, len(offers), 2)]
    for seed in range(5):  # the order in which backends answer does not matter
        random.Random(seed).shuffle(groups)
        assert [r.offer.key for r in rank(spec(), [o for g in groups for o in g]).ranked] == first
    # within one backend, its own order (e.g. least-loaded host first) breaks ties
    swapped = [offers[1], offers[0]] + offers[2:]
    assert [r.offer.key for r in rank(spec(), swapped).ranked] == first[:6] + ["cloud/y/on-demand", "cloud/x/on-demand"]


def test_plan_explains_and_serialises():
    p = rank(spec(gpus=1), [A, B, C], deadline="1h")
    line = p.explain_choice()
    assert line.startswith("a/w/on-demand") and "cheapest of 1 fitting offer" in line
    assert "could not start within the deadline" in line
    d = json.loads(json.dumps(p.to_dict()))
    assert d["chosen"]["backend"] == "a" and d["objective"] == "cost"
    assert d["inputs"]["deadline"] == 3600 and len(d["rejected"]) == 2
    assert d["ranked"][0]["cost"] == 1.0 and d["ranked"][0]["why"]
    out = io.StringIO()
    p.print(out)
    text = out.getvalue()
    assert "BACKEND" in text and "WHY NOT" in text and "chosen: a/w" in text
    assert "\x1b[" not in text  # plain when not a terminal


def test_nothing_fits_lists_every_rejection():
    with pytest.raises(NoPlacementError) as e:
        meshrun.plan(spec(), offers=[B, C, offer("d", fits=False, reason="no such GPU")], deadline="1h")
    msg = str(e.value)
    for needle in ("b/w/on-demand", "after the deadline", "c/w/on-demand", "unknown", "d/w/on-demand: no such GPU"):
        assert needle in msg
    assert len(e.value.rejections) == 3 and e.value.plan.chosen is None
    p = meshrun.plan(spec(), offers=[C], deadline="1h", raise_on_empty=False)
    assert p.chosen is None and "nothing fits" in p.explain_choice()


# ---- gathering offers from backends -------------------------------------------------------------------


def test_offers_are_gathered_in_parallel_and_a_slow_backend_cannot_stall(register):
    register(Scripted("fast", lambda s: [offer("fast", price=2.0)]))
    register(Scripted("slow", lambda s: [offer("slow", price=0.0)], delay=5.0))
    register(Scripted("down", lambda s: [], available=False))
    register(Scripted("empty", lambda s: []))
    t0 = time.monotonic()
    p = meshrun.plan(spec(), backends=["fast", "slow", "down", "empty"], timeout=0.5)
    assert time.monotonic() - t0 < 4.0
    assert p.chosen.backend == "fast"
    why = {o.backend: r for o, r in p.rejected}
    assert "did not answer within 0.5s" in why["slow"]
    assert why["down"] == "unavailable: no credentials (hint: log in first)"
    assert "no offer" in why["empty"]


def test_named_but_uninstalled_backend_is_a_rejection_with_its_install_hint(monkeypatch):
    monkeypatch.setitem(_registry.KNOWN, "tpu-pod", "pip install meshrun-tpu-pod")
    p = meshrun.plan(spec(), backends=["local", "tpu-pod"])
    assert p.chosen.backend == "local"
    why = {o.backend: r for o, r in p.rejected}
    assert "tpu-pod backend is not installed" in why["tpu-pod"] and "pip install meshrun-tpu-pod" in why["tpu-pod"]


def test_on_prem_prices_come_from_the_config(register, fake_gpus):
    fake_gpus(2)  # NVIDIA H100 80GB HBM3
    register(Scripted("hpc", cluster_offers(start=0.0)))
    meshrun.configure({"prices": {
        "default": 0.3, "H100": 2.0, "cpu": 0.01,
        "hpc": {"H100": 1.5},
        "local": {"A100": 9.0},
    }})
    offers = {o.backend: o for o in meshrun.offers(spec(gpus=2, cpus=4), ["local", "hpc"])}
    # local: the global H100 price (its own table names no H100), plus the CPUs
    assert offers["local"].price_per_hour == pytest.approx(2 * 2.0 + 4 * 0.01)
    assert "H100" in offers["local"].detail["price_source"]
    assert offers["hpc"].price_per_hour == pytest.approx(2 * 1.5)  # the backend's own table wins
    # a host or partition table beats the backend's table; the partition may be named by itself
    meshrun.configure({"prices": {"hpc": {"H100": 1.5}, "hpc:gpu": {"default": 0.25}}})
    assert meshrun.offers(spec(gpus=2), ["hpc"])[0].price_per_hour == pytest.approx(0.5)
    hpc = meshrun.get_backend("hpc")
    hpc.make_offers = lambda s: [replace(o, where="cluster/gpu") for o in cluster_offers(0.0)(s)]
    meshrun.configure({"prices": {"hpc": {"H100": 1.5}, "hpc:gpu": {"default": 0.25}}})
    assert meshrun.offers(spec(gpus=2), ["hpc"])[0].price_per_hour == pytest.approx(0.5)
    # prices are only in [prices]: a backend setting for them is refused, saying where they went
    for backend, key, table in (("local", "price_per_gpu_hour", {"price_per_gpu_hour": 1.0}),
                                ("slurm", "price_per_gpu_hour", {"price_per_gpu_hour": {"gpu": 1.0}}),
                                ("kubernetes", "price_per_cpu_hour", {"price_per_cpu_hour": 1.0}),
                                ("skypilot", "pool_price_per_hour", {"pool_price_per_hour": 1.0}),
                                ("ssh", "hosts.0.price_per_gpu_hour", {"hosts": [{"name": "a", "price_per_gpu_hour": 1}]})):
        try:
            cls = type(meshrun.backend.get_backend(backend))
        except meshrun.MeshrunError:
            continue  # not installed here
        with pytest.raises(meshrun.ConfigError, match=rf"backends\.{backend}\.{key}: .*no longer a setting.*\[prices"):
            cls(table)


@needs_snapshot
def test_catalog_offers_without_a_cloud_backend_are_listed_but_not_chosen(fake_gpus):
    fake_gpus(0)
    # a launcher that is not installed (the real default, skypilot, may be installed here)
    meshrun.configure({"placement": {"catalog_dir": str(SNAP), "cloud_launcher": "skyless"}})
    p = meshrun.plan(spec(gpus="H100:1"), backends=["local", "skyless"], raise_on_empty=False)
    assert p.chosen is None
    sky = [(o, r) for o, r in p.rejected if o.backend == "skyless"]
    assert sky and all("skyless backend, which is not installed" in r for _, r in sky)
    assert all(o.launcher == "skyless" and o.price_per_hour > 0 for o, _ in sky if o.instance_type)
    # leaving the launcher out leaves the catalog out
    p = meshrun.plan(spec(gpus="H100:1"), backends=["local"], raise_on_empty=False)
    assert not [o for o, _ in p.rejected if o.backend == "skyless"]
    p = meshrun.plan(spec(gpus="H100:1"), backends=["local", "skyless"], exclude_backends=[], raise_on_empty=False)
    assert [o for o, _ in p.rejected if o.backend == "skyless"]


# ---- the scenarios ------------------------------------------------------------------------------------


@needs_snapshot
def test_scenario_a_free_local_gpu_wins_at_price_zero(register, fake_gpus):
    fake_gpus(1)
    register(Scripted("pool", pool_offers))
    register(Scripted("hpc", cluster_offers(start=0.0)))
    register(Scripted("cloud", cloud_offers))
    meshrun.configure({"prices": {"hpc": {"default": 1.2}}})
    p = meshrun.plan(spec(gpus="H100:1"), backends=["local", "pool", "hpc", "cloud"])
    assert p.chosen.backend == "local" and p.chosen.price_per_hour == 0 and p.chosen.expected_start == 0
    assert p.ranked[0].cost == 0 and "cheapest" in p.explain_choice() and "starts now" in p.explain_choice()
    assert {r.offer.backend for r in p.ranked} >= {"local", "pool", "hpc", "cloud"}
    job = meshrun.submit(spec(gpus="H100:1"), backends=["local", "pool", "hpc", "cloud"])
    assert job.backend == "local" and job.wait(timeout=60) is JobState.SUCCEEDED
    placed = [h for h in job.history if h["event"] == "placed"][0]
    assert placed["offer"].startswith("local/") and "cheapest" in placed["why"]


@needs_snapshot
def test_scenario_busy_pool_and_a_far_cluster_with_a_deadline_pick_the_cheapest_cloud(register, fake_gpus):
    fake_gpus(0)
    register(Scripted("pool", pool_offers))
    register(Scripted("hpc", cluster_offers(start=3 * H)))
    register(Scripted("cloud", cloud_offers))
    kw = dict(backends=["local", "pool", "hpc", "cloud"], deadline="1h")
    p = meshrun.plan(spec(gpus="H100:1"), **kw)
    cheapest = cheapest_catalog_price("H100", 1)
    assert p.chosen.backend == "cloud" and not p.chosen.spot
    assert p.chosen.price_per_hour == cheapest and p.chosen.instance_type and p.chosen.region
    assert all(r.offer.backend == "cloud" for r in p.ranked)
    why = {o.backend: r for o, r in p.rejected}
    assert "start time is unknown" in why["pool"] and "queued" in why["pool"]
    assert "3h" in why["hpc"] and "after the deadline of 1h" in why["hpc"]
    assert "this machine has 0" in why["local"]
    # without the deadline the free on-prem offers are cheapest; at equal cost a known start beats an unknown one
    assert order(meshrun.plan(spec(gpus="H100:1"), backends=kw["backends"]))[:3] == ["hpc", "pool", "pool"]
    # and with spot allowed, the cheaper spot row wins
    spot = meshrun.plan(spec(gpus="H100:1"), allow_spot=True, **kw).chosen
    assert spot.spot and spot.price_per_hour < cheapest


@needs_snapshot
def test_scenario_max_price_excludes_the_cloud_and_the_error_lists_every_rejection(register, fake_gpus):
    fake_gpus(0)
    register(Scripted("pool", pool_offers))
    register(Scripted("hpc", cluster_offers(start=3 * H)))
    register(Scripted("cloud", cloud_offers))
    limit = cheapest_catalog_price("H100", 1) - 0.01
    with pytest.raises(NoPlacementError) as e:
        meshrun.submit(spec(gpus="H100:1", name="big"), backends=["local", "pool", "hpc", "cloud"], deadline="1h",
                       max_price_per_hour=limit)
    msg = str(e.value)
    assert "every option was rejected" in msg and "'big'" in msg
    for needle in ("local/", "this machine has 0", "pool/ws1", "pool/ws2", "start time is unknown",
                   "hpc/gpu", "after the deadline", "cloud/", f"above max_price_per_hour ${limit:.2f}/h",
                   "spot offer"):
        assert needle in msg, needle
    p = e.value.plan
    assert p.chosen is None and {o.backend for o, _ in p.rejected} == {"local", "pool", "hpc", "cloud"}
    from meshrun._store import get_store

    assert get_store().list() == []


def test_scenario_an_offer_whose_submit_fails_is_skipped_and_the_history_shows_it(register, fake_gpus):
    fake_gpus(1)
    flaky = register(Scripted("flaky", lambda s: [offer("flaky", "q", price=0.1, gpus=1)],
                              submit_error="quota exceeded for GPUs"))
    meshrun.configure({"prices": {"local": {"default": 0.5}}})
    job = meshrun.run(["bash", "-c", "echo ran"], gpus=1, name="flaky-first", backends=["flaky", "local"])
    assert job.wait(timeout=60) is JobState.SUCCEEDED and job.backend == "local"
    assert job.logs() == "ran\n" and job.record.attempt == 2
    events = [(h["event"], h.get("backend"), h.get("attempt")) for h in job.history]
    assert events[:3] == [("placed", None, None), ("submit_failed", "flaky", 1), ("submitted", "local", 2)]
    failed = job.history[1]
    assert failed["offer"] == "flaky/q/on-demand" and "quota exceeded" in failed["error"]
    assert flaky.submitted == []
    # `meshrun status` shows every attempt
    out = subprocess.run([sys.executable, "-m", "meshrun", "status", job.id], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "submit_failed" in out.stdout and "quota exceeded" in out.stdout and "attempt" in out.stdout
    assert "flaky/q/on-demand" in out.stdout and "submitted" in out.stdout


def test_every_offer_failing_fails_the_job_with_all_reasons(register):
    register(Scripted("f1", lambda s: [offer("f1", "x", price=0.0), offer("f1", "y", price=0.1)],
                      submit_error="no quota"))
    register(Scripted("f2", lambda s: [offer("f2", "z", price=0.2)], submit_error="api down"))
    with pytest.raises(NoPlacementError) as e:
        meshrun.run(["true"], backends=["f1", "f2"])
    msg = str(e.value)
    assert "f1/x/on-demand: [f1] no quota" in msg and "f2/z/on-demand: [f2] api down" in msg
    from meshrun._store import get_store

    (rec,) = get_store().list()
    assert rec.state is JobState.FAILED and rec.attempt == 3
    assert [h["event"] for h in rec.history].count("submit_failed") == 3


def test_scenario_pending_past_max_pending_moves_to_the_next_offer(register, fake_gpus):
    fake_gpus(1)
    hpc = register(Scripted("hpc", cluster_offers(start=0.0)))
    meshrun.configure({"prices": {"local": {"default": 0.5}}})
    job = meshrun.run(["bash", "-c", "echo moved"], gpus=1, max_pending=1, backends=["hpc", "local"])
    assert job.backend == "hpc" and job.status() is JobState.PENDING
    time.sleep(1.1)
    # past max_pending, reading the status still changes nothing: moving is the wait loop's (or advance's)
    assert job.status() is JobState.PENDING and job.backend == "hpc" and hpc.cancelled == []
    plan_file = json.loads((job.job_dir / "plan.json").read_text())
    assert [o["backend"] for o in plan_file["ranked"]] == ["hpc", "local"] and plan_file["max_pending"] == 1
    # a fresh handle (as after a re-attach in another process) finds the plan in the job folder
    again = meshrun.Job.attach(job.id)
    assert again.wait(timeout=60) is JobState.SUCCEEDED
    assert again.backend == "local" and again.logs() == "moved\n" and again.record.attempt == 2
    assert hpc.cancelled == ["hpc-1"]
    moved = [h for h in again.history if h["event"] == "moved"]
    assert len(moved) == 1 and moved[0]["backend"] == "hpc" and moved[0]["next"].startswith("local/")
    assert "longer than max_pending 1.0s" in moved[0]["reason"] and moved[0]["offer"] == "hpc/gpu/on-demand"
    assert [h["event"] for h in again.history].count("submitted") == 2
    assert (job.job_dir / "attempts" / "1" / "launch.json").exists()


def test_pending_with_no_offer_left_stays_put_and_says_so_once(register):
    hpc = register(Scripted("hpc", cluster_offers(start=0.0)))
    job = meshrun.run(["true"], max_pending=0.2, backends=["hpc"])
    time.sleep(0.3)
    assert job.status() is JobState.PENDING  # a read: it records nothing about failover
    assert [h["event"] for h in job.history] == ["placed", "submitted"]
    for _ in range(3):
        assert job.advance() is JobState.PENDING
    events = [h["event"] for h in job.history]
    assert events.count("failover_exhausted") == 1 and hpc.cancelled == []
    assert "every offer of its plan was tried" in [h for h in job.history if h["event"] == "failover_exhausted"][0]["reason"]


class Counted:
    """An offers function that counts its calls."""

    def __init__(self, make: Callable[[Any], list[Offer]]):
        self.make, self.calls = make, 0

    def __call__(self, s: Any) -> list[Offer]:
        self.calls += 1
        return self.make(s)


NOT_ASKED = "not asked: this machine can start it now at no cost, which no offer can beat"


def test_a_free_machine_that_starts_the_job_now_settles_it_without_asking_the_others(register):
    """A submit asks this machine first; free and starting now, it wins whatever the others say (no price is
    below zero, ties go to this machine), so they are not asked: listed as such in the plan. `meshrun.plan`
    still asks everyone, and so does a submit this machine cannot settle (a price of its own here)."""
    hpc_offers = Counted(cluster_offers(start=0.0))
    register(Scripted("hpc", hpc_offers))
    job = meshrun.run(["true"], name="settled", backends=["local", "hpc"])
    assert job.wait(timeout=60) is JobState.SUCCEEDED and job.backend == "local"
    assert hpc_offers.calls == 0
    saved = json.loads((job.job_dir / "plan.json").read_text())
    assert "hpc" in saved["unasked"] and [o["backend"] for o in saved["ranked"]] == ["local"]
    assert {"backend": "hpc", "where": "-", "count": 1, "reason": NOT_ASKED + " (`meshrun offers` asks every "
            "backend)"} in saved["rejected"]
    placed = [h for h in job.history if h["event"] == "placed"]
    assert len(placed) == 1 and "others not asked" in placed[0]["why"]
    p = meshrun.plan(spec(), backends=["local", "hpc"])  # explaining: everyone is asked
    assert hpc_offers.calls == 1 and p.unasked == [] and p.chosen.backend == "local"
    meshrun.configure({"prices": {"local": {"cpu": 0.5}}})  # this machine now costs something for a CPU
    job = meshrun.run(["true"], cpus=1, backends=["local", "hpc"])
    assert hpc_offers.calls == 2 and job.backend == "hpc"  # free there: asked, and cheaper


def test_an_offer_with_a_price_below_zero_is_refused(register):
    register(Scripted("odd", lambda s: [offer("odd", price=-1.0)]))
    p = meshrun.plan(spec(), backends=["odd"], raise_on_empty=False)
    assert p.chosen is None and "is not a price" in p.rejected[0].reason


def test_a_settled_job_this_machine_does_not_take_goes_to_the_others(register, monkeypatch):
    """Nothing is lost by not asking: when this machine's submit fails, the backends not asked are asked then,
    and the job goes to the best of them (the new plan recorded, every attempt in the history)."""
    from meshrun._local import LocalBackend

    def refuse(self, submission, offer=None):
        raise BackendError("this machine refused it", backend="local")

    hpc_offers = Counted(cluster_offers(start=0.0))
    hpc = register(Scripted("hpc", hpc_offers))
    monkeypatch.setattr(LocalBackend, "submit", refuse)
    job = meshrun.run(["true"], name="goes-on", backends=["local", "hpc"])
    assert job.backend == "hpc" and hpc_offers.calls == 1 and len(hpc.submitted) == 1
    events = [(h["event"], h.get("backend")) for h in job.history]
    assert events == [("placed", None), ("submit_failed", "local"), ("placed", None), ("submitted", "hpc")]
    assert json.loads((job.job_dir / "plan.json").read_text())["ranked"][0]["backend"] == "hpc"


def test_a_settled_job_pending_past_max_pending_moves_to_a_backend_not_asked_before(register, monkeypatch):
    """A job settled on this machine that then waits (here: its start is held back) past ``max_pending``
    moves on as any other: the backends not asked at placement are asked when it moves."""
    from meshrun._local import LocalBackend

    held: list[str] = []
    monkeypatch.setattr(LocalBackend, "submit", lambda self, sub, offer=None: held.append(sub.job_id) or sub.job_id)
    monkeypatch.setattr(LocalBackend, "status", lambda self, refs: {r: JobStatus(JobState.PENDING) for r in refs})
    monkeypatch.setattr(LocalBackend, "cancel", lambda self, ref: held.remove(ref.backend_id))
    hpc_offers = Counted(cluster_offers(start=0.0))
    hpc = register(Scripted("hpc", hpc_offers, state=JobState.RUNNING))
    job = meshrun.run(["true"], max_pending=0.2, backends=["local", "hpc"])
    assert job.backend == "local" and hpc_offers.calls == 0
    time.sleep(0.3)
    job.advance()
    assert job.backend == "hpc" and job.status() is JobState.RUNNING
    assert hpc_offers.calls == 1 and held == [] and len(hpc.submitted) == 1
    moved = [h for h in job.history if h["event"] == "moved"]
    assert len(moved) == 1 and moved[0]["next"].startswith("hpc/")


def test_named_backend_is_not_moved_or_replanned(register):
    hpc = register(Scripted("hpc", cluster_offers(start=0.0)))
    job = meshrun.run(["true"], max_pending=0.1, backend="hpc")
    time.sleep(0.2)
    assert job.advance() is JobState.PENDING and hpc.cancelled == []
    assert [h["event"] for h in job.history] == ["submitted"]
    hpc.submit_error = "down"
    with pytest.raises(BackendError, match="down"):  # a named backend's error is raised as is
        meshrun.run(["true"], backend="hpc")


def test_submit_many_and_the_decorator_use_the_plan(register, fake_gpus):
    fake_gpus(2)
    register(Scripted("flaky", lambda s: [offer("flaky", "q", price=0.0, gpus=1)], submit_error="nope"))
    meshrun.configure({"prices": {"local": {"default": 0.5}}})

    @meshrun.job(gpus=1, backends=["flaky", "local"], max_price_per_hour=1.0)
    def square(x):
        return x * x

    jobs = square.map([1, 2])
    assert meshrun.gather(jobs, timeout=120) == [1, 4]
    for j in jobs:
        assert [h["event"] for h in j.history][:3] == ["placed", "submit_failed", "submitted"]
    assert square.submit(5).result(timeout=60) == 25
    with pytest.raises(NoPlacementError, match="above max_price_per_hour"):
        square.options(max_price_per_hour=0.1, backends=["local"]).submit(1)


# ---- the command line ---------------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshrun", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@needs_snapshot
def test_cli_offers_prints_the_ranked_table_and_json(tmp_path):
    # the config keeps other installed backends (and their heavy imports) out of this test
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[placement]\nbackends = ["local", "skyless"]\ncloud_launcher = "skyless"\n'
                   f'catalog_dir = "{SNAP}"\n')
    env = {"MESHRUN_CONFIG": str(cfg)}
    out = cli("offers", "--cpus", "1", env=env)
    assert out.returncode == 0, out.stderr
    assert "BACKEND" in out.stdout and "local" in out.stdout and "chosen: local/" in out.stdout
    assert "would be launched by the skyless backend" in out.stdout  # catalog prices shown, not chosen
    js = cli("offers", "--gpus", "H100:1", "--deadline", "1h", "--json", env=env)
    assert js.returncode == 0
    d = json.loads(js.stdout)
    assert d["chosen"] is None and d["inputs"]["deadline"] == 3600
    assert any(r["offer"]["backend"] == "skyless" and r["offer"]["price_per_hour"] > 0 for r in d["rejected"])
    none = cli("offers", "--gpus", "H100:1", env=env)
    assert none.returncode == 1 and "nothing fits" in none.stdout
    bad = cli("offers", "--objective", "cost", "--max-price", "-1", env=env)
    assert bad.returncode == 2 and "max_price_per_hour" in bad.stderr


def test_one_placement_options_model_for_arguments_config_and_cli(tmp_path, register):
    P = meshrun.PlacementOptions
    o = P(objective="start", timeout=3, backends="local")
    assert o.objective is Objective.START and o.offers_timeout == 3.0 and o.backends == ("local",)
    with pytest.raises(Exception):
        o.objective = Objective.COST  # type: ignore[misc]  # frozen
    # arguments: SpecError naming the option; the config: ConfigError naming placement.<option>
    for kw, field, text in [(dict(unknown_start="soon"), "unknown_start", "duration"),
                            (dict(timeout=-1), "offers_timeout", ">= 0"),
                            (dict(respond_within={"slurm": "x"}), "respond_within.slurm", "seconds"),
                            (dict(objectiv="cost"), "objectiv", "the options are: objective")]:
        with pytest.raises(SpecError) as e:
            P(**kw)
        assert e.value.field == field and text in str(e.value) and not isinstance(e.value, meshrun.ConfigError)
        with pytest.raises(meshrun.ConfigError) as c:
            P.from_config({"offers_timeout" if k == "timeout" else k: v for k, v in kw.items()})
        assert c.value.field == f"placement.{field}", c.value
    # the config's values are overridden by the arguments, and the arguments of run() are these options
    meshrun.configure({"placement": {"objective": "start", "runtime": "2h"}})
    merged = P(objective="cost").over(P.from_config())
    assert merged.objective is Objective.COST and merged.runtime == 7200
    register(Scripted("hpc", cluster_offers(start=0.0)))
    job = meshrun.run(["true"], backends=["hpc"], unknown_start="2h", timeout=5)  # once rejected as JobSpec fields
    placed = next(h for h in job.history if h["event"] == "placed")
    assert placed["offer"] == "hpc/gpu/on-demand"
    assert json.loads((job.job_dir / "plan.json").read_text())["inputs"]["unknown_start"] == 7200
    with pytest.raises(SpecError) as e:
        meshrun.run(["true"], backends=["hpc"], max_price_per_hour="lots")
    assert e.value.field == "max_price_per_hour"
    with pytest.raises(SpecError) as e:
        meshrun.job(objective="fastest")(lambda: 1)
    assert e.value.field == "objective"
    # the CLI's flags are the same options (each flag's dest is the option's name)
    bad = cli("offers", "--offers-timeout", "-3", env={"MESHRUN_CONFIG": str(tmp_path / "none.toml")})
    assert bad.returncode == 2 and "offers_timeout" in bad.stderr, bad.stderr


# ---- GPU alternatives: each ranked by its own price, the chosen one is what the job gets -------------------


def test_gpu_alternatives_are_ranked_by_their_own_prices(fake_gpus):
    fake_gpus(["NVIDIA L4", "NVIDIA A10G"])
    spec = meshrun.JobSpec(command='echo "gpus=$CUDA_VISIBLE_DEVICES"', gpu_alternatives=["L4:1", "A10G:1"])
    for l4, a10g, want in ((2.0, 0.5, "A10G"), (0.5, 2.0, "L4"), (1.0, 1.0, "L4")):  # a tie: the preferred one
        meshrun.configure({"prices": {"L4": l4, "A10G": a10g}})
        p = meshrun.plan(spec, backends=["local"])
        assert p.chosen.gpu_type == want and p.chosen.detail["gpu_choice"] == f"{want}:1", (l4, a10g)
        assert {o.gpu_type for o in p.offers} == {"L4", "A10G"}
    meshrun.configure({"prices": {"L4": 2.0, "A10G": 0.5}})
    job = meshrun.submit(spec, backends=["local"])
    assert job.result(timeout=60) == 0
    assert "gpus=1" in job.logs()  # the A10G, the cheaper alternative
    assert json.loads((job.job_dir / "launch.json").read_text())["gpu_type"] == "A10G"
