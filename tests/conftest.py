"""Session-wide real parts: one PostgreSQL server and one local Ray cluster per test session.

`make test` runs the suite in two pytest-xdist workers (`-n 2 --dist loadgroup`): every test that uses
Ray (the `ray_cluster` fixture, or the `ray` mark for a test that starts a Ray of its own) is put in one
xdist group, so one worker runs them all, one after another, on the one Ray it starts; the other worker
runs the rest (unit tests, registry, CLI, partitions: no Ray), each worker with its own PostgreSQL. Why:
the Ray tests spend much of their time waiting on processes (a 5-minute chaos run, a 30 s hung server),
so one test at a time left much of the two cores idle (33m26s of pytest serial against 26m49s in two
workers, one fresh clone each, README); two Rays on two cores would instead fight over both. Run one
file with plain `pytest`: the group changes nothing without xdist."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pg import PostgresServer

RAY_GROUP = "ray"  # the xdist group of every test that needs Ray (module docstring)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the group into each test's id
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "ray_cluster" in item.fixturenames or item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.xdist_group(RAY_GROUP))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of the test's own, for tests that stop or hang it (never the session's shared one);
    always resumed and stopped at the end, so no hung server is left behind."""
    server = PostgresServer().start()
    try:
        yield server
    finally:
        try:
            server.unfreeze()
        finally:
            server.stop()


BACKENDS = ["sqlite", "postgresql"]


def fresh_registry_url(kind: str, request: pytest.FixtureRequest, directory: Path) -> str:
    """A new empty registry database of the given kind."""
    if kind == "sqlite":
        return f"sqlite:///{directory / 'registry.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database()


def one_version_gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, prefix: str,
                        seed: int, **overrides: Any) -> Iterator[tuple[Any, str, bytes]]:
    """For module fixtures parametrised over BACKENDS: a fresh registry of `request.param` with one
    model (named `prefix` + random hex, one small ONNX version at 100 %) behind a running gateway
    (`overrides`: GatewayConfig fields). Yields (gateway, model, the version's ONNX bytes)."""
    from tests.harness import GatewayThread, served_model

    tmp = tmp_path_factory.mktemp(prefix)
    url = fresh_registry_url(request.param, request, tmp)
    reg, model, onnx = served_model(url, prefix, seed)
    gw = GatewayThread(url, tmp, **overrides).start()
    try:
        yield gw, model, onnx
    finally:
        gw.stop()
        reg.dispose()


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


# The one registry the session's Ray node knows the password of, as a production Ray node knows its
# registry's (CHIMERA_REGISTRY_URL from a Secret): replicas are given URLs without passwords
# (replicas.deployment.actor_registry_url) and take the password from their node's environment. A test
# that puts a password in the gateway's URL uses this database (`NODE_DB`, with `NODE_DB_PASSWORD`).
NODE_DB = "t_ray_node_registry"
NODE_DB_PASSWORD = "s3cret-db-pw"


def node_registry_url(server: PostgresServer) -> str:
    return server.url(NODE_DB).replace("postgres@", f"postgres:{NODE_DB_PASSWORD}@", 1)


def claim_ray(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Under xdist, fail a Ray test in any worker but the first to start Ray: the group of the module
    docstring is what keeps two Rays off two cores, and nothing else would notice it missing (pytest 9
    with xdist 3.8 silently dropped it: every Ray test then ran, slower, beside a second Ray)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return
    claim = tmp_path_factory.getbasetemp().parent / "ray-worker"  # shared by the run's workers
    try:
        with open(claim, "x") as f:
            f.write(worker)
    except FileExistsError:
        holder = claim.read_text()
        if holder != worker:
            pytest.fail(f"worker {worker} would start a second Ray; {holder} holds the Ray tests: "
                        f"the xdist group '{RAY_GROUP}' was not applied (tests/conftest.py)")


@pytest.fixture(autouse=True)
def _own_ray_in_the_ray_worker(request: pytest.FixtureRequest,
                               tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same claim for a test that starts a Ray of its own (the `ray` mark)."""
    if request.node.get_closest_marker("ray") is not None:
        claim_ray(tmp_path_factory)


@pytest.fixture(scope="session")
def ray_cluster(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One local Ray for the whole session, explicit CPUs (2-core machine), shut down at the end. Its
    node's environment holds CHIMERA_REGISTRY_URL for `NODE_DB` (set only while Ray starts, so the
    tests' own settings never see it)."""
    import ray
    from ray import serve

    claim_ray(tmp_path_factory)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    saved = os.environ.get("CHIMERA_REGISTRY_URL")
    os.environ["CHIMERA_REGISTRY_URL"] = node_registry_url(postgres)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    finally:
        if saved is None:
            os.environ.pop("CHIMERA_REGISTRY_URL", None)
        else:
            os.environ["CHIMERA_REGISTRY_URL"] = saved
    try:
        yield
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
