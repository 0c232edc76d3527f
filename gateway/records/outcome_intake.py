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
per-item statuses read the same as RecordOutcome's.

A value outside its model's metric domain (anything but 0 or 1 for success_rate, brier and log_loss) is
refused with the field named (rollout.stats.check_outcome, INVALID_ARGUMENT at the API), so it never
reaches the analysis. 0 and 1 fit every metric and need no look-up; any other value costs one query for
its prediction's model metric. An outcome whose prediction is only in the prediction spill cannot be
checked now and is accepted (the analysis skips out-of-domain rows: rollout.stats.outcome_in_domain)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

from sqlalchemy import select

from gateway.records.outcome_log import OutcomeLog, database_unavailable
from gateway.records.prediction_log import PredictionLog
from registry import AlreadyExistsError, NotFoundError, Registry, ValidationError
from registry.models import Model, Prediction
from rollout.stats import check_outcome

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
        if any(items[i][1] not in (0.0, 1.0) for i in todo):
            await self._check_domains(items, todo, results)
            todo = [i for i in todo if results[i] is None]
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

    async def _check_domains(self, items: Sequence[tuple[str, float]], todo: list[int],
                             results: list[Result]) -> None:
        """Refuse values outside their model's metric domain (sets their results)."""
        odd = [i for i in todo if items[i][1] not in (0.0, 1.0)]
        try:
            metrics = await asyncio.to_thread(self._metrics, [items[i][0] for i in odd])
            if len(metrics) < len({items[i][0] for i in odd}) and not self.predictions.has_spill:
                await asyncio.to_thread(self.predictions.flush)  # the prediction may still be queued
                metrics = await asyncio.to_thread(self._metrics, [items[i][0] for i in odd])
        except Exception as exc:
            if self.spill is None or not database_unavailable(exc):
                for i in odd:
                    results[i] = exc
            return  # database away: the outcome spill takes them; the analysis skips bad values
        for i in odd:
            rid, value = items[i]
            metric = metrics.get(rid)
            if metric is None:
                continue  # unknown prediction: the store answers NOT_FOUND (or the spill takes it)
            try:
                check_outcome(metric, value)
            except ValueError as exc:
                results[i] = ValidationError(str(exc))

    def _metrics(self, request_ids: list[str]) -> dict[str, str]:
        """The metric of each known prediction's model, by request id."""
        with self.registry.session() as s:
            rows = s.execute(select(Prediction.request_id, Model.metric)
                             .join(Model, Model.name == Prediction.model)
                             .where(Prediction.request_id.in_(request_ids))).all()
        return {rid: metric for rid, metric in rows}

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
