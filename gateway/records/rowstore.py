"""How the prediction log gets rows into the database so that no single row can block the others:
a failed bulk insert whose error is about the rows' content (gateway.records.spill.is_data_error) is
bisected down to the rows that fail alone, which go to the dead-letter file with the reason; every
other row is stored. A database that is away stops the work and hands back exactly the rows not yet
stored (RowsNotStored), so the caller spills those and nothing is dead-lettered twice.

Duplicates: inserts skip request ids already stored (ON CONFLICT DO NOTHING). When the insert reports
fewer rows than it was given, the skipped rows are compared with what is stored under their ids: the
same prediction (model, version, routing key, score) is a replay of a row already stored and is fine;
anything else is a second prediction under a client-chosen id that is taken: it was answered, it is not
logged twice (the first row keeps the id, and outcomes join the first row), and it goes to the
dead-letter file with reason "duplicate", counted.

Replay reads a spill file line by line (one JSON array of rows, or one legacy JSON object, per line):
a line that does not parse (torn by a crash or a full disk mid-write) is skipped, counted and kept in
the dead-letter file with reason "torn"; the file is removed only once every line is stored or
dead-lettered. Progress within a file is remembered, so a replay interrupted by the database going
away resumes where it stopped."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select

from gateway.records.inserter import portable
from gateway.records.spill import SpillFiles, dead_letter, is_data_error, read_lines
from registry import Registry
from registry.models import Prediction
from registry.repository import by_request_ids

log = logging.getLogger(__name__)
DEAD_LETTER_REASONS = ("invalid", "duplicate", "torn")
Row = tuple[Any, ...]
_PREDICTION_FIELDS = 11  # gateway.records.inserter.COLUMNS; 12 fields: a request error; 8: pre-0005


class RowsNotStored(Exception):  # noqa: N818 - a carrier, not a failure of its own
    """The database went away part-way; `rows` are those not stored (nor dead-lettered) yet."""

    def __init__(self, rows: list[Row], cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.rows = rows
        self.cause = cause


class RowStore:
    def __init__(self, registry: Registry, insert: Callable[[Sequence[Row]], int | None],
                 dead_letter_path: Path) -> None:
        self.registry = registry
        self.insert = insert  # returns the number of prediction rows inserted (None: unknown, take all)
        self.dead_letter_path = dead_letter_path
        self.dead_letter = dict.fromkeys(DEAD_LETTER_REASONS, 0)
        self.dead_letter_lost = 0  # dead-letter entries the disk refused (logged as errors)
        self.torn_lines = 0
        self.inserted = 0
        self.progress = 0  # bumped after each database answer (stop() watches it for a hung database)
        self._offsets: dict[Path, int] = {}
        self._lock = threading.Lock()

    # -------------------------------------------------------------- storing
    def store(self, rows: list[Row]) -> None:
        """Store rows, bisecting content errors down to single rows (dead-lettered). RowsNotStored when
        the database is away (with the rows still to store)."""
        stack = [rows]
        while stack:
            part = stack.pop()
            try:
                n = self.insert(part)
            except Exception as exc:
                if not is_data_error(exc):  # no answer (refused, timed out): not progress for stop()
                    rest = [r for p in stack for r in p]
                    raise RowsNotStored(part + rest, exc) from exc
                self.progress += 1  # the database answered: it refused this data
                if len(part) == 1:
                    self._dead(part, "invalid", f"{type(exc).__name__}: {exc}")
                    continue
                mid = len(part) // 2
                stack.append(part[mid:])
                stack.append(part[:mid])
                continue
            self.progress += 1
            predictions = sum(1 for r in part if len(r) != _PREDICTION_FIELDS + 1)
            self.inserted += predictions if n is None else n
            if n is not None and n < predictions:
                try:
                    self._sort_skipped(part)
                except Exception as exc:  # the check itself could not run: nothing is lost by skipping it
                    log.warning("duplicate check skipped (%s: %s)", type(exc).__name__, exc)

    def _sort_skipped(self, rows: list[Row]) -> None:
        """Some rows were skipped on conflict: dead-letter those that are not the stored prediction."""
        preds = [r for r in rows if len(r) != _PREDICTION_FIELDS + 1]
        ids = list({r[0] for r in preds})
        # Every stored prediction of each id: on PostgreSQL an id is unique per day (migration 0009), so
        # a row of this batch may be stored on its own day while an older day holds another under its id.
        stored: dict[str, set[tuple[Any, ...]]] = {}
        q = select(Prediction.request_id, Prediction.model, Prediction.version, Prediction.routing_key,
                   Prediction.score)
        with self.registry.session() as s:
            for i in range(0, len(ids), 500):
                for rid, *content in by_request_ids(s, q, ids[i:i + 500], self.registry.is_postgres):
                    stored.setdefault(rid, set()).add(tuple(content))
        # A different prediction under a stored id. Identical copies (a replay of a stored row, or a row
        # spilled at shutdown while its insert was still running) are the same prediction: fine.
        dupes = [r for r in preds if r[0] in stored and (r[1], r[2], r[3], r[4]) not in stored[r[0]]]
        if dupes:
            self._dead(dupes, "duplicate", "request_id already stored with another prediction; the first "
                       "one keeps the id")

    def _dead(self, rows: list[Row], reason: str, detail: str) -> None:
        entries = [{"reason": reason, "detail": detail[:500], "row": list(r)} for r in portable(rows)]
        if not dead_letter(self.dead_letter_path, entries):
            self.dead_letter_lost += len(entries)
        self.dead_letter[reason] = self.dead_letter.get(reason, 0) + len(rows)
        log.warning("prediction log: %d rows moved to %s (%s: %s)", len(rows), self.dead_letter_path, reason,
                    detail[:200])

    # -------------------------------------------------------------- replay
    def replay(self, files: SpillFiles, batch_size: int, parse_line: Callable[[str], list[Row]]) -> int:
        """Replay every spill segment, oldest first. Returns rows replayed; RowsNotStored (the database
        went away) leaves the current file in place with its progress remembered."""
        total = 0
        with self._lock:
            while True:
                path = files.next_for_replay()
                if path is None:
                    return total
                total += self._replay_file(path, batch_size, parse_line)
                files.done(path)
                self._offsets.pop(path, None)

    def _replay_file(self, path: Path, batch_size: int, parse_line: Callable[[str], list[Row]]) -> int:
        offset = self._offsets.get(path, 0)
        batch: list[Row] = []
        done = 0
        end = offset
        for end, line in read_lines(path, offset):
            try:
                batch.extend(parse_line(line))
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                self.torn_lines += 1
                entry = {"reason": "torn", "detail": f"{type(exc).__name__}: {exc}"[:500], "line": line}
                if not dead_letter(self.dead_letter_path, [entry]):
                    self.dead_letter_lost += 1
                self.dead_letter["torn"] += 1
                log.warning("spill %s: skipped an unreadable line (%d bytes; torn by a crash or a full disk)",
                            path.name, len(line))
            if len(batch) >= batch_size:
                self.store(batch)
                done += len(batch)
                batch = []
                self._offsets[path] = end
        if batch:
            self.store(batch)
            done += len(batch)
        self._offsets[path] = end
        return done


def parse_spill_line(line: str, widen: Callable[[Sequence[Any]], Row],
                     legacy: Callable[[dict[str, Any]], Row]) -> list[Row]:
    """One spill line: a JSON array of rows (pre-0005 rows have 8 fields and are widened), or one
    PredictionRow object (older spill files). ValueError for anything else (a torn line)."""
    value = json.loads(line)
    if isinstance(value, list):
        rows = [widen(r) for r in value]
        for r in rows:
            if not isinstance(r, tuple) or len(r) < _PREDICTION_FIELDS or not isinstance(r[0], str):
                raise ValueError("not a prediction row")
        return rows
    if isinstance(value, dict):
        return [legacy(value)]
    raise ValueError("neither a row array nor a row object")
