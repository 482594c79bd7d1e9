"""The backend-author kit: what a backend package needs from meshrun, in one public module.

    import meshrun.backend as mb

    class MyBackend(mb.Backend):
        name = "mine"
        features = mb.Feature.COMMANDS | mb.Feature.FUNCTIONS

        def check(self) -> mb.Availability: ...
        def offers(self, spec) -> list[mb.Offer]: ...
        def submit(self, submission: mb.Submission, offer=None) -> str: ...
        def status(self, refs: list[mb.JobRef]) -> dict[str, mb.JobStatus]: ...
        def cancel(self, ref: mb.JobRef) -> None: ...
        def logs(self, ref: mb.JobRef, *, follow=False) -> Iterator[str]: ...

docs/writing-a-backend.md describes every duty. The user API (jobs, specs, placement, errors, units) stays in
``meshrun`` itself; the errors a backend raises are re-exported here too. The names below were also
reachable as ``meshrun.<name>`` and still are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

# imported on first use, like meshrun's own names, so importing a backend package stays cheap
_EXPORTS = {
    "Backend": "._backend", "Feature": "._backend", "Availability": "._backend", "Offer": "._backend",
    "Submission": "._backend", "JobRef": "._backend", "JobState": "._backend", "JobStatus": "._backend", "RESULT_FILES": "._backend",
    "STAGED_FILES": "._backend",
    "BackendSettings": "._settings", "BackendOptions": "._settings",
    "register_backend": "._registry", "unregister_backend": "._registry", "get_backend": "._registry",
    "list_backends": "._registry", "install_hint": "._install",
    "agent_file": "._local", "agent_version": "._local", "boot_program": "._bootstrap", "gpu_groups": "._agent",
    "map_agent_status": "._local", "tail_file": "._local",
    "place_files_locally": "._attempts",
    "DIST_ENV_VARS": "._launch", "dist_env": "._launch", "dist_shell": "._launch", "free_port": "._launch",
    "check_dist_env": "._launch",
    "slurm_time": "._units",
    "catalog_has_tables": "._catalog",
    "extract_records": "._transport", "records_from_log": "._transport", "LogFilter": "._transport", "strip_records": "._transport",
    "write_records": "._transport", "agent_command": "._transport", "pack_job": "._transport",
    "new_nonce": "._transport", "records_nonce": "._transport", "frame_lines_max": "._transport", "exit_records": "._transport",
    "parse_exit_records": "._transport", "RecordError": "._transport", "NO_RETRY_EXIT": "._transport",
    "BackendError": "._errors", "BackendUnavailable": "._errors", "ConfigError": "._errors",
    "JobNotFound": "._errors", "SpecError": "._errors",
}
_RENAMED = {"DIST_ENV_VARS": "CONTRACT", "boot_program": "source"}


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'meshrun.backend' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod, "meshrun"), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def lazy_exports(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A package's module ``__getattr__`` that imports each public name from its private module on first use
    (``names``: {name: ".module"}), so importing a backend package stays cheap::

        __getattr__ = mb.lazy_exports(__name__, {"MyBackend": "._backend"})
    """

    def __getattr__(name: str) -> Any:
        mod = names.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        import importlib
        import sys

        value = getattr(importlib.import_module(mod, package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from ._backend import (
        RESULT_FILES,
        STAGED_FILES,
        Availability,
        Backend,
        Feature,
        JobRef,
        JobState,
        JobStatus,
        Offer,
        Submission,
    )
    from ._settings import BackendOptions, BackendSettings
    from ._errors import BackendError, BackendUnavailable, ConfigError, JobNotFound, SpecError
    from ._install import install_hint
    from ._launch import CONTRACT as DIST_ENV_VARS
    from ._launch import check_dist_env, dist_env, dist_shell, free_port
    from ._agent import gpu_groups
    from ._bootstrap import source as boot_program
    from ._local import agent_file, agent_version, map_agent_status, tail_file
    from ._registry import get_backend, list_backends, register_backend, unregister_backend
    from ._attempts import place_files_locally
    from ._transport import (
        NO_RETRY_EXIT,
        LogFilter,
        RecordError,
        agent_command,
        exit_records,
        extract_records,
        frame_lines_max,
        new_nonce,
        pack_job,
        records_from_log,
        records_nonce,
        parse_exit_records,
        strip_records,
        write_records,
    )
    from ._units import slurm_time
    from ._catalog import catalog_has_tables

__all__ = [
    # the contract
    "Backend",
    "BackendSettings",
    "BackendOptions",
    "Feature",
    "Availability",
    "Offer",
    "Submission",
    "JobRef",
    "JobState",
    "JobStatus",
    "RESULT_FILES",
    "STAGED_FILES",
    # registration
    "register_backend",
    "unregister_backend",
    "get_backend",
    "list_backends",
    "install_hint",
    "lazy_exports",
    # the host agent and the job folder
    "agent_file",
    "agent_version",
    "boot_program",
    "gpu_groups",
    "map_agent_status",
    "tail_file",
    "place_files_locally",
    # the job's records on their way back (meshrun/_transport.py)
    "write_records",
    "exit_records",
    "parse_exit_records",
    "agent_command",
    "new_nonce",
    "records_nonce",
    "extract_records",
    "records_from_log",
    "strip_records",
    "LogFilter",
    "frame_lines_max",
    "pack_job",
    "RecordError",
    "NO_RETRY_EXIT",
    # the distributed environment contract
    "DIST_ENV_VARS",
    "dist_env",
    "free_port",
    "check_dist_env",
    # units only schedulers need
    "slurm_time",
    # the cloud price catalog
    "catalog_has_tables",
    # errors a backend raises
    "BackendError",
    "BackendUnavailable",
    "ConfigError",
    "JobNotFound",
    "SpecError",
]
