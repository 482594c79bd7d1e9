"""The job store: SQLite (WAL) for the index, one folder per job for everything else.

Layout under ``MESHRUN_HOME``::

    jobs.db                 one row per job: id, name, backend, backend id, state, times, history
    jobs/<id>/spec.json     the spec as JSON
    jobs/<id>/launch.json   what the host agent reads
    jobs/<id>/payload.pkl   function jobs: the pickled (fn, args, kwargs)
    jobs/<id>/output.log    the job's output (local jobs; remote ones are fetched into it)
    jobs/<id>/exit.json     the outcome, written once by the agent
    jobs/<id>/result.pkl    function jobs: the return value (or error.json / error.pkl)

Every write is a single transaction or an atomic rename, so a ``kill -9`` of the submitting process at any
moment leaves the store consistent: a job is either absent, or present with a folder and a state.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ._backend import JobState
from ._errors import JobNotFound

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


def new_job_id() -> str:
    """12 characters, sortable by creation time: 8 of milliseconds since 2024, 4 random."""
    ms = int(time.time() * 1000) - 1_704_067_200_000
    head = ""
    for _ in range(8):
        ms, r = divmod(ms, 36)
        head = _ALPHABET[r] + head
    return head + "".join(secrets.choice(_ALPHABET) for _ in range(4))


@dataclass
class JobRecord:
    id: str
    name: str
    kind: str
    summary: str
    backend: str | None
    backend_id: str | None
    state: JobState
    reason: str | None
    exit_code: int | None
    where: str | None
    created_at: float
    submitted_at: float | None
    started_at: float | None
    ended_at: float | None
    array_id: str | None
    array_index: int | None
    attempt: int
    history: list[dict[str, Any]] = field(default_factory=list)
    user: str | None = None
    pid: int | None = None
    job_dir: Path | None = None

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
        self._local = threading.local()
        self._init_lock = threading.Lock()
        self._ready = False

    # ---- connection per thread and process (sqlite connections must not cross either)
    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is not None and self._local.pid == os.getpid():
            return c
        with self._init_lock:
            if not self._ready:
                self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
                make_private(self.home)
        c = sqlite3.connect(str(self.home / "jobs.db"), timeout=30.0, isolation_level=None)
        c.execute("PRAGMA busy_timeout = 30000")
        c.execute("PRAGMA journal_mode = WAL")
        c.execute("PRAGMA synchronous = NORMAL")
        with self._init_lock:
            if not self._ready:
                ver = c.execute("PRAGMA user_version").fetchone()[0]
                if ver > SCHEMA_VERSION:
                    raise RuntimeError(
                        f"the job store at {self.home} was written by a newer meshrun (schema {ver}); upgrade meshrun"
                    )
                c.executescript(_SCHEMA)
                c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._ready = True
        self._local.conn = c
        self._local.pid = os.getpid()
        return c

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
        self._conn()
        job_id = job_id or new_job_id()
        d = self.job_dir(job_id)
        d.mkdir(mode=0o700)
        for fname, data in (files or {}).items():
            _atomic_write(d / fname, data)
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
        self._conn().execute(
            f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
            _row_values(rec),
        )
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
        self._conn().execute(f"UPDATE jobs SET {', '.join(cols)} WHERE id = ?", vals)

    def add_event(self, job_id: str, event: str, **data: Any) -> None:
        """Append to the job's history (submits, failovers, state changes) in one transaction."""
        entry = {"time": time.time(), "event": event, **data}
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            row = c.execute("SELECT history FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                c.execute("ROLLBACK")
                raise JobNotFound(f"no job {job_id!r} in the job store at {self.home}", job_id)
            hist = json.loads(row[0] or "[]")
            hist.append(entry)
            c.execute("UPDATE jobs SET history = ? WHERE id = ?", (json.dumps(hist), job_id))
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise

    # ---- reads
    def get(self, job_id: str) -> JobRecord:
        row = self._conn().execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            matches = self._conn().execute(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id LIKE ? ORDER BY created_at DESC LIMIT 2",
                (job_id.replace("%", "").replace("_", "") + "%",),
            ).fetchall() if len(job_id) >= 4 else []
            if len(matches) == 1:
                row = matches[0]
            else:
                extra = " (the prefix matches several jobs)" if len(matches) > 1 else ""
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
        return [self._record(r) for r in self._conn().execute(sql, args).fetchall()]

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
_stores_lock = threading.Lock()


def get_store(home: Path | str | None = None) -> Store:
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
