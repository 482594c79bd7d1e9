"""meshrun's SkyPilot backend: launch meshrun jobs on any infra SkyPilot knows, priced by its catalogs.

Importing this package does not import SkyPilot (``sky``); the SDK is loaded on first use.
"""

from __future__ import annotations

import meshrun.backend as mb

__all__ = ["SkyPilotBackend", "task_config", "install_catalog"]


__getattr__ = mb.lazy_exports(__name__, {"SkyPilotBackend": "._backend", "task_config": "._task",
                                         "install_catalog": "._catalog"})
