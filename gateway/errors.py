"""Errors the prediction path raises, each mapped to one gRPC status code by the servicers."""

from __future__ import annotations

import grpc

from gateway.features import FeatureError
from registry.errors import AlreadyExistsError, ConflictError, NotFoundError, ValidationError
from registry.loadtests import PreconditionFailed


class UnavailableError(RuntimeError):
    """No replica could score the request (gRPC UNAVAILABLE): retrying later may work."""


class PreconditionError(RuntimeError):
    """The model exists but cannot serve yet, e.g. no traffic split (gRPC FAILED_PRECONDITION)."""


class PermissionError_(RuntimeError):
    """Authenticated, but not allowed to do this (gRPC PERMISSION_DENIED)."""


def status_for(exc: BaseException) -> grpc.StatusCode:
    from gateway.auth import AuthError

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
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL
