"""Client-side bounds on every database call (issue 15), configured by CHIMERA_DB_* (the registry
section of chimera.settings). The hung-server test runs its OWN throwaway PostgreSQL (never the
session's shared one): it stops the postmaster and every backend with SIGSTOP, so the kernel still
accepts connections and acknowledges bytes while nothing answers, the fault that connect timeouts and
keepalives alone never catch. Registry calls must fail within the configured timeouts, and work again
once the server is continued."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError

from chimera.settings import RegistrySettings
from registry import Registry
from registry.engine import make_engine
from tests.harness import midday, wait_for
from tests.pg import PostgresServer, continue_all

# Python 3.11.7's AST validator can raise a false "AST constructor recursion depth mismatch" when
# hypothesis' pytest plugin first imports this module (assertion-rewritten) in its terminal summary, after
# this file's tests ran: the session then exits 1 with every test passed. Importing it up front avoids it.
with contextlib.suppress(ImportError):
    import hypothesis.internal.observability  # noqa: F401

QUERY_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 2.0


def registry_for(url: str, **overrides: float) -> Registry:
    settings = RegistrySettings(url=url, connect_timeout_s=CONNECT_TIMEOUT_S, query_timeout_s=QUERY_TIMEOUT_S,
                                **overrides)
    return Registry(url, engine=make_engine(url, settings=settings))


def timed(call) -> tuple[float, BaseException | None]:  # noqa: ANN001
    t0 = time.monotonic()
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - returned for the assertions
        return time.monotonic() - t0, exc
    return time.monotonic() - t0, None


def timed_in_thread(call, limit: float) -> tuple[float, BaseException | None]:  # noqa: ANN001
    """`timed` on a daemon thread given `limit` seconds: a call that never returns fails the test
    (instead of hanging the session with the server stopped)."""
    out: list[tuple[float, BaseException | None]] = []
    worker = threading.Thread(target=lambda: out.append(timed(call)), daemon=True)
    worker.start()
    worker.join(limit)
    assert out, f"the call was still blocked after {limit:.0f} s with the server hung"
    return out[0]


def test_hung_postgres_fails_registry_calls_within_the_timeouts(own_postgres: PostgresServer,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    url = own_postgres.create_database()
    reg = registry_for(url)
    reg.upgrade()
    reg.publish_version("m", b"v1", ["a"], status="production")
    reg.set_split("m", {1: 100}, expected_revision=0, actor="test")
    assert reg.get_split("m").weights == {1: 100}  # a pooled connection exists, pre-ping included

    pids = own_postgres.pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        # A pooled connection: pre-ping gets no answer (query timeout), the reconnect gets no
        # handshake (connect timeout): at most one of each, plus slack for a loaded 2-core machine.
        bound = QUERY_TIMEOUT_S + CONNECT_TIMEOUT_S + 3.0
        elapsed, exc = timed(lambda: reg.get_split("m"))
        assert isinstance(exc, OperationalError), exc
        assert elapsed < bound, f"read took {elapsed:.1f} s with the server hung"
        elapsed, exc = timed(lambda: reg.set_split("m", {1: 100}, expected_revision=1, actor="t"))
        assert isinstance(exc, OperationalError), exc
        assert elapsed < bound, f"write took {elapsed:.1f} s with the server hung"
        # A new process's first connection: bounded by the connect timeout.
        fresh = registry_for(url)
        elapsed, exc = timed(lambda: fresh.get_split("m"))
        assert isinstance(exc, OperationalError), exc
        assert "CHIMERA_DB_CONNECT_TIMEOUT_S" in str(exc) or "timeout" in str(exc).lower()
        assert elapsed < CONNECT_TIMEOUT_S + 3.0, f"connect took {elapsed:.1f} s with the server hung"
        fresh.dispose()
        # A psycopg2 connection no engine made (the gateway's LISTEN connection is one): the
        # environment's connect timeout still applies (libpq's own is off once a wait callback is set).
        import psycopg2

        from registry import engine as engine_mod

        monkeypatch.setattr(engine_mod, "_default_timeouts", (CONNECT_TIMEOUT_S, QUERY_TIMEOUT_S))
        elapsed, exc = timed(lambda: psycopg2.connect(host="127.0.0.1", port=own_postgres.port,
                                                      user="postgres", dbname="postgres"))
        assert isinstance(exc, psycopg2.OperationalError), exc
        assert elapsed < CONNECT_TIMEOUT_S + 3.0, f"raw connect took {elapsed:.1f} s with the server hung"
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    # The server answers again: the same registry recovers without a restart.
    deadline = time.monotonic() + 30
    while True:
        try:
            assert reg.get_split("m").weights == {1: 100}
            break
        except OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    reg.dispose()


def test_prediction_log_copy_on_a_hung_postgres_fails_within_the_timeouts_then_writes_again(
        own_postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The log's bulk path (binary COPY on psycopg 3 connections, registry.copy_conn) has the same
    bounds as the engine: a batch to a hung server fails within the query timeout (a pooled connection)
    or the connect timeout (a new one), never blocks the writer, and the same Inserter writes again once
    the server is continued. The failed batches stored nothing (the writer keeps and retries them)."""
    monkeypatch.setenv("CHIMERA_DB_QUERY_TIMEOUT_S", str(QUERY_TIMEOUT_S))
    monkeypatch.setenv("CHIMERA_DB_CONNECT_TIMEOUT_S", str(CONNECT_TIMEOUT_S))
    from gateway.records.inserter import Inserter

    url = own_postgres.create_database()
    reg = registry_for(url)
    reg.upgrade()
    ins = Inserter(reg)
    ts = ins.timestamp(midday())

    def rows(tag: str, n: int) -> list[tuple]:
        return [(f"{tag}-{i}", "m", 1, "k", 0.5, 1.0, ts, b"\0\0\0\0", None, False, None) for i in range(n)]

    assert ins.insert(rows("before", 4000)) == 4000  # two pooled COPY connections exist now
    pids = own_postgres.pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        for tag, n, bound in (("paired", 4000, QUERY_TIMEOUT_S + CONNECT_TIMEOUT_S + 3.0),
                              ("single", 10, CONNECT_TIMEOUT_S + QUERY_TIMEOUT_S + 3.0)):
            elapsed, exc = timed_in_thread(lambda tag=tag, n=n: ins.insert(rows(tag, n)), bound + 5)
            assert exc is not None and type(exc).__name__ in {"OperationalError", "ConnectionTimeout"}, exc
            assert elapsed < bound, f"{tag} COPY took {elapsed:.1f} s with the server hung"
    finally:
        continue_all(pids)
    after: list[int] = []

    def written_after() -> bool:
        try:
            after.append(ins.insert(rows("after", 4000)) or 0)
        except Exception:  # noqa: BLE001 - the server is still waking: the writer would retry too
            return False
        return True

    wait_for(written_after, timeout=30, what="the same Inserter writing once the server is continued",
             every=0.5)
    assert after == [4000]
    with reg.session() as s:
        stored = dict(s.execute(text("SELECT split_part(request_id, '-', 1), count(*) FROM predictions "
                                     "GROUP BY 1")).all())
    assert stored == {"before": 4000, "after": 4000}
    reg.dispose()


def test_statement_and_lock_timeouts_are_set_on_postgres(postgres: PostgresServer) -> None:
    """The server-side bounds reach every connection: a slow statement is cancelled, a lock wait ends."""
    url = postgres.create_database()
    reg = registry_for(url, statement_timeout_s=1.0, lock_timeout_s=0.5)
    reg.upgrade()
    with reg.session() as s:
        shown = {k: s.execute(text(f"SHOW {k}")).scalar() for k in
                 ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")}
    assert shown == {"statement_timeout": "1s", "lock_timeout": "500ms",
                     "idle_in_transaction_session_timeout": "1min"}
    # The prediction log's COPY connections (registry.copy_conn) get the same server-side bounds.
    from registry.copy_conn import CopyConnections

    copy_settings = RegistrySettings(url=url, statement_timeout_s=1.0, lock_timeout_s=0.5)
    copies = CopyConnections(url, settings=copy_settings)
    lease = copies.connect()
    with lease.cursor() as cur:
        copy_shown = {k: cur.execute(f"SHOW {k}").fetchone()[0] for k in shown}
    lease.rollback()
    lease.close()
    copies.close()
    assert copy_shown == shown
    elapsed, exc = timed(lambda: reg.session().execute(text("SELECT pg_sleep(10)")))
    assert isinstance(exc, DBAPIError) and "statement timeout" in str(exc), exc
    assert elapsed < 5
    reg.publish_version("m", b"v1", ["a"])
    with reg.transaction() as holder:  # holds the model row lock
        holder.execute(text("SELECT id FROM models WHERE name = 'm' FOR UPDATE"))
        other = registry_for(url, lock_timeout_s=0.5)
        elapsed, exc = timed(lambda: other.set_split("m", {1: 100}, expected_revision=0, actor="t"))
        other.dispose()
    assert isinstance(exc, DBAPIError) and "lock timeout" in str(exc), exc
    assert elapsed < 5
    reg.dispose()


def test_sqlite_busy_timeout_bounds_waiting_for_another_writer(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    reg = registry_for(url, sqlite_busy_timeout_s=1.0)
    reg.upgrade()
    reg.publish_version("m", b"v1", ["a"])
    blocker = sqlite3.connect(tmp_path / "r.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        elapsed, exc = timed(lambda: reg.set_split("m", {1: 100}, expected_revision=0, actor="t"))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert isinstance(exc, OperationalError) and "locked" in str(exc), exc
    assert 0.8 < elapsed < 5
    assert reg.set_split("m", {1: 100}, expected_revision=0, actor="t").revision == 1
    reg.dispose()


def test_db_settings_from_the_environment() -> None:
    s = RegistrySettings.from_env({"CHIMERA_DB_CONNECT_TIMEOUT_S": "3", "CHIMERA_DB_QUERY_TIMEOUT_S": "7.5",
                                   "CHIMERA_DB_STATEMENT_TIMEOUT_S": "20", "CHIMERA_DB_LOCK_TIMEOUT_S": "0",
                                   "CHIMERA_DB_POOL_TIMEOUT_S": "4", "CHIMERA_DB_KEEPALIVES_COUNT": "3",
                                   "CHIMERA_DB_SQLITE_BUSY_TIMEOUT_S": "9"})
    assert (s.connect_timeout_s, s.query_timeout_s, s.statement_timeout_s, s.lock_timeout_s,
            s.pool_timeout_s, s.keepalives_count, s.sqlite_busy_timeout_s) == (3, 7.5, 20, 0, 4, 3, 9)
    from registry.engine import postgres_connect_args

    args = postgres_connect_args(s, statement_timeout_ms=30_000)
    assert args["connect_timeout"] == 3 and args["keepalives_count"] == 3
    assert "-c statement_timeout=20000" in args["options"] and "lock_timeout" not in args["options"]
    # Unset: the process's own statement default (the gateway's 30 s) applies.
    assert "-c statement_timeout=30000" in postgres_connect_args(RegistrySettings(), 30_000)["options"]
    for name, bad in (("CHIMERA_DB_QUERY_TIMEOUT_S", "soon"), ("CHIMERA_DB_CONNECT_TIMEOUT_S", "-1"),
                      ("CHIMERA_DB_KEEPALIVES_COUNT", "0")):
        with pytest.raises(ValueError, match=name):
            RegistrySettings.from_env({name: bad})
