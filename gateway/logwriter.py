"""Prediction log writer: the request path only appends to a bounded queue; a background thread
inserts rows in batches. Rows that cannot be inserted (queue full, database down) go to a local
append-only spill file and are replayed when the database answers again, so no accepted row is
lost and none is duplicated (inserts skip request ids already stored)."""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from registry import Registry
from registry.repository import PredictionRow

log = logging.getLogger(__name__)


@dataclass
class LogStats:
    queued: int = 0
    inserted: int = 0
    spilled: int = 0
    replayed: int = 0
    insert_failures: int = 0


class _Barrier:
    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = threading.Event()


class PredictionLog:
    def __init__(
        self,
        registry: Registry,
        spill_path: Path,
        *,
        max_queue: int = 200_000,
        batch_size: int = 2000,
        flush_interval_s: float = 0.2,
        replay_interval_s: float = 2.0,
    ) -> None:
        self.registry = registry
        self.spill_path = Path(spill_path)
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.replay_interval_s = replay_interval_s
        self._queue: queue.Queue[PredictionRow | _Barrier | None] = queue.Queue(maxsize=max_queue)
        self._spill_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.stats = LogStats()
        self._last_replay_try = 0.0

    # -------------------------------------------------------------- request path
    def submit(self, row: PredictionRow) -> None:
        """Never blocks and never raises: a full queue sends the row to the spill file instead."""
        try:
            self._queue.put_nowait(row)
            self.stats.queued += 1
        except queue.Full:
            self._spill([row])

    @property
    def has_spill(self) -> bool:
        return self.spill_path.exists() or self._replaying_path.exists()

    @property
    def _replaying_path(self) -> Path:
        return self.spill_path.with_suffix(self.spill_path.suffix + ".replaying")

    @property
    def depth(self) -> int:
        return self._queue.qsize()

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
        self._queue.put(barrier)
        return barrier.event.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Drain the queue (inserting or spilling every row) and stop the thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    # -------------------------------------------------------------- writer thread
    def _loop(self) -> None:
        self._replay_spill()
        batch: list[PredictionRow] = []
        barriers: list[_Barrier] = []
        stopping = False
        while not stopping:
            deadline = time.monotonic() + self.flush_interval_s
            while len(batch) < self.batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                if isinstance(item, _Barrier):
                    barriers.append(item)
                    break
                batch.append(item)
            if batch:
                self._write(batch)
                batch = []
            for b in barriers:
                b.event.set()
            barriers = []
            if self.has_spill and time.monotonic() - self._last_replay_try > self.replay_interval_s:
                self._replay_spill()
        # Drain what arrived after the stop marker.
        rest: list[PredictionRow] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, PredictionRow):
                rest.append(item)
            elif isinstance(item, _Barrier):
                barriers.append(item)
        if rest:
            self._write(rest)
        for b in barriers:
            b.event.set()

    def _write(self, rows: list[PredictionRow]) -> None:
        try:
            self.registry.insert_predictions(rows)
            self.stats.inserted += len(rows)
        except Exception as exc:  # database down or unreachable: keep the rows locally
            self.stats.insert_failures += 1
            log.warning("prediction insert failed (%s); spilling %d rows to %s", type(exc).__name__,
                        len(rows), self.spill_path)
            self._spill(rows)

    def _spill(self, rows: list[PredictionRow]) -> None:
        lines = "".join(json.dumps(_encode(r)) + "\n" for r in rows)
        with self._spill_lock, open(self.spill_path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        self.stats.spilled += len(rows)

    def _replay_spill(self) -> None:
        """Move the spill file aside, insert it in batches, delete it. Rows are idempotent by request
        id, so a crash half-way through replays the rest next time without duplicates."""
        self._last_replay_try = time.monotonic()
        replaying = self._replaying_path
        with self._spill_lock:
            if self.spill_path.exists() and not replaying.exists():
                os.replace(self.spill_path, replaying)
        if not replaying.exists():
            return
        try:
            with open(replaying, encoding="utf-8") as f:
                rows = [_decode(json.loads(line)) for line in f if line.strip()]
            for i in range(0, len(rows), self.batch_size):
                self.registry.insert_predictions(rows[i:i + self.batch_size])
            replaying.unlink()
            self.stats.replayed += len(rows)
            log.info("replayed %d spilled prediction rows", len(rows))
        except Exception as exc:
            log.warning("spill replay failed (%s); will retry", type(exc).__name__)


def _encode(row: PredictionRow) -> dict[str, object]:
    d = asdict(row)
    d["created_at"] = row.created_at.isoformat() if row.created_at else None
    return d


def _decode(d: dict[str, object]) -> PredictionRow:
    created = d.get("created_at")
    d = dict(d)
    d["created_at"] = datetime.fromisoformat(created) if isinstance(created, str) else None
    return PredictionRow(**d)  # type: ignore[arg-type]
