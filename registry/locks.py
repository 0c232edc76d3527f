"""Cross-process mutual exclusion: a PostgreSQL session advisory lock, a no-op on SQLite (one process
writes a SQLite registry in the embedded setup)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text

from registry.repository import Registry


def lock_key(name: str) -> int:
    """Stable signed 64-bit key for pg_advisory_lock from a readable name."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


@contextmanager
def advisory_lock(registry: Registry, name: str) -> Iterator[bool]:
    """Yields True when this process holds the lock, False when another one does (never blocks)."""
    if not registry.is_postgres:
        yield True
        return
    key = lock_key(name)
    with registry.engine.connect() as conn:
        got = bool(conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}))
        conn.commit()
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
