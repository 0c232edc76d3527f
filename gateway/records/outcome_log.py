"""Outcomes the database could not take right now: an append-only spill file, replayed when it answers.

RecordOutcome normally stores the outcome synchronously (so the caller hears NOT_FOUND / ALREADY_EXISTS
at once). When the database is unreachable, or the outcome's prediction is itself still waiting in the
prediction log's spill file, the outcome is *accepted*: appended as one JSON line to the spill file and
fsynced before the call returns OK. So OK always means "durably recorded here", never "maybe".

Replay (a background thread, every `replay_interval_s`, and once at start so a restarted gateway picks
up what an earlier run left) waits until the prediction log has no spilled rows of its own (outcomes
join predictions by request id, so predictions go in first), then stores the outcomes in bulk with
`Registry.record_outcomes`, which is idempotent: an outcome already stored with the same value counts
as stored, so a replay interrupted half-way and run again duplicates nothing. Each outcome then ends in
exactly one place:

- stored in the database (`stats.replayed`);
- the dead-letter file (one JSON line each, with the reason, never retried automatically;
  `stats.dead_letter[reason]`, metric chimera_outcomes_dead_letter_rows{reason}):
  `conflict` (a different value is already stored for that request id), `invalid` (e.g. not finite, or
  an id the database refuses, such as one with a NUL byte on PostgreSQL: a failed bulk store is
  bisected down to the outcomes that fail alone, so one bad outcome never blocks the others), `torn`
  (a line a crash or a full disk cut short: skipped, kept here as text, counted in `stats.torn_lines`,
  metric chimera_outcomes_spill_torn_lines),
  `unknown_request_id` (no prediction with that id, still none `unknown_grace_s` after the outcome was
  accepted: the grace covers a prediction that sits in *another* gateway's spill file);
- back in the spill file for the next replay (unknown id within its grace, or the database went away
  again).

The files: `<spill_dir>/outcomes-<port>.spill` (and `.spill.replaying` while a replay runs) and
`<spill_dir>/outcomes-<port>.deadletter`. The spill is bounded (`spill_max_bytes`); an accept past the
bound or on a full disk raises gateway.records.spill.SpillUnavailable (RESOURCE_EXHAUSTED to the caller,
counted in `stats.spill_failures`) and leaves no half-written line behind."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gateway.records.spill import (
    DEFAULT_SPILL_MAX_BYTES,
    SpillUnavailable,
    append_durably,
    is_data_error,
)
from registry import AlreadyExistsError, NotFoundError, Registry

log = logging.getLogger(__name__)
DEAD_LETTER_REASONS = ("unknown_request_id", "conflict", "invalid")


def database_unavailable(exc: BaseException) -> bool:
    """True for errors that mean "the database cannot be reached or used right now" (as opposed to a
    statement it refused): connection refused or lost, pool exhausted, timeouts, a locked SQLite."""
    from sqlalchemy import exc as sa_exc

    return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.DisconnectionError
                      | sa_exc.TimeoutError) or (isinstance(exc, sa_exc.DBAPIError)
                                                 and exc.connection_invalidated)


@dataclass
class OutcomeStats:
    spilled: int = 0  # outcomes accepted into the spill file
    replayed: int = 0  # of those, stored in the database by a replay
    dead_letter: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DEAD_LETTER_REASONS, 0))
    replay_failures: int = 0
    torn_lines: int = 0  # unreadable spill lines skipped (kept in the dead-letter file, reason "torn")
    spill_failures: dict[str, int] = field(default_factory=lambda: {"full": 0, "limit": 0, "io": 0})


class OutcomeLog:
    def __init__(
        self,
        registry: Registry,
        spill_path: Path,
        dead_letter_path: Path | None = None,
        *,
        predictions_pending: Callable[[], bool] = lambda: False,
        flush_predictions: Callable[[], object] | None = None,
        replay_interval_s: float = 1.0,
        unknown_grace_s: float = 300.0,
        batch_size: int = 5000,
        spill_max_bytes: int = DEFAULT_SPILL_MAX_BYTES,
    ) -> None:
        self.registry = registry
        self.spill_path = Path(spill_path)
        self.dead_letter_path = (Path(dead_letter_path) if dead_letter_path is not None
                                 else self.spill_path.with_suffix(".deadletter"))
        self.predictions_pending = predictions_pending
        self.flush_predictions = flush_predictions
        self.replay_interval_s = replay_interval_s
        self.unknown_grace_s = unknown_grace_s
        self.batch_size = batch_size
        self.spill_max_bytes = spill_max_bytes
        self.stats = OutcomeStats()
        self._lock = threading.Lock()  # the spill file (appends and the move aside)
        self._replay_lock = threading.Lock()  # one replay at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- files
    @property
    def _replaying_path(self) -> Path:
        return self.spill_path.with_suffix(self.spill_path.suffix + ".replaying")

    @property
    def has_spill(self) -> bool:
        return self.spill_path.exists() or self._replaying_path.exists()

    def pending(self) -> int:
        """Outcomes waiting in the spill files (reads them: for tests and operators)."""
        n = 0
        for path in (self.spill_path, self._replaying_path):
            if path.exists():
                with open(path, encoding="utf-8") as f:
                    n += sum(1 for line in f if line.strip())
        return n

    def _append(self, path: Path, lines: list[str]) -> None:
        """Append fsynced (the directory too when the file is new); SpillUnavailable, counted, when the
        disk is full or failing, with the file cut back to its old length."""
        if not lines:
            return
        try:
            append_durably(path, "".join(lines))
        except SpillUnavailable as exc:
            self.stats.spill_failures[exc.reason] = self.stats.spill_failures.get(exc.reason, 0) + 1
            raise

    # -------------------------------------------------------------- request path
    def accept(self, request_id: str, value: float) -> None:
        """Append one outcome, fsynced (blocking: call it from a worker thread). Checks what can be
        checked without the database; the rest is checked at replay."""
        self.accept_many([(request_id, value)])

    def accept_many(self, items: Sequence[tuple[str, float]]) -> None:
        """Append outcomes with one write and one fsync (blocking: call it from a worker thread)."""
        for request_id, value in items:
            if not request_id:
                raise ValueError("request_id: required")
            if not math.isfinite(value):
                raise ValueError(f"value: must be finite, got {value}")
        now = time.time()
        lines = [json.dumps({"id": request_id, "v": value, "t": now}) + "\n" for request_id, value in items]
        with self._lock:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            size = sum(p.stat().st_size for p in (self.spill_path, self._replaying_path) if p.exists())
            if size + sum(map(len, lines)) > self.spill_max_bytes:
                self.stats.spill_failures["limit"] += 1
                raise SpillUnavailable(f"outcome spill: size limit of {self.spill_max_bytes} bytes reached "
                                       "(the database has been away too long)", "limit")
            self._append(self.spill_path, lines)
        self.stats.spilled += len(lines)

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="chimera-outcome-log", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the replay thread; outcomes still spilled stay on disk for the next start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.has_spill:
                try:
                    self.replay()
                except Exception:  # never let the thread die; the files stay for the next try
                    self.stats.replay_failures += 1
                    log.exception("outcome replay failed; will retry")
            self._stop.wait(self.replay_interval_s)

    # -------------------------------------------------------------- replay
    def replay(self) -> bool:
        """Replay what is spilled (a file being replayed first, then what was appended meanwhile).
        True when nothing is left (everything stored or dead-lettered)."""
        with self._replay_lock:
            for _ in range(3):  # bounded: outcomes keep arriving while the database is slow
                if not self.has_spill:
                    return True
                # Predictions queued in memory go first (stored or spilled); if the log could not finish
                # (its writer busy or stuck), an outcome's prediction may still be in memory: next time,
                # so it is not taken for an unknown id.
                if self.flush_predictions is not None and self.flush_predictions() is False:
                    return False
                if self.predictions_pending():
                    return False  # their predictions are still in the prediction spill: next time
                kept = self._replay_once()
                if kept is None or kept > 0:
                    return False
            return not self.has_spill

    def _replay_once(self) -> int | None:
        """One file: the number of outcomes kept for later, or None when the database failed."""
        replaying = self._replaying_path
        with self._lock:
            if self.spill_path.exists() and not replaying.exists():
                os.replace(self.spill_path, replaying)
        if not replaying.exists():
            return 0
        items: list[tuple[str, float, float]] = []
        torn: list[str] = []
        with open(replaying, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    d = json.loads(line)
                    items.append((str(d["id"]), float(d["v"]), float(d.get("t", 0.0))))
                except (ValueError, KeyError, TypeError):  # a torn line (crash or full disk mid-write)
                    self.stats.torn_lines += 1
                    torn.append(json.dumps({"line": line, "reason": "torn", "dead_at": time.time()}) + "\n")
                    log.warning("outcome spill: skipping an unreadable line (%d bytes)", len(line))
        try:
            self._append(self.dead_letter_path, torn)
        except SpillUnavailable:
            log.error("outcome dead-letter file unwritable: %d torn lines not kept", len(torn))
        try:
            stored, dead, keep = self._store(items)
        except Exception as exc:
            self.stats.replay_failures += 1
            log.warning("outcome replay deferred (%s); %d outcomes stay spilled", type(exc).__name__,
                        len(items))
            return None
        now = time.time()
        dead_lines = [json.dumps({"id": rid, "v": v, "t": t, "reason": reason, "detail": detail,
                                  "dead_at": now}) + "\n" for rid, v, t, reason, detail in dead]
        self._append(self.dead_letter_path, dead_lines)
        with self._lock:
            self._append(self.spill_path, [json.dumps({"id": rid, "v": v, "t": t}) + "\n"
                                           for rid, v, t in keep])
            replaying.unlink()
        self.stats.replayed += stored
        for _, _, _, reason, _ in dead:
            self.stats.dead_letter[reason] = self.stats.dead_letter.get(reason, 0) + 1
        if dead:
            log.warning("outcome replay: %d outcomes moved to %s (%s)", len(dead), self.dead_letter_path,
                        ", ".join(sorted({d[3] for d in dead})))
        log.info("outcome replay: %d stored, %d dead-lettered, %d kept for later", stored, len(dead),
                 len(keep))
        return len(keep)

    def _store(self, items: list[tuple[str, float, float]]
               ) -> tuple[int, list[tuple[str, float, float, str, str]], list[tuple[str, float, float]]]:
        stored = 0
        dead: list[tuple[str, float, float, str, str]] = []
        keep: list[tuple[str, float, float]] = []
        now = time.time()
        stack = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)][::-1]
        while stack:
            chunk = stack.pop()
            try:
                results = self.registry.record_outcomes([(rid, v) for rid, v, _ in chunk])
            except Exception as exc:
                if not is_data_error(exc):
                    raise  # the database is away: the whole file stays for the next replay
                if len(chunk) == 1:  # refused for what it holds (e.g. NUL on PostgreSQL): never retried
                    rid, v, t = chunk[0]
                    dead.append((rid, v, t, "invalid", f"{type(exc).__name__}: {exc}"[:500]))
                else:
                    mid = len(chunk) // 2
                    stack += [chunk[mid:], chunk[:mid]]
                continue
            for (rid, v, t), err in zip(chunk, results, strict=True):
                if err is None:
                    stored += 1
                elif isinstance(err, NotFoundError):
                    if now - t < self.unknown_grace_s:
                        keep.append((rid, v, t))
                    else:
                        dead.append((rid, v, t, "unknown_request_id", str(err)))
                elif isinstance(err, AlreadyExistsError):
                    dead.append((rid, v, t, "conflict", str(err)))
                else:
                    dead.append((rid, v, t, "invalid", str(err)))
        return stored, dead, keep
