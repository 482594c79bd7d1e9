"""How a job's records come back to the submitter: one format, one reader, for every backend.

The agent writes a job's records (``meshrun.RESULT_FILES``: ``exit.json``, ``state.json``, ``result.pkl``,
``error.json``, ``error.pkl``) into its job folder. They come back in one of three ways, all read here:

* a shared filesystem: the folder is already here;
* a copy (SFTP, a remote command): the backend writes what it fetched with :func:`write_records`, which
  takes only record names, so a remote host cannot place other files in the job folder;
* the job's log stream, for a backend whose only channel is the log (Kubernetes, SkyPilot, dstack): the job
  runs as ``python3 _agent.py run DIR --emit-records NONCE``, which streams the output and then prints node
  0's records framed with the nonce and a SHA-256 (``_agent.frame_records``). :func:`extract_records` takes
  them out of the log, :class:`LogFilter` / :func:`strip_records` hide the frame from what ``logs()`` shows.

Whatever the way, the result is checked before it is unpickled (:func:`load_result`): the exit record holds
the result's size and SHA-256, so a cut or altered ``result.pkl`` is a :class:`JobLost` that says so.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import io
import json
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from . import _agent
from ._backend import RESULT_FILES
from ._errors import BackendError, JobFailed, JobLost

FRAME = _agent.FRAME
NO_RETRY_EXIT = _agent.EXIT_NO_RETRY
_LINE = re.compile(re.escape(FRAME) + r"(?P<nonce>[A-Za-z0-9_-]+):(?P<rank>\d+):"
                   r"(?:(?P<i>\d+)/(?P<n>\d+):(?P<data>[A-Za-z0-9+/=]*)|sha256=(?P<sha>[0-9a-f]{64}))::")


class RecordError(BackendError):
    """The records that came back are cut short or altered (the message says which and how)."""


NONCE_FILE = "records.nonce"


def new_nonce() -> str:
    """A fresh nonce for :func:`agent_command`'s ``--emit-records`` (keep it with the job to read the log)."""
    import secrets

    return secrets.token_hex(16)


def records_nonce(job_dir: Path, *, create: bool = True) -> str | None:
    """The nonce a job's records are framed with, kept in its local folder (``records.nonce``, never staged):
    made on first use, the same for every later attempt and every process that reads the log. None when
    there is none and ``create`` is false."""
    p = Path(job_dir) / NONCE_FILE
    try:
        return p.read_text().strip() or None
    except FileNotFoundError:
        if not create:
            return None
    nonce = new_nonce()
    _agent.atomic_write(str(p), nonce.encode(), mode=0o600)
    return nonce


def frame_lines_max(max_result: int) -> int:
    """How many log lines a frame can take at most for a result of ``max_result`` bytes (what to read of the
    end of a log to be sure to hold it): base64 of the records, uncompressed in the worst case, twice over."""
    return (2 * max_result * 4 // 3 + 65536) // _agent.FRAME_WIDTH + 8


def extract_records(text: str, nonce: str, rank: int = 0) -> dict[str, bytes] | None:
    """The records framed into ``text`` (a job's log) for ``nonce`` and node ``rank``: name -> bytes, only
    names of :data:`RESULT_FILES`. None when the log holds no frame for them; :class:`RecordError` when the
    last frame is cut short or does not match its checksum. The last frame wins (a retried job prints
    again)."""
    last: dict[str, Any] | None = None
    for m in _LINE.finditer(text):
        if m.group("nonce") != nonce or int(m.group("rank")) != rank:
            continue
        if m.group("sha"):
            if last is not None:
                last["sha"] = m.group("sha")
            continue
        i, n = int(m.group("i")), int(m.group("n"))
        if i == 1 or last is None or last.get("sha") or last["n"] != n:
            last = {"n": n, "parts": {}, "sha": None}
        last["parts"][i] = m.group("data")
    if last is None:
        return None
    have = len(last["parts"])
    if have != last["n"] or not last["sha"] or set(last["parts"]) != set(range(1, last["n"] + 1)):
        raise RecordError(f"the job's records in its log are cut short ({have} of {last['n']} parts"
                          f"{', no checksum line' if not last['sha'] else ''}): the log was truncated")
    try:
        body = gzip.decompress(base64.b64decode("".join(last["parts"][i] for i in range(1, last["n"] + 1))))
    except (binascii.Error, ValueError, OSError, EOFError, zlib.error) as e:
        raise RecordError(f"the job's records in its log cannot be decoded ({e}): the log was altered") from None
    if hashlib.sha256(body).hexdigest() != last["sha"]:
        raise RecordError("the job's records in its log do not match their checksum: the log was altered or cut")
    files = json.loads(body).get("files") or {}
    return {k: base64.b64decode(v) for k, v in files.items() if k in RESULT_FILES}


def records_from_log(text: str, nonce: str, rank: int = 0) -> dict[str, bytes] | None:
    """:func:`extract_records`, with a cut or altered frame turned into an exit record that says the job is
    lost and why (for a backend whose status comes from these records)."""
    try:
        return extract_records(text, nonce, rank)
    except RecordError as e:
        return {"exit.json": json.dumps({"state": "lost", "reason": str(e)}, sort_keys=True).encode()}


class LogFilter:
    """Drops framed records from a log arriving in chunks (what ``logs(follow=True)`` shows). A partial line
    goes out at once unless it may be the start of a frame line."""

    def __init__(self) -> None:
        self._buf = ""

    def feed(self, chunk: str) -> str:
        self._buf += chunk
        lines = self._buf.split("\n")
        self._buf = lines.pop()
        out = "".join(line + "\n" for line in lines if FRAME not in line)
        if self._buf and not _may_be_frame(self._buf):
            out, self._buf = out + self._buf, ""
        return out

    def close(self) -> str:
        rest, self._buf = self._buf, ""
        return "" if FRAME in rest else rest

    def feed_all(self, chunks: Iterable[str]) -> Iterator[str]:
        for c in chunks:
            text = self.feed(c)
            if text:
                yield text
        rest = self.close()
        if rest:
            yield rest


def _may_be_frame(partial: str) -> bool:
    if FRAME in partial:
        return True
    tail = partial[-len(FRAME):]
    return any(FRAME.startswith(tail[k:]) for k in range(len(tail)))


def strip_records(text: str) -> str:
    """The log without framed records (what the job printed)."""
    if FRAME not in text:
        return text
    return "".join(LogFilter().feed_all([text]))


def write_records(job_dir: Path, files: Mapping[str, bytes], *, also: Iterable[str] = ()) -> None:
    """Write records brought back from elsewhere into ``job_dir`` (atomically, owner-only). Only names of
    :data:`RESULT_FILES` (and ``also``, e.g. ``output.log``) are written; anything else is an error."""
    allowed = set(RESULT_FILES) | set(also)
    bad = sorted(set(files) - allowed)
    if bad:
        raise RecordError(f"not a record of a job folder: {', '.join(bad)} (records are {', '.join(RESULT_FILES)})")
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        _agent.atomic_write(str(job_dir / name), data, mode=0o600)


def agent_command(python: str, agent: str, job_dir: str, nonce: str, *, inputs: str | None = None,
                  max_result: int | None = None) -> list[str]:
    """The argv that runs a job under the agent and frames its records into the job's log."""
    argv = [python, agent, "run", job_dir, "--emit-records", nonce]
    if inputs:
        argv += ["--inputs", inputs]
    if max_result is not None:
        argv += ["--max-result", str(int(max_result))]
    return argv


def pack_job(files: Mapping[str, bytes], *, root: str = "", compress: bool = False,
             extra: Mapping[str, bytes] | None = None) -> bytes:
    """A job folder as one tar (gzipped with ``compress``): ``files`` (name -> content) plus the agent as
    ``_agent.py``, members under ``root`` (a folder of that name when given), sorted, owner-only, mtime 0, so
    the same job packs to the same bytes. ``extra`` adds other members by relative path."""
    members = {"_agent.py": Path(_agent.__file__).read_bytes(), **files, **(extra or {})}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        if root:
            d = tarfile.TarInfo(root)
            d.type, d.mode = tarfile.DIRTYPE, 0o700
            tar.addfile(d)
        for name in sorted(members):
            data = members[name]
            info = tarfile.TarInfo(f"{root}/{name}" if root else name)
            info.size = len(data)
            info.mode = 0o644 if name.endswith(".py") else 0o600
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), 6, mtime=0) if compress else buf.getvalue()


def load_result(job_dir: Path, job_id: str, reason: str | None = None) -> Any:
    """The return value in ``job_dir/result.pkl``, checked against the size and SHA-256 the agent put in the
    exit record before it is unpickled: a missing, cut or altered result is a :class:`JobLost` that says
    which (with ``reason``, what the record says, when the file is missing); a result that cannot be unpickled
    here is a :class:`JobFailed`."""
    p = Path(job_dir) / "result.pkl"
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        why = f": {reason}" if reason else ""
        raise JobLost(f"job {job_id} succeeded but its result file is missing ({p}){why}", job_id) from None
    ex = _agent.read_json(str(Path(job_dir) / "exit.json")) or {}
    want, size = ex.get("result_sha256"), ex.get("result_bytes")
    if isinstance(size, int) and len(data) != size:
        raise JobLost(f"job {job_id}: its result is truncated ({len(data)} of {size} bytes in {p}); "
                      "it was not unpickled", job_id)
    if isinstance(want, str) and hashlib.sha256(data).hexdigest() != want:
        raise JobLost(f"job {job_id}: its result does not match the checksum in its exit record (sha256 "
                      f"{hashlib.sha256(data).hexdigest()[:16]}…, recorded {want[:16]}…); the file {p} was altered "
                      "after the job wrote it and was not unpickled", job_id)
    if want is None and not _agent.result_complete(str(p)):
        raise JobLost(f"job {job_id}: its result is not a whole pickle ({p} is cut short); it was not unpickled",
                      job_id)
    import pickle

    try:
        return pickle.loads(data)
    except Exception as e:
        raise JobFailed(f"job {job_id} returned a value that cannot be unpickled here: {type(e).__name__}: {e}",
                        job_id) from e


def exit_records(job_dirs: Iterable[str]) -> dict[str, list[Any]]:
    """Each job folder's exit records, one per node (None where missing), by folder: here, or on another
    machine as ``_agent.py records DIR...`` (read its output with :func:`parse_exit_records`)."""
    out: dict[str, list[Any]] = _agent.exit_records(list(job_dirs))
    return out


def parse_exit_records(stdout: str) -> dict[str, list[Any]]:
    """What ``_agent.py records DIR...`` printed (its last line)."""
    data = json.loads(stdout.strip().splitlines()[-1])
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data
