"""The client layer: a thin seam over the official ``kubernetes`` client (imported here, lazily).

Every call goes through the official client's typed API classes and its REST layer; objects travel as
plain dicts (``_preload_content=False`` and ``json.loads``), so what meshrun reads is exactly what the
API server sent. Errors become :class:`KubeApiError` (a ``meshrun.BackendError``) carrying the HTTP status
and the ``reason`` of the API server's ``Status`` object (``Forbidden``, ``AlreadyExists``, ``NotFound``,
...); a server that cannot be reached becomes ``meshrun.BackendUnavailable``.

The tests replace only the connection pool under the official client's REST layer (``urllib3``) with a
replay of recorded exchanges, so the official client's request building, error handling and response
handling all run as they would against a cluster.
"""

from __future__ import annotations

import codecs
import json
import os
from typing import Any, Iterator, Mapping

import meshrun
import meshrun.backend as mb

SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
KUEUE_GROUP = "kueue.x-k8s.io"
JOBSET_GROUP = "jobset.x-k8s.io"
JOBSET_VERSION = "v1alpha2"
JSON = "application/json"


class KubeApiError(meshrun.BackendError):
    """An API request failed; ``status`` is the HTTP status, ``reason`` the Status object's reason."""

    def __init__(self, what: str, status: int, reason: str, message: str):
        self.status = status
        self.reason = reason
        self.api_message = message
        super().__init__(f"{what}: {status} {reason}: {message}", backend="kubernetes")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


def _translate(what: str, e: BaseException) -> meshrun.BackendError:
    status = getattr(e, "status", None)
    if isinstance(status, int) and status > 0:
        body = getattr(e, "body", None)
        reason = getattr(e, "reason", None) or ""
        message = ""
        try:
            doc = json.loads(body) if body else {}
            if isinstance(doc, dict) and doc.get("kind") == "Status":
                reason = doc.get("reason") or reason
                message = doc.get("message") or ""
        except (TypeError, ValueError):
            message = str(body or "")[:500]
        return KubeApiError(what, status, str(reason), message or str(reason))
    return meshrun.BackendUnavailable(f"{what}: cannot reach the Kubernetes API server: {type(e).__name__}: {e}",
                                      backend="kubernetes")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a request can fail with: the API server's answer (ApiException) or the connection (urllib3, OS)."""
    import urllib3
    from kubernetes.client.exceptions import OpenApiException

    return (OpenApiException, urllib3.exceptions.HTTPError, OSError)


class Kube:
    """The calls meshrun makes, each one request; objects in and out are plain dicts."""

    def __init__(self, api_client: Any, *, namespace: str = "default", timeout: float = 30.0, source: str = ""):
        self.api = api_client
        self.namespace = namespace
        self.timeout = timeout
        self.source = source

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def connect(cls, *, kubeconfig: str | None = None, context: str | None = None, in_cluster: bool | None = None,
                namespace: str | None = None, timeout: float = 30.0) -> "Kube":
        """Load the user's kubeconfig (context selectable) or the in-cluster service account config."""
        path = os.path.expanduser(kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
                                  or "~/.kube/config")
        use_cluster = in_cluster
        if use_cluster is None:
            use_cluster = not os.path.exists(path) and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        if not use_cluster and not os.path.exists(path):
            # decided before importing the client (about a second): `meshrun backends` and placement stay fast
            raise meshrun.BackendUnavailable(
                f"no kubeconfig at {path}" + ("" if in_cluster is False else " and not running inside a pod"),
                backend="kubernetes")
        try:
            from kubernetes import client, config
        except ImportError as e:  # pragma: no cover - a dependency of this distribution
            raise meshrun.BackendUnavailable(
                "the kubernetes Python client is not installed: " + mb.install_hint("kubernetes"),
                backend="kubernetes") from e
        cfg = client.Configuration()
        try:
            if use_cluster:
                config.load_incluster_config(client_configuration=cfg)
                source = "in-cluster service account"
                ns = namespace or _read(SA_NAMESPACE) or "default"
            else:
                config.load_kube_config(config_file=path, context=context, client_configuration=cfg)
                ns = namespace or _context_namespace(path, context) or "default"
                source = f"{path}" + (f" (context {context})" if context else "")
        except Exception as e:  # ConfigException, missing file, bad YAML
            where = "in-cluster config" if use_cluster else f"kubeconfig {path}"
            raise meshrun.BackendUnavailable(f"cannot load the {where}: {e}", backend="kubernetes") from e
        return cls(client.ApiClient(cfg), namespace=ns, timeout=timeout, source=source)

    @property
    def host(self) -> str:
        return str(getattr(self.api.configuration, "host", ""))

    def close(self) -> None:
        try:
            self.api.close()
        except Exception:
            pass

    # ---- plumbing ----------------------------------------------------------------------------------
    def _apis(self) -> Any:
        from kubernetes import client

        return client

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        """One request; the decoded JSON body, or the raw response when ``raw=True``."""
        raw = kw.pop("raw", False)
        kw.setdefault("_preload_content", False)
        if "_request_timeout" not in kw and not raw:
            kw["_request_timeout"] = self.timeout
        try:
            resp = fn(*args, **kw)
        except _transport_errors() as e:
            raise _translate(what, e) from e
        if raw:
            return resp
        data = resp.data
        try:
            return json.loads(data) if data else {}
        except ValueError as e:
            raise meshrun.BackendError(f"{what}: the API server sent something that is not JSON: {data[:200]!r}",
                                       backend="kubernetes") from e

    # ---- workloads ---------------------------------------------------------------------------------
    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        c = self._apis()
        kind = obj["kind"]
        ns = obj["metadata"]["namespace"]
        what = f"create {kind} {ns}/{obj['metadata']['name']}"
        if kind == "Job":
            return self._call(what, c.BatchV1Api(self.api).create_namespaced_job, ns, dict(obj), _headers={"Content-Type": JSON})
        if kind == "Service":
            return self._call(what, c.CoreV1Api(self.api).create_namespaced_service, ns, dict(obj),
                              _headers={"Content-Type": JSON})
        if kind == "Secret":
            return self._call(what, c.CoreV1Api(self.api).create_namespaced_secret, ns, dict(obj), _headers={"Content-Type": JSON})
        if kind == "JobSet":
            return self._call(what, c.CustomObjectsApi(self.api).create_namespaced_custom_object,
                              JOBSET_GROUP, JOBSET_VERSION, ns, "jobsets", dict(obj), _headers={"Content-Type": JSON})
        raise ValueError(f"meshrun does not create {kind} objects")

    def get_workload(self, kind: str, ns: str, name: str) -> dict[str, Any] | None:
        c = self._apis()
        try:
            if kind == "JobSet":
                return self._call(f"get JobSet {ns}/{name}", c.CustomObjectsApi(self.api).get_namespaced_custom_object,
                                  JOBSET_GROUP, JOBSET_VERSION, ns, "jobsets", name)
            return self._call(f"get Job {ns}/{name}", c.BatchV1Api(self.api).read_namespaced_job, name, ns)
        except KubeApiError as e:
            if e.not_found:
                return None
            raise

    def list_workloads(self, kind: str, ns: str, selector: str) -> list[dict[str, Any]]:
        c = self._apis()
        if kind == "JobSet":
            doc = self._call(f"list JobSets in {ns}", c.CustomObjectsApi(self.api).list_namespaced_custom_object,
                             JOBSET_GROUP, JOBSET_VERSION, ns, "jobsets", label_selector=selector)
        else:
            doc = self._call(f"list Jobs in {ns}", c.BatchV1Api(self.api).list_namespaced_job, ns,
                             label_selector=selector)
        return list(doc.get("items") or [])

    def set_suspend(self, kind: str, ns: str, name: str, suspend: bool) -> dict[str, Any]:
        c = self._apis()
        body = {"spec": {"suspend": suspend}}
        if kind == "JobSet":
            return self._call(f"patch JobSet {ns}/{name}",
                              c.CustomObjectsApi(self.api).patch_namespaced_custom_object,
                              JOBSET_GROUP, JOBSET_VERSION, ns, "jobsets", name, body,
                              _content_type="application/merge-patch+json")
        return self._call(f"patch Job {ns}/{name}", c.BatchV1Api(self.api).patch_namespaced_job, name, ns, body)

    def delete(self, kind: str, ns: str, name: str) -> bool:
        """Delete with foreground propagation (the pods go first, then the Job); False if already gone."""
        c = self._apis()
        try:
            if kind == "JobSet":
                self._call(f"delete JobSet {ns}/{name}", c.CustomObjectsApi(self.api).delete_namespaced_custom_object,
                           JOBSET_GROUP, JOBSET_VERSION, ns, "jobsets", name, propagation_policy="Foreground")
            else:
                self._call(f"delete Job {ns}/{name}", c.BatchV1Api(self.api).delete_namespaced_job, name, ns,
                           propagation_policy="Foreground")
        except KubeApiError as e:
            if e.not_found:
                return False
            raise
        return True

    # ---- pods --------------------------------------------------------------------------------------
    def list_pods(self, ns: str, selector: str) -> list[dict[str, Any]]:
        c = self._apis()
        doc = self._call(f"list pods in {ns}", c.CoreV1Api(self.api).list_namespaced_pod, ns, label_selector=selector)
        return list(doc.get("items") or [])

    def pod_log(self, ns: str, pod: str, *, container: str = "job", tail_lines: int | None = None) -> str:
        c = self._apis()
        kw = {"tail_lines": tail_lines} if tail_lines else {}
        resp = self._call(f"read the log of pod {ns}/{pod}", c.CoreV1Api(self.api).read_namespaced_pod_log, pod, ns,
                          container=container, raw=True, _request_timeout=self.timeout, **kw)
        return (resp.data or b"").decode("utf-8", "replace")

    def stream_pod_log(self, ns: str, pod: str, *, container: str = "job") -> Iterator[str]:
        """The pod's log as it grows (``follow=true``), until the container ends."""
        c = self._apis()
        resp = self._call(f"follow the log of pod {ns}/{pod}", c.CoreV1Api(self.api).read_namespaced_pod_log, pod,
                          ns, container=container, follow=True, raw=True)
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            for chunk in resp.stream(65536):
                text = dec.decode(chunk)
                if text:
                    yield text
            rest = dec.decode(b"", final=True)
            if rest:
                yield rest
        except _transport_errors() as e:
            raise _translate(f"follow the log of pod {ns}/{pod}", e) from e
        finally:
            try:
                resp.release_conn()
            except Exception:
                pass

    # ---- Kueue -------------------------------------------------------------------------------------
    def list_kueue_workloads(self, ns: str, version: str, selector: str | None = None) -> list[dict[str, Any]]:
        c = self._apis()
        kw = {"label_selector": selector} if selector else {}
        doc = self._call(f"list Kueue Workloads in {ns}", c.CustomObjectsApi(self.api).list_namespaced_custom_object,
                         KUEUE_GROUP, version, ns, "workloads", **kw)
        return list(doc.get("items") or [])

    def get_local_queue(self, ns: str, name: str, version: str) -> dict[str, Any]:
        c = self._apis()
        return self._call(f"get LocalQueue {ns}/{name}", c.CustomObjectsApi(self.api).get_namespaced_custom_object,
                          KUEUE_GROUP, version, ns, "localqueues", name)

    def get_cluster_queue(self, name: str, version: str) -> dict[str, Any]:
        c = self._apis()
        return self._call(f"get ClusterQueue {name}", c.CustomObjectsApi(self.api).get_cluster_custom_object,
                          KUEUE_GROUP, version, "clusterqueues", name)

    def list_resource_flavors(self, version: str) -> list[dict[str, Any]]:
        c = self._apis()
        doc = self._call("list ResourceFlavors", c.CustomObjectsApi(self.api).list_cluster_custom_object,
                         KUEUE_GROUP, version, "resourceflavors")
        return list(doc.get("items") or [])

    # ---- capacity ----------------------------------------------------------------------------------
    def list_nodes(self) -> list[dict[str, Any]]:
        c = self._apis()
        return list(self._call("list nodes", c.CoreV1Api(self.api).list_node).get("items") or [])

    def list_active_pods(self) -> list[dict[str, Any]]:
        """Pods that hold resources on their nodes (not yet succeeded or failed), in every namespace."""
        c = self._apis()
        doc = self._call("list pods in all namespaces", c.CoreV1Api(self.api).list_pod_for_all_namespaces,
                         field_selector="status.phase!=Succeeded,status.phase!=Failed")
        return list(doc.get("items") or [])

    def served(self, group: str, version: str) -> bool:
        """Whether the API server serves ``group/version`` (for example JobSet's), by API discovery."""
        c = self._apis()
        try:
            self._call(f"discover {group}/{version}", c.CustomObjectsApi(self.api).get_api_resources, group, version)
        except KubeApiError as e:
            if e.not_found:
                return False
            raise
        return True


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _context_namespace(path: str, context: str | None) -> str | None:
    try:
        from kubernetes import config

        contexts, current = config.list_kube_config_contexts(config_file=path)
    except Exception:
        return None
    ctx = current
    if context:
        ctx = next((c for c in contexts if c.get("name") == context), None)
    return ((ctx or {}).get("context") or {}).get("namespace")
