"""Typed settings of the SSH backend (``[backends.ssh]``) and the resolution of a host entry through
``~/.ssh/config`` into the parameters a connection needs."""

from __future__ import annotations

import getpass
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import meshrun
import meshrun.backend as mb
from pydantic import Field, StrictBool, StrictStr, field_validator, model_validator

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

DEFAULT_EXCLUDE = (
    ".git", ".hg", ".svn", "__pycache__", "*.pyc", "*.pyo", ".venv", "venv", ".tox", ".nox",
    "node_modules", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints", "*.egg-info",
    ".DS_Store", ".meshrun-sync.json",
)


def _split_list(v: Any) -> Any:
    """Env overrides arrive as text: JSON, or items separated by commas/whitespace."""
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            try:
                return json.loads(s)
            except ValueError as e:
                raise ValueError(f"not a valid JSON list: {e}") from None
        return [p for p in re.split(r"[,\s]+", s) if p]
    return v


class HostSettings(mb.BackendSettings):
    """One host of the pool. Missing fields come from ~/.ssh/config (HostName, Port, User, IdentityFile,
    ProxyJump), then from defaults (port 22, the local user name)."""

    renamed = {"remote_root": "remote_dir"}

    name: Optional[str] = None
    host: Optional[str] = None
    port: Optional[int] = Field(None, ge=1, le=65535)  # a TCP port
    user: Optional[str] = None
    key: Optional[str] = None
    python: str = "python3"
    lease_dir: Optional[str] = None
    env: dict[str, str] = {}
    remote_dir: Optional[str] = None
    proxy_jump: Optional[str] = None

    @model_validator(mode="after")
    def _v_name(self) -> "HostSettings":
        if not self.name and not self.host:
            raise ValueError("a host needs a name or a host")
        name = self.name or self.host
        if not _NAME.match(name or ""):
            raise ValueError(f"host name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
                             "(it is part of job ids)")
        return self

    @field_validator("python")
    @classmethod
    def _v_python(cls, v: str) -> str:
        if not v.strip() or "\x00" in v:
            raise ValueError("must name the remote Python interpreter, e.g. python3 or /opt/conda/bin/python")
        return v

    @field_validator("lease_dir")
    @classmethod
    def _v_lease_dir(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"must be an absolute path on the host, got {v!r}")
        return v

    @field_validator("remote_dir")
    @classmethod
    def _v_root(cls, v: Optional[str]) -> Optional[str]:
        return _check_root(v) if v is not None else None

    @field_validator("env")
    @classmethod
    def _v_env(cls, v: dict[str, str]) -> dict[str, str]:
        for k, val in v.items():
            if not _ENV_KEY.match(k):
                raise ValueError(f"environment variable names must be identifiers, got {k!r}")
            if "\x00" in val:
                raise ValueError(f"the value of {k} contains a NUL character")
        return v

    @property
    def label(self) -> str:
        return self.name or self.host or "?"


def _check_root(v: str) -> str:
    if not (v.startswith("/") or v == "~" or v.startswith("~/")) or "\x00" in v:
        raise ValueError(f"must be an absolute path or start with ~/ (the remote user's home), got {v!r}")
    return v.rstrip("/") or "/"


class SSHSettings(mb.BackendSettings):
    renamed = {"remote_root": "remote_dir", "exclude": "sync_exclude"}

    hosts: list[Union[str, HostSettings]] = []
    known_hosts: Optional[Union[str, list[str]]] = None
    ssh_config: Optional[str] = None
    remote_dir: str = "~/.meshrun"
    sync_exclude: list[str] = []
    max_sync_bytes: int = 100 * 1024**2
    max_sync_files: int = Field(20000, ge=1)
    sync: bool = True
    connect_timeout: float = Field(10.0, gt=0)
    retries: int = Field(8, ge=1)
    retry_max_wait: float = Field(4.0, gt=0)
    grace_period: float = Field(10.0, gt=0)
    persistent: bool = True

    @field_validator("hosts", mode="before")
    @classmethod
    def _v_hosts(cls, v: Any) -> Any:
        return _split_list(v)

    @field_validator("sync_exclude", mode="before")
    @classmethod
    def _v_exclude(cls, v: Any) -> Any:
        return _split_list(v)

    @field_validator("known_hosts", mode="before")
    @classmethod
    def _v_known_hosts(cls, v: Any) -> Any:
        if isinstance(v, str) and ("," in v or v.strip().startswith("[")):
            return _split_list(v)
        return v

    @field_validator("max_sync_bytes", mode="before")
    @classmethod
    def _v_size(cls, v: Any) -> int:
        n = meshrun.parse_size(v)
        if n <= 0:
            raise ValueError("must be more than 0")
        return n

    @field_validator("remote_dir")
    @classmethod
    def _v_root(cls, v: str) -> str:
        return _check_root(v)

    @model_validator(mode="after")
    def _v_unique(self) -> "SSHSettings":
        seen: set[str] = set()
        for h in self.hosts:
            name = h if isinstance(h, str) else h.label
            if isinstance(h, str) and not _NAME.match(h):
                raise ValueError(f"host {h!r}: names must be 1-64 letters, digits, '.', '_' or '-'")
            if name in seen:
                raise ValueError(f"host {name!r} is listed twice")
            seen.add(name)
        return self


class SSHOptions(mb.BackendOptions):
    """``backend_options["ssh"]`` of one job."""

    renamed = {"exclude": "sync_exclude"}

    host: Optional[str] = None  # run on this host of the pool
    sync: Optional[StrictBool] = None  # mirror the working directory (default: the sync setting)
    sync_exclude: list[StrictStr] = []  # more patterns left out of this job's sync
    workdir: Optional[str] = Field(None, min_length=1)  # run here on the host (no sync unless sync=True)


def load_settings(table: Mapping[str, Any] | None) -> SSHSettings:
    return SSHSettings.load("ssh", table)


# --------------------------------------------------------------------------------------------------
# resolution


@dataclass(frozen=True)
class HostParams:
    """Everything needed to reach and use one host, resolved (no secrets in here: key *paths* only)."""

    name: str
    hostname: str
    port: int
    user: str
    keys: tuple[str, ...] = ()
    proxy_jump: Optional[str] = None
    proxy_command: Optional[str] = None
    host_key_alias: Optional[str] = None
    known_hosts: tuple[str, ...] = ()
    ssh_config: Optional[str] = None
    python: str = "python3"
    lease_dir: Optional[str] = None
    env: tuple[tuple[str, str], ...] = ()
    remote_dir: str = "~/.meshrun"
    connect_timeout: float = 10.0
    field_prefix: str = "backends.ssh.hosts"
    extra: tuple[tuple[str, Any], ...] = field(default=())

    @property
    def key_tuple(self) -> tuple[Any, ...]:
        """Identity of the transport: one per host, port and user (and the trust and credentials used)."""
        return (self.hostname, self.port, self.user, self.keys, self.known_hosts, self.proxy_jump,
                self.proxy_command, self.host_key_alias)

    def remote_env(self) -> dict[str, str]:
        env = dict(self.env)
        if self.lease_dir:
            env["MESHRUN_LEASE_DIR"] = self.lease_dir
        return env


def _expand(p: str) -> str:
    return os.path.abspath(os.path.expanduser(p))


def ssh_config_path(settings: SSHSettings) -> Optional[str]:
    if settings.ssh_config:
        return _expand(settings.ssh_config)
    default = os.path.expanduser("~/.ssh/config")
    return default if os.path.exists(default) else None


_config_cache: dict[tuple[str, float], Any] = {}


def read_ssh_config(path: Optional[str]) -> Any:
    """A parsed ssh_config (paramiko.SSHConfig), cached by path and mtime; None if there is none."""
    if not path:
        return None
    import paramiko

    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        raise meshrun.ConfigError("backends.ssh.ssh_config", f"cannot read the ssh config file {path}") from None
    key = (path, mtime)
    if key not in _config_cache:
        try:
            _config_cache[key] = paramiko.SSHConfig.from_path(path)
        except Exception as e:
            raise meshrun.ConfigError("backends.ssh.ssh_config", f"cannot parse {path}: {type(e).__name__}: {e}") \
                from None
    return _config_cache[key]


def known_hosts_files(settings: SSHSettings, from_config: Optional[str]) -> tuple[str, ...]:
    files: list[str] = []
    if settings.known_hosts:
        given = [settings.known_hosts] if isinstance(settings.known_hosts, str) else list(settings.known_hosts)
        files.extend(_expand(p) for p in given)
    else:
        files.extend([os.path.expanduser("~/.ssh/known_hosts"), "/etc/ssh/ssh_known_hosts"])
    if from_config:
        for p in from_config.split():
            p = _expand(p)
            if p not in files:
                files.append(p)
    return tuple(files)


def resolve(entry: Union[str, HostSettings, Mapping[str, Any]], settings: SSHSettings, index: Optional[int] = None,
            ) -> HostParams:
    """A host entry (alias or table) resolved through the ssh config into connection parameters."""
    if isinstance(entry, Mapping):
        try:
            entry = HostSettings(**dict(entry))
        except Exception as e:  # pydantic ValidationError
            errs = getattr(e, "errors", None)
            if callable(errs):
                err = errs(include_url=False)[0]
                loc = ".".join(str(p) for p in err.get("loc", ()))
                msg = err.get("msg", "invalid")
                if err.get("type") == "extra_forbidden":
                    msg = f"unknown host setting; the valid ones are: {', '.join(sorted(HostSettings.model_fields))}"
                raise meshrun.ConfigError(f"host.{loc}" if loc else "host", msg) from None
            raise
    prefix = "backends.ssh.hosts" + (f"[{index}]" if index is not None else "")
    if isinstance(entry, str):
        entry = HostSettings(name=entry)
    alias = entry.host or entry.name or ""
    cfg_path = ssh_config_path(settings)
    cfg = read_ssh_config(cfg_path)
    found: dict[str, Any] = dict(cfg.lookup(alias)) if cfg is not None else {}
    hostname = found.get("hostname") or alias
    port = entry.port
    if port is None:
        try:
            port = int(found.get("port", 22))
        except ValueError:
            raise meshrun.ConfigError(f"{prefix}.port", f"ssh config gives Port {found.get('port')!r} for {alias}") \
                from None
    user = entry.user or found.get("user") or getpass.getuser()
    if entry.key:
        keys: tuple[str, ...] = (_expand(entry.key),)
    else:
        keys = tuple(_expand(k) for k in found.get("identityfile", []) if os.path.exists(_expand(k)))
    proxy_jump = entry.proxy_jump or found.get("proxyjump")
    if proxy_jump and proxy_jump.lower() == "none":
        proxy_jump = None
    proxy_command = found.get("proxycommand")
    if proxy_command and proxy_command.lower() == "none":
        proxy_command = None
    return HostParams(
        name=entry.label,
        hostname=hostname,
        port=port,
        user=user,
        keys=keys,
        proxy_jump=proxy_jump,
        proxy_command=proxy_command,
        host_key_alias=found.get("hostkeyalias"),
        known_hosts=known_hosts_files(settings, found.get("userknownhostsfile")),
        ssh_config=cfg_path,
        python=entry.python,
        lease_dir=entry.lease_dir,
        env=tuple(sorted(entry.env.items())),
        remote_dir=entry.remote_dir or settings.remote_dir,
        connect_timeout=settings.connect_timeout,
        field_prefix=prefix,
    )
