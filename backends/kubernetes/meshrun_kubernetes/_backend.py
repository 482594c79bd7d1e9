"""The Kubernetes backend: batch/v1 Jobs (Indexed Jobs + headless Service, or JobSet, for several nodes),
submitted through Kueue's queues when a queue is configured.

Configuration (``[backends.kubernetes]`` or ``MESHRUN_KUBERNETES_<KEY>``): see ``_settings.py`` and
docs/backends/kubernetes.md. Per job: ``backend_options["kubernetes"]``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import meshrun
import meshrun.backend as mb

from . import _manifests as mf
from ._names import LABEL_VALUE
from ._settings import KubernetesOptions, KubernetesSettings, env_from, load_job_options

F = mb.Feature
S = mb.JobState
SECRET_MAX_BYTES = 1024 * 1024  # the API server refuses Secrets whose data takes more than 1 MiB
STATE_FILE = "kubernetes.json"  # in the local job folder: where the job went, and its result nonce
SELECTOR_CHUNK = 100


class KubernetesBackend(mb.Backend):
    name = "kubernetes"
    features = F.COMMANDS | F.FUNCTIONS | F.GPUS | F.MULTI_NODE | F.LOGS_FOLLOW | F.REATTACH | F.DATA
    install_hint = mb.install_hint("kubernetes")
    poll_interval = (2.0, 30.0)
    settings_model = KubernetesSettings
    options_model = KubernetesOptions

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        self._kube: Any = None
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()

    # ---- the client ---------------------------------------------------------------------------------
    def kube(self) -> Any:
        """The API client (connected on first use: constructors do no I/O)."""
        with self._lock:
            if self._kube is None:
                from ._client import Kube

                s = self.settings
                self._kube = Kube.connect(kubeconfig=s.kubeconfig, context=s.context, in_cluster=s.in_cluster,
                                          namespace=s.namespace, timeout=s.request_timeout)
            return self._kube

    def use_client(self, kube: Any) -> None:
        """Use this client (an already connected ``Kube``) instead of loading the configuration."""
        with self._lock:
            self._kube = kube

    def close(self) -> None:
        with self._lock:
            if self._kube is not None:
                self._kube.close()
                self._kube = None

    # ---- contract -----------------------------------------------------------------------------------
    def check(self) -> mb.Availability:
        import importlib.util

        if importlib.util.find_spec("kubernetes") is None:
            return mb.Availability(False, reason="the kubernetes Python client is not installed",
                                        hint=self.install_hint)
        try:
            k = self.kube()
        except meshrun.MeshrunError as e:
            return mb.Availability(
                False, reason=str(e),
                hint="point [backends.kubernetes] kubeconfig/context at your cluster, or run inside a pod")
        detail = {"api_server": k.host, "namespace": k.namespace, "config": k.source}
        if self.settings.queue:
            detail["queue"] = self.settings.queue
        return mb.Availability(True, detail=detail)

    def target(self, spec: Any, opts: Any = None, offer: mb.Offer | None = None) -> mf.Target:
        """The resolved settings for one job (settings, then the job's options on top)."""
        s = self.settings
        opts = opts if opts is not None else load_job_options(spec)
        image = spec.image or s.image
        if not image:
            raise meshrun.SpecError(
                "image", "the kubernetes backend runs every job in a container: give the job an image "
                         "(image=\"...\", e.g. your training image with python3 and cloudpickle for function "
                         "jobs) or set a default with [backends.kubernetes] image = \"...\"")
        if spec.files:
            raise meshrun.SpecError(
                "files", "the kubernetes backend does not ship files=; put them in the image, or on a volume "
                         "the pods mount")
        namespace = opts.namespace or s.namespace or self.kube().namespace
        queue = opts.queue or s.queue
        products: tuple[str, ...] = ()
        r = spec.resources
        if r.gpus and r.gpu_type:
            if opts.gpu_products:
                products = tuple(opts.gpu_products)
            else:
                for k, v in s.gpu_products.items():
                    if k.lower() == r.gpu_type.lower():
                        products = tuple(v)
                if not products and offer is not None and offer.detail.get("gpu_products"):
                    products = tuple(offer.detail["gpu_products"])
        ttl = s.ttl_after_finished if opts.ttl_after_finished == -1 else opts.ttl_after_finished
        return mf.Target(
            namespace=namespace,
            image=image,
            queue=queue,
            priority_class=opts.priority_class or s.priority_class,
            workload_priority_class=opts.workload_priority_class or s.workload_priority_class,
            multi_node=opts.multi_node or s.multi_node,
            gpu_resource=s.gpu_resource,
            gpu_label=s.gpu_label,
            gpu_products=products,
            node_selector={**s.node_selector, **opts.node_selector},
            tolerations=[*s.tolerations, *opts.tolerations],
            service_account=opts.service_account or s.service_account,
            image_pull_policy=opts.image_pull_policy or s.image_pull_policy,
            image_pull_secrets=tuple(s.image_pull_secrets),
            labels={**s.labels, **opts.labels},
            annotations={**s.annotations, **opts.annotations},
            master_port=s.master_port,
            cluster_domain=s.cluster_domain,
            ttl_after_finished=ttl,
            python=s.python,
            workdir=opts.workdir or s.workdir,
            result_max_bytes=s.result_max_bytes,
            env_from=tuple(env_from(opts.data_env_from if opts.data_env_from is not None else s.data_env_from)),
        )

    def offers(self, spec: Any) -> list[mb.Offer]:
        from . import _offers
        from ._client import KubeApiError

        opts = load_job_options(spec)
        t = self.target(spec, opts)
        r = spec.resources
        base = mb.Offer(
            backend=self.name, where=t.namespace + (f"/{t.queue}" if t.queue else ""), gpus=r.gpus,
            gpu_type=r.gpu_type, cpus=r.cpus, memory=r.memory, nodes=r.nodes,
            expected_start=None, start_note="unknown",
            detail={"namespace": t.namespace},
        )
        if r.nodes > 1 and t.multi_node == "jobset":
            try:
                if not self.kube().served("jobset.x-k8s.io", "v1alpha2"):
                    return [base.rejected("multi_node = \"jobset\" but the cluster does not serve JobSet "
                                          "(jobset.x-k8s.io/v1alpha2 is not installed)")]
            except meshrun.BackendError as e:
                return [base.rejected(f"cannot ask the cluster: {e}")]
        k = None
        try:
            k = self.kube()
            if t.queue:
                v = self.settings.kueue_version
                try:
                    lq = k.get_local_queue(t.namespace, t.queue, v)
                except KubeApiError as e:
                    if e.not_found:
                        return [base.rejected(f"Kueue LocalQueue {t.queue!r} not found in namespace {t.namespace} "
                                              f"(or Kueue {v} is not installed): {e.api_message}")]
                    raise
                cq, flavors, cq_error = None, None, None
                cq_name = (lq.get("spec") or {}).get("clusterQueue")
                try:
                    cq = k.get_cluster_queue(cq_name, v) if cq_name else None
                    if r.gpus and r.gpu_type:
                        flavors = k.list_resource_flavors(v)
                except KubeApiError as e:
                    if e.status not in (403, 404):
                        raise
                    cq_error = f"{e.status} {e.reason}"
                return [_offers.kueue_offer(base, spec, lq=lq, cq=cq, flavors=flavors, gpu_resource=t.gpu_resource,
                                            gpu_label=t.gpu_label, cq_error=cq_error)]
            nodes = k.list_nodes()
            try:
                pods = k.list_active_pods()
            except KubeApiError as e:
                if e.status != 403:
                    raise
                pods = None
            return [_offers.node_offer(base, spec, nodes=nodes, pods=pods, gpu_resource=t.gpu_resource,
                                       gpu_label=t.gpu_label, node_selector=t.node_selector)]
        except KubeApiError as e:
            if e.status == 403 and k is not None and not t.queue:
                return [mb.Offer(**{**_fields(base), "start_note": f"unknown: cannot list nodes ({e.reason})"})]
            return [base.rejected(f"cannot ask the cluster: {e}")]
        except meshrun.BackendError as e:
            return [base.rejected(f"cannot ask the cluster: {e}")]
        except ValueError as e:  # a Kueue object that does not have the documented shape
            return [base.rejected(f"cannot read Kueue's queues: {e}")]

    # ---- rendering ----------------------------------------------------------------------------------
    def render(self, submission: mb.Submission, offer: mb.Offer | None = None,
               *, nonce: str | None = None) -> tuple[mf.Manifests, dict[str, bytes]]:
        """The objects for ``submission`` and, for a job run under the agent (a function or data job), the
        files of its Secret."""
        spec = submission.spec
        t = self.target(spec, None, offer)
        m = mf.render(spec, job_id=submission.job_id, submission_name=submission.name, target=t,
                      attempt=submission.attempt)
        files: dict[str, bytes] = {}
        if mf.runs_agent(spec):
            needed = {"function": "payload.pkl"} if spec.kind == "function" else {}
            if mf.has_data(spec):
                needed["inputs"] = "stage.py"  # the stager, written by the core for a job that moves data
            files = {}
            for field_name, fname in needed.items():
                path = submission.job_dir / fname
                if not path.exists():
                    raise meshrun.SpecError(field_name, f"the job folder has no {fname} ({path})")
                files[fname] = path.read_bytes()
            dist = mf.dist_values(spec, m.master_addr, t.master_port)
            launch = mf.container_launch(submission.launch, spec, dist=dist, t=t)
            files.update({
                "_agent.py": Path(mb.agent_file()).read_bytes(),
                "launch.json": (json.dumps(launch, sort_keys=True) + "\n").encode(),
                mf.NONCE_FILE: (nonce or "").encode(),
            })
            total = sum(len(v) for v in files.values())
            if total > SECRET_MAX_BYTES:  # only a function's payload can grow so large
                size = meshrun.format_size(len(files.get("payload.pkl", b"")))
                raise meshrun.SpecError(
                    "args",
                    f"the pickled function and arguments take {size}; "
                    f"with meshrun's runner the job's Secret would hold {meshrun.format_size(total)}, more than the "
                    f"{meshrun.format_size(SECRET_MAX_BYTES)} Kubernetes allows in a Secret. Pass large data "
                    "through storage the pods can read (a volume, an object store) and send its location instead")
        return m, files

    # ---- submit -------------------------------------------------------------------------------------
    def native(self, submission: mb.Submission, offer: mb.Offer | None = None) -> str:
        """The manifests the API server would get: the workload and, for several nodes, its Service (the
        Secret of a job run under the agent, which holds its pickled payload, is left out)."""
        import yaml

        m, _ = self.render(submission, offer, nonce="0" * 32)
        docs = [m.workload] + ([m.service] if m.service is not None else [])
        return str(yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True))

    def submit(self, submission: mb.Submission, offer: mb.Offer | None = None) -> str:
        from ._client import KubeApiError

        path = submission.job_dir / STATE_FILE
        previous = _read_json(path) or {}
        nonce = previous.get("nonce") or mb.new_nonce()  # a retried submit keeps the pod's nonce
        m, files = self.render(submission, offer, nonce=nonce)
        k = self.kube()
        job_id = submission.job_id
        state = {"backend_id": m.backend_id, "namespace": m.namespace, "name": m.name, "kind": m.kind,
                 # only a job under the agent frames records into its log: a plain command's log has none
                 "nonce": nonce if files else None,
                 "kueue": bool(m.workload["metadata"]["labels"].get(mf.KUEUE_QUEUE))}
        path.write_text(json.dumps(state, sort_keys=True) + "\n")
        os.chmod(path, 0o600)
        try:
            created = k.create(m.workload)
        except KubeApiError as e:
            if not e.conflict:
                raise
            created = k.get_workload(m.kind, m.namespace, m.name)
            owner_id = ((created or {}).get("metadata") or {}).get("labels", {}).get(mf.LABEL_JOB_ID)
            if created is None or owner_id != m.workload["metadata"]["labels"][mf.LABEL_JOB_ID]:
                raise meshrun.BackendError(
                    f"a {m.kind} named {m.namespace}/{m.name} already exists and belongs to another job "
                    f"(meshrun job id label: {owner_id!r})", backend=self.name) from e
        try:
            if files:
                self._create_owned(k, mf.render_secret(m, job_id=job_id, files=files, owner=created))
            if m.service is not None:
                self._create_owned(k, mf.with_owner(m.service, created))
            if not state["kueue"]:
                k.set_suspend(m.kind, m.namespace, m.name, False)
        except meshrun.MeshrunError:
            try:
                k.delete(m.kind, m.namespace, m.name)
            except meshrun.MeshrunError:
                pass
            raise
        return m.backend_id

    @staticmethod
    def _create_owned(k: Any, obj: dict[str, Any]) -> None:
        from ._client import KubeApiError

        try:
            k.create(obj)
        except KubeApiError as e:
            if not e.conflict:
                raise

    # ---- status -------------------------------------------------------------------------------------
    def status(self, ids: Sequence[str]) -> dict[str, mb.JobStatus]:
        from ._status import map_status

        out: dict[str, mb.JobStatus] = {}
        groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for bid in ids:
            try:
                ns, name, kind = mf.parse_backend_id(bid)
            except ValueError as e:
                out[bid] = mb.JobStatus(S.LOST, reason=str(e))
                continue
            groups.setdefault((ns, kind), []).append((bid, name))
        for (ns, kind), members in groups.items():
            try:
                found = self._fetch_group(ns, kind, [n for _, n in members])
            except meshrun.BackendError as e:
                for bid, _ in members:
                    out[bid] = mb.JobStatus(S.UNKNOWN, reason=f"cannot ask the cluster: {e}")
                continue
            objs, pods, workloads, kueue_error = found
            for bid, name in members:
                obj = objs.get(name)
                uid = ((obj or {}).get("metadata") or {}).get("uid")
                queue = (((obj or {}).get("metadata") or {}).get("labels") or {}).get(mf.KUEUE_QUEUE)
                if kueue_error and obj is not None and (obj.get("spec") or {}).get("suspend") and queue:
                    out[bid] = mb.JobStatus(S.PENDING, reason=f"waiting for Kueue admission (its Workload cannot "
                                                                   f"be read: {kueue_error})")
                    continue
                from ._kueue import workload_for

                out[bid] = map_status(obj, pods.get(name, []), workload=workload_for(workloads, uid),
                                      kueue=bool(queue), queue=queue, cancelled=bid in self._cancelled)
        return out

    def _fetch_group(self, ns: str, kind: str, names: list[str]) -> tuple[dict, dict, list, str | None]:
        """The objects, pods and Kueue Workloads of many jobs of one namespace, in a few list calls."""
        from ._client import KubeApiError

        k = self.kube()
        objs: dict[str, dict] = {}
        pods: dict[str, list] = {}
        by_id = {jid: n for n in names if (jid := _job_id(n))}
        odd = [n for n in names if not _job_id(n)]
        ids = sorted(by_id)
        for i in range(0, len(ids), SELECTOR_CHUNK):
            sel = f"{mf.LABEL_JOB_ID} in ({','.join(ids[i:i + SELECTOR_CHUNK])})"
            for o in k.list_workloads(kind, ns, sel):
                if name := (o.get("metadata") or {}).get("name"):
                    objs[name] = o
            for p in k.list_pods(ns, sel):
                jid = ((p.get("metadata") or {}).get("labels") or {}).get(mf.LABEL_JOB_ID)
                if jid in by_id:
                    pods.setdefault(by_id[jid], []).append(p)
        for n in odd:
            o = k.get_workload(kind, ns, n)
            if o is not None:
                objs[n] = o
                jid = ((o.get("metadata") or {}).get("labels") or {}).get(mf.LABEL_JOB_ID)
                if jid:
                    pods[n] = k.list_pods(ns, f"{mf.LABEL_JOB_ID}={jid}")
        workloads: list = []
        kueue_error = None
        if any((o.get("spec") or {}).get("suspend") and ((o.get("metadata") or {}).get("labels") or {}).get(
                mf.KUEUE_QUEUE) for o in objs.values()):
            try:
                workloads = k.list_kueue_workloads(ns, self.settings.kueue_version)
            except KubeApiError as e:
                kueue_error = f"{e.status} {e.reason}: {e.api_message}"
        return objs, pods, workloads, kueue_error

    # ---- cancel, logs, results, find ----------------------------------------------------------------
    def cancel(self, backend_id: str) -> None:
        ns, name, kind = mf.parse_backend_id(backend_id)
        self._cancelled.add(backend_id)
        self.kube().delete(kind, ns, name)

    def _pods(self, backend_id: str) -> tuple[str, list[dict]]:
        ns, name, kind = mf.parse_backend_id(backend_id)
        jid = _job_id(name)
        k = self.kube()
        if jid is None:
            o = k.get_workload(kind, ns, name)
            jid = (((o or {}).get("metadata") or {}).get("labels") or {}).get(mf.LABEL_JOB_ID)
            if not jid:
                return ns, []
        return ns, k.list_pods(ns, f"{mf.LABEL_JOB_ID}={jid}")

    def logs(self, backend_id: str, *, follow: bool = False) -> Iterator[str]:
        from ._status import rank0_pod

        if not follow:
            ns, pods = self._pods(backend_id)
            pod = rank0_pod(pods)
            if pod is None or (pod.get("status") or {}).get("phase") == "Pending":
                return iter(())
            text = self.kube().pod_log(ns, pod["metadata"]["name"], container=mf.CONTAINER)
            return iter([mb.strip_records(text)])
        return self._follow(backend_id, mb.LogFilter())

    def _follow(self, backend_id: str, filt: Any) -> Iterator[str]:
        from ._status import rank0_pod

        seen: set[str] = set()
        delay = 0.5
        while True:
            ns, pods = self._pods(backend_id)
            fresh = [p for p in pods if p["metadata"]["name"] not in seen]
            pod = rank0_pod(fresh)
            if pod is not None and (pod.get("status") or {}).get("phase") != "Pending":
                name = pod["metadata"]["name"]
                seen.add(name)
                if len(seen) > 1:
                    yield f"[meshrun] node 0 restarted as pod {name}\n"
                yield from filt.feed_all(self.kube().stream_pod_log(ns, name, container=mf.CONTAINER))
                delay = 0.5
            st = self.status([backend_id]).get(backend_id)
            if st is not None and st.state.terminal:
                return
            time.sleep(delay)
            delay = min(delay * 1.5, 5.0)

    def fetch_results(self, backend_id: str, job_dir: Path) -> None:
        """Read node 0's pod log: its output becomes ``output.log``, and for a function job the framed records
        become ``exit.json`` and ``result.pkl`` or ``error.json``/``error.pkl`` in ``job_dir``."""
        from ._status import rank0_pod

        job_dir = Path(job_dir)
        state = _read_json(job_dir / STATE_FILE) or {}
        ns, pods = self._pods(backend_id)
        pod = rank0_pod(pods, prefer_phase="Succeeded")
        if pod is None:
            if pods or not state.get("nonce"):
                return
            raise meshrun.BackendError(f"{backend_id}: its pods are gone, so its output and result cannot be read "
                                       "(raise ttl_after_finished to keep finished Jobs longer)", backend=self.name)
        if (pod.get("status") or {}).get("phase") == "Pending":
            return
        tail = mb.frame_lines_max(self.settings.result_max_bytes) + 2000
        text = self.kube().pod_log(ns, pod["metadata"]["name"], container=mf.CONTAINER, tail_lines=tail)
        mb.write_records(job_dir, {"output.log": mb.strip_records(text).encode()}, also=["output.log"])
        nonce = state.get("nonce")
        if not nonce:
            return
        try:
            files = mb.extract_records(text, nonce)
        except mb.RecordError as e:
            raise meshrun.BackendError(f"{backend_id}: pod {pod['metadata']['name']}: {e}", backend=self.name) from e
        if files is None:
            if (pod.get("status") or {}).get("phase") == "Succeeded":
                raise meshrun.BackendError(
                    f"{backend_id}: the log of pod {pod['metadata']['name']} has no records", backend=self.name)
            return
        mb.write_records(job_dir, files)

    def find(self, job_id: str, job_dir: Path | None = None) -> str | None:
        if not LABEL_VALUE.match(job_id or "") or not job_id:
            return None
        k = self.kube()
        ns = self.settings.namespace or k.namespace
        for kind in ("Job", "JobSet"):
            try:
                found = k.list_workloads(kind, ns, f"{mf.LABEL_JOB_ID}={job_id}")
            except meshrun.BackendError:
                if kind == "JobSet":
                    continue
                raise
            if found:
                return mf.backend_id(ns, found[0]["metadata"]["name"], kind)
        return None


def _job_id(name: str) -> str | None:
    """The meshrun job id in a name ``meshrun-<id>`` (the name every job gets), else None."""
    if name.startswith("meshrun-") and LABEL_VALUE.match(name[8:]) and name[8:]:
        return name[8:]
    return None


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _fields(o: mb.Offer) -> dict[str, Any]:
    from dataclasses import fields

    return {f.name: getattr(o, f.name) for f in fields(o)}
