"""RecordOutcome and RecordOutcomes: check each outcome, store it, or accept it into the outcome spill
(gateway.records.outcome_log) when the database cannot take it now. Moved out of the Predictor: an
outcome joins a logged prediction, which is the records' business, not the scoring path's.

One flow for one outcome and for many: store them (RecordOutcomes: one bulk write,
`Registry.record_outcomes`, instead of a transaction per item); those whose prediction is unknown may
still be queued in the prediction log, so the log is flushed once and they are tried again, so a caller
who reports an outcome right after its Predict is not told NOT_FOUND. When the prediction log has a
spill file (the prediction may be in it) or the database is unreachable, the outcome is accepted into
the outcome spill (fsynced) instead and checked against the predictions at replay.

Each item ends with None (stored, or already stored with the same value) or the error it would have
raised alone, with the same messages as RecordOutcome (never "outcomes[i]..."), so RecordOutcomes'
per-item statuses read the same as RecordOutcome's."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

from gateway.records.outcome_log import OutcomeLog, database_unavailable
from gateway.records.prediction_log import PredictionLog
from registry import AlreadyExistsError, NotFoundError, Registry, ValidationError

MAX_REQUEST_ID = 128
Result = BaseException | None


def _check(request_id: str, value: float) -> ValidationError | None:
    if not request_id:
        return ValidationError("request_id: required")
    if len(request_id) > MAX_REQUEST_ID:
        return ValidationError(f"request_id: longer than {MAX_REQUEST_ID} characters")
    if not math.isfinite(value):
        return ValidationError(f"value: must be finite, got {value}")
    return None


class OutcomeIntake:
    def __init__(self, registry: Registry, predictions: PredictionLog,
                 spill: OutcomeLog | None = None) -> None:
        self.registry = registry
        self.predictions = predictions
        self.spill = spill  # None: no outcome spill (errors reach the caller)

    async def record(self, request_id: str, value: float) -> None:
        """Store one outcome (or accept it into the spill); raises what the caller must hear."""
        (err,) = await self.record_many([(request_id, value)])
        if err is not None:
            raise err

    async def record_many(self, items: Sequence[tuple[str, float]]) -> list[Result]:
        """Per item: None (stored, already stored with the same value, or accepted into the spill) or
        its error."""
        results: list[Result] = [_check(rid, value) for rid, value in items]
        todo = [i for i, err in enumerate(results) if err is None]
        if not todo:
            return results
        defer: list[int] = []
        attempt = todo
        try:
            missing = await self._store(items, attempt, results)
            if missing and not self._spilled_predictions():
                await asyncio.to_thread(self.predictions.flush)
                attempt = missing
                missing = await self._store(items, attempt, results)
            if missing and self._spilled_predictions():  # their predictions may sit in the spill file
                defer = missing
        except Exception as exc:
            if self.spill is None or not database_unavailable(exc):
                for i in attempt:
                    results[i] = exc
                return results
            defer = attempt
        if defer:
            assert self.spill is not None
            try:
                await asyncio.to_thread(self.spill.accept_many, [items[i] for i in defer])
            except Exception as exc:
                for i in defer:
                    results[i] = exc
            else:
                for i in defer:
                    results[i] = None
        return results

    def _spilled_predictions(self) -> bool:
        return self.spill is not None and self.predictions.has_spill

    async def _store(self, items: Sequence[tuple[str, float]], todo: list[int],
                     results: list[Result]) -> list[int]:
        """Store items[todo], setting their results; returns those whose prediction is unknown."""
        chosen = [items[i] for i in todo]
        if len(chosen) == 1:
            errors = [await asyncio.to_thread(self._store_one, *chosen[0])]
        else:
            errors = await asyncio.to_thread(self.registry.record_outcomes, chosen)
        missing = []
        for i, (rid, _), err in zip(todo, chosen, errors, strict=True):
            if isinstance(err, NotFoundError):
                results[i] = NotFoundError(f"request_id: no prediction with id {rid!r}")
                missing.append(i)
            elif isinstance(err, AlreadyExistsError):
                # The bulk call words it per position; say it as RecordOutcome does.
                stored = str(err).rpartition(" already stored as ")[2]
                results[i] = AlreadyExistsError(f"value: outcome for request_id {rid!r} already stored as "
                                                f"{stored}") if stored else err
            else:
                results[i] = err
        return missing

    def _store_one(self, request_id: str, value: float) -> Result:
        """One outcome in one short transaction (RecordOutcome), its refusal as a value."""
        try:
            self.registry.record_outcome(request_id, value)
        except (NotFoundError, AlreadyExistsError) as exc:
            return exc
        return None
