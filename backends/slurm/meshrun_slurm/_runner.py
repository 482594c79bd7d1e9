"""The command seam: every Slurm call is an argv list run by one runner, on this machine or on a login node
over SSH (through the SSH backend's public connection API). No shell is ever involved here; over SSH the
connection quotes each word for the remote login shell."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence


class LocalRunner:
    """Slurm's client tools on this machine; the job folders are on a filesystem every node sees."""

    shared_filesystem = True
    where = "local"

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        full_env = None
        if env:
            full_env = dict(os.environ)
            full_env.update(env)
        p = subprocess.run(
            list(argv), input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
            env=full_env, stdin=None if input is not None else subprocess.DEVNULL,
        )
        return subprocess.CompletedProcess(list(argv), p.returncode, p.stdout.decode("utf-8", "replace"),
                                           p.stderr.decode("utf-8", "replace"))

    def put_bytes(self, data: bytes, path: str, mode: int = 0o600) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, path)

    def get_bytes(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def home(self) -> str:
        return os.path.expanduser("~")

    def close(self) -> None:
        pass


class SSHRunner:
    """Slurm's client tools on a login node reached over SSH; job folders are staged to ``remote_dir``."""

    shared_filesystem = False

    def __init__(self, target: str | Mapping[str, Any], config: Mapping[str, Any] | None = None):
        self.target = target
        self.config = config
        self.where = target if isinstance(target, str) else str(target.get("host") or target.get("name") or "login node")
        self._conn: Any = None
        self._home: str | None = None
        self._lock = threading.Lock()

    def conn(self) -> Any:
        with self._lock:
            if self._conn is None:
                try:
                    import meshrun_ssh
                except ImportError as e:
                    import meshrun.backend as mb

                    raise mb.BackendUnavailable(
                        "login_host is set, which needs the SSH backend: " + mb.install_hint("ssh"), backend="slurm",
                    ) from e
                self._conn = meshrun_ssh.connect(self.target, config=self.config)
            return self._conn

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        return self.conn().run(list(argv), input=input, timeout=timeout, env=dict(env) if env else None)

    def put_bytes(self, data: bytes, path: str, mode: int = 0o600) -> None:
        self.conn().put_bytes(data, path, mode)

    def get_bytes(self, path: str) -> bytes:
        return self.conn().get_bytes(path)

    def exists(self, path: str) -> bool:
        return self.conn().exists(path)

    def home(self) -> str:
        if self._home is None:
            p = self.run(["printenv", "HOME"], timeout=60)
            home = p.stdout.strip()
            if p.returncode != 0 or not home.startswith("/"):
                import meshrun

                raise meshrun.BackendError(f"cannot find the home directory on {self.where}",
                                           backend="slurm", argv=["printenv", "HOME"], returncode=p.returncode,
                                           stderr=p.stderr)
            self._home = home
        return self._home

    def close(self) -> None:
        with self._lock:
            c, self._conn = self._conn, None
        if c is not None:
            try:
                c.close()
            except Exception:
                pass
