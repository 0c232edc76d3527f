"""The prediction log's durability half (a base class of gateway.records.prediction_log.PredictionLog,
split out to keep each module readable): writing rows through the row store (bad rows bisected to the
dead-letter file), spilling what the database cannot take, holding rows in memory when the disk
refuses too, replaying the spill, and a stop() that never waits on a hung database.

The contract it keeps: every row the request path accepted is, while the process lives, in the
database, in a spill segment (fsynced), in the dead-letter file with its reason, or held in memory
(`stats.held`, and then new rows are refused). On SIGTERM the held and queued rows go to the spill
file even when the database hangs; rows are lost only when the disk fails too (`stats.dropped`, logged
as errors). SIGKILL loses what was queued in memory (README, Durability)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gateway.records.inserter import Inserter, Row, legacy_row, portable, widen
from gateway.records.rowstore import RowsNotStored, RowStore, parse_spill_line
from gateway.records.spill import SpillFiles, SpillUnavailable

log = logging.getLogger("gateway.records.prediction_log")
_STOP = object()


@dataclass
class LogStats:
    queued: int = 0  # rows accepted from the request path
    inserted: int = 0
    spilled: int = 0  # rows written to the spill file (back-pressure or database down)
    backpressure: int = 0  # of those, rows diverted because the queue was over max_queue
    replayed: int = 0
    insert_failures: int = 0
    # Spill writes the disk refused, by reason: full (ENOSPC), limit (spill_max_bytes), io.
    spill_failures: dict[str, int] = field(default_factory=lambda: {"full": 0, "limit": 0, "io": 0})
    refused: int = 0  # calls check_accepting() refused (RESOURCE_EXHAUSTED) while rows could not be kept
    held: int = 0  # rows the writer holds in memory now because neither the database nor the disk took them
    dropped: int = 0  # rows lost: stop() could not spill them, or no writer ran and the disk refused
    stop_spilled: int = 0  # rows stop() spilled itself because the database was hung or down
    partition_failures: int = 0  # day-partition upkeep attempts that failed (PostgreSQL; each logged)


class _Barrier:
    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = threading.Event()


class DurableWriter:
    """Needs the attributes PredictionLog.__init__ sets (queue, thread, store, files, stats...)."""

    _queue: deque[Any]
    _thread: threading.Thread | None
    _wake: threading.Event
    _taken: int
    _held: list[Row]
    _inflight: list[Row] | None
    _inflight_lock: threading.Lock
    _abandoned: bool
    _inserter: Inserter
    _last_replay_try: float
    store: RowStore
    files: SpillFiles
    stats: LogStats
    batch_size: int

    def _rows_of(self, records: list[Any]) -> list[Row]:
        raise NotImplementedError

    def stop(self, timeout: float = 30.0, stall_s: float = 5.0) -> None:
        """Drain the queue (inserting or spilling every row) and stop the thread. The writer is watched,
        not trusted: when it makes no progress for `stall_s` (an insert hung on a stopped or hung
        database) or `timeout` passes, this thread takes the queue over and spills it, together with
        the rows of the insert still running (stored twice is fine: replay skips a stored identical
        row). So a queued row survives SIGTERM whenever the disk works."""
        thread = self._thread
        if thread is None:
            return
        self._queue.append(_STOP)
        self._wake.set()
        deadline = time.monotonic() + timeout
        seen, since = self._progress_mark(), time.monotonic()
        while thread.is_alive():
            thread.join(0.05)
            now = time.monotonic()
            mark = self._progress_mark()
            if mark != seen:
                seen, since = mark, now
            elif now - since > stall_s or now > deadline:
                self._take_over()
                break
        self._thread = None
        self._inserter.close()  # its idle COPY connections (a writer still stuck keeps its own)

    def _progress_mark(self) -> int:
        """What stop() calls progress: database answers. Not rows taken or spilled: a writer that fails
        each batch after the driver's connect timeout (5 s) and spills it is busy but not progressing,
        and waiting for it batch by batch held a SIGTERM for 32 s with 110k rows queued behind a hung
        PostgreSQL (tests/integration/test_hung_postgres.py); taking over spills them all at once."""
        return self.store.progress

    def _take_over(self) -> None:
        """The writer is stuck: spill what it holds, what it is inserting and everything queued."""
        with self._inflight_lock:
            self._abandoned = True
            rows = list(self._inflight or ()) + self._held
        self._held = []
        records: list[Any] = []
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, _Barrier):
                item.event.set()
            elif item is not _STOP:
                records.append(item)
        rows += self._rows_of(records)
        log.warning("prediction log: the database is not answering; spilling %d queued rows at shutdown",
                    len(rows))
        try:
            self._spill(rows)
            self.stats.stop_spilled += len(rows)
        except SpillUnavailable as exc:
            self.stats.dropped += len(rows)
            log.error("prediction log: %d rows lost at shutdown: the database is away and %s", len(rows), exc)

    def _write(self, rows: list[Row]) -> None:
        """Insert (bad rows bisected into the dead-letter file); rows the database cannot take now are
        spilled, or held when the disk refuses too."""
        if not rows:
            return
        with self._inflight_lock:
            if self._abandoned:  # stop() has taken over: no more waiting on the database
                self._spill_or_hold(rows)
                return
            self._inflight = rows
        try:
            self.store.store(rows)
        except RowsNotStored as exc:  # database down or unreachable: keep the rest locally
            self.stats.insert_failures += 1
            log.warning("prediction insert failed (%s); spilling %d rows to %s", exc, len(exc.rows),
                        self.spill_path)
            self._spill_or_hold(exc.rows)
        finally:
            with self._inflight_lock:
                self._inflight = None
            self.stats.inserted = self.store.inserted

    def _spill_or_hold(self, rows: list[Row]) -> None:
        try:
            self._spill(rows)
        except SpillUnavailable as exc:
            self._held.extend(rows)
            self.stats.held = len(self._held)
            log.error("prediction log: holding %d rows in memory (%s); new predictions are refused until "
                      "the database or the disk takes rows again", len(self._held), exc)

    def _retry_held(self) -> bool:
        """Try the held rows again (insert, else spill). True when none are left."""
        rows, self._held = self._held, []
        self._write(rows)
        self.stats.held = len(self._held)
        return not self._held

    def _spill(self, rows: list[Row]) -> None:
        """One JSON line per chunk of rows (a list of row arrays), fsynced; SpillUnavailable (counted)
        when the disk or the size bound refuses."""
        if not rows:
            return
        step = self.batch_size
        rows = portable(rows)  # packed feature vectors travel as JSON text
        text = "".join(json.dumps(rows[i:i + step]) + "\n" for i in range(0, len(rows), step))
        try:
            self.files.append(text)
        except SpillUnavailable as exc:
            self.stats.spill_failures[exc.reason] = self.stats.spill_failures.get(exc.reason, 0) + 1
            raise
        self.stats.spilled += len(rows)

    def _replay_spill(self) -> None:
        """Replay the spill segments, oldest first (gateway.records.rowstore). Rows are idempotent by
        request id, so a crash half-way through replays the rest next time without duplicates; bad
        rows and torn lines go to the dead-letter file instead of failing the replay."""
        self._last_replay_try = time.monotonic()
        if not self.files.has_data:
            return
        ts = self._inserter.timestamp
        try:
            n = self.store.replay(self.files, self.batch_size,
                                  lambda line: parse_spill_line(line, widen, lambda d: legacy_row(d, ts)))
        except RowsNotStored as exc:
            log.warning("spill replay deferred (%s); will retry", exc)
            return
        except Exception:
            log.exception("spill replay failed; will retry")
            return
        finally:
            self.stats.inserted = self.store.inserted
        self.stats.replayed += n
        if n:
            log.info("replayed %d spilled prediction rows", n)
