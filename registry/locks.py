"""Cross-process mutual exclusion, every lock of the registry in one place: PostgreSQL session advisory
locks, no-ops on SQLite (one process writes a SQLite registry in the embedded setup).

- `advisory_lock`: scoped, for one job (a controller tick, a retrain).
- `SessionLock`: held for as long as the caller wants (the scheduler's leadership).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sqlalchemy import Connection, text

if TYPE_CHECKING:
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


class SessionLock:
    """A PostgreSQL session advisory lock held for as long as the caller wants (e.g. the lifetime of
    a scheduler), on its own connection; a no-op that always succeeds on SQLite.

    `advisory_lock` is the scoped form (one job); this one is for leadership: `acquire`
    never blocks, `held` checks that the connection, and so the lock, is still alive (a session lock is
    released by the server when its connection dies, so a live connection means the lock is ours)."""

    def __init__(self, registry: Registry, name: str) -> None:
        self.registry = registry
        self.name = name
        self.key = lock_key(name)
        self._conn: Connection | None = None
        self._sqlite_held = False

    def acquire(self) -> bool:
        if not self.registry.is_postgres:
            self._sqlite_held = True
            return True
        if self.held():
            return True
        conn = self.registry.engine.connect()
        try:
            got = bool(conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}))
            conn.commit()
        except Exception:
            conn.close()
            raise
        if not got:
            conn.close()
            return False
        self._conn = conn
        return True

    def held(self) -> bool:
        if not self.registry.is_postgres:
            return self._sqlite_held
        if self._conn is None:
            return False
        try:
            self._conn.execute(text("SELECT 1"))
            self._conn.commit()
            return True
        except Exception:
            self._drop()
            return False

    def release(self) -> None:
        self._sqlite_held = False
        if self._conn is None:
            return
        try:
            self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            self._conn.commit()
        except Exception:  # the connection is gone, and with it the lock
            pass
        self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None
