"""Cloud prices from SkyPilot-format catalog files, read from the public snapshot that ships in meshrun/catalogs;
``meshrun catalog update`` against a real local HTTP server."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

import meshrun
from meshrun import JobSpec, _catalog
from meshrun._catalog import catalog_offers, load_catalog, norm_gpu, slurm_price

SNAP = _catalog.SHIPPED


def rows(cloud: str) -> list[dict[str, str]]:
    with open(SNAP / cloud / "vms.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def spec(**kw) -> JobSpec:
    return JobSpec(command=["true"], **kw)


def test_snapshot_loads_every_row_with_crlf_line_endings():
    cat = load_catalog(SNAP)
    assert cat.clouds == ["lambda", "nebius"]
    assert len(cat.vms["lambda"]) == len(rows("lambda")) == 408
    assert len(cat.vms["nebius"]) == len(rows("nebius")) == 61
    assert not cat.errors
    # no stray carriage returns survive in any field
    assert all("\r" not in vm.region and "\r" not in vm.instance_type for vm in cat.vms["lambda"])
    assert cat.accelerators[norm_gpu("H100")][0] == "H100"
    assert "nebius" in cat.accelerators[norm_gpu("H200")][1]
    assert len(cat.slurm_pricing) == 1


def test_load_is_cached_until_a_file_changes(tmp_path):
    import shutil

    shutil.copytree(SNAP, tmp_path / "v8")
    first = load_catalog(tmp_path / "v8")
    assert load_catalog(tmp_path / "v8") is first
    f = tmp_path / "v8" / "nebius" / "vms.csv"
    text = f.read_text(encoding="utf-8")
    f.write_text(text + "extra-type,,0,2,8,0.01,eu-north1,,\r\n", encoding="utf-8", newline="")
    again = load_catalog(tmp_path / "v8")
    assert again is not first
    assert len(again.vms["nebius"]) == 62


def test_gpu_offers_match_skypilot_names_and_exact_counts():
    expected = sorted(
        (float(r["Price"]), r["InstanceType"], r["Region"]) for r in rows("lambda")
        if r["AcceleratorName"] == "H100" and float(r["AcceleratorCount"]) == 1
    )
    got = catalog_offers(spec(gpus="h100:1"), SNAP, clouds=["lambda"])
    assert all(o.fits and o.gpus == 1 and o.gpu_type == "H100" for o in got)
    assert sorted((o.price_per_hour, o.instance_type, o.region) for o in got) == expected
    o = got[0]
    assert o.backend == o.launcher == "skypilot"
    assert o.where == f"lambda/{o.region}" and o.detail["cloud"] == "lambda"
    assert o.expected_start == _catalog.DEFAULT_CLOUD_START and "provisioning" in o.start_note
    # A100 and A100-80GB are different accelerators, as in SkyPilot
    a100 = catalog_offers(spec(gpus="A100:8"), SNAP, clouds=["lambda"])
    assert {o.instance_type for o in a100 if o.fits} == {"gpu_8x_a100"}


def test_spot_rows_become_spot_offers():
    got = catalog_offers(spec(gpus="H200:1"), SNAP, clouds=["nebius"])
    spot = [o for o in got if o.spot]
    ondemand = [o for o in got if not o.spot]
    assert len(spot) == len(ondemand) == 3  # eu-north1, eu-west1, us-central1
    assert {o.price_per_hour for o in spot} == {1.45}
    assert {o.price_per_hour for o in ondemand} == {3.5}
    assert all(o.key.endswith("/spot") for o in spot)
    # lambda has no spot prices at all
    assert not [o for o in catalog_offers(spec(gpus="H100:1"), SNAP, clouds=["lambda"]) if o.spot]


def test_cpu_memory_and_gpu_memory_filters():
    cpu = catalog_offers(spec(cpus=64, memory="256GiB"), SNAP, clouds=["nebius"])
    assert cpu and all(o.fits and o.gpus == 0 and o.cpus >= 64 and o.memory >= 256 * 2**30 for o in cpu)
    # per-GPU memory from GpuInfo: 80 GiB rules out the L40S (48 GiB) and keeps H100/H200
    big = catalog_offers(spec(gpus=1, gpu_memory="80GiB"), SNAP, clouds=["nebius"])
    assert {o.gpu_type for o in big if o.fits} == {"H100", "H200"}
    # lambda's TotalGpuMemoryInMiB quirk does not matter: the per-GPU size is used
    v100 = catalog_offers(spec(gpus="V100:8", gpu_memory="16GiB"), SNAP, clouds=["lambda"])
    assert all(o.fits for o in v100) and v100


def test_multi_node_price_is_per_node():
    got = catalog_offers(spec(gpus="H100:8", nodes=4), SNAP, clouds=["nebius"])
    o = next(o for o in got if not o.spot)
    assert o.nodes == 4 and o.price_per_hour == 23.6
    assert o.total_price_per_hour == pytest.approx(94.4)


def test_clouds_without_a_fitting_row_say_what_they_have():
    got = catalog_offers(spec(gpus="H100:3"), SNAP)
    assert [o.fits for o in got] == [False, False]
    assert "counts offered: 1, 2, 4, 8" in got[0].reason
    none = catalog_offers(spec(gpus="H200:1"), SNAP, clouds=["lambda"])
    assert len(none) == 1 and "lambda has no H200 GPUs" in none[0].reason and "nebius" in none[0].reason
    missing = catalog_offers(spec(gpus=1), SNAP, clouds=["aws"])
    assert not missing[0].fits and "no prices for aws" in missing[0].reason


def test_catalog_offers_is_public_and_takes_a_launcher():
    got = meshrun.catalog_offers(spec(gpus="H100:1"), catalog_dir=SNAP, clouds=["nebius"], launcher="dstack")
    assert got and all(o.backend == "dstack" and o.launcher == "dstack" for o in got)


def test_catalog_folder_lookup(tmp_path, monkeypatch):
    monkeypatch.delenv("MESHRUN_CATALOG_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    # out of the box: the snapshot that ships with meshrun, with prices and its age
    assert _catalog.catalog_dir() == SNAP
    assert any(o.fits and o.price_per_hour > 0 for o in catalog_offers(spec(gpus="H100:8")))
    info = _catalog.catalog_info()
    assert info.kind == "shipped" and _catalog.SNAPSHOT_DATE in info.age_text()
    sky = tmp_path / ".sky" / "catalogs" / "v8"
    (sky / ".meta").mkdir(parents=True)  # SkyPilot makes its folder before it fetches any cloud's table
    assert _catalog.catalog_dir() == SNAP
    assert any(o.fits and o.price_per_hour > 0 for o in catalog_offers(spec(gpus="H100:8")))
    (sky / "lambda").mkdir()
    (sky / "lambda" / "vms.csv").write_text((SNAP / "lambda" / "vms.csv").read_text())
    assert _catalog.catalog_dir() == sky
    assert _catalog.catalog_info().kind == "skypilot"
    fetched = _catalog.updated_dir()
    fetched.mkdir(parents=True)
    assert _catalog.catalog_dir() == fetched  # what `meshrun catalog update` fetched wins over SkyPilot's
    fetched.rmdir()
    meshrun.configure({"placement": {"catalog_dir": str(SNAP)}})
    assert _catalog.catalog_dir() == SNAP
    monkeypatch.setenv("MESHRUN_CATALOG_DIR", str(sky))
    assert _catalog.catalog_dir() == sky
    monkeypatch.setenv("MESHRUN_CATALOG_DIR", str(tmp_path / "nope"))
    with pytest.raises(meshrun.ConfigError, match="MESHRUN_CATALOG_DIR"):
        _catalog.catalog_dir()
    with pytest.raises(meshrun.ConfigError, match="catalog_dir"):
        catalog_offers(spec(), catalog_dir=tmp_path / "nope")


def test_zones_of_one_region_keep_the_cheapest_and_bad_files_are_reported(tmp_path):
    aws = tmp_path / "aws"
    aws.mkdir()
    (aws / "vms.csv").write_text(
        "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,AvailabilityZone\n"
        "p5.48xlarge,H100,8,192,2048,,98.32,40.0,us-east-1,us-east-1a\n"
        "p5.48xlarge,H100,8,192,2048,,98.32,35.5,us-east-1,us-east-1b\n"
        "p5.48xlarge,H100,8,192,2048,,,,us-east-1,us-east-1c\n"
    )
    broken = tmp_path / "oops"
    broken.mkdir()
    (broken / "vms.csv").write_text("just,some,columns\n1,2,3\n")
    cat = load_catalog(tmp_path)
    assert cat.clouds == ["aws"]
    assert any("oops" in e and "missing column" in e for e in cat.errors)
    got = catalog_offers(spec(gpus="H100:8"), tmp_path)
    assert sorted((o.spot, o.price_per_hour) for o in got) == [(False, 98.32), (True, 35.5)]


def test_slurm_pricing_lookup_priority(tmp_path):
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "pricing.csv").write_text(
        "Region,Zone,PricePerVCPU,PricePerMemoryGB,AcceleratorName,PricePerAccelerator\r\n"
        ",,0.0,0.0,,0.0\r\n"
        ",gpu,0.01,0.0,,1.0\r\n"
        "hpc,,0.02,0.0,,2.0\r\n"
        "hpc,gpu,0.03,0.001,,3.0\r\n"
        "hpc,gpu,0.03,0.001,H100,4.0\r\n",
        newline="",
    )
    cat = load_catalog(tmp_path)

    def price(region, zone, gpu="A100", gpus=2, cpus=10, memory=None):
        return slurm_price(cat, region=region, zone=zone, gpu_type=gpu, gpus=gpus, cpus=cpus, memory=memory)[0]

    assert price("hpc", "gpu", memory=100 * 2**30) == pytest.approx(2 * 3.0 + 10 * 0.03 + 100 * 0.001)
    assert price("hpc", "gpu", gpu="h100") == pytest.approx(2 * 4.0 + 10 * 0.03)  # accelerator row wins
    assert price("hpc", "debug") == pytest.approx(2 * 2.0 + 10 * 0.02)  # region, any zone
    assert price("other", "gpu") == pytest.approx(2 * 1.0 + 10 * 0.01)  # any region, zone
    assert price("other", "debug") == 0.0  # wildcard
    # the snapshot's single wildcard row prices everything at 0
    assert slurm_price(load_catalog(SNAP), region="x", zone="y", gpu_type="H100", gpus=8, cpus=1, memory=None)[0] == 0


# ---- meshrun catalog update, against a real HTTP server -------------------------------------------------


@pytest.fixture
def catalog_server(tmp_path):
    """A real HTTP server (the standard library's) serving a copy of the snapshot as ``/v8``."""
    import functools
    import http.server
    import shutil
    import threading

    root = tmp_path / "served"
    shutil.copytree(SNAP, root / "v8")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield root / "v8", f"http://127.0.0.1:{srv.server_address[1]}/v8"
    finally:
        srv.shutdown()
        srv.server_close()


def test_catalog_update_fetches_checks_and_switches_atomically(catalog_server, meshrun_home, monkeypatch):
    from meshrun._catalog_update import update_catalog

    served, url = catalog_server
    monkeypatch.delenv("MESHRUN_CATALOG_DIR", raising=False)
    said: list[str] = []
    r = update_catalog(["lambda", "nebius", "aws"], source=url, progress=said.append)
    assert sorted(r.fetched) == ["lambda", "nebius"] and "404" in r.missing["aws"]
    link = _catalog.updated_dir()
    assert link.is_symlink() and (link / "lambda" / "vms.csv").read_bytes() == (SNAP / "lambda" / "vms.csv").read_bytes()
    assert any("lambda/vms.csv" in m and "priced rows" in m for m in said)
    assert _catalog.catalog_dir() == link
    info = _catalog.catalog_info()
    assert info.kind == "fetched" and info.source == url and "today" in info.age_text()
    first = link.resolve()
    # a table that is not a price table: the update fails, names it, and the tables in use stay
    (served / "nebius" / "vms.csv").write_text("<html>rate limited</html>\n")
    with pytest.raises(meshrun.MeshrunError, match="nebius/vms.csv is not a price table"):
        update_catalog(["lambda", "nebius"], source=url)
    assert link.resolve() == first and (link / "nebius" / "vms.csv").read_bytes() == (SNAP / "nebius" / "vms.csv").read_bytes()
    assert len(list((link.parent / "snapshots").iterdir())) == 1  # the failed download left nothing behind
    # a source with none of the tables is an error, not an empty catalog
    with pytest.raises(meshrun.MeshrunError, match="no price table could be fetched"):
        update_catalog(["nosuchcloud"], source=url)
    with pytest.raises(meshrun.ConfigError, match="clouds"):
        update_catalog(["../etc"], source=url)


def test_catalog_cli_update_and_show(catalog_server, meshrun_home, monkeypatch):
    from meshrun.testing import run_cli

    _, url = catalog_server
    monkeypatch.delenv("MESHRUN_CATALOG_DIR", raising=False)
    p = run_cli("catalog", "update", "--source", url, "--clouds", "lambda")
    assert p.returncode == 0, p.stderr
    assert "updated" in p.stdout and "lambda" in p.stdout
    assert "lambda/vms.csv" in p.stderr and "priced rows" in p.stderr  # progress
    p = run_cli("catalog")
    assert p.returncode == 0 and "meshrun catalog update" in p.stdout and "lambda: " in p.stdout, p.stdout
    # offers say where their prices come from and how old they are (a cloud launcher that is not installed
    # stands for one whose server is down: the catalog's offers are listed either way)
    cfg = meshrun_home / "offers.toml"
    cfg.write_text('[placement]\nbackends = ["local", "skyless"]\ncloud_launcher = "skyless"\n')
    p = run_cli("offers", "--gpus", "H100:8", check=False, env={"MESHRUN_CONFIG": str(cfg)})
    assert "lambda" in p.stdout and "`meshrun catalog update`" in p.stdout and "today" in p.stdout, p.stdout
