"""meshrun's SkyPilot backend: launch meshrun jobs on any infra SkyPilot knows, priced by its catalogs.

Importing this package does not import SkyPilot (``sky``); the SDK is loaded on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SkyPilotBackend", "task_config", "install_catalog"]


def __getattr__(name: str) -> Any:
    if name == "SkyPilotBackend":
        from ._backend import SkyPilotBackend

        return SkyPilotBackend
    if name == "task_config":
        from ._task import task_config

        return task_config
    if name == "install_catalog":
        from ._catalog import install_catalog

        return install_catalog
    raise AttributeError(f"module 'meshrun_skypilot' has no attribute {name!r}")
