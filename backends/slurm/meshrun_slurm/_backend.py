"""The Slurm backend: batch jobs through sbatch, GPUs through gres, multi-node through one srun step, arrays
for ``.map``, status from the agent's records on the shared filesystem first and from one batched squeue
(sacct for what squeue no longer knows) when Slurm's word is needed."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import meshrun
import meshrun.backend as mb

from . import _states as S
from ._options import BACKEND, JobOptions, SlurmOptions, SlurmSettings, job_options, user_comment
from ._runner import LocalRunner, SSHRunner
from ._script import ArrayPart, BatchJob, directives, render_script

JS = mb.JobState
SCRIPT = "job.sbatch"
ARRAY_MARK = "slurm-array.json"
ID_MARK = "slurm.json"

# sbatch errors worth another try (slurmctld busy or restarting)
_TRANSIENT = re.compile(r"(Socket timed out|temporarily unable|Unable to contact slurm controller|"
                        r"Connection refused|Transport endpoint|Zero Bytes were transmitted)", re.I)
# squeue says this when asked about ids it does not know
_INVALID_ID = re.compile(r"Invalid job id", re.I)

# While squeue shows a job COMPLETING (which hides its base state), sacct already has the state it ends in.
# These outcomes are final; a FAILED, NODE_FAIL or PREEMPTED job may still be requeued by Slurm (the job then
# goes back to PENDING), so for those meshrun waits until squeue itself shows the outcome.
SETTLED_WHILE_COMPLETING = frozenset({"CANCELLED", "TIMEOUT", "DEADLINE", "OUT_OF_MEMORY"})

# a job in Slurm's terminal state with no exit record yet: wait this long for the shared filesystem
SETTLE = 30.0
# a job Slurm shows FAILED whose agent was stopped by a signal from outside: while Slurm requeues a job
# (scontrol requeue, preemption, a node failure) squeue shows it FAILED for a moment before PENDING again;
# ask squeue afresh for this long before believing the FAILED
REQUEUE_SETTLE = 10.0
SINFO_TTL = 60.0  # partitions and node sizes
CLUSTER_TTL = 86400.0  # the cluster's name
CHECK_TTL = 10.0  # a good check()
ESTIMATE_TTL = 10.0  # sbatch --test-only answers for one shape of job
UNCONFIRMED_GRACE = 60.0  # an exit record of a job Slurm shows nowhere is taken as is after this long
MAX_QUERY_INTERVAL = 30.0  # squeue for jobs that have waited long: at most this far apart


@dataclass(frozen=True)
class Target:
    """Where one job's folder is: here (``job_dir``) and on the cluster (``cluster_dir``)."""

    job_id: str
    job_dir: Path
    cluster_dir: str
    nodes: int
    submitted_at: float


def _agent_trusts(rec: Mapping[str, Any] | None) -> bool:
    """Whether an agent exit record is the job's outcome without asking Slurm. Slurm ends a job with
    SIGTERM/SIGKILL for a time limit, a cancel, a node failure, preemption or OOM; the agent then records
    "cancelled" or a death by signal, and Slurm's own state is the truth."""
    if not isinstance(rec, Mapping):
        return False
    state = rec.get("state")
    if state in ("succeeded", "timeout"):
        return True
    return state == "failed" and not rec.get("signal") and rec.get("exit_code") not in (None, 137, 143)


class SlurmBackend(mb.Backend):
    """Run meshrun jobs as Slurm batch jobs (``[backends.slurm]``)."""

    name = "slurm"
    features = (
        mb.Feature.COMMANDS | mb.Feature.FUNCTIONS | mb.Feature.GPUS | mb.Feature.MULTI_NODE
        | mb.Feature.ARRAYS | mb.Feature.LOGS_FOLLOW | mb.Feature.REATTACH | mb.Feature.DATA
    )
    install_hint = mb.install_hint("slurm")
    # status() reads the agent's records first (a file read on the shared filesystem) and asks Slurm at most
    # every query_interval (growing with the jobs' age), so polling often costs files, not scheduler calls
    poll_interval = (0.01, 0.5)
    settings_model = SlurmSettings
    options_model = SlurmOptions

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        self._runner: Any = None
        self._lock = threading.RLock()
        self._targets: dict[str, Target | None] = {}
        self._squeue: dict[str, S.Row] = {}
        self._squeue_at = -1e9
        self._squeue_err: str | None = None
        self._sacct: dict[str, S.Row] = {}
        self._sacct_at: dict[str, float] = {}
        self._settle: dict[str, float] = {}
        self._requeue_settle: dict[tuple[str, float], float] = {}
        self._cluster_name: str | None = None
        self._agent_remote: str | None = None
        self._agent_sha: str | None = None  # login-node mode: the uploaded agent's SHA-256
        self._rest: Any = None
        self._sinfo: tuple[float, list[S.NodeGroup]] | None = None  # (time.time(), groups)
        self._checked: tuple[float, mb.Availability] | None = None
        self._me_ok = True
        self._user: str | None = None
        self._estimates: dict[str, tuple[float, mb.Offer]] = {}
        #: scheduler calls made by this instance, by program (squeue, sacct, sbatch ...)
        self.calls: Counter[str] = Counter()
        if self.settings.login_host:
            self.poll_interval = (0.5, 15.0)  # every status reads remote files

    # ------------------------------------------------------------------------------------------------
    # plumbing

    @property
    def runner(self) -> Any:
        with self._lock:
            if self._runner is None:
                if self.settings.login_host:
                    self._runner = SSHRunner(self.settings.login_host, self.settings.ssh)
                else:
                    self._runner = LocalRunner()
            return self._runner

    @property
    def shared_filesystem(self) -> bool:
        """True when the job folders here are the ones the nodes see (no login node in between)."""
        return not self.settings.login_host

    @property
    def rest(self) -> Any:
        with self._lock:
            if self._rest is None:
                from ._rest import RestClient

                self._rest = RestClient(self.settings, self._run)
            return self._rest

    @property
    def home(self) -> Path:
        return meshrun.get_config().home

    def _state_dir(self) -> Path:
        return self.home / "slurm"

    def _run(self, argv: Sequence[str], *, check: bool = True, what: str | None = None,
             timeout: float | None = None, input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run one command through the runner, translating failures into meshrun errors."""
        argv = [str(a) for a in argv]
        prog = os.path.basename(argv[0])
        self.calls[f"{prog} --test-only" if "--test-only" in argv else prog] += 1
        t = self.settings.request_timeout if timeout is None else timeout
        try:
            p = self.runner.run(argv, input=input, timeout=t)
        except FileNotFoundError as e:
            raise meshrun.BackendUnavailable(
                f"{argv[0]} is not installed here; install Slurm's client tools or set login_host "
                f"([backends.slurm] login_host = \"login-node\") to submit through a login node",
                backend=BACKEND, argv=argv,
            ) from e
        except subprocess.TimeoutExpired as e:
            raise meshrun.BackendError(f"{prog} did not answer within {t:g}s", backend=BACKEND, argv=argv) from e
        except meshrun.MeshrunError:
            raise
        except OSError as e:
            raise meshrun.BackendError(f"cannot run {prog}: {e}", backend=BACKEND, argv=argv) from e
        if check and p.returncode != 0:
            raise meshrun.BackendError(
                f"{what or prog} failed", backend=BACKEND, argv=argv, returncode=p.returncode,
                stderr=(p.stderr or p.stdout or "").strip(),
            )
        return p

    def _python(self) -> str:
        if self.settings.python:
            return self.settings.python
        return sys.executable if self.shared_filesystem else "python3"

    def _cluster_root(self) -> str:
        """The folder on the cluster that holds job folders (login-node mode)."""
        d = self.settings.remote_dir
        if d.startswith("~/") or d == "~":
            d = self.runner.home().rstrip("/") + d[1:]
        if not d.startswith("/"):
            d = self.runner.home().rstrip("/") + "/" + d
        return d.rstrip("/")

    def _cluster_dir(self, job_dir: Path) -> str:
        if self.shared_filesystem:
            return str(job_dir)
        return f"{self._cluster_root()}/jobs/{job_dir.name}"

    def _agent_path(self) -> str:
        """The host agent as the batch script runs it. On a shared filesystem with this very interpreter:
        the agent compiled once into a cached .pyc (Python runs a .pyc directly), which spares every job
        compiling the agent's source."""
        if self.shared_filesystem:
            src = str(mb.agent_file())
            if self._python() != sys.executable:
                return src
            with self._lock:
                if self._agent_remote is None:
                    self._agent_remote = _compiled_agent(src, self._state_dir() / "agent") or src
                return self._agent_remote
        return self._verified_agent()[0]

    def _verified_agent(self) -> tuple[str, str]:
        """Login-node mode: (path, sha256) of the agent on the cluster, ``remote_dir/agent/agent-<sha[:16]>.py``.
        Checked (and installed or replaced when missing or not exactly this content) once per backend
        instance, in one remote command that refuses a remote_dir other users may write to; every job then
        checks the hash again in the process that runs it (BatchJob.boot)."""
        with self._lock:
            if self._agent_remote is None or self._agent_sha is None:
                from meshrun_ssh import content_name, install_verified

                data = Path(mb.agent_file()).read_bytes()
                name, sha = content_name("agent", data)
                d = f"{self._cluster_root()}/agent"
                pythons = list(dict.fromkeys([self.settings.python or "python3", "python3"]))
                install_verified(self.runner.conn(), d, {name: data}, pythons=pythons, what="the host agent",
                                 setting="backends.slurm.remote_dir", backend=BACKEND)
                self._agent_remote, self._agent_sha = f"{d}/{name}", sha
            return self._agent_remote, self._agent_sha

    def _write_local(self, path: Path, data: bytes, mode: int = 0o600) -> None:
        LocalRunner().put_bytes(data, str(path), mode)

    # ------------------------------------------------------------------------------------------------
    # a job's folder, as the core hands it over (meshrun.backend.JobRef): what submit left there

    def _target(self, ref: str) -> Target | None:
        """Where the job of ``ref`` is, read from the folder it carries (launch.json and the id marker
        ``submit`` wrote); None for a bare Slurm id (then Slurm alone answers)."""
        with self._lock:
            if ref in self._targets:
                return self._targets[ref]
        if not isinstance(ref, mb.JobRef):
            return None
        mark = _read_json(ref.job_dir / ID_MARK)
        launch = _read_json(ref.job_dir / "launch.json")
        t = Target(ref.job_id, ref.job_dir, self._cluster_dir(ref.job_dir), int(launch.get("nodes") or 1),
                   float(mark.get("submitted_at") or 0))
        with self._lock:
            self._targets[ref.backend_id] = t
        return t

    def _mark(self, job_dir: Path, slurm_id: str, now: float) -> None:
        self._write_local(job_dir / ID_MARK, json.dumps({"slurm_job_id": slurm_id, "submitted_at": now}).encode())

    # ------------------------------------------------------------------------------------------------
    # contract: check, offers

    def check(self) -> mb.Availability:
        """Whether Slurm answers (sinfo); a good answer is kept for a few seconds, as placement asks before
        every submission."""
        with self._lock:
            hit = self._checked
            if hit is not None and time.monotonic() - hit[0] < CHECK_TTL:
                return hit[1]
        av = self._check()
        with self._lock:
            self._checked = (time.monotonic(), av) if av.ok else None
        return av

    def _check(self) -> mb.Availability:
        try:
            if self.settings.api == "rest":
                info = self.rest.ping()
                return mb.Availability(True, detail={"api": "rest", **info})
            if not self.settings.login_host:
                import shutil

                if shutil.which("sbatch") is None:
                    return mb.Availability(
                        False, "sbatch is not installed on this machine",
                        hint="install Slurm's client tools, or set [backends.slurm] login_host to submit "
                             "through a login node over SSH",
                    )
            # one sinfo answers both "is Slurm there" and the node sizes offers() needs next; the cluster's
            # name is asked for at the same time
            names = threading.Thread(target=self.cluster_name, daemon=True)
            names.start()
            try:
                groups = self._node_groups(max_age=CHECK_TTL)
            except meshrun.BackendError as e:
                return mb.Availability(False, f"sinfo failed: {(e.stderr or str(e)).strip()[:300]}",
                                            hint="is slurmctld running? try: scontrol ping")
            finally:
                names.join(15)
            parts = list(dict.fromkeys(g.partition + ("*" if g.default else "") for g in groups))
            return mb.Availability(True, detail={"partitions": parts, "via": self.runner.where})
        except Exception as e:  # check never raises
            return mb.Availability(False, f"{type(e).__name__}: {e}")

    def cluster_name(self) -> str:
        """Slurm's ClusterName (``scontrol show config``), kept on disk for a day."""
        if self._cluster_name is None:
            cached = self._disk_cache("cluster", CLUSTER_TTL)
            if isinstance(cached, str):
                self._cluster_name = cached
                return cached
            name = None
            try:
                p = self._run(["scontrol", "show", "config"], check=False, timeout=15)
                m = re.search(r"^ClusterName\s*=\s*(\S+)", p.stdout, re.M)
                if m:
                    name = m.group(1)
            except meshrun.MeshrunError:
                pass
            if name:
                self._disk_cache("cluster", CLUSTER_TTL, name)
            self._cluster_name = name or "slurm"
        return self._cluster_name

    def _disk_cache(self, name: str, ttl: float, value: Any = None) -> Any:
        """A small answer shared by every process of this MESHRUN_HOME (per cluster access), or None."""
        got = self._disk_entry(name, ttl, value)
        return got[1] if got is not None else None

    def _disk_entry(self, name: str, ttl: float, value: Any = None) -> tuple[float, Any] | None:
        where = json.dumps([self.settings.api, self.settings.login_host, self.settings.endpoint], default=str)
        key = hashlib.sha1(where.encode()).hexdigest()[:10]
        path = self._state_dir() / "cache" / f"{name}-{key}.json"
        if value is not None:
            try:
                self._write_local(path, json.dumps({"time": time.time(), "value": value}).encode(), 0o644)
            except OSError:
                pass
            return time.time(), value
        try:
            data = json.loads(path.read_text())
            if time.time() - float(data["time"]) < ttl:
                return float(data["time"]), data["value"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def offers(self, spec: Any) -> list[mb.Offer]:
        """One offer per partition the job may use: whether it can ever fit there (sinfo: nodes, CPUs,
        memory, GPUs, time limit), and when Slurm would start it (``sbatch --test-only``)."""
        opts = job_options(spec.options_for(BACKEND), self.settings, spec=spec)
        cluster = self.cluster_name()
        groups = self._node_groups()
        names: list[str] = []
        for g in groups:
            if g.partition not in names:
                names.append(g.partition)
        defaults = [g.partition for g in groups if g.default]
        if opts.partition:
            wanted = opts.partition.split(",")
        else:
            wanted = sorted(names, key=lambda n: (n not in defaults, names.index(n)))
        out: list[Any] = [None] * len(wanted)

        def one(i: int, part: str) -> None:
            out[i] = self._offer_for(part, [g for g in groups if g.partition == part], spec, opts, cluster)

        if len(wanted) == 1:
            one(0, wanted[0])
        else:  # one sbatch --test-only per partition, at the same time
            threads = [threading.Thread(target=one, args=(i, p), daemon=True) for i, p in enumerate(wanted)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            out = [o if o is not None else mb.Offer(backend=BACKEND, where=f"{cluster}/{p}", fits=False,
                                                         reason="no answer from Slurm in time")
                   for o, p in zip(out, wanted, strict=True)]
        if not out:
            out.append(mb.Offer(backend=BACKEND, where=cluster, fits=False, reason="the cluster has no partitions"))
        return out

    def _node_groups(self, max_age: float = SINFO_TTL) -> list[S.NodeGroup]:
        """The cluster's partitions and node sizes (sinfo), cached for a minute (here and on disk, for the
        next process): they rarely change."""
        with self._lock:
            if self._sinfo is not None and time.time() - self._sinfo[0] < max_age:
                return self._sinfo[1]
        entry = self._disk_entry("sinfo", max_age)
        if entry is not None and isinstance(entry[1], list):
            try:
                groups = [S.NodeGroup(**g) for g in entry[1]]
                with self._lock:
                    self._sinfo = (entry[0], groups)
                return groups
            except TypeError:
                pass
        try:
            p = self._run(["sinfo", "--noheader", f"--format={S.SINFO_FORMAT}"], what="sinfo")
            groups = S.parse_sinfo(p.stdout)
        except meshrun.BackendUnavailable:
            if self.settings.api != "rest":
                raise
            groups = self.rest.node_groups()  # no Slurm tools here: ask slurmrestd
        with self._lock:
            self._sinfo = (time.time(), groups)
        from dataclasses import asdict

        self._disk_cache("sinfo", max_age, [asdict(g) for g in groups])
        return groups

    def _offer_for(self, part: str, groups: list[S.NodeGroup], spec: Any, opts: JobOptions,
                   cluster: str) -> mb.Offer:
        r = spec.resources
        base = mb.Offer(
            backend=BACKEND, where=f"{cluster}/{part}", gpus=r.gpus, gpu_type=r.gpu_type, cpus=r.cpus,
            memory=r.memory, nodes=r.nodes, region=cluster, expected_start=None, start_note="unknown",
            detail={"partition": part, "cluster": cluster},
        )
        if not groups:
            return base.rejected(f"the cluster has no partition {part!r}")
        if all(g.available not in ("up",) for g in groups):
            return base.rejected(f"partition {part} is {groups[0].available}")
        limit = groups[0].time_limit
        if spec.time_limit and limit and spec.time_limit > limit:
            return base.rejected(
                f"the job's time limit ({meshrun.format_duration(spec.time_limit)}) exceeds partition {part}'s "
                f"({meshrun.format_duration(limit)})")
        cpus = math.ceil(r.cpus) if r.cpus else 1
        mem_mb = math.ceil(r.memory / 2**20) if r.memory else 0
        fitting, gres_type, why = [], None, []
        for g in groups:
            gpus = S.gpus_in_gres(g.gres, r.gpu_type)
            have = max((n for _, n in gpus), default=0)
            if g.cpus < cpus:
                why.append(f"{g.nodes}: {g.cpus} CPUs")
                continue
            if mem_mb and g.memory < mem_mb:
                why.append(f"{g.nodes}: {g.memory} MB of memory")
                continue
            if r.gpus and have < r.gpus:
                what = f"{r.gpu_type} GPUs" if r.gpu_type else "GPUs"
                why.append(f"{g.nodes}: {have} {what}")
                continue
            if r.gpus and gpus:
                best = max(gpus, key=lambda x: x[1])
                gres_type = gres_type or best[0]
            fitting.append(g)
        count = sum(g.count for g in fitting)
        if count < r.nodes:
            need = f"{r.nodes} node(s) with {cpus} CPU(s)" + (f", {mem_mb} MB" if mem_mb else "") + (
                f", {r.gpus} {r.gpu_type or ''} GPU(s)".replace("  ", " ") if r.gpus else "")
            nodes = f"{count} such node(s)" + (f" (largest: {'; '.join(why[:3])})" if why else "")
            return base.rejected(f"partition {part} can never fit the job: it needs {need}, the partition has {nodes}")
        gpu_type = r.gpu_type
        if r.gpus and r.gpu_type and gres_type:
            gpu_type = gres_type  # Slurm's own spelling of the type
        offer = replace(base, gpu_type=gpu_type,
                        detail={**base.detail, "gres_type": gres_type if r.gpu_type else None,
                                "nodes_fitting": count})
        if not self.settings.test_only:
            return replace(offer, start_note="start not estimated (test_only = false)")
        return self._estimate(offer, spec, opts, part, gres_type if r.gpu_type else None)

    def _estimate(self, offer: mb.Offer, spec: Any, opts: JobOptions, part: str,
                  gres_type: str | None) -> mb.Offer:
        r = spec.resources
        job = BatchJob(
            job_name="meshrun-estimate", workdir="/", python="python3", agent="/dev/null", job_dir="/",
            nodes=r.nodes, gpus=r.gpus, gpu_type=gres_type or r.gpu_type, cpus=r.cpus, memory=r.memory,
            disk=r.disk, time_limit=spec.time_limit, options=replace(opts, partition=part),
        )
        args = [a for a in directives(job) if not a.startswith(("--output=", "--chdir=", "--open-mode="))]
        argv = ["sbatch", "--test-only", "--output=/dev/null", *args, "--wrap=true"]
        key = "\0".join(argv)
        with self._lock:
            hit = self._estimates.get(key)
            if hit is not None and time.monotonic() - hit[0] < ESTIMATE_TTL:
                old = hit[1]
                es = old.expected_start
                if es:
                    es = max(0.0, es - (time.monotonic() - hit[0]))
                return replace(old, gpu_type=offer.gpu_type, price_per_hour=offer.price_per_hour,
                               expected_start=es)
        est_offer = self._estimate_now(offer, argv, part)
        with self._lock:
            self._estimates[key] = (time.monotonic(), est_offer)
        return est_offer

    def _estimate_now(self, offer: mb.Offer, argv: list[str], part: str) -> mb.Offer:
        try:
            p = self._run(argv, check=False, timeout=30)
        except meshrun.MeshrunError as e:
            return replace(offer, expected_start=None, start_note=f"no estimate: {str(e).splitlines()[0]}")
        text = (p.stderr or "") + (p.stdout or "")
        est = S.parse_test_only(text)
        if est is None:
            msg = " ".join(text.strip().splitlines()[-1:]) or f"exit code {p.returncode}"
            if p.returncode != 0 and re.search(r"not available|Invalid|exceeds|not satisf|violat", msg, re.I):
                return offer.rejected(f"Slurm refuses the job in partition {part}: {msg}")
            return replace(offer, expected_start=None, start_note=f"no estimate (sbatch --test-only: {msg})")
        now = time.time() if self.shared_filesystem else self._cluster_now()
        secs = S.seconds_until(est["start"], now)
        if secs is not None and secs < 2:
            secs = 0.0
        note = f"Slurm's estimate (sbatch --test-only): start at {est['start']} on {est['nodes']}"
        return replace(offer, expected_start=secs, start_note=note,
                       detail={**offer.detail, "estimate": est})

    def _cluster_now(self) -> float:
        try:
            p = self._run(["date", "+%Y-%m-%dT%H:%M:%S"], check=True, timeout=15)
            t = S.parse_time(p.stdout.strip())
            return t if t is not None else time.time()
        except meshrun.MeshrunError:
            return time.time()

    # ------------------------------------------------------------------------------------------------
    # contract: submit

    def native(self, submission: mb.Submission, offer: mb.Offer | None = None) -> str:
        """The batch script sbatch would get (``#SBATCH`` lines and all)."""
        spec = submission.spec
        opts = job_options(spec.options_for(BACKEND), self.settings, spec=spec)
        cluster_dir = self._cluster_dir(submission.job_dir)
        job = self._batch_job(spec, opts, offer, job_name=submission.name, workdir=cluster_dir, job_dir=cluster_dir)
        try:
            return render_script(job)
        except ValueError as e:
            raise _render_error(e) from None

    def _prepare_launch(self, sub: mb.Submission) -> dict[str, Any]:
        launch = dict(sub.launch)
        launch["lease"] = False  # Slurm hands out the GPUs ...
        launch["mask_gpus"] = False  # ... and its CUDA_VISIBLE_DEVICES stands
        launch.setdefault("grace_period", self.settings.grace_period)
        launch["scheduler"] = BACKEND  # the agent reads the env contract from Slurm's variables
        if not self.shared_filesystem:
            # through a login node the job runs in its folder on the cluster, where `files` are placed
            launch["local_cwd"] = launch.get("cwd")
            launch["cwd"] = self._cluster_dir(sub.job_dir)
        sub.launch.update(launch)
        self._write_local(sub.job_dir / "launch.json", (json.dumps(launch, sort_keys=True) + "\n").encode())
        return launch

    def _batch_job(self, spec: Any, opts: JobOptions, offer: mb.Offer | None, *, job_name: str,
                   workdir: str, job_dir: str | None, array: ArrayPart | None = None,
                   commands_only: bool | None = None) -> BatchJob:
        r = spec.resources
        if offer is not None and offer.backend == BACKEND and not opts.partition:
            part = (offer.detail or {}).get("partition")
            if part:
                opts = replace(opts, partition=part)
        gpu_type = r.gpu_type
        if offer is not None and offer.backend == BACKEND and (offer.detail or {}).get("gres_type"):
            gpu_type = offer.detail["gres_type"]
        if commands_only is None:
            commands_only = spec.kind == "command"
        verified: dict[str, Any] = {}
        if not self.shared_filesystem:
            verified = {"agent_sha256": self._verified_agent()[1], "boot": mb.boot_program()}
        return BatchJob(
            job_name=job_name, workdir=workdir, python=self._python(), agent=self._agent_path(), job_dir=job_dir,
            nodes=r.nodes, gpus=r.gpus, gpu_type=gpu_type, cpus=r.cpus, memory=r.memory, disk=r.disk,
            time_limit=spec.time_limit, options=opts, array=array,
            # a command job's agent needs the standard library only: no site-packages start-up hooks
            python_flags=("-S",) if commands_only else (), **verified,
        )

    def _stage(self, local_dir: Path, cluster_dir: str, names: Sequence[str], spec: Any = None,
               local_cwd: str | None = None) -> None:
        """Login-node mode: copy the job folder's files to the cluster, and the spec's ``files`` into the job's
        folder there (a target is relative to it)."""
        if self.shared_filesystem:
            return
        for n in names:
            p = local_dir / n
            if p.exists():
                self.runner.put_bytes(p.read_bytes(), f"{cluster_dir}/{n}", 0o600)
        for dst, src in (spec.files.items() if spec is not None else ()):
            s = Path(src if os.path.isabs(src) else os.path.join(local_cwd or os.getcwd(), src))
            rel = dst.lstrip("/") if not os.path.isabs(dst) else None
            target = f"{cluster_dir}/{rel}" if rel is not None else dst
            files = [s] if s.is_file() else sorted(p for p in s.rglob("*") if p.is_file())
            for f in files:
                sub = "" if f == s else "/" + f.relative_to(s).as_posix()
                self.runner.put_bytes(f.read_bytes(), target + sub, f.stat().st_mode & 0o777)

    def _sbatch(self, script_path: str, comment: str | None) -> str:
        argv = ["sbatch", "--parsable"]
        if comment:
            argv.append(f"--comment={comment}")
        argv.append(script_path)
        delay = 0.5
        for attempt in range(4):
            p = self._run(argv, check=False, what="sbatch")
            if p.returncode == 0:
                out = p.stdout.strip().splitlines()
                m = re.match(r"^(\d+)", out[-1] if out else "")
                if not m:
                    raise meshrun.BackendError("sbatch did not print a job id", backend=BACKEND, argv=argv,
                                               returncode=0, stderr=p.stdout + p.stderr)
                with self._lock:
                    self._squeue_at = -1e9  # the next status asks Slurm afresh
                return m.group(1)
            err = (p.stderr or p.stdout or "").strip()
            if attempt < 3 and _TRANSIENT.search(err):
                time.sleep(delay)
                delay *= 2
                continue
            raise meshrun.BackendError("sbatch refused the job", backend=BACKEND, argv=argv,
                                       returncode=p.returncode, stderr=err)
        raise AssertionError("unreachable")  # pragma: no cover

    def submit(self, submission: mb.Submission, offer: mb.Offer | None = None) -> str:
        spec = submission.spec
        opts = job_options(spec.options_for(BACKEND), self.settings, spec=spec)
        if self.settings.api == "rest":
            return self.rest_submit(submission, offer, opts)
        self._prepare_launch(submission)
        cluster_dir = self._cluster_dir(submission.job_dir)
        job = self._batch_job(spec, opts, offer, job_name=submission.name, workdir=cluster_dir, job_dir=cluster_dir)
        try:
            script = render_script(job)
        except ValueError as e:
            raise _render_error(e) from None
        self._write_local(submission.job_dir / SCRIPT, script.encode(), 0o700)
        self._stage(submission.job_dir, cluster_dir, [f.name for f in submission.files()] + [SCRIPT], spec,
                    submission.launch.get("local_cwd"))
        slurm_id = self._sbatch(f"{cluster_dir}/{SCRIPT}", _comment(spec.display_name, opts))
        self._mark(submission.job_dir, slurm_id, time.time())
        return slurm_id

    def submit_array(self, submissions: Sequence[mb.Submission], offer: mb.Offer | None = None) -> list[str]:
        """Jobs of one shape become one ``sbatch --array``; jobs of different shapes, one array per shape."""
        if not submissions:
            return []
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(submissions):
            groups.setdefault(_shape(s.spec), []).append(i)
        ids: list[str | None] = [None] * len(submissions)
        for members in groups.values():
            subs = [submissions[i] for i in members]
            for i, bid in zip(members, self._submit_one_array(subs, offer), strict=True):
                ids[i] = bid
        return [i for i in ids if i is not None]

    def _submit_one_array(self, subs: Sequence[mb.Submission], offer: mb.Offer | None) -> list[str]:
        spec = subs[0].spec
        opts = job_options(spec.options_for(BACKEND), self.settings, spec=spec)
        if len(subs) == 1:
            return [self.submit(subs[0], offer)]
        token = f"{subs[0].job_id}-{len(subs)}"
        array_dir = self._state_dir() / "arrays" / token
        array_dir.mkdir(parents=True, exist_ok=True)
        cluster_array = str(array_dir) if self.shared_filesystem else f"{self._cluster_root()}/arrays/{token}"
        tasks = []
        for i, s in enumerate(subs):
            self._prepare_launch(s)
            cdir = self._cluster_dir(s.job_dir)
            tasks.append(cdir)
            self._write_local(s.job_dir / ARRAY_MARK,
                              json.dumps({"array": token, "index": i, "dir": cluster_array}).encode())
            self._stage(s.job_dir, cdir, [f.name for f in s.files()], s.spec, s.launch.get("local_cwd"))
        tasks_data = b"".join(t.encode() + b"\0" for t in tasks)
        self._write_local(array_dir / "tasks", tasks_data)
        job = self._batch_job(
            spec, opts, offer, job_name=f"meshrun-array-{token}", workdir=cluster_array, job_dir=None,
            array=ArrayPart(count=len(subs), tasks_file=f"{cluster_array}/tasks", parallelism=opts.array_parallelism),
            commands_only=all(x.spec.kind == "command" for x in subs),
        )
        try:
            script = render_script(job)
        except ValueError as e:
            raise _render_error(e) from None
        self._write_local(array_dir / SCRIPT, script.encode(), 0o700)
        self._stage(array_dir, cluster_array, ["tasks", SCRIPT])
        comment = _comment(f"{spec.display_name} x{len(subs)}", opts)
        if self.settings.api == "rest":
            array_id = self.rest.submit(job, script, comment=comment)
            with self._lock:
                self._squeue_at = -1e9
        else:
            array_id = self._sbatch(f"{cluster_array}/{SCRIPT}", comment)
        now = time.time()
        ids = []
        for i, s in enumerate(subs):
            ids.append(f"{array_id}_{i}")
            self._mark(s.job_dir, ids[-1], now)
        return ids

    # ------------------------------------------------------------------------------------------------
    # contract: status

    def _exit_records(self, targets: Sequence[Target]) -> dict[str, list[Any]]:
        """The agent's exit records of each job (one per node; None where missing), by job id: read here on a
        shared filesystem, else by one ``_agent.py records DIR...`` on the login node for all of them."""
        out: dict[str, list[Any]] = {}
        if not targets:
            return out
        dirs = [str(t.job_dir) if self.shared_filesystem else t.cluster_dir for t in targets]
        if self.shared_filesystem:
            data = mb.exit_records(dirs)
        else:
            try:
                from meshrun_ssh import boot_argv

                # the hash is checked again by the process that runs the agent: a copy swapped after this
                # backend's check is refused, never run
                argv = boot_argv(self._python(), self._verified_agent(), ["records", *dirs])
                p = self._run(argv, check=True, what="reading exit records")
                data = mb.parse_exit_records(p.stdout)
            except (meshrun.MeshrunError, ValueError, IndexError):
                return out
        for t, d in zip(targets, dirs):
            recs = list(data.get(d) or [])
            out[t.job_id] = (recs + [None] * t.nodes)[: t.nodes]
        return out

    def _scheduler_rows(self, ids: Sequence[str], *, fresh: bool = False) -> tuple[dict[str, S.Row], str | None]:
        """Slurm's view of ``ids``: one squeue for all of the user's jobs (cached for query_interval), and
        one sacct for those squeue no longer shows or shows as COMPLETING (which hides the base state)."""
        now = time.monotonic()
        with self._lock:
            stale = fresh or now - self._squeue_at >= self._query_interval(ids)
        if stale:
            if self.settings.api == "rest":
                listed, err = self.rest.jobs()
            else:
                listed, err = self._squeue_all()
            with self._lock:
                self._squeue_at = time.monotonic()
                self._squeue_err = err
                if err is None:
                    self._squeue = listed
        with self._lock:
            sq, err = dict(self._squeue), self._squeue_err
        if err is not None:
            return {}, err
        rows: dict[str, S.Row] = {}
        ask: list[str] = []
        for i in ids:
            row = sq.get(i)
            if row is not None:
                rows[i] = row
            if row is None or row.state == "COMPLETING":
                ask.append(i)
        if ask and self.settings.sacct:
            acct = self._sacct_rows(ask, stale)
            for i in ask:
                a = acct.get(i)
                if a is None:
                    continue
                if i not in rows:
                    rows[i] = a
                elif rows[i].state == "COMPLETING" and a.state in SETTLED_WHILE_COMPLETING:
                    rows[i] = replace(a, nodes=rows[i].nodes or a.nodes, source="squeue+sacct")
        return rows, None

    def _remote_user(self) -> str:
        if self._user is None:
            if self.shared_filesystem:
                import getpass

                self._user = getpass.getuser()
            else:
                self._user = self._run(["id", "-un"], what="id -un").stdout.strip()
        return self._user

    def _query_interval(self, ids: Sequence[str]) -> float:
        """query_interval for fresh jobs, growing to MAX_QUERY_INTERVAL with the age of the youngest job."""
        ages = []
        for i in ids:
            t = self._targets.get(i)
            if t is not None and t.submitted_at:
                ages.append(time.time() - t.submitted_at)
        base = self.settings.query_interval
        if not ages:
            return base
        return min(max(base, MAX_QUERY_INTERVAL), max(base, min(ages) / 20.0))

    def _squeue_all(self) -> tuple[dict[str, S.Row], str | None]:
        """All of this user's jobs slurmctld knows, in one call (however many jobs meshrun is asking about)."""
        who = ["--me"] if self._me_ok else [f"--user={self._remote_user()}"]
        argv = ["squeue", *who, "--noheader", "--array", "--states=all", f"--format={S.SQUEUE_FORMAT}"]
        try:
            p = self._run(argv, check=False, timeout=30)
        except meshrun.MeshrunError as e:
            return {}, str(e).splitlines()[0]
        if p.returncode != 0 and self._me_ok and re.search(r"unrecognized option|invalid option", p.stderr or ""):
            self._me_ok = False  # Slurm before 20.11 has no --me
            return self._squeue_all()
        if p.returncode != 0:
            return {}, f"squeue failed: {(p.stderr or p.stdout).strip()[:300]}"
        return S.parse_squeue(p.stdout), None

    def _sacct_rows(self, ids: Sequence[str], allow_call: bool) -> dict[str, S.Row]:
        """sacct for ``ids``, at most once per query_interval for a given id."""
        now = time.monotonic()
        with self._lock:
            due = [i for i in ids if now - self._sacct_at.get(i, -1e9) >= self.settings.query_interval]
        if due and allow_call:
            q = S.ids_for_query(due)
            argv = ["sacct", "--noheader", "--parsable2", "--allocations", f"--format={S.SACCT_FIELDS}",
                    f"--jobs={','.join(q)}"]
            rows: dict[str, S.Row] = {}
            try:
                if self.settings.api == "rest":
                    rows = self.rest.db_jobs(q)
                else:
                    p = self._run(argv, check=False, timeout=30)
                    if p.returncode == 0:
                        rows = S.parse_sacct(p.stdout)
            except meshrun.MeshrunError:
                rows = {}
            with self._lock:
                t = time.monotonic()
                for i in due:
                    self._sacct_at[i] = t
                self._sacct.update(rows)
        with self._lock:
            return {i: self._sacct[i] for i in ids if i in self._sacct}

    def status(self, refs: Sequence[mb.JobRef]) -> dict[str, mb.JobStatus]:
        targets = {str(r): self._target(r) for r in refs}
        ids = list(targets)
        records = self._exit_records([t for t in targets.values() if t is not None])
        out: dict[str, mb.JobStatus] = {}
        need: list[str] = []
        for i in ids:
            t = targets[i]
            recs = records.get(t.job_id) if t is not None else None
            st = _from_records(recs) if recs else None
            if st is not None:
                known = self._squeue.get(i)  # Slurm's node names, when squeue has already been asked
                out[i] = replace(st, where=known.nodes) if known is not None and known.nodes else st
            else:
                need.append(i)
        if not need:
            return out
        rows, err = self._scheduler_rows(need)
        for i in need:
            t = targets[i]
            recs = (records.get(t.job_id) if t is not None else None) or []
            out[i] = self._combine(i, t, recs, rows.get(i), err)
        return out

    def _combine(self, bid: str, t: Target | None, recs: list[Any], row: S.Row | None,
                 err: str | None) -> mb.JobStatus:
        rec0 = recs[0] if recs else None
        if err is not None:
            return mb.JobStatus(JS.UNKNOWN, reason=f"Slurm cannot be asked just now: {err}")
        if row is None:
            if isinstance(rec0, Mapping):
                # an exit record Slurm cannot confirm (the agent was stopped by a signal): believe it only
                # once Slurm has had ample time to show the job (sacct lags; a restarted slurmctld recovers)
                ended = float(rec0.get("ended_at") or 0)
                if time.time() - ended > min(self.settings.lost_after, UNCONFIRMED_GRACE):
                    return mb.map_agent_status(rec0)
                return mb.JobStatus(JS.UNKNOWN, reason=f"its agent recorded {rec0.get('state')}; "
                                                            f"waiting for Slurm to confirm")
            age = time.time() - (t.submitted_at if t is not None else 0)
            if t is None or age < self.settings.lost_after:
                return mb.JobStatus(JS.UNKNOWN, reason=f"Slurm does not show job {bid} (yet)")
            return mb.JobStatus(
                JS.LOST, reason=f"Slurm no longer knows job {bid} (neither squeue nor sacct shows it) and it "
                                f"left no exit record")
        st = S.to_status(row)
        if row.state == "FAILED" and isinstance(rec0, Mapping) and rec0.get("signal") and not _agent_trusts(rec0):
            key = (bid, float(rec0.get("ended_at") or 0))
            first = self._requeue_settle.setdefault(key, time.monotonic())
            if time.monotonic() - first < REQUEUE_SETTLE:
                with self._lock:
                    self._squeue_at = -1e9  # the next status asks squeue again
                return mb.JobStatus(JS.RUNNING, reason="its agent was stopped by a signal; waiting to see whether "
                                                       "Slurm requeues it", where=row.nodes)
        if st.state.terminal:
            # an exit record says more than Slurm's COMPLETED/FAILED; Slurm says more about what killed it
            if isinstance(rec0, Mapping) and row.state in ("COMPLETED", "FAILED"):
                mine = mb.map_agent_status(rec0)
                if mine.state.terminal and (mine.state is st.state or _agent_trusts(rec0)):
                    return replace(mine, where=row.nodes or mine.where)
                if mine.state.terminal and mine.reason:
                    return replace(st, reason=f"{st.reason}; its agent says: {mine.reason}")
            if row.state in ("COMPLETED", "FAILED") and not isinstance(rec0, Mapping) and t is not None:
                # the agent wrote its records (with the exit code) before the job ended: give the shared
                # filesystem, or the login node's copy, a moment
                first = self._settle.setdefault(bid, time.monotonic())
                if time.monotonic() - first < SETTLE:
                    return mb.JobStatus(JS.RUNNING, reason=f"{row.state.lower()}; waiting for its records "
                                             "to appear", where=row.nodes)
            return st
        return st

    # ------------------------------------------------------------------------------------------------
    # contract: cancel, logs, results, find

    def cancel(self, ref: mb.JobRef) -> None:
        backend_id = str(ref)
        if self.settings.api == "rest":
            self.rest.cancel(backend_id)
        else:
            p = self._run(["scancel", backend_id], check=False)
            err = (p.stderr or "").strip()
            if p.returncode != 0 and not re.search(r"already completing or completed|Invalid job id", err, re.I):
                raise meshrun.BackendError(f"scancel {backend_id} failed", backend=BACKEND, argv=["scancel", backend_id],
                                           returncode=p.returncode, stderr=err)
        with self._lock:
            self._squeue_at = -1e9
            self._sacct_at.pop(backend_id, None)

    def _log_files(self, t: Target, slurm_id: str) -> tuple[str, str | None]:
        """The agent's output log and Slurm's own output file of the job (on the cluster; an array task's
        is in its array's folder, named in the task's marker)."""
        log = f"{t.cluster_dir}/output.log"
        base, _, task = slurm_id.partition("_")
        if task:
            adir = _read_json(t.job_dir / ARRAY_MARK).get("dir")
            return log, f"{adir}/slurm-{base}_{task}.out" if isinstance(adir, str) else None
        return log, f"{t.cluster_dir}/slurm-{base}.out"

    def _read(self, path: str) -> bytes | None:
        try:
            return self.runner.get_bytes(path)
        except Exception:
            return None

    def logs(self, ref: mb.JobRef, *, follow: bool = False) -> Iterator[str]:
        """The job's output (node 0's, for a multi-node job); Slurm's own messages about the job (time limit,
        cancel, node failure) follow at the end."""
        backend_id = str(ref)
        t = self._target(ref)
        if t is None:
            raise meshrun.BackendError(f"no job folder is known for Slurm job {backend_id}", backend=BACKEND)
        log, slurm_out = self._log_files(t, backend_id)
        asked_at, finished = 0.0, False

        def done() -> bool:
            nonlocal asked_at, finished
            if (t.job_dir / "exit.json").exists() and self.shared_filesystem:
                return True
            if time.monotonic() - asked_at < 1.0:
                return finished
            asked_at = time.monotonic()
            finished = self.status([ref])[backend_id].terminal
            return finished

        def gen() -> Iterator[str]:
            if self.shared_filesystem:
                yield from mb.tail_file(Path(log), follow=follow, done=done)
            else:
                pos = 0
                while True:
                    finished = done() if follow else True
                    data = self._read(log) or b""
                    if len(data) > pos:
                        yield data[pos:].decode("utf-8", "replace")
                        pos = len(data)
                    if finished:
                        break
                    time.sleep(0.5)
            if slurm_out:
                extra = self._read(slurm_out)
                if extra and extra.strip():
                    yield "\n[slurm] " + extra.decode("utf-8", "replace").strip().replace("\n", "\n[slurm] ") + "\n"

        return gen()

    def fetch_results(self, ref: mb.JobRef, job_dir: Path) -> None:
        if self.shared_filesystem:
            return
        t = self._target(ref)
        if t is None:
            return
        files = {name: self._read(f"{t.cluster_dir}/{name}") for name in (*mb.RESULT_FILES, "output.log")}
        mb.write_records(Path(job_dir), {k: v for k, v in files.items() if v is not None}, also=["output.log"])

    def find(self, job_id: str, job_dir: Path) -> str | None:
        """The Slurm id of a meshrun job: from its folder's marker, else by its job name in squeue/sacct."""
        known = _read_json(job_dir / ID_MARK).get("slurm_job_id")
        if isinstance(known, str):
            return known
        name, index = f"meshrun-{job_id}", None
        mark = _read_json(job_dir / ARRAY_MARK)
        if "array" in mark:
            name, index = f"meshrun-array-{mark['array']}", int(mark.get("index") or 0)
        found = None
        who = ["--me"] if self._me_ok else [f"--user={self._remote_user()}"]
        p = self._run(["squeue", *who, "--noheader", f"--name={name}", "--format=%A"], check=False)
        ids = [x.strip() for x in p.stdout.split() if x.strip().isdigit()]
        if not ids and self.settings.sacct:
            p = self._run(["sacct", "--noheader", "--parsable2", "--allocations", f"--name={name}",
                           "--starttime=now-30days", "--format=JobIDRaw,JobID"], check=False)
            for line in p.stdout.splitlines():
                raw = line.split("|", 1)[0].strip()
                jid = line.split("|")[-1].strip()
                if raw.isdigit():
                    ids.append(jid.split("_", 1)[0] if index is not None else raw)
        if ids:
            base = ids[-1]
            found = f"{base}_{index}" if index is not None else base
            self._mark(job_dir, found, time.time())  # what status reads its age from
            with self._lock:
                self._targets.pop(found, None)
        return found

    def close(self) -> None:
        with self._lock:
            r, self._runner = self._runner, None
            rest, self._rest = self._rest, None
        if r is not None:
            r.close()
        if rest is not None:
            rest.close()

    # ------------------------------------------------------------------------------------------------
    # REST mode (slurmrestd)

    def rest_submit(self, sub: mb.Submission, offer: mb.Offer | None, opts: JobOptions) -> str:
        self._prepare_launch(sub)
        cluster_dir = self._cluster_dir(sub.job_dir)
        job = self._batch_job(sub.spec, opts, offer, job_name=sub.name, workdir=cluster_dir, job_dir=cluster_dir)
        try:
            script = render_script(job)
        except ValueError as e:
            raise _render_error(e) from None
        self._write_local(sub.job_dir / SCRIPT, script.encode(), 0o700)
        slurm_id = self.rest.submit(job, script, comment=_comment(sub.spec.display_name, opts))
        with self._lock:
            self._squeue_at = -1e9
        self._mark(sub.job_dir, slurm_id, time.time())
        return slurm_id


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file of the job folder; {} when missing or not an object."""
    try:
        v = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return v if isinstance(v, dict) else {}


def _from_records(recs: list[Any]) -> mb.JobStatus | None:
    """The job's outcome from its agents' exit records alone, or None when Slurm must be asked."""
    if not recs:
        return None
    failed = [r for r in recs if _agent_trusts(r) and r.get("state") in ("failed", "timeout")]
    if failed:
        st = mb.map_agent_status(failed[0])
        if len(recs) > 1 and failed[0] is not recs[0]:
            st = replace(st, reason=f"node {recs.index(failed[0])}: {st.reason}")
        return st
    if all(_agent_trusts(r) for r in recs):
        return mb.map_agent_status(recs[0])
    return None


def _render_error(e: ValueError) -> meshrun.MeshrunError:
    """The options were validated already: what is left is a path Slurm cannot take (MESHRUN_HOME, remote_dir
    or python holding a newline, a backslash in the job folder)."""
    return meshrun.BackendError(f"cannot write the batch script: {e} (check MESHRUN_HOME, remote_dir and python)",
                                backend=BACKEND)


def _compiled_agent(src: str, folder: Path) -> str | None:
    """``src`` compiled for this interpreter into ``folder`` (named by content and cache tag), or None (run the
    source then). A compiled copy already there is used only when it is a regular file of this user's that
    no one else may write to, in a folder of this user's that no one else may write to."""
    try:
        import importlib.util
        import py_compile

        data = Path(src).read_bytes()
        tag = sys.implementation.cache_tag or "py"
        h = hashlib.sha256(data + importlib.util.MAGIC_NUMBER).hexdigest()[:16]
        out = folder / f"_agent-{h}.{tag}.pyc"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not _private(folder, is_dir=True):
            return None
        if not _private(out, is_dir=False):
            if os.path.lexists(out):
                os.unlink(out)
            # written to a fresh temporary name (O_EXCL) and renamed into place
            py_compile.compile(src, cfile=str(out), doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
            if not _private(out, is_dir=False):
                return None
        return str(out)
    except Exception:
        return None


def _private(path: Path, *, is_dir: bool) -> bool:
    """``path`` is a directory (or regular file), not a symbolic link, this user's, writable by no one else."""
    import stat

    try:
        st = os.lstat(path)
    except OSError:
        return False
    kind = stat.S_ISDIR(st.st_mode) if is_dir else stat.S_ISREG(st.st_mode)
    return kind and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _comment(name: str, opts: JobOptions) -> str | None:
    """The job's display name for squeue's comment column (one line; the name itself reaches the job
    unchanged through launch.json); none when the user's sbatch options carry their own --comment, which
    is kept (meshrun finds its jobs by their job name, not the comment)."""
    if user_comment(opts):
        return None
    flat = " ".join(str(name).split())
    return flat[:200] or None


def _shape(spec: Any) -> str:
    """Jobs of one shape can share an array: same resources, time limit and Slurm options."""
    return json.dumps(
        {"r": spec.resources.model_dump(mode="json"), "t": spec.time_limit,
         "o": spec.options_for(BACKEND)}, sort_keys=True, default=str,
    )

