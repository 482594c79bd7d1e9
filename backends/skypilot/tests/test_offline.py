"""The backend against a real SkyPilot API server with no cloud credentials: catalog pricing from the
snapshot placed where SkyPilot reads catalogs, a dry run that reaches SkyPilot's optimizer, and the failure
paths (no enabled cloud, a cluster that does not exist, the API server down) as clear meshrun errors."""

from __future__ import annotations

import math

import pytest

import meshrun


@pytest.fixture
def needs_catalog(sky_env):
    if not (sky_env.home / ".sky" / "catalogs" / "v8" / "lambda" / "vms.csv").exists():
        pytest.skip("the catalog snapshot (meshrun/catalogs) is missing")


def _submission(spec):
    from meshrun._scheduler import prepare
    from meshrun._store import get_store

    return prepare(spec, store=get_store(), backend="skypilot").submission


def test_check_is_cheap_and_reports_the_server(backend):
    av = backend.check()
    assert av.ok and av.detail["api_server"].endswith(str(backend.server.port))
    assert av.detail.get("version")


def test_no_enabled_cloud_gives_a_clear_rejection(backend):
    assert backend.enabled_clouds(fresh=True) == []
    offers = backend.offers(meshrun.JobSpec(command="true", gpus="H100:1"))
    assert len(offers) == 1 and not offers[0].fits
    assert "no cloud is enabled" in offers[0].reason and "sky check" in offers[0].reason
    with pytest.raises(meshrun.NoPlacementError) as e:
        meshrun.run("true", gpus="H100:1", backend="skypilot")
    assert "no cloud is enabled" in str(e.value)


def test_catalog_prices_match_skypilots_own_catalog(backend, monkeypatch, needs_catalog):
    """Offers for the clouds `sky check` enabled, priced from the catalog snapshot SkyPilot itself reads."""
    from sky import catalog

    monkeypatch.setattr(backend, "enabled_clouds", lambda fresh=False: ["lambda", "nebius", "slurm/testcluster"])
    spec = meshrun.JobSpec(command="true", gpus="H100:8")
    offers = backend.offers(spec)
    fits = [o for o in offers if o.fits]
    clouds = {o.detail.get("cloud") for o in fits if o.detail.get("source") != "pool"}
    assert clouds == {"lambda", "nebius"}
    assert any(o.where == "slurm/testcluster" and o.expected_start is None for o in fits)
    assert any(o.spot for o in fits if o.detail.get("cloud") == "nebius")  # nebius has H100 spot prices
    assert not any(o.spot for o in fits if o.detail.get("cloud") == "lambda")  # lambda has none
    sky_rows = catalog.list_accelerators(gpus_only=True, name_filter="H100", clouds=["lambda", "nebius"],
                                         case_sensitive=False, all_regions=True, require_price=True)
    expected = {}
    for rows in sky_rows.values():
        for r in rows:
            if r.accelerator_name == "H100" and int(r.accelerator_count) == 8:
                expected[(r.cloud.lower(), r.instance_type, r.region, False)] = r.price
                if r.spot_price is not None and not math.isnan(r.spot_price):
                    expected[(r.cloud.lower(), r.instance_type, r.region, True)] = r.spot_price
    got = {(o.detail["cloud"], o.instance_type, o.region, o.spot): o.price_per_hour
           for o in fits if o.detail.get("source") != "pool"}
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v), k


def test_offers_follow_the_jobs_skypilot_options(backend, monkeypatch, needs_catalog):
    monkeypatch.setattr(backend, "enabled_clouds", lambda fresh=False: ["lambda", "nebius"])
    spot = backend.offers(meshrun.JobSpec(command="true", gpus="H100:8",
                                          backend_options={"skypilot": {"use_spot": True}}))
    assert all(o.spot for o in spot if o.fits) and any(o.fits for o in spot)
    only = backend.offers(meshrun.JobSpec(command="true", gpus="H100:8",
                                          backend_options={"skypilot": {"infra": "lambda"}}))
    assert {o.detail.get("cloud") for o in only} == {"lambda"}
    none = backend.offers(meshrun.JobSpec(command="true", gpus="H100:8",
                                          backend_options={"skypilot": {"infra": "aws"}}))
    assert not any(o.fits for o in none) and "aws" in none[0].reason


def test_dry_run_reaches_the_optimizer(backend, needs_catalog):
    """SkyPilot validates the task meshrun would launch, and its optimizer (not meshrun) says why nothing fits."""
    sub = _submission(meshrun.JobSpec(command="echo hi", gpus="H100:8", env={"A": "x'y"}))
    with pytest.raises(meshrun.BackendError) as e:
        backend.dry_run(sub)
    text = str(e.value)
    assert "[skypilot]" in text and ("sky check" in text or "enabled" in text.lower()), text


def test_a_cluster_that_does_not_exist(backend):
    bid = "cluster:nosuchcluster:meshrun-0000nosuch00:"
    st = backend.status([bid])[bid]
    assert st.state is meshrun.JobState.LOST and "nosuchcluster" in st.reason
    with pytest.raises(meshrun.BackendError) as e:
        list(backend.logs(bid))
    assert "nosuchcluster" in str(e.value)
    backend.cancel(bid)  # nothing to cancel: no error
    assert backend.find("0000nosuch00") is None


def test_bad_backend_ids_and_settings():
    with pytest.raises(meshrun.ConfigError) as e:
        meshrun.configure({"backends": {"skypilot": {"prot": 1}}})
        meshrun.get_backend("skypilot")
    assert "prot" in str(e.value) and "start_server" in str(e.value)
    meshrun.configure({"backends": {"skypilot": {}}})
    st = meshrun.get_backend("skypilot").status(["garbage"])["garbage"]
    assert st.state is meshrun.JobState.LOST and "not a SkyPilot backend id" in st.reason


def test_api_server_down(meshrun_home, free_api_port, tmp_path):
    """With start_server = false and nothing on the port, every call says the server is down and how to start it."""
    port = free_api_port
    meshrun.configure({"backends": {"skypilot": {"port": port, "start_server": False}}})
    b = meshrun.get_backend("skypilot")
    av = b.check()
    assert not av.ok and "is down" in av.reason and str(port) in av.reason and "sky api start" in av.hint
    # offers never start a server; they say why not, and still show the catalog's prices (launching needs the
    # server, prices do not)
    offers = b.offers(meshrun.JobSpec(command="true", gpus="H100:1"))
    assert offers and not any(o.fits for o in offers)
    for o in offers:
        assert "is down" in o.reason and "sky api start" in o.reason and "sky check" in o.reason
    assert any(o.where.startswith("lambda") and o.price_per_hour > 0 for o in offers)
    # SkyPilot makes its catalogs folder (only .meta in it) before it fetches any table: prices still come
    # from the catalog meshrun uses
    empty = tmp_path / "catalogs" / "v8"
    (empty / ".meta").mkdir(parents=True)
    meshrun.configure({"backends": {"skypilot": {"port": port, "start_server": False, "catalog_dir": str(empty)}}})
    b = meshrun.get_backend("skypilot")
    offers = b.offers(meshrun.JobSpec(command="true", gpus="H100:1"))
    assert any(o.where.startswith("lambda") and o.price_per_hour > 0 for o in offers)
    with pytest.raises(meshrun.BackendUnavailable):
        b.submit(_submission(meshrun.JobSpec(command="true")))
    bid = "cluster:c:meshrun-x:"
    assert b.status([bid])[bid].state is meshrun.JobState.UNKNOWN


@pytest.mark.parametrize("managed", [False, True])
def test_a_launch_skypilot_cannot_place_fails_with_its_reason(backend, managed, needs_catalog):
    """`sky launch` / `sky jobs launch` through the real API server with no enabled cloud: the job is pending
    while SkyPilot works on the request, then failed with SkyPilot's own reason."""
    opts = {"skypilot": {"managed": True, "use_spot": True}} if managed else {}
    sub = _submission(meshrun.JobSpec(command="echo hi", gpus="H100:1", backend_options=opts))
    bid = backend.submit(sub)
    assert bid.startswith("managed::" if managed else f"cluster:meshrun-{sub.job_id}:")
    import time

    end = time.monotonic() + 240
    while True:
        st = backend.status([bid])[bid]
        if st.state is not meshrun.JobState.PENDING or time.monotonic() > end:
            break
        assert "SkyPilot is" in st.reason
        time.sleep(1)
    assert st.state is meshrun.JobState.FAILED, st
    assert "SkyPilot could not launch the job" in st.reason


def test_managed_job_states_and_recoveries(backend, monkeypatch):
    """SkyPilot's managed-job records (as its queue returns them) -> meshrun states; a recovery shows as a
    change back to pending with the reason, so it lands in the job's history."""
    from sky.jobs.client import sdk as jobs_sdk

    records = [
        {"job_id": 7, "job_name": "meshrun-a", "status": "RECOVERING", "recovery_count": 0},
        {"job_id": 8, "job_name": "meshrun-b", "status": "RUNNING", "recovery_count": 2, "infra": "aws/us-east-1"},
        {"job_id": 9, "job_name": "meshrun-c", "status": "FAILED_NO_RESOURCE", "recovery_count": 0,
         "failure_reason": "no spot capacity"},
    ]
    monkeypatch.setattr(jobs_sdk, "queue_v2", lambda **kw: "req")
    monkeypatch.setattr(backend, "_get", lambda req, what, timeout=None: (records, 3, {}, 0))
    monkeypatch.setattr(backend, "_collect", lambda *a, **kw: None)
    ids = ["managed::meshrun-a:", "managed::meshrun-b:", "managed::meshrun-c:"]
    st = backend.status(ids)
    assert st[ids[0]].state is meshrun.JobState.PENDING and "recovering it (recovery 1)" in st[ids[0]].reason
    assert st[ids[1]].state is meshrun.JobState.RUNNING and "recovered 2 times" in st[ids[1]].reason
    assert st[ids[1]].where == "aws/us-east-1"
    assert st[ids[2]].state is meshrun.JobState.FAILED and "no spot capacity" in st[ids[2]].reason


def test_a_finished_job_waits_for_its_records(backend, monkeypatch):
    """SkyPilot may call a job finished a moment before its last log lines (meshrun's records) arrive: the
    state stays unknown (ask again) for a grace period, then SkyPilot's own state stands."""
    import time

    from meshrun_skypilot import _backend

    rec = {"job_id": 1, "job_name": "meshrun-j1", "status": "SUCCEEDED", "start_at": time.time() - 5,
           "end_at": time.time() - 1}
    monkeypatch.setattr(backend, "_get", lambda req, what, timeout=None: [rec])
    monkeypatch.setattr(backend, "_collect", lambda *a, **kw: None)
    monkeypatch.setattr(backend, "_request_states", lambda ids: {})
    bid = "cluster:c1:meshrun-j1:"
    assert backend.status([bid])[bid].state is meshrun.JobState.UNKNOWN
    monkeypatch.setattr(_backend, "RECORDS_GRACE", 0.0)
    st = backend.status([bid])[bid]
    assert st.state is meshrun.JobState.SUCCEEDED and "records are missing" in st.reason
    files = {"exit.json": b'{"state": "timeout", "reason": "exceeded its time limit of 5s", "exit_code": null}'}
    monkeypatch.setattr(backend, "_collect", lambda *a, **kw: files)
    rec["status"] = "FAILED"
    st = backend.status([bid])[bid]
    assert st.state is meshrun.JobState.TIMEOUT and "time limit" in st.reason  # the agent's outcome wins
