"""The backend against recorded API exchanges, through the official kubernetes client's code paths
(request building, REST layer, error handling); only the connection pool under it replays recordings."""

from __future__ import annotations

import json

import meshrun
import pytest

from meshrun_kubernetes import KubernetesBackend
from meshrun_kubernetes._client import Kube, KubeApiError

S = meshrun.JobState
CFG = {"namespace": "ml", "image": "ghcr.io/lab/train:2024.06"}


def backend(kube, **cfg):
    b = KubernetesBackend({**CFG, **cfg})
    b.use_client(kube)
    return b


def single_spec():
    return meshrun.JobSpec(command=["python", "train.py", "--lr", "0.1"], cpus=4, memory="16GiB",
                           time_limit="1h30m", retries=2, name="train")


def test_submit_single(replay, make_submission):
    kube, r = replay("submit-single.json")
    sub = make_submission(single_spec())
    bid = backend(kube).submit(sub)
    assert bid == "ml/meshrun-0a1b2c3d4e5f"
    state = json.loads((sub.job_dir / "kubernetes.json").read_text())
    # a plain command's pod log frames no records: there is no nonce to look for
    assert state["backend_id"] == bid and state["kueue"] is False and state["nonce"] is None
    # the official client sent JSON with its own headers
    assert r.requests[0]["headers"]["Content-Type"] == "application/json"
    assert r.requests[1]["headers"]["Content-Type"] == "application/strategic-merge-patch+json"


def test_submit_function_multinode_creates_owned_secret_and_service(replay, make_submission):
    def f(x):
        return x

    kube, r = replay("submit-function-multinode.json")
    spec = meshrun.JobSpec(function=f, args=(1,), gpus=1, nodes=2, time_limit=600, name="fn")
    sub = make_submission(spec)
    bid = backend(kube, workdir="/app").submit(sub)
    assert bid == "ml/meshrun-0a1b2c3d4e5f"
    secret = r.requests[1]["body"]
    assert sorted(secret["data"]) == ["_agent.py", "launch.json", "payload.pkl", "records.nonce"]
    import base64

    nonce = base64.b64decode(secret["data"]["records.nonce"]).decode()
    assert nonce == json.loads((sub.job_dir / "kubernetes.json").read_text())["nonce"]


def test_submit_data_job_creates_its_secret_with_the_stager(replay, make_submission):
    kube, r = replay("submit-data.json")
    spec = meshrun.JobSpec(command=["python", "train.py", "--data", "data/imagenet"], gpus=1, time_limit=600,
                           name="train", inputs={"s3://lab-data/imagenet/": "data/imagenet/"},
                           outputs={"ckpt/": {"destination": "s3://lab-ckpt/run-17/", "on": ["success", "cancel"]}})
    sub = make_submission(spec)
    bid = backend(kube, data_env_from=["s3-credentials", "configmap/s3-endpoint"]).submit(sub)
    assert bid == "ml/meshrun-0a1b2c3d4e5f"
    secret = r.requests[1]["body"]
    assert sorted(secret["data"]) == ["_agent.py", "launch.json", "records.nonce", "stage.py"]
    import base64

    nonce = base64.b64decode(secret["data"]["records.nonce"]).decode()
    assert nonce == json.loads((sub.job_dir / "kubernetes.json").read_text())["nonce"]
    assert r.requests[2]["body"] == {"spec": {"suspend": False}}


def test_submit_forbidden_is_a_clear_error(replay, make_submission):
    kube, _ = replay("submit-forbidden.json")
    with pytest.raises(KubeApiError) as e:
        backend(kube).submit(make_submission(single_spec()))
    assert e.value.status == 403 and e.value.reason == "Forbidden"
    assert isinstance(e.value, meshrun.BackendError)
    assert 'cannot create resource "jobs" in API group "batch" in the namespace "ml"' in str(e.value)
    assert "create Job ml/meshrun-0a1b2c3d4e5f" in str(e.value)


def test_submit_conflict_with_our_own_job_is_adopted(replay, make_submission):
    kube, _ = replay("submit-conflict-ours.json")
    assert backend(kube).submit(make_submission(single_spec())) == "ml/meshrun-0a1b2c3d4e5f"


def test_submit_conflict_with_another_job_fails(replay, make_submission):
    kube, _ = replay("submit-conflict-foreign.json")
    with pytest.raises(meshrun.BackendError) as e:
        backend(kube).submit(make_submission(single_spec()))
    assert "already exists and belongs to another job" in str(e.value) and "zzzzzzzzzzzz" in str(e.value)


def test_submit_rolls_back_when_the_secret_is_refused(replay, make_submission):
    def f(x):
        return x

    kube, r = replay("submit-secret-forbidden.json")
    spec = meshrun.JobSpec(function=f, args=(1,), gpus=1, nodes=2, time_limit=600, name="fn")
    with pytest.raises(KubeApiError) as e:
        backend(kube, workdir="/app").submit(make_submission(spec))
    assert e.value.status == 403 and "secrets" in str(e.value)
    assert r.requests[-1]["method"] == "DELETE"


IDS = ["deadline0001", "deleting0001", "evicted00001", "failedexit01", "imagepull001", "kueuechecks1", "kueuedeact01",
       "kueueinadm01", "kueuenowl001", "kueuepreempt", "kueuewait001", "running00001", "succeeded001", "unschedule01"]


def test_status_of_many_jobs_in_three_requests(replay):
    kube, r = replay("status-many.json")
    b = backend(kube)
    got = b.status([f"ml/meshrun-{i}" for i in IDS])
    assert len(r.requests) == 3
    st = {k.split("-", 1)[1]: v for k, v in got.items()}
    assert st["succeeded001"].state is S.SUCCEEDED and st["succeeded001"].exit_code == 0
    assert st["succeeded001"].where == "gpu-node-07" and st["succeeded001"].ended_at > st["succeeded001"].started_at
    f = st["failedexit01"]
    assert f.state is S.FAILED and f.exit_code == 2
    assert f.reason.startswith("BackoffLimitExceeded: Job has reached the specified backoff limit; pod ")
    assert "container exited with code 2" in f.reason
    t = st["deadline0001"]
    assert t.state is S.TIMEOUT and "5400s" in t.reason and "longer than specified deadline" in t.reason
    run = st["running00001"]
    assert run.state is S.RUNNING and run.reason == "2 of 4 pods running" and run.where == "gpu-node-01,gpu-node-02"
    assert st["imagepull001"].state is S.PENDING
    assert st["imagepull001"].reason.startswith("pulling the image failed: ImagePullBackOff: Back-off pulling image")
    assert st["unschedule01"].state is S.PENDING
    assert st["unschedule01"].reason.startswith("unschedulable: 0/12 nodes are available: 12 Insufficient memory")
    ev = st["evicted00001"]
    assert ev.state is S.RUNNING and "TerminationByKubelet: The node was low on resource: memory" in ev.reason
    assert "replaced" in ev.reason
    assert st["deleting0001"].state is S.CANCELLED
    w = st["kueuewait001"]
    assert w.state is S.PENDING
    assert w.reason == ("waiting for Kueue admission: Pending: couldn't assign flavors to pod set main: insufficient "
                        "unused quota for nvidia.com/gpu in flavor h100-80gb, 8 more needed")
    p = st["kueuepreempt"]
    assert p.state is S.PENDING and p.reason.startswith("waiting for Kueue admission: evicted (Preempted: Preempted to "
                                                        "accommodate a workload")
    assert "re-queued; Pending: couldn't assign flavors" in p.reason
    c = st["kueuechecks1"]
    assert c.state is S.PENDING and "quota reserved in ClusterQueue gpu-cluster-queue" in c.reason
    assert "dws-prov=Pending (Waiting for resources." in c.reason
    assert st["kueueinadm01"].reason == ("waiting for Kueue admission: Inadmissible: LocalQueue no-such-queue "
                                         "doesn't exist")
    assert st["kueuedeact01"].state is S.TIMEOUT and "maximum execution time" in st["kueuedeact01"].reason
    assert st["kueuenowl001"].state is S.PENDING and "has not created a Workload" in st["kueuenowl001"].reason


def test_status_when_kueue_workloads_cannot_be_read(replay):
    kube, _ = replay("status-kueue-forbidden.json")
    got = backend(kube).status([f"ml/meshrun-{i}" for i in IDS])
    w = got["ml/meshrun-kueuewait001"]
    assert w.state is S.PENDING and "403 Forbidden" in w.reason and "cannot list resource" in w.reason
    assert got["ml/meshrun-succeeded001"].state is S.SUCCEEDED  # the rest is still known


def test_status_when_the_api_server_is_unreachable(make_submission):
    from kubernetes import client

    class Down:
        def request(self, *a, **k):
            import urllib3

            raise urllib3.exceptions.MaxRetryError(None, "/apis/batch/v1/namespaces/ml/jobs",
                                                   reason=ConnectionRefusedError(111, "Connection refused"))

        def clear(self):
            pass

    cfg = client.Configuration()
    cfg.host = "https://k8s.lab.example:6443"
    api = client.ApiClient(cfg)
    api.rest_client.pool_manager = Down()
    b = backend(Kube(api, namespace="ml"))
    st = b.status(["ml/meshrun-0a1b2c3d4e5f"])["ml/meshrun-0a1b2c3d4e5f"]
    assert st.state is S.UNKNOWN and "cannot reach the Kubernetes API server" in st.reason
    with pytest.raises(meshrun.BackendUnavailable):
        b.cancel("ml/meshrun-0a1b2c3d4e5f")


def test_cancel_deletes_in_the_foreground(replay):
    kube, r = replay("cancel.json")
    b = backend(kube)
    b.cancel("ml/meshrun-0a1b2c3d4e5f")
    assert r.requests[0]["query"] == {"propagationPolicy": "Foreground"}
    assert b.status(["ml/meshrun-0a1b2c3d4e5f"])["ml/meshrun-0a1b2c3d4e5f"].state is S.CANCELLED
    b.cancel("ml/meshrun-0a1b2c3d4e5f")  # already gone: not an error
    st = b.status(["ml/meshrun-0a1b2c3d4e5f"])["ml/meshrun-0a1b2c3d4e5f"]
    assert st.state is S.CANCELLED  # gone, and this process cancelled it
    assert KubernetesBackend(CFG).status(["bad id"])["bad id"].state is S.LOST


def test_find_by_label(replay):
    kube, _ = replay("find.json")
    b = backend(kube)
    assert b.find("0a1b2c3d4e5f") == "ml/meshrun-0a1b2c3d4e5f"
    assert b.find("nosuchjob000") is None  # no Job, and no JobSet API in this cluster
    assert b.find("not a label value!") is None


def test_kubeconfig_context_and_namespace(tmp_path, monkeypatch):
    """The user's kubeconfig, loaded by the official loader: context chosen, its namespace used."""
    kc = tmp_path / "config"
    kc.write_text("""
apiVersion: v1
kind: Config
current-context: dev
clusters:
- name: lab
  cluster: {server: "https://k8s.lab.example:6443", insecure-skip-tls-verify: true}
- name: dev
  cluster: {server: "https://dev.example:6443", insecure-skip-tls-verify: true}
users:
- name: ana
  user: {token: "not-a-real-token"}
contexts:
- name: dev
  context: {cluster: dev, user: ana}
- name: lab
  context: {cluster: lab, user: ana, namespace: team-a}
""")
    b = KubernetesBackend({"kubeconfig": str(kc), "context": "lab"})
    av = b.check()
    assert av.ok and av.detail["api_server"] == "https://k8s.lab.example:6443" and av.detail["namespace"] == "team-a"
    assert "not-a-real-token" not in repr(av) and "not-a-real-token" not in repr(b)
    b2 = KubernetesBackend({"kubeconfig": str(kc)})
    assert b2.check().detail["namespace"] == "default" and b2.check().detail["api_server"] == "https://dev.example:6443"
    bad = KubernetesBackend({"kubeconfig": str(kc), "context": "nope"}).check()
    assert not bad.ok and "nope" in bad.reason
    missing = KubernetesBackend({"kubeconfig": str(tmp_path / "none")})
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert not missing.check().ok


def test_in_cluster_config(tmp_path, monkeypatch):
    from kubernetes.config import incluster_config

    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("not-a-real-token")
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    import meshrun_kubernetes._client as client_mod

    ns = tmp_path / "namespace"
    ns.write_text("team-b\n")
    monkeypatch.setattr(client_mod, "SA_NAMESPACE", str(ns))
    b = KubernetesBackend({"kubeconfig": str(tmp_path / "absent")})
    av = b.check()
    assert av.ok and av.detail["api_server"] == "https://10.96.0.1:443" and av.detail["namespace"] == "team-b"
    assert av.detail["config"] == "in-cluster service account"
