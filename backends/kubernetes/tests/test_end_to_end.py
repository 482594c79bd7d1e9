"""Through the core: ``meshrun.submit`` places a function job on the kubernetes backend, Kueue keeps it
waiting, then it runs and its result comes back from the pod log.

The API server is a scripted sequence of exchanges (their paths carry the job id, known only at run
time). The "pod" is this machine running the container entry point on the very Secret the backend
sent; its stdout is what the pod-log request returns. Also: logs (plain and followed) from recordings."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import meshrun
import pytest

from meshrun import _agent
from meshrun_kubernetes import KubernetesBackend
from meshrun_kubernetes import _manifests as mf
from meshrun_kubernetes._names import expand

OBJ = Path(__file__).resolve().parent / "exchanges" / "objects"
KUEUE = "/apis/kueue.x-k8s.io/v1beta1"
JOBS = "/apis/batch/v1/namespaces/ml/jobs"
T0, T1, T2 = "2026-11-29T11:00:00Z", "2026-11-29T11:00:05Z", "2026-11-29T11:00:09Z"


def obj(name):
    return json.loads((OBJ / name).read_text())


class Cluster:
    """Answers as an API server would for one job, from what the backend sent."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.job = None
        self.secret = None
        self.uid = "4d3c2b1a-0f9e-4d8c-b7a6-958473625140"
        self.log = None

    def created_job(self, req):
        self.job = req["body"]
        out = json.loads(json.dumps(self.job))
        out["metadata"].update({"uid": self.uid, "resourceVersion": "990001", "generation": 1,
                                "creationTimestamp": T0})
        out["status"] = {}
        return {"status": 201, "body": out}

    def created_secret(self, req):
        self.secret = req["body"]
        assert self.secret["metadata"]["ownerReferences"][0]["uid"] == self.uid
        meta = {**self.secret["metadata"], "uid": "9f8e7d6c-5b4a-4938-a716-253443526170", "resourceVersion": "990002"}
        return {"status": 201, "body": {**self.secret, "metadata": meta, "data": {}}}

    def job_list(self, *, done: bool):
        j = json.loads(json.dumps(self.job))
        j.pop("apiVersion")
        j.pop("kind")
        j["metadata"].update({"uid": self.uid, "resourceVersion": "990010", "creationTimestamp": T0})
        if done:
            j["spec"]["suspend"] = False
            j["status"] = {"startTime": T1, "completionTime": T2, "succeeded": 1, "ready": 0, "terminating": 0,
                           "uncountedTerminatedPods": {}, "conditions": [
                               {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                                "message": "Reached expected number of succeeded pods", "lastProbeTime": T2,
                                "lastTransitionTime": T2},
                               {"type": "Complete", "status": "True", "reason": "CompletionsReached",
                                "message": "Reached expected number of succeeded pods", "lastProbeTime": T2,
                                "lastTransitionTime": T2}]}
        else:
            j["status"] = {"conditions": [{"type": "Suspended", "status": "True", "reason": "JobSuspended",
                                           "message": "Job suspended", "lastProbeTime": T0, "lastTransitionTime": T0}]}
        return {"status": 200, "body": {"kind": "JobList", "apiVersion": "batch/v1",
                                        "metadata": {"resourceVersion": "990011"}, "items": [j]}}

    def pods(self, *, exist: bool):
        items = []
        if exist:
            name = self.job["metadata"]["name"]
            items.append({
                "metadata": {"name": f"{name}-7xk2q", "namespace": "ml", "creationTimestamp": T1,
                             "labels": {**self.job["spec"]["template"]["metadata"]["labels"],
                                        "batch.kubernetes.io/job-name": name}},
                "spec": {"nodeName": "gpu-node-03", "containers": [{"name": "job", "image": "img"}]},
                "status": {"phase": "Succeeded", "startTime": T1, "containerStatuses": [{
                    "name": "job", "ready": False, "restartCount": 0, "image": "img", "imageID": "", "started": False,
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": T1,
                                             "finishedAt": T2}}}]}})
        return {"status": 200, "body": {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
                                        "items": items}}

    def workloads(self, req):
        wl = {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
              "metadata": {"name": f"job-{self.job['metadata']['name']}-4f2a1", "namespace": "ml",
                           "labels": {"kueue.x-k8s.io/job-uid": self.uid}},
              "spec": {"active": True, "queueName": "team-a", "podSets": [{"name": "main", "count": 1}]},
              "status": {"conditions": [{"type": "QuotaReserved", "status": "False", "reason": "Pending",
                                         "message": "couldn't assign flavors to pod set main: insufficient unused "
                                                    "quota for cpu in flavor h100-80gb, 2 more needed",
                                         "lastTransitionTime": T0}]}}
        return {"status": 200, "body": {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "WorkloadList",
                                        "metadata": {"resourceVersion": "2"}, "items": [wl]}}

    def run_pod(self, req):
        """The container: the Secret's files in a read-only folder, the entry point, stdout as the log."""
        src = self.tmp / "pod" / "in"
        src.mkdir(parents=True)
        for k, v in self.secret["data"].items():
            (src / k).write_bytes(base64.b64decode(v))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHRUN_")}
        for e in self.job["spec"]["template"]["spec"]["containers"][0]["env"]:
            if "value" in e:
                env[e["name"]] = expand(e["value"], env)  # as the kubelet does
        (self.tmp / "pod" / "workdir").mkdir()
        argv = self.job["spec"]["template"]["spec"]["containers"][0]["command"]
        argv = [sys.executable] + [a.replace(mf.IN_DIR, str(src)).replace(mf.JOB_DIR, str(self.tmp / "pod" / "job"))
                                   for a in argv[1:]]
        p = subprocess.run(argv, cwd=self.tmp / "pod" / "workdir", env=env, stdout=subprocess.PIPE, timeout=60)
        assert p.returncode == 0
        self.log = p.stdout.decode()
        assert int(req["query"]["tailLines"]) > 1000
        return {"status": 200, "body": self.log}


def test_function_job_through_kueue_and_back(tmp_path, replay, monkeypatch):
    c = Cluster(tmp_path)
    ID = r"meshrun-[0-9a-z]{12}"
    sel = {"labelSelector": r"meshrun\.dev/job-id in \([0-9a-z]{12}\)"}
    one = {"labelSelector": r"meshrun\.dev/job-id=[0-9a-z]{12}"}
    script = [
        {"request": {"method": "GET", "path": f"{KUEUE}/namespaces/ml/localqueues/team-a"},
         "response": {"status": 200, "body": obj("localqueue-team-a.json")}},
        {"request": {"method": "GET", "path": f"{KUEUE}/clusterqueues/gpu-cluster-queue"},
         "response": {"status": 200, "body": obj("clusterqueue-gpu.json")}},
        {"request": {"method": "POST", "path": JOBS, "body_match": {"metadata": {"labels": {
            "kueue.x-k8s.io/queue-name": "team-a"}}, "spec": {"suspend": True}}}, "response": c.created_job},
        {"request": {"method": "POST", "path": "/api/v1/namespaces/ml/secrets", "body_match": {"kind": "Secret"}},
         "response": c.created_secret},
        # waiting for Kueue
        {"request": {"method": "GET", "path": JOBS, "query_re": sel}, "response": lambda r: c.job_list(done=False)},
        {"request": {"method": "GET", "path": "/api/v1/namespaces/ml/pods", "query_re": sel},
         "response": lambda r: c.pods(exist=False)},
        {"request": {"method": "GET", "path": f"{KUEUE}/namespaces/ml/workloads"}, "response": c.workloads},
        # done
        {"request": {"method": "GET", "path": JOBS, "query_re": sel}, "response": lambda r: c.job_list(done=True)},
        {"request": {"method": "GET", "path": "/api/v1/namespaces/ml/pods", "query_re": sel},
         "response": lambda r: c.pods(exist=True)},
        # fetch_results: node 0's pod and its log
        {"request": {"method": "GET", "path": "/api/v1/namespaces/ml/pods", "query_re": one},
         "response": lambda r: c.pods(exist=True)},
        {"request": {"method": "GET", "path_re": f"/api/v1/namespaces/ml/pods/{ID}-7xk2q/log",
                     "query_re": {"container": "job", "tailLines": r"\d+"}}, "response": c.run_pod},
    ]
    kube, r = replay(script)
    # the backend as the core finds it: by its entry point, configured from MESHRUN_KUBERNETES_* variables
    for k, v in {"NAMESPACE": "ml", "IMAGE": "python:3.11", "QUEUE": "team-a"}.items():
        monkeypatch.setenv(f"MESHRUN_KUBERNETES_{k}", v)
    monkeypatch.setattr(KubernetesBackend, "kube", lambda self: kube)
    monkeypatch.setattr(KubernetesBackend, "poll_interval", (0.01, 0.05))
    meshrun.configure()
    seen = []

    def train(lr, steps=3):
        import os

        print(f"training with lr={lr} on", os.environ["MESHRUN_JOB_ID"], flush=True)
        return {"loss": 1.0 / steps, "lr": lr}

    spec = meshrun.JobSpec(function=train, args=(0.1,), kwargs={"steps": 4}, cpus=2, name="train $(x)")
    job = meshrun.submit(spec, backend="kubernetes")
    meshrun.wait([job], timeout=60, on_change=lambda j: seen.append((j.record.state, j.record.reason)))
    assert job.result(timeout=5) == {"loss": 0.25, "lr": 0.1}
    assert any(s is meshrun.JobState.PENDING and "waiting for Kueue admission: Pending: couldn't assign flavors"
               in (why or "") for s, why in seen)
    assert job.record.where == "gpu-node-03"
    out = (job.job_dir / "output.log").read_text()
    assert f"training with lr=0.1 on {job.id}" in out and "meshrun-records" not in out
    assert job.backend_id == f"ml/meshrun-{job.id}"


def test_logs_plain_and_followed(tmp_path, replay):
    log = "step 1\nstep 2\n"
    full = log + _agent.frame_records("n0nce", "0a1b2c3d4e5f", 0, {"exit.json": b'{"state": "succeeded"}'})
    pods = obj("podlist-many.json")
    pod = next(p for p in pods["items"] if p["metadata"]["labels"]["meshrun.dev/job-id"] == "succeeded001")
    podlist = {**pods, "items": [pod]}
    name = pod["metadata"]["name"]
    jobs = obj("joblist-many.json")
    done = {**jobs, "items": [j for j in jobs["items"] if j["metadata"]["name"] == "meshrun-succeeded001"]}
    sel = {"labelSelector": "meshrun.dev/job-id=succeeded001"}
    many = {"labelSelector": "meshrun.dev/job-id in (succeeded001)"}
    script = [
        {"request": {"method": "GET", "path": "/api/v1/namespaces/ml/pods", "query": sel},
         "response": {"status": 200, "body": podlist}},
        {"request": {"method": "GET", "path": f"/api/v1/namespaces/ml/pods/{name}/log", "query": {"container": "job"}},
         "response": {"status": 200, "body": full}},
        {"request": {"method": "GET", "path": "/api/v1/namespaces/ml/pods", "query": sel},
         "response": {"status": 200, "body": podlist}},
        {"request": {"method": "GET", "path": f"/api/v1/namespaces/ml/pods/{name}/log",
                     "query": {"container": "job", "follow": "true"}},
         "response": {"status": 200, "body": full}},
        {"request": {"method": "GET", "path": "/apis/batch/v1/namespaces/ml/jobs", "query": many},
         "response": {"status": 200, "body": done}},
        {"request": {"method": "GET", "path": "/api/v1/namespaces/ml/pods", "query": many},
         "response": {"status": 200, "body": podlist}},
    ]
    kube, _ = replay(script)
    b = KubernetesBackend({"namespace": "ml", "image": "img"})
    b.use_client(kube)
    assert "".join(b.logs("ml/meshrun-succeeded001")) == log
    assert "".join(b.logs("ml/meshrun-succeeded001", follow=True)) == log


def test_fetch_results_detects_a_cut_block(tmp_path, replay):
    pods = obj("podlist-many.json")
    pod = next(p for p in pods["items"] if p["metadata"]["labels"]["meshrun.dev/job-id"] == "succeeded001")
    frame = _agent.frame_records("n0nce", "succeeded001", 0, {"result.pkl": os.urandom(3000)})
    cut = "\n".join(frame.splitlines()[:-1]) + "\n"
    script = [
        {"request": {"method": "GET", "path": "/api/v1/namespaces/ml/pods",
                     "query": {"labelSelector": "meshrun.dev/job-id=succeeded001"}},
         "response": {"status": 200, "body": {**pods, "items": [pod]}}},
        {"request": {"method": "GET", "path": f"/api/v1/namespaces/ml/pods/{pod['metadata']['name']}/log",
                     "query_re": {"container": "job", "tailLines": r"\d+"}},
         "response": {"status": 200, "body": "output\n" + cut}},
    ]
    kube, _ = replay(script)
    b = KubernetesBackend({"namespace": "ml", "image": "img"})
    b.use_client(kube)
    (tmp_path / "kubernetes.json").write_text(json.dumps({"nonce": "n0nce"}))
    with pytest.raises(meshrun.BackendError) as e:
        b.fetch_results("ml/meshrun-succeeded001", tmp_path)
    assert "cut short" in str(e.value)
    assert (tmp_path / "output.log").read_text() == "output\n"
    assert not (tmp_path / "result.pkl").exists()
