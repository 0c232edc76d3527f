"""Run Alembic programmatically so `chimera db upgrade` needs no alembic.ini in the working directory.

Migrations run under a cross-process lock, because they are run by every `chimera serve` at start-up
(two gateways in k8s start together) as well as by `chimera db upgrade`: two Alembic runs on an empty
database would both try to create the same tables and one would fail half-way. PostgreSQL: a session
advisory lock (`pg_advisory_lock`-style, polled with pg_try_advisory_lock so the wait is bounded) taken on
the very connection Alembic then migrates with, so the lock lives exactly as long as the migration's
session; SQLite: an exclusive `flock` on a file beside the database. The second runner waits, then finds
the schema at head and does nothing."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, text

from registry.engine import driver_url

MIGRATIONS = Path(__file__).with_name("migrations")
MIGRATION_LOCK = "chimera-migrations"
# How long a second migrator waits for the first: a real migration of this schema takes seconds.
DEFAULT_LOCK_WAIT_S = 300.0


class MigrationLockTimeout(TimeoutError):
    """Another process held the migration lock for longer than the wait allowed."""


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", driver_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, engine: Engine | None = None, revision: str = "head", *,
            lock_wait_s: float = DEFAULT_LOCK_WAIT_S) -> None:
    """Migrate to `revision` under the migration lock (see the module docstring)."""
    own = engine is None
    eng = engine if engine is not None else create_engine(driver_url(url))
    cfg = alembic_config(url)
    try:
        if eng.dialect.name == "postgresql":
            with eng.connect() as conn, _pg_lock(conn, lock_wait_s):
                _migrate(cfg, conn, revision)
        else:
            with _file_lock(_sqlite_file(eng), lock_wait_s), eng.connect() as conn:
                _migrate(cfg, conn, revision)
    finally:
        if own:
            eng.dispose()


def _migrate(cfg: Config, conn: Connection, revision: str) -> None:
    run_alembic(cfg, conn, command.upgrade, revision)


def run_alembic(cfg: Config, conn: Connection, step: Callable[[Config, str], None], revision: str) -> None:
    """Run an Alembic command (`command.upgrade` or `command.downgrade`) to `revision` on `conn`.
    PostgreSQL: the run's one transaction is Alembic's own (env.py's begin_transaction), not one begun
    here, because a revision may step out of it (autocommit_block: 0010's CREATE INDEX CONCURRENTLY),
    which Alembic cannot do in a transaction its caller began. SQLite: begun here, as always (Alembic
    would otherwise commit revision by revision there)."""
    cfg.attributes["connection"] = conn
    if conn.dialect.name == "postgresql":
        step(cfg, revision)
        return
    with conn.begin():
        step(cfg, revision)


@contextmanager
def _pg_lock(conn: Connection, wait_s: float) -> Iterator[None]:
    from registry.locks import lock_key

    key = lock_key(MIGRATION_LOCK)
    deadline = time.monotonic() + wait_s
    while True:
        got = bool(conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}))
        conn.commit()  # the session lock outlives this transaction; Alembic begins its own
        if got:
            break
        if time.monotonic() > deadline:
            raise MigrationLockTimeout(
                f"migrations: another process has been migrating for over {wait_s:.0f} s")
        time.sleep(0.2)
    try:
        yield
    finally:
        try:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()
        except Exception:  # the connection is gone, and the server released the lock with it
            pass


def _sqlite_file(engine: Engine) -> str | None:
    db = engine.url.database
    return None if not db or db == ":memory:" or db.startswith("file::memory:") else db


@contextmanager
def _file_lock(db_file: str | None, wait_s: float) -> Iterator[None]:
    if db_file is None:  # an in-memory database is private to this process
        yield
        return
    path = f"{os.path.abspath(db_file)}.migrate-lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise MigrationLockTimeout(
                        f"migrations: another process has held {path} for over {wait_s:.0f} s") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
