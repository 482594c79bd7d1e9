"""Following a cluster job's log from the process that submitted it.

Asking SkyPilot where a job stands (``sky queue``) costs the API server a round trip to the cluster: 8-17 s
per call on the test Slurm cluster, on a busy 2-core machine. Polling it made meshrun's share of a short
job ~25 s. Instead, the process that submits a job follows the job's log once, the way ``sky exec`` does
(wait for the launch/exec request, then one streaming ``tail_logs(follow=True)`` request until the job
ends). The log tells everything meshrun needs: node 0 prints a start line when the job begins and the
agent's records (exit code, result) when it ends. ``status`` answers from the follower while it runs and
falls back to ``sky queue`` when there is none (another process, re-attach) or when it ended without the
records (the stream broke, the cluster went away, the job died before printing them).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import meshrun.backend as mb

from . import _task

MAX_TEXT = 64 * 1024**2  # a job that logs more is read back the usual way at its end


class LogFollower:
    """One daemon thread: ``get(request)`` for the SkyPilot job id, then the job's log to its end."""

    def __init__(self, sdk: Any, *, cluster: str, job_id: str, nonce: str, request_id: str,
                 on_records: Callable[[dict[str, bytes]], None]):
        self.cluster = cluster
        self.job_id = job_id  # meshrun's job id (what the start line is tagged with)
        self.nonce = nonce  # what the records are framed with
        self.request_id = request_id
        self.sky_job: int | None = None
        self.started_at: float | None = None  # when node 0's start line arrived
        self.error: str | None = None
        self.files: dict[str, bytes] | None = None
        self.done = threading.Event()
        self._sdk = sdk
        self._on_records = on_records
        self._text: list[str] = []
        self._size = 0
        self._thread = threading.Thread(target=self._run, name=f"meshrun-skypilot-follow-{job_id}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return not self.done.is_set()

    def _run(self) -> None:
        mark = f"{_task.START_MARK}{self.job_id}::"
        try:
            got = self._sdk.get(self.request_id)
            sky_job = got[0] if isinstance(got, (tuple, list)) else got
            if sky_job is None:
                raise RuntimeError("SkyPilot gave no job id for the request")
            self.sky_job = int(sky_job)
            tail = ""
            for chunk in self._sdk.tail_logs(self.cluster, self.sky_job, True, preload_content=False):
                if chunk is None:
                    break
                if self._size <= MAX_TEXT:
                    self._text.append(chunk)
                    self._size += len(chunk)
                if self.started_at is None:
                    tail = (tail + chunk)[-4 * len(mark):]
                    if mark in tail:
                        self.started_at = time.time()
        except BaseException as e:  # noqa: B902 - reported through status, never raised in a thread
            self.error = f"{type(e).__name__}: {e}"[:500]
        finally:
            text = "".join(self._text) if self._size <= MAX_TEXT else ""
            files = mb.records_from_log(text, self.nonce) if self.nonce else None
            if files is not None:
                files = dict(files)
                files["output.log"] = _task.clean_log(text).encode()
                self.files = files
                try:
                    self._on_records(files)
                except Exception:  # pragma: no cover - a full disk or the like: status falls back
                    pass
            self._text.clear()
            self.done.set()
