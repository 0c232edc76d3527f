"""Alembic environment: uses a connection handed in by registry.migrate, or the configured URL."""

from __future__ import annotations

from contextlib import nullcontext

from alembic import context
from sqlalchemy import create_engine

from registry.models import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    # PostgreSQL: Alembic's own transaction, as in registry.migrate._migrate (which says why).
    with engine.connect() as conn, nullcontext() if conn.dialect.name == "postgresql" else conn.begin():
        context.configure(connection=conn, target_metadata=target_metadata,
                          render_as_batch=conn.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()
