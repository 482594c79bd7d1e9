"""Job: a handle on one submitted job, Future-like, awaitable, re-attachable from any process."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import GenericAlias

from ._errors import (
    BackendError,
    JobCancelled,
    JobFailed,
    JobLost,
    JobTimeout,
    MeshrunError,
)
from ._state import JobState
from ._store import JobRecord, Store, StoreError, get_store
from ._units import format_duration

# Neither typing nor typing_extensions is imported at run time (``meshrun ls`` and ``status`` must start fast):
# ``Job[R]`` is generic for type checkers; at run time ``Job[int]`` is a ``types.GenericAlias``, as ``list[int]`` is.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Generator, Generic, Iterable, Iterator, Sequence

    from typing_extensions import TypeVar

    from ._backend import JobRef, JobStatus
    from ._spec import JobSpec

    R = TypeVar("R", default=Any)  # Job(job_id) and a bare Job are Job[Any]

    class _Generic(Generic[R]):
        pass
else:
    R = "R"

    class _Generic:
        __slots__ = ()
        __class_getitem__ = classmethod(GenericAlias)

# a job that sits in SUBMITTING longer than this without a backend id was interrupted mid-submit
SUBMIT_GRACE = 60.0
# characters of the end of the output a failure message carries
FAILURE_TAIL = 4000

# ... and one whose folder already shows the host agent's records is picked up after this long (a live
# submitter records the backend id within moments of the start)
SUBMIT_PICKUP = 2.0


class Job(_Generic[R]):
    """A submitted job. Create one with ``meshrun.run``, ``fn.submit`` or ``Job.attach(job_id)``.

    ``status()`` asks the backend (cheaply, a read); ``wait()``/``result()`` block with polling that backs
    off, retrying a failed attempt and moving a job stuck in the queue as its spec says (``advance()`` does
    one round of that);
    ``logs()`` returns the output so far; ``cancel()`` stops the job and everything it started.

    ``Job[R]`` is typed by what ``result()`` returns: ``R`` for a function ``def f(...) -> R`` submitted with
    ``f.submit``/``f.map``/``meshrun.submit(f, ...)``, ``int`` (0) for a command, ``Any`` for a job
    picked up with ``Job.attach`` or submitted as a ``JobSpec``.
    """

    def __init__(self, job_id: str, *, store: Store | None = None, _record: JobRecord | None = None):
        self._store = store or get_store()
        self._record = _record or self._store.get(job_id)
        self.id = self._record.id
        # the outcome of an attempt that may be retried, as the last refresh saw it; advance() acts on it
        self._due: JobStatus | None = None

    # ---- construction
    @classmethod
    def attach(cls, job_id: str, *, home: str | os.PathLike[str] | None = None) -> Job[Any]:
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

    def _ref(self) -> JobRef:
        """What a backend gets about this job: its backend id, carrying the job's id and folder."""
        from ._backend import JobRef  # only where a backend is asked: reading a job loads no backend machinery

        return JobRef(str(self._record.backend_id), self.id, self.job_dir)

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self._record.history)

    @property
    def tracking(self) -> dict[str, Any]:
        """The runs this job was tracked as (meshrun/_tracking.py): {tool: {run_id, name, url, logdir, ...}}."""
        from ._tracking import links

        return links(self.job_dir)

    @property
    def spec(self) -> JobSpec:
        from ._spec import JobSpec

        return JobSpec.from_json((self.job_dir / "spec.json").read_text())

    # ---- state
    def refresh(self) -> JobRecord:
        """The job's record, brought up to date (a read: see :meth:`status`)."""
        refresh([self])
        return self._record

    def status(self) -> JobState:
        """The job's state now (asks the backend unless the outcome is already recorded).

        A read: it records what the backend says and never cancels, resubmits or moves the job. A failed
        attempt with ``retries`` left, or a job pending past ``max_pending``, is acted on by :meth:`wait`
        (and :meth:`result`, ``meshrun.wait``, ``meshrun wait``) or by :meth:`advance`."""
        return self.refresh().state

    def advance(self) -> JobState:
        """Refresh the job, then apply its retry and failover policy once: a failed attempt with ``retries``
        left is archived and submitted again; a job pending past its spec's ``max_pending`` is cancelled and
        submitted to the next offer of its plan. The wait loop does this every round; call it when polling
        by hand. Returns the state afterwards."""
        refresh([self])
        advance([self])
        return self._record.state

    @property
    def reason(self) -> str | None:
        return self._record.reason

    def done(self) -> bool:
        return self.status().terminal

    def wait(self, timeout: float | None = None, *, progress: bool | None = None) -> JobState:
        """Block until the job ends (or ``timeout`` seconds pass: TimeoutError). Returns the final state."""
        wait([self], timeout=timeout, progress=progress)
        return self._record.state

    def result(self, timeout: float | None = None) -> R:
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

    def _outcome(self) -> R:
        rec = self._record
        d = self.job_dir
        if rec.state is JobState.SUCCEEDED:
            if rec.kind == "function":
                from ._transport import load_result

                value: R = load_result(d, self.id, rec.reason)  # checked against the exit record before unpickling
                return value
            return 0  # type: ignore[return-value]  # a command job is a Job[int]; R is int there
        where = f" on {rec.backend}" + (f" ({rec.where})" if rec.where else "")
        if rec.state is JobState.CANCELLED:
            raise JobCancelled(f"job {self.id} ({rec.name}) was cancelled{where}: {rec.reason or 'cancelled'}", self.id)
        if rec.state is JobState.LOST:
            raise JobLost(f"job {self.id} ({rec.name}) was lost{where}: {rec.reason or 'no outcome recorded'}", self.id)
        err = _read_json(d / "error.json") if rec.kind == "function" else None
        tb = err.get("traceback") if err else None
        etype = err.get("type") if err else None
        if err:
            msg = f"job {self.id} ({rec.name}) failed{where}: {etype}: {_cap(str(err.get('message', '')), 2000)}"
        else:
            msg = f"job {self.id} ({rec.name}) {rec.state.value}{where}: {rec.reason or 'no reason given'}"
            tail = self._failure_tail()
            if tail.strip():
                msg += "\n\nEnd of its output:\n" + tail.rstrip()
        cls = JobTimeout if rec.state is JobState.TIMEOUT else JobFailed
        raise cls(msg, self.id, remote_traceback=tb, remote_type=etype, exit_code=rec.exit_code, state=rec.state.value)

    # ---- output
    def logs(self, *, follow: bool = False, tail: int | None = None, max_bytes: int | None = None) -> Any:
        """The output so far as text; with ``follow=True`` an iterator of chunks until the job ends.

        ``tail=N`` starts at the last N lines, ``max_bytes`` at most that many bytes from the end (both may be
        given: whichever is shorter). The output is read from the end of the log, never loaded whole: a job
        may write gigabytes. Following yields chunks as they are written."""
        _check_tail(tail, max_bytes)
        it = self._log_iter(follow, tail, max_bytes)
        if follow:
            return it
        return "".join(it)

    def _log_iter(self, follow: bool, tail: int | None = None, max_bytes: int | None = None) -> Iterator[str]:
        rec = self._record
        local = self.job_dir / "output.log"
        if rec.backend is None or rec.backend_id is None:
            return iter(())
        if rec.backend == "local" and _plain_local_backend():
            from ._config import get_config
            from ._logfile import local_logs

            # what LocalBackend.logs reads, without loading the backend machinery
            return local_logs(get_config().home / "jobs" / rec.backend_id, follow=follow, tail=tail,
                              max_bytes=max_bytes)
        from ._registry import get_backend

        cut = tail is not None or max_bytes is not None
        try:
            b = get_backend(rec.backend)
            ref = self._ref()
            if getattr(b, "logs_from_end", False):  # reads its file lazily, from where the tail begins
                return b.logs(ref, follow=follow, tail=tail, max_bytes=max_bytes)
            if not follow:  # read now, so a backend error is caught here rather than while iterating
                chunks = b.logs(ref, follow=False)
                if cut:
                    return iter([_tail_of(chunks, tail, max_bytes)])
                return iter(["".join(chunks)])
            chunks = b.logs(ref, follow=True)
            return _tail_then_follow(chunks, tail, max_bytes) if cut else chunks
        except BackendError:
            if not follow:
                from ._local import tail_file, tail_offset

                if not local.exists():
                    return iter(())
                return tail_file(local, follow=False, done=lambda: True,
                                 start=tail_offset(local, tail, max_bytes) if cut else 0)
            raise

    def log_tail(self, n: int = 20, max_chars: int = 4000) -> str:
        """The last ``n`` lines of the output (at most ``max_chars`` characters, read from the end)."""
        try:
            text = self.logs(tail=n, max_bytes=max_chars * 4)
        except MeshrunError:
            return ""
        return text[-max_chars:]

    def _failure_tail(self, max_chars: int = FAILURE_TAIL) -> str:
        """The end of the output for a failure message: a capped number of characters (not lines: one line
        of a progress bar may be gigabytes), read from the end of the log, progress (``\\r``) collapsed."""
        from ._agent import log_tail, tail_text

        rec = self._record
        p = self.job_dir / "output.log"
        if rec.backend == "local" or (rec.backend is None and p.exists()):
            return log_tail(str(p), max_chars)
        want = max_chars * 4 + 16384
        try:
            text = self.logs(max_bytes=want)
        except MeshrunError:
            return log_tail(str(p), max_chars) if p.exists() else ""
        return tail_text(text, max_chars, cut=len(text.encode("utf-8", "replace")) >= want)

    # ---- control
    def cancel(self) -> None:
        """Stop the job and everything it started; frees its GPUs. A no-op for a finished job.

        A ``lost`` job (its supervisor died) is cancelled too: whatever it left running is stopped and its
        GPUs are freed. A job still ``submitting`` (its submitter may have died mid-submit) is looked for
        at its backend and cancelled there, so it cannot go on running unseen."""
        rec = self.refresh()
        from ._registry import get_backend

        if self._due is not None:  # its attempt ended and a retry is due: there is nothing left to stop
            self._due = None
            self._store.update(self.id, state=JobState.CANCELLED, ended_at=time.time(),
                               reason="cancelled before its retry (the last attempt had ended)")
            self._store.add_event(self.id, "cancelled", backend=rec.backend)
            self._record = self._store.get(self.id)
            return

        if rec.state is JobState.LOST and rec.backend and rec.backend_id:
            get_backend(rec.backend).cancel(self._ref())
            self._store.update(self.id, state=JobState.CANCELLED, ended_at=time.time(),
                               reason=f"cancelled after it was lost ({rec.reason or 'no outcome recorded'}); "
                                      "what it left running was stopped")
            self._store.add_event(self.id, "cancelled", after="lost", backend=rec.backend)
            self._record = self._store.get(self.id)
            return
        if rec.terminal:
            return
        name = rec.backend
        if rec.backend_id is None or name is None:
            found = None
            if name:
                try:
                    found = get_backend(name).find(self.id, self.job_dir)
                except MeshrunError:
                    found = None
            if found is None or name is None:
                self._store.update(self.id, state=JobState.CANCELLED, reason="cancelled before it was submitted",
                                   ended_at=time.time())
                self._store.add_event(self.id, "cancelled")
                self._record = self._store.get(self.id)
                return
            # the submitter did not record the backend's id (it died mid-submit): the backend has the job
            self._store.update(self.id, backend_id=found)
            self._store.add_event(self.id, "reattached", backend=rec.backend, backend_id=found)
            rec = self._record = self._store.get(self.id)
        asked = time.time()  # the history shows the request when it was made (the end comes at the agent's time)
        get_backend(name).cancel(self._ref())
        self._store.add_event(self.id, "cancel", at=asked, backend=name)
        # the backend may take a moment to report it; record the outcome we asked for if it goes quiet
        deadline = time.monotonic() + 30
        while not self.refresh().terminal and time.monotonic() < deadline:
            time.sleep(0.1)
        if not self._record.terminal:
            self._store.update(self.id, state=JobState.CANCELLED, reason="cancelled (backend confirmation pending)",
                               ended_at=time.time())
            self._record = self._store.get(self.id)

    # ---- async
    def __await__(self) -> Generator[Any, None, R]:
        import asyncio

        return asyncio.get_running_loop().run_in_executor(None, self.result).__await__()

    # ---- display
    def __repr__(self) -> str:
        r = self._record
        code = f", exit code {r.exit_code}" if r.exit_code is not None else ""
        return f"<meshrun.Job {self.id} {r.name!r} {r.state.value}{code} on {r.backend}>"

    def _repr_html_(self) -> str:
        import html

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
        from ._tracking import html_links  # experiment tracking: the job's runs, linked

        if tracked := html_links(self.job_dir):
            rows.append(("tracking", tracked))
        body = "".join(
            f'<tr><th style="text-align:left;padding-right:1em">{k}</th><td style="text-align:left">'
            f"{v if k in ('state', 'backend', 'what', 'tracking') else html.escape(str(v))}</td></tr>"
            for k, v in rows
        )
        tail = html.escape(self.log_tail(8)) if r.state is not JobState.SUBMITTING else ""
        logs = (f'<div><b>output</b> (the last 8 lines, at most 4000 characters)</div>'
                f'<pre style="max-height:12em;overflow:auto;margin:0.3em 0">{tail}</pre>') if tail else ""
        return f'<div class="meshrun-job"><b>meshrun.Job</b><table>{body}</table>{logs}</div>'


def _plain_local_backend() -> bool:
    """True when ``get_backend("local")`` would be the built-in local backend made from an empty
    ``[backends.local]`` table, which cannot fail: nothing registered in its place (the registry keeps what
    ``register_backend`` was given; unimported, it holds nothing) and no local setting to check."""
    registry = sys.modules.get("meshrun._registry")
    if registry is not None and "local" in registry._manual:
        return False
    from ._config import get_config

    return not get_config().backend("local")


def _cap(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 15] + " [... cut here]"


def _check_tail(tail: Any, max_bytes: Any) -> None:
    from ._errors import SpecError

    if tail is not None and (isinstance(tail, bool) or not isinstance(tail, int) or tail < 0):
        raise SpecError("tail", f"expected a number of lines >= 0, got {tail!r}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
        raise SpecError("max_bytes", f"expected a number of bytes >= 0, got {max_bytes!r}")


def _cut(text: str, tail: int | None, max_bytes: int | None) -> str:
    """The end of ``text``: its last ``tail`` lines and at most ``max_bytes`` bytes (utf-8)."""
    if max_bytes is not None:
        b = text.encode("utf-8", "surrogatepass")
        if len(b) > max_bytes:
            text = b[len(b) - max_bytes:].decode("utf-8", "replace").lstrip("\ufffd")
    if tail is not None:
        if tail == 0:
            return ""
        body = text[:-1] if text.endswith("\n") else text
        idx = len(body)
        for _ in range(tail):
            idx = body.rfind("\n", 0, idx)
            if idx < 0:
                return text
        text = text[idx + 1:]
    return text


def _tail_of(chunks: Iterable[str], tail: int | None, max_bytes: int | None) -> str:
    """The end of a stream of chunks, keeping only a bounded amount in memory when ``max_bytes`` is given
    (and, for ``tail`` alone, whatever the last lines hold)."""
    keep = ""
    limit = None if max_bytes is None else max_bytes + 4
    for c in chunks:
        keep += c
        if limit is not None and len(keep) > 2 * limit:
            keep = keep[-limit:]
        elif tail is not None and limit is None and len(keep) > (1 << 20):
            keep = _cut(keep, tail + 1, None)
    return _cut(keep, tail, max_bytes)


def _tail_then_follow(chunks: Iterator[str], tail: int | None, max_bytes: int | None) -> Iterator[str]:
    """For a backend that cannot seek: the end of the first chunk (the output so far), then the rest."""
    first = True
    for c in chunks:
        if first:
            first = False
            c = _cut(c, tail, max_bytes)
        if c:
            yield c


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
    by_backend: dict[str, list[Job]] = {}
    for j in jobs:
        j._due = None
        j._record = j._store.get(j.id)
        if j._record.terminal:
            continue
        if j._record.backend is None:
            continue
        by_backend.setdefault(j._record.backend, []).append(j)
    if not by_backend:
        return  # every job's outcome is recorded: no backend is loaded
    if "local" in by_backend and _plain_local_backend():
        # the built-in local backend: what its agent recorded is read here, without loading the backend
        # machinery (its dataclasses import inspect: 15-30 ms of a `meshrun ls` that finds jobs just ended)
        rest = [j for j in by_backend["local"] if not _local_settled(j)]
        if rest:
            by_backend["local"] = rest
        else:
            del by_backend["local"]
        if not by_backend:
            return
    from ._backend import JobStatus
    from ._registry import get_backend

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
                    found = backend.find(j.id, j.job_dir)
                    if found:
                        j._store.update(j.id, backend=bname, backend_id=found, state=JobState.PENDING,
                                        submitted_at=time.time())
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
            statuses = backend.status([j._ref() for j in todo])
        except BackendError as e:
            for j in todo:
                j._record.reason = f"status unavailable: {e}"
            continue
        for j in todo:
            st = statuses.get(j._record.backend_id)
            if st is not None:
                _apply(j, st, backend)


class _AgentStatus:
    """A local job's status from its agent's records: the fields of a ``JobStatus`` that :func:`_apply` reads."""

    __slots__ = ("state", "reason", "exit_code", "started_at", "ended_at", "where", "detail")
    state: JobState

    def __init__(self, fields: dict[str, Any]):
        for k in self.__slots__:
            setattr(self, k, fields.get(k))

    @property
    def terminal(self) -> bool:
        return bool(self.state.terminal)


def _local_settled(job: Job) -> bool:
    """Bring a job of the built-in local backend up to date from its agent's records alone; False when they
    need the backend itself (no backend id yet, a lost supervisor, a record that cannot be read)."""
    if job._record.backend_id is None:
        return False
    from ._state import agent_status_fields

    rec = _read_json(job.job_dir / "exit.json")  # the agent's exit record settles it (what job_status returns)
    if not isinstance(rec, dict):  # not ended: whether its supervisor still lives is the agent's question
        from . import _agent

        rec = _agent.job_status(str(job.job_dir))
    fields = agent_status_fields(rec) if isinstance(rec, dict) else None
    if fields is None or fields["state"] in (JobState.LOST, JobState.UNKNOWN):
        return False  # local_status's corrections (a complete result, a full disk) apply: the full path
    status: Any = _AgentStatus(fields)  # read by _apply as a JobStatus
    _apply(job, status, None)  # no backend: a local job's results are in its folder already
    return True


def advance(jobs: Sequence[Job]) -> None:
    """The retry and failover policy, once, for jobs just refreshed: a failed attempt with retries left is
    submitted again, a job pending past ``max_pending`` moves to the next offer of its plan
    (:mod:`meshrun._attempts` does both, under the job folder's lock)."""
    if not any(j._due is not None or j._record.state is JobState.PENDING for j in jobs):
        return  # nothing to do: reading finished jobs loads no placement machinery
    from ._attempts import failover_if_stuck, retry

    for j in jobs:
        due, j._due = j._due, None
        if due is not None:
            retry(j._store, j._record, j.job_dir, due)
        elif j._record.state is JobState.PENDING:
            failover_if_stuck(j._store, j._record, j.job_dir)
        else:
            continue
        j._record = j._store.get(j.id)


def _apply(job: Job, st: JobStatus, backend: Any) -> None:
    rec = job._record
    if st.state is JobState.UNKNOWN:
        return
    if st.state is JobState.LOST and rec.kind == "function":
        st = _complete_result_wins(job, st, backend)
    if st.terminal and st.state is not rec.state:
        from ._retries import retries_left

        left = retries_left(rec, job.job_dir, st)
        if left:
            # not the job's outcome: the attempt is retried by whoever advances the job (the wait loop);
            # until then the record stays as it was, with the news in the reason
            job._due = st
            job._record.reason = (f"attempt {rec.attempt} {st.state.value}" + (f" ({st.reason})" if st.reason else "")
                                  + f"; a retry is due ({left} left)")
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
    if st.terminal and backend is not None:
        try:
            backend.fetch_results(job._ref(), job.job_dir)
        except BackendError as e:
            changes["reason"] = f"{st.reason or st.state.value}; results could not be fetched: {e}"
    if st.terminal:
        # the agent's own exit record is the authority on the exit code and the times (a scheduler may not
        # know them yet)
        ex = _read_json(job.job_dir / "exit.json")
        if isinstance(ex, dict) and st.state.value == ex.get("state"):
            if st.exit_code is None and isinstance(ex.get("exit_code"), int) and ex["exit_code"] != rec.exit_code:
                changes["exit_code"] = ex["exit_code"]
            if not st.reason and ex.get("reason") and "reason" not in changes:
                changes["reason"] = ex["reason"]
            if _is_time(ex.get("started_at")) and not rec.started_at:
                changes.setdefault("started_at", ex["started_at"])
            if _is_time(ex.get("ended_at")) and not st.ended_at:
                changes["ended_at"] = ex["ended_at"]
        changes.setdefault("ended_at", st.ended_at or time.time())
    if not changes:
        return
    events: list[tuple[str, float | None, dict[str, Any]]] = []
    if "state" in changes:
        # the history says when things happened as the agent (or scheduler) recorded them, not when we looked
        started = changes.get("started_at") or rec.started_at
        if st.terminal:
            if started and not any(h.get("event") == JobState.RUNNING.value for h in rec.history):
                events.append((JobState.RUNNING.value, started, {}))
            end = changes.get("ended_at")
            if end is not None and started:
                end = max(end, started)  # a start seen only by polling may come after the agent's end
            events.append((st.state.value, end, {"reason": st.reason, "where": st.where}))
        else:
            at = started if st.state is JobState.RUNNING else None
            events.append((st.state.value, at, {"reason": st.reason, "where": st.where}))
    try:
        job._store.update(job.id, **changes)
        for event, at, data in events:
            job._store.add_event(job.id, event, at=at, **data)
    except StoreError as e:
        if e.kind != "full":
            raise
        # a full disk: show the news all the same (the index catches up once there is room again)
        for k, v in changes.items():
            setattr(job._record, k, v)
        return
    job._record = job._store.get(job.id)
    if st.terminal:
        from ._store import clean_temp_files

        clean_temp_files(job.job_dir)


def _is_time(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _complete_result_wins(job: Job, st: JobStatus, backend: Any) -> JobStatus:
    """A function job reported lost whose complete result is on disk (its supervisor died between the
    worker's end and the exit record) succeeded: its result is returned, not a JobLost."""
    from ._agent import result_complete
    from ._backend import JobStatus

    p = job.job_dir / "result.pkl"
    if not p.exists():
        try:
            backend.fetch_results(job._ref(), job.job_dir)
        except BackendError:
            return st
    if not result_complete(p):
        return st
    return JobStatus(JobState.SUCCEEDED, reason="its supervisor ended before writing the exit record; the "
                     "result is complete", exit_code=0, started_at=st.started_at, ended_at=st.ended_at,
                     where=st.where)


def wait(
    jobs: Iterable[Job[R]],
    timeout: float | None = None,
    *,
    progress: bool | None = None,
    on_change: Callable[[Job[R]], None] | None = None,
) -> list[Job[R]]:
    """Wait for all ``jobs`` to end, polling each backend once per round with a growing interval."""
    jobs = list(jobs)
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    if progress is None:
        progress = _interactive()
    shown = False
    last_states: dict[str, JobState] = {}
    while True:
        refresh(jobs)
        advance(jobs)  # the explicit place where failed attempts are retried and stuck jobs move
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
        from ._registry import get_backend

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


def gather(jobs: Iterable[Job[R]], timeout: float | None = None) -> list[R]:
    """Results of many jobs, in order; the first failure is raised after all have ended."""
    jobs = list(jobs)
    wait(jobs, timeout=timeout)
    return [j._outcome() for j in jobs]
