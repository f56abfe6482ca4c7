"""Shoal's Python SDK: the managed service's v1 (``shoal.core``) and v2 (``shoal.ml``) calls."""

from .errors import (
    AuthenticationError,
    ConflictError,
    ConnectionFailed,
    JobFailed,
    NotFoundError,
    ShoalError,
    ValidationError,
)

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "ConflictError",
    "ConnectionFailed",
    "JobFailed",
    "NotFoundError",
    "ShoalError",
    "ValidationError",
]
