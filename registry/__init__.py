"""Model registry: versions, traffic splits, prediction/outcome log and audit, on SQLAlchemy 2.

PostgreSQL in production, a SQLite file as the embedded default; the same code runs on both.
Where things are: every table in `models`, every error in `errors`, every lock in `locks`, engines
with their client-side timeouts in `engine`, migrations (under a lock) in `migrate`, the
`Registry` class in `repository`, and read/write helpers over a Registry by subject (`rollouts`,
`training_runs`, `loadtests`).
"""

from registry.errors import (
    AlreadyExistsError,
    ConflictError,
    NotFoundError,
    PreconditionFailed,
    RegistryError,
    ValidationError,
)
from registry.repository import ModelInfo, Registry, Split, VersionInfo

__all__ = [
    "AlreadyExistsError",
    "ConflictError",
    "ModelInfo",
    "NotFoundError",
    "PreconditionFailed",
    "Registry",
    "RegistryError",
    "Split",
    "ValidationError",
    "VersionInfo",
]
