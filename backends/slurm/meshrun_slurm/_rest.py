"""slurmrestd (``api = "rest"``): submit, status and cancel over Slurm's REST API with httpx.

Authentication: a JWT in ``X-SLURM-USER-TOKEN`` with ``X-SLURM-USER-NAME`` (``token``, else one made
with ``scontrol token``, renewed before it expires), or none at all on a ``unix:`` socket served with
rest_auth/local. The token never reaches logs, errors or ``repr``.

Tested against slurmrestd 22.05 with openapi/v0.0.38 (``rest_api_version``). Its quirks, handled here:
``environment`` must be an object and must be given; GPUs go in ``gres``; ``exit_code`` of a job is the raw
wait status (512 = exit 2); sbatch options in the script's ``#SBATCH`` lines are not read, so the job's
options are sent as fields.
"""

from __future__ import annotations

import getpass
import os
import re
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import meshrun
import meshrun.backend as mb

from . import _states as S
from ._options import BACKEND
from ._script import BatchJob, directives

# sbatch options (from backend_options["slurm"]["sbatch"]) the REST API has fields for
_BOOL_FIELDS = {"--hold": ("hold", True), "--requeue": ("requeue", True), "--no-requeue": ("requeue", False),
                "--kill-on-invalid-dep=yes": ("kill_on_invalid_dependency", True)}
_STR_FIELDS = {"--mail-type": "mail_type", "--mail-user": "mail_user", "--comment": "comment",
               "--dependency": "dependency", "--licenses": "licenses", "--wckey": "wckey", "--signal": "signal",
               "--gres-flags": "gres_flags", "--prefer": "prefer", "--deadline": "deadline",
               "--exclusive": "exclusive", "--distribution": "distribution"}
_INT_FIELDS = {"--nice": "nice"}
_SECRET_ENV = re.compile(r"(TOKEN|SECRET|PASSWORD|JWT)", re.I)


class RestError(meshrun.BackendError):
    pass


class RestClient:
    def __init__(self, settings: Any, run: Callable[..., Any]):
        self.settings = settings
        self._run = run
        url = settings.endpoint
        if not url:
            raise meshrun.ConfigError("backends.slurm.endpoint",
                                      'api = "rest" needs endpoint: "http://host:6820" or "unix:/path/to/socket"')
        if settings.login_host:
            raise meshrun.ConfigError("backends.slurm.api",
                                      'api = "rest" talks to slurmrestd directly; leave login_host unset with it')
        self.version = settings.rest_api_version
        self.unix = url.startswith("unix:")
        self.base = "http://localhost" if self.unix else url
        self.user = settings.rest_user or getpass.getuser()
        self._token: str | None = settings.token.get_secret_value() if settings.token else None
        self._token_fixed = self._token is not None
        self._token_until = float("inf") if self._token_fixed else 0.0
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<RestClient {self.settings.endpoint} user={self.user}>"

    # ---- plumbing
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    import httpx
                except ImportError as e:
                    raise meshrun.BackendUnavailable(
                        'api = "rest" needs httpx: ' + mb.install_hint("slurm", ["rest"]), backend=BACKEND) from e
                transport = httpx.HTTPTransport(uds=self.settings.endpoint[len("unix:"):]) if self.unix else None
                self._client = httpx.Client(base_url=self.base, transport=transport,
                                            timeout=self.settings.request_timeout)
            return self._client

    def _headers(self) -> dict[str, str]:
        if self.unix:
            return {}
        with self._lock:
            if self._token is None or time.time() > self._token_until - 60:
                self._token, self._token_until = self._new_token()
            return {"X-SLURM-USER-NAME": self.user, "X-SLURM-USER-TOKEN": self._token}

    def _new_token(self) -> tuple[str, float]:
        life = 3600
        p = self._run(["scontrol", "token", f"username={self.user}", f"lifespan={life}"], check=False)
        m = re.search(r"SLURM_JWT=(\S+)", p.stdout or "")
        if p.returncode != 0 or not m:
            raise meshrun.BackendUnavailable(
                f"cannot get a Slurm JWT for {self.user} with scontrol token (set token, or enable auth/jwt "
                f"in slurm.conf): {(p.stderr or '').strip()[:200]}", backend=BACKEND)
        return m.group(1), time.time() + life

    def request(self, method: str, path: str, *, accept: Callable[[Any], bool] | None = None, **kw: Any) -> Any:
        url = path.format(v=self.version)
        for attempt in (1, 2):
            try:
                r = self.client().request(method, url, headers=self._headers(), **kw)
            except Exception as e:  # httpx errors: connection refused, timeouts
                raise RestError(f"slurmrestd at {self.settings.endpoint} did not answer: {type(e).__name__}: {e}",
                                backend=BACKEND) from e
            if r.status_code == 401 and attempt == 1 and not self._token_fixed and not self.unix:
                with self._lock:
                    self._token = None  # expired or revoked: one more try with a fresh token
                continue
            break
        try:
            data = r.json()
        except ValueError:
            data = {}
        errs = [e for e in (data.get("errors") or []) if isinstance(e, Mapping) and e.get("error_number", 1) != 0]
        if (r.status_code >= 400 or errs) and not (r.status_code < 400 and accept is not None and accept(data)):
            msg = "; ".join(str(e.get("error") or e.get("description") or e) for e in errs) or r.text[:300]
            if not self.unix and (r.status_code in (401, 403) or (r.status_code == 500 and "Unspecified" in msg)):
                msg += (f" (slurmrestd rejects the token of user {self.user!r} this way: check rest_user and "
                        f"token, or that auth/jwt is enabled)")
            raise RestError(f"slurmrestd {method} {url}: HTTP {r.status_code}: {msg}", backend=BACKEND)
        return data

    def close(self) -> None:
        with self._lock:
            c, self._client = self._client, None
        if c is not None:
            c.close()

    # ---- API
    def ping(self) -> dict[str, Any]:
        data = self.request("GET", "/slurm/{v}/ping")
        pings = data.get("pings") or []
        return {"endpoint": self.settings.endpoint, "controllers": [p.get("hostname") for p in pings]}

    def job_fields(self, job: BatchJob, comment: str | None) -> dict[str, Any]:
        """The REST job description of what ``directives(job)`` says on sbatch's command line."""
        env = {k: v for k, v in os.environ.items() if not _SECRET_ENV.search(k)}
        f: dict[str, Any] = {"environment": env, "requeue": True}
        for d in directives(job):
            name, eq, value = d.partition("=")
            if name == "--job-name":
                f["name"] = value
            elif name == "--output":
                f["standard_output"] = value
            elif name == "--chdir":
                f["current_working_directory"] = value
            elif name == "--open-mode":
                f["open_mode"] = value
            elif name == "--array":
                f["array"] = value
            elif name == "--nodes":
                f["nodes"] = [int(value), int(value)]
            elif name == "--ntasks-per-node":
                f["tasks_per_node"] = int(value)
                f["tasks"] = int(value) * job.nodes
            elif name == "--cpus-per-task":
                f["cpus_per_task"] = int(value)
            elif name == "--mem":
                f["memory_per_node"] = int(value.rstrip("M"))
            elif name == "--tmp":
                f["minimum_tmp_disk_per_node"] = int(value.rstrip("M"))
            elif name == "--gres":
                f["gres"] = value
            elif name == "--gpus-per-node":
                f["gpus_per_node"] = value
            elif name == "--time":
                f["time_limit"] = _minutes(value)
            elif name in ("--partition", "--account", "--qos", "--reservation"):
                f[name[2:]] = value
            elif name == "--constraint":
                f["constraints"] = value
            elif name in ("--nodelist", "--exclude"):
                raise meshrun.SpecError(f"backend_options.slurm.{name[2:]}",
                                        'is not supported with api = "rest" (slurmrestd has no field for it)')
            elif d in _BOOL_FIELDS:
                k, v = _BOOL_FIELDS[d]
                f[k] = v
            elif name in _STR_FIELDS:
                f[_STR_FIELDS[name]] = value if eq else "exclusive"
            elif name in _INT_FIELDS:
                f[_INT_FIELDS[name]] = int(value)
            else:
                raise meshrun.SpecError(
                    "backend_options.slurm.sbatch",
                    f'{d!r} has no slurmrestd field; with api = "rest" the sbatch options that work are: '
                    f"{', '.join(sorted(list(_BOOL_FIELDS) + list(_STR_FIELDS) + list(_INT_FIELDS)))}")
        if comment and "comment" not in f:
            f["comment"] = comment
        return f

    def submit(self, job: BatchJob, script: str, comment: str | None = None) -> str:
        body = {"job": self.job_fields(job, comment), "script": script}
        # a held job comes back with an "error" (held, pending release) next to its id: it was accepted
        data = self.request("POST", "/slurm/{v}/job/submit", json=body,
                            accept=lambda d: isinstance(d, Mapping) and d.get("job_id") is not None)
        jid = data.get("job_id")
        if jid is None:
            raise RestError(f"slurmrestd accepted the job but gave no job id: {data}", backend=BACKEND)
        return str(jid)

    def jobs(self) -> tuple[dict[str, S.Row], str | None]:
        """Every job of this user slurmctld knows (one GET), as squeue rows."""
        try:
            data = self.request("GET", "/slurm/{v}/jobs")
        except meshrun.MeshrunError as e:
            return {}, str(e).splitlines()[0]
        rows = {}
        for j in data.get("jobs") or []:
            if j.get("user_name") not in (None, self.user):
                continue
            jid = _rest_id(j)
            state, _ = S.base_state(str(j.get("job_state") or ""))
            code = j.get("exit_code")
            rows[jid] = S.Row(
                id=jid, state=state, reason=_none(j.get("state_reason")),
                exit_code=(code >> 8) & 0xFF if isinstance(code, int) and code >= 0 else None,
                signal=(code & 0x7F) or None if isinstance(code, int) and code >= 0 else None,
                start=_ts(j.get("start_time")), end=_ts(j.get("end_time")), nodes=_none(j.get("nodes")),
                name=j.get("name"), source="slurmrestd",
            )
        return rows, None

    def db_jobs(self, ids: Sequence[str]) -> dict[str, S.Row]:
        """Accounting records (slurmdbd) of finished jobs, one GET per job id asked about."""
        rows = {}
        for base in ids[:50]:
            try:
                data = self.request("GET", f"/slurmdb/{{v}}/job/{base}")
            except meshrun.MeshrunError:
                continue
            for j in data.get("jobs") or []:
                arr = j.get("array") or {}
                task = arr.get("task_id")
                jid = f"{arr.get('job_id')}_{task}" if task not in (None, 4294967294) and arr.get("job_id") else \
                    str(j.get("job_id"))
                st = (j.get("state") or {}).get("current") or ""
                state, _ = S.base_state(str(st))
                t = j.get("time") or {}
                ex = j.get("exit_code") or {}
                rows[jid] = S.Row(id=jid, state=state, reason=_none((j.get("state") or {}).get("reason")),
                                  exit_code=ex.get("return_code"), start=_ts(t.get("start")), end=_ts(t.get("end")),
                                  nodes=_none(j.get("nodes")), name=j.get("name"), source="slurmdbd (rest)")
        return rows

    def node_groups(self) -> list[S.NodeGroup]:
        """Partitions and node sizes, as sinfo would give them (for sites without Slurm's tools here)."""
        parts = self.request("GET", "/slurm/{v}/partitions").get("partitions") or []
        nodes = {n.get("name"): n for n in self.request("GET", "/slurm/{v}/nodes").get("nodes") or []}
        out = []
        for p in parts:
            name = p.get("name")
            limit = p.get("maximum_time")
            flags = p.get("flags") or []
            for nn in _node_names(p, nodes):
                n = nodes.get(nn) or {}
                out.append(S.NodeGroup(
                    partition=name, default="default" in [str(f).lower() for f in flags],
                    available="up" if str(p.get("state") or "UP").upper() == "UP" else str(p.get("state")).lower(),
                    time_limit=None if not isinstance(limit, int) or limit <= 0 or limit >= 4294967294 else limit * 60.0,
                    count=1, cpus=int(n.get("cpus") or 0), memory=int(n.get("real_memory") or 0),
                    gres=str(n.get("gres") or ""), state=str(n.get("state") or ""), nodes=nn,
                ))
        return out

    def cancel(self, backend_id: str) -> None:
        try:
            self.request("DELETE", f"/slurm/{{v}}/job/{backend_id}")
        except RestError as e:
            if re.search(r"already completing or completed|Invalid job id|already complete", str(e), re.I):
                return
            raise


def _node_names(partition: Mapping[str, Any], nodes: Mapping[str, Any]) -> list[str]:
    """The nodes of a partition: those whose own partition list names it."""
    name = partition.get("name")
    return [n for n, info in nodes.items() if name in (info.get("partitions") or [])]


def _rest_id(j: Mapping[str, Any]) -> str:
    arr = j.get("array_job_id")
    task = j.get("array_task_id")
    if arr and task is not None and task != 4294967294 and str(task).isdigit():
        return f"{arr}_{task}"
    return str(j.get("job_id"))


def _none(v: Any) -> str | None:
    v = "" if v is None else str(v)
    return None if v in ("", "None", "(null)") else v


def _ts(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and v > 0 else None


def _minutes(t: str) -> int:
    """Slurm's D-HH:MM:SS as whole minutes."""
    days = 0
    if "-" in t:
        d, t = t.split("-", 1)
        days = int(d)
    parts = [int(p) for p in t.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return days * 1440 + h * 60 + m + (1 if s else 0)
