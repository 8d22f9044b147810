"""Errors the server core raises; the API maps each class to one gRPC status code (api.py)."""

from __future__ import annotations

__all__ = ["ANSWERED_BY_SERVER", "AbortedError", "ConfigError", "EngineRunError", "FailedPreconditionError",
           "InvalidArgumentError", "PermissionDeniedError", "ResourceExhaustedError", "ServerError",
           "StreamExistsError", "StreamNotFoundError", "UnavailableError", "WrongShardError"]


# Trailing metadata on every error the Detector service itself returns: a client tells the server's UNAVAILABLE
# ("no frame came from the camera", "still starting") from gRPC's own ("cannot connect").
ANSWERED_BY_SERVER = (("yolov12-answered", "1"),)


class ServerError(Exception):
    """Base of the errors a request can cause; the message says what was wrong and how to fix it."""


class InvalidArgumentError(ServerError, ValueError):
    """Bad request content: an id, a URL, an image that cannot be decoded (INVALID_ARGUMENT)."""


class ConfigError(InvalidArgumentError):
    """Bad command-line or streams-file configuration (exit status 2 from the CLI)."""


class StreamExistsError(ServerError):
    """A stream with this id is already registered (ALREADY_EXISTS)."""


class StreamNotFoundError(ServerError, KeyError):
    """No stream with this id (NOT_FOUND)."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class ResourceExhaustedError(ServerError):
    """A limit was reached: --max-streams, or a message too large (RESOURCE_EXHAUSTED)."""


class UnavailableError(ServerError):
    """The server is draining or has no working engine (UNAVAILABLE)."""


class AbortedError(ServerError):
    """The stream a call was feeding was removed by someone else (ABORTED)."""


class FailedPreconditionError(ServerError):
    """Not possible as things are: an engine file that does not load or run, kept out (FAILED_PRECONDITION)."""


class EngineRunError(ServerError):
    """The engine failed on a frame a caller waits for (INTERNAL)."""


class WrongShardError(ServerError):
    """The stream belongs to another replica of a sharded deployment (FAILED_PRECONDITION); `owner` is its shard."""

    def __init__(self, message: str, owner: int) -> None:
        super().__init__(message)
        self.owner = owner


class PermissionDeniedError(ServerError):
    """The request is understood but not allowed: a camera host outside --allow-hosts (PERMISSION_DENIED)."""
