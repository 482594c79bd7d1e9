"""The SSH backend's errors: all of them are meshrun.BackendError (or BackendUnavailable) subclasses."""

from __future__ import annotations

from meshrun import BackendError, BackendUnavailable


class Unreachable(BackendUnavailable):
    """The host cannot be reached right now (refused, timed out, network down); worth retrying."""

    retryable = True


class ConnectionLost(Unreachable):
    """The connection dropped while a request was in flight."""


class HostKeyRefused(BackendUnavailable):
    """The host's key is unknown or does not match known_hosts; never retried, never accepted silently."""

    retryable = False


class AuthFailed(BackendUnavailable):
    """The server refused our credentials; not retried."""

    retryable = False


class RemoteError(BackendError):
    """The remote helper answered with an error."""


def retryable(exc: BaseException) -> bool:
    return isinstance(exc, Unreachable)


__all__ = ["Unreachable", "ConnectionLost", "HostKeyRefused", "AuthFailed", "RemoteError", "BackendError",
           "BackendUnavailable", "retryable"]
