"""Job: a handle on one submitted job, Future-like, awaitable, re-attachable from any process."""

from __future__ import annotations

import html
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from ._backend import JobState, JobStatus
from ._errors import (
    BackendError,
    JobCancelled,
    JobFailed,
    JobLost,
    JobTimeout,
    MeshrunError,
)
from ._store import JobRecord, Store, get_store
from ._units import format_duration

# a job that sits in SUBMITTING longer than this without a backend id was interrupted mid-submit
SUBMIT_GRACE = 60.0
# ... and one whose folder already shows the host agent's records is picked up after this long (a live
# submitter records the backend id within moments of the start)
SUBMIT_PICKUP = 2.0


class Job:
    """A submitted job. Create one with ``meshrun.run``, ``fn.submit`` or ``Job.attach(job_id)``.

    ``status()`` asks the backend (cheaply); ``wait()``/``result()`` block with polling that backs off;
    ``logs()`` returns the output so far; ``cancel()`` stops the job and everything it started.
    """

    def __init__(self, job_id: str, *, store: Store | None = None, _record: JobRecord | None = None):
        self._store = store or get_store()
        self._record = _record or self._store.get(job_id)
        self.id = self._record.id

    # ---- construction
    @classmethod
    def attach(cls, job_id: str, *, home: str | os.PathLike[str] | None = None) -> "Job":
        """Pick up a job submitted earlier, from this process or any other (a prefix of the id will do)."""
        store = get_store(home)
        return cls(job_id, store=store)

    # ---- plain properties
    @property
    def record(self) -> JobRecord:
        return self._record

    @property
    def name(self) -> str:
        return self._record.name

    @property
    def backend(self) -> str | None:
        return self._record.backend

    @property
    def backend_id(self) -> str | None:
        return self._record.backend_id

    @property
    def job_dir(self) -> Path:
        return self._store.job_dir(self.id)

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self._record.history)

    @property
    def spec(self) -> Any:
        from ._spec import JobSpec

        return JobSpec.from_json((self.job_dir / "spec.json").read_text())

    # ---- state
    def refresh(self) -> JobRecord:
        refresh([self])
        return self._record

    def status(self) -> JobState:
        """The job's state now (asks the backend unless the outcome is already recorded)."""
        return self.refresh().state

    @property
    def reason(self) -> str | None:
        return self._record.reason

    def done(self) -> bool:
        return self.status().terminal

    def wait(self, timeout: float | None = None, *, progress: bool | None = None) -> JobState:
        """Block until the job ends (or ``timeout`` seconds pass: TimeoutError). Returns the final state."""
        wait([self], timeout=timeout, progress=progress)
        return self._record.state

    def result(self, timeout: float | None = None) -> Any:
        """The function's return value (0 for a successful command). Raises JobFailed (with the remote
        traceback), JobTimeout, JobCancelled or JobLost; TimeoutError if ``timeout`` passes first."""
        self.wait(timeout)
        return self._outcome()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self.wait(timeout)
        try:
            self._outcome()
        except MeshrunError as e:
            return e
        return None

    def _outcome(self) -> Any:
        rec = self._record
        d = self.job_dir
        if rec.state is JobState.SUCCEEDED:
            if rec.kind == "function":
                p = d / "result.pkl"
                if not p.exists():
                    raise JobLost(f"job {self.id} succeeded but its result file is missing ({p})", self.id)
                import pickle

                try:
                    return pickle.loads(p.read_bytes())
                except Exception as e:
                    raise JobFailed(
                        f"job {self.id} returned a value that cannot be unpickled here: {type(e).__name__}: {e}",
                        self.id,
                    ) from e
            return 0
        where = f" on {rec.backend}" + (f" ({rec.where})" if rec.where else "")
        if rec.state is JobState.CANCELLED:
            raise JobCancelled(f"job {self.id} ({rec.name}) was cancelled{where}: {rec.reason or 'cancelled'}", self.id)
        if rec.state is JobState.LOST:
            raise JobLost(f"job {self.id} ({rec.name}) was lost{where}: {rec.reason or 'no outcome recorded'}", self.id)
        err = _read_json(d / "error.json") if rec.kind == "function" else None
        tb = err.get("traceback") if err else None
        etype = err.get("type") if err else None
        if err:
            msg = f"job {self.id} ({rec.name}) failed{where}: {etype}: {err.get('message', '')}"
        else:
            msg = f"job {self.id} ({rec.name}) {rec.state.value}{where}: {rec.reason or 'no reason given'}"
            tail = self.log_tail(20)
            if tail.strip():
                msg += "\n\nLast lines of its output:\n" + tail.rstrip()
        cls = JobTimeout if rec.state is JobState.TIMEOUT else JobFailed
        raise cls(msg, self.id, remote_traceback=tb, remote_type=etype, exit_code=rec.exit_code, state=rec.state.value)

    # ---- output
    def logs(self, *, follow: bool = False) -> Any:
        """The output so far as text; with ``follow=True`` an iterator of chunks until the job ends."""
        it = self._log_iter(follow)
        if follow:
            return it
        return "".join(it)

    def _log_iter(self, follow: bool) -> Iterator[str]:
        rec = self._record
        if rec.backend is None or rec.backend_id is None:
            return iter(())
        from ._registry import get_backend

        try:
            b = get_backend(rec.backend)
            if not follow:  # read now, so a backend error is caught here rather than while iterating
                return iter(["".join(b.logs(rec.backend_id, follow=False))])
            return b.logs(rec.backend_id, follow=follow)
        except BackendError:
            if not follow:
                p = self.job_dir / "output.log"
                return iter([p.read_text(errors="replace")]) if p.exists() else iter(())
            raise

    def log_tail(self, n: int = 20) -> str:
        try:
            text = self.logs()
        except MeshrunError:
            return ""
        return "\n".join(text.splitlines()[-n:])

    # ---- control
    def cancel(self) -> None:
        """Stop the job and everything it started; frees its GPUs. A no-op for a finished job.

        A ``lost`` job (its supervisor died) is cancelled too: whatever it left running is stopped and its
        GPUs are freed. A job still ``submitting`` (its submitter may have died mid-submit) is looked for
        at its backend and cancelled there, so it cannot go on running unseen."""
        rec = self.refresh()
        from ._registry import get_backend

        if rec.state is JobState.LOST and rec.backend and rec.backend_id:
            get_backend(rec.backend).cancel(rec.backend_id)
            self._store.update(self.id, state=JobState.CANCELLED, ended_at=time.time(),
                               reason=f"cancelled after it was lost ({rec.reason or 'no outcome recorded'}); "
                                      "what it left running was stopped")
            self._store.add_event(self.id, "cancelled", after="lost", backend=rec.backend)
            self._record = self._store.get(self.id)
            return
        if rec.terminal:
            return
        if rec.backend_id is None:
            found = None
            if rec.backend:
                try:
                    found = get_backend(rec.backend).find(self.id)
                except MeshrunError:
                    found = None
            if found is None:
                self._store.update(self.id, state=JobState.CANCELLED, reason="cancelled before it was submitted",
                                   ended_at=time.time())
                self._store.add_event(self.id, "cancelled")
                self._record = self._store.get(self.id)
                return
            # the submitter did not record the backend's id (it died mid-submit): the backend has the job
            self._store.update(self.id, backend_id=found)
            self._store.add_event(self.id, "reattached", backend=rec.backend, backend_id=found)
            rec = self._record = self._store.get(self.id)
        get_backend(rec.backend).cancel(rec.backend_id)
        self._store.add_event(self.id, "cancel", backend=rec.backend)
        # the backend may take a moment to report it; record the outcome we asked for if it goes quiet
        deadline = time.monotonic() + 30
        while not self.refresh().terminal and time.monotonic() < deadline:
            time.sleep(0.1)
        if not self._record.terminal:
            self._store.update(self.id, state=JobState.CANCELLED, reason="cancelled (backend confirmation pending)",
                               ended_at=time.time())
            self._record = self._store.get(self.id)

    # ---- async
    def __await__(self):  # type: ignore[no-untyped-def]
        import asyncio

        return asyncio.get_running_loop().run_in_executor(None, self.result).__await__()

    # ---- display
    def __repr__(self) -> str:
        r = self._record
        return f"<meshrun.Job {self.id} {r.name!r} {r.state.value} on {r.backend}>"

    def _repr_html_(self) -> str:
        r = self._record
        color = {
            JobState.SUCCEEDED: "#2e7d32",
            JobState.FAILED: "#c62828",
            JobState.TIMEOUT: "#c62828",
            JobState.LOST: "#c62828",
            JobState.CANCELLED: "#6d6d6d",
            JobState.RUNNING: "#1565c0",
        }.get(r.state, "#ef6c00")
        rows = [
            ("id", r.id),
            ("name", r.name),
            ("state", f'<b style="color:{color}">{r.state.value}</b>'
                      + (f" &mdash; {html.escape(r.reason)}" if r.reason else "")),
            ("backend", f"{r.backend or '-'}" + (f" ({html.escape(r.where)})" if r.where else "")),
            ("what", html.escape(r.summary)),
            ("submitted", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at))),
        ]
        if r.started_at:
            end = r.ended_at or time.time()
            rows.append(("runtime", format_duration(end - r.started_at)))
        if r.exit_code is not None:
            rows.append(("exit code", str(r.exit_code)))
        body = "".join(
            f'<tr><th style="text-align:left;padding-right:1em">{k}</th><td style="text-align:left">'
            f"{v if k in ('state', 'backend', 'what') else html.escape(str(v))}</td></tr>"
            for k, v in rows
        )
        tail = html.escape(self.log_tail(8)) if r.state is not JobState.SUBMITTING else ""
        logs = f'<pre style="max-height:12em;overflow:auto;margin:0.3em 0">{tail}</pre>' if tail else ""
        return f'<div class="meshrun-job"><b>meshrun.Job</b><table>{body}</table>{logs}</div>'


def _agent_seen(job_dir: Path) -> bool:
    """True when the job folder shows that a host agent took the job (started, running or ended)."""
    return any((job_dir / n).exists() for n in (".started", "state.json", "exit.json"))


def _read_json(p: Path) -> Any:
    import json

    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


# ---- batched status and waiting --------------------------------------------------------------------


def refresh(jobs: Sequence[Job]) -> None:
    """Bring many jobs' records up to date with one status call per backend."""
    from ._registry import get_backend

    by_backend: dict[str, list[Job]] = {}
    for j in jobs:
        j._record = j._store.get(j.id)
        if j._record.terminal:
            continue
        if j._record.backend is None:
            continue
        by_backend.setdefault(j._record.backend, []).append(j)
    for bname, group in by_backend.items():
        try:
            backend = get_backend(bname)
        except BackendError as e:
            for j in group:
                j._record.reason = str(e)
            continue
        todo = []
        for j in group:
            rec = j._record
            if rec.backend_id is None:
                age = time.time() - rec.created_at
                if age > SUBMIT_GRACE or (age > SUBMIT_PICKUP and _agent_seen(j.job_dir)):
                    found = backend.find(j.id)
                    if found:
                        j._store.update(j.id, backend_id=found, state=JobState.PENDING, submitted_at=time.time())
                        j._store.add_event(j.id, "reattached", backend=bname, backend_id=found)
                        j._record = j._store.get(j.id)
                        todo.append(j)
                    elif age > SUBMIT_GRACE:
                        _apply(j, JobStatus(JobState.LOST, reason="the submission was interrupted before the "
                                            "backend accepted the job"), backend)
                continue
            todo.append(j)
        if not todo:
            continue
        try:
            statuses = backend.status([j._record.backend_id for j in todo])
        except BackendError as e:
            for j in todo:
                j._record.reason = f"status unavailable: {e}"
            continue
        for j in todo:
            st = statuses.get(j._record.backend_id)
            if st is not None:
                _apply(j, st, backend)
    # jobs pending past their spec's max_pending move to the next offer of their plan
    from ._scheduler import failover_if_stuck

    for j in jobs:
        if j._record.state is JobState.PENDING:
            failover_if_stuck(j)


def _apply(job: Job, st: JobStatus, backend: Any) -> None:
    rec = job._record
    if st.state is JobState.UNKNOWN:
        return
    if st.terminal and st.state is not rec.state:
        from ._scheduler import retry_if_failed

        if retry_if_failed(job, st, backend):
            return
    changes: dict[str, Any] = {}
    if st.state is not rec.state:
        changes["state"] = st.state
    if st.reason != rec.reason:
        changes["reason"] = st.reason
    if st.exit_code is not None and st.exit_code != rec.exit_code:
        changes["exit_code"] = st.exit_code
    if st.where and st.where != rec.where:
        changes["where"] = st.where
    if st.started_at and not rec.started_at:
        changes["started_at"] = st.started_at
    if st.state is JobState.RUNNING and not rec.started_at and "started_at" not in changes:
        changes["started_at"] = time.time()
    if st.terminal:
        try:
            backend.fetch_results(rec.backend_id, job.job_dir)
        except BackendError as e:
            changes["reason"] = f"{st.reason or st.state.value}; results could not be fetched: {e}"
        # the agent's own exit record is the authority on the exit code (a scheduler may not know it yet)
        ex = _read_json(job.job_dir / "exit.json")
        if isinstance(ex, dict) and st.state.value == ex.get("state"):
            if st.exit_code is None and isinstance(ex.get("exit_code"), int) and ex["exit_code"] != rec.exit_code:
                changes["exit_code"] = ex["exit_code"]
            if not st.reason and ex.get("reason") and "reason" not in changes:
                changes["reason"] = ex["reason"]
            if ex.get("started_at") and not rec.started_at:
                changes.setdefault("started_at", ex["started_at"])
        changes.setdefault("ended_at", st.ended_at or time.time())
    if changes:
        job._store.update(job.id, **changes)
        if "state" in changes:
            job._store.add_event(job.id, st.state.value, reason=st.reason, where=st.where)
        job._record = job._store.get(job.id)


def wait(
    jobs: Iterable[Job],
    timeout: float | None = None,
    *,
    progress: bool | None = None,
    on_change: Callable[[Job], None] | None = None,
) -> list[Job]:
    """Wait for all ``jobs`` to end, polling each backend once per round with a growing interval."""
    from ._registry import get_backend

    jobs = list(jobs)
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    if progress is None:
        progress = _interactive()
    shown = False
    last_states: dict[str, JobState] = {}
    while True:
        refresh(jobs)
        pending = [j for j in jobs if not j._record.terminal]
        if on_change is not None:
            for j in jobs:
                if last_states.get(j.id) is not j._record.state:
                    last_states[j.id] = j._record.state
                    on_change(j)
        if not pending:
            if shown:
                _progress_line("", done=True)
            return jobs
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            if shown:
                _progress_line("", done=True)
            raise TimeoutError(
                f"{len(pending)} of {len(jobs)} job(s) still {pending[0]._record.state.value} after {timeout}s "
                f"(e.g. {pending[0].id}: {pending[0]._record.reason or pending[0]._record.state.value})"
            )
        if progress and now - start > 2.0:
            _progress_line(_describe_progress(jobs, now - start))
            shown = True
        first, longest = 0.5, 10.0
        try:
            intervals = [get_backend(j._record.backend).poll_interval for j in pending if j._record.backend]
            if intervals:
                first = min(i[0] for i in intervals)
                longest = min(i[1] for i in intervals)
        except Exception:
            pass
        waited = now - start
        interval = min(longest, max(first, waited / 20.0))
        if deadline is not None:
            interval = min(interval, max(0.0, deadline - now))
        time.sleep(interval)


def _interactive() -> bool:
    try:
        return sys.stderr.isatty() and "ipykernel" not in sys.modules
    except Exception:
        return False


def _describe_progress(jobs: Sequence[Job], elapsed: float) -> str:
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j._record.state.value] = counts.get(j._record.state.value, 0) + 1
    if len(jobs) == 1:
        r = jobs[0]._record
        detail = f": {r.reason}" if r.reason and not r.terminal else ""
        return f"meshrun: {r.id} {r.state.value}{detail} ({format_duration(elapsed)})"
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"meshrun: {len(jobs)} jobs: {parts} ({format_duration(elapsed)})"


def _progress_line(text: str, done: bool = False) -> None:
    width = 100
    if done:
        sys.stderr.write("\r" + " " * width + "\r")
    else:
        sys.stderr.write("\r" + text[:width].ljust(width))
    sys.stderr.flush()


def gather(jobs: Iterable[Job], timeout: float | None = None) -> list[Any]:
    """Results of many jobs, in order; the first failure is raised after all have ended."""
    jobs = list(jobs)
    wait(jobs, timeout=timeout)
    return [j._outcome() for j in jobs]
