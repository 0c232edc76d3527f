"""Prediction log writer: the request path only appends a record to an in-memory queue; a background
thread inserts rows in batches. Rows that cannot be inserted go to a local append-only spill file and
are replayed when the database answers again, so no accepted row is lost and none is duplicated
(inserts skip request ids already stored).

Costs, because this runs for every prediction:
- request path: one `deque.append` of a tuple (PredictBatch: one record per version group), no lock,
  no I/O, no formatting. It never blocks and never raises.
- writer thread: rows become DB-API parameter tuples and go through the driver's fastest batched path,
  bypassing ORM/Core per-row processing: SQLite `executemany` of one prepared INSERT (a C loop),
  PostgreSQL one INSERT ... SELECT FROM unnest(one array per column) per statement, big batches as two
  halves on two connections (gateway.records.inserter). Duplicated request ids are skipped as with ON
  CONFLICT (request_id) DO NOTHING. Other drivers fall back to `Registry.insert_predictions`.
- back-pressure: the queue is bounded by `max_queue` rows. When the writer finds more than that
  waiting (the database is slower than the traffic), it moves the excess to the spill file in bulk
  (much cheaper than inserting) and counts it in `stats.backpressure`; the rows come back through the
  replay later. Only if the writer thread is gone or the queue reaches twice `max_queue` does the
  request path spill itself (counted the same way).
- nothing accepted is lost (gateway.records.rowstore, gateway.records.spill): a row the database
  refuses for its content is bisected out of its batch into the dead-letter file (counted by reason),
  never blocking the rows behind it; a torn spill line is skipped and counted; spill files are bounded
  (`spill_max_bytes`), rotated and fsynced with their directory. When neither the database nor the
  disk takes rows, the writer holds them in memory (`stats.held`) and `check_accepting()` (called by
  the Predictor before scoring) refuses new calls with SpillUnavailable (RESOURCE_EXHAUSTED) instead of
  dropping anything; `stop()` never waits
  on a hung database: when the writer makes no progress for `stall_s` it spills the queue itself.
- feature rows (when sampled by the predictor) are written, a whole block's matrix in one call, as
  packed float32 vectors on both backends (PostgreSQL: a bytea column since migration 0008); spill
  lines carry JSON arrays of float32-exact numbers (gateway.records.inserter.portable; with orjson
  ~0.6 us a row; without it ~5 us; json.dumps of the doubles costs ~40 us).
- PostgreSQL's day partitions (migrations 0009 and 0011): at start, before the spill replay and the first
  batch (a row written before its day's table exists lands in DEFAULT, and then PostgreSQL refuses to make
  that table), and then every `partition_interval_s` (an hour) the writer makes the tables of today and
  the next two days, of predictions, shadow_predictions and request_errors
  (registry.partitions.ensure_days), between batches; a failure (e.g. a parent's lock not had within
  `partition_lock_timeout_s`, the database away) is logged, counted in `stats.partition_failures` and
  tried again after `partition_retry_s` (5 minutes). Rows never wait for it: a day without its table
  still takes rows (its table's DEFAULT partition).
The row format and the INSERT itself are gateway.records.inserter."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from gateway.records.feature_rows import features_json, matrix_json
from gateway.records.inserter import COLUMNS, Inserter, Row
from gateway.records.log_durability import _STOP, DurableWriter, LogStats, _Barrier
from gateway.records.rowstore import RowStore
from gateway.records.spill import DEFAULT_SEGMENT_BYTES, DEFAULT_SPILL_MAX_BYTES, SpillFiles, SpillUnavailable
from registry import Registry
from registry.partitions import ensure_days
from registry.repository import PredictionRow

log = logging.getLogger(__name__)
__all__ = ["COLUMNS", "LogStats", "PredictionLog", "Row", "SpillUnavailable", "features_json", "matrix_json"]


class _Block:
    """The rows of one PredictBatch version group: logged as one record."""

    __slots__ = ("ids", "model", "version", "keys", "scores", "latency_ms", "created", "features", "mask",
                 "split_revision", "pinned", "failed")

    def __init__(self, ids: list[str], model: str, version: int, keys: list[str], scores: list[float],
                 latency_ms: float, created: float, features: np.ndarray | None,
                 mask: np.ndarray | bool, split_revision: int | None = None, pinned: bool = False,
                 failed: int | None | list[int | None] = None) -> None:
        self.ids = ids
        self.model = model
        self.version = version
        self.keys = keys
        self.scores = scores
        self.latency_ms = latency_ms
        self.created = created
        self.features = features
        self.mask = mask
        self.split_revision = split_revision
        self.pinned = pinned
        self.failed = failed  # one failed version for the block, or one per row



class PredictionLog(DurableWriter):
    def __init__(
        self,
        registry: Registry,
        spill_path: Path,
        *,
        max_queue: int = 100_000,
        batch_size: int = 5000,
        flush_interval_s: float = 0.2,
        replay_interval_s: float = 2.0,
        spill_max_bytes: int = DEFAULT_SPILL_MAX_BYTES,
        spill_segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        dead_letter_path: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock`: the answer time of each row, epoch seconds (`chimera log bench --answered-at` sets
        it near midnight, where PostgreSQL's writer looks ids up on the neighbouring day)."""
        self.registry = registry
        self._clock = clock
        self.spill_path = Path(spill_path)
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.replay_interval_s = replay_interval_s
        self._queue: deque[Any] = deque()
        self._submitted = 0  # rows appended (request path only)
        self._taken = 0  # rows removed (writer thread only)
        self._wake = threading.Event()
        self._spill_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._inserter = Inserter(registry)
        self.stats = LogStats()
        self._last_replay_try = 0.0
        self.insert_rows: Callable[[Sequence[Row]], int | None] = self._inserter.insert  # tests swap it
        self.files = SpillFiles(self.spill_path, max_bytes=spill_max_bytes, segment_bytes=spill_segment_bytes)
        self.dead_letter_path = (Path(dead_letter_path) if dead_letter_path is not None
                                 else self.spill_path.with_suffix(".deadletter"))
        self.store = RowStore(registry, lambda rows: self.insert_rows(rows), self.dead_letter_path)
        self._held: list[Row] = []  # rows neither the database nor the disk took (writer thread only)
        self._inflight: list[Row] | None = None  # rows in the insert running now
        self._inflight_lock = threading.Lock()
        self._abandoned = False  # stop() took over from a hung writer
        self._refusing_until = 0.0  # monotonic time until which check_accepting refuses (spill failed)
        self.partition_interval_s = 3600.0  # PostgreSQL: how often the writer makes the next days' tables
        self.partition_lock_timeout_s = 2.0  # the longest one attempt may hold the writer (and the table) up
        self.partition_retry_s = 300.0  # after a failed attempt (the database away at start, a lock)
        self._next_partition_check = 0.0  # monotonic

    # -------------------------------------------------------------- request path
    def log_one(self, request_id: str, model: str, version: int, routing_key: str, score: float,
                latency_ms: float, features: np.ndarray | Sequence[float] | None = None,
                split_revision: int | None = None, pinned: bool = False,
                failed_version: int | None = None) -> None:
        """Queue one prediction. `features`: the scored row in the version's schema order, or None;
        `split_revision`, `pinned`, `failed_version`: see gateway.records.inserter.Row."""
        self._append((request_id, model, version, routing_key, score, latency_ms, self._clock(), features,
                      split_revision, pinned, failed_version), 1)

    def log_many(self, request_ids: list[str], model: str, version: int, routing_keys: list[str],
                 scores: list[float], latency_ms: float, features: np.ndarray | None = None,
                 mask: np.ndarray | bool = True, split_revision: int | None = None, pinned: bool = False,
                 failed_version: int | None | list[int | None] = None) -> None:
        """Queue the rows of one batch (same model and version). `features` [n, width] with `mask`
        choosing which rows keep theirs (True: all, False: none, or a boolean array);
        `failed_version` one for all rows or a list with one per row."""
        if request_ids:
            self._append(_Block(request_ids, model, version, routing_keys, scores, latency_ms, self._clock(),
                                features, mask, split_revision, pinned, failed_version), len(request_ids))

    def log_error(self, request_id: str, model: str, version: int, routing_key: str, latency_ms: float,
                  error: str, split_revision: int | None = None, pinned: bool = False) -> None:
        """Queue a request that failed entirely on `version` (a request_errors row: the rollout's error
        guardrail counts it against that version)."""
        self._append((request_id, model, version, routing_key, 0.0, latency_ms, self._clock(), None,
                      split_revision, pinned, None, error[:1000]), 1)

    def submit(self, row: PredictionRow) -> None:
        """Queue one PredictionRow (the general form; the gateway uses log_one/log_many)."""
        created = row.created_at.timestamp() if row.created_at else self._clock()
        self._append((row.request_id, row.model, row.version, row.routing_key, row.score, row.latency_ms,
                      created, row.features, None, False, None), 1)

    def check_accepting(self) -> None:
        """SpillUnavailable (RESOURCE_EXHAUSTED to the caller) when a new prediction could not be kept:
        rows are held in memory because neither the database nor the disk takes them, or the request
        path's own spill failed in the last second. The Predictor calls it before scoring, so a refused
        caller was not scored and hears why; log_one/log_many/log_error never raise (they also run in
        done-callbacks, where an exception would leave a stream row unanswered)."""
        if self._held or (self._refusing_until and time.monotonic() < self._refusing_until):
            self.stats.refused += 1
            raise SpillUnavailable("prediction log: the database is not taking rows and the local spill "
                                   "is full; retry later", "full")

    def _append(self, record: Any, n: int) -> None:
        depth = self._submitted - self._taken
        if depth + n > 2 * self.max_queue or self._thread is None or not self._thread.is_alive():
            # The writer cannot keep up at all (or is not running): keep the row on disk now.
            rows = self._rows_of([record])
            try:
                self._spill(rows)
                self.stats.backpressure += len(rows)
                return
            except SpillUnavailable as exc:
                self._refusing_until = time.monotonic() + 1.0  # check_accepting refuses meanwhile
                if self._thread is None or not self._thread.is_alive():
                    self.stats.dropped += len(rows)
                    log.error("prediction log: %d rows lost: no writer running and %s", len(rows), exc)
                    return
                # The writer lives: the row waits in memory; new calls are refused until it catches up.
        self._queue.append(record)
        self._submitted += n
        self.stats.queued += n

    @property
    def has_spill(self) -> bool:
        return self.files.has_data

    @property
    def _replaying_path(self) -> Path:
        return self.files.replaying

    @property
    def depth(self) -> int:
        return max(0, self._submitted - self._taken)

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._loop, name="chimera-prediction-log", daemon=True)
        self._thread.start()

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Block until every row submitted before this call is stored or spilled."""
        if self._thread is None or not self._thread.is_alive():
            return False
        barrier = _Barrier()
        self._queue.append(barrier)
        self._wake.set()
        return barrier.event.wait(timeout)

    # -------------------------------------------------------------- writer thread
    def _loop(self) -> None:
        self._keep_partitions()  # first: rows written before their day's table exists stay in DEFAULT
        self._replay_spill()
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            if self._abandoned:
                return
            try:
                if self._held and not self._retry_held():
                    continue  # neither store takes rows: leave the queue where it is (the caller is refused)
                if self._drain():
                    return
            except Exception:  # never let the writer die: the request path would spill every row
                log.exception("prediction log writer failed; continuing")
            if self.has_spill and self.depth < self.batch_size and \
                    time.monotonic() - self._last_replay_try > self.replay_interval_s:
                self._replay_spill()
            if time.monotonic() >= self._next_partition_check:  # hourly; after a failure, sooner
                self._keep_partitions()

    def _keep_partitions(self) -> None:
        """PostgreSQL: make today's and the next two days' partitions if missing (registry.partitions).
        Never raises: a failure is logged with its reason and tried again at the next check. One attempt
        holds the writer up by a catalog read and at most partition_lock_timeout_s for a CREATE (one that
        times out ends the attempt); a hung database holds it up as long as it would hold up an insert."""
        if not self.registry.is_postgres:
            self._next_partition_check = float("inf")  # SQLite: one table, nothing to keep
            return
        self._next_partition_check = time.monotonic() + self.partition_interval_s
        try:
            made = ensure_days(self.registry, datetime.now(UTC).date(), 3, self.partition_lock_timeout_s)
        except Exception as exc:  # the database down, a lock not had in time, a day refused: rows go on
            self.stats.partition_failures += 1
            self._next_partition_check = time.monotonic() + self.partition_retry_s
            log.warning("prediction log: partition upkeep failed, trying again in %g s: %s",
                        self.partition_retry_s, exc)
            return
        if made:
            log.info("prediction log: made partitions %s", ", ".join(made))

    def _drain(self) -> bool:
        """Write everything queued now. True when the stop marker was reached."""
        q = self._queue
        over = self.depth - self.max_queue  # rows beyond the bound: spill them rather than insert
        records: list[Any] = []
        n_rows = 0
        while q:
            item = q.popleft()
            if item is _STOP:
                self._write_records(records, n_rows, over)
                return True
            if isinstance(item, _Barrier):
                self._write_records(records, n_rows, over)
                over -= n_rows
                records, n_rows = [], 0
                item.event.set()
                continue
            n = len(item.ids) if isinstance(item, _Block) else 1
            self._taken += n
            records.append(item)
            n_rows += n
            if n_rows >= self.batch_size:
                self._write_records(records, n_rows, over)
                over -= n_rows
                records, n_rows = [], 0
        self._write_records(records, n_rows, over)
        return False

    def _write_records(self, records: list[Any], n_rows: int, over: int) -> None:
        if not records:
            return
        rows = self._rows_of(records)
        if over > 0:
            k = min(over, len(rows))
            self.stats.backpressure += k
            self._spill_or_hold(rows[-k:])  # the newest excess waits on disk; the oldest rows go in first
            rows = rows[:-k]
        self._write(rows)

    def _rows_of(self, records: list[Any]) -> list[Row]:
        rows: list[Row] = []
        ts = self._inserter.timestamp
        encode = self._inserter.encode_matrix
        singles: list[int] = []  # positions of unary rows whose features are a numpy row
        single_features: list[np.ndarray] = []
        for rec in records:
            if isinstance(rec, _Block):
                n = len(rec.ids)
                feats: list[str | None]
                if rec.features is None or rec.mask is False:
                    feats = [None] * n
                elif rec.mask is True:
                    feats = encode(rec.features)
                else:
                    feats = [None] * n
                    keep = np.flatnonzero(rec.mask)
                    for i, value in zip(keep.tolist(), encode(rec.features[keep]), strict=True):
                        feats[i] = value
                # zip builds the tuples in C: a block's rows cost no Python bytecode each.
                failed = rec.failed if isinstance(rec.failed, list) else repeat(rec.failed)
                rows.extend(zip(rec.ids, repeat(rec.model), repeat(rec.version), rec.keys, rec.scores,
                                repeat(rec.latency_ms), repeat(ts(rec.created)), feats,
                                repeat(rec.split_revision), repeat(rec.pinned), failed))
            else:
                f = rec[7]
                if isinstance(f, np.ndarray):
                    singles.append(len(rows))
                    single_features.append(f)
                    f = None
                elif f is not None:
                    f = features_json(f)
                rows.append((rec[0], rec[1], rec[2], rec[3], rec[4], rec[5], ts(rec[6]), f, *rec[8:]))
        if singles:  # encode the unary rows' features as one matrix (same width within a version)
            by_width: dict[int, list[int]] = {}
            for j, feat in enumerate(single_features):
                by_width.setdefault(len(feat), []).append(j)
            for js in by_width.values():
                texts = encode(np.stack([single_features[j] for j in js]))
                for j, text in zip(js, texts, strict=True):
                    r = rows[singles[j]]
                    rows[singles[j]] = (*r[:7], text, *r[8:])
        return rows
