"""meshrun: define a job once, run it on whatever compute you have.

    import meshrun

    @meshrun.job(gpus=1, memory="16GiB")
    def train(lr): ...

    job = train.submit(0.1)          # runs as its own process on a leased GPU
    job.result()

    job = meshrun.run(["python", "train.py"], gpus=2)

Public names are listed in ``__all__``; they are imported lazily so ``import meshrun`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

_EXPORTS = {
    # spec
    "JobSpec": "._spec",
    "Resources": "._spec",
    # jobs
    "Job": "._job",
    "wait": "._job",
    "gather": "._job",
    "job": "._decorator",
    "JobFunction": "._decorator",
    "run": "._scheduler",
    "submit": "._scheduler",
    "submit_many": "._scheduler",
    # placement
    "plan": "._placement",
    "offers": "._placement",
    "Plan": "._placement",
    "Objective": "._placement",
    "catalog_offers": "._catalog",
    # backends
    "Backend": "._backend",
    "BackendSettings": "._config",
    "Availability": "._backend",
    "Feature": "._backend",
    "JobState": "._backend",
    "JobStatus": "._backend",
    "Offer": "._backend",
    "Submission": "._backend",
    "RESULT_FILES": "._backend",
    "STAGED_FILES": "._backend",
    "get_backend": "._registry",
    "list_backends": "._registry",
    "register_backend": "._registry",
    "unregister_backend": "._registry",
    "agent_file": "._local",
    "agent_version": "._local",
    "map_agent_status": "._local",
    "tail_file": "._local",
    "place_files_locally": "._scheduler",
    "dist_env": "._launch",
    "dist_shell": "._launch",
    "free_port": "._launch",
    "check_dist_env": "._launch",
    "DIST_ENV_VARS": "._launch",
    # units
    "parse_size": "._units",
    "parse_duration": "._units",
    "parse_gpus": "._units",
    "format_size": "._units",
    "format_duration": "._units",
    "slurm_time": "._units",
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

_RENAMED = {"DIST_ENV_VARS": "CONTRACT"}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        if name == "bench":
            import importlib

            return importlib.import_module(".bench", __name__)
        raise AttributeError(f"module 'meshrun' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod, __name__), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from ._backend import (
        RESULT_FILES,
        STAGED_FILES,
        Availability,
        Backend,
        Feature,
        JobState,
        JobStatus,
        Offer,
        Submission,
    )
    from ._catalog import catalog_offers
    from ._config import BackendSettings, Config, configure, get_config
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
    from ._launch import check_dist_env, dist_env, dist_shell, free_port
    from ._local import agent_file, agent_version, map_agent_status, tail_file
    from ._placement import Objective, Plan, offers, plan
    from ._registry import get_backend, list_backends, register_backend, unregister_backend
    from ._scheduler import place_files_locally, run, submit, submit_many
    from ._spec import JobSpec, Resources
    from ._units import format_duration, format_size, parse_duration, parse_gpus, parse_size, slurm_time
