"""What travels with a task and what comes back from it.

Out: file archives (dstack's format: an uncompressed tar whose members are rooted at the archived
path's base name, uploaded to ``/api/files/upload_archive`` and mapped to a container path). A function
job ships one archive holding its job folder (``launch.json``, ``payload.pkl``, ``spec.json``) and the
host agent, unpacked at ``<remote_dir>/<job id>``; ``files`` and ``workdir`` of the spec ship as their own
archives.

In: a function job's records (``exit.json``, ``result.pkl``, ``error.json`` ...) come back through the
run's log, the one channel from a task to its submitter that needs nothing but the dstack server: when
the agent is done, the task prints each record base64-encoded between marker lines, and
:func:`extract_records` takes them out of the log again. :class:`LogFilter` hides those lines from
``logs()``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shlex
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

BEGIN = "@@meshrun-record-begin"
END = "@@meshrun-record-end"
RECORDS = ("exit.json", "state.json", "result.pkl", "error.json", "error.pkl")
AGENT_NAME = "_agent.py"

# Runs inside the task (POSIX sh): the host agent supervises the function; its output file is streamed
# into the task's own log while it runs; then the records are printed for the submitter to collect.
FUNCTION_SCRIPT = r"""d="$1"; py="${MESHRUN_PYTHON:-python3}"
"$py" "$d/_agent.py" run "$d" &
p=$!
if tail --version >/dev/null 2>&1; then
  tail -n +1 -F --pid="$p" "$d/output.log" 2>/dev/null
  wait "$p"; rc=$?
else
  wait "$p"; rc=$?
  cat "$d/output.log" 2>/dev/null
fi
for f in exit.json state.json result.pkl error.json error.pkl; do
  if [ -f "$d/$f" ]; then
    echo "@@meshrun-record-begin $f"
    base64 "$d/$f"
    echo "@@meshrun-record-end $f"
  fi
done
exit "$rc"
"""

CLOUDPICKLE_CHECK = (
    '"${{MESHRUN_PYTHON:-python3}}" -c "import cloudpickle, sys; sys.exit(cloudpickle.__version__ != {v!r})" '
    '2>/dev/null || "${{MESHRUN_PYTHON:-python3}}" -m pip install -q "cloudpickle=={v}"'
)


def function_command(remote_job_dir: str, *, cloudpickle_version: str | None) -> str:
    """The single shell command of a function job's task."""
    run = "sh -c " + shlex.quote(FUNCTION_SCRIPT) + " meshrun-task " + shlex.quote(remote_job_dir)
    if cloudpickle_version:
        # braces: dstack joins commands with && and the pip fallback must stay one unit
        return "{ " + CLOUDPICKLE_CHECK.format(v=cloudpickle_version) + "; } && " + run
    return run


# ---------------------------------------------------------------------------------------------
# archives


def tar_tree(src: Path, arcroot: str) -> bytes:
    """An uncompressed tar of a file or folder, its members rooted at ``arcroot``; sorted for a stable
    hash. Symbolic links to places outside ``src`` are stored as the files they point to."""
    buf = io.BytesIO()
    src = Path(src)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        if src.is_dir():
            t.add(src, arcroot, recursive=False)
            for root, dirs, files in os.walk(src):
                dirs.sort()
                rel = Path(root).relative_to(src)
                for name in sorted(dirs) + sorted(files):
                    p = Path(root) / name
                    arc = f"{arcroot}/{(rel / name).as_posix()}" if str(rel) != "." else f"{arcroot}/{name}"
                    if p.is_symlink():
                        target = p.resolve()
                        try:
                            target.relative_to(src.resolve())
                            t.add(p, arc, recursive=False)
                        except ValueError:
                            if target.is_file():
                                t.add(target, arc, recursive=False)
                        continue
                    t.add(p, arc, recursive=False)
        else:
            t.add(src.resolve(), arcroot, recursive=False)
    return buf.getvalue()


def tar_files(members: dict[str, bytes], arcroot: str, *, mode: int = 0o600) -> bytes:
    """A tar holding a folder ``arcroot`` with the given files (name -> content)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        d = tarfile.TarInfo(arcroot)
        d.type = tarfile.DIRTYPE
        d.mode = 0o700
        t.addfile(d)
        for name in sorted(members):
            data = members[name]
            info = tarfile.TarInfo(f"{arcroot}/{name}")
            info.size = len(data)
            info.mode = 0o644 if name.endswith(".py") else mode
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# records through the log


def extract_records(text: str) -> dict[str, bytes]:
    """The files printed between marker lines (the last copy of each wins)."""
    out: dict[str, bytes] = {}
    current: str | None = None
    chunks: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if current is None:
            if line.startswith(BEGIN + " "):
                current = line[len(BEGIN) + 1:].strip()
                chunks = []
            continue
        if line == f"{END} {current}":
            if current in RECORDS:
                try:
                    out[current] = base64.b64decode("".join(chunks), validate=False)
                except ValueError:
                    pass
            current = None
            continue
        chunks.append(line)
    return out


class LogFilter:
    """Drops the record blocks from a stream of log chunks (line by line, across chunk boundaries)."""

    def __init__(self) -> None:
        self._partial = ""
        self._inside = False

    def feed(self, chunk: str) -> str:
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()
        return "".join(self._line(ln + "\n") for ln in lines)

    def flush(self) -> str:
        rest, self._partial = self._partial, ""
        return self._line(rest) if rest else ""

    def _line(self, line: str) -> str:
        s = line.strip()
        if self._inside:
            if s.startswith(END + " "):
                self._inside = False
            return ""
        if s.startswith(BEGIN + " "):
            self._inside = True
            return ""
        return line


def filtered(chunks: Iterable[str]) -> Iterator[str]:
    f = LogFilter()
    for c in chunks:
        out = f.feed(c)
        if out:
            yield out
    rest = f.flush()
    if rest:
        yield rest
