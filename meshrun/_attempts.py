"""The attempt life cycle: every submit of a job, from its first to its last.

A job is one folder and one store row; each submit of it is an *attempt* (numbered from 1, recorded in
the history as ``submitted`` or ``submit_failed``). This module owns everything that starts an attempt or
ends one:

- :func:`submit_with_failover`: submit to an offer; with a plan, a submit that fails moves on to the next
  offer. The core writes the job's ``launch.json`` once per attempt, as the attempt begins;
- :func:`retry`: a job whose attempt failed, with ``retries`` left, is archived and submitted again;
- :func:`failover_if_stuck` / :func:`move_to_next_offer`: a job pending past ``max_pending`` is cancelled
  and submitted to the next offer of its plan (``plan.json`` in its folder, so any process can do it);
- the plan file, the attempt archive (``attempts/<n>/``) and the folder lock that keeps two processes from
  moving one job at once.

It works on a store and a job id, never on a :class:`meshrun.Job`: reading a job's status changes nothing,
and the places that advance a job (``Job.wait``, ``Job.advance``, ``meshrun wait``) call in here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from ._backend import JobRef, JobState, JobStatus, Offer, Submission
from ._errors import BackendError, BackendUnavailable, MeshrunError, NoPlacementError, SpecError
from ._plan import Plan, _jsonable, group_rejections, offer_from_dict, offer_to_dict
from ._registry import get_backend
from ._retries import retries_left
from ._store import JobRecord, Store, _atomic_write
from ._tracking import for_offer
from ._units import format_duration

if TYPE_CHECKING:  # pragma: no cover - the spec (and pydantic) loads only when a job is (re)submitted
    from ._spec import JobSpec


class Prepared:
    """A job recorded in the store, with its folder and launch description, not yet submitted."""

    def __init__(self, record: JobRecord, submission: Submission):
        self.record = record
        self.submission = submission


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


# ---- the plan of a submitted job, kept in its folder for failover ------------------------------------

PLAN_FILE = "plan.json"
MAX_STORED = 50


def save_plan(job_dir: Path, p: Plan | None, launch: Mapping[str, Any], max_pending: float | None,
              candidates: Sequence[Offer] | None = None) -> None:
    """Write ``plan.json``: the ranked offers (best first), the original launch description and
    ``max_pending``, so any process can move the job to its next offer later."""
    cands = list(candidates if candidates is not None else (p.offers if p is not None else []))[:MAX_STORED]
    data = {
        "version": 1,
        "created_at": time.time(),
        "objective": p.objective.value if p is not None else None,
        "inputs": _jsonable(p.inputs) if p is not None else {},
        "explanation": p.explain_choice() if p is not None else None,
        "max_pending": max_pending,
        "launch": dict(launch),
        "ranked": [offer_to_dict(o) for o in cands],
        # why the other options were not taken, one entry per backend and reason
        "rejected": [{"backend": g["backend"], "where": g["where"], "count": int(g["count"]), "reason": g["reason"]}
                     for g in group_rejections(p.rejected)][:MAX_STORED] if p is not None else [],
    }
    if p is not None and p.unasked:  # settled early: what a later move asks (the options it was made with)
        data["unasked"] = list(p.unasked)
        data["options"] = p.options.model_dump(mode="json", exclude_none=True) if p.options is not None else {}
    _atomic_write(Path(job_dir) / PLAN_FILE, (json.dumps(data, indent=1, default=str) + "\n").encode())


def load_plan(job_dir: Path) -> dict[str, Any] | None:
    """``plan.json`` of a job folder with its offers rebuilt (``data["offers"]``), or None."""
    try:
        data = json.loads((Path(job_dir) / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None
    try:
        data["offers"] = [offer_from_dict(d) for d in data.get("ranked", [])]
    except TypeError:
        return None
    return data



#: a backend that failed this many submits of one job is skipped for the rest of its failover
FAILS_PER_BACKEND = 3

#: files of a job folder that belong to the job, not to one attempt (everything else is archived on a move)
JOB_FILES = ("spec.json", "payload.pkl", PLAN_FILE, ".failover.lock")
ATTEMPTS_DIR = "attempts"


def record_plan(prepared: Prepared, store: Store, p: Plan) -> None:
    """Keep the plan with a prepared job (plan.json, for failover from any process) and record why it was
    placed where it was (the ``placed`` event, which also carries ``max_pending``)."""
    sub = prepared.submission
    save_plan(sub.job_dir, p, sub.launch, sub.spec.max_pending)
    slow = sorted({o.backend for o, why in p.rejected if why.startswith("not responding")})
    store.add_event(prepared.record.id, "placed", offer=p.chosen.key if p.chosen else None,
                    objective=p.objective.value, why=p.explain_choice(), candidates=len(p.ranked),
                    max_pending=sub.spec.max_pending, not_responding=", ".join(slow) or None)


def write_launch(job_dir: Path, launch: Mapping[str, Any]) -> None:
    """Write launch.json (atomically, 0600 like every file of a job folder): the job's launch description."""
    _atomic_write(Path(job_dir) / "launch.json", (json.dumps(dict(launch), sort_keys=True) + "\n").encode())


def job_launch(job_dir: Path, attempt: int) -> dict[str, Any]:
    """The job's own launch description, for a later attempt: the one kept in plan.json, else the one
    ``attempt`` started from (archived under attempts/<n>/)."""
    plan = load_plan(job_dir)
    launch = (plan or {}).get("launch")
    if launch:
        return dict(launch)
    return dict(json.loads((Path(job_dir) / ATTEMPTS_DIR / str(attempt) / "launch.json").read_text()))


def archive_attempt(job_dir: Path, attempt: int) -> Path:
    """Move what one attempt left in the job folder (the agent's records, its output) to attempts/<n>/, so
    the next attempt starts from a clean folder and the old output stays readable."""
    job_dir = Path(job_dir)
    dest = job_dir / ATTEMPTS_DIR / str(attempt)
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    for p in job_dir.iterdir():
        if p.name in JOB_FILES or p.name == ATTEMPTS_DIR or p.name.startswith(".") and p.name.endswith(".lock"):
            continue
        try:
            os.replace(p, dest / p.name)
        except OSError:
            pass
    return dest


@contextlib.contextmanager
def job_folder_lock(job_dir: Path) -> Iterator[bool]:
    """Try to take the job folder's exclusive lock (without waiting): yields True when this process holds it,
    False when another process is moving or resubmitting the job right now."""
    import fcntl

    fd = os.open(Path(job_dir) / ".failover.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


# ---- submit, with failover to the next offer ----------------------------------------------------------


def submit_with_failover(
    prepared: Prepared,
    store: Store,
    name: str,
    offer: Offer | None,
    plan: Plan | None,
    *,
    candidates: Sequence[Offer] | None = None,
) -> None:
    """Submit to ``offer``; with a plan (or ``candidates``), a submit that fails moves on to the next offer.

    Each try is an attempt, recorded (``submitted`` or ``submit_failed``, with its number and offer); every
    attempt after the job's first begins with the job's own launch description written to launch.json (a
    backend may have written its own for the attempt before). A backend that is unavailable, or fails three
    times, is skipped for the rest. Without a plan the error is raised as is; with one, a NoPlacementError
    listing every failure is raised when all fail (the job is FAILED)."""
    failover = plan is not None or candidates is not None
    cands: list[Offer | None]
    if candidates is not None:
        cands = list(candidates)
    elif plan is not None:
        cands = list(plan.offers)
    else:
        cands = [offer]
    sub = prepared.submission
    job_id = prepared.record.id
    rec = store.get(job_id)
    attempt = sum(1 for h in rec.history if h.get("event") in ("submitted", "submit_failed"))
    launch = json.loads(json.dumps(sub.launch))  # the job's own, whatever a backend does to its copy
    spec = sub.spec  # with gpu_alternatives: each attempt is submitted as its offer's alternative
    errors: list[str] = []
    dead: set[str] = set()
    fails: dict[str, int] = {}
    # a plan settled early on this machine: the backends it did not ask are asked once its offers are spent
    rest = (lambda: _the_rest(prepared, store, spec, plan.options, errors)) if plan is not None and plan.unasked \
        else None
    for cand in _and_then(cands, rest):
        bname = (cand.launcher or cand.backend) if cand is not None else name
        key = cand.key if cand is not None else None
        if bname in dead:
            continue
        attempt += 1
        if attempt > 1:  # the first attempt's launch.json was written with the job's folder
            sub.launch = json.loads(json.dumps(launch))
            write_launch(sub.job_dir, launch)
        try:
            _use_gpu_choice(sub, spec, cand)
            if for_offer(sub.launch, cand):  # a tracked W&B run is tagged with what its attempt costs
                write_launch(sub.job_dir, sub.launch)
            b = get_backend(bname)
            bname = b.name or bname
            store.update(job_id, backend=bname, attempt=attempt, state=JobState.SUBMITTING)
            sub.attempt = attempt
            if getattr(b, "shared_filesystem", False):
                place_files_locally(sub.spec, sub.launch["cwd"])
            # the hand-over's start: a backend that starts the job within submit() (local, ssh) records a start
            # time before submit() returns, and the history must not show it running before it was submitted
            handed = time.time()
            bid = b.submit(sub, cand)
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
        store.update(job_id, backend=bname, backend_id=bid, state=JobState.PENDING, submitted_at=handed,
                     reason=None, where=None, started_at=None, ended_at=None, exit_code=None)
        store.add_event(job_id, "submitted", at=handed, attempt=attempt, backend=bname, backend_id=bid, offer=key)
        return
    store.update(job_id, state=JobState.FAILED, reason="every offer failed to submit", ended_at=time.time())
    raise NoPlacementError(f"every offer failed to submit job {job_id}", errors or ["no offer left to try"])


def _and_then(first: Sequence[Offer | None], more: Any) -> Iterator[Offer | None]:
    """``first``, then (if they were not enough) what ``more()`` gives."""
    yield from first
    if more is not None:
        yield from more()


def _the_rest(prepared: Prepared, store: Store, spec: JobSpec, options: Any, errors: list[str]) -> list[Offer]:
    """The offers of the backends a plan settled early did not ask (this machine did not take the job), with
    the new plan recorded (plan.json and a ``placed`` event); none when nothing else fits."""
    from ._placement import rest_of

    try:
        p = rest_of(spec, options)
    except MeshrunError as e:
        errors.append(f"the other backends: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return []
    if p.chosen is None:
        errors += [f"{o.key}: {why}" for o, why in p.rejected][:10]
        return []
    record_plan(prepared, store, p)
    return list(p.offers)


def _use_gpu_choice(sub: Submission, spec: JobSpec, offer: Offer | None) -> None:
    """Submit the GPU alternative the offer was made for (a spec with ``gpu_alternatives``)."""
    from ._gather import spec_for_offer

    chosen = spec_for_offer(spec, offer)
    sub.spec = chosen
    if (sub.launch.get("gpus"), sub.launch.get("gpu_type")) != (chosen.resources.gpus, chosen.resources.gpu_type):
        sub.launch["gpus"], sub.launch["gpu_type"] = chosen.resources.gpus, chosen.resources.gpu_type
        write_launch(sub.job_dir, sub.launch)


def _resubmission(store: Store, job_id: str, job_dir: Path, attempt: int) -> Prepared:
    """The job folder as a new attempt's submission (its spec and its own launch description)."""
    from ._spec import JobSpec

    spec = JobSpec.from_json((job_dir / "spec.json").read_text())
    launch = job_launch(job_dir, attempt)
    sub = Submission(job_id=job_id, job_dir=job_dir, spec=spec, launch=launch, attempt=attempt + 1)
    return Prepared(store.get(job_id), sub)


# ---- retries: a failed attempt submitted again ---------------------------------------------------------

def retry(store: Store, rec: JobRecord, job_dir: Path, status: JobStatus) -> bool:
    """The job's attempt ended with ``status`` (FAILED, PREEMPTED or LOST) and it has ``retries`` left:
    archive the attempt (its output stays under attempts/<n>/) and submit the job folder again to the same
    backend. Returns True when this process resubmitted it, or another process is doing so right now."""
    job_dir = Path(job_dir)
    left = retries_left(rec, job_dir, status)
    if not left:
        return False
    with job_folder_lock(job_dir) as mine:
        if not mine:
            return True  # another process is resubmitting it right now
        fresh = store.get(rec.id)
        if fresh.backend_id != rec.backend_id or fresh.terminal:
            return False  # resubmitted (or ended) meanwhile: the next refresh records it
        backend = get_backend(str(rec.backend))
        try:
            # keep the failed attempt's output with it
            backend.fetch_results(JobRef(str(rec.backend_id), rec.id, job_dir), job_dir)
        except MeshrunError:
            pass
        archive_attempt(job_dir, rec.attempt)
        store.add_event(rec.id, "retry", attempt=rec.attempt, backend=rec.backend, state=status.state.value,
                        reason=status.reason, left=left - 1)
        try:
            submit_with_failover(_resubmission(store, rec.id, job_dir, rec.attempt), store, str(rec.backend),
                                 None, None)
        except MeshrunError:
            pass  # recorded: the job is FAILED with the submit error in its history
        return True


# ---- failover: a job pending past max_pending moves to the next offer of its plan ---------------------


def failover_if_stuck(store: Store, rec: JobRecord, job_dir: Path) -> bool:
    """A PENDING job placed by a plan that has waited longer than its spec's ``max_pending``: cancel it and
    submit it to the next offer of its plan, recording a ``moved`` event and the new attempt. Returns True
    when it moved. Never raises: a failure is recorded as ``failover_failed``."""
    if rec.state is not JobState.PENDING or not rec.backend_id or not rec.submitted_at:
        return False
    max_pending = None
    for h in reversed(rec.history):
        if h.get("event") == "placed":
            max_pending = h.get("max_pending")
            break
    if not max_pending:
        return False
    waited = time.time() - rec.submitted_at
    if waited < max_pending:
        return False
    for h in reversed(rec.history):  # since this attempt began: nothing left to move to, or a recent failure
        ev = h.get("event")
        if ev == "submitted":
            break
        if ev == "failover_exhausted" or (ev == "failover_failed" and time.time() - h.get("time", 0) < 60):
            return False
    try:
        return move_to_next_offer(store, rec, job_dir, waited=waited, max_pending=float(max_pending))
    except Exception as e:  # never break the loop that advances jobs
        try:
            store.add_event(rec.id, "failover_failed", error=f"{type(e).__name__}: {e}")
        except Exception:
            pass
        return False


def move_to_next_offer(store: Store, rec: JobRecord, job_dir: Path, *, waited: float, max_pending: float) -> bool:
    """Cancel a job stuck in PENDING and submit its folder to the next offer of its plan. Returns True when
    it moved. Safe against several processes advancing the same job: one holds the folder's lock and
    re-checks the record; the others do nothing."""
    job_dir = Path(job_dir)
    with job_folder_lock(job_dir) as mine:
        if not mine:
            return False  # another process is moving it right now
        seen = rec
        rec = store.get(rec.id)
        if rec.state is not JobState.PENDING or rec.backend_id != seen.backend_id:
            return False
        data = load_plan(job_dir)
        if data is None:
            store.add_event(rec.id, "failover_exhausted", reason="no plan.json in the job folder: nothing to move to")
            return False
        tried = {h.get("offer") for h in rec.history if h.get("event") in ("submitted", "submit_failed")}
        current = next((h.get("offer") for h in reversed(rec.history) if h.get("event") == "submitted"), None)
        cands = [o for o in data["offers"] if o.key not in tried]
        why = f"pending for {format_duration(waited)}, longer than max_pending {format_duration(max_pending)}"
        if not cands and data.get("unasked"):  # settled early on this machine: the others are asked now
            from ._options import PlacementOptions
            from ._placement import rest_of

            p = rest_of(_resubmission(store, rec.id, job_dir, rec.attempt).submission.spec,
                        PlacementOptions(**data.get("options") or {}))
            cands = [o for o in p.offers if o.key not in tried]
            if cands:
                save_plan(job_dir, p, data.get("launch") or {}, data.get("max_pending"))
        if not cands:
            store.add_event(rec.id, "failover_exhausted", reason=f"{why}, but every offer of its plan was tried; "
                            f"it stays on {rec.backend}")
            return False
        backend = get_backend(str(rec.backend))
        ref = JobRef(str(rec.backend_id), rec.id, job_dir)
        now_state = backend.status([ref]).get(ref)
        if now_state is not None and now_state.state is not JobState.PENDING:
            return False  # it started (or ended) meanwhile: the next refresh records that
        try:
            backend.cancel(ref)
        except MeshrunError as e:
            store.add_event(rec.id, "failover_failed", backend=rec.backend, error=f"cancel failed: {e}")
            return False
        archive_attempt(job_dir, rec.attempt)
        store.add_event(rec.id, "moved", attempt=rec.attempt, backend=rec.backend, backend_id=rec.backend_id,
                        offer=current, reason=why, next=cands[0].key)
        store.update(rec.id, state=JobState.SUBMITTING, backend_id=None, reason=f"moving: {why}", where=None,
                     submitted_at=None)
        prepared = _resubmission(store, rec.id, job_dir, rec.attempt)
        try:
            submit_with_failover(prepared, store, cands[0].backend, cands[0], None, candidates=cands)
        except MeshrunError:
            pass  # recorded: every remaining offer failed, the job is FAILED with the reasons in its history
        return True
