"""Fair share on a real 2-GPU machine, two OS users: root runs a 2-GPU job and queues another 2-GPU job;
user mrb queues a 2-GPU job later. When root's first job ends neither user holds a GPU, but root has recent
GPU use and mrb none: mrb's job must start first.

Run as root on a machine with 2 GPUs, with a user mrb (useradd -m -d /tmp/mrb mrb) and meshrun importable
for it from /tmp/mrblib (a copy of meshrun/):

    MESHRUN_LEASE_DIR=/tmp/mrleases MESHRUN_HOME=/tmp/mrhome python3 benchmarks/fair_share_demo.py

Recorded: benchmarks/results/fair_share_h200x2.txt (2 x H200).
"""
import json, os, subprocess, sys, time
import meshrun

def sh(cmd):
    print(f"$ {cmd}", flush=True)
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    print(r.stdout + r.stderr, flush=True)
    return r.stdout

a1 = meshrun.run("sleep 25", gpus=2, name="root-first", backend="local")
time.sleep(3)
a2 = meshrun.run("echo root-second on $CUDA_VISIBLE_DEVICES; date +%s.%N; sleep 4", gpus=2, name="root-second", backend="local")
time.sleep(2)
b_id = sh("runuser -u mrb -- env HOME=/tmp/mrb PYTHONPATH=/tmp/mrblib MESHRUN_HOME=/tmp/mrb/home MESHRUN_LEASE_DIR=/tmp/mrleases "
          "python3 -c \"import meshrun; j=meshrun.run('echo mrb on \\$CUDA_VISIBLE_DEVICES; date +%s.%N; sleep 4', gpus=2, "
          "name='mrb-job', backend='local'); print(j.id)\"").strip().splitlines()[-1]
time.sleep(3)
sh("python3 -m meshrun gpus")
print("root-second:", a2.status(), a2.reason, flush=True)
a1.cancel()
a2.wait(timeout=120)
d = f"/tmp/mrb/home/jobs/{b_id}"
for _ in range(600):
    if os.path.exists(f"{d}/exit.json"):
        break
    time.sleep(0.1)
print("root-second log:", a2.logs(), flush=True)
out = open(f"{d}/output.log").read()
print("mrb log:", out, flush=True)
print("mrb exit:", open(f"{d}/exit.json").read(), flush=True)
t_b = float([l for l in out.split() if l.replace('.', '').isdigit()][-1])
t_a = float([l for l in a2.logs().split() if l.replace('.', '').isdigit()][-1])
print(json.dumps({"mrb_started_at": t_b, "root_second_started_at": t_a, "mrb_first": t_b < t_a}), flush=True)
sh("python3 -m meshrun gpus --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({h: v.get(\"agent_version\") for h, v in d.items()}))'")
sh("python3 -c 'import json; print(json.load(open(\"/tmp/mrleases/leases.json\")).get(\"usage\"))'")
