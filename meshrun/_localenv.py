"""What the local backend hands this machine's agent, and what ``meshrun gpus`` shows of this machine.

Kept apart from :mod:`meshrun._local` (which loads the typed settings, and with them pydantic) so that
``meshrun gpus`` reads the raw ``[backends.local]`` table and starts about as fast as the interpreter; a bad
value in that table is still reported by the typed settings the moment a job is submitted.
"""

from __future__ import annotations

import os

from . import _agent

TYPE_CHECKING = False  # typing is not imported at run time (the CLI must start fast)
if TYPE_CHECKING:
    from typing import Any, Mapping


def agent_env(lease_dir: Any = None, share_gpu_below_mib: Any = None, warm_file: str | None = None,
              base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the agent (supervisor, fork server, ``meshrun gpus``) runs with."""
    env = dict(os.environ if base is None else base)
    # who submits (this process and its parents, e.g. a notebook kernel): a GPU this process holds is
    # named as such in the waiting message rather than as an anonymous foreign process
    env["MESHRUN_SUBMITTER_PIDS"] = ",".join(str(p) for p in _agent.ancestry())
    if lease_dir:
        env["MESHRUN_LEASE_DIR"] = str(lease_dir)
    if share_gpu_below_mib and "MESHRUN_SHARE_GPU_BELOW_MIB" not in env:
        env["MESHRUN_SHARE_GPU_BELOW_MIB"] = str(share_gpu_below_mib)
    if warm_file:  # function jobs record the packages they import; the fork server keeps them warm
        env[_agent.WARM_ENV] = warm_file
    else:
        env.pop(_agent.WARM_ENV, None)
    return env


def gpu_snapshot(env: Mapping[str, str], direct: bool = False) -> dict[str, Any]:
    """Who holds which GPU of this machine, the queue and foreign processes, and the containment a job
    started from here gets. ``direct``: this process starts no job afterwards (``_agent.snapshot``)."""
    snap = _agent.snapshot(dict(env), direct=direct)
    mode, detail = _agent.containment_available(dict(env))
    snap["containment"] = {"mode": mode, "detail": detail}
    return snap


def local_gpus() -> dict[str, Any]:
    """``meshrun gpus`` for this machine, from the raw ``[backends.local]`` table."""
    from ._config import get_config

    table = get_config().backend("local")
    return gpu_snapshot(agent_env(table.get("lease_dir"), table.get("share_gpu_below_mib")), direct=True)
