"""meshrun: define a job once, run it on whatever compute you have.

    import meshrun

    @meshrun.job(gpus=1, memory="16GiB")
    def train(lr): ...

    job = train.submit(0.1)          # runs as its own process on a leased GPU
    job.result()

    job = meshrun.run(["python", "train.py"], gpus=2)

Public names are listed in ``__all__``; they are imported lazily so ``import meshrun`` stays fast.
What a backend package needs (``Backend``, ``Submission``, ``JobStatus``, ...) is in :mod:`meshrun.backend`;
those names also still resolve here, as they did before, but are not part of ``__all__``.
"""

from __future__ import annotations

from ._version import __version__

TYPE_CHECKING = False  # typing is not imported at run time: `import meshrun` stays fast

_EXPORTS = {
    # spec (from the module that also registers JobSpec's file readers: from_skypilot_yaml, from_dstack_yaml)
    "JobSpec": "._jobfile",
    "Resources": "._spec",
    # jobs
    "Job": "._job",
    "wait": "._job",
    "gather": "._job",
    "job": "._decorator",
    "JobFunction": "._decorator",
    "run": "._cliclient",  # _scheduler.run, or the warm command server's (the same contract)
    "submit": "._scheduler",
    "submit_many": "._scheduler",
    # placement
    "plan": "._placement",
    "offers": "._placement",
    "Plan": "._placement",
    "Objective": "._placement",
    "PlacementOptions": "._options",
    "catalog_offers": "._catalog",
    # backends, as a user sees them
    "JobState": "._backend",
    "Offer": "._backend",
    "get_backend": "._registry",
    "list_backends": "._registry",
    "check_dist_env": "._launch",
    # units
    "parse_size": "._units",
    "parse_duration": "._units",
    "parse_gpus": "._units",
    "format_size": "._units",
    "format_duration": "._units",
    # config
    "configure": "._config",
    "get_config": "._config",
    "Config": "._config",
    # errors
    "MeshrunError": "._errors",
    "SpecError": "._errors",
    "ConfigError": "._errors",
    "NoPlacementError": "._errors",
    "BackendError": "._errors",
    "BackendUnavailable": "._errors",
    "JobError": "._errors",
    "JobFailed": "._errors",
    "JobTimeout": "._errors",
    "JobCancelled": "._errors",
    "JobLost": "._errors",
    "JobNotFound": "._errors",
}

# the backend-author kit lives in meshrun.backend; these names keep resolving here as they always did
_KIT = (
    "Backend", "BackendSettings", "Availability", "Feature", "JobStatus", "Submission", "RESULT_FILES",
    "STAGED_FILES", "register_backend", "unregister_backend", "agent_file", "agent_version", "map_agent_status",
    "tail_file", "place_files_locally", "dist_env", "dist_shell", "free_port", "DIST_ENV_VARS", "slurm_time",
)

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    import importlib

    mod = _EXPORTS.get(name)
    if mod is None:
        if name in ("bench", "backend"):
            return importlib.import_module("." + name, __name__)
        if name in _KIT:
            value = getattr(importlib.import_module(".backend", __name__), name)
            globals()[name] = value
            return value
        raise AttributeError(f"module 'meshrun' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from typing import Any

    from . import backend
    from ._backend import JobState, Offer
    from ._catalog import catalog_offers
    from ._config import Config, configure, get_config
    from ._decorator import JobFunction, job
    from ._errors import (
        BackendError,
        BackendUnavailable,
        ConfigError,
        JobCancelled,
        JobError,
        JobFailed,
        JobLost,
        JobNotFound,
        JobTimeout,
        MeshrunError,
        NoPlacementError,
        SpecError,
    )
    from ._job import Job, gather, wait
    from ._launch import check_dist_env
    from ._options import PlacementOptions
    from ._placement import Objective, Plan, offers, plan
    from ._registry import get_backend, list_backends
    from ._scheduler import run, submit, submit_many
    from ._spec import JobSpec, Resources
    from ._units import format_duration, format_size, parse_duration, parse_gpus, parse_size

    # the backend-author kit (meshrun.backend), still reachable here
    from .backend import (
        DIST_ENV_VARS,
        RESULT_FILES,
        STAGED_FILES,
        Availability,
        Backend,
        BackendSettings,
        Feature,
        JobStatus,
        Submission,
        agent_file,
        agent_version,
        dist_env,
        free_port,
        map_agent_status,
        place_files_locally,
        register_backend,
        slurm_time,
        tail_file,
        unregister_backend,
    )
