"""The batch script, rendered by pure functions from the job's spec (golden-file tested).

Everything that comes from a user or a path is quoted twice over, for the two readers of the file:

* ``#SBATCH`` lines are read by sbatch's own parser (quotes and backslash escapes, ``#`` starts a comment,
  and a line holding "hetjob" splits the job), so their values are written with :func:`sbatch_quote` and
  validated beforehand (one line, no separator words);
* the body is read by bash, so every value is a ``shlex.quote``-d assignment and is only ever expanded
  inside double quotes.

The job's command, arguments, environment and name are not in the script at all: they travel in
``launch.json``, which the host agent reads.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field

from ._options import JobOptions, check_directive_text

_PLAIN = re.compile(r"^[A-Za-z0-9_\-=:.,/@+%]+$")


def sbatch_quote(arg: str) -> str:
    """Quote one argument for an ``#SBATCH`` line: sbatch strips quotes and backslashes, ends an unquoted
    argument at whitespace and treats an unquoted ``#`` as the start of a comment."""
    if not arg:
        raise ValueError("an #SBATCH argument must not be empty")
    if "\n" in arg or "\r" in arg or "\x00" in arg:
        raise ValueError(f"an #SBATCH argument must be on one line: {arg!r}")
    if _PLAIN.match(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def output_pattern(directory: str, name: str) -> str:
    """A Slurm output path in ``directory``: a literal ``%`` in the folder must be doubled (Slurm expands
    ``%j``, ``%A``, ``%a`` ...), and a backslash would turn every pattern off."""
    if "\\" in directory:
        raise ValueError(f"the job folder {directory!r} contains a backslash, which Slurm's output patterns cannot hold")
    return directory.replace("%", "%%").rstrip("/") + "/" + name


@dataclass(frozen=True)
class ArrayPart:
    """A job array: ``count`` tasks, at most ``parallelism`` at once; task i runs the job folder on line i
    (NUL-separated) of ``tasks_file``."""

    count: int
    tasks_file: str
    parallelism: int | None = None


@dataclass(frozen=True)
class BatchJob:
    """What the batch script is rendered from (paths as seen on the cluster)."""

    job_name: str
    workdir: str  # the job folder (the array's folder for an array)
    python: str
    agent: str
    job_dir: str | None = None  # the job folder the agent runs (None for an array: from tasks_file)
    nodes: int = 1
    gpus: int = 0
    gpu_type: str | None = None
    cpus: float | None = None
    memory: int | None = None  # bytes per node
    disk: int | None = None  # bytes per node (--tmp)
    time_limit: float | None = None  # seconds
    options: JobOptions = field(default_factory=JobOptions)
    array: ArrayPart | None = None
    # interpreter flags for the agent: ("-S",) for command jobs, whose agent needs the standard library only
    # (skipping site-packages' start-up hooks saves tens of milliseconds per job)
    python_flags: tuple[str, ...] = ()
    # a content-addressed agent uploaded to the cluster: the batch script runs it through ``boot`` (a small
    # Python program, see meshrun_ssh's verified upload) that checks the file and its SHA-256 and runs
    # exactly the bytes it checked, in the same process
    agent_sha256: str | None = None
    boot: str | None = None


def _mib(n: int) -> int:
    return max(1, math.ceil(n / (1024 * 1024)))


def gres_request(gpus: int, gpu_type: str | None, flag: str = "gres") -> str | None:
    """``--gres=gpu:a100:2`` or ``--gpus-per-node=a100:2`` (None for a CPU job)."""
    if not gpus:
        return None
    if flag == "gpus-per-node":
        return f"--gpus-per-node={gpu_type}:{gpus}" if gpu_type else f"--gpus-per-node={gpus}"
    return f"--gres=gpu:{gpu_type}:{gpus}" if gpu_type else f"--gres=gpu:{gpus}"


def directives(job: BatchJob) -> list[str]:
    """The sbatch options of the job, as they would be written on a command line."""
    o = job.options
    out = [f"--job-name={job.job_name}"]
    if job.array is not None:
        out.append(f"--output={output_pattern(job.workdir, 'slurm-%A_%a.out')}")
        cap = job.array.parallelism if job.array.parallelism else o.array_parallelism
        spec = f"0-{job.array.count - 1}" if job.array.count > 1 else "0"
        out.append(f"--array={spec}%{cap}" if cap else f"--array={spec}")
    else:
        out.append(f"--output={output_pattern(job.workdir, 'slurm-%j.out')}")
    out.append(f"--chdir={job.workdir}")
    out.append("--open-mode=append")  # a requeued job appends to its output instead of truncating it
    out.append(f"--nodes={job.nodes}")
    out.append("--ntasks-per-node=1")
    if job.cpus:
        out.append(f"--cpus-per-task={math.ceil(job.cpus)}")
    if job.memory:
        out.append(f"--mem={_mib(job.memory)}M")
    if job.disk:
        out.append(f"--tmp={_mib(job.disk)}M")
    g = gres_request(job.gpus, job.gpu_type, o.gpus_flag)
    if g:
        out.append(g)
    if o.time:
        out.append(f"--time={o.time}")
    elif job.time_limit:
        import meshrun.backend as mb

        out.append(f"--time={mb.slurm_time(job.time_limit)}")
    for key in ("partition", "account", "qos", "constraint", "reservation", "nodelist", "exclude"):
        v = getattr(o, key)
        if v:
            out.append(f"--{key}={v}")
    if o.exclusive:
        out.append("--exclusive")
    out.extend(o.sbatch)
    for a in out:
        check_directive_text(a, "sbatch option")
    return out


_PRELUDE = r"""set -u
# Slurm requeued the job (node failure, preemption, scontrol requeue): keep the records of the earlier run
# aside so the host agent starts afresh, and say so in the job's output
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
  meshrun_prev="$meshrun_job_dir/requeue-$SLURM_RESTART_COUNT"
  mkdir -p "$meshrun_prev"
  # the earlier run's host agent runs in a session of its own, which Slurm may not track: while it lives
  # on this node (or for up to 30 s when it ran on another), wait for its exit record, so that a late
  # record cannot land among this run's
  if [ -e "$meshrun_job_dir/state.json" ] && [ ! -e "$meshrun_job_dir/exit.json" ]; then
    meshrun_old_pid=$(grep -o '"pid": *[0-9]*' "$meshrun_job_dir/state.json" | head -n 1 | grep -o '[0-9]*$')
    meshrun_old_host=$(grep -o '"host": *"[^"]*"' "$meshrun_job_dir/state.json" | head -n 1 | cut -d'"' -f4)
    meshrun_w=0
    while [ ! -e "$meshrun_job_dir/exit.json" ] && [ "$meshrun_w" -lt 300 ]; do
      if [ "$meshrun_old_host" = "$(hostname)" ] && ! kill -0 "${meshrun_old_pid:-0}" 2>/dev/null; then break; fi
      sleep 0.1
      meshrun_w=$((meshrun_w + 1))
    done
  fi
  for meshrun_f in "$meshrun_job_dir"/.started "$meshrun_job_dir"/.rank*.started "$meshrun_job_dir"/state*.json \
      "$meshrun_job_dir"/exit*.json "$meshrun_job_dir"/result*.pkl "$meshrun_job_dir"/error*.json \
      "$meshrun_job_dir"/error*.pkl; do
    if [ -e "$meshrun_f" ]; then mv -f "$meshrun_f" "$meshrun_prev"/; fi
  done
  echo "[meshrun] Slurm requeued job ${SLURM_JOB_ID}: restart ${SLURM_RESTART_COUNT}" >>"$meshrun_job_dir/output.log"
fi
"""


def render_script(job: BatchJob) -> str:
    """The whole batch script. Pure: the same job gives the same text."""
    if job.nodes < 1:
        raise ValueError("nodes must be at least 1")
    if job.array is None and not job.job_dir:
        raise ValueError("a single job needs its job_dir")
    for f in job.python_flags:
        if not re.fullmatch(r"-[A-Za-z]+", f):
            raise ValueError(f"python flags are short options such as -S, got {f!r}")
    if (job.agent_sha256 is None) != (job.boot is None):
        raise ValueError("agent_sha256 and boot go together")
    if job.agent_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", job.agent_sha256):
        raise ValueError(f"agent_sha256 must be 64 hex digits, got {job.agent_sha256!r}")
    flags = "".join(f" {f}" for f in job.python_flags)
    if job.agent_sha256 is not None:
        agent = f'{flags} -c "$meshrun_boot" "$meshrun_agent" "$meshrun_agent_sha256"'
    else:
        agent = f'{flags} "$meshrun_agent"'
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {sbatch_quote(a)}" for a in directives(job)]
    lines.append("#")
    lines.append("# Rendered by meshrun: the job's command, arguments and environment are in launch.json, read by")
    lines.append("# the host agent below. Resubmitting this file (sbatch FILE) runs the job again.")
    q = shlex.quote
    lines.append(f"meshrun_python={q(job.python)}")
    lines.append(f"meshrun_agent={q(job.agent)}")
    if job.agent_sha256 is not None:
        lines.append("# the agent runs only if its content has this SHA-256 (checked by the program below, in the")
        lines.append("# process that runs it)")
        lines.append(f"meshrun_agent_sha256={job.agent_sha256}")
        lines.append(f"meshrun_boot={q(job.boot or '')}")
    if job.array is not None:
        lines.append(f"meshrun_tasks={q(job.array.tasks_file)}")
        lines.append("# task i runs the job folder on line i of the tasks file (NUL-separated)")
        lines.append('mapfile -d "" -t meshrun_dirs <"$meshrun_tasks"')
        lines.append('meshrun_job_dir=${meshrun_dirs[$SLURM_ARRAY_TASK_ID]}')
    else:
        lines.append(f"meshrun_job_dir={q(job.job_dir or '')}")
    body = _PRELUDE
    # the distributed-training contract is computed by the host agent on each node, from Slurm's variables
    if job.nodes == 1:
        body += (
            "# Slurm's CUDA_VISIBLE_DEVICES stands: launch.json says lease=false, mask_gpus=false\n"
            f'exec "$meshrun_python"{agent} run "$meshrun_job_dir"\n'
        )
    else:
        cpus = f" --cpus-per-task={math.ceil(job.cpus)}" if job.cpus else ""
        body += (
            "# node 0 of the allocation (this one) is the master: its address and a port free on it\n"
            f'meshrun_rendezvous=$("$meshrun_python"{agent} rendezvous) || exit "$?"\n'
            'eval "$meshrun_rendezvous"\n'
            "# one task per node\n"
            f"exec srun --nodes={job.nodes} --ntasks={job.nodes} --ntasks-per-node=1{cpus} --kill-on-bad-exit=1 \\\n"
            f'  "$meshrun_python"{agent} run "$meshrun_job_dir"\n'
        )
    return "\n".join(lines) + "\n" + body
