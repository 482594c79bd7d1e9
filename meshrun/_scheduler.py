"""check -> offers -> rank -> submit: the path from a spec to a running job, with failover."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, ParamSpec, Sequence, TypeVar, overload

from ._backend import JobState, Offer, Submission
from ._errors import BackendError, MeshrunError, NoPlacementError, SpecError
from ._job import Job
from ._spec import JobSpec
from ._store import JobRecord, Store, get_store, new_job_id

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
    from ._tracking import begin  # experiment tracking: the run identity goes into the job's environment

    begin(spec, launch, files, backend=backend, array_id=array_id, array_index=array_index)
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
    choice. Returns (backend name, offer or None, plan or None); a plan only when placement chose."""
    from ._config import get_config
    from ._placement import plan as make_plan
    from ._placement import rejection_lines

    name = backend or spec.backend or get_config().default_backend
    if name:
        from ._registry import get_backend

        get_backend(name)  # an unknown or uninstalled backend raises BackendUnavailable with its install hint
        kw = {k: v for k, v in plan_kwargs.items() if k not in ("backends", "exclude_backends")}
        p = make_plan(spec, backends=[name], exclude_backends=[], raise_on_empty=False, **kw)
        if p.chosen is None:
            reasons = rejection_lines(p.rejected) or [f"{name}: no offers"]
            raise NoPlacementError(f"the {name} backend cannot run {spec.display_name!r}", reasons)
        return name, p.chosen, None
    p = make_plan(spec, **plan_kwargs)
    chosen = p.chosen
    assert chosen is not None  # make_plan raises NoPlacementError when nothing fits
    return chosen.launcher or chosen.backend, chosen, p


@overload
def submit(
    spec: JobSpec, /, *, backend: str | None = None, store: Store | None = None, **plan_kwargs: Any
) -> Job[Any]: ...


@overload
def submit(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Job[R]: ...


def submit(what: Any, /, *args: Any, **kwargs: Any) -> Job[Any]:
    """Place and submit one job; returns its :class:`Job` at once.

    - ``meshrun.submit(spec, backend=None, **placement)``: a :class:`JobSpec` (a command or a function).
      Without a named backend the plan chooses, and a failed submit moves on to the next offer (each attempt
      recorded in the job's history).
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
        from ._decorator import JobFunction

        if isinstance(what, JobFunction):
            return what.submit(*args, **kwargs)
        return _submit_spec(JobSpec(function=what, args=args, kwargs=kwargs))
    if isinstance(what, (str, list, tuple)):
        raise SpecError("function", "meshrun.submit takes a meshrun.JobSpec or a function (then its arguments); "
                        f"for a command use meshrun.run({what!r}, ...)")
    raise SpecError("function", "meshrun.submit takes a meshrun.JobSpec or a function (then its arguments), "
                    f"got {type(what).__name__}")


def _submit_spec(
    spec: JobSpec, *, backend: str | None = None, store: Store | None = None, **plan_kwargs: Any
) -> Job[Any]:
    store = store or get_store()
    store.open()  # a MESHRUN_HOME that is not ours is refused before any backend writes under it
    name, offer, plan = choose(spec, backend, **plan_kwargs)
    prepared = prepare(spec, store=store, backend=name)
    if plan is not None:
        from ._placement import record_plan

        record_plan(prepared, store, plan)
    _submit_with_failover(prepared, store, name, offer, plan)
    return Job(prepared.record.id, store=store)


def _submit_with_failover(
    prepared: Prepared,
    store: Store,
    name: str,
    offer: Offer | None,
    plan: Any,
    *,
    candidates: Sequence[Offer] | None = None,
) -> None:
    """Submit to ``offer``; with a plan (or ``candidates``), a submit that fails moves on to the next offer.

    Each try is recorded (``submitted`` or ``submit_failed``, with its attempt number and offer). A backend
    that is unavailable, or fails three times, is skipped for the rest. Without a plan the error is raised as
    is; with one, a NoPlacementError listing every failure is raised when all fail (the job is FAILED)."""
    from ._errors import BackendUnavailable
    from ._placement import FAILS_PER_BACKEND, write_launch
    from ._registry import get_backend

    failover = plan is not None or candidates is not None
    cands: list[Offer | None]
    if candidates is not None:
        cands = list(candidates)
    elif plan is not None:
        cands = list(plan.offers)
    else:
        cands = [offer]
    job_id = prepared.record.id
    rec = store.get(job_id)
    attempt = sum(1 for h in rec.history if h.get("event") in ("submitted", "submit_failed"))
    original = json.loads(json.dumps(prepared.submission.launch))
    errors: list[str] = []
    dead: set[str] = set()
    fails: dict[str, int] = {}
    for cand in cands:
        bname = (cand.launcher or cand.backend) if cand is not None else name
        key = cand.key if cand is not None else None
        if bname in dead:
            continue
        attempt += 1
        if attempt > 1 and failover:  # the last backend may have rewritten launch.json
            prepared.submission.launch = json.loads(json.dumps(original))
            write_launch(prepared.submission.job_dir, original)
        try:
            b = get_backend(bname)
            bname = b.name or bname
            store.update(job_id, backend=bname, attempt=attempt, state=JobState.SUBMITTING)
            prepared.submission.attempt = attempt
            if b.name == "local" or getattr(b, "shared_filesystem", False):
                place_files_locally(prepared.submission.spec, prepared.submission.launch["cwd"])
            bid = b.submit(prepared.submission, cand)
        except Exception as e:
            msg = str(e) if isinstance(e, MeshrunError) else f"{type(e).__name__}: {e}"
            errors.append(f"{key or bname}: {msg.splitlines()[0] if msg else type(e).__name__}")
            store.add_event(job_id, "submit_failed", attempt=attempt, backend=bname, offer=key, error=msg)
            if not failover:
                store.update(job_id, state=JobState.FAILED, reason=f"submit failed: {msg}", ended_at=time.time())
                if isinstance(e, MeshrunError):
                    raise
                raise BackendError(f"submit failed: {msg}", backend=bname) from e
            fails[bname] = fails.get(bname, 0) + 1
            if isinstance(e, BackendUnavailable) or fails[bname] >= FAILS_PER_BACKEND:
                dead.add(bname)
            continue
        store.update(job_id, backend=bname, backend_id=bid, state=JobState.PENDING, submitted_at=time.time(),
                     reason=None, where=None, started_at=None, ended_at=None, exit_code=None)
        store.add_event(job_id, "submitted", attempt=attempt, backend=bname, backend_id=bid, offer=key)
        return
    store.update(job_id, state=JobState.FAILED, reason="every offer failed to submit", ended_at=time.time())
    raise NoPlacementError(f"every offer failed to submit job {job_id}", errors or ["no offer left to try"])


def submit_many(
    specs: Sequence[JobSpec], *, backend: str | None = None, store: Store | None = None, **plan_kwargs: Any
) -> list[Job]:
    """Submit jobs of one shape together: one placement, and one native array where the backend has one.
    With a plan, an array submit that fails moves to the next offer; a backend without arrays gets each job
    with the usual per-job failover."""
    from ._backend import Feature
    from ._errors import BackendUnavailable
    from ._registry import get_backend

    if not specs:
        return []
    store = store or get_store()
    store.open()  # a MESHRUN_HOME that is not ours is refused before any backend writes under it
    name, offer, plan = choose(specs[0], backend, **plan_kwargs)
    array_id = new_job_id()
    prepared = [prepare(s, store=store, backend=name, array_id=array_id, array_index=i) for i, s in enumerate(specs)]
    if plan is not None:
        from ._placement import record_plan

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
            if b.name == "local" or getattr(b, "shared_filesystem", False):
                for p in prepared:
                    place_files_locally(p.submission.spec, p.submission.launch["cwd"])
            try:
                for p in prepared:
                    store.update(p.record.id, backend=b.name, attempt=start + 1)
                    p.submission.attempt = start + 1
                ids = b.submit_array([p.submission for p in prepared], cand)
            except Exception as e:
                if plan is None:
                    raise
                for p in prepared:
                    store.add_event(p.record.id, "submit_failed", attempt=start + 1, backend=b.name,
                                    offer=cand.key if cand else None, error=str(e))
                continue
            now = time.time()
            for p, bid in zip(prepared, ids):
                store.update(p.record.id, backend_id=bid, state=JobState.PENDING, submitted_at=now)
                store.add_event(p.record.id, "submitted", attempt=start + 1, backend=b.name, backend_id=bid,
                                array=array_id, offer=cand.key if cand else None)
            return [Job(p.record.id, store=store) for p in prepared]
        else:
            start = len(cands)
        rest = cands[start:]
        for p in prepared:
            if plan is None:
                _submit_with_failover(p, store, name, offer, None)
            else:
                _submit_with_failover(p, store, name, offer, plan, candidates=[c for c in rest if c is not None])
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
    placement options (``objective=``, ``max_price_per_hour=``, ...) are those of :func:`meshrun.plan`.
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
    plan_kwargs = {k: fields.pop(k) for k in list(fields) if k in _PLAN_KWARGS}
    if isinstance(command, JobSpec):
        spec = command.replace(**fields) if fields else command
    else:
        spec = JobSpec(command=command, **fields)
    return _submit_spec(spec, backend=backend, **plan_kwargs)


_PLAN_KWARGS = ("objective", "max_price_per_hour", "backends", "exclude_backends", "allow_spot", "regions",
                "value_of_time", "deadline", "runtime")


def failover_if_stuck(job: Job) -> None:
    """Called on every status refresh of a PENDING job: if it was placed by a plan and has waited longer
    than its spec's ``max_pending``, cancel it and submit it to the next offer of its plan (kept in the job
    folder's plan.json, so any process can do it), recording a ``moved`` event and the new attempt."""
    rec = job._record
    if rec.state is not JobState.PENDING or not rec.backend_id or not rec.submitted_at:
        return
    max_pending = None
    for h in reversed(rec.history):
        if h.get("event") == "placed":
            max_pending = h.get("max_pending")
            break
    if not max_pending:
        return
    waited = time.time() - rec.submitted_at
    if waited < max_pending:
        return
    for h in reversed(rec.history):  # since this attempt began: nothing left to move to, or a recent failure
        ev = h.get("event")
        if ev == "submitted":
            break
        if ev == "failover_exhausted" or (ev == "failover_failed" and time.time() - h.get("time", 0) < 60):
            return
    try:
        from ._placement import move_to_next_offer

        move_to_next_offer(job, waited=waited, max_pending=float(max_pending))
    except Exception as e:  # never break a status refresh
        try:
            job._store.add_event(job.id, "failover_failed", error=f"{type(e).__name__}: {e}")
        except Exception:
            pass


RETRY_STATES = (JobState.FAILED, JobState.PREEMPTED, JobState.LOST)


def retry_if_failed(job: Job, status: Any, backend: Any) -> bool:
    """Called when a job's backend reports it FAILED, PREEMPTED or LOST: if its spec allows ``retries`` and
    some are left, archive this attempt (its output stays under attempts/<n>/) and submit the job folder
    again to the same backend. Returns True when it was resubmitted (the failure is then not final)."""
    from ._placement import archive_attempt, job_folder_lock, load_plan, write_launch

    rec = job._record
    if status.state not in RETRY_STATES or not rec.backend:
        return False
    job_dir = Path(job.job_dir)
    try:
        spec = JobSpec.from_json((job_dir / "spec.json").read_text())
    except (OSError, SpecError):
        return False
    used = sum(1 for h in rec.history if h.get("event") == "retry")
    if spec.retries <= used:
        return False
    with job_folder_lock(job_dir) as mine:
        if not mine:
            return True  # another process is resubmitting it right now
        fresh = job._store.get(job.id)
        if fresh.backend_id != rec.backend_id or fresh.terminal:
            job._record = fresh
            return fresh.state is not JobState.FAILED
        try:
            backend.fetch_results(rec.backend_id, job_dir)  # keep the failed attempt's output with it
        except MeshrunError:
            pass
        archive_attempt(job_dir, rec.attempt)
        plan = load_plan(job_dir)
        launch = (plan or {}).get("launch") or json.loads(
            (job_dir / "attempts" / str(rec.attempt) / "launch.json").read_text())
        write_launch(job_dir, launch)
        job._store.add_event(job.id, "retry", attempt=rec.attempt, backend=rec.backend, state=status.state.value,
                             reason=status.reason, left=spec.retries - used - 1)
        sub = Submission(job_id=job.id, job_dir=job_dir, spec=spec, launch=dict(launch), attempt=rec.attempt + 1)
        try:
            _submit_with_failover(Prepared(job._store.get(job.id), sub), job._store, rec.backend, None, None)
        except MeshrunError:
            pass  # recorded: the job is FAILED with the submit error in its history
        job._record = job._store.get(job.id)
        return True
