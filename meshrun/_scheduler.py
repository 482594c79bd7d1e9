"""The path from a spec to a submitted job: prepare (job folder + store row) -> choose (a named backend or
the plan) -> the first attempt (:mod:`meshrun._attempts`, with failover to the next offer)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, ParamSpec, Sequence, TypeVar, overload

from ._attempts import Prepared, place_files_locally, record_plan, submit_with_failover
from ._backend import Feature, JobState, Offer, Submission
from ._data import launch_data, stage_source
from ._errors import BackendUnavailable, NoPlacementError, SpecError
from ._job import Job
from ._options import PlacementOptions
from ._placement import plan as make_plan
from ._plan import Plan, rejection_lines
from ._registry import get_backend
from ._spec import JobSpec
from ._store import Store, get_store, new_job_id

P = ParamSpec("P")
R = TypeVar("R")


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
    data = launch_data(spec.inputs, spec.outputs)
    if data is not None:  # URLs and paths only: the endpoint and credentials are the node's
        launch["data"] = data
    return launch


def _check_files(spec: JobSpec, cwd: str) -> None:
    for dst, src in spec.files.items():
        path = src if os.path.isabs(src) else os.path.join(cwd, src)
        if not os.path.exists(path):
            raise SpecError(f"files.{dst}", f"the source {src!r} does not exist (looked at {path})")


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
    if spec.secrets:  # a null secret is taken from this process's environment now, or refused now
        spec = spec.replace(secrets=spec.resolved_secrets())
    files: dict[str, bytes] = {}
    job_id = new_job_id()
    if spec.kind == "function":
        from ._payload import dumps

        fn = spec.resolve_function()
        files["payload.pkl"] = dumps(fn, spec.args, spec.kwargs)
    launch = build_launch(spec, job_id, cwd=cwd)
    from ._tracking import begin  # experiment tracking: the run identity goes into the job's environment

    begin(spec, launch, files, backend=backend, array_id=array_id, array_index=array_index)
    if "data" in launch:
        files["stage.py"] = stage_source()  # the stager travels with the job folder (docs/data.md)
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


def choose(spec: JobSpec, backend: str | None = None,
           options: PlacementOptions | None = None) -> tuple[str, Offer | None, Plan | None]:
    """Which backend and offer to use: the one named (argument, spec, config default), else the plan's
    choice. Returns (backend name, offer or None, plan or None); a plan only when placement chose."""
    from ._config import get_config

    from ._registry import validate_backend_options

    validate_backend_options(spec)  # each backend's declared options model, before any backend is asked
    options = options or PlacementOptions()
    name = backend or spec.backend or get_config().default_backend
    if name:
        get_backend(name)  # an unknown or uninstalled backend raises BackendUnavailable with its install hint
        named = options.model_copy(update={"backends": (name,), "exclude_backends": ()})
        p = make_plan(spec, raise_on_empty=False, options=named)
        if p.chosen is None:
            reasons = rejection_lines(p.rejected) or [f"{name}: no offers"]
            raise NoPlacementError(f"the {name} backend cannot run {spec.display_name!r}", reasons)
        return name, p.chosen, None
    p = make_plan(spec, options=options, settle_early=True)
    chosen = p.chosen
    assert chosen is not None  # make_plan raises NoPlacementError when nothing fits
    return chosen.launcher or chosen.backend, chosen, p


@overload
def submit(
    spec: JobSpec, /, *, backend: str | None = None, store: Store | None = None, **placement: Any
) -> Job[Any]: ...


@overload
def submit(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Job[R]: ...


def submit(what: Any, /, *args: Any, **kwargs: Any) -> Job[Any]:
    """Place and submit one job; returns its :class:`Job` at once.

    - ``meshrun.submit(spec, backend=None, **placement)``: a :class:`JobSpec` (a command or a function);
      ``placement`` are :class:`meshrun._options.PlacementOptions` keywords (``objective=``,
      ``max_price_per_hour=``, ``timeout=``, ...). Without a named backend the plan chooses, and a failed
      submit moves on to the next offer (each attempt recorded in the job's history).
    - ``meshrun.submit(fn, *args, **kwargs)``: run ``fn(*args, **kwargs)`` as a job; every keyword goes to
      ``fn``. A function decorated with ``@meshrun.job(...)`` keeps its resources and backend; a plain one
      gets the defaults (decorate it, or build a ``JobSpec(function=fn, ...)``, to set them).

    A command is submitted with :func:`meshrun.run`."""
    if isinstance(what, JobSpec):
        if args:
            raise SpecError("args", "meshrun.submit(spec) takes no positional arguments after the spec; a function's "
                            "arguments go into the spec (JobSpec(function=fn, args=..., kwargs=...))")
        if "track" in kwargs:  # experiment tracking is a field of the spec
            what = what.replace(track=kwargs.pop("track"))
        return _submit_spec(what, **kwargs)
    if callable(what):
        if getattr(what, "__meshrun_function__", None) is not None:  # @meshrun.job: its own spec and options
            return what.submit(*args, **kwargs)
        return _submit_spec(JobSpec(function=what, args=args, kwargs=kwargs))
    if isinstance(what, (str, list, tuple)):
        raise SpecError("function", "meshrun.submit takes a meshrun.JobSpec or a function (then its arguments); "
                        f"for a command use meshrun.run({what!r}, ...)")
    raise SpecError("function", "meshrun.submit takes a meshrun.JobSpec or a function (then its arguments), "
                    f"got {type(what).__name__}")


def _submit_spec(
    spec: JobSpec, *, backend: str | None = None, store: Store | None = None, **placement: Any
) -> Job[Any]:
    options = PlacementOptions.of(**placement)  # a bad option fails before anything is written
    store = store or get_store()
    store.open()  # a MESHRUN_HOME that is not ours is refused before any backend writes under it
    name, offer, plan = choose(spec, backend, options)
    prepared = prepare(spec, store=store, backend=name)
    if plan is not None:
        record_plan(prepared, store, plan)
    submit_with_failover(prepared, store, name, offer, plan)
    return Job(prepared.record.id, store=store)


def submit_many(
    specs: Sequence[JobSpec], *, backend: str | None = None, store: Store | None = None, **placement: Any
) -> list[Job]:
    """Submit jobs of one shape together: one placement, and one native array where the backend has one.
    With a plan, an array submit that fails moves to the next offer; a backend without arrays gets each job
    with the usual per-job failover."""
    if not specs:
        return []
    options = PlacementOptions.of(**placement)
    store = store or get_store()
    store.open()  # a MESHRUN_HOME that is not ours is refused before any backend writes under it
    name, offer, plan = choose(specs[0], backend, options)
    array_id = new_job_id()
    prepared = [prepare(s, store=store, backend=name, array_id=array_id, array_index=i) for i, s in enumerate(specs)]
    if plan is not None:
        for p in prepared:
            record_plan(p, store, plan)
    cands: list[Offer | None] = list(plan.offers) if plan is not None else [offer]
    start = 0
    try:
        for start, cand in enumerate(cands):
            bname = (cand.launcher or cand.backend) if cand is not None else name
            try:
                b = get_backend(bname)
            except BackendUnavailable as e:
                if plan is None:
                    raise
                for p in prepared:
                    store.add_event(p.record.id, "submit_failed", attempt=start + 1, backend=bname,
                                    offer=cand.key if cand else None, error=str(e))
                continue
            if Feature.ARRAYS not in b.features or len(prepared) == 1:
                break
            if getattr(b, "shared_filesystem", False):
                for p in prepared:
                    place_files_locally(p.submission.spec, p.submission.launch["cwd"])
            try:
                for p in prepared:
                    store.update(p.record.id, backend=b.name, attempt=start + 1)
                    p.submission.attempt = start + 1
                handed = time.time()  # as for one job (_attempts): submitted when the hand-over began
                ids = b.submit_array([p.submission for p in prepared], cand)
            except Exception as e:
                if plan is None:
                    raise
                for p in prepared:
                    store.add_event(p.record.id, "submit_failed", attempt=start + 1, backend=b.name,
                                    offer=cand.key if cand else None, error=str(e))
                continue
            for p, bid in zip(prepared, ids):
                store.update(p.record.id, backend_id=bid, state=JobState.PENDING, submitted_at=handed)
                store.add_event(p.record.id, "submitted", at=handed, attempt=start + 1, backend=b.name,
                                backend_id=bid, array=array_id, offer=cand.key if cand else None)
            return [Job(p.record.id, store=store) for p in prepared]
        else:
            start = len(cands)
        rest = cands[start:]
        for p in prepared:
            if plan is None:
                submit_with_failover(p, store, name, offer, None)
            else:
                submit_with_failover(p, store, name, offer, plan, candidates=[c for c in rest if c is not None])
    except Exception as e:
        for p in prepared:
            rec = store.get(p.record.id)
            if rec.backend_id is None and not rec.terminal:
                store.update(p.record.id, state=JobState.FAILED, reason=f"submit failed: {e}", ended_at=time.time())
        raise
    return [Job(p.record.id, store=store) for p in prepared]


@overload
def run(command: str | Sequence[str] | None = None, /, **fields: Any) -> Job[int]: ...


@overload
def run(command: JobSpec, /, **fields: Any) -> Job[Any]: ...


def run(command: Any = None, /, **fields: Any) -> Job[Any]:
    """Submit a command job: ``meshrun.run(["python", "train.py"], gpus=2, name="train")``.

    ``command`` is an argv list (run without a shell) or a string (run by ``bash -c``); the other keywords
    are :class:`JobSpec` fields; ``backend=`` names where to run it (else placement chooses), and the
    placement options (``objective=``, ``max_price_per_hour=``, ``unknown_start=``, ``timeout=``, ...) are
    those of :func:`meshrun.plan`.
    A :class:`JobSpec` is accepted too (the keywords then replace its fields). A function is submitted with
    :func:`meshrun.submit` or ``@meshrun.job``.
    """
    if command is None and "command" in fields:
        command = fields.pop("command")
    if callable(command):
        raise SpecError("command", "meshrun.run takes a command (an argv list or a string); for a function use "
                        "meshrun.submit(fn, *args, **kwargs), or decorate it with @meshrun.job(...) and call "
                        "fn.submit(*args, **kwargs)")
    if "function" in fields:
        raise SpecError("function", "meshrun.run takes a command, not function=; for a function use "
                        "meshrun.submit(fn, *args, **kwargs) or meshrun.submit(meshrun.JobSpec(function=fn, ...))")
    if command is None:
        raise SpecError("command", "meshrun.run needs a command: an argv list such as ['python', 'train.py'] or a "
                        "string run by bash -c")
    backend = fields.pop("backend", None)
    placement = PlacementOptions.split(fields)
    if isinstance(command, JobSpec):
        spec = command.replace(**fields) if fields else command
    else:
        spec = JobSpec(command=command, **fields)
    return _submit_spec(spec, backend=backend, **placement)
