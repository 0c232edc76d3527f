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
checked now and is accepted (the analysis skips out-of-domain rows: rollout.stats.outcome_in_domain).

A hung database (a frozen server: connections accepted, nothing answers) would otherwise hold each call
for the driver's whole query timeout (60 s by default) and fill the default thread pool, which others
share, and keep the process from exiting on SIGTERM (asyncio.run and the interpreter join those
threads). So with a spill, each database call runs in a daemon thread of its own and is waited for at
most `db_wait_s` (so is the prediction log's flush that lets an outcome follow its prediction at once);
past it the outcome is accepted into the spill like one that met a stopped database, and
while a call that outlived its wait has not returned, later outcomes skip the database altogether
(so a hang holds at most the calls in flight when it began). An abandoned call that commits later is
harmless: the replay counts an outcome already stored with the same value as stored."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from sqlalchemy import select

from gateway.records.outcome_log import OutcomeLog, database_unavailable
from gateway.records.prediction_log import PredictionLog
from registry import AlreadyExistsError, NotFoundError, Registry, ValidationError
from registry.models import MAX_REQUEST_ID, Model, Prediction
from registry.repository import by_request_ids
from rollout.stats import check_outcome

DB_WAIT_S = 2.0  # the longest an outcome call waits on the database when a spill can take it instead,
DB_WAIT_PER_ITEM_S = 0.001  # plus this per item of a RecordOutcomes (a healthy bulk write takes its time)
Result = BaseException | None
T = TypeVar("T")


class DatabaseStalled(Exception):
    """The database did not answer an outcome call within `db_wait_s` (or an earlier call is still
    waiting on it): the outcome goes to the spill instead."""


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
                 spill: OutcomeLog | None = None, db_wait_s: float = DB_WAIT_S) -> None:
        self.registry = registry
        self.predictions = predictions
        self.spill = spill  # None: no outcome spill (errors reach the caller)
        self.db_wait_s = db_wait_s
        self._stalled: set[Future[Any]] = set()  # calls that outlived db_wait_s and still run

    async def _db(self, fn: Callable[..., T], *args: Any, items: int = 1) -> T:
        """Run a blocking database call; with a spill, wait at most `db_wait_s` (plus a little per item)
        for it (see the module)."""
        if self.spill is None:
            return await asyncio.to_thread(fn, *args)
        if self._stalled:
            raise DatabaseStalled("an earlier call is still waiting on the database")
        future: Future[T] = Future()
        future.set_running_or_notify_cancel()  # running: a timed-out wait cannot cancel it, only leave it

        def call() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                future.set_exception(exc)

        threading.Thread(target=call, name="chimera-outcomes-db", daemon=True).start()
        wait_s = self.db_wait_s + DB_WAIT_PER_ITEM_S * items
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), wait_s)
        except TimeoutError:
            if not future.done():  # still waiting on the database: remember it until it returns
                self._stalled.add(future)
                future.add_done_callback(self._stalled.discard)
            raise DatabaseStalled(f"the database did not answer within {wait_s:g} s") from None

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
                attempt = missing
                # The log's writer may be stuck in an insert on a hung database: wait for it as long
                # as for the database itself, then accept (the replay checks the prediction).
                if not await self._flush_predictions():
                    raise DatabaseStalled("the prediction log did not finish its writes in time")
                missing = await self._store(items, attempt, results)
            if missing and self._spilled_predictions():  # their predictions may sit in the spill file
                defer = missing
        except Exception as exc:
            if self.spill is None or not (database_unavailable(exc) or isinstance(exc, DatabaseStalled)):
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
            metrics = await self._db(self._metrics, [items[i][0] for i in odd], items=len(odd))
            if len(metrics) < len({items[i][0] for i in odd}) and not self.predictions.has_spill:
                # The prediction may still be queued (waited for as long as for the database).
                await self._flush_predictions()
                metrics = await self._db(self._metrics, [items[i][0] for i in odd], items=len(odd))
        except Exception as exc:
            if self.spill is None or not (database_unavailable(exc) or isinstance(exc, DatabaseStalled)):
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
            rows = by_request_ids(s, select(Prediction.request_id, Model.metric)
                                  .join(Model, Model.name == Prediction.model), request_ids,
                                  self.registry.is_postgres)
        return {rid: metric for rid, metric in rows}

    async def _flush_predictions(self) -> bool:
        """Flush the prediction log; False only when its writer runs and did not finish in time (with a
        spill: `db_wait_s`, since the writer may be stuck on a hung database; without: 30 s as before)."""
        if self.spill is None:
            await asyncio.to_thread(self.predictions.flush)
            return True
        writer = self.predictions._thread  # same package: the log's writer thread, None when not started
        return await asyncio.to_thread(self.predictions.flush, self.db_wait_s) or writer is None

    def _spilled_predictions(self) -> bool:
        return self.spill is not None and self.predictions.has_spill

    async def _store(self, items: Sequence[tuple[str, float]], todo: list[int],
                     results: list[Result]) -> list[int]:
        """Store items[todo], setting their results; returns those whose prediction is unknown."""
        chosen = [items[i] for i in todo]
        if len(chosen) == 1:
            errors = [await self._db(self._store_one, *chosen[0])]
        else:
            errors = await self._db(self.registry.record_outcomes, chosen, items=len(chosen))
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
