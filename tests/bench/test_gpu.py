"""Real-GPU checks (skipped where no NVIDIA GPU answers): masking of two concurrent local jobs, and the
harness with NCCL. Run on a GPU machine with ``pytest -m gpu tests/bench``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import meshrun

pytestmark = pytest.mark.gpu


def _smi_gpus() -> list[dict[str, str]]:
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no nvidia-smi: this machine has no NVIDIA GPU")
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name", "--format=csv,noheader"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"nvidia-smi does not answer: {e}")
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip(f"nvidia-smi reports no GPU: {(out.stderr or out.stdout).strip()}")
    if "FAKE_NVIDIA_SMI" in os.environ:
        pytest.skip("nvidia-smi is the test stand-in, not a real GPU")
    gpus = []
    for line in out.stdout.strip().splitlines():
        idx, uuid, name = [p.strip() for p in line.split(",", 2)]
        gpus.append({"index": idx, "uuid": uuid, "name": name})
    return gpus


PROBE = r"""
import json, os, sys, time
out, expect = sys.argv[1], int(sys.argv[2])
jid = os.environ["MESHRUN_JOB_ID"]
count = lambda p: sum(n.startswith(p) for n in os.listdir(out))
open(os.path.join(out, "arrived." + jid), "w").close()
deadline = time.time() + 120
while count("arrived.") < expect and time.time() < deadline:
    time.sleep(0.05)
import torch
props = torch.cuda.get_device_properties(0)
u = str(props.uuid)
rec = {"device_count": torch.cuda.device_count(), "uuid": u if u.startswith("GPU-") else "GPU-" + u,
       "env_uuids": os.environ.get("MESHRUN_GPU_UUIDS"), "together": count("arrived.") >= expect}
with open(os.path.join(out, "probe." + jid + ".json"), "w") as f:
    json.dump(rec, f)
while count("probe.") < expect and time.time() < deadline:
    time.sleep(0.05)
"""


def test_two_concurrent_jobs_each_see_one_different_gpu(tmp_path, monkeypatch):
    gpus = _smi_gpus()
    if len(gpus) < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {len(gpus)}")
    pytest.importorskip("torch")
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    jobs = [meshrun.run([sys.executable, "-c", PROBE, str(tmp_path), "2"], gpus=1, backend="local", name=f"m{i}")
            for i in range(2)]
    meshrun.wait(jobs, timeout=300)
    recs = []
    for j in jobs:
        assert j.record.state.value == "succeeded", j.logs()
        recs.append(json.loads((tmp_path / f"probe.{j.id}.json").read_text()))
    smi = {g["uuid"] for g in gpus}
    for r in recs:
        assert r["device_count"] == 1, r
        assert r["uuid"] == r["env_uuids"], r
        assert r["uuid"] in smi, (r, smi)
        assert r["together"], "the two jobs did not hold their GPUs at the same time"
    assert recs[0]["uuid"] != recs[1]["uuid"]


def test_nccl_bench_on_two_gpus(tmp_path, monkeypatch):
    gpus = _smi_gpus()
    if len(gpus) < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {len(gpus)}")
    pytest.importorskip("torch")
    import meshrun.bench as bench
    from meshrun.bench import _math

    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    t0 = time.time()
    res = bench.run("all", backend="local", gpus_per_node=2, min_bytes=8, max_bytes="4M", warmup=2, iters=5,
                    env={"NCCL_NVLS_ENABLE": "0"}, out_dir=tmp_path)
    assert res.meta["ranks"] == 2 and res.meta["backend"] == "nccl" and res.meta["gpu_model"]
    assert res.meta["nccl_version"] and res.meta["torch_version"]
    assert any(info.get("topology") for info in res.meta["node_info"].values())
    assert res.wrong == 0, res.table()
    for r in res.rows:
        if r["time_us"] is None:
            continue
        sec = r["time_us"] / 1e6
        assert r["busbw"] == pytest.approx(r["size"] / 1e9 / sec * _math.busbw_factor(r["collective"], 2))
        if not (r["mode"] == "in-place" and r["collective"] in ("alltoall", "sendrecv")):
            assert r["wrong"] == 0, r
    # out-of-place all_reduce goes to NCCL directly (torch has no out-of-place all_reduce)
    oop = [r for r in res.rows if r["collective"] == "all_reduce" and r["mode"] == "out-of-place"]
    assert all(r["api"] == "nccl" and r["time_us"] is not None for r in oop), res.meta.get("out_of_place_note")
    assert any(r.get("nccl_algo") for r in res.rows if r["collective"] == "all_reduce")
    assert time.time() - t0 < 600
