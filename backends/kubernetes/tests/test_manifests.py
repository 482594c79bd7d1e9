"""Every manifest the backend generates: golden files, and validation against the official Kubernetes
schemas (kubernetes-validate, strict) plus the API server's name and label rules."""

from __future__ import annotations

import json

import meshrun
import pytest

from meshrun_kubernetes import KubernetesBackend
from meshrun_kubernetes import _manifests as mf
from meshrun_kubernetes._names import expand

BASE = {"namespace": "ml", "image": "ghcr.io/lab/train:2024.06"}


def backend(**cfg):
    return KubernetesBackend({**BASE, **cfg})


def render(spec, make_submission, **cfg):
    b = backend(**cfg)
    sub = make_submission(spec)
    m, files = b.render(sub, nonce="f" * 32)
    return m, files, sub


def all_objects(m, files, job_id="0a1b2c3d4e5f"):
    objs = [m.workload]
    if files:
        objs.append(mf.render_secret(m, job_id=job_id, files=files))
    if m.service:
        objs.append(m.service)
    return objs


def test_single_node_cpu_command(make_submission, golden, k8s_valid):
    spec = meshrun.JobSpec(command=["python", "train.py", "--lr", "0.1"], cpus=4, memory="16GiB",
                           time_limit="1h30m", retries=2, name="train")
    m, files, _ = render(spec, make_submission)
    assert m.kind == "Job" and m.service is None and not files
    k8s_valid(m.workload)
    golden("job-single-cpu.json", m.workload)
    js = m.workload["spec"]
    assert js["activeDeadlineSeconds"] == 5400 and js["backoffLimit"] == 2 and js["suspend"] is True
    c = js["template"]["spec"]["containers"][0]
    assert c["command"] == ["python", "train.py", "--lr", "0.1"]
    assert c["resources"] == {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["NNODES"] == "1" and env["NODE_RANK"] == "0"
    assert meshrun.check_dist_env({k: v for k, v in env.items() if v is not None}) == []


def test_gpu_job_with_type_setup_and_shell_command(make_submission, golden, k8s_valid):
    spec = meshrun.JobSpec(command="python train.py > out.txt", gpus="A100:2", cpus=0.5, memory="1500MiB",
                           setup=["pip install -r requirements.txt"], name="sweep")
    m, _, _ = render(spec, make_submission, gpu_products={"A100": ["NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-PCIE-40GB"]},
                     tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                     image_pull_secrets=["regcred"])
    k8s_valid(m.workload)
    golden("job-gpu.json", m.workload)
    pod = m.workload["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert c["resources"]["requests"]["cpu"] == "500m"
    expr = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
        "matchExpressions"][0]
    assert expr == {"key": "nvidia.com/gpu.product", "operator": "In",
                    "values": ["NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-PCIE-40GB"]}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert c["command"][:2] == ["/bin/bash", "-c"] and c["command"][-3:] == ["/bin/bash", "-c",
                                                                           "python train.py > out.txt"]


def test_multi_node_indexed_job_and_headless_service(make_submission, golden, k8s_valid):
    spec = meshrun.JobSpec(command=["torchrun", "train.py"], gpus="H100:8", nodes=4, cpus=64, memory="512GiB",
                           name="llm-pretrain")
    m, _, _ = render(spec, make_submission)
    for o in m.objects():
        k8s_valid(o)
    golden("job-multinode.json", m.workload)
    golden("service-multinode.json", m.service)
    js = m.workload["spec"]
    assert (js["completionMode"], js["completions"], js["parallelism"]) == ("Indexed", 4, 4)
    pod = js["template"]["spec"]
    assert pod["subdomain"] == m.service["metadata"]["name"] == m.name
    assert m.service["spec"]["clusterIP"] == "None" and m.service["spec"]["publishNotReadyAddresses"] is True
    # the Service selects exactly the job's pods
    assert m.service["spec"]["selector"].items() <= js["template"]["metadata"]["labels"].items()
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    # pod 0 of an Indexed Job is <job>-0, resolvable as <job>-0.<subdomain>.<namespace>.svc
    assert env["MASTER_ADDR"]["value"] == f"{m.name}-0.{m.name}.ml.svc"
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["NNODES"]["value"] == "4" and env["GPUS_PER_NODE"]["value"] == "8" and env["WORLD_SIZE"]["value"] == "32"
    # hostnames <job>-<index> must be DNS labels for every index
    assert len(f"{m.name}-3") <= 63


def test_multi_node_jobset(make_submission, golden, k8s_valid):
    spec = meshrun.JobSpec(command=["torchrun", "train.py"], gpus=8, nodes=2, retries=3, name="llm")
    m, _, _ = render(spec, make_submission, multi_node="jobset", queue="team-a")
    assert m.kind == "JobSet" and m.service is None and m.backend_id == f"ml/jobsets/{m.name}"
    k8s_valid(m.workload)  # the JobSet's Job template, validated as a batch/v1 Job
    golden("jobset-multinode.json", m.workload)
    js = m.workload["spec"]
    assert js["suspend"] is True and js["failurePolicy"] == {"maxRestarts": 3}
    assert js["network"]["subdomain"] == m.name
    assert m.workload["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    env = {e["name"]: e.get("value") for e in js["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "containers"][0]["env"]}
    assert env["MASTER_ADDR"] == f"{m.name}-node-0-0.{m.name}.ml.svc"


def test_kueue_labels_and_priorities(make_submission, golden, k8s_valid):
    spec = meshrun.JobSpec(command=["python", "eval.py"], gpus=1, name="eval",
                           backend_options={"kubernetes": {"queue": "team-b", "priority_class": "research-low",
                                                           "workload_priority_class": "batch",
                                                           "labels": {"team": "vision"},
                                                           "annotations": {"lab.example.com/owner": "ana"}}})
    m, _, _ = render(spec, make_submission, queue="team-a")
    k8s_valid(m.workload)
    golden("job-kueue.json", m.workload)
    meta = m.workload["metadata"]
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-b"  # the job's option wins over the config
    assert meta["labels"]["kueue.x-k8s.io/priority-class"] == "batch"
    assert meta["labels"]["team"] == "vision" and meta["annotations"]["lab.example.com/owner"] == "ana"
    assert m.workload["spec"]["suspend"] is True  # Kueue admits it by unsuspending it
    assert m.workload["spec"]["template"]["spec"]["priorityClassName"] == "research-low"
    # the queue label belongs on the Job, not on its pods (Kueue manages the Job)
    assert "kueue.x-k8s.io/queue-name" not in m.workload["spec"]["template"]["metadata"]["labels"]


def test_function_job_secret_and_launch(make_submission, golden, k8s_valid):
    def f(x):
        return x

    spec = meshrun.JobSpec(function=f, args=(1,), gpus=1, nodes=2, time_limit=600, name="fn")
    m, files, sub = render(spec, make_submission, workdir="/app")
    secret = mf.render_secret(m, job_id=sub.job_id, files=files)
    for o in (m.workload, secret, m.service):
        k8s_valid(o)
    golden("job-function.json", m.workload)
    golden("secret-function.json", secret)
    assert sorted(files) == ["_agent.py", "launch.json", "payload.pkl", "records.nonce"]
    launch = json.loads(files["launch.json"])
    assert launch["lease"] is False and launch["mask_gpus"] is False and launch["time_limit"] is None
    assert launch["cwd"] == "/app" and launch["sys_path"] == []
    assert launch["dist"]["MASTER_ADDR"] == f"{m.name}-0.{m.name}.ml.svc" and launch["dist"]["GPUS_PER_NODE"] == "1"
    assert files["records.nonce"] == b"f" * 32
    pod = m.workload["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"] == ["python3", "/meshrun/in/_agent.py", "run", "/meshrun/job",
                                               "--emit-records", "@/meshrun/in/records.nonce", "--inputs",
                                               "/meshrun/in", "--max-result", str(4 * 1024 * 1024)]
    assert {"name": "meshrun-in", "secret": {"secretName": m.name, "defaultMode": 0o444}} in pod["volumes"]
    rules = m.workload["spec"]["podFailurePolicy"]["rules"]
    assert rules[1] == {"action": "FailJob", "onExitCodes": {"containerName": "job", "operator": "In", "values": [3]}}
    owned = mf.render_secret(m, job_id=sub.job_id, files=files, owner={
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": m.name, "uid": "8f0e2a8e-1111-2222-3333-444455556666"}})
    assert owned["metadata"]["ownerReferences"][0]["uid"] == "8f0e2a8e-1111-2222-3333-444455556666"
    k8s_valid(owned)


HOSTILE_ENV = {
    "PLAIN": "value",
    "DOLLAR_PAREN": "$(HOME) and $(MESHRUN_JOB_ID)",
    "ESCAPED": "$$(HOME) $$$ $",
    "SHELL": "'; rm -rf / #\" `id` $(id) ${PATH} && echo pwned | tee /etc/passwd",
    "NEWLINES": "line1\nline2\r\n\ttabbed",
    "UNICODE": "Grüße — 日本語 — 🚀 — \u202e",
    "JSONISH": '{"a": [1, 2, {"b": "$(c)"}]}',
    "EMPTY": "",
    "BACKSLASH": "C:\\path\\to\\$(x)\\",
    "UNCLOSED": "$(NOT_CLOSED and $",
}


def test_hostile_strings(make_submission, golden, k8s_valid):
    name = "Ünïcødé ☃ / rm -rf $(x); DROP TABLE jobs;-- " + "x" * 300
    spec = meshrun.JobSpec(command=["python", "-c", "import os; print(os.environ['SHELL'])", "$(HOME)", "a b;c"],
                           name=name[:256], env=HOSTILE_ENV, labels={"k": "v $(x)", "ключ": "значение"})
    m, _, _ = render(spec, make_submission)
    k8s_valid(m.workload)
    golden("job-hostile.json", m.workload)
    meta = m.workload["metadata"]
    assert meta["annotations"]["meshrun.dev/name"] == name[:256]  # the original, unchanged
    assert json.loads(meta["annotations"]["meshrun.dev/labels"]) == {"k": "v $(x)", "ключ": "значение"}
    c = m.workload["spec"]["template"]["spec"]["containers"][0]
    # what the kubelet gives the container, after its $(VAR) expansion: exactly what the user wrote
    defined: dict[str, str] = {}
    seen = {}
    for e in c["env"]:
        if "value" in e:
            value = expand(e["value"], defined)
            defined[e["name"]] = value
            seen[e["name"]] = value
    for k, v in HOSTILE_ENV.items():
        assert seen[k] == v, k
    assert seen["MESHRUN_JOB_NAME"] == name[:256]
    argv = [expand(a, defined) for a in c["command"]]
    assert argv == ["python", "-c", "import os; print(os.environ['SHELL'])", "$(HOME)", "a b;c"]


def test_hostile_submission_name_is_sanitised(make_submission, k8s_valid):
    spec = meshrun.JobSpec(command=["true"])
    b = backend()
    sub = make_submission(spec, job_id="0a1b2c3d4e5f")
    sub.job_id = "Weird ID/With Spaces_and_ÜNICODE" + "z" * 80
    m, _ = b.render(sub)
    assert m.name == mf.job_name(sub.name) and len(m.name) <= mf.NAME_MAX
    k8s_valid(m.workload)
    assert m.workload["metadata"]["labels"]["meshrun.dev/job-id"] != sub.job_id  # sanitised label value
    assert mf.job_name(sub.name) == m.name  # deterministic


def test_options_are_validated_and_unknown_keys_listed(make_submission):
    spec = meshrun.JobSpec(command=["true"], backend_options={"kubernetes": {"queu": "team-a"}})
    with pytest.raises(meshrun.SpecError) as e:
        backend().render(make_submission(spec))
    assert e.value.field == "backend_options.kubernetes.queu"
    assert "queue" in str(e.value) and "namespace" in str(e.value) and "multi_node" in str(e.value)
    for bad, field in [({"namespace": "Bad_NS"}, "namespace"), ({"queue": "x" * 70}, "queue"),
                       ({"multi_node": "mpi"}, "multi_node"), ({"labels": {"bad key!": "v"}}, "labels"),
                       ({"tolerations": [{"key": "a", "operator": "Maybe"}]}, "tolerations"),
                       ({"workdir": "relative/dir"}, "workdir"), ({"gpu_products": "H100"}, "gpu_products")]:
        spec = meshrun.JobSpec(command=["true"], backend_options={"kubernetes": bad})
        with pytest.raises(meshrun.SpecError) as e:
            backend().render(make_submission(spec))
        assert e.value.field.startswith(f"backend_options.kubernetes.{field}"), (bad, e.value.field)


def test_missing_image_is_explained(make_submission):
    spec = meshrun.JobSpec(command=["true"])
    with pytest.raises(meshrun.SpecError) as e:
        KubernetesBackend({"namespace": "ml"}).render(make_submission(spec))
    assert e.value.field == "image" and "[backends.kubernetes] image" in str(e.value)
    m, _ = KubernetesBackend({"namespace": "ml"}).render(make_submission(spec.replace(image="python:3.12-slim")))
    assert m.workload["spec"]["template"]["spec"]["containers"][0]["image"] == "python:3.12-slim"


def test_files_are_refused_with_a_reason(make_submission, tmp_path):
    (tmp_path / "data.txt").write_text("x")
    spec = meshrun.JobSpec(command=["true"], files={"data.txt": str(tmp_path / "data.txt")})
    with pytest.raises(meshrun.SpecError) as e:
        backend().render(make_submission(spec))
    assert e.value.field == "files"


def test_secret_size_guard(make_submission):
    def f():
        return None

    spec = meshrun.JobSpec(function=f)
    with pytest.raises(meshrun.SpecError) as e:
        backend().render(make_submission(spec, payload=b"x" * (1024 * 1024)))
    assert e.value.field == "args" and "more than the 1MiB Kubernetes allows in a Secret" in str(e.value)


def test_settings_errors_name_the_key():
    with pytest.raises(meshrun.ConfigError) as e:
        KubernetesBackend({"namespce": "ml"})
    assert "namespace" in str(e.value) and "queue" in str(e.value)
    with pytest.raises(meshrun.ConfigError) as e:
        KubernetesBackend({"gpu_resource": "gpu"})
    assert e.value.field == "backends.kubernetes.gpu_resource"
    # environment variables arrive as text: lists and tables as JSON
    b = KubernetesBackend({"tolerations": '[{"key": "nvidia.com/gpu", "operator": "Exists"}]',
                           "node_selector": '{"pool": "gpu"}', "image_pull_secrets": "a,b", "master_port": "12345"})
    assert b.settings.tolerations[0]["key"] == "nvidia.com/gpu" and b.settings.node_selector == {"pool": "gpu"}
    assert b.settings.image_pull_secrets == ["a", "b"] and b.settings.master_port == 12345


def test_env_variables_configure_the_backend(monkeypatch):
    monkeypatch.setenv("MESHRUN_KUBERNETES_QUEUE", "team-a")
    monkeypatch.setenv("MESHRUN_KUBERNETES_NAMESPACE", "ml")
    meshrun.configure()
    b = meshrun.get_backend("kubernetes")
    assert b.settings.queue == "team-a" and b.settings.namespace == "ml"


def test_user_env_wins_over_the_contract(make_submission):
    spec = meshrun.JobSpec(command=["true"], env={"MASTER_PORT": "1234"})
    m, _, _ = render(spec, make_submission)
    env = [e for e in m.workload["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "MASTER_PORT"]
    assert env == [{"name": "MASTER_PORT", "value": "1234"}]


def test_ttl_and_cluster_domain(make_submission, k8s_valid):
    spec = meshrun.JobSpec(command=["true"], nodes=2, backend_options={"kubernetes": {"ttl_after_finished": None}})
    m, _, _ = render(spec, make_submission, cluster_domain="cluster.local", ttl_after_finished=60)
    assert "ttlSecondsAfterFinished" not in m.workload["spec"]
    assert m.master_addr == f"{m.name}-0.{m.name}.ml.svc.cluster.local"
    m2, _, _ = render(spec.replace(backend_options={}), make_submission, ttl_after_finished=60)
    assert m2.workload["spec"]["ttlSecondsAfterFinished"] == 60
    k8s_valid(m2.workload)


def test_show_native_prints_the_manifests_without_a_cluster(tmp_path, monkeypatch, capsys):
    import yaml

    from meshrun._cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MESHRUN_KUBERNETES_NAMESPACE", "ml")
    (tmp_path / "t.yaml").write_text('resources: {accelerators: L4:1, image_id: "docker:python:3.11-slim"}\n'
                                     "num_nodes: 2\nrun: echo hi\n")
    assert main(["show", "--native", "-b", "kubernetes", "t.yaml"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["Job", "Service"]
    assert docs[0]["spec"]["template"]["spec"]["containers"][0]["image"] == "python:3.11-slim"


DATA_SPEC = dict(inputs={"s3://lab-data/imagenet/": "data/imagenet/"},
                 outputs={"ckpt/": {"destination": "s3://lab-ckpt/run-17/", "on": ["success", "cancel"]}})


def test_data_command_job_runs_under_the_agent_with_the_stager_and_credentials_by_reference(make_submission, golden,
                                                                                            k8s_valid):
    spec = meshrun.JobSpec(command=["python", "train.py", "--data", "data/imagenet"], gpus=1, time_limit=600,
                           name="train", **DATA_SPEC)
    m, files, sub = render(spec, make_submission, data_env_from=["s3-credentials", "configmap/s3-endpoint"])
    secret = mf.render_secret(m, job_id=sub.job_id, files=files)
    for o in (m.workload, secret):
        k8s_valid(o)
    golden("job-data.json", m.workload)
    golden("secret-data.json", secret)
    assert sorted(files) == ["_agent.py", "launch.json", "records.nonce", "stage.py"]
    assert files["stage.py"] == (sub.job_dir / "stage.py").read_bytes()
    launch = json.loads(files["launch.json"])
    assert launch["data"]["inputs"] == [{"source": "s3://lab-data/imagenet/", "path": "data/imagenet/"}]
    assert launch["argv"] == ["python", "train.py", "--data", "data/imagenet"]
    # the agent keeps the time limit (from when the inputs are in place); the Job has no deadline of its own
    assert launch["time_limit"] == 600 and "activeDeadlineSeconds" not in m.workload["spec"]
    c = m.workload["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][:3] == ["python3", "/meshrun/in/_agent.py", "run"]
    assert c["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}, {"configMapRef": {"name": "s3-endpoint"}}]
    # a job option replaces the setting; a job without data gets no envFrom
    opts = {"kubernetes": {"data_env_from": ["other-creds"]}}
    m2, _, _ = render(spec.replace(backend_options=opts), make_submission, data_env_from=["s3-credentials"])
    assert m2.workload["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [
        {"secretRef": {"name": "other-creds"}}]
    plain, files3, _ = render(meshrun.JobSpec(command=["true"]), make_submission, data_env_from=["s3-credentials"])
    assert "envFrom" not in plain.workload["spec"]["template"]["spec"]["containers"][0] and files3 == {}


@pytest.mark.parametrize("value, words", [
    (["Bad_Name"], "DNS-1123 subdomain"),
    (["volume/x"], "configmap/NAME"),
    ("{", "not valid JSON"),
])
def test_data_env_from_is_checked(value, words):
    with pytest.raises(meshrun.ConfigError) as e:
        KubernetesBackend({**BASE, "data_env_from": value}).settings
    assert "data_env_from" in str(e.value) and words in str(e.value)


def test_a_data_job_is_offered_not_refused():
    assert meshrun.Feature.DATA in KubernetesBackend.features
