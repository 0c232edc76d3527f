"""The one map from domain errors to gRPC status codes, used by every servicer."""

from __future__ import annotations

import grpc

from gateway.api.auth import AuthError, PermissionError_
from gateway.records.spill import SpillUnavailable
from gateway.serving.errors import PreconditionError, UnavailableError
from gateway.serving.features import FeatureError
from registry.errors import (
    AlreadyExistsError,
    ConflictError,
    NotFoundError,
    PreconditionFailed,
    ValidationError,
)

__all__ = ["PreconditionError", "UnavailableError", "status_for"]


def status_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, AuthError):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, FeatureError | ValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, AlreadyExistsError):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(exc, ConflictError):
        return grpc.StatusCode.ABORTED
    if isinstance(exc, PreconditionError | PreconditionFailed):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, PermissionError_):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(exc, UnavailableError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, SpillUnavailable):  # the log cannot keep the row: neither database nor disk takes it
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL
