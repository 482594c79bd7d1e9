"""Fixtures of the Kubernetes backend's tests.

No API server can run here. Instead:

* ``k8s_valid`` validates an object against the official Kubernetes JSON schemas (kubernetes-validate,
  the newest Kubernetes version it bundles, strict: unknown fields are errors) and the API server's
  rules for names, labels and annotations;
* ``golden`` compares an object with a file under tests/golden/ (``MESHRUN_UPDATE_GOLDEN=1`` rewrites it);
* ``replay`` builds the backend's client on the official ``kubernetes`` client with one thing replaced:
  the urllib3 connection pool under its REST layer, which answers from recorded exchanges in
  tests/exchanges/ (request method, path, query and body; response status, headers and body as an API
  server sends them) and fails the test on any request the recording does not expect.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
EXCHANGES = HERE / "exchanges"
K8S_VERSION = None  # the newest version kubernetes-validate bundles (resolved on first use)


def k8s_version() -> str:
    global K8S_VERSION
    if K8S_VERSION is None:
        from kubernetes_validate import utils

        K8S_VERSION = utils.latest_version()
    return K8S_VERSION


def validate_object(obj: dict[str, Any]) -> str:
    """Validate ``obj`` (a core Kubernetes kind) against the official schemas; returns the version used."""
    import kubernetes_validate

    from meshrun_kubernetes._names import metadata_problems, name_problem

    version = kubernetes_validate.validate(obj, k8s_version(), strict=True)
    meta = obj["metadata"]
    problems = metadata_problems(meta)
    label_name = obj["kind"] in ("Service", "Job")  # Services, and Jobs whose pods need host names
    p = name_problem(meta["name"], label=label_name)
    if p:
        problems.append(f"name {meta['name']!r}: {p}")
    tmpl = ((obj.get("spec") or {}).get("template") or {}).get("metadata")
    if tmpl:
        problems += [f"pod template: {x}" for x in metadata_problems(tmpl)]
    assert not problems, problems
    return version


def validate_any(obj: dict[str, Any]) -> list[str]:
    """Validate every core object in ``obj``: a JobSet's Job templates are validated as batch/v1 Jobs."""
    if obj["kind"] == "JobSet":
        out = []
        problems = []
        from meshrun_kubernetes._names import metadata_problems

        problems += metadata_problems(obj["metadata"])
        assert not problems, problems
        for rj in obj["spec"]["replicatedJobs"]:
            job = {"apiVersion": "batch/v1", "kind": "Job",
                   "metadata": {"name": f"{obj['metadata']['name']}-{rj['name']}-0", **rj["template"]["metadata"]},
                   "spec": rj["template"]["spec"]}
            out.append(validate_object(job))
        return out
    return [validate_object(obj)]


@pytest.fixture
def k8s_valid():
    return validate_any


def _normalise_secret(obj: dict[str, Any]) -> dict[str, Any]:
    """Secrets carry the agent file and the payload: golden files keep their keys, not their bytes."""
    if obj.get("kind") != "Secret":
        return obj
    out = json.loads(json.dumps(obj))
    out["data"] = {k: "<base64>" for k in out.get("data", {})}
    return out


@pytest.fixture
def golden():
    def check(name: str, obj: Any) -> None:
        path = GOLDEN / name
        obj = _normalise_secret(obj) if isinstance(obj, dict) else obj
        text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        if os.environ.get("MESHRUN_UPDATE_GOLDEN") or not path.exists():
            if not os.environ.get("MESHRUN_UPDATE_GOLDEN") and os.environ.get("CI"):
                raise AssertionError(f"missing golden file {path}")
            path.write_text(text)
        assert json.loads(path.read_text()) == json.loads(text), f"{name} differs from its golden file"

    return check


# ---- recorded exchanges -----------------------------------------------------------------------------


def _load(ref: Any) -> Any:
    """Resolve {"$file": "objects/x.json"} and {"$golden": "x.json"} references in a recording."""
    if isinstance(ref, dict) and set(ref) == {"$file"}:
        return json.loads((EXCHANGES / ref["$file"]).read_text())
    if isinstance(ref, dict) and set(ref) == {"$golden"}:
        return json.loads((GOLDEN / ref["$golden"]).read_text())
    return ref


def _subset(want: Any, got: Any, path: str = "") -> list[str]:
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{path or '.'}: expected an object, got {got!r}"]
        out = []
        for k, v in want.items():
            if k not in got:
                out.append(f"{path}.{k}: missing")
            else:
                out += _subset(v, got[k], f"{path}.{k}")
        return out
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [p for i, (w, g) in enumerate(zip(want, got)) for p in _subset(w, g, f"{path}[{i}]")]
    return [] if want == got else [f"{path or '.'}: expected {want!r}, got {got!r}"]


class Replay:
    """A urllib3 pool manager that answers from a recording and checks each request against it."""

    def __init__(self, exchanges: list[dict[str, Any]], name: str):
        self.exchanges = list(exchanges)
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self.pos = 0

    def request(self, method: str, url: str, body: Any = None, fields: Any = None, headers: Any = None, **kw: Any):
        import urllib3

        parts = urlsplit(url)
        query = {k: v[0] if len(v) == 1 else v for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        sent = json.loads(body) if body else None
        self.requests.append({"method": method, "path": parts.path, "query": query, "body": sent,
                              "headers": dict(headers or {})})
        if self.pos >= len(self.exchanges):
            raise AssertionError(f"{self.name}: unexpected request {method} {parts.path}?{parts.query} "
                                 f"(the recording has {len(self.exchanges)} exchanges)")
        ex = self.exchanges[self.pos]
        self.pos += 1
        req = ex["request"]
        where = f"{self.name} exchange {self.pos}"
        if "path_re" in req:  # exchanges written for a job id only known at run time
            import re

            assert method == req["method"] and re.fullmatch(req["path_re"], parts.path), \
                f"{where}: expected {req['method']} {req['path_re']}, got {method} {parts.path}"
        else:
            assert method == req["method"] and parts.path == req["path"], \
                f"{where}: expected {req['method']} {req['path']}, got {method} {parts.path}"
        if "query_re" in req:
            import re

            for k, v in req["query_re"].items():
                assert re.fullmatch(v, str(query.get(k, ""))), f"{where}: query {k}={query.get(k)!r} !~ {v}"
        else:
            assert query == req.get("query", {}), f"{where}: query {query} != recorded {req.get('query', {})}"
        if "body" in req:
            want = _load(req["body"])
            assert sent == want, f"{where}: the request body differs from the recording:\n" \
                                 f"{json.dumps(sent, indent=1, sort_keys=True)[:3000]}"
        elif "body_match" in req:
            problems = _subset(_load(req["body_match"]), sent)
            assert not problems, f"{where}: {problems}"
        else:
            assert sent is None, f"{where}: unexpected request body {sent!r}"
        resp = ex["response"]
        if callable(resp):
            resp = resp(self.requests[-1])
        rbody = _load(resp.get("body", ""))
        if isinstance(rbody, (dict, list)):
            data = json.dumps(rbody).encode()
            ctype = "application/json"
        else:
            data = str(rbody).encode()
            ctype = "text/plain"
        hdrs = {"Content-Type": ctype, "Audit-Id": "2f1f7d1c-5b7e-4b8a-9a51-0c6f4d2e9b11",
                **(resp.get("headers") or {})}
        return urllib3.HTTPResponse(body=io.BytesIO(data), status=resp["status"],
                                    reason=resp.get("reason") or _REASONS.get(resp["status"], ""),
                                    headers=hdrs, preload_content=False)

    def clear(self) -> None:
        pass

    def done(self) -> None:
        assert self.pos == len(self.exchanges), \
            f"{self.name}: {len(self.exchanges) - self.pos} recorded exchange(s) were never requested"


_REASONS = {200: "OK", 201: "Created", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 409: "Conflict", 422: "Unprocessable Entity", 500: "Internal Server Error"}


def load_recording(name: str) -> dict[str, Any]:
    return json.loads((EXCHANGES / name).read_text())


@pytest.fixture
def replay():
    """``replay("submit-single.json")`` -> (Kube client on the official client, the replaying transport)."""
    made: list[Replay] = []

    def make(recording: str | list[dict[str, Any]], *, namespace: str = "ml"):
        from kubernetes import client

        from meshrun_kubernetes._client import Kube

        if isinstance(recording, str):
            doc = load_recording(recording)
            exchanges, name = doc["exchanges"], recording
        else:
            exchanges, name = recording, "inline recording"
        cfg = client.Configuration()
        cfg.host = "https://k8s.lab.example:6443"
        api = client.ApiClient(cfg)
        r = Replay(exchanges, name)
        api.rest_client.pool_manager = r
        made.append(r)
        return Kube(api, namespace=namespace, timeout=5.0, source="recorded exchanges"), r

    yield make
    for r in made:
        r.done()


@pytest.fixture
def make_submission(tmp_path):
    """A ``meshrun.Submission`` for a spec, with its job folder (and a payload for function jobs), built
    the way the core builds them."""
    import meshrun

    def make(spec: Any, job_id: str = "0a1b2c3d4e5f", payload: bytes | None = None) -> Any:
        job_dir = tmp_path / "jobs" / job_id
        job_dir.mkdir(parents=True, exist_ok=True)
        launch: dict[str, Any] = {
            "job_id": job_id, "name": spec.display_name, "kind": spec.kind, "env": dict(spec.env),
            "cwd": "/home/someone/project", "setup": list(spec.setup), "gpus": spec.resources.gpus,
            "gpu_type": spec.resources.gpu_type, "nodes": spec.resources.nodes, "time_limit": spec.time_limit,
        }
        if spec.kind == "function":
            launch["payload"] = "payload.pkl"
            launch["sys_path"] = ["/home/someone/project"]
            (job_dir / "payload.pkl").write_bytes(payload if payload is not None else b'{"python": "3.11"}\nx')
        elif isinstance(spec.command, str):
            launch["shell"], launch["argv"] = spec.command, None
        else:
            launch["argv"] = list(spec.command)
        if spec.inputs or spec.outputs:  # a job that moves data: launch.json's "data" and the stager
            launch["data"] = {"inputs": [i.model_dump() for i in spec.inputs],
                              "outputs": [{**o.model_dump(), "on": list(o.on)} for o in spec.outputs]}
            stager = Path(meshrun.__file__).with_name("_stage.py")
            (job_dir / "stage.py").write_bytes(stager.read_bytes())
        (job_dir / "launch.json").write_text(json.dumps(launch))
        return meshrun.Submission(job_id=job_id, job_dir=job_dir, spec=spec, launch=launch)

    return make
