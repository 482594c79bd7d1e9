"""What travels with a task and what comes back from it.

Out: file archives (dstack's format: an uncompressed tar whose members are rooted at the archived
path's base name, uploaded to ``/api/files/upload_archive`` and mapped to a container path). A function
job, or a job with inputs/outputs, ships one archive holding its job folder (``launch.json``,
``payload.pkl``, ``spec.json``, the stager ``stage.py``) and the host agent, unpacked at
``<remote_dir>/<job id>``; ``files`` and ``workdir`` of the spec ship as their own archives.

In: the records of a job run under the agent (``exit.json``, ``result.pkl``, ``error.json`` ...) come back
through the run's log, the one channel from a task to its submitter that needs nothing but the dstack server:
the task runs the agent as ``run DIR --emit-records NONCE``, which streams the job's output and ends it with
the records framed with the job's nonce and a checksum; ``meshrun.backend.extract_records`` takes them out of
the log again and ``meshrun.backend.LogFilter`` hides them from ``logs()``.
"""

from __future__ import annotations

import hashlib
import io
import os
import shlex
import tarfile
from pathlib import Path

import meshrun.backend as mb

CLOUDPICKLE_CHECK = (
    '"${{MESHRUN_PYTHON:-python3}}" -c "import cloudpickle, sys; sys.exit(cloudpickle.__version__ != {v!r})" '
    '2>/dev/null || "${{MESHRUN_PYTHON:-python3}}" -m pip install -q "cloudpickle=={v}"'
)


# the stager's Python (the agent's rule: MESHRUN_DATA_PYTHON, else the agent's own); a failed install is not
# the task's end: the stager then says in the job's log that boto3 is missing, and what to do
BOTO3_CHECK = (
    '"${MESHRUN_DATA_PYTHON:-${MESHRUN_PYTHON:-python3}}" -c "import boto3" 2>/dev/null || '
    '"${MESHRUN_DATA_PYTHON:-${MESHRUN_PYTHON:-python3}}" -m pip install -q boto3 || true'
)


def function_command(remote_job_dir: str, *, cloudpickle_version: str | None, nonce: str,
                     boto3: bool = False) -> str:
    """The single shell command of a job run under the agent (a function job, or a job with inputs/outputs):
    the agent runs the job and frames its records; with ``boto3``, boto3 is installed first where it lacks."""
    run = shlex.join(mb.agent_command("PYTHON", f"{remote_job_dir}/_agent.py", remote_job_dir, nonce)[1:])
    run = '"${MESHRUN_PYTHON:-python3}" ' + run
    # braces: dstack joins commands with && and each pip fallback must stay one unit
    if boto3:
        run = "{ " + BOTO3_CHECK + "; } && " + run
    if cloudpickle_version:
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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
