"""The job store: SQLite (WAL) for the index, one folder per job for everything else.

Layout under ``MESHRUN_HOME``::

    jobs.db                 one row per job: id, name, backend, backend id, state, times, history
    jobs/<id>/spec.json     the spec as JSON
    jobs/<id>/launch.json   what the host agent reads
    jobs/<id>/payload.pkl   function jobs: the pickled (fn, args, kwargs)
    jobs/<id>/output.log    the job's output (local jobs; remote ones are fetched into it)
    jobs/<id>/exit.json     the outcome, written once by the agent
    jobs/<id>/result.pkl    function jobs: the return value (or error.json / error.pkl)
    jobs/<id>/backend.json  where it was submitted (backend, backend id), so the index can be rebuilt

Every write is a single transaction or an atomic rename, so a ``kill -9`` of the submitting process at any
moment leaves the store consistent: a job is either absent, or present with a folder and a state.

The index is only a cache of the folders: opening it writes nothing unless it must be created (so reading
works on a full disk), a damaged or missing one is reported as a :class:`StoreError` naming the file, and
:meth:`Store.rebuild` (``meshrun doctor --rebuild``) builds it again from the job folders.
"""

from __future__ import annotations

import _thread  # threading's lock and local, without importing threading (a CLI start)
import builtins
import errno
import json
import os
import re
import sqlite3
import sys
import time
from pathlib import Path

from ._errors import JobNotFound, MeshrunError
from ._state import JobState

TYPE_CHECKING = False  # typing is not imported at run time (the CLI must start fast)
if TYPE_CHECKING:
    from typing import Any, Iterable, Sequence

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    summary TEXT NOT NULL DEFAULT '',
    backend TEXT,
    backend_id TEXT,
    state TEXT NOT NULL,
    reason TEXT,
    exit_code INTEGER,
    where_ TEXT,
    created_at REAL NOT NULL,
    submitted_at REAL,
    started_at REAL,
    ended_at REAL,
    array_id TEXT,
    array_index INTEGER,
    attempt INTEGER NOT NULL DEFAULT 1,
    history TEXT NOT NULL DEFAULT '[]',
    user TEXT,
    pid INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_array ON jobs (array_id);
"""

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_EPOCH_MS = 1_704_067_200_000
REBUILD_HINT = "meshrun doctor --rebuild"


class StoreError(MeshrunError):
    """The job store cannot be used as it is: a damaged or missing index, or a full disk. ``path`` names the
    file; ``kind`` is "damaged", "missing", "full" or "other"."""

    def __init__(self, message: str, *, path: Path | str | None = None, kind: str = "other"):
        super().__init__(message)
        self.path = str(path) if path is not None else None
        self.kind = kind


def new_job_id() -> str:
    """12 characters, sortable by creation time: 8 of milliseconds since 2024, 4 random."""
    ms = int(time.time() * 1000) - _EPOCH_MS
    head = ""
    for _ in range(8):
        ms, r = divmod(ms, 36)
        head = _ALPHABET[r] + head
    import secrets

    return head + "".join(secrets.choice(_ALPHABET) for _ in range(4))


class JobRecord:
    """One row of the job index (with the job's folder). A plain class, not a dataclass: ``meshrun ls`` and
    ``status`` build these and must not pay for importing ``dataclasses``."""

    __match_args__ = _FIELDS = (
        "id", "name", "kind", "summary", "backend", "backend_id", "state", "reason", "exit_code", "where",
        "created_at", "submitted_at", "started_at", "ended_at", "array_id", "array_index", "attempt", "history",
        "user", "pid", "job_dir",
    )

    def __init__(self, id: str, name: str, kind: str, summary: str, backend: str | None, backend_id: str | None,
                 state: JobState, reason: str | None, exit_code: int | None, where: str | None, created_at: float,
                 submitted_at: float | None, started_at: float | None, ended_at: float | None,
                 array_id: str | None, array_index: int | None, attempt: int,
                 history: list[dict[str, Any]] | None = None, user: str | None = None, pid: int | None = None,
                 job_dir: Path | None = None) -> None:
        self.id = id
        self.name = name
        self.kind = kind
        self.summary = summary
        self.backend = backend
        self.backend_id = backend_id
        self.state = state
        self.reason = reason
        self.exit_code = exit_code
        self.where = where
        self.created_at = created_at
        self.submitted_at = submitted_at
        self.started_at = started_at
        self.ended_at = ended_at
        self.array_id = array_id
        self.array_index = array_index
        self.attempt = attempt
        self.history: list[dict[str, Any]] = [] if history is None else history
        self.user = user
        self.pid = pid
        self.job_dir = job_dir

    def __repr__(self) -> str:
        return f"JobRecord({', '.join(f'{k}={getattr(self, k)!r}' for k in self._FIELDS)})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self._FIELDS)

    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass with eq is

    @property
    def terminal(self) -> bool:
        return self.state.terminal


_COLUMNS = (
    "id name kind summary backend backend_id state reason exit_code where_ created_at submitted_at "
    "started_at ended_at array_id array_index attempt history user pid"
).split()


class Store:
    def __init__(self, home: Path | str):
        self.home = Path(home).expanduser()
        self.jobs_dir = self.home / "jobs"
        self._local = _thread._local()
        self._init_lock = _thread.allocate_lock()
        self._ready = False

    # ---- connection per thread and process (sqlite connections must not cross either)
    @property
    def db_path(self) -> Path:
        return self.home / "jobs.db"

    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is not None and self._local.pid == os.getpid():
            return c
        with self._init_lock:
            if not self._ready:
                self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
                make_private(self.home)
        try:
            c = self._open()
        except sqlite3.Error as e:
            if _code(e) not in ("SQLITE_IOERR", "SQLITE_FULL", "SQLITE_CANTOPEN", "SQLITE_READONLY"):
                raise self._error(e) from None
            # a full disk (or a read-only one) cannot hold the shared-memory index that WAL readers need:
            # read the file as it is, without it; writes then fail with a clear StoreError
            return self._open_readonly(e)
        self._local.conn = c
        self._local.pid = os.getpid()
        return c

    def _open(self) -> sqlite3.Connection:
        c = sqlite3.connect(str(self.db_path), timeout=30.0, isolation_level=None)
        try:
            c.execute("PRAGMA busy_timeout = 30000")
            c.execute("PRAGMA synchronous = NORMAL")
            with self._init_lock:
                if not self._ready:
                    self._prepare(c)
                    self._ready = True
        except BaseException:
            c.close()
            raise
        return c

    def _prepare(self, c: sqlite3.Connection) -> None:
        """Check the index once per process; create or migrate it only when needed (a read-only use of an
        existing index writes nothing)."""
        ver = c.execute("PRAGMA user_version").fetchone()[0]
        if ver > SCHEMA_VERSION:
            raise StoreError(
                f"the job store at {self.home} was written by a newer meshrun (schema {ver}); upgrade meshrun",
                path=self.db_path,
            )
        if ver == SCHEMA_VERSION:
            if c.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                c.execute("PRAGMA journal_mode = WAL")
            return
        if c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone() is None:
            n = len(self.folder_ids(limit=1))
            if n:
                raise StoreError(
                    f"the job index {self.db_path} is missing or empty, but job folders exist in {self.jobs_dir}; "
                    f"rebuild the index from them with `{REBUILD_HINT}`",
                    path=self.db_path,
                    kind="missing",
                )
        c.execute("PRAGMA journal_mode = WAL")
        c.executescript(_SCHEMA)
        c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _open_readonly(self, first: sqlite3.Error) -> sqlite3.Connection:
        if not self.db_path.exists():
            raise self._error(first) from None
        uri = "file:" + _uri_path(self.db_path) + "?mode=ro&immutable=1"
        try:
            c = sqlite3.connect(uri, uri=True, isolation_level=None)
            ver = c.execute("PRAGMA user_version").fetchone()[0]
            if ver != SCHEMA_VERSION:
                c.close()
                raise self._error(first) from None
        except sqlite3.Error as e:
            raise self._error(e) from None
        return c  # not kept: once there is room again the next call opens the index the ordinary way

    def _error(self, e: BaseException) -> StoreError:
        """One clear error for a failed use of the index: which file, what is wrong, what to do."""
        if isinstance(e, StoreError):
            return e
        code = _code(e) if isinstance(e, sqlite3.Error) else None
        db = self.db_path
        if code in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
            return StoreError(
                f"the job index {db} is damaged ({e}); rebuild it from the job folders with `{REBUILD_HINT}` "
                "(which keeps the damaged file beside it)",
                path=db,
                kind="damaged",
            )
        if code == "SQLITE_FULL" or (code in ("SQLITE_IOERR", "SQLITE_READONLY") and _no_room(self.home)):
            return StoreError(
                f"the disk holding the job store {self.home} is full ({e}); free some space there "
                "(reading jobs still works: meshrun ls, status, logs)",
                path=db,
                kind="full",
            )
        return StoreError(f"the job index {db} cannot be used: {e}", path=db)

    def _run(self, fn: Any) -> Any:
        """Run ``fn(connection)``, turning sqlite's errors into one clear StoreError."""
        c = self._conn()
        try:
            return fn(c)
        except sqlite3.Error as e:
            try:
                if c.in_transaction:
                    c.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise self._error(e) from None
        finally:
            if c is not getattr(self._local, "conn", None):
                c.close()  # a read-only fallback connection

    def folder_ids(self, limit: int | None = None) -> list[str]:
        """Ids of the job folders on disk (folders holding a launch.json or spec.json)."""
        out: list[str] = []
        try:
            it = os.scandir(self.jobs_dir)
        except OSError:
            return out
        with it:
            for e in it:
                if e.is_dir(follow_symlinks=False) and (
                    os.path.exists(os.path.join(e.path, "launch.json")) or os.path.exists(os.path.join(e.path, "spec.json"))
                ):
                    out.append(e.name)
                    if limit is not None and len(out) >= limit:
                        break
        return out
    def open(self) -> None:
        """Open the store now: its directory is created or checked (``make_private``) before anything else
        writes under it."""
        self._conn()

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    # ---- writes
    def create(
        self,
        *,
        name: str,
        kind: str,
        summary: str,
        backend: str | None,
        array_id: str | None = None,
        array_index: int | None = None,
        files: dict[str, bytes] | None = None,
        job_id: str | None = None,
    ) -> JobRecord:
        """Make the job's folder with its files, then its row (state SUBMITTING), in that order: a folder
        without a row is invisible garbage; a row always has its folder."""
        self._run(lambda c: None)
        job_id = job_id or new_job_id()
        d = self.job_dir(job_id)
        try:
            d.mkdir(mode=0o700)
            for fname, data in (files or {}).items():
                _atomic_write(d / fname, data)
        except OSError as e:
            _remove_tree(d)  # nothing half-made left behind
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError(f"the disk holding the job store {self.home} is full ({e}); free some space there",
                                 path=d, kind="full") from None
            raise
        now = time.time()
        rec = JobRecord(
            id=job_id,
            name=name,
            kind=kind,
            summary=summary,
            backend=backend,
            backend_id=None,
            state=JobState.SUBMITTING,
            reason=None,
            exit_code=None,
            where=None,
            created_at=now,
            submitted_at=None,
            started_at=None,
            ended_at=None,
            array_id=array_id,
            array_index=array_index,
            attempt=1,
            history=[],
            user=_user(),
            pid=os.getpid(),
            job_dir=d,
        )
        try:
            self._run(lambda c: c.execute(
                f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                _row_values(rec),
            ))
        except StoreError:
            _remove_tree(d)
            raise
        return rec

    def update(self, job_id: str, **fields: Any) -> None:
        if not fields:
            return
        cols = []
        vals = []
        for k, v in fields.items():
            col = "where_" if k == "where" else k
            if col not in _COLUMNS or col == "id":
                raise ValueError(f"unknown job column {k}")
            if isinstance(v, JobState):
                v = v.value
            if col == "history":
                v = json.dumps(v)
            cols.append(f"{col} = ?")
            vals.append(v)
        vals.append(job_id)
        self._run(lambda c: c.execute(f"UPDATE jobs SET {', '.join(cols)} WHERE id = ?", vals))
        if fields.get("backend_id") is not None:
            self._note_backend(job_id, fields.get("backend"), fields["backend_id"])
        if "state" in fields and JobState(fields["state"]).terminal:
            # experiment tracking: close the job's tracked runs (a no-op for an untracked job)
            from ._tracking import job_ended

            job_ended(self, job_id)

    def _note_backend(self, job_id: str, backend: str | None, backend_id: str) -> None:
        """Keep where the job was submitted in its folder too (``backend.json``), for rebuilding the index."""
        if backend is None:
            backend = self.get(job_id).backend
        try:
            _atomic_write(self.job_dir(job_id) / "backend.json",
                          (json.dumps({"backend": backend, "backend_id": backend_id}) + "\n").encode())
        except OSError:
            pass  # only a hint for a rebuild; the index has it

    def add_event(self, job_id: str, event: str, *, at: float | None = None, **data: Any) -> None:
        """Add to the job's history (submits, failovers, state changes) in one transaction. ``at`` is when it
        happened (default: now); the history stays in time order."""
        entry = {"time": time.time() if at is None else float(at), "event": event, **data}

        def txn(c: sqlite3.Connection) -> None:
            c.execute("BEGIN IMMEDIATE")
            row = c.execute("SELECT history FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                c.execute("ROLLBACK")
                raise JobNotFound(f"no job {job_id!r} in the job store at {self.home}", job_id)
            hist = json.loads(row[0] or "[]")
            i = len(hist)
            while i > 0 and float(hist[i - 1].get("time") or 0) > entry["time"]:
                i -= 1
            hist.insert(i, entry)
            c.execute("UPDATE jobs SET history = ? WHERE id = ?", (json.dumps(hist), job_id))
            c.execute("COMMIT")

        self._run(txn)

    # ---- reads
    def get(self, job_id: str) -> JobRecord:
        sel = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
        row = self._run(lambda c: c.execute(f"{sel} WHERE id = ?", (job_id,)).fetchone())
        if row is None:
            matches = self._run(lambda c: c.execute(
                f"{sel} WHERE id LIKE ? ORDER BY created_at DESC LIMIT 2",
                (job_id.replace("%", "").replace("_", "") + "%",),
            ).fetchall()) if len(job_id) >= 4 else []
            if len(matches) == 1:
                row = matches[0]
            else:
                extra = " (the prefix matches several jobs)" if len(matches) > 1 else ""
                if not extra and "/" not in job_id and (self.job_dir(job_id) / "launch.json").exists():
                    extra = (f" although its folder {self.job_dir(job_id)} exists: the index is incomplete; "
                             f"rebuild it with `{REBUILD_HINT}`")
                raise JobNotFound(f"no job {job_id!r} in the job store at {self.home}{extra}", job_id)
        return self._record(row)

    def list(
        self,
        *,
        limit: int | None = 50,
        states: Iterable[JobState] | None = None,
        array_id: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[JobRecord]:
        where, args = [], []
        if states is not None:
            st = [s.value for s in states]
            where.append(f"state IN ({', '.join('?' * len(st))})")
            args += st
        if array_id is not None:
            where.append("array_id = ?")
            args.append(array_id)
        if ids is not None:
            where.append(f"id IN ({', '.join('?' * len(ids))})")
            args += list(ids)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [self._record(r) for r in self._run(lambda c: c.execute(sql, args).fetchall())]

    def search(
        self,
        *,
        limit: int = 50,
        offset: int = 0,
        states: Iterable[JobState] | None = None,
        backend: str | None = None,
        name: str | None = None,
        user: str | None = None,
        array_id: str | None = None,
    ) -> tuple[builtins.list[JobRecord], int]:
        """One page of jobs, newest first, and how many match: ``name`` is a substring of the job's name,
        the other filters are exact. Each page is one indexed query, however many jobs the store holds."""
        where, args = [], []
        if states is not None:
            st = [s.value for s in states]
            where.append(f"state IN ({', '.join('?' * len(st))})")
            args += st
        for col, val in (("backend", backend), ("user", user), ("array_id", array_id)):
            if val:
                where.append(f"{col} = ?")
                args.append(val)
        if name:
            where.append("instr(name, ?) > 0")
            args.append(name)
        cond = (" WHERE " + " AND ".join(where)) if where else ""
        sql = (f"SELECT {', '.join(_COLUMNS)} FROM jobs{cond} ORDER BY created_at DESC, id DESC "
               f"LIMIT {max(0, int(limit))} OFFSET {max(0, int(offset))}")

        def q(c: sqlite3.Connection) -> tuple[builtins.list[Any], int]:
            rows = c.execute(sql, args).fetchall()
            total = len(rows) + offset if (len(rows) < limit and (rows or not offset)) else \
                int(c.execute(f"SELECT COUNT(*) FROM jobs{cond}", args).fetchone()[0])
            return rows, total

        rows, total = self._run(q)
        return [self._record(r) for r in rows], total

    def distinct(self, column: str) -> builtins.list[str]:
        """The values a column takes (``backend``, ``user`` or ``state``), sorted, for filters."""
        if column not in ("backend", "user", "state"):
            raise ValueError(f"no filter on column {column}")
        rows = self._run(lambda c: c.execute(
            f"SELECT DISTINCT {column} FROM jobs WHERE {column} IS NOT NULL ORDER BY {column}").fetchall())
        return [str(r[0]) for r in rows]

    def count(self, *, states: Iterable[JobState] | None = None) -> int:
        """How many jobs the index holds (in these states)."""
        sql, args = "SELECT COUNT(*) FROM jobs", []
        if states is not None:
            st = [s.value for s in states]
            sql += f" WHERE state IN ({', '.join('?' * len(st))})"
            args += st
        return int(self._run(lambda c: c.execute(sql, args).fetchone()[0]))

    def _record(self, row: Sequence[Any]) -> JobRecord:
        d = dict(zip(_COLUMNS, row))
        return JobRecord(
            id=d["id"],
            name=d["name"],
            kind=d["kind"],
            summary=d["summary"],
            backend=d["backend"],
            backend_id=d["backend_id"],
            state=JobState(d["state"]),
            reason=d["reason"],
            exit_code=d["exit_code"],
            where=d["where_"],
            created_at=d["created_at"],
            submitted_at=d["submitted_at"],
            started_at=d["started_at"],
            ended_at=d["ended_at"],
            array_id=d["array_id"],
            array_index=d["array_index"],
            attempt=d["attempt"],
            history=json.loads(d["history"] or "[]"),
            user=d["user"],
            pid=d["pid"],
            job_dir=self.job_dir(d["id"]),
        )

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    # ---- repair (meshrun doctor)
    def check(self) -> dict[str, Any]:
        """The index against the folders: ``ok``, ``error`` (a StoreError's text), ``rows``, ``folders``,
        ``rows_without_folder`` and ``folders_without_row`` (ids), ``temp_files_removed``."""
        out: dict[str, Any] = {"db": str(self.db_path), "ok": True, "error": None}
        folders = set(self.folder_ids())
        out["folders"] = len(folders)
        removed: list[str] = []
        for jid in sorted(folders):
            removed += [str(p) for p in clean_temp_files(self.job_dir(jid))]
        out["temp_files_removed"] = removed
        try:
            ids = set(self._run(lambda c: [r[0] for r in c.execute("SELECT id FROM jobs").fetchall()]))
            bad = self._run(lambda c: c.execute("PRAGMA quick_check").fetchone()[0])
            if bad != "ok":
                raise StoreError(f"the job index {self.db_path} is damaged ({bad}); rebuild it from the job "
                                 f"folders with `{REBUILD_HINT}`", path=self.db_path, kind="damaged")
        except StoreError as e:
            out.update(ok=False, error=str(e), kind=e.kind, rows=None, rows_without_folder=[],
                       folders_without_row=sorted(folders))
            return out
        out["rows"] = len(ids)
        out["rows_without_folder"] = sorted(ids - folders - {i for i in ids if self.job_dir(i).is_dir()})
        out["folders_without_row"] = sorted(folders - ids)
        if out["rows_without_folder"] or out["folders_without_row"]:
            out["ok"] = False
        return out

    def rebuild(self) -> dict[str, Any]:
        """Build the index again from the job folders (spec.json, launch.json, backend.json, state.json,
        exit.json, result.pkl). Rows still readable in the old index are kept as they are (with their
        history); the old file is moved aside (``jobs.db.old-<time>``), never deleted."""
        old_rows = self._salvage()
        self.close()
        with self._init_lock:
            self._ready = False
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.home / f"jobs.db.rebuild.{os.getpid()}"
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)
        kept = rebuilt = 0
        skipped: list[str] = []
        c = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            c.executescript(_SCHEMA)
            c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            c.execute("BEGIN")
            for jid in sorted(self.folder_ids()):
                clean_temp_files(self.job_dir(jid))
                row = old_rows.get(jid)
                if row is not None:
                    kept += 1
                else:
                    rec = record_from_folder(self.job_dir(jid))
                    if rec is None:
                        skipped.append(jid)
                        continue
                    row = _row_values(rec)
                    rebuilt += 1
                c.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", row)
            c.execute("COMMIT")
            c.execute("PRAGMA journal_mode = WAL")
        finally:
            c.close()
        moved = None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        try:  # the new index is as private as the old one was
            os.chmod(tmp, self.db_path.stat().st_mode & 0o777)
        except OSError:
            os.chmod(tmp, 0o600)
        if self.db_path.exists():
            moved = self.home / f"jobs.db.old-{stamp}"
        for suffix in ("", "-wal", "-shm"):  # an old WAL must never be replayed into the new file
            src = Path(str(self.db_path) + suffix)
            if src.exists():
                os.replace(src, Path(str(self.home / f"jobs.db.old-{stamp}") + suffix))
        os.replace(tmp, self.db_path)
        return {"db": str(self.db_path), "kept": kept, "rebuilt": rebuilt, "skipped": skipped,
                "old": str(moved) if moved else None}

    def _salvage(self) -> dict[str, builtins.list[Any]]:
        """Rows of the current index that can still be read (none when it is unreadable)."""
        if not self.db_path.exists():
            return {}
        try:
            c = sqlite3.connect("file:" + _uri_path(self.db_path) + "?mode=ro", uri=True, isolation_level=None)
        except sqlite3.Error:
            return {}
        out: dict[str, list[Any]] = {}
        try:
            if c.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                return {}
            for r in c.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs"):
                if self.job_dir(r[0]).is_dir():
                    out[r[0]] = list(r)
        except sqlite3.Error:
            pass  # keep what was read before the damage
        finally:
            c.close()
        return out


def _row_values(rec: JobRecord) -> list[Any]:
    return [
        rec.id,
        rec.name,
        rec.kind,
        rec.summary,
        rec.backend,
        rec.backend_id,
        rec.state.value,
        rec.reason,
        rec.exit_code,
        rec.where,
        rec.created_at,
        rec.submitted_at,
        rec.started_at,
        rec.ended_at,
        rec.array_id,
        rec.array_index,
        rec.attempt,
        json.dumps(rec.history),
        rec.user,
        rec.pid,
    ]


_TMP = re.compile(r"\.tmp\.(\d+)(?:\.[0-9a-f]+)?$")


def clean_temp_files(job_dir: Path | str, *, min_age: float = 60.0) -> list[Path]:
    """Remove what interrupted writes left in a job folder: ``*.tmp.<pid>`` files whose writer is gone, and
    the exit record's reserved space once the job has ended. Only files older than ``min_age`` seconds (a
    writer on another node of a shared filesystem is not in our process table). Returns what was removed."""
    removed: list[Path] = []
    d = Path(job_dir)
    try:
        entries = list(os.scandir(d))
    except OSError:
        return removed
    names = {e.name for e in entries}
    now = time.time()
    for e in entries:
        m = _TMP.search(e.name)
        reserve = e.name.endswith(".json.reserve")
        if not m and not reserve:
            continue
        try:
            if now - e.stat(follow_symlinks=False).st_mtime < min_age:
                continue
        except OSError:
            continue
        if m and _pid_alive(int(m.group(1))):
            continue
        if reserve:
            base = e.name[: -len(".reserve")]
            state = _read_json(d / base.replace("exit", "state", 1)) if base.startswith("exit") else None
            supervisor_alive = isinstance(state, dict) and _pid_alive(state.get("pid"))
            if base not in names and supervisor_alive:
                continue
        try:
            os.unlink(e.path)
            removed.append(Path(e.path))
        except OSError:
            pass
    return removed


def _remove_tree(d: Path) -> None:
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process
    return True


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_bytes())
    except (OSError, ValueError):
        return None


def _id_time(job_id: str) -> float | None:
    """When a job id was made (its first 8 characters are milliseconds since 2024, base 36)."""
    try:
        ms = int(job_id[:8], 36)
    except ValueError:
        return None
    return (ms + _EPOCH_MS) / 1000.0 if len(job_id) == 12 else None


def record_from_folder(d: Path) -> JobRecord | None:
    """A job's row made from its folder alone (for rebuilding the index); None if it is no job folder."""
    from ._agent import result_complete
    from ._backend import map_agent_status

    jid = d.name
    launch = _read_json(d / "launch.json")
    launch = launch if isinstance(launch, dict) else {}
    name, kind, summary = launch.get("name"), launch.get("kind"), ""
    try:
        from ._spec import JobSpec

        spec = JobSpec.from_json((d / "spec.json").read_text())
        name, kind, summary = spec.display_name, spec.kind, spec.summary()
    except Exception:
        argv = launch.get("argv")
        summary = launch.get("shell") or (" ".join(map(str, argv)) if isinstance(argv, list) else "")
    if not name and not kind:
        return None
    where_rec = _read_json(d / "backend.json")
    where_rec = where_rec if isinstance(where_rec, dict) else {}
    backend, backend_id = where_rec.get("backend"), where_rec.get("backend_id")
    ex = _read_json(d / "exit.json")
    st = _read_json(d / "state.json")
    try:
        created = _id_time(jid) or (d / "launch.json").stat().st_mtime
    except OSError:
        created = time.time()
    now = time.time()
    history: list[dict[str, Any]] = [{"time": now, "event": "rebuilt", "reason": "index rebuilt from the job folder"}]
    fields: dict[str, Any] = {"state": JobState.LOST, "reason": None, "exit_code": None, "where": None,
                              "started_at": None, "ended_at": None}
    if isinstance(st, dict) and backend is None and st.get("host") == _hostname():
        backend, backend_id = "local", jid  # the local backend's id is the job's own
    if isinstance(ex, dict):
        s = map_agent_status(ex)
        fields.update(state=s.state if s.state is not JobState.UNKNOWN else JobState.LOST, reason=s.reason,
                      exit_code=s.exit_code, where=s.where, started_at=s.started_at, ended_at=s.ended_at or now)
    elif kind == "function" and result_complete(str(d / "result.pkl")):
        fields.update(state=JobState.SUCCEEDED, exit_code=0, ended_at=now,
                      reason="its result is complete although no exit record was written")
    elif backend_id:
        # not ended as far as the folder tells: ask the backend at the next refresh
        fields.update(state=JobState.PENDING, started_at=(st or {}).get("started_at") if isinstance(st, dict) else None)
    else:
        fields.update(reason="rebuilt from its folder, which has no exit record and no record of where it "
                             "was submitted", ended_at=now)
    if fields["started_at"]:
        history.insert(0, {"time": fields["started_at"], "event": "running"})
    if fields["state"].terminal:
        history.append({"time": fields["ended_at"], "event": fields["state"].value, "reason": fields["reason"]})
    history.sort(key=lambda h: h["time"])
    try:
        import pwd

        user = pwd.getpwuid(d.stat().st_uid).pw_name
    except (KeyError, OSError, ImportError):
        user = None
    return JobRecord(id=jid, name=str(name or jid), kind=str(kind or "command"), summary=summary,
                     backend=backend, backend_id=backend_id, created_at=created,
                     submitted_at=created if backend_id else None, array_id=None, array_index=None,
                     attempt=1, history=history, user=user, pid=None, job_dir=d, **fields)


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _code(e: sqlite3.Error) -> str | None:
    """The primary sqlite result code's name (SQLITE_CORRUPT, SQLITE_FULL, ...)."""
    name = getattr(e, "sqlite_errorname", None)
    if name:
        return "_".join(name.split("_")[:2])
    msg = str(e).lower()
    for code, words in (("SQLITE_NOTADB", "not a database"), ("SQLITE_CORRUPT", "malformed"),
                        ("SQLITE_FULL", "is full"), ("SQLITE_IOERR", "i/o error")):
        if words in msg:
            return code
    return None


def _no_room(path: Path) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


def _uri_path(p: Path) -> str:
    from urllib.parse import quote

    return quote(str(p.resolve()))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    # no fsync: the store must survive a killed process (the page cache does), not a power cut
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with open(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ---- privacy: the store holds full command lines (tokens, --api-key=...), so only its owner may read it

_DB_FILES = ("jobs.db", "jobs.db-wal", "jobs.db-shm", "jobs.db-journal")
_told: set[str] = set()


def make_private(home: Path) -> None:
    """Make the store under ``home`` readable by its owner only, whatever directory it is and whatever the
    umask: ``home`` and ``home/jobs`` 0700, the index (``jobs.db`` and its -wal/-shm) 0600.

    ``home`` must belong to us (a symlink to a directory of ours is fine); one that is open to other users
    is tightened to 0700, once, with a note on stderr. Nothing under it is followed if it is a symlink or
    belongs to someone else (a user who could write into a loose ``home`` may have planted it): that is a
    ConfigError naming the entry, and nothing is read or written."""
    import stat

    from ._errors import ConfigError

    uid = os.getuid()
    try:
        fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise ConfigError("home", f"the job store directory {home} cannot be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != uid:
            raise ConfigError("home", f"the job store directory {home} belongs to {_owner_name(st.st_uid)}, not to "
                                      f"you (uid {uid}): job records are kept only in a directory of your own; set "
                                      "MESHRUN_HOME (or home in the config) to one")
        if st.st_mode & 0o077:
            try:
                os.fchmod(fd, 0o700)
            except OSError as e:
                raise ConfigError("home", f"the job store directory {home} is open to other users (mode "
                                          f"{stat.S_IMODE(st.st_mode):04o}) and cannot be made 0700: {e.strerror}; "
                                          "set MESHRUN_HOME to a private directory of yours") from None
            if str(home) not in _told:
                _told.add(str(home))
                print(f"meshrun: the job store directory {home} was open to other users (mode "
                      f"{stat.S_IMODE(st.st_mode):04o}); made it 0700", file=sys.stderr)
    finally:
        os.close(fd)
    jobs = home / "jobs"
    try:
        os.mkdir(jobs, 0o700)
    except FileExistsError:
        pass
    _own_entry(jobs, stat.S_ISDIR, "a directory", 0o700)
    for name in _DB_FILES:
        _own_entry(home / name, stat.S_ISREG, "a regular file", 0o600)
    db = home / "jobs.db"
    try:  # created here, 0600, so that SQLite gives its -wal and -shm files the same mode
        fd = os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
    finally:
        os.close(fd)


def _own_entry(path: Path, kind: Any, what: str, mode: int) -> None:
    """``path`` is absent, or ``kind`` (not a symlink) and ours; its mode is narrowed to ``mode``."""
    import stat

    from ._errors import ConfigError

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or not kind(st.st_mode) or st.st_uid != os.getuid():
        found = "a symlink" if stat.S_ISLNK(st.st_mode) else ("not " + what if not kind(st.st_mode) else
                                                              f"owned by {_owner_name(st.st_uid)}")
        raise ConfigError("home", f"{path} is {found}; the job store uses only {what} of its own there (someone may "
                                  "have planted it while the directory was open to others): move it away and retry")
    if stat.S_IMODE(st.st_mode) & ~mode:  # ours and not a symlink (checked above, in a directory only we can change)
        try:
            os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
        except OSError as e:
            raise ConfigError("home", f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}) and "
                                      f"cannot be narrowed: {e.strerror}") from None


def _owner_name(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except Exception:  # pragma: no cover
        return os.environ.get("USER", "?")


_stores: dict[str, Store] = {}
_stores_lock = _thread.allocate_lock()


def get_store(home: Path | str | os.PathLike[str] | None = None) -> Store:
    """The store for ``home`` (default: the configured MESHRUN_HOME), shared within the process."""
    if home is None:
        from ._config import get_config

        home = get_config().home
    key = str(Path(home).expanduser())
    with _stores_lock:
        s = _stores.get(key)
        if s is None:
            s = _stores[key] = Store(key)
        return s
