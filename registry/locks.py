"""Cross-process mutual exclusion, every lock of the registry in one place: PostgreSQL session advisory
locks, no-ops on SQLite (one process writes a SQLite registry in the embedded setup).

- `fenced_lock`: scoped, for one job (a controller tick), fenced (see HeldLock).
- `advisory_lock`: the same as a plain bool, unfenced (a retrain).
- `SessionLock`: held for as long as the caller wants (the scheduler's leadership).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from registry.errors import ConflictError

if TYPE_CHECKING:
    from registry.repository import Registry

log = logging.getLogger(__name__)


def lock_key(name: str) -> int:
    """Stable signed 64-bit key for pg_advisory_lock from a readable name."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


class LockLost(ConflictError):
    """A fenced write found that its advisory lock is no longer held by its connection (the connection
    was lost or replaced): the write is rolled back. A ConflictError, so callers that retry a conflict
    on their next look do so here too (gRPC ABORTED)."""


class HeldLock:
    """What `fenced_lock` yields: true when this process holds the lock, false when another one does.

    The fence: on PostgreSQL, while the lock is held, every session the holding thread opens on
    `registry` runs on the connection that holds the lock (Registry.bound_to), and every commit first
    checks, in the same transaction, that this backend (`pg_backend_pid()`, the pid the lock was taken
    on) still holds the lock in `pg_locks`. A session advisory lock dies with its connection, so a
    holder whose connection was terminated cannot commit anything afterwards, not even after SQLAlchemy
    has transparently reconnected the Connection to a new backend, while a second process takes the
    lock over. Other threads of the process are not bound. SQLite: a no-op, one embedded writer."""

    def __init__(self, held: bool, registry: Registry, *, pid: int | None = None,
                 key: int | None = None) -> None:
        self.held = held
        self.registry = registry
        self.pid = pid
        self.key = key

    def __bool__(self) -> bool:
        return self.held

    def check(self, session: Session) -> None:
        """Raise LockLost unless this session's backend is the one holding the lock."""
        if self.pid is None or self.key is None:
            return
        hi, lo = (self.key >> 32) & 0xFFFFFFFF, self.key & 0xFFFFFFFF
        ours = session.execute(text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
            "AND classid = :hi AND objid = :lo AND database = (SELECT oid FROM pg_database "
            "WHERE datname = current_database()) AND pid = :pid AND pid = pg_backend_pid()"),
            {"hi": hi, "lo": lo, "pid": self.pid}).scalar()
        if not ours:
            raise LockLost(f"lock: this process no longer holds advisory lock {self.key} (connection lost); "
                           "nothing was written")


@contextmanager
def advisory_lock(registry: Registry, name: str) -> Iterator[bool]:
    """Yields True when this process holds the lock, False when another one does (never blocks).
    Unfenced: work done on other connections is not stopped if the lock is lost; use `fenced_lock`
    where two holders acting at once would do harm (the rollout controller)."""
    with fenced_lock(registry, name) as held:
        yield bool(held)


@contextmanager
def fenced_lock(registry: Registry, name: str) -> Iterator[HeldLock]:
    """Yields a HeldLock: true when this process holds the lock, false when another does (never blocks).
    Do the locked work through `held.registry` so it is fenced (see HeldLock)."""
    if not registry.is_postgres:
        yield HeldLock(True, registry)
        return
    key = lock_key(name)
    with registry.engine.connect() as conn:
        got = bool(conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}))
        pid = int(conn.scalar(text("SELECT pg_backend_pid()")))
        conn.commit()
        if not got:
            yield HeldLock(False, registry)
            return
        held = HeldLock(True, registry, pid=pid, key=key)
        try:
            with registry.bound_to(conn, before_commit=held.check):
                yield held
        finally:
            try:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
            except Exception:  # the connection is gone, and the server released the lock with it
                log.info("advisory lock %s: connection lost before unlock (the server released it)", name)


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
