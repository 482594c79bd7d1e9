"""Containment with real CUDA processes, on a machine with a GPU: a job started by the host agent (stdlib only,
as the SSH backend runs it) starts processes that each hold a CUDA context and 256 MiB on its leased GPU and
escape every way a launcher might (setsid, double fork, nohup + disown), ignoring SIGTERM. After cancel, a
time limit, the main process simply exiting, and a cancel after the supervisor was SIGKILLed (the job reads
``lost``), none of them may live, ``nvidia-smi`` must show none of them on the GPU, and the GPU lease must
never be seen free while one of them lives. Run for each containment the machine allows (``cgroup`` where
one can be had, and ``subreaper``).

    python3 benchmarks/containment_cuda.py --out benchmarks/results/containment_cuda_h100

writes OUT.json (every record and check) and OUT.txt (a readable summary with the command).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "meshrun"))
import _agent  # noqa: E402  (the host agent file itself, stdlib only)

HOLD = r"""
import ctypes, os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
if sys.argv[3] == "cuda":
    cuda = ctypes.CDLL("libcuda.so.1")
    assert cuda.cuInit(0) == 0
    dev = ctypes.c_int()
    assert cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0   # device 0 of CUDA_VISIBLE_DEVICES: the leased GPU
    ctx = ctypes.c_void_p()
    assert cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev) == 0
    mem = ctypes.c_uint64()
    assert cuda.cuMemAlloc_v2(ctypes.byref(mem), 256 << 20) == 0
with open(sys.argv[1], "a") as f:
    f.write("%d %s %s\n" % (os.getpid(), sys.argv[2], os.environ.get("CUDA_VISIBLE_DEVICES")))
while True:
    time.sleep(1000)
"""


CUDA = "cuda"  # --no-cuda: check the script itself on a machine without a GPU (MESHRUN_GPUS=0)


def job_script(hold: str, pidfile: str, then: str) -> str:
    py = shlex.quote(sys.executable)
    return "\n".join([
        f"setsid {py} {hold} {pidfile} setsid {CUDA} &",
        f"( {py} {hold} {pidfile} double {CUDA} & )",
        f"nohup {py} {hold} {pidfile} nohup {CUDA} >/dev/null 2>&1 & disown",
        f'while [ "$(wc -l < {pidfile} 2>/dev/null || echo 0)" -lt 3 ]; do sleep 0.05; done',
        then,
    ])


def lease_held(lease_dir: str, job_id: str) -> bool:
    """Whether the job holds a GPU lease: a hold file of its, in state "leased" (agent version 4)."""
    for name in os.listdir(lease_dir) if os.path.isdir(lease_dir) else []:
        if name.startswith("hold-") and name.endswith(".json"):
            rec = _agent.read_json(os.path.join(lease_dir, name)) or {}
            if rec.get("job_id") == job_id and rec.get("state") == "leased":
                return True
    return False


def holders(pidfile: str) -> dict[int, tuple]:
    out = {}
    for line in open(pidfile).read().splitlines():
        pid, how, cvd = line.split()
        out[int(pid)] = (how, cvd, _agent.proc_start(int(pid)))
    return out


def alive(hs: dict[int, tuple]) -> list[int]:
    return [p for p, (_, _, s) in hs.items() if s is not None and _agent.pid_alive(p, s)]


def on_gpu(pids) -> list[int]:
    procs, _ = _agent.nvidia_smi_processes()
    seen = {p["pid"] for p in procs}
    return sorted(p for p in pids if p in seen)


def one(root: str, mechanism: str, how: str) -> dict:
    tag = f"{mechanism}-{how}"
    job_dir = os.path.join(root, "job-" + tag)
    os.makedirs(job_dir)
    pidfile = os.path.join(root, "pids-" + tag)
    hold = os.path.join(root, "hold.py")
    then = "exit 0" if how == "exit" else "sleep 1000"
    launch = {"job_id": "cuda-" + tag, "name": tag, "kind": "command", "gpus": 1, "cwd": job_dir,
              "grace_period": 2, "argv": ["bash", "-c", job_script(hold, pidfile, then)],
              "env": {"MESHRUN_CONTAINMENT": mechanism}}
    if how == "timeout":
        launch["time_limit"] = 25
    _agent.write_json(os.path.join(job_dir, "launch.json"), launch)
    lease_dir = os.environ["MESHRUN_LEASE_DIR"]
    rec = {"mechanism": mechanism, "how": how}
    t0 = time.time()
    _agent.spawn(job_dir)
    deadline = time.time() + 120
    while not (os.path.exists(pidfile) and len(open(pidfile).read().splitlines()) >= 3):
        assert time.time() < deadline, "the CUDA holders did not start: %s" % open(os.path.join(job_dir, "output.log")).read()
        time.sleep(0.05)
    hs = holders(pidfile)
    rec["holders"] = {str(p): {"how": h[0], "CUDA_VISIBLE_DEVICES": h[1]} for p, h in hs.items()}
    while CUDA == "cuda" and len(on_gpu(hs)) < 3 and time.time() < deadline:
        time.sleep(0.2)
    rec["holders_on_gpu_before"] = on_gpu(hs)
    st = _agent.read_json(os.path.join(job_dir, "state.json")) or {}
    rec["containment"] = st.get("containment")
    rec["cgroup"] = st.get("cgroup")
    rec["sessions"] = {str(p): _agent.proc_session(p) for p in hs}
    rec["supervisor_sid"] = st.get("sid")
    if how == "lost":
        os.kill(st["pid"], signal.SIGKILL)
        while _agent.pid_alive(st["pid"], st.get("pid_start")):
            time.sleep(0.02)
        s = _agent.job_status(job_dir)
        rec["status_after_supervisor_killed"] = {"state": s.get("state"), "reason": s.get("reason")}
        rec["alive_after_supervisor_killed"] = len(alive(hs))
    t1 = time.time()
    if how in ("cancel", "lost"):
        if how == "lost":
            _agent.cancel(job_dir)
        else:
            _agent.cancel(job_dir, wait=False)
    violations, samples = 0, 0
    exit_json = os.path.join(job_dir, "exit.json")
    while not os.path.exists(exit_json):
        held = lease_held(lease_dir, launch["job_id"])
        left = alive(hs)
        samples += 1
        if left and not held:
            violations += 1
        assert time.time() < t1 + 120, "the job did not end"
        time.sleep(0.01)
    rec["seconds_to_exit_record"] = round(time.time() - t1, 3)
    rec["lease_samples"] = samples
    rec["lease_free_while_a_holder_lived"] = violations
    rec["exit"] = _agent.read_json(exit_json)
    rec["alive_after"] = alive(hs)
    time.sleep(0.5)  # nvidia-smi may list a process for a moment after it ended
    rec["on_gpu_after"] = on_gpu(hs)
    rec["lease_held_after"] = lease_held(lease_dir, launch["job_id"])
    rec["cgroup_removed"] = (not os.path.exists(rec["cgroup"])) if rec.get("cgroup") else None
    if how == "lost":  # the lease is then the lease table's own business (reclaimed once its holders are gone)
        rec["lease_free_while_a_holder_lived"] = None
    rec["ok"] = ((len(rec["holders_on_gpu_before"]) == 3 or CUDA != "cuda") and rec["containment"] == mechanism and not violations
                 and not rec["alive_after"] and not rec["on_gpu_after"] and not rec["lease_held_after"]
                 and rec["cgroup_removed"] in (True, None) and (how != "lost" or rec["alive_after_supervisor_killed"] == 3))
    rec["total_seconds"] = round(time.time() - t0, 3)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="path without extension for OUT.json and OUT.txt")
    ap.add_argument("--no-cuda", action="store_true", help="holders without a CUDA context (a dry run without GPU)")
    a = ap.parse_args()
    global CUDA
    if a.no_cuda:
        CUDA = "none"
    root = tempfile.mkdtemp(prefix="meshrun-cuda-containment-")
    os.environ["MESHRUN_LEASE_DIR"] = os.path.join(root, "leases")
    with open(os.path.join(root, "hold.py"), "w") as f:
        f.write(HOLD)
    gpus, source, err = _agent.discover_gpus()
    available = _agent.containment_available()
    mechanisms = (["cgroup"] if available[0] == "cgroup" else []) + ["subreaper"]
    runs = []
    for mech in mechanisms:
        for how in ("cancel", "timeout", "exit", "lost"):
            runs.append(one(root, mech, how))
            print(json.dumps({k: runs[-1][k] for k in ("mechanism", "how", "ok", "seconds_to_exit_record")}),
                  flush=True)
    result = {
        "command": "python3 benchmarks/containment_cuda.py --out " + a.out + (" --no-cuda" if a.no_cuda else ""),
        "cuda_holders": CUDA == "cuda",
        "host": socket.gethostname(),
        "gpus": [{k: g.get(k) for k in ("index", "name", "uuid")} for g in gpus],
        "gpu_source": source,
        "containment_available": list(available),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "runs": runs,
        "all_ok": all(r["ok"] for r in runs),
    }
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    lines = [f"$ {result['command']}", f"host {result['host']}, kernel {result['kernel']}, Python {result['python']}",
             f"GPUs: {', '.join(g['name'] or '?' for g in result['gpus'])} ({source})",
             f"containment available: {available[0]} ({available[1]})", ""]
    lines.append("%-10s %-8s %-4s %-8s %-9s %-10s %-10s %-8s" % ("MECHANISM", "HOW", "OK", "ON GPU", "END (s)",
                                                                "LEFT ALIVE", "LEFT ON GPU", "LEASE OK"))
    for r in runs:
        lines.append("%-10s %-8s %-4s %-8s %-9s %-10s %-10s %-8s" % (
            r["mechanism"], r["how"], "yes" if r["ok"] else "NO", len(r["holders_on_gpu_before"]),
            r["seconds_to_exit_record"], len(r["alive_after"]), len(r["on_gpu_after"]),
            "-" if r["lease_free_while_a_holder_lived"] is None else
            ("yes" if not r["lease_free_while_a_holder_lived"] else "NO")))
    lines.append("")
    lines.append("all ok: %s" % result["all_ok"])
    with open(a.out + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
