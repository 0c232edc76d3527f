"""Every registry error, in this one module; the gateway maps each to one gRPC status code
(gateway.api.errors.status_for)."""


class RegistryError(Exception):
    """Base class for registry errors."""


class NotFoundError(RegistryError):
    """A model, version or request id does not exist (gRPC NOT_FOUND)."""


class ValidationError(RegistryError):
    """The caller sent something invalid; the message names the field (gRPC INVALID_ARGUMENT)."""


class ConflictError(RegistryError):
    """Optimistic concurrency lost: someone changed the row first (gRPC ABORTED)."""


class AlreadyExistsError(RegistryError):
    """A conflicting value is already stored, e.g. a different outcome (gRPC ALREADY_EXISTS)."""


class PreconditionFailed(RegistryError):
    """The action needs a state the registry does not have yet, e.g. promotion without a recent
    passing load test (gRPC FAILED_PRECONDITION). The message says what to do."""


class PartitionError(RegistryError):
    """Upkeep of the prediction log's day partitions (registry.partitions) stopped short: a table could not
    be made or dropped in time (another session held `predictions`), or PostgreSQL refused a day. The
    message names the day or table and why; `done` lists the tables made or dropped before it stopped
    (those stay done). Raised to the gateway's writer thread and to `chimera log prune`, never to a gRPC
    caller."""

    def __init__(self, message: str, done: list[str] | None = None) -> None:
        super().__init__(message)
        self.done = list(done or [])
