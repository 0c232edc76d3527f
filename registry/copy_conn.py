"""psycopg 3 connections to the registry's PostgreSQL for binary COPY, bounded like the engine's (issue 17).

Why a second driver: the prediction log's bulk path is binary COPY, which takes ~25 % less server CPU a
row than the unnest INSERT (no SQL to lex, no array or hex literals to parse: 9.0 against 11.8-13.6 us a
row; 103-107k against 75k rows/s over 60 s through the writer on this machine, two connections each,
measured 2026-12-05, docs/performance.md). The
engine's psycopg2 connections cannot COPY: psycopg2 refuses COPY in the "green" mode whose wait callback
bounds every call on a hung server (registry.engine). psycopg 3 can, and its connect honours
`connect_timeout` itself, but it has no client-side bound on a statement's answer either.

The bound here: `deadline` arms a timer around each call; when it fires it shuts the connection's socket
down (shutdown(2) on a duplicate of its descriptor), which wakes the thread waiting on the server with
an error whether the server is gone, wedged or SIGSTOPped (the kernel still acknowledges every byte of a
stopped server, so neither keepalives nor the server's timeouts help, as for the engine). The call then
raises psycopg.OperationalError naming CHIMERA_DB_QUERY_TIMEOUT_S, and the connection is broken and
dropped (`CopyConnections` never lends a broken one again). No library here does this: psycopg_pool
bounds waiting for a connection, not a statement's answer.

The connections take the engine's libpq parameters (registry.engine.postgres_connect_args: keepalives,
statement/lock/idle-in-transaction timeouts) and the same URL (password from the URL or PGPASSWORD)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import make_url

from chimera.settings import RegistrySettings
from registry.engine import SERVING_STATEMENT_TIMEOUT_MS, postgres_connect_args


def conninfo(url: str, settings: RegistrySettings, statement_timeout_ms: int | None) -> dict[str, Any]:
    """psycopg.connect keyword arguments for a SQLAlchemy PostgreSQL URL, with the engine's bounds."""
    u = make_url(url)
    given = u.translate_connect_args(username="user", database="dbname")
    args: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    args.update({k: v for k, v in u.query.items() if isinstance(v, str)})
    args.update(postgres_connect_args(settings, statement_timeout_ms))
    return args


@contextmanager
def deadline(conn: Any, seconds: float | None) -> Iterator[None]:
    """Bound one call on `conn`: past `seconds` its socket is shut down and the call raises
    psycopg.OperationalError naming CHIMERA_DB_QUERY_TIMEOUT_S. None or 0: no bound."""
    import psycopg

    if not seconds:
        yield
        return
    fired = threading.Event()
    state = threading.Lock()  # the call's end and the timer's firing exclude each other
    done = False

    def fire() -> None:
        with state:
            if done:
                return  # the call ended first: its connection may already be lent to someone else
            fired.set()
            try:
                fd = os.dup(conn.fileno())
            except (OSError, psycopg.Error):
                return  # already closed: the call has failed by itself
            s = socket.socket(fileno=fd)
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            finally:
                s.close()

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except psycopg.Error as exc:
        if fired.is_set():
            raise psycopg.OperationalError(
                f"could not receive data from server: no answer within {seconds:g} s "
                "(CHIMERA_DB_QUERY_TIMEOUT_S)") from exc
        raise
    finally:
        timer.cancel()
        with state:
            done = True
    if fired.is_set():  # fired just as the call finished: the socket is shut, do not reuse it
        conn.close()


class Lease:
    """A DB-API-shaped handle on one pooled connection (cursor/commit/rollback/close, as
    gateway.records.paired_tx expects): commit and rollback are bounded; close returns the connection
    to its pool when it is idle and whole, and closes it otherwise."""

    def __init__(self, pool: CopyConnections, conn: Any) -> None:
        self.pool, self.conn = pool, conn

    def cursor(self) -> Any:
        return self.conn.cursor()

    def commit(self) -> None:
        with deadline(self.conn, self.pool.query_timeout_s):
            self.conn.commit()

    def rollback(self) -> None:
        if self.conn.closed:
            return
        with deadline(self.conn, self.pool.query_timeout_s):
            self.conn.rollback()

    def close(self) -> None:
        self.pool.give_back(self.conn)


class CopyConnections:
    """A few psycopg 3 connections kept open for one writer (at most `size` idle; more are opened when
    asked and closed when given back). Thread-safe: the paired writes lease two at once.

    A connection idle for `ping_after_s` is pinged (SELECT 1, bounded) before it is lent, and
    replaced when the server does not answer: after a PostgreSQL restart or failover, the first batch
    would otherwise fail on a dead socket and be spilled for a later replay (the engine's pool does the
    same with pre_ping). Under load the writer never waits that long between batches, so no ping runs."""

    def __init__(self, url: str, *, settings: RegistrySettings | None = None,
                 statement_timeout_ms: int | None = SERVING_STATEMENT_TIMEOUT_MS, size: int = 2,
                 ping_after_s: float = 5.0) -> None:
        cfg = settings or RegistrySettings.from_env()
        self.args = conninfo(url, cfg, statement_timeout_ms)
        self.query_timeout_s = cfg.query_timeout_s or None
        self.size = size
        self.ping_after_s = ping_after_s
        self._idle: list[tuple[Any, float]] = []  # (connection, monotonic time it was given back)
        self._lock = threading.Lock()

    def connect(self) -> Lease:
        """An idle connection that answers, or a new one (connect_timeout bounds it; psycopg raises
        OperationalError when the server is away)."""
        import psycopg

        while True:
            with self._lock:
                conn, since = self._idle.pop() if self._idle else (None, 0.0)
            if conn is None:
                return Lease(self, fast_bytea(psycopg.connect(**self.args)))
            if time.monotonic() - since < self.ping_after_s or self._answers(conn):
                return Lease(self, conn)
            conn.close()

    def _answers(self, conn: Any) -> bool:
        import psycopg

        try:
            with deadline(conn, self.query_timeout_s):
                conn.execute("SELECT 1")
                conn.rollback()
        except psycopg.Error:
            return False
        return not conn.closed

    def give_back(self, conn: Any) -> None:
        from psycopg.pq import TransactionStatus

        whole = not conn.closed and not conn.broken and conn.info.transaction_status == TransactionStatus.IDLE
        with self._lock:
            if whole and len(self._idle) < self.size:
                self._idle.append((conn, time.monotonic()))
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()


def fast_bytea(conn: Any) -> Any:
    """`conn` with bytes dumped to bytea by psycopg's C dumper. The binary COPY names its column types
    (`set_types`), which picks the dumper registered last for bytea's oid: psycopg.dbapi20's Python
    BinaryBinaryDumper (for its `Binary` wrapper). Registering the plain bytes dumper again on this
    connection's adapters puts the C one back: the writer's CPU a row in copy_rows fell from 1.14 to
    0.83 us (100k rows, 32 packed features, measured on this machine)."""
    from psycopg.types.string import BytesBinaryDumper

    conn.adapters.register_dumper(bytes, BytesBinaryDumper)
    return conn
