"""Two `chimera db upgrade` at once on an empty database (issue 15): both succeed and leave one correct
schema, on SQLite and a real PostgreSQL. `chimera serve` runs the same upgrade at start-up, so this is
also two gateways starting together (k8s runs 2). Real processes, started back to back, a few rounds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from registry.migrate import alembic_config
from registry.models import Base
from tests.conftest import BACKENDS, fresh_registry_url

CHIMERA = Path(sys.executable).with_name("chimera")
ROUNDS = 3
RUNNERS = 2


def _head() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


@pytest.mark.parametrize("kind", BACKENDS)
def test_concurrent_db_upgrade_on_an_empty_database(kind: str, request: pytest.FixtureRequest,
                                                    tmp_path: Path) -> None:
    for round_ in range(ROUNDS):
        directory = tmp_path / f"round{round_}"
        directory.mkdir()
        url = fresh_registry_url(kind, request, directory)
        env = {**os.environ, "CHIMERA_REGISTRY_URL": url}
        procs = [subprocess.Popen([str(CHIMERA), "db", "upgrade"], env=env, cwd=directory,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(RUNNERS)]
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        for p, out in zip(procs, outputs, strict=True):
            assert p.returncode == 0, f"round {round_}: `chimera db upgrade` failed:\n{out}"
            assert "is up to date" in " ".join(out.split())
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
                tables = set(inspect(conn).get_table_names())
        finally:
            engine.dispose()
        assert versions == [_head()], f"round {round_}: alembic_version is {versions}"
        assert set(Base.metadata.tables) <= tables, sorted(set(Base.metadata.tables) - tables)
