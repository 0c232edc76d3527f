"""Session-wide real parts: one PostgreSQL server and one local Ray cluster per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg import PostgresServer


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


BACKENDS = ["sqlite", "postgresql"]


def fresh_registry_url(kind: str, request: pytest.FixtureRequest, directory: Path) -> str:
    """A new empty registry database of the given kind."""
    if kind == "sqlite":
        return f"sqlite:///{directory / 'registry.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database()


@pytest.fixture(params=BACKENDS)
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every registry test runs on both backends: a fresh SQLite file and a fresh Postgres database."""
    return fresh_registry_url(request.param, request, tmp_path)


@pytest.fixture
def registry(registry_url: str):  # noqa: ANN201
    from registry import Registry

    reg = Registry(registry_url)
    reg.upgrade()
    yield reg
    reg.dispose()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray for the whole session, explicit CPUs (2-core machine), shut down at the end."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        yield
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
