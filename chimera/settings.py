"""Settings read from the environment, in one place so every process agrees on them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SQLITE_FILE = "chimera.db"
TRACES_EXPORTERS = ("none", "console", "otlp", "memory")  # see gateway.tracing


def default_registry_url() -> str:
    """SQLite in the working directory: the embedded default, so `make demo` needs no server."""
    return f"sqlite:///{Path(DEFAULT_SQLITE_FILE).resolve()}"


def _absolute_sqlite(url: str) -> str:
    """Ray replicas run in other working directories, so a relative SQLite path must be pinned."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        return prefix + str(Path(url[len(prefix):]).resolve())
    return url


@dataclass(frozen=True)
class Settings:
    registry_url: str = field(default_factory=default_registry_url)
    admin_token: str | None = None
    predict_token: str | None = None
    ray_address: str | None = None
    ray_num_cpus: int = 2
    replica_num_cpus: float = 0.25
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    traces_exporter: str = "none"

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            registry_url=_absolute_sqlite(os.environ.get("CHIMERA_REGISTRY_URL") or default_registry_url()),
            admin_token=os.environ.get("CHIMERA_ADMIN_TOKEN") or None,
            predict_token=os.environ.get("CHIMERA_PREDICT_TOKEN") or None,
            ray_address=os.environ.get("RAY_ADDRESS") or None,
            ray_num_cpus=int(os.environ.get("CHIMERA_RAY_NUM_CPUS", "2")),
            replica_num_cpus=float(os.environ.get("CHIMERA_REPLICA_NUM_CPUS", "0.25")),
            tls_cert=_path(os.environ.get("CHIMERA_TLS_CERT")),
            tls_key=_path(os.environ.get("CHIMERA_TLS_KEY")),
            tls_client_ca=_path(os.environ.get("CHIMERA_TLS_CLIENT_CA")),
            traces_exporter=traces_exporter_from_env(),
        )


def traces_exporter_from_env() -> str:
    """CHIMERA_TRACES_EXPORTER (none | console | otlp | memory; default none). An unknown value fails
    at start-up rather than silently turning tracing off."""
    value = (os.environ.get("CHIMERA_TRACES_EXPORTER") or "none").strip().lower()
    if value not in TRACES_EXPORTERS:
        raise ValueError(f"CHIMERA_TRACES_EXPORTER: {value!r} is not one of {', '.join(TRACES_EXPORTERS)}")
    return value


def registry_url_from_env() -> str | None:
    """CHIMERA_REGISTRY_URL as given (a relative SQLite path pinned), or None when it is unset. For
    processes where falling back to a local SQLite file would be wrong, such as Ray pods."""
    url = os.environ.get("CHIMERA_REGISTRY_URL")
    return _absolute_sqlite(url) if url else None


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None
