"""Settings of the dstack backend and where its server URL, project and token come from.

Order, first found wins, key by key:

1. the meshrun config (``[backends.dstack]``) or ``MESHRUN_DSTACK_ENDPOINT`` / ``_PROJECT`` / ``_TOKEN``;
2. dstack's own client config, ``~/.dstack/config.yml`` (``dstack_config`` names another file): the
   project named by ``project``, else the one marked default there. A token is taken from that file
   only for the server URL the file gives for that project, so a token never travels to another server.
3. ``project`` defaults to ``main`` (the project a fresh dstack server creates).

The token is a pydantic ``SecretStr``: its repr is ``'**********'``; the plain value is read in one
place only, when the HTTP client builds its Authorization header.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from pydantic import Field, SecretStr, field_validator

import meshrun
import meshrun.backend as mb

DEFAULT_PROJECT = "main"
DEFAULT_DSTACK_CONFIG = "~/.dstack/config.yml"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# a dstack secret a task's env can reference: what dstack's ${{ secrets.NAME }} interpolation accepts (the server
# also allows '-' in a secret's name, but such a secret cannot be referenced)
SECRET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")


class DstackSettings(mb.BackendSettings):
    renamed = {"url": "endpoint", "timeout": "request_timeout"}

    endpoint: Optional[str] = Field(None, description="the dstack server, e.g. http://127.0.0.1:3000")
    project: Optional[str] = Field(None, description="the dstack project (default: dstack's default, else main)")
    token: Optional[SecretStr] = Field(None, description="the user's dstack token")
    dstack_config: str = Field(DEFAULT_DSTACK_CONFIG, description="dstack's client config file")
    request_timeout: float = Field(30.0, gt=0, description="seconds for one HTTP request")
    max_offers: int = Field(50, ge=1, le=10000, description="offers asked of the server per plan")
    provision_estimate: float = Field(
        300.0, ge=0, description="seconds a new cloud instance is expected to take (an offer's expected_start)"
    )
    remote_dir: str = Field("/tmp/meshrun", description="where a function job's folder goes inside the task")
    install_cloudpickle: bool = Field(
        True, description="pip-install the submitter's cloudpickle in the task when it is missing"
    )
    validate_locally: bool = Field(
        True, description="validate tasks with dstack's own models before sending them (when dstack is installed)"
    )
    status_pages: int = Field(5, ge=1, le=100, description="pages of 100 runs one status call may list")
    api_version: Optional[str] = Field(
        None, description="the API level to announce (X-API-VERSION); default: negotiated with the server"
    )
    data_secrets: Dict[str, str] = Field(
        default_factory=dict,
        description="for jobs with inputs/outputs: environment variable -> the dstack project secret that gives its "
                    "value (the S3 endpoint and credentials), e.g. {AWS_ACCESS_KEY_ID = \"s3_key\"}",
    )
    install_boto3: bool = Field(
        True, description="pip-install boto3 in the task of a job with inputs/outputs when its Python lacks it"
    )

    @field_validator("data_secrets", mode="before")
    @classmethod
    def _v_data_secrets(cls, v: Any) -> Any:
        if isinstance(v, str):  # MESHRUN_DSTACK_DATA_SECRETS: a JSON table
            try:
                v = json.loads(v) if v.strip() else {}
            except ValueError:
                raise ValueError("expected a JSON table of variable -> secret name") from None
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise ValueError("expected a table of environment variable -> dstack secret name")
        for var, name in v.items():
            if not isinstance(var, str) or not ENV_NAME.match(var):
                raise ValueError(f"{var!r} is not an environment variable name (letters, digits, '_', not starting "
                                 "with a digit)")
            if not isinstance(name, str) or not SECRET_NAME.match(name):
                raise ValueError(f"{var}: {name!r} is not a secret name a task can reference (1 to 200 of letters, "
                                 "digits and '_', not starting with a digit)")
        return dict(v)

    @field_validator("endpoint")
    @classmethod
    def _v_url(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return None
        v = v.strip().rstrip("/")
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL of the dstack server, got {v!r}")
        return v

    @field_validator("project")
    @classmethod
    def _v_project(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return None
        if not v or "/" in v or any(c.isspace() for c in v):
            raise ValueError(f"expected a dstack project name, got {v!r}")
        return v

    @field_validator("remote_dir")
    @classmethod
    def _v_remote_dir(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"expected an absolute path inside the task, got {v!r}")
        return v.rstrip("/") or "/"


def load_settings(table: Mapping[str, Any] | None) -> Any:
    table = dict(table or {})
    tok = table.get("token")
    if tok is not None and not isinstance(tok, str):
        # never let a validation message echo the value back
        raise meshrun.ConfigError("backends.dstack.token", "must be text (the dstack user token)")
    return DstackSettings.load("dstack", table)


@dataclass(frozen=True)
class Credentials:
    url: str
    project: str
    token: Any  # SecretStr
    source: str  # where the token came from, for messages (never the token itself)

    def __repr__(self) -> str:
        return f"Credentials(url={self.url!r}, project={self.project!r}, token='**********', source={self.source!r})"


def read_dstack_config(path: str) -> list[dict[str, Any]]:
    """The projects of dstack's client config file (``[]`` when the file is absent)."""
    p = Path(os.path.expanduser(path))
    if not p.exists():
        return []
    import yaml

    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        # the file holds tokens: name the file and the problem, never its content
        raise meshrun.ConfigError("backends.dstack.dstack_config",
                                  f"cannot read dstack's config file {p}: {type(e).__name__}") from None
    projects = data.get("projects") if isinstance(data, dict) else None
    if not isinstance(projects, list):
        return []
    return [pr for pr in projects if isinstance(pr, dict) and isinstance(pr.get("name"), str)]


def resolve(settings: Any) -> Credentials | None:
    """URL, project and token, or None when no server is configured anywhere."""
    from pydantic import SecretStr

    url = settings.endpoint
    project = settings.project
    token = settings.token
    source = "meshrun config" if token is not None else ""
    projects = read_dstack_config(settings.dstack_config)
    chosen = None
    if project is not None:
        chosen = next((p for p in projects if p["name"] == project), None)
    else:
        chosen = next((p for p in projects if p.get("default")), None) or (projects[0] if len(projects) == 1 else None)
        if chosen is not None:
            project = chosen["name"]
    if chosen is not None:
        file_url = str(chosen.get("url") or "").rstrip("/")
        if url is None and file_url:
            url = file_url
        if token is None and chosen.get("token") and file_url and file_url == url:
            token = SecretStr(str(chosen["token"]))
            source = f"{settings.dstack_config} (project {chosen['name']})"
    if url is None:
        return None
    return Credentials(url=url, project=project or DEFAULT_PROJECT, token=token, source=source or "none")
