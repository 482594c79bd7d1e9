"""A meshrun client run in its own process (possibly as another OS user) by the SSH backend's tests.

    python client_script.py REQUEST.json

REQUEST: {"config": {[backends.ssh] table}, "jobs": [{"command": [...], "gpus": N, ...JobSpec fields}],
          "wait": true|false, "timeout": 60, "attach": [job ids to wait for instead of submitting]}
Prints one JSON line: {"jobs": [{"id", "backend_id", "state", "logs", "where"}], "user": ...}.
With "wait": false it exits right after submitting, without closing anything (a client that goes away).
"""

import json
import os
import sys


def main() -> int:
    with open(sys.argv[1]) as f:
        req = json.load(f)
    import meshrun
    from meshrun_ssh import SSHBackend

    meshrun.register_backend("ssh", SSHBackend)  # this copy of the client has no installed entry points
    meshrun.configure({"backends": {"ssh": req["config"]}})
    if req.get("attach"):
        jobs = [meshrun.Job.attach(j) for j in req["attach"]]
    else:
        specs = [meshrun.JobSpec(backend="ssh", **j) for j in req["jobs"]]
        if req.get("together"):
            jobs = meshrun.submit_many(specs, backend="ssh")
        else:
            jobs = [meshrun.submit(s, backend="ssh") for s in specs]
    out = {"user": os.getuid(), "jobs": []}
    if req.get("wait", True):
        meshrun.wait(jobs, timeout=req.get("timeout", 120))
    for j in jobs:
        rec = j.refresh()
        out["jobs"].append({"id": j.id, "backend_id": j.backend_id, "state": rec.state.value,
                            "where": rec.where, "logs": j.logs() if rec.terminal else None})
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    if not req.get("wait", True):
        os._exit(0)  # leave like a killed client would: no clean-up, no goodbye
    return 0


if __name__ == "__main__":
    sys.exit(main())
