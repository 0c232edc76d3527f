"""Errors the serving path raises; the API layer maps each to one gRPC status code (gateway.api.errors)."""


class UnavailableError(RuntimeError):
    """No replica could score the request (gRPC UNAVAILABLE): retrying later may work."""


class PreconditionError(RuntimeError):
    """The model exists but cannot serve yet, e.g. no traffic split (gRPC FAILED_PRECONDITION)."""
