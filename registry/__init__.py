"""Model registry: versions, traffic splits, prediction/outcome log and audit, on SQLAlchemy 2.

PostgreSQL in production, a SQLite file as the embedded default; the same code runs on both.
"""

from registry.errors import AlreadyExistsError, ConflictError, NotFoundError, RegistryError, ValidationError
from registry.repository import ModelInfo, Registry, Split, VersionInfo

__all__ = [
    "AlreadyExistsError",
    "ConflictError",
    "ModelInfo",
    "NotFoundError",
    "Registry",
    "RegistryError",
    "Split",
    "ValidationError",
    "VersionInfo",
]
