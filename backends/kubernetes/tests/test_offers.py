"""offers(): from Kueue's LocalQueue/ClusterQueue/ResourceFlavors when a queue is set, else from node
allocatable minus pod requests; and the typed models of the Kueue objects read."""

from __future__ import annotations

import copy
import json

import meshrun
import pytest

from meshrun_kubernetes import KubernetesBackend
from meshrun_kubernetes import _kueue

from pathlib import Path

OBJ = Path(__file__).resolve().parent / "exchanges" / "objects"
KUEUE = "/apis/kueue.x-k8s.io/v1beta1"


def obj(name):
    return json.loads((OBJ / name).read_text())


def status(code, reason, message):
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def ex(path, body, code=200, query=None):
    req = {"method": "GET", "path": path}
    if query:
        req["query"] = query
    return {"request": req, "response": {"status": code, "body": body}}


def kueue_recording(lq=None, cq=None, flavors=True, lq_code=200, cq_code=200):
    out = [ex(f"{KUEUE}/namespaces/ml/localqueues/team-a", lq or obj("localqueue-team-a.json"), lq_code)]
    if lq_code != 200:
        return out
    out.append(ex(f"{KUEUE}/clusterqueues/gpu-cluster-queue", cq or obj("clusterqueue-gpu.json"), cq_code))
    if flavors and cq_code == 200:
        out.append(ex(f"{KUEUE}/resourceflavors", obj("resourceflavors.json")))
    return out


def backend(kube, **cfg):
    b = KubernetesBackend({"namespace": "ml", "image": "img:1", "queue": "team-a", **cfg})
    b.use_client(kube)
    return b


def test_kueue_queued_with_free_quota_but_pending_workloads(replay):
    kube, _ = replay(kueue_recording())
    [o] = backend(kube).offers(meshrun.JobSpec(command=["x"], gpus="H100:8"))
    assert o.fits and o.where == "ml/team-a"  # priced by the core's [prices] ([prices."kubernetes:ml/team-a"])
    assert o.expected_start is None and o.start_note.startswith("queued in Kueue: 3 pending workload(s) in "
                                                                "ClusterQueue gpu-cluster-queue")
    assert "8 of 32 nvidia.com/gpu free" in o.start_note
    assert o.detail["gpu_products"] == ["NVIDIA-H100-80GB-HBM3"]  # submit pins the pods to these


def test_kueue_starts_now_when_quota_is_free_and_nobody_waits(replay):
    cq = obj("clusterqueue-gpu.json")
    cq["status"]["pendingWorkloads"] = 0
    kube, _ = replay(kueue_recording(cq=cq))
    [o] = backend(kube).offers(meshrun.JobSpec(command=["x"], gpus="H100:4", cpus=16, memory="64GiB"))
    assert o.fits and o.expected_start == 0 and o.start_note == "now: quota free in ClusterQueue gpu-cluster-queue"


def test_kueue_full_flavor_waits(replay):
    cq = obj("clusterqueue-gpu.json")
    cq["status"]["pendingWorkloads"] = 0
    kube, _ = replay(kueue_recording(cq=cq))
    [o] = backend(kube).offers(meshrun.JobSpec(command=["x"], gpus="A100:2"))
    assert o.fits and o.expected_start is None and "0 of 16 nvidia.com/gpu free" in o.start_note


def test_kueue_no_flavor_of_that_type(replay):
    kube, _ = replay(kueue_recording())
    [o] = backend(kube).offers(meshrun.JobSpec(command=["x"], gpus="V100:1"))
    assert not o.fits and "no flavor of ClusterQueue gpu-cluster-queue offers V100 GPUs" in o.reason
    assert "h100-80gb (NVIDIA-H100-80GB-HBM3)" in o.reason


def test_kueue_more_than_the_quota_can_ever_give(replay):
    kube, _ = replay(kueue_recording())
    [o] = backend(kube).offers(meshrun.JobSpec(command=["x"], gpus="H100:8", nodes=8))
    assert not o.fits and o.reason == ("the job needs 64 nvidia.com/gpu in all; the largest quota for it in "
                                       "ClusterQueue gpu-cluster-queue is 40")


def test_kueue_resource_not_covered(replay):
    kube, _ = replay(kueue_recording(flavors=False))
    [o] = backend(kube).offers(meshrun.JobSpec(command=["x"], gpus=1, disk="1GiB",
                                               backend_options={"kubernetes": {"priority_class": "x"}}))
    assert o.fits  # ephemeral-storage is not asked of Kueue; GPUs without a type match any flavor
    kube, _ = replay([*kueue_recording(flavors=False)])
    b = backend(kube, gpu_resource="amd.com/gpu")
    [o] = b.offers(meshrun.JobSpec(command=["x"], gpus=1))
    assert not o.fits and "has no quota for amd.com/gpu" in o.reason


def test_kueue_local_queue_missing(replay):
    missing = status(404, "NotFound", 'localqueues.kueue.x-k8s.io "team-a" not found')
    kube, _ = replay(kueue_recording(lq=missing, lq_code=404))
    [o] = backend(kube).offers(meshrun.JobSpec(command=["x"], gpus=1))
    assert not o.fits and o.reason.startswith("Kueue LocalQueue 'team-a' not found in namespace ml")


def test_kueue_cluster_queue_forbidden(replay):
    denied = status(403, "Forbidden", 'clusterqueues.kueue.x-k8s.io "gpu-cluster-queue" is forbidden: User '
                                      '"ana@lab.example" cannot get resource "clusterqueues" in API group '
                                      '"kueue.x-k8s.io" at the cluster scope')
    kube, _ = replay(kueue_recording(cq=denied, cq_code=403))
    [o] = backend(kube).offers(meshrun.JobSpec(command=["x"], gpus="H100:1"))
    assert o.fits and o.expected_start is None and "quota unknown (403 Forbidden)" in o.start_note


def test_kueue_stopped_queue(replay):
    lq = obj("localqueue-team-a.json")
    lq["spec"]["stopPolicy"] = "Hold"
    kube, _ = replay(kueue_recording(lq=lq, flavors=False))
    [o] = backend(kube).offers(meshrun.JobSpec(command=["x"]))
    assert not o.fits and "stopped" in o.reason


NODES = [ex("/api/v1/nodes", None), ex("/api/v1/pods", None,
                                        query={"fieldSelector": "status.phase!=Succeeded,status.phase!=Failed"})]


def node_recording(pods_code=200):
    rec = copy.deepcopy(NODES)
    rec[0]["response"]["body"] = obj("nodelist.json")
    if pods_code == 200:
        rec[1]["response"]["body"] = obj("podlist-active.json")
    else:
        rec[1]["response"] = {"status": 403, "body": status(403, "Forbidden", 'pods is forbidden: User "ana@lab.example" '
                                                                        'cannot list resource "pods" in API group "" '
                                                                        'at the cluster scope')}
    return rec


def nodes_backend(kube):
    return backend(kube, queue=None)


def test_nodes_one_full_node_free_now(replay):
    kube, _ = replay(node_recording())
    [o] = nodes_backend(kube).offers(meshrun.JobSpec(command=["x"], gpus="H100:8", cpus=32))
    # gpu-node-01 is full, gpu-node-02 has 4 GPUs and an init container holding 200 CPUs, 04 is cordoned,
    # 05 is not ready: gpu-node-03 is the one
    assert o.fits and o.expected_start == 0 and o.start_note == "now: 1 node(s) with room"
    assert o.detail["nodes_capable"] == 3 and o.detail["gpu_products"] == ["NVIDIA-H100-80GB-HBM3"]


def test_nodes_two_nodes_wait(replay):
    kube, _ = replay(node_recording())
    [o] = nodes_backend(kube).offers(meshrun.JobSpec(command=["x"], gpus="H100:8", nodes=2))
    assert o.fits and o.expected_start is None and "1 of 3 capable node(s) have room now" in o.start_note


def test_nodes_too_many_or_wrong_type(replay):
    kube, _ = replay(node_recording())
    [o] = nodes_backend(kube).offers(meshrun.JobSpec(command=["x"], gpus="H100:8", nodes=4))
    assert not o.fits and "3 ready H100 node(s)" in o.reason and "asks for 4" in o.reason
    kube, _ = replay(node_recording())
    [o] = nodes_backend(kube).offers(meshrun.JobSpec(command=["x"], gpus="A100:1"))
    assert not o.fits and "0 ready A100 node(s)" in o.reason
    kube, _ = replay(node_recording())
    [o] = nodes_backend(kube).offers(meshrun.JobSpec(command=["x"], memory="200GiB"))
    assert o.fits  # only the GPU nodes have 200 GiB


def test_nodes_without_permission_to_list_pods(replay):
    kube, _ = replay(node_recording(pods_code=403))
    [o] = nodes_backend(kube).offers(meshrun.JobSpec(command=["x"], cpus=8))
    assert o.fits and o.expected_start is None and "free capacity is unknown" in o.start_note


def test_offers_validate_options_first():
    b = KubernetesBackend({"namespace": "ml", "image": "img:1"})
    with pytest.raises(meshrun.SpecError) as e:
        b.offers(meshrun.JobSpec(command=["x"], backend_options={"kubernetes": {"nodeSelector": {}}}))
    assert "node_selector" in str(e.value)


def test_jobset_not_installed_is_a_rejection(replay):
    kube, _ = replay([ex("/apis/jobset.x-k8s.io/v1alpha2", status(404, "NotFound", "the server could not find the "
                                                                                 "requested resource"), 404)])
    [o] = backend(kube, multi_node="jobset").offers(meshrun.JobSpec(command=["x"], nodes=2))
    assert not o.fits and "does not serve JobSet" in o.reason


# ---- Kueue objects, type-checked ---------------------------------------------------------------------


def test_kueue_fixtures_have_the_documented_shape():
    for w in obj("workloadlist-many.json")["items"]:
        m = _kueue.parse("Workload", w)
        assert m.metadata.labels[_kueue.JOB_UID_LABEL]
        for c in m.status.conditions:
            assert c.type in ("QuotaReserved", "Admitted", "Evicted", "Preempted", "Requeued", "PodsReady", "Finished")
    assert _kueue.parse("LocalQueue", obj("localqueue-team-a.json")).spec.clusterQueue == "gpu-cluster-queue"
    cq = _kueue.parse("ClusterQueue", obj("clusterqueue-gpu.json"))
    assert _kueue.flavor_capacity(cq, "nvidia.com/gpu") == [("h100-80gb", 32.0, 8.0), ("a100-40gb", 16.0, 0.0)]
    for f in obj("resourceflavors.json")["items"]:
        _kueue.parse("ResourceFlavor", f)


def test_kueue_models_reject_what_kueue_does_not_send():
    w = copy.deepcopy(obj("workloadlist-many.json")["items"][0])
    w["status"]["conditions"][0]["status"] = "Maybe"
    with pytest.raises(ValueError) as e:
        _kueue.parse("Workload", w)
    assert "status.conditions.0.status" in str(e.value)
    cq = obj("clusterqueue-gpu.json")
    cq["spec"]["resourceGroups"][0]["flavors"][0]["resources"][0]["nominalQuota"] = "lots"
    with pytest.raises(ValueError):
        _kueue.parse("ClusterQueue", cq)
    w = copy.deepcopy(obj("workloadlist-many.json")["items"][0])
    w["status"]["admissionChecks"] = [{"name": "x", "state": "Waiting"}]
    with pytest.raises(ValueError):
        _kueue.parse("Workload", w)


def test_v1beta2_field_names():
    lq = obj("localqueue-team-a.json")
    lq["apiVersion"] = "kueue.x-k8s.io/v1beta2"
    lq["status"]["flavorsUsage"] = lq["status"].pop("flavorUsage")
    assert _kueue.parse("LocalQueue", lq).status.flavorsUsage[0].name == "h100-80gb"
    cq = obj("clusterqueue-gpu.json")
    cq["spec"]["cohortName"] = cq["spec"].pop("cohort")
    assert _kueue.parse("ClusterQueue", cq).spec.cohortName == "lab"
