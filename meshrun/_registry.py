"""Backend plugins, found through the entry-point group ``meshrun.backends`` and loaded lazily.

A plugin that fails to import is listed with the reason and an install hint; it never breaks meshrun.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

from ._errors import BackendUnavailable

GROUP = "meshrun.backends"

# backends meshrun knows about, with the way to install them
KNOWN: dict[str, str] = {
    "local": "built in",
    "ssh": "pip install meshrun-ssh   (from a checkout: pip install -e backends/ssh)",
    "slurm": "pip install meshrun-slurm   (from a checkout: pip install -e backends/slurm)",
    "kubernetes": "pip install meshrun-kubernetes   (from a checkout: pip install -e backends/kubernetes)",
    "skypilot": "pip install meshrun-skypilot   (from a checkout: pip install -e backends/skypilot)",
    "dstack": "pip install meshrun-dstack   (from a checkout: pip install -e backends/dstack)",
}


@dataclass
class BackendInfo:
    name: str
    installed: bool
    loaded: bool
    error: str | None = None
    hint: str = ""
    target: str = ""  # "module:Class" of the entry point
    distribution: str | None = None
    version: str | None = None


_lock = threading.RLock()
_classes: dict[str, Any] = {}
_instances: dict[str, Any] = {}
_manual: dict[str, Callable[..., Any]] = {}
_errors: dict[str, str] = {}


def reset() -> None:
    """Forget created backends and the entry-point scan (after the configuration or the installed
    distributions changed). In-process registrations stay; see unregister_backend."""
    global _eps_cache
    with _lock:
        for b in _instances.values():
            try:
                b.close()
            except Exception:
                pass
        _instances.clear()
        _classes.clear()
        _errors.clear()
        _eps_cache = None


def register_backend(name: str, factory: Callable[..., Any]) -> None:
    """Register a backend class in-process (tests, notebooks, private backends without a distribution)."""
    with _lock:
        _manual[name] = factory
        _instances.pop(name, None)


def unregister_backend(name: str) -> None:
    """Undo register_backend (the backend's instance is closed and forgotten)."""
    with _lock:
        _manual.pop(name, None)
        inst = _instances.pop(name, None)
        if inst is not None:
            try:
                inst.close()
            except Exception:
                pass


_eps_cache: dict[str, Any] | None = None


def _entry_points() -> dict[str, Any]:
    """The installed plugins (scanning every distribution costs tens of ms: done once per process)."""
    global _eps_cache
    if _eps_cache is None:
        from importlib.metadata import entry_points

        eps = {}
        for ep in entry_points(group=GROUP):
            eps.setdefault(ep.name, ep)
        _eps_cache = eps
    return _eps_cache


def _builtin(name: str) -> Any:
    if name == "local":
        from ._local import LocalBackend

        return LocalBackend
    return None


def backend_class(name: str) -> Any:
    with _lock:
        if name in _manual:
            return _manual[name]
        if name in _classes:
            return _classes[name]
        if name in _errors:
            raise BackendUnavailable(_errors[name], backend=name)
        cls = _builtin(name)
        if cls is None:
            ep = _entry_points().get(name)
            if ep is None:
                hint = KNOWN.get(name)
                if hint:
                    msg = f"the {name} backend is not installed; install it with: {hint}"
                else:
                    msg = f"no backend named {name!r}; the known backends are: {', '.join(names())}"
                raise BackendUnavailable(msg, backend=name)
            try:
                cls = ep.load()
            except Exception as e:  # ImportError, or anything the plugin raises at import time
                hint = KNOWN.get(name, f"reinstall the distribution that provides {ep.value}")
                _errors[name] = (
                    f"the {name} backend failed to load ({ep.value}): {type(e).__name__}: {e}; try: {hint}"
                )
                raise BackendUnavailable(_errors[name], backend=name) from e
        _classes[name] = cls
        return cls


def get_backend(name: str) -> Any:
    """The (per-process, shared) backend instance called ``name``."""
    with _lock:
        if name in _instances:
            return _instances[name]
        cls = backend_class(name)
        from ._config import get_config

        inst = cls(get_config().backend(name))
        _instances[name] = inst
        return inst


def names() -> list[str]:
    found = set(KNOWN) | set(_manual)
    try:
        found |= set(_entry_points())
    except Exception:
        pass
    return sorted(found, key=lambda n: (n != "local", n))


def installed_names() -> list[str]:
    """Backends that are present (built in, registered, or with an entry point), loaded or not."""
    out = ["local"] + sorted(set(_manual) - {"local"})
    try:
        out += sorted(set(_entry_points()) - set(out))
    except Exception:
        pass
    return out


def list_backends() -> list[BackendInfo]:
    """Every known or installed backend, trying to load each; failures are reported, not raised."""
    infos = []
    eps = {}
    try:
        eps = _entry_points()
    except Exception:
        pass
    for name in names():
        ep = eps.get(name)
        installed = name == "local" or name in _manual or ep is not None
        info = BackendInfo(name=name, installed=installed, loaded=False, hint=KNOWN.get(name, ""))
        if ep is not None:
            info.target = ep.value
            dist = getattr(ep, "dist", None)
            if dist is not None:
                info.distribution = dist.metadata["Name"]
                info.version = dist.version
        if not installed:
            info.error = "not installed"
            infos.append(info)
            continue
        try:
            backend_class(name)
            info.loaded = True
        except BackendUnavailable as e:
            info.error = str(e)
        infos.append(info)
    return infos
