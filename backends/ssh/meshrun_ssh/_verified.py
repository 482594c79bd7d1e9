"""Content-addressed, verified copies of meshrun's programs on a remote machine (the SSH backend's host agent
and helper, the Slurm backend's agent on the cluster).

The remote side is the core's stdlib-only ``meshrun/_bootstrap.py`` (``meshrun.backend.boot_program()``), sent
whole as ``python3 -c PROGRAM`` so that nothing unverified is ever run: ``--install DIR`` keeps files named by
their content (``agent-<sha256[:16]>.py``) in a directory no other user may write to, and the boot form checks
a file and its SHA-256 and runs exactly the bytes it checked (``boot_argv``). Its docstring has the details.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Optional, Sequence

import meshrun
import meshrun.backend as mb

from ._conn import shell_command

def program() -> str:
    """The verified boot and install program: the core's ``meshrun/_bootstrap.py``, sent whole as ``-c``."""
    global _PROGRAM
    if _PROGRAM is None:
        _PROGRAM = mb.boot_program()
    return _PROGRAM


_PROGRAM: Optional[str] = None


def content_name(stem: str, data: bytes, suffix: str = ".py") -> tuple[str, str]:
    """``(name, sha256)``: the file name a content-addressed copy of ``data`` gets (``stem-<sha256[:16]>.py``)
    and its full SHA-256."""
    sha = hashlib.sha256(data).hexdigest()
    return f"{stem}-{sha[:16]}{suffix}", sha


def boot_argv(python: str, main: tuple[str, str], args: Sequence[str],
              modules: Sequence[tuple[str, str, str]] = (), flags: Sequence[str] = ()) -> list[str]:
    """The command that verifies and runs ``main`` = (path, sha256) with ``args``; ``modules`` are
    (module name, path, sha256) made importable first."""
    argv = [python, *flags, "-c", program()]
    for name, path, sha in modules:
        argv += ["-m", name, path, sha]
    return argv + [main[0], main[1], *args]


class UnsafeDirectory(meshrun.BackendError):
    """The remote directory meshrun would keep its programs in may be written by other users."""


def install_verified(conn: Any, directory: str, files: Mapping[str, bytes], *, pythons: Sequence[str] = ("python3",),
                     what: str = "the host agent", setting: Optional[str] = None,
                     backend: str = "ssh") -> dict[str, Any]:
    """Make sure ``directory`` on ``conn``'s host holds exactly ``files`` (name -> content), checked as the
    module docstring says; one remote command. Returns the program's answer (``dir``, ``kept``,
    ``installed``). Raises :class:`UnsafeDirectory` when the directory may be written by other users and
    ``meshrun.BackendError`` on any other failure. ``pythons`` are tried in order (one that is missing is
    skipped)."""
    manifest = [[name, len(data), hashlib.sha256(data).hexdigest()] for name, data in files.items()]
    blob = json.dumps(manifest).encode() + b"\n" + b"".join(files.values())
    from ._conn import rel_home

    where = conn.params.name
    last = ""
    for py in pythons:
        line = shell_command([py, "-c", program(), "--install", rel_home(directory)])
        rc, out, err = conn.exec_line(line, input=blob, timeout=120)
        text = out.decode("utf-8", "replace").strip()
        try:
            rep = json.loads(text.splitlines()[-1]) if text else None
        except ValueError:
            rep = None
        if rep is None:
            last = (err.decode("utf-8", "replace").strip() or text)[-600:]
            if rc == 127 or "not found" in last:
                continue
            raise meshrun.BackendError(f"{where}: could not install {what} in {directory} (exit {rc}): {last}",
                                       backend=backend)
        if rep.get("ok"):
            return rep
        if rep.get("unsafe"):
            hint = f" (or set {setting})" if setting else ""
            raise UnsafeDirectory(
                f"{where}: meshrun will not keep or run {what} in {rep.get('dir')}: {rep.get('error')}{hint}",
                backend=backend)
        raise meshrun.BackendError(f"{where}: could not install {what} in {rep.get('dir')}: {rep.get('error')}",
                                   backend=backend)
    raise meshrun.BackendError(f"{where}: no Python interpreter to install {what} with "
                               f"(tried {', '.join(pythons)}): {last}", backend=backend)
