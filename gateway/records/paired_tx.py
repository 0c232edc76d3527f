"""Two transactions written at once on two connections and committed only when both are written: how the
prediction log's PostgreSQL inserts use both cores (issue 17).

Why: one batch on one connection is a serial chain, the writer encoding (~3-4 us a row) then the server
inserting (~11 us a row), so one core idles; PostgreSQL runs one statement on one core. Two halves on two
connections keep both busy: 67.7k -> 96.9k rows/s in back-to-back 20 s runs of `chimera log bench` on a
quiet machine (load average 1.3-1.5). On a machine whose other work already fills the cores it does not
help (49k against 58k at 97 % busy).

What it keeps: every statement still runs under the deadline callback of registry.engine (a hung server
fails the call); nothing is committed unless both halves were written, so a data error, a unique
violation or a timeout in either rolls back both, as one transaction would. What it cannot keep: if the
server dies between the two COMMITs, the first half is stored and the call still raises; the caller then
spills or retries the whole batch and the stored half is skipped by request id (the log's duplicate rule),
so nothing is lost or doubled, only counted as a replay. The caller must split rows so that a request id
appears in one half only (`halves`): otherwise the second half would wait on the first's uncommitted row
until the deadline."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")


class DaemonThreads(Executor):
    """Each task on a fresh daemon thread. Why not ThreadPoolExecutor: concurrent.futures joins its
    worker threads at interpreter exit, so a half stuck in a call to a hung PostgreSQL held the
    gateway's exit after SIGTERM for the whole query timeout (65.8 s against the 23 s bound of
    tests/integration/test_hung_postgres.py's SIGTERM test; the log's stop() had already spilled those
    rows). A daemon thread is abandoned at exit like the writer thread it helps. One thread start per
    batch of 2,000+ rows costs ~0.1 ms against the ~20 ms the batch takes to write."""

    def __init__(self, name: str) -> None:
        self.name = name

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        fut: Future[T] = Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                fut.set_exception(exc)

        threading.Thread(target=run, name=self.name, daemon=True).start()
        return fut


def halves(rows: Sequence[T], key: Callable[[T], Any]) -> tuple[list[T], list[T]]:
    """`rows` in two lists by the hash of `key(row)`, order kept within each: equal keys share a half."""
    first: list[T] = []
    second: list[T] = []
    for r in rows:
        (second if hash(key(r)) & 1 else first).append(r)
    return first, second


def write_both(connect: Callable[[], Any], write_a: Callable[[Any], int], write_b: Callable[[Any], int],
               pool: Executor) -> int:
    """Run write_a(cursor) here and write_b(cursor) on `pool`, each on its own connection from `connect`;
    commit both if both succeed (returns the sum of their counts), else roll both back and raise."""
    other = pool.submit(written, connect, write_b)
    try:
        conn_a, n_a = written(connect, write_a)
    except BaseException:
        try:
            end(other.result()[0], commit=False)
        except BaseException:
            pass  # it failed too: already rolled back and closed
        raise
    try:
        conn_b, n_b = other.result()
    except BaseException:
        end(conn_a, commit=False)
        raise
    try:
        end(conn_a, commit=True)
    except BaseException:
        end(conn_b, commit=False)
        raise
    end(conn_b, commit=True)
    return n_a + n_b


def written(connect: Callable[[], Any], write: Callable[[Any], int]) -> tuple[Any, int]:
    """A connection with `write(cursor)` done in an open transaction (rolled back and closed if it
    raises); `end` it. Also the prediction log's single-connection write (gateway.records.inserter)."""
    conn = connect()
    try:
        cur = conn.cursor()
        try:
            n = write(cur)
        finally:
            cur.close()
    except BaseException:
        end(conn, commit=False)
        raise
    return conn, n


def end(conn: Any, *, commit: bool) -> None:
    """Commit (re-raising its error after a rollback) or roll back; the connection is closed either way."""
    try:
        if commit:
            conn.commit()
        else:
            conn.rollback()
    except BaseException:
        if commit:
            try:
                conn.rollback()
            except Exception:
                pass
            raise
    finally:
        conn.close()
