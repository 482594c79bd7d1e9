"""Reading a function job's records back from its pod log.

The container entry point (``_boot.py``) ends the pod log with one block::

    ==== meshrun-result begin <nonce>
    <base64 of {"version": 1, "job_id": ..., "rank": ..., "files": {"exit.json": "<base64>", ...}}, 76 a line>
    ==== meshrun-result end <nonce> sha256=<hex of the decoded JSON>

Only a block with the job's nonce counts (the last one, if a retried pod's log were ever concatenated),
and its checksum must match: a block cut short by log rotation is an error, never a wrong result.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from typing import Iterable, Iterator

MARK = "==== meshrun-result"
_FILES = ("exit.json", "result.pkl", "error.json", "error.pkl")


class ResultBlockError(ValueError):
    pass


def block_lines_max(result_max_bytes: int) -> int:
    """How many log lines a result block can take (the tail of the log that must be read)."""
    return (2 * result_max_bytes * 4 // 3) // 76 + 64


def parse_block(log: str, nonce: str) -> dict[str, bytes] | None:
    """The records in the log's result block for ``nonce``; None if the log has no such block."""
    begin = f"{MARK} begin {nonce}"
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if line == begin]
    if not starts:
        return None
    start = starts[-1]
    end_re = re.compile(r"^" + re.escape(f"{MARK} end {nonce} sha256=") + r"([0-9a-f]{64})$")
    for j in range(start + 1, len(lines)):
        m = end_re.match(lines[j])
        if m:
            break
    else:
        raise ResultBlockError("the result block in the pod log has no end line (the log was cut short)")
    try:
        body = base64.b64decode("".join(lines[start + 1 : j]), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ResultBlockError(f"the result block in the pod log is not valid base64: {e}") from None
    if hashlib.sha256(body).hexdigest() != m.group(1):
        raise ResultBlockError("the result block in the pod log does not match its checksum (the log was altered "
                               "or cut)")
    doc = json.loads(body)
    files = doc.get("files") or {}
    return {k: base64.b64decode(v) for k, v in files.items() if k in _FILES}


def strip_blocks(log: str) -> str:
    """The log without result blocks (what the user's job printed)."""
    return "".join(ResultFilter().feed_all([log]))


class ResultFilter:
    """Removes result blocks from a log arriving in chunks (for ``logs(follow=True)``)."""

    def __init__(self) -> None:
        self.buf = ""
        self.inside = False
        self.pending_blank = False

    def feed(self, chunk: str) -> str:
        self.buf += chunk
        out = []
        while True:
            nl = self.buf.find("\n")
            if nl < 0:
                break
            line, self.buf = self.buf[: nl + 1], self.buf[nl + 1 :]
            out.append(self._line(line))
        # a partial line that cannot start a marker can go out now (live output without newlines)
        if self.buf and not self.inside and not MARK.startswith(self.buf[: len(MARK)]) and not self.pending_blank:
            out.append(self.buf)
            self.buf = ""
        return "".join(out)

    def _line(self, line: str) -> str:
        if self.inside:
            if line.startswith(f"{MARK} end "):
                self.inside = False
            return ""
        if line.startswith(f"{MARK} begin "):
            self.inside = True
            self.pending_blank = False  # the blank line the entry point writes before a block
            return ""
        out = ""
        if self.pending_blank:
            out += "\n"
            self.pending_blank = False
        if line == "\n":
            self.pending_blank = True
            return out
        return out + line

    def close(self) -> str:
        rest = "" if self.inside else self.buf
        if self.pending_blank and not self.inside:
            rest = "\n" + rest
        self.buf, self.pending_blank = "", False
        return rest

    def feed_all(self, chunks: Iterable[str]) -> Iterator[str]:
        for c in chunks:
            text = self.feed(c)
            if text:
                yield text
        rest = self.close()
        if rest:
            yield rest
