#!/usr/bin/env python3
"""Import every SkyPilot task YAML and dstack task configuration under the given folders, and count.

    python scripts/import_corpus.py PATH [PATH ...] [--json] [--verbose]

For each YAML file: a dstack configuration (it has a ``type``) is read with ``JobSpec.from_dstack_yaml``
(and, when the ``dstack`` package is installed, with dstack's own parser); anything else that looks like a
SkyPilot task is read with SkyPilot's own offline parser (``sky.Task.from_yaml_config``, each document of a
pipeline) and with ``meshrun``'s importer. It prints:

- how many files SkyPilot (or dstack) itself accepts, how many meshrun imports, and the reasons it refuses
  the others (grouped by the field named);
- GPU requests lost: a task SkyPilot/dstack gives accelerators that meshrun's spec has no GPU for, or a GPU
  type SkyPilot would consider that the spec names nowhere. This must be 0;
- for SkyPilot files: whether the task meshrun's SkyPilot backend builds from the spec
  (``build_task(task_config(spec))``) equals SkyPilot's own parse of the original (resources, nodes, envs,
  secrets' names, run, setup).

YAML files that are not task files are counted as "not a task", by what they look like: a SkyPilot spec
without ``run`` (a pool for ``sky jobs pool apply``, a service for ``sky serve up``, or only a cluster's
``setup`` for ``sky launch``: SkyPilot parses it, there is no job to run), a fragment of task fields with nothing to run, a SkyPilot volume spec, a SkyPilot config (``~/.sky/config.yaml``, admin policies), a Kubernetes manifest, another
tool's config (Helm values, training recipes, ...), or a dstack configuration of another ``type``.

Null envs get a placeholder value (as ``--env NAME=...`` would give them); paths are not checked. The
checks are the ones tests/test_jobfiles.py runs over the vendored sample in tests/data/jobfiles/.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
for sub in ("", "backends/skypilot", "backends/dstack"):
    p = str(HERE / sub) if sub else str(HERE)
    if p not in sys.path:
        sys.path.insert(0, p)

import yaml  # noqa: E402

import meshrun  # noqa: E402
from meshrun._dstackyaml import is_dstack_config, spec_from_dstack_config  # noqa: E402
from meshrun._taskyaml import (  # noqa: E402
    TASK_KEYS, skypilot_only, spec_from_task_config, split_documents, task_documents,
)

PLACEHOLDER = "placeholder"


def yaml_files(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(p)
        else:
            out.extend(sorted(f for f in p.rglob("*") if f.suffix in (".yaml", ".yml") and f.is_file()
                              and ".git" not in f.parts))
    return out


def load(path: Path) -> list[Any] | None:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return None
    return docs or None


def looks_like_skypilot(docs: list[Any]) -> bool:
    tasks = _task_docs(docs)
    return all(isinstance(d, dict) and d and set(d) <= set(TASK_KEYS) | {"_metadata"} for d in tasks) and any(
        "run" in d or "setup" in d or "resources" in d for d in tasks)


#: top-level keys of SkyPilot's own config files (``~/.sky/config.yaml``, ``.sky.yaml``, admin policy configs)
SKY_CONFIG_KEYS = frozenset((
    "api_server", "jobs", "serve", "allowed_clouds", "workspaces", "admin_policy", "kubernetes", "aws", "gcp",
    "azure", "nebius", "oci", "docker", "nvidia_gpus", "ssh", "slurm", "provision", "daemons", "db", "logs",
    "rbac", "active_workspace", "lambda", "runpod", "vast", "fluidstack", "cudo", "ibm", "scp", "vsphere",
))


#: keys of a SkyPilot volume spec (``sky volumes apply``)
SKY_VOLUME_KEYS = frozenset(("name", "type", "infra", "size", "config", "labels", "use_existing", "resource_name"))


def not_a_task(docs: list[Any] | None) -> str | None:
    """What a YAML file that is not a task file looks like (None for a SkyPilot task or a dstack config)."""
    if docs is None:
        return "not YAML"
    first = docs[0]
    if (len(docs) == 1 and isinstance(first, dict) and "size" in first
            and set(first) <= SKY_VOLUME_KEYS and str(first.get("type", "")).endswith(("pvc", "volume"))):
        return "SkyPilot volume spec"  # ``sky volumes apply`` input; its ``type`` is not a dstack one
    if len(docs) == 1 and is_dstack_config(docs[0]):
        return None
    if looks_like_skypilot(docs):
        tasks = _task_docs(docs)
        if all(d.get("run") is None for d in tasks):
            return "SkyPilot spec without run (a pool, a service or a cluster's set-up)"
        return None
    if all(isinstance(d, dict) and d and set(d) <= set(TASK_KEYS) for d in _task_docs(docs)):
        return "SkyPilot task fragment without run"
    if isinstance(first, dict) and "apiVersion" in first and "kind" in first:
        return "Kubernetes manifest"
    if isinstance(first, dict) and first and set(first) <= SKY_CONFIG_KEYS:
        return "SkyPilot config"
    return "other YAML (another tool's config)"


def _null_envs(doc: Any) -> dict[str, str]:
    envs = doc.get("envs") if isinstance(doc, dict) else None
    return {k: PLACEHOLDER for k, v in (envs or {}).items() if v is None} if isinstance(envs, dict) else {}


def _task_docs(docs: list[Any]) -> list[Any]:
    """The task documents (after a pipeline's or a job group's header, by SkyPilot's rules)."""
    return split_documents(docs)[1]


def sky_parse(path: Path, docs: list[Any]) -> list[Any]:
    """SkyPilot's own offline reading of a file's tasks (its DAG loader: a pipeline or a job group, by its
    own header rules); raises what SkyPilot raises for a file it refuses."""
    from sky.utils import dag_utils

    env = sorted({k: v for d in docs for k, v in _null_envs(d).items()}.items())
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return list(dag_utils.load_dag_from_yaml_str(path.read_text(encoding="utf-8"), env_overrides=env or None).tasks)


def sky_view(task: Any) -> dict[str, Any]:
    return {
        "resources": sorted(str(r) for r in task.resources),
        "num_nodes": task.num_nodes,
        "envs": dict(task.envs),
        "secrets": sorted(task.secrets),
        "run": task.run,
        "setup": task.setup,
    }


def gpu_names(task: Any) -> set[str]:
    names = set()
    for r in task.resources:
        for name in (r.accelerators or {}):
            names.add(name.lower())
    return names


def spec_gpu_names(spec: Any) -> set[str]:
    r = spec.resources
    names = {a.rsplit(":", 1)[0].lower() for a in r.gpu_alternatives}
    if r.gpu_type:
        names.add(r.gpu_type.lower())
    return names


def check_skypilot(path: Path, docs: list[Any], compare: bool = True, sky: bool = True) -> dict[str, Any]:
    res: dict[str, Any] = {"file": str(path), "kind": "skypilot", "tasks": len(_task_docs(docs))}
    tasks = []
    try:
        tasks = sky_parse(path, docs) if sky else []
        res["sky"] = "accepted" if sky else "not asked"
    except Exception as e:  # SkyPilot's own verdict
        res["sky"] = f"refused: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]
    specs = []
    try:
        task_documents(docs, str(path))  # a job group (tasks at the same time) is refused
        for d in _task_docs(docs):
            specs.append(spec_from_task_config(d, env=_null_envs(d), source=str(path)))
        res["meshrun"] = "imported"
        res["gpus"] = [s.resources.gpu_request for s in specs]
        res["gpu_alternatives"] = [list(s.resources.gpu_alternatives) for s in specs]
    except meshrun.SpecError as e:
        res["meshrun"] = f"refused: {e.field}"
        res["reason"] = str(e)
        return res
    only = [why for why in map(skypilot_only, specs) if why]
    if only:  # GPUs only its instance type names, which meshrun's catalog does not list: other backends refuse it
        res["skypilot_only"] = only
    if res["sky"] != "accepted":
        return res
    try:  # an instance_type's accelerators come from SkyPilot's catalog, which it may have to download
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            wants = [gpu_names(t) for t in tasks]
    except Exception as e:
        res["translation"] = (f"not comparable: SkyPilot could not tell the task's accelerators offline "
                              f"({type(e).__name__}; an instance_type needs its catalog)")
        return res
    lost = []
    for want, s in zip(wants, specs):
        if want and not s.resources.gpus and skypilot_only(s):
            pass  # other backends refuse it, saying why: nothing is lost
        elif want and not s.resources.gpus:
            lost.append("all GPUs")
        elif want - spec_gpu_names(s):
            lost.append(", ".join(sorted(want - spec_gpu_names(s))))
    if lost:
        res["gpus_lost"] = lost
    if compare:
        from meshrun_skypilot import _task

        def submitted(spec: Any) -> dict[str, Any]:
            # the backend submits the secrets' values (a null one resolved at submit; SkyPilot drops a null
            # one from its own parse too); task_config, the form meshrun shows, writes their names only
            cfg = _task.task_config(spec)
            if spec.secrets:
                cfg["secrets"] = dict(spec.secrets)
            return cfg

        try:
            ours = [sky_view(_task.build_task(submitted(s))) for s in specs]
            theirs = [sky_view(t) for t in tasks]
            res["translation"] = "equal" if ours == theirs else "differs"
            if ours != theirs:
                res["difference"] = [k for k in ours[0] if any(o[k] != t[k] for o, t in zip(ours, theirs))]
        except meshrun.SpecError as e:
            res["translation"] = f"not comparable: {e}"[:200]
        except Exception as e:  # SkyPilot shows an instance_type's resources from its catalog (a download)
            res["translation"] = (f"not comparable: SkyPilot could not show the task's resources offline "
                                  f"({type(e).__name__}; an instance_type needs its catalog)")
    return res


def check_dstack(path: Path, doc: Any) -> dict[str, Any]:
    res: dict[str, Any] = {"file": str(path), "kind": f"dstack {doc.get('type')}"}
    if doc.get("type") != "task":
        res["meshrun"] = "not a task"
        return res
    try:
        from dstack._internal.core.models.configurations import parse_run_configuration

        parse_run_configuration(dict(doc))
        res["dstack"] = "accepted"
    except ImportError:
        res["dstack"] = "not installed"
    except Exception as e:
        res["dstack"] = f"refused: {type(e).__name__}"
    env = {}
    raw = doc.get("env")
    if isinstance(raw, list):
        env = {str(x): PLACEHOLDER for x in raw if isinstance(x, str) and "=" not in x}
    try:
        spec = spec_from_dstack_config(doc, base_dir=str(path.parent), source=str(path), env=env)
        res["meshrun"] = "imported"
        res["gpus"] = [spec.resources.gpu_request]
    except meshrun.SpecError as e:
        res["meshrun"] = f"refused: {e.field}"
        res["reason"] = str(e)
        return res
    gpu = (doc.get("resources") or {}).get("gpu")
    if gpu not in (None, 0, "0") and not spec.resources.gpus:
        res["gpus_lost"] = ["all GPUs"]
    return res


def check_file(path: Path, compare: bool = True, sky: bool = True) -> dict[str, Any]:
    """The checks of one file (for a YAML file that is neither a SkyPilot task nor a dstack configuration:
    ``kind`` "not a task" and ``what`` it looks like). ``sky=False`` leaves SkyPilot's own parse (and so the
    comparison) out."""
    docs = load(path)
    other = not_a_task(docs)
    if other is not None or docs is None:
        return {"file": str(path), "kind": "not a task", "what": other, "meshrun": "not a task"}
    if len(docs) == 1 and is_dstack_config(docs[0]):
        return check_dstack(path, docs[0])
    return check_skypilot(path, docs, compare and sky, sky)


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    sky = [r for r in results if r["kind"] == "skypilot"]
    dst = [r for r in results if r["kind"] == "dstack task"]
    refused = collections.Counter(r["meshrun"] for r in results if r["meshrun"].startswith("refused"))
    other = collections.Counter(r["what"] for r in results if r["kind"] == "not a task")
    return {
        "yaml_files_read": len(results),
        "not_a_task": dict(other.most_common()),
        "skypilot_files": len(sky),
        "skypilot_accepted_by_skypilot": sum(r["sky"] == "accepted" for r in sky),
        "skypilot_refused_by_skypilot": dict(collections.Counter(
            r["sky"][len("refused: "):][:120] for r in sky if r["sky"].startswith("refused")).most_common()),
        "skypilot_imported": sum(r["meshrun"] == "imported" for r in sky),
        "skypilot_accepted_but_refused_by_meshrun": dict(collections.Counter(
            r["meshrun"] for r in sky if r["sky"] == "accepted" and r["meshrun"] != "imported").most_common()),
        "skypilot_gpus_only_skypilot_can_honour": sum(bool(r.get("skypilot_only")) for r in sky),
        "skypilot_translation_equal": sum(r.get("translation") == "equal" for r in sky),
        "skypilot_translation_differs": sum(r.get("translation") == "differs" for r in sky),
        "skypilot_not_comparable": sum(str(r.get("translation", "")).startswith("not comparable") for r in sky),
        "dstack_tasks": len(dst),
        "dstack_imported": sum(r["meshrun"] == "imported" for r in dst),
        "dstack_other_types": sum(r["kind"].startswith("dstack") and r["kind"] != "dstack task" for r in results),
        "refused_by_field": dict(refused.most_common()),
        "gpus_lost": sum(bool(r.get("gpus_lost")) for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="folders (or files) to read, e.g. a checkout's examples/ and llm/")
    ap.add_argument("--json", action="store_true", help="print every file's result as JSON lines, then the counts")
    ap.add_argument("--verbose", "-v", action="store_true", help="print each refusal and difference")
    ap.add_argument("--no-compare", action="store_true", help="skip building SkyPilot tasks from the specs")
    a = ap.parse_args(argv)
    results = []
    for f in yaml_files(a.paths):
        if f.suffix not in (".yaml", ".yml"):
            continue
        r = check_file(f, compare=not a.no_compare)
        results.append(r)
        if a.json:
            print(json.dumps(r))
        elif a.verbose and (r["meshrun"] not in ("imported", "not a task") or r.get("gpus_lost")
                            or r.get("translation", "equal") != "equal" or str(r.get("sky", "")).startswith("refused")):
            print(f"{r['file']}: {r['meshrun']} {r.get('reason', '')} {r.get('gpus_lost', '')} "
                  f"{r.get('difference', '')} {r.get('sky', '') if r.get('sky') != 'accepted' else ''} "
                  f"{r.get('translation', '') if r.get('translation', 'equal') != 'equal' else ''}".rstrip())
    counts = summarize(results)
    print(json.dumps(counts, indent=2))
    return 1 if counts["gpus_lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
