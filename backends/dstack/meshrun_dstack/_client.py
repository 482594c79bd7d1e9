"""A small client for the dstack server's HTTP API (httpx), with API version negotiation.

Every request is ``POST /api/...`` with a JSON body and ``Authorization: Bearer <token>``. dstack tells a
client's API level by the ``X-API-VERSION`` header: the server keeps answering older clients in their
own dialect, and refuses a client newer (by major or minor) than itself. So the client first asks
``/api/server/get_info`` for the server's version and then sends the lower of the server's version and
the API level this backend was written against.

Errors become meshrun errors with dstack's own message; the token is never part of one (every message
goes through :meth:`DstackClient.scrub`), never logged, and never written anywhere.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

import meshrun

log = logging.getLogger("meshrun.dstack")

#: the dstack API level this backend speaks (its requests and the fields it reads)
API_VERSION = "0.22.5"
#: the oldest dstack server whose API carries everything used here (run plans with offers, file
#: archives, run status messages)
MIN_SERVER_VERSION = (0, 20, 0)


class DstackAuthError(meshrun.BackendUnavailable):
    """The server rejected the token (or the user cannot use the project)."""


class DstackIncompatible(meshrun.BackendUnavailable):
    """The server speaks an API this backend cannot use."""


class DstackProjectNotFound(meshrun.BackendUnavailable):
    """The project does not exist on the server (or the user is not one of its members)."""


class DstackAPIError(meshrun.BackendError):
    """The server answered a request with an error (``code`` is dstack's error code, when it gave one)."""

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None, **kw: Any):
        self.code = code
        self.status = status
        super().__init__(message, **kw)


class DstackNotFound(DstackAPIError):
    pass


def parse_version(text: str | None) -> tuple[int, int, int] | None:
    """``"0.22.5"`` -> (0, 22, 5); None for dev builds and anything unparseable."""
    if not text:
        return None
    m = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if not m:
        return None
    v = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    return None if v == (0, 0, 0) else v


def negotiate(server_version: str | None, ours: str = API_VERSION) -> str | None:
    """The X-API-VERSION to send to a server of ``server_version`` (None: send none, a dev server).

    Raises :class:`DstackIncompatible` for a server older than :data:`MIN_SERVER_VERSION`."""
    sv = parse_version(server_version)
    if sv is None:
        return None
    if sv < MIN_SERVER_VERSION:
        raise DstackIncompatible(
            f"the dstack server is version {server_version}, older than the oldest this backend supports "
            f"({'.'.join(map(str, MIN_SERVER_VERSION))}); upgrade the server (pip install -U 'dstack[server]')",
            backend="dstack",
        )
    ov = parse_version(ours)
    assert ov is not None
    return ours if sv >= ov else ".".join(map(str, sv))


class DstackClient:
    def __init__(self, url: str, project: str, token: Any, *, timeout: float = 30.0,
                 api_version: str | None = None, token_source: str = ""):
        self.url = url.rstrip("/")
        self.project = project
        self._token = token  # SecretStr or None
        self.timeout = timeout
        self.api_version = api_version  # None: negotiate; a version: always send that one
        self.token_source = token_source
        self.server_version: str | None = None
        self.sent_version: str | None = None
        self._http: Any = None
        self._lock = threading.Lock()
        self._negotiated = False

    def __repr__(self) -> str:
        return f"<DstackClient {self.url} project={self.project!r}>"

    # ---- secrets
    def _secret(self) -> str | None:
        if self._token is None:
            return None
        return self._token.get_secret_value() if hasattr(self._token, "get_secret_value") else str(self._token)

    def scrub(self, text: Any) -> str:
        """``text`` with the token (and any bearer header) replaced by ``***``."""
        s = str(text)
        secret = self._secret()
        if secret:
            s = s.replace(secret, "***")
        return re.sub(r"(?i)(bearer\s+)\S+", r"\1***", s)

    # ---- transport
    def _client(self) -> Any:
        with self._lock:
            if self._http is None:
                import httpx

                self._http = httpx.Client(base_url=self.url, timeout=self.timeout, follow_redirects=False)
            return self._http

    def close(self) -> None:
        with self._lock:
            if self._http is not None:
                self._http.close()
                self._http = None

    def _headers(self, auth: bool) -> dict[str, str]:
        h = {"Accept": "application/json"}
        if self.sent_version:
            h["X-API-VERSION"] = self.sent_version
        if auth:
            secret = self._secret()
            if not secret:
                raise DstackAuthError(
                    f"no dstack token for {self.url}: set token in [backends.dstack], MESHRUN_DSTACK_TOKEN, "
                    "or log in with dstack so that ~/.dstack/config.yml has the project",
                    backend="dstack",
                )
            h["Authorization"] = f"Bearer {secret}"
        return h

    def request(self, path: str, body: Any = None, *, auth: bool = True, files: Any = None,
                retries: int = 2) -> Any:
        """POST ``path`` and return the decoded JSON (None for an empty body)."""
        import httpx

        if auth and not self._negotiated:
            self.negotiate()
        kwargs: dict[str, Any] = {"headers": self._headers(auth)}
        if files is not None:
            kwargs["files"] = files
        elif body is not None:
            kwargs["json"] = body
        what = f"POST {path}"
        for attempt in range(retries + 1):
            try:
                resp = self._client().post(path, **kwargs)
                break
            except httpx.ConnectError as e:
                # the request never reached the server: safe to try again
                if attempt < retries:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                raise meshrun.BackendUnavailable(
                    f"cannot reach the dstack server at {self.url}: {self.scrub(e)}", backend="dstack"
                ) from None
            except httpx.TimeoutException as e:
                raise meshrun.BackendUnavailable(
                    f"the dstack server at {self.url} did not answer {what} within {self.timeout:g}s "
                    f"({type(e).__name__})", backend="dstack"
                ) from None
            except httpx.HTTPError as e:
                raise meshrun.BackendUnavailable(
                    f"{what} to the dstack server at {self.url} failed: {type(e).__name__}: {self.scrub(e)}",
                    backend="dstack",
                ) from None
        log.debug("%s -> %s", what, resp.status_code)
        if resp.status_code >= 400:
            raise self._error(resp, what)
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise DstackAPIError(
                f"{what}: the server at {self.url} did not answer JSON (is it a dstack server?)",
                status=resp.status_code, backend="dstack",
            ) from None

    def _error(self, resp: Any, what: str) -> Exception:
        status = resp.status_code
        try:
            data = resp.json()
        except ValueError:
            data = None
        detail = data.get("detail") if isinstance(data, dict) else None
        msgs: list[str] = []
        code = None
        if isinstance(detail, dict):
            detail = [detail]
        if isinstance(detail, list):
            for d in detail:
                if not isinstance(d, dict):
                    msgs.append(str(d))
                    continue
                code = code or d.get("code")
                loc = d.get("loc") or d.get("fields")
                msg = str(d.get("msg") or d)
                if loc and isinstance(loc, (list, tuple)):
                    path = ".".join(str(p) for p in loc if p not in ("body",))
                    msg = f"{path}: {msg}"
                msgs.append(msg)
        text = self.scrub("; ".join(msgs) or (resp.text[:500] if resp.text else f"HTTP {status}"))
        if status in (401, 403):
            hint = f" (token from {self.token_source})" if self.token_source else ""
            return DstackAuthError(
                f"authentication failed: the dstack server at {self.url} refused the token{hint} for project "
                f"{self.project!r}: {text}. Check [backends.dstack] token, MESHRUN_DSTACK_TOKEN or "
                "~/.dstack/config.yml",
                backend="dstack",
            )
        if status == 400 and "incompatible" in text.lower():
            return DstackIncompatible(
                f"the dstack server at {self.url} (version {self.server_version or 'unknown'}) refused API level "
                f"{self.sent_version}: {text}", backend="dstack"
            )
        if status == 400 and code == "resource_not_exists":
            return DstackNotFound(f"{what}: {text}", code=code, status=status, backend="dstack")
        if status == 422:
            return DstackAPIError(f"the dstack server rejected the request ({what}): {text}",
                                  code="validation", status=status, backend="dstack")
        if status == 404 and "/api/project" in what:
            return DstackProjectNotFound(
                f"the dstack project {self.project!r} does not exist at {self.url}, or its user is not a member "
                f"of it ({what}: {text})", backend="dstack"
            )
        if status in (404, 405):
            return DstackIncompatible(
                f"{what}: the server at {self.url} has no such endpoint (HTTP {status}); is it a dstack server of "
                f"version {'.'.join(map(str, MIN_SERVER_VERSION))} or newer?", backend="dstack"
            )
        return DstackAPIError(f"{what} failed (HTTP {status}): {text}", code=code, status=status, backend="dstack")

    # ---- version negotiation
    def server_info(self) -> dict[str, Any]:
        data = self.request("/api/server/get_info", {}, auth=False)
        if not isinstance(data, dict) or "server_version" not in data:
            raise DstackIncompatible(
                f"the server at {self.url} did not answer /api/server/get_info like a dstack server", backend="dstack"
            )
        return data

    def negotiate(self) -> str | None:
        info = self.server_info()
        self.server_version = info.get("server_version")
        if self.api_version is not None:
            self.sent_version = self.api_version
        else:
            self.sent_version = negotiate(self.server_version)
            if self.sent_version and self.sent_version != API_VERSION:
                log.debug("dstack server %s is older than API level %s; speaking %s",
                          self.server_version, API_VERSION, self.sent_version)
        self._negotiated = True
        return self.sent_version

    # ---- endpoints used by the backend
    def me(self) -> dict[str, Any]:
        """Who the token belongs to: only the user name and role are kept (the answer also holds the
        token itself and an SSH private key, which are dropped here)."""
        data = self.request("/api/users/get_my_user", {})
        return {"username": (data or {}).get("username"), "global_role": (data or {}).get("global_role")}

    def get_project(self) -> dict[str, Any]:
        from urllib.parse import quote

        data = self.request(f"/api/projects/{quote(self.project, safe='')}/get", {})
        return {"project_name": (data or {}).get("project_name")}

    def project_path(self, what: str) -> str:
        from urllib.parse import quote

        return f"/api/project/{quote(self.project, safe='')}/{what}"

    def get_plan(self, run_spec: dict[str, Any], *, max_offers: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"run_spec": run_spec}
        if max_offers:
            body["max_offers"] = max_offers
        return self.request(self.project_path("runs/get_plan"), body)

    def apply(self, run_spec: dict[str, Any], *, force: bool = False) -> dict[str, Any]:
        return self.request(self.project_path("runs/apply"), {"plan": {"run_spec": run_spec}, "force": force})

    def get_run(self, run_name: str) -> dict[str, Any] | None:
        try:
            return self.request(self.project_path("runs/get"), {"run_name": run_name})
        except DstackNotFound:
            return None

    def list_runs(self, *, limit: int = 100, prev: dict[str, Any] | None = None,
                  only_active: bool = False) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"project_name": self.project, "limit": limit, "include_jobs": True,
                                "job_submissions_limit": 1, "only_active": only_active}
        if prev:
            body["prev_submitted_at"] = prev["submitted_at"]
            body["prev_run_id"] = prev["id"]
        return self.request("/api/runs/list", body) or []

    def stop(self, run_names: list[str], *, abort: bool = False) -> None:
        self.request(self.project_path("runs/stop"), {"runs_names": run_names, "abort": abort})

    def list_fleets(self) -> list[dict[str, Any]]:
        return self.request(self.project_path("fleets/list"), {"include_imported": True}) or []

    def poll_logs(self, run_name: str, job_submission_id: str, *, next_token: str | None = None,
                  start_time: str | None = None, limit: int = 1000) -> dict[str, Any]:
        body: dict[str, Any] = {"run_name": run_name, "job_submission_id": job_submission_id, "limit": limit}
        if next_token:
            body["next_token"] = next_token
        if start_time:
            body["start_time"] = start_time
        return self.request(self.project_path("logs/poll"), body) or {}

    def upload_archive(self, name: str, data: bytes) -> dict[str, Any]:
        return self.request("/api/files/upload_archive", files={"file": (name, data, "application/x-tar")})
