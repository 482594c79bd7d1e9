"""The one exception tree of meshrun. Foreign errors are translated at the boundary with ``raise ... from``."""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported at run time (the CLI must start fast)
if TYPE_CHECKING:
    from typing import Any, Sequence


class MeshrunError(Exception):
    """Base class of every error meshrun raises on purpose."""

    def __reduce__(self) -> Any:
        # pickled whole (args and attributes), whatever the subclass's __init__ takes: an error raised by the
        # command server's child reaches the caller as it was raised
        return _rebuild, (type(self), self.args, dict(self.__dict__))


def _rebuild(cls: type, args: tuple, attrs: dict) -> BaseException:
    e = cls.__new__(cls, *args)
    e.args = args
    e.__dict__.update(attrs)
    return e


class SpecError(MeshrunError, ValueError):
    """A job spec (or a config value) is invalid. ``field`` names the offending field."""

    def __init__(self, field: str, message: str, value: Any = None):
        self.field = field
        self.message = message
        self.value = value
        super().__init__(f"{field}: {message}" if field else message)


class ConfigError(SpecError):
    """The meshrun configuration is invalid (unknown key, wrong type)."""


class NoPlacementError(MeshrunError):
    """No backend can run the job. ``rejections`` holds every option considered and why it was rejected."""

    def __init__(self, message: str, rejections: Sequence[Any] = ()):
        self.rejections = list(rejections)
        lines = [message]
        for r in self.rejections:
            lines.append(f"  - {r}")
        super().__init__("\n".join(lines))


class BackendError(MeshrunError):
    """A backend could not do what was asked (an external command or API call failed)."""

    def __init__(
        self,
        message: str,
        *,
        backend: str | None = None,
        argv: Sequence[str] | None = None,
        returncode: int | None = None,
        stderr: str | None = None,
    ):
        self.backend = backend
        self.argv = list(argv) if argv is not None else None
        self.returncode = returncode
        self.stderr = stderr
        parts = [f"[{backend}] {message}" if backend else message]
        if argv is not None:
            import shlex

            parts.append(f"command: {shlex.join(self.argv or [])}")
        if returncode is not None:
            parts.append(f"exit code: {returncode}")
        if stderr:
            tail = stderr.strip()
            if len(tail) > 2000:
                tail = "..." + tail[-2000:]
            parts.append(f"stderr: {tail}")
        super().__init__("\n".join(parts))


class BackendUnavailable(BackendError):
    """A backend is not installed, not configured, or cannot be reached."""


class JobError(MeshrunError):
    """Base class of errors about one job."""

    def __init__(self, message: str, job_id: str | None = None):
        self.job_id = job_id
        super().__init__(message)


class JobFailed(JobError):
    """The job ran and failed. For a function job, ``remote_traceback`` holds the traceback from where it
    ran and ``remote_type`` the exception's type name; ``exit_code`` is the process's exit code."""

    def __init__(
        self,
        message: str,
        job_id: str | None = None,
        *,
        remote_traceback: str | None = None,
        remote_type: str | None = None,
        exit_code: int | None = None,
        state: str | None = None,
    ):
        self.remote_traceback = remote_traceback
        self.remote_type = remote_type
        self.exit_code = exit_code
        self.state = state
        full = message
        if remote_traceback:
            full = f"{message}\n\nRemote traceback:\n{remote_traceback.rstrip()}"
        super().__init__(full, job_id)


class JobTimeout(JobFailed):
    """The job ran past its time limit and was stopped."""


class JobCancelled(JobError):
    """The job was cancelled before it finished."""


class JobLost(JobError):
    """meshrun lost track of the job: its process or its backend record is gone without an outcome."""


class JobNotFound(JobError, KeyError):
    """No job with that id is in the job store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else ""


__all__ = [
    "MeshrunError",
    "SpecError",
    "ConfigError",
    "NoPlacementError",
    "BackendError",
    "BackendUnavailable",
    "JobError",
    "JobFailed",
    "JobTimeout",
    "JobCancelled",
    "JobLost",
    "JobNotFound",
]
