"""SkyPilot's API server: find it, start the local one when needed, say clearly when it is down.

Every SkyPilot SDK call goes through an API server. With no endpoint configured that is a local server
(``sky api start``) on 127.0.0.1 (port ``port``, else ``SKYPILOT_API_SERVER_LOCAL_PORT``, else 46580),
which meshrun starts on first use unless ``start_server = false``. The health check is a plain HTTP GET
(no ``sky`` import), so ``check()`` stays cheap.
"""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import meshrun

DEFAULT_PORT = 46580
PORT_ENV = "SKYPILOT_API_SERVER_LOCAL_PORT"
ENDPOINT_ENV = "SKYPILOT_API_SERVER_ENDPOINT"

_lock = threading.Lock()


def redact(url: str) -> str:
    """The URL without an inline password (``http://user:pw@host`` -> ``http://user:***@host``)."""
    return re.sub(r"(//[^/:@]*:)[^@/]*@", r"\1***@", url)


class ApiServer:
    def __init__(self, settings: Any):
        self.settings = settings

    # ---- where
    @property
    def local(self) -> bool:
        return not (self.settings.endpoint or os.environ.get(ENDPOINT_ENV))

    @property
    def port(self) -> int:
        if self.settings.port:
            return int(self.settings.port)
        try:
            return int(os.environ.get(PORT_ENV) or DEFAULT_PORT)
        except ValueError:
            return DEFAULT_PORT

    @property
    def url(self) -> str:
        ep = self.settings.endpoint or os.environ.get(ENDPOINT_ENV)
        return (ep or f"http://127.0.0.1:{self.port}").rstrip("/")

    def export_env(self) -> None:
        """Point SkyPilot's client (this process) at the configured server, before any SDK call."""
        if self.settings.endpoint:
            os.environ[ENDPOINT_ENV] = self.settings.endpoint
        if self.settings.port:
            os.environ[PORT_ENV] = str(self.settings.port)
        os.environ.setdefault("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
        if "sky" in __import__("sys").modules:  # a changed port/endpoint: SkyPilot caches the URL
            try:
                from sky.server import common as server_common

                server_common.get_server_url.cache_clear()
                server_common.is_api_server_local.cache_clear()
            except Exception:  # pragma: no cover - older layouts
                pass

    # ---- state
    def health(self, timeout: float = 3.0) -> tuple[bool, str, dict[str, Any]]:
        """(healthy, why not, the /api/health answer)."""
        try:
            with urllib.request.urlopen(self.url + "/api/health", timeout=timeout) as r:
                body = r.read()
            info = json.loads(body or b"{}")
        except urllib.error.HTTPError as e:
            return False, f"the SkyPilot API server at {redact(self.url)} answered HTTP {e.code}", {}
        except (urllib.error.URLError, OSError, ValueError) as e:
            why = getattr(e, "reason", None) or e
            return False, f"the SkyPilot API server at {redact(self.url)} is down ({why})", {}
        status = str(info.get("status", "healthy")).lower()
        if status not in ("healthy", "ok"):
            return False, f"the SkyPilot API server at {redact(self.url)} reports {status}", info
        return True, "", info

    def call(self, path: str, timeout: float = 5.0) -> Any:
        """A read-only API request over plain HTTP (no ``sky`` import): GET ``path``, then the request's
        return value from ``/api/get``. Used where a 5 s SDK import would be too slow (offers)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                request_id = r.headers.get("X-Skypilot-Request-ID")
            if not request_id:
                raise ValueError("no request id in the answer")
            url = f"{self.url}/api/get?request_id={urllib.parse.quote(request_id)}"
            with urllib.request.urlopen(url, timeout=timeout) as r:
                payload = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise meshrun.BackendUnavailable(f"the SkyPilot API server at {redact(self.url)} did not answer "
                                             f"{path}: {getattr(e, 'reason', None) or e}", backend="skypilot") from e
        if payload.get("status") != "SUCCEEDED":
            raise meshrun.BackendError(f"SkyPilot request {path} ended {payload.get('status')}", backend="skypilot")
        value = payload.get("return_value")
        return json.loads(value) if isinstance(value, str) else value

    def ensure(self) -> None:
        """Make sure the server answers: start the local one if allowed, else raise BackendUnavailable."""
        self.export_env()
        ok, why, _ = self.health()
        if ok:
            return
        if not self.local:
            raise meshrun.BackendUnavailable(f"{why}; check the endpoint setting or the server", backend="skypilot")
        if not self.settings.start_server:
            raise meshrun.BackendUnavailable(
                f"{why}; start it with `sky api start` (port {self.port}) or set start_server = true in "
                "[backends.skypilot]", backend="skypilot")
        with _lock:
            ok, why, _ = self.health()
            if ok:
                return
            self.start()

    def start(self) -> None:
        self.export_env()
        try:
            from sky.client import sdk

            sdk.api_start(port=self.port)
        except Exception as e:
            raise meshrun.BackendUnavailable(
                f"could not start the SkyPilot API server on 127.0.0.1:{self.port}: {type(e).__name__}: "
                f"{_clean(e)} (its log: ~/.sky/api_server/server.log)", backend="skypilot") from e
        ok, why, _ = self.health(timeout=10)
        if not ok:
            raise meshrun.BackendUnavailable(f"started the SkyPilot API server but {why}", backend="skypilot")

    def stop(self) -> None:
        """Stop the local API server (SkyPilot's own ``sky api stop``)."""
        if not self.local:
            raise meshrun.BackendError("the SkyPilot API server is remote; meshrun only stops a local one",
                                       backend="skypilot")
        self.export_env()
        from sky.client import sdk

        sdk.api_stop()


def _clean(e: BaseException) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()[0] if str(e).strip() else type(e).__name__
