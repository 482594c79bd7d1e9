"""The meshrun configuration: one TOML file plus ``MESHRUN_*`` environment variables, loaded once.

File: ``$MESHRUN_CONFIG``, else ``$XDG_CONFIG_HOME/meshrun/config.toml`` (``~/.config/meshrun/config.toml``).

    default_backend = "local"        # optional; without it placement chooses
    home = "/data/me/meshrun"        # job store (default: the user's data dir)

    [backends.local]
    grace_period = 10

    [backends.slurm]
    partition = "gpu"

    [placement]                      # see docs/placement.md
    catalog_dir = "~/.sky/catalogs/v8"

    [tracking.mlflow]                # see docs/tracking.md
    tracking_uri = "http://mlflow.lab:5000"

Unknown top-level keys are errors that list the valid ones; each backend validates its own table.
Environment: ``MESHRUN_HOME``, ``MESHRUN_BACKEND`` (default backend), and ``MESHRUN_<BACKEND>_<KEY>`` for
any key of a backend's table (``MESHRUN_DSTACK_TOKEN``, ``MESHRUN_SLURM_PARTITION``).
"""

from __future__ import annotations

import _thread  # threading's lock and local, without importing threading (a CLI start)
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from ._errors import ConfigError

TYPE_CHECKING = False  # typing is not imported at run time (the CLI must start fast)
if TYPE_CHECKING:
    from typing import Any, Callable

TOP_LEVEL_KEYS = ("default_backend", "home", "backends", "placement", "prices", "tracking")


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("", f"cannot read the config file {path}: {e}") from None
    if not text.strip():  # an empty file needs no TOML parser (importing one is a good part of a CLI start)
        return {}
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        return tomllib.loads(text.decode())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"the config file {path} is not valid TOML: {e}") from None


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("MESHRUN_CONFIG"):
        return Path(env["MESHRUN_CONFIG"]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "meshrun" / "config.toml"


def default_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("MESHRUN_HOME"):
        return Path(env["MESHRUN_HOME"]).expanduser()
    if sys.platform == "darwin":  # pragma: no cover
        return Path.home() / "Library" / "Application Support" / "meshrun"
    base = env.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "meshrun"


class Config:
    """The loaded configuration. ``backend(name)`` gives a backend's table with env overrides applied."""

    def __init__(self, data: Mapping[str, Any] | None = None, *, env: Mapping[str, str] | None = None,
                 source: str = "<memory>"):
        self.env = dict(os.environ if env is None else env)
        self.source = source
        data = dict(data or {})
        unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
        if unknown:
            raise ConfigError(
                unknown[0], f"unknown configuration key in {source}; the valid keys are: {', '.join(TOP_LEVEL_KEYS)}"
            )
        for table in ("backends", "placement", "prices", "tracking"):
            if table in data and not isinstance(data[table], Mapping):
                raise ConfigError(table, f"must be a table in {source}")
        backends = data.get("backends") or {}
        for name, table in backends.items():
            if not isinstance(table, Mapping):
                raise ConfigError(f"backends.{name}", f"must be a table in {source}")
        self.data = data

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> "Config":
        env = os.environ if env is None else env
        path = config_path(env)
        if path.exists():
            return cls(_load_toml(path), env=env, source=str(path))
        if env.get("MESHRUN_CONFIG"):
            raise ConfigError("", f"MESHRUN_CONFIG points to {path}, which does not exist")
        return cls({}, env=env, source="(no config file)")

    @property
    def home(self) -> Path:
        if self.env.get("MESHRUN_HOME"):
            return Path(self.env["MESHRUN_HOME"]).expanduser()
        if self.data.get("home"):
            return Path(str(self.data["home"])).expanduser()
        return default_home(self.env)

    @property
    def default_backend(self) -> str | None:
        return self.env.get("MESHRUN_BACKEND") or self.data.get("default_backend") or None

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.data.get(name) or {})

    def backend(self, name: str) -> dict[str, Any]:
        """The ``[backends.<name>]`` table, with ``MESHRUN_<NAME>_<KEY>`` environment overrides."""
        table = dict((self.data.get("backends") or {}).get(name) or {})
        prefix = f"MESHRUN_{name.upper().replace('-', '_')}_"
        for k, v in self.env.items():
            if k.startswith(prefix) and len(k) > len(prefix):
                table[k[len(prefix):].lower()] = v
        return table


_lock = _thread.allocate_lock()
_current: Config | None = None


def get_config() -> Config:
    global _current
    with _lock:
        if _current is None:
            _current = Config.load()
        return _current


def configure(data: Mapping[str, Any] | None = None, **top: Any) -> Config:
    """Replace the configuration of this process (notebooks, tests): ``meshrun.configure({...})`` or
    ``meshrun.configure(default_backend="local")``. ``meshrun.configure()`` re-reads file and env."""
    global _current
    with _lock:
        if data is None and not top:
            _current = Config.load()
        else:
            merged = dict(data or {})
            merged.update(top)
            _current = Config(merged, source="meshrun.configure()")
    for listener in list(_listeners):
        listener()
    return _current


_listeners: list[Callable[[], None]] = []


def on_configure(listener: Callable[[], None]) -> None:
    """Call ``listener`` whenever :func:`configure` replaces the configuration (the registry forgets the
    backends it made with the old one); the config itself knows nothing of who listens."""
    _listeners.append(listener)
