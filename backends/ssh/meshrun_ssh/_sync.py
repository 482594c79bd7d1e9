"""What of the working directory goes to the host: a scan with exclude patterns and a size guard.

Patterns (defaults + ``backends.ssh.sync_exclude`` + ``backend_options["ssh"]["sync_exclude"]`` + the lines of a
``.meshrunignore`` file at the top of the working directory):

* ``name`` (no slash): any file or directory with that name, at any depth (``*``, ``?``, ``[...]`` work);
* ``dir/`` (trailing slash): directories only;
* ``path/inside`` (a slash inside): the path relative to the working directory (``data/*.bin``);
* a line starting with ``#`` in ``.meshrunignore`` is a comment.

Symbolic links to files are followed (the content is copied); links to directories are not followed.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import meshrun

IGNORE_FILE = ".meshrunignore"


@dataclass(frozen=True)
class Entry:
    path: str  # relative, with "/"
    size: int
    mtime_ns: int
    mode: int
    source: str  # local absolute path

    def wire(self) -> list:
        return [self.path, self.size, self.mtime_ns, self.mode & 0o7777]


class Patterns:
    def __init__(self, patterns: Iterable[str]):
        self.names: list[str] = []
        self.dirs: list[str] = []
        self.paths: list[str] = []
        for p in patterns:
            p = p.strip()
            if not p or p.startswith("#"):
                continue
            if p.startswith("/"):
                p = p.lstrip("/")
                self.paths.append(p.rstrip("/"))
            elif p.endswith("/") and "/" not in p.rstrip("/"):
                self.dirs.append(p.rstrip("/"))
            elif "/" in p.rstrip("/"):
                self.paths.append(p.rstrip("/"))
            else:
                self.names.append(p)

    def excluded(self, rel: str, name: str, is_dir: bool) -> bool:
        if any(fnmatch.fnmatchcase(name, p) for p in self.names):
            return True
        if is_dir and any(fnmatch.fnmatchcase(name, p) for p in self.dirs):
            return True
        return any(fnmatch.fnmatchcase(rel, p) for p in self.paths)


def read_ignore_file(root: str) -> list[str]:
    try:
        with open(os.path.join(root, IGNORE_FILE), encoding="utf-8") as f:
            return f.read().splitlines()
    except OSError:
        return []


def scan(root: str, patterns: Sequence[str], *, max_bytes: int, max_files: int,
         extra: Optional[Mapping[str, str]] = None) -> list[Entry]:
    """The files to mirror: (relative path, size, mtime, mode, local source), excluded ones left out.
    ``extra`` maps target paths (relative to ``root``) to local sources (files or directories), the spec's
    ``files``. Raises ``meshrun.SpecError`` on ``workdir`` when the total is over the guard."""
    pats = Patterns(list(patterns) + read_ignore_file(root))
    out: dict[str, Entry] = {}
    total = 0
    big: list[tuple[int, str]] = []

    def add(rel: str, full: str, st: os.stat_result) -> None:
        nonlocal total
        if rel in out:
            total -= out[rel].size
        out[rel] = Entry(rel, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode), full)
        total += st.st_size
        big.append((st.st_size, rel))
        if len(out) > max_files:
            raise meshrun.SpecError(
                "workdir",
                f"{root} holds more than {max_files} files to copy to the host (backends.ssh.max_sync_files); "
                f"exclude what the job does not need (backends.ssh.sync_exclude, or a {IGNORE_FILE} file), or run "
                "from a smaller directory (workdir=...)",
            )

    def walk(base: str, prefix: str, apply_patterns: bool) -> None:
        for dirpath, dirnames, filenames in os.walk(base):
            reldir = os.path.relpath(dirpath, base)
            reldir = "" if reldir == "." else reldir.replace(os.sep, "/")
            keep = []
            for d in sorted(dirnames):
                rel = f"{reldir}/{d}" if reldir else d
                full = os.path.join(dirpath, d)
                if os.path.islink(full):
                    continue  # directory links are not followed
                if apply_patterns and pats.excluded(rel, d, True):
                    continue
                keep.append(d)
            dirnames[:] = keep
            for fn in sorted(filenames):
                rel = f"{reldir}/{fn}" if reldir else fn
                if apply_patterns and pats.excluded(rel, fn, False):
                    continue
                full = os.path.join(dirpath, fn)
                try:
                    st = os.stat(full)  # follows file links
                except OSError:
                    continue  # dangling link, vanished file
                if not stat.S_ISREG(st.st_mode):
                    continue
                add(f"{prefix}{rel}", full, st)

    walk(root, "", True)
    for target, source in (extra or {}).items():
        rel = _relative_target(target)
        src = source if os.path.isabs(source) else os.path.join(root, source)
        if os.path.isdir(src):
            walk(src, rel.rstrip("/") + "/", False)
        else:
            try:
                add(rel, src, os.stat(src))
            except OSError as e:
                raise meshrun.SpecError(f"files.{target}", f"cannot read {src}: {e.strerror}") from None
    if total > max_bytes:
        big.sort(reverse=True)
        top = ", ".join(f"{rel} ({meshrun.format_size(n)})" for n, rel in big[:5])
        raise meshrun.SpecError(
            "workdir",
            f"{root} holds {meshrun.format_size(total)} in {len(out)} files to copy to the host, more than "
            f"backends.ssh.max_sync_bytes ({meshrun.format_size(max_bytes)}). Largest: {top}. Exclude large data "
            f"by pattern (backends.ssh.sync_exclude = [\"data/\", \"*.ckpt\"], backend_options={{'ssh': {{'sync_exclude': "
            f"[...]}}}}, or a {IGNORE_FILE} file), keep data on the host and pass its path, or raise the limit",
        )
    return sorted(out.values(), key=lambda e: e.path)


def _relative_target(target: str) -> str:
    t = target.replace(os.sep, "/")
    parts = [p for p in t.split("/") if p not in ("", ".")]
    if t.startswith("/") or not parts or ".." in parts:
        raise meshrun.SpecError(
            f"files.{target}",
            "on the ssh backend a file's target must be a path inside the working directory "
            "(relative, without '..')",
        )
    return "/".join(parts)


def read_entries(entries: Sequence[Entry]) -> bytes:
    parts = []
    for e in entries:
        with open(e.source, "rb") as f:
            data = f.read()
        if len(data) != e.size:
            raise OSError(f"{e.source} changed while it was being copied; try again")
        parts.append(data)
    return b"".join(parts)
