"""``meshrun doctor``: check what meshrun relies on here, and rebuild the job index from the job folders.

Each check gives a status ("ok", "warning", "error") and one line saying what was found and what to do.
Checks never change anything, except the clean-up of temp files left by interrupted writes and, with
``rebuild``, a new job index (the old file is moved aside, never deleted).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

BACKEND_CHECK_TIMEOUT = 5.0


@dataclass
class Check:
    name: str
    status: str  # "ok", "warning" or "error"
    detail: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def run_checks(*, rebuild: bool = False) -> list[Check]:
    out: list[Check] = []
    out += check_store(rebuild=rebuild)
    out += check_leases()
    out.append(check_fork_server())
    out.append(check_command_server())
    out += check_backends()
    out.append(check_gpu_tools())
    return out


# ---- the job store -------------------------------------------------------------------------------


def check_store(*, rebuild: bool = False) -> list[Check]:
    from ._store import REBUILD_HINT, StoreError, _no_room, get_store

    store = get_store()
    out: list[Check] = []
    if rebuild:
        try:
            r = store.rebuild()
        except (OSError, StoreError) as e:
            return [Check("index rebuild", "error", f"could not rebuild {store.db_path}: {e}")]
        old = f"; the old file is kept as {r['old']}" if r["old"] else ""
        skipped = f"; {len(r['skipped'])} folder(s) are no job folders: {', '.join(r['skipped'][:5])}" \
            if r["skipped"] else ""
        out.append(Check("index rebuild", "ok", f"{r['kept']} row(s) kept, {r['rebuilt']} rebuilt from their "
                                                f"folders{old}{skipped}"))
    c = store.check()
    if c["error"]:
        out.append(Check("index", "error", c["error"]))
    else:
        out.append(Check("index", "ok", f"{c['rows']} job(s) in {c['db']}, {c['folders']} job folder(s)"))
        if c["folders_without_row"]:
            ids = c["folders_without_row"]
            out.append(Check("index vs folders", "warning",
                             f"{len(ids)} job folder(s) have no row in the index ({', '.join(ids[:5])}"
                             f"{' ...' if len(ids) > 5 else ''}): rebuild it with `{REBUILD_HINT}`"))
        if c["rows_without_folder"]:
            ids = c["rows_without_folder"]
            out.append(Check("index vs folders", "warning",
                             f"{len(ids)} row(s) have no job folder ({', '.join(ids[:5])}"
                             f"{' ...' if len(ids) > 5 else ''}): their outputs are gone; `{REBUILD_HINT}` "
                             "drops them"))
    removed = c["temp_files_removed"]
    out.append(Check("temp files", "ok", f"removed {len(removed)} left by interrupted writes" if removed
                     else "none left by interrupted writes"))
    if _no_room(store.home):
        out.append(Check("disk", "error", f"the disk holding {store.home} is full: jobs cannot record their "
                                          "output or outcome; free some space"))
    else:
        st = os.statvfs(store.home)
        from ._units import format_size

        out.append(Check("disk", "ok", f"{format_size(st.f_bavail * st.f_frsize)} free at {store.home}"))
    return out


# ---- the machine: leases, fork server, GPU tools -------------------------------------------------


def _local() -> Any:
    from ._registry import get_backend

    return get_backend("local")


def check_leases() -> list[Check]:
    from . import _agent

    try:
        env = _local()._env()
        snap = _agent.snapshot(env)
    except Exception as e:
        return [Check("GPU leases", "error", f"the lease table cannot be read: {type(e).__name__}: {e}")]
    where = snap.get("lease_dir") or _agent.lease_dir(env)
    if snap.get("error") and "lease_dir" not in snap:  # the lease table itself could not be used
        return [Check("GPU leases", "error", f"{snap['error']} (lease table in {where})")]
    leases, queue = snap.get("leases") or {}, snap.get("queue") or []
    text = f"{len(leases)} GPU(s) leased, {len(queue)} job(s) queued ({where})"
    if snap.get("error"):  # the GPU inventory's complaint: worth a look only where there should be GPUs
        status = "warning" if snap.get("gpus") or shutil.which("nvidia-smi", path=env.get("PATH")) else "ok"
        return [Check("GPU leases", status, f"{text}; GPU inventory: {snap['error']}")]
    return [Check("GPU leases", "ok", text)]


def check_fork_server() -> Check:
    try:
        path = _local()._server_path()
    except Exception as e:
        return Check("fork server", "error", f"{type(e).__name__}: {e}")
    if not os.path.exists(path):
        return Check("fork server", "ok", "not running (the next local job starts one)")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(path)
        s.sendall(b'{"op": "ping"}\n')  # not a spawn request: the server answers with an error, and lives on
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        json.loads(buf.decode())
    except (OSError, ValueError) as e:
        return Check("fork server", "warning", f"the socket {path} does not answer ({e}); jobs start without it "
                                               f"(slower); remove the socket to have a fresh server started")
    finally:
        s.close()
    return Check("fork server", "ok", f"answers at {path}")


def check_command_server() -> Check:
    from . import _cliclient

    if not _cliclient.enabled():
        return Check("command server", "ok", "off (MESHRUN_CLI_SERVER=0): run and offers start as fresh processes")
    path = _cliclient.server_path()
    if path is None:
        return Check("command server", "warning", "no private socket directory (see the fork server's check); "
                                                  "run and offers start as fresh processes (slower)")
    if not os.path.lexists(path):
        return Check("command server", "ok", "not running (the next run or offers starts one)")
    if not _cliclient.answers(path):
        return Check("command server", "ok", f"{path} is left from a server that ended; the next run or offers "
                                             "starts a fresh one")
    return Check("command server", "ok", f"answers at {path}")


def check_gpu_tools() -> Check:
    from . import _agent

    env = _local()._env()
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    declared = env.get("MESHRUN_GPUS")
    if smi is None:
        gpus, source, _ = _agent.discover_gpus(env)  # AMD GPUs (amd-smi/rocm-smi), or a Mac's MPS device
        if gpus and source != "MESHRUN_GPUS":
            names = sorted({str(g.get("name")) for g in gpus})
            return Check("GPU tools", "ok", f"{len(gpus)} GPU(s) ({', '.join(names)}), from {source}")
        if declared is not None:
            return Check("GPU tools", "ok", f"no nvidia-smi; GPUs declared by MESHRUN_GPUS={declared}")
        return Check("GPU tools", "ok", "no nvidia-smi, amd-smi or rocm-smi on PATH: no GPUs here (CPU jobs only)")
    try:
        p = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=15, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("GPU tools", "error", f"{smi} does not work: {e}")
    if p.returncode != 0:
        msg = (p.stderr or p.stdout).strip().splitlines()
        return Check("GPU tools", "error", f"{smi} -L exited with code {p.returncode}: "
                                           f"{msg[0] if msg else 'no output'} (is the NVIDIA driver loaded?)")
    gpus, source, err = _agent.discover_gpus(env)
    if err:
        return Check("GPU tools", "warning", f"{smi} answers, but the GPU inventory failed: {err}")
    names = sorted({str(g.get("name")) for g in gpus})
    return Check("GPU tools", "ok", f"{smi}: {len(gpus)} GPU(s) ({', '.join(names) or 'none'}), from {source}")


# ---- backends ------------------------------------------------------------------------------------


def check_backends(timeout: float = BACKEND_CHECK_TIMEOUT) -> list[Check]:
    """Every installed backend: loads, and says whether it can be used (each asked in parallel; one that
    has not answered within ``timeout`` seconds is reported as not responding)."""
    from ._registry import get_backend, list_backends

    try:
        infos = list_backends()
    except Exception as e:
        return [Check("backends", "error", f"the backend registry cannot be read: {type(e).__name__}: {e}")]
    out: list[Check] = []
    answers: dict[str, Check] = {}
    threads = []

    def ask(name: str) -> None:
        try:
            av = get_backend(name).check()
            if av.ok:
                answers[name] = Check(f"backend {name}", "ok", "ready")
            else:
                hint = f" (hint: {av.hint})" if av.hint else ""
                answers[name] = Check(f"backend {name}", "warning", f"unavailable: {av.reason}{hint}")
        except Exception as e:
            answers[name] = Check(f"backend {name}", "error", f"check failed: {type(e).__name__}: {e}")

    missing = []
    for info in infos:
        if not info.installed:
            missing.append(info.name)
        elif not info.loaded:
            out.append(Check(f"backend {info.name}", "error", f"failed to load: {info.error}"))
        else:
            t = threading.Thread(target=ask, args=(info.name,), name=f"meshrun-doctor-{info.name}", daemon=True)
            t.start()
            threads.append((info.name, t))
    deadline = time.monotonic() + timeout
    for name, t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        out.append(answers.get(name) or Check(f"backend {name}", "warning",
                                              f"not responding (no answer within {timeout:g}s)"))
    if missing:
        out.append(Check("backends not installed", "ok", ", ".join(missing)))
    return out
