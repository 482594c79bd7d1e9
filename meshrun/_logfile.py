"""A job's output file, read from its end and followed as it grows: what the local backend's ``logs()`` is,
kept apart from that backend so ``meshrun logs`` of a local job reads it without loading any backend."""

from __future__ import annotations

import time
from pathlib import Path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterator

# the host agent's file names (meshrun/_agent.py LOG and EXIT; tests/test_cli_fast_paths.py checks they agree)
LOG = "output.log"
EXIT = "exit.json"


def local_logs(job_dir: Path, *, follow: bool = False, tail: int | None = None,
               max_bytes: int | None = None) -> Iterator[str]:
    """The output of the job whose folder (on this machine) is ``job_dir``, from its last ``tail`` lines and at
    most ``max_bytes`` bytes from its end; with ``follow``, until the agent has recorded the job's end."""
    log = job_dir / LOG
    start = tail_offset(log, tail, max_bytes) if (tail is not None or max_bytes is not None) else 0
    wake = None
    if follow:  # the supervisor's exit wakes the reader (a short job's end is seen as it is written)
        from ._agent import ExitWatch

        wake = ExitWatch(job_dir)
    return tail_file(log, follow=follow, done=lambda: (job_dir / EXIT).exists(), start=start, wake=wake)


def tail_offset(path: Path, tail: int | None = None, max_bytes: int | None = None, block: int = 65536) -> int:
    """Where the last ``tail`` lines (and at most ``max_bytes`` bytes) of a file begin, found by reading
    backwards from its end a block at a time (never the whole file)."""
    try:
        f = open(path, "rb")
    except OSError:
        return 0
    with f:
        size = f.seek(0, 2)
        floor = 0 if max_bytes is None else max(0, size - max_bytes)
        if tail is None:
            return floor
        if tail == 0:
            return size
        pos = size
        wanted = tail + 1  # the file's own final newline ends the last line, it does not start one
        f.seek(size - 1 if size else 0)
        if size and f.read(1) != b"\n":
            wanted = tail
        while pos > floor:
            n = min(block, pos - floor)
            pos -= n
            f.seek(pos)
            buf = f.read(n)
            i = len(buf)
            while True:
                i = buf.rfind(b"\n", 0, i)
                if i < 0:
                    break
                wanted -= 1
                if wanted == 0:
                    return pos + i + 1
        return floor


def tail_file(path: Path, *, follow: bool, done: Any, poll: float = 0.1, start: int = 0,
              wake: Any = None) -> Iterator[str]:
    """Yield a growing text file's content in chunks from byte ``start``; with ``follow``, until ``done()``
    and EOF. Only one chunk is held at a time. ``wake`` (an ``_agent.ExitWatch``) ends a wait between looks
    as soon as the job's supervisor exits."""
    pos = start
    # a short job's output and end come within milliseconds: look every 2 ms for the first 0.1 s, then back off
    wait = min(poll, 0.002)
    brisk = time.monotonic() + 0.1
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")("replace")
    while True:
        finished = done() if follow else True
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                while True:
                    chunk = f.read(65536)
                    if not chunk:
                        break
                    pos += len(chunk)
                    wait = min(poll, 0.002)
                    text = dec.decode(chunk)
                    if text:
                        yield text
        except FileNotFoundError:
            pass
        if finished:
            rest = dec.decode(b"", final=True)
            if rest:
                yield rest
            return
        if wake is not None:
            wake.wait(wait)
        else:
            time.sleep(wait)
        if time.monotonic() > brisk:
            wait = min(poll, wait * 1.5)
