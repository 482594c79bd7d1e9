"""GPU masking on a real multi-GPU machine: two meshrun jobs submitted at once on the local backend, one GPU
each, must each see exactly one GPU, and not the same one.

Inside each job: torch.cuda.device_count() == 1, and the UUID of its device 0
(torch.cuda.get_device_properties(0).uuid) equals the job's MESHRUN_GPU_UUIDS and is one of nvidia-smi's.
Both jobs hold their GPU at the same time (each waits until the other has probed before it exits).

    python benchmarks/bench_gpu_masking.py --out benchmarks/results/gpu_masking_h200x2

writes OUT.json (the records and checks) and OUT.txt (a readable summary with the command).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

PROBE = r"""
import json, os, sys, time
out, expect = sys.argv[1], int(sys.argv[2])
jid = os.environ["MESHRUN_JOB_ID"]
def count(prefix):
    return sum(n.startswith(prefix) for n in os.listdir(out))
open(os.path.join(out, "arrived." + jid), "w").close()
deadline = time.time() + 120
while count("arrived.") < expect and time.time() < deadline:
    time.sleep(0.05)
together = count("arrived.") >= expect
import torch
n = torch.cuda.device_count()
props = torch.cuda.get_device_properties(0)
u = str(props.uuid)
uuid = u if u.startswith("GPU-") else "GPU-" + u
x = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
ok = float(x.sum().item()) == float((1 << 20) * ((1 << 20) - 1) // 2)
rec = {"job_id": jid, "device_count": n, "torch_uuid": uuid, "name": props.name,
       "MESHRUN_GPU_UUIDS": os.environ.get("MESHRUN_GPU_UUIDS"),
       "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
       "CUDA_DEVICE_ORDER": os.environ.get("CUDA_DEVICE_ORDER"),
       "GPUS_PER_NODE": os.environ.get("GPUS_PER_NODE"), "together": together, "kernel_ok": ok,
       "pid": os.getpid(), "probed_at": time.time()}
with open(os.path.join(out, "probe." + jid + ".json"), "w") as f:
    json.dump(rec, f)
while count("probe.") < expect and time.time() < deadline:
    time.sleep(0.05)
rec["others_probed_while_held"] = count("probe.") >= expect
with open(os.path.join(out, "probe." + jid + ".json"), "w") as f:
    json.dump(rec, f)
print(json.dumps(rec))
"""


def nvidia_smi_uuids() -> list[dict[str, str]]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name,pci.bus_id", "--format=csv,noheader"],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    rows = []
    for line in out.strip().splitlines():
        idx, uuid, name, bus = [p.strip() for p in line.split(",")]
        rows.append({"index": idx, "uuid": uuid, "name": name, "pci_bus_id": bus})
    return rows


def run(jobs: int = 2) -> dict:
    import meshrun

    smi = nvidia_smi_uuids()
    work = tempfile.mkdtemp(prefix="meshrun-mask-")
    t0 = time.time()
    submitted = [meshrun.run([sys.executable, "-c", PROBE, work, str(jobs)], gpus=1, backend="local",
                             name=f"mask-{i}", env={"NCCL_NVLS_ENABLE": "0"}) for i in range(jobs)]
    submit_s = time.time() - t0
    meshrun.wait(submitted, timeout=300)
    records, job_info = [], []
    for j in submitted:
        path = os.path.join(work, f"probe.{j.id}.json")
        rec = json.load(open(path)) if os.path.exists(path) else {"job_id": j.id, "missing": True}
        records.append(rec)
        job_info.append({"id": j.id, "state": j.record.state.value, "where": j.record.where,
                         "exit_code": j.record.exit_code, "output": j.logs()[-2000:]})
    smi_uuids = [g["uuid"] for g in smi]
    checks = {
        "all_jobs_succeeded": all(i["state"] == "succeeded" for i in job_info),
        "each_sees_exactly_one_gpu": all(r.get("device_count") == 1 for r in records),
        "torch_uuid_equals_MESHRUN_GPU_UUIDS": all(r.get("torch_uuid") == r.get("MESHRUN_GPU_UUIDS")
                                                   for r in records),
        "uuids_are_nvidia_smi_uuids": all(r.get("torch_uuid") in smi_uuids for r in records),
        "jobs_got_different_gpus": len({r.get("torch_uuid") for r in records}) == len(records),
        "jobs_held_their_gpus_at_the_same_time": all(r.get("together") and r.get("others_probed_while_held")
                                                     for r in records),
        "a_kernel_ran_on_each": all(r.get("kernel_ok") for r in records),
    }
    return {"nvidia_smi": smi, "jobs": job_info, "records": records, "checks": checks,
            "passed": all(checks.values()), "submit_seconds": submit_s, "total_seconds": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_masking", help="path without extension for OUT.json and OUT.txt")
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args(argv)
    res = run(a.jobs)
    res["command"] = "python " + " ".join(shlex.quote(x) for x in [sys.argv[0]] + list(argv or sys.argv[1:]))
    res["host"] = os.uname().nodename
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(res, f, indent=2, sort_keys=True)
    lines = [f"$ {res['command']}", "", "nvidia-smi:"]
    lines += [f"  GPU {g['index']}  {g['name']}  {g['uuid']}  {g['pci_bus_id']}" for g in res["nvidia_smi"]]
    lines.append("")
    for r in res["records"]:
        lines.append(f"job {r.get('job_id')}: device_count={r.get('device_count')} "
                     f"torch uuid={r.get('torch_uuid')} MESHRUN_GPU_UUIDS={r.get('MESHRUN_GPU_UUIDS')} "
                     f"CUDA_VISIBLE_DEVICES={r.get('CUDA_VISIBLE_DEVICES')}")
    lines.append("")
    lines += [f"{'PASS' if v else 'FAIL'}  {k}" for k, v in res["checks"].items()]
    lines.append(f"\n{'PASSED' if res['passed'] else 'FAILED'}")
    with open(a.out + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
