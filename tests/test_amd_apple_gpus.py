"""AMD GPUs (amd-smi, or rocm-smi where only that is installed) and Apple Silicon's one MPS device, on the
local backend: inventory, foreign processes and masking from the tools' recorded real outputs (served by
the fake executables in tests/fakes/amd/; each output's source is in tests/data/amd/README.md), machines
with both vendors, and GPU jobs on a Mac serialised by the lease table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import meshrun
from meshrun import _agent
from meshrun.testing import assert_no_gpu_overlap

DATA = Path(__file__).parent / "data" / "amd"
FAKES = Path(__file__).parent / "fakes" / "amd"


@pytest.fixture(autouse=True)
def _local_backend(monkeypatch):
    monkeypatch.setenv("MESHRUN_BACKEND", "local")


@pytest.fixture
def amd(monkeypatch):
    """Put the fake amd-smi/rocm-smi on PATH; call with the recorded outputs' folder(s). An AMD machine: the
    fake nvidia-smi before any real one answers as where no NVIDIA driver is (and NVML is not asked)."""
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{FAKES.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_NVIDIA_SMI", str(DATA / "no-nvidia-driver.json"))  # absent: "no driver"
    monkeypatch.delenv("FAKE_AMD_SMI_DIR", raising=False)
    monkeypatch.delenv("FAKE_ROCM_SMI_DIR", raising=False)

    def use(amd_smi: str | None = None, rocm_smi: str | None = None) -> None:
        if amd_smi:
            monkeypatch.setenv("FAKE_AMD_SMI_DIR", str(DATA / amd_smi))
        if rocm_smi:
            monkeypatch.setenv("FAKE_ROCM_SMI_DIR", str(DATA / rocm_smi))

    return use


def _env_job(*names: str) -> list[str]:
    return ["python3", "-c", "import json, os; print(json.dumps({k: os.environ.get(k) for k in %r}))" % (names,)]


MASK = ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "MESHRUN_GPU_UUIDS")


def test_amd_smi_inventory_and_foreign_processes(amd):
    amd(amd_smi="amd-smi-mi308x")
    gpus, source, err = _agent.discover_gpus()
    assert (source, err) == ("amd-smi", None)
    assert [(g["label"], g["device"], g["rocr"], g["vendor"], g["name"], g["uuid"]) for g in gpus] == [
        ("amd:0", 0, 0, "amd", "MI308X", "AMD-0000:23:00.0"),  # the UUID is redacted in the recording: the BDF
        ("amd:1", 1, 1, "amd", "AMD GPU", "AMD-0000:26:00.0"),  # `static` was recorded for GPU 0 only
    ]  # rocr: the place of each GPU's KFD node (NODE_ID 1 and 2) among the GPUs', the order ROCr numbers them in
    snap = _agent.snapshot()
    assert {p["pid"]: p["process_name"] for p in snap["foreign"]["AMD-0000:23:00.0"]} == {
        420157: "TransferBench", 420315: "rvs"}
    assert list(snap["foreign"]) == ["AMD-0000:23:00.0"]


def test_rocm_smi_where_amd_smi_is_missing(amd):
    amd(rocm_smi="rocm-smi-mi200")  # the fake amd-smi answers like a machine without it: rocm-smi is asked
    gpus, source, _ = _agent.discover_gpus()
    assert source == "rocm-smi"
    assert [(g["label"], g["name"]) for g in gpus] == [("amd:0", "AMD INSTINCT MI200 (MCM) OAM LC MBA HPE C2")]
    assert _agent.gpu_matches(gpus[0], "MI200") and not _agent.gpu_matches(gpus[0], "MI300X")
    procs, err = _agent.gpu_processes(gpus)
    assert err is None
    # --showpidgpus: pids 1949829 (GPUs 0 and 1, over two lines) and 10678 use GPU 0; 79301 uses GPU 1 (absent)
    assert sorted(p["pid"] for p in procs) == [10678, 1949829] and {p["gpu_uuid"] for p in procs} == {"AMD-0"}
    amd(rocm_smi="rocm-smi-rx7900")
    (gpu,), _, _ = _agent.discover_gpus()
    assert (gpu["name"], gpu["memory"]) == ("Radeon RX 7900 XT", 21458059264)


def test_amd_masking_skips_the_foreign_gpu(amd, tmp_path):
    """GPU 0 runs two processes meshrun did not start (the recording): the job gets GPU 1, shown to it by
    ROCR_VISIBLE_DEVICES (the physical index) and HIP/CUDA_VISIBLE_DEVICES counting from 0."""
    amd(amd_smi="amd-smi-mi308x")
    job = meshrun.run(_env_job(*MASK), gpus=1)
    assert job.result(timeout=60) == 0
    env = json.loads(job.logs().strip().splitlines()[-1])
    assert env == {"ROCR_VISIBLE_DEVICES": "1", "HIP_VISIBLE_DEVICES": "0", "CUDA_VISIBLE_DEVICES": "0",
                   "MESHRUN_GPU_UUIDS": "AMD-0000:26:00.0"}
    # two GPUs of one kind are not there (GPU 0 is an MI308X, GPU 1 unnamed): placement says so at once
    with pytest.raises(meshrun.NoPlacementError):
        meshrun.run(["true"], gpus="MI308X:2", backend="local")


def test_declared_amd_gpus_and_both_vendors(amd, fake_gpus, monkeypatch):
    assert _agent.parse_declared_gpus("0-1,amd:0-2") == [("nvidia", 0), ("nvidia", 1), ("amd", 0), ("amd", 1),
                                                         ("amd", 2)]
    with pytest.raises(ValueError, match="unknown GPU vendor"):
        _agent.parse_declared_gpus("intel:0")
    fake_gpus(2)  # two H100s from the fake nvidia-smi, and the recorded MI308X machine
    amd(amd_smi="amd-smi-mi308x")
    gpus, source, _ = _agent.discover_gpus()
    assert source == "nvidia-smi, amd-smi" and [g["label"] for g in gpus] == ["0", "1", "amd:0", "amd:1"]
    assert len({g["index"] for g in gpus}) == 4  # one lease table, no slot shared by the two vendors
    # a job never mixes vendors or models: 2 GPUs are the two H100s; 3 are nowhere
    assert [g["label"] for g in _agent.fit_gpus(gpus, 2)] == ["0", "1"]
    assert _agent.fit_gpus(gpus, 3) is None
    assert [g["label"] for g in _agent.fit_gpus(gpus, 1, "MI308X")] == ["amd:0"]
    assert [g["label"] for g in _agent.fit_gpus(gpus, 1, "amd")] == ["amd:0"]
    job = meshrun.run(_env_job(*MASK), gpus="H100:2")
    assert job.result(timeout=60) == 0
    env = json.loads(job.logs().strip().splitlines()[-1])
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["ROCR_VISIBLE_DEVICES"] is None
    with pytest.raises(meshrun.NoPlacementError) as e:
        meshrun.run(["true"], gpus=3, backend="local")
    assert "has 2 GPU(s)" in str(e.value)
    monkeypatch.setenv("MESHRUN_GPUS", "amd:1")  # declared: restricted to AMD GPU 1, details from amd-smi
    (only,), source, _ = _agent.discover_gpus()
    assert (source, only["label"], only["uuid"]) == ("MESHRUN_GPUS", "amd:1", "AMD-0000:26:00.0")


def test_apple_silicon_is_one_mps_device_and_jobs_take_turns(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("MESHRUN_PLATFORM", "Darwin-arm64")
    (gpu,), source, _ = _agent.discover_gpus()
    assert (gpu["vendor"], gpu["label"], source) == ("apple", "mps", "platform (Apple Silicon: one MPS device)")
    monkeypatch.setenv("MESHRUN_PLATFORM", "Darwin-x86_64")  # an Intel Mac has no MPS device to lease
    assert _agent.discover_gpus()[0] == [] or _agent.discover_gpus()[0][0]["vendor"] != "apple"
    monkeypatch.setenv("MESHRUN_PLATFORM", "Darwin-arm64")
    out = tmp_path / "rec"
    out.mkdir()
    code = ("import json, os, sys, time, uuid; t0 = time.time(); time.sleep(0.3); "
            "rec = {'gpus': os.environ.get('MESHRUN_GPU_UUIDS'), 'cuda': os.environ.get('CUDA_VISIBLE_DEVICES'), "
            "'start': t0, 'end': time.time(), 'job': os.environ.get('MESHRUN_JOB_ID')}; "
            "open(os.path.join(sys.argv[1], uuid.uuid4().hex + '.json'), 'w').write(json.dumps(rec))")
    jobs = [meshrun.run(["python3", "-c", code, str(out)], gpus=1, name=f"mps-{i}") for i in range(2)]
    meshrun.wait(jobs, timeout=60)
    recs = [json.loads(f.read_text()) for f in out.glob("*.json")]
    assert len(recs) == 2 and all(r["gpus"] == "MPS-0" and r["cuda"] is None for r in recs)
    assert_no_gpu_overlap(recs)  # one after the other: nothing to mask, the lease alone serialises them
    with pytest.raises(meshrun.NoPlacementError):
        meshrun.run(["true"], gpus=2, backend="local")
    from meshrun._cli import main

    assert main(["gpus"]) == 0
    shown = capfd.readouterr().out
    assert "mps" in shown and "Apple Silicon: one MPS device" in shown


def test_a_gpu_tool_that_is_not_installed_costs_no_process_start(monkeypatch, tmp_path):
    """Discovery asks nvidia-smi, amd-smi and rocm-smi; one on no PATH directory is reported missing, as a
    failed start would be, without starting a process (each start of a large Python process costs
    milliseconds); one that is there is still run."""
    monkeypatch.setenv("PATH", str(tmp_path))

    def no_start(*a, **k):
        raise AssertionError(f"started a process for a tool that is not installed: {a}")

    monkeypatch.setattr(_agent.subprocess, "run", no_start)
    monkeypatch.setattr(_agent.subprocess, "Popen", no_start)
    gpus, source, err = _agent.discover_gpus({})
    assert gpus == [] and "No such file or directory: 'nvidia-smi'" in err, (source, err)
    assert _agent.gpu_processes([]) == ([], None)
    monkeypatch.undo()
    tool = tmp_path / "amd-smi"
    tool.write_text("#!/bin/sh\necho 'amd-smi was run' >&2\nexit 3\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert _agent.amd_smi_gpus() == ([], "amd-smi was run")


@pytest.mark.gpu
@pytest.mark.skipif(not os.path.exists("/dev/nvidiactl"), reason="needs an NVIDIA driver (a GPU machine)")
def test_meshrun_gpus_from_nvml_agrees_with_nvidia_smi(tmp_path):
    """``meshrun gpus`` asks NVML in-process; the supervisor asks nvidia-smi: both must see the same GPUs and
    the same compute processes (a CUDA context held here, by the driver API, is one)."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", (
        "import ctypes, time; cu = ctypes.CDLL('libcuda.so.1'); assert cu.cuInit(0) == 0; d = ctypes.c_int(); "
        "cu.cuDeviceGet(ctypes.byref(d), 0); c = ctypes.c_void_p(); "
        "assert cu.cuCtxCreate_v2(ctypes.byref(c), 0, d) == 0; print('ready', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        env = {"MESHRUN_LEASE_DIR": str(tmp_path / "leases"), "PATH": os.environ["PATH"]}
        direct, smi = _agent.snapshot(env, direct=True), _agent.snapshot(env, direct=False)
        assert direct["source"] == "NVML" and smi["source"] == "nvidia-smi"
        key = [(g["index"], g["uuid"], g["name"], g["memory"], g["label"]) for g in smi["gpus"]]
        assert key and [(g["index"], g["uuid"], g["name"], g["memory"], g["label"]) for g in direct["gpus"]] == key
        assert direct["foreign"] == smi["foreign"] and any(
            p["pid"] == holder.pid for ps in direct["foreign"].values() for p in ps), direct["foreign"]
    finally:
        holder.kill()
        holder.wait()
