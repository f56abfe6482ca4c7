"""Errors the coordinator answers with, as exceptions that carry its message."""

from __future__ import annotations


class ShoalError(Exception):
    """A call the coordinator refused or could not do.

    ``message`` is the coordinator's own sentence (it names the field and what to
    do); ``code`` is its kind (``InvalidArgument``, ``NotFound``, ...) and
    ``status`` the HTTP status.
    """

    def __init__(self, message: str, code: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


class ValidationError(ShoalError):
    """The request is wrong: a bad name, size, key or value (HTTP 400)."""


class NotFoundError(ShoalError):
    """No such cluster, job, identity or asset (HTTP 404)."""


class ConflictError(ShoalError):
    """It exists already, or its state forbids the call (HTTP 409)."""


class AuthenticationError(ShoalError):
    """No token, a wrong one, or one without the right (HTTP 401/403)."""


class ConnectionFailed(ShoalError):
    """The coordinator cannot be reached."""


class JobFailed(ShoalError):
    """A job waited on ended failed or canceled."""


_BY_STATUS: dict[int, type[ShoalError]] = {
    400: ValidationError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
}


def from_response(status: int, body: object, fallback: str) -> ShoalError:
    """The exception for an error answer (`{"error": ..., "code": ...}`)."""
    message, code = fallback, ""
    if isinstance(body, dict):
        message = str(body.get("error") or fallback)
        code = str(body.get("code") or "")
    return _BY_STATUS.get(status, ShoalError)(message, code, status)
