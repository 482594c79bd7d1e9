"""meshrun's SSH backend: shared GPU workstations and servers as one pool.

    [backends.ssh]
    hosts = ["gpu-box-1", {name = "big", host = "10.0.0.8", user = "me", key = "~/.ssh/id_ed25519"}]

Also a small connection API other backends build on (the Slurm backend's login-node mode)::

    conn = meshrun_ssh.connect("login-node")          # an ~/.ssh/config alias, or a host table
    conn.run(["sbatch", "--parsable", "job.sh"])      # CompletedProcess; never raises on exit codes
    conn.put_bytes(b"...", "~/job.sh", 0o700); conn.get_bytes("~/out.txt"); conn.exists("~/x")

and a verified, content-addressed copy of a program on the host (install_verified, boot_argv, through the
core's meshrun/_bootstrap.py: a file is kept under its SHA-256, checked before use and run only from the bytes whose hash was checked).

Importing this package is cheap: paramiko is imported when a connection is first made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import meshrun.backend as mb

__version__ = "0.1.0"

__all__ = ["SSHBackend", "Connection", "connect", "close_all", "install_verified", "content_name", "boot_argv",
           "UnsafeDirectory", "__version__"]

_LAZY = {
    "SSHBackend": "._backend",
    "Connection": "._conn",
    "connect": "._conn",
    "close_all": "._conn",
    "install_verified": "._verified",
    "content_name": "._verified",
    "boot_argv": "._verified",
    "UnsafeDirectory": "._verified",
}


__getattr__ = mb.lazy_exports(__name__, _LAZY)


if TYPE_CHECKING:  # pragma: no cover
    from ._backend import SSHBackend
    from ._conn import Connection, close_all, connect
    from ._verified import UnsafeDirectory, boot_argv, content_name, install_verified
