"""check -> offers -> rank -> submit: the path from a spec to a running job, with failover."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ._backend import JobState, Offer, Submission
from ._errors import BackendError, MeshrunError, NoPlacementError, SpecError
from ._job import Job
from ._spec import JobSpec
from ._store import JobRecord, Store, get_store, new_job_id


def build_launch(spec: JobSpec, job_id: str, *, cwd: str) -> dict[str, Any]:
    """The launch description the host agent reads (``launch.json``): plain JSON, no pydantic."""
    launch: dict[str, Any] = {
        "job_id": job_id,
        "name": spec.display_name,
        "kind": spec.kind,
        "env": dict(spec.env),
        "cwd": cwd,
        "setup": list(spec.setup),
        "gpus": spec.resources.gpus,
        "gpu_type": spec.resources.gpu_type,
        "nodes": spec.resources.nodes,
        "time_limit": spec.time_limit,
    }
    if spec.kind == "function":
        launch["payload"] = "payload.pkl"
        launch["sys_path"] = [p for p in sys.path if p and os.path.isabs(p)]
    elif isinstance(spec.command, str):
        launch["shell"] = spec.command
        launch["argv"] = None
    else:
        launch["argv"] = list(spec.command or [])
    return launch


def _check_files(spec: JobSpec, cwd: str) -> None:
    for dst, src in spec.files.items():
        path = src if os.path.isabs(src) else os.path.join(cwd, src)
        if not os.path.exists(path):
            raise SpecError(f"files.{dst}", f"the source {src!r} does not exist (looked at {path})")


def place_files_locally(spec: JobSpec, cwd: str) -> None:
    """Local and shared-filesystem backends: copy ``files`` to their targets (relative to ``cwd``)."""
    for dst, src in spec.files.items():
        s = os.path.realpath(src if os.path.isabs(src) else os.path.join(cwd, src))
        d = os.path.realpath(dst if os.path.isabs(dst) else os.path.join(cwd, dst))
        if s == d:
            continue
        os.makedirs(os.path.dirname(d) or ".", exist_ok=True)
        if os.path.isdir(s):
            shutil.copytree(s, d, dirs_exist_ok=True)
        else:
            shutil.copy2(s, d)


class Prepared:
    """A job recorded in the store, with its folder and launch description, not yet submitted."""

    def __init__(self, record: JobRecord, submission: Submission):
        self.record = record
        self.submission = submission


def prepare(
    spec: JobSpec,
    *,
    store: Store,
    backend: str,
    array_id: str | None = None,
    array_index: int | None = None,
) -> Prepared:
    cwd = os.path.abspath(spec.workdir or os.getcwd())
    if spec.workdir is not None and not os.path.isdir(cwd):
        raise SpecError("workdir", f"{spec.workdir!r} is not a directory")
    _check_files(spec, cwd)
    files: dict[str, bytes] = {}
    job_id = new_job_id()
    if spec.kind == "function":
        from ._payload import dumps

        fn = spec.resolve_function()
        files["payload.pkl"] = dumps(fn, spec.args, spec.kwargs)
    launch = build_launch(spec, job_id, cwd=cwd)
    files["spec.json"] = spec.to_json().encode()
    files["launch.json"] = (json.dumps(launch, sort_keys=True) + "\n").encode()
    rec = store.create(
        job_id=job_id,
        name=spec.display_name,
        kind=spec.kind,
        summary=spec.summary(),
        backend=backend,
        array_id=array_id,
        array_index=array_index,
        files=files,
    )
    sub = Submission(job_id=job_id, job_dir=store.job_dir(job_id), spec=spec, launch=launch)
    return Prepared(rec, sub)


def choose(spec: JobSpec, backend: str | None = None, **plan_kwargs: Any) -> tuple[str, Offer | None, Any]:
    """Which backend and offer to use: the one named (argument, spec, config default), else the plan's
    choice. Returns (backend name, offer or None, plan or None)."""
    from ._config import get_config
    from ._registry import get_backend

    name = backend or spec.backend or get_config().default_backend
    if name:
        b = get_backend(name)
        offers = b.offers(spec)
        fitting = [o for o in offers if o.fits]
        if not fitting:
            reasons = [f"{o.key}: {o.reason}" for o in offers] or [f"{name}: no offers"]
            raise NoPlacementError(f"the {name} backend cannot run {spec.display_name!r}", reasons)
        return name, fitting[0], None
    from ._placement import plan as make_plan

    p = make_plan(spec, **plan_kwargs)
    return p.chosen.backend, p.chosen, p


def submit(spec: JobSpec, *, backend: str | None = None, store: Store | None = None, **plan_kwargs: Any) -> Job:
    """Place and submit one job; returns its :class:`Job` at once."""
    if not isinstance(spec, JobSpec):
        raise SpecError("", f"expected a meshrun.JobSpec, got {type(spec).__name__}")
    store = store or get_store()
    name, offer, plan = choose(spec, backend, **plan_kwargs)
    prepared = prepare(spec, store=store, backend=name)
    if plan is not None:
        store.add_event(prepared.record.id, "placed", offer=plan.chosen.key, why=plan.explain_choice())
    _submit_with_failover(prepared, store, name, offer, plan)
    return Job(prepared.record.id, store=store)


def _submit_with_failover(prepared: Prepared, store: Store, name: str, offer: Offer | None, plan: Any) -> None:
    from ._registry import get_backend

    candidates: list[Offer | None] = [offer]
    if plan is not None:
        candidates = list(plan.ranked)
    errors = []
    job_id = prepared.record.id
    for attempt, cand in enumerate(candidates, start=1):
        bname = cand.backend if cand is not None else name
        try:
            b = get_backend(cand.launcher or bname) if cand is not None and cand.launcher else get_backend(bname)
            bname = b.name or bname
            store.update(job_id, backend=bname, attempt=attempt)
            prepared.submission.attempt = attempt
            if b.name == "local" or getattr(b, "shared_filesystem", False):
                place_files_locally(prepared.submission.spec, prepared.submission.launch["cwd"])
            bid = b.submit(prepared.submission, cand)
        except MeshrunError as e:
            errors.append(f"{cand.key if cand else bname}: {e}")
            store.add_event(job_id, "submit_failed", backend=bname, offer=cand.key if cand else None, error=str(e))
            if plan is None:
                store.update(job_id, state=JobState.FAILED, reason=f"submit failed: {e}", ended_at=time.time())
                raise
            continue
        except Exception as e:  # a backend bug must not leave the job half-recorded
            errors.append(f"{cand.key if cand else bname}: {type(e).__name__}: {e}")
            store.add_event(job_id, "submit_failed", backend=bname, error=f"{type(e).__name__}: {e}")
            if plan is None:
                store.update(job_id, state=JobState.FAILED, reason=f"submit failed: {e}", ended_at=time.time())
                raise BackendError(f"submit failed: {type(e).__name__}: {e}", backend=bname) from e
            continue
        store.update(job_id, backend=bname, backend_id=bid, state=JobState.PENDING, submitted_at=time.time())
        store.add_event(job_id, "submitted", backend=bname, backend_id=bid, offer=cand.key if cand else None)
        return
    store.update(job_id, state=JobState.FAILED, reason="every offer failed to submit", ended_at=time.time())
    raise NoPlacementError(f"every offer failed to submit job {job_id}", errors)


def submit_many(
    specs: Sequence[JobSpec], *, backend: str | None = None, store: Store | None = None, **plan_kwargs: Any
) -> list[Job]:
    """Submit jobs of one shape together: one placement, and one native array where the backend has one."""
    from ._backend import Feature
    from ._registry import get_backend

    if not specs:
        return []
    store = store or get_store()
    name, offer, plan = choose(specs[0], backend, **plan_kwargs)
    b = get_backend(offer.launcher or name) if offer is not None and offer.launcher else get_backend(name)
    array_id = new_job_id()
    prepared = [prepare(s, store=store, backend=b.name, array_id=array_id, array_index=i) for i, s in enumerate(specs)]
    if b.name == "local" or getattr(b, "shared_filesystem", False):
        for p in prepared:
            place_files_locally(p.submission.spec, p.submission.launch["cwd"])
    try:
        if Feature.ARRAYS in b.features:
            ids = b.submit_array([p.submission for p in prepared], offer)
        else:
            ids = [b.submit(p.submission, offer) for p in prepared]
    except Exception as e:
        for p in prepared:
            rec = store.get(p.record.id)
            if rec.backend_id is None:
                store.update(p.record.id, state=JobState.FAILED, reason=f"submit failed: {e}", ended_at=time.time())
        raise
    now = time.time()
    for p, bid in zip(prepared, ids):
        store.update(p.record.id, backend_id=bid, state=JobState.PENDING, submitted_at=now)
        store.add_event(p.record.id, "submitted", backend=b.name, backend_id=bid, array=array_id)
    return [Job(p.record.id, store=store) for p in prepared]


def run(command: Any = None, /, **fields: Any) -> Job:
    """Submit a command job: ``meshrun.run(["python", "train.py"], gpus=2, name="train")``.

    ``command`` is an argv list (run without a shell) or a string (run by ``bash -c``); the other keywords
    are :class:`JobSpec` fields; ``backend=`` names where to run it (else placement chooses).
    """
    if command is None and "command" in fields:
        command = fields.pop("command")
    if callable(command):
        raise SpecError("command", "meshrun.run takes a command; for a function use meshrun.submit(fn, ...) "
                        "or the @meshrun.job decorator")
    backend = fields.pop("backend", None)
    plan_kwargs = {k: fields.pop(k) for k in list(fields) if k in _PLAN_KWARGS}
    spec = JobSpec(command=command, **fields)
    return submit(spec, backend=backend, **plan_kwargs)


def submit_function(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Job:
    """Run ``fn(*args, **kwargs)`` as a job with default resources (use ``@meshrun.job`` to set them)."""
    return submit(JobSpec(function=fn, args=args, kwargs=kwargs))


_PLAN_KWARGS = ("objective", "max_price_per_hour", "backends", "exclude_backends", "allow_spot", "regions",
                "value_of_time", "deadline", "runtime")


def failover_if_stuck(job: Job) -> None:
    """Called on every status refresh of a PENDING job: if it was placed by a plan and has waited longer
    than its spec's ``max_pending``, cancel it and submit it to the next offer, recording the attempt.
    (Filled in by the placement work; a no-op until then.)"""
    return None
