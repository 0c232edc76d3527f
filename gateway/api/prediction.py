"""PredictionService: translate protobuf to one `Predictor` call (gateway.serving.predictor, the owner
of every prediction) or to the outcome intake (gateway.records.outcome_intake), and domain errors to
status codes. Nothing else lives here: tracing wrappers are installed by gateway.api.tracing_wrappers,
request metrics are gateway.metrics.RequestMetrics, failover is the predictor's.

Deadlines: every prediction call reads the caller's remaining time (`context.time_remaining()`); a
call whose deadline already passed is answered DEADLINE_EXCEEDED at once, and the rest carry the
remaining time into the predictor (and through it the micro-batcher) as a timer on the caller's own
future, so an expired caller is answered DEADLINE_EXCEEDED (and its row dropped if not yet sent)
instead of waiting on a slow replica."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from chimera.v1 import prediction_pb2 as pb
from chimera.v1 import prediction_pb2_grpc as pb_grpc
from gateway.api.auth import AdminAuth
from gateway.api.errors import status_for
from gateway.api.validate import (
    MAX_NAME_CHARS,
    check_request,
    check_rows,
    check_text,
    check_texts,
    detail,
    internal_detail,
    shorten,
)
from gateway.metrics import Metrics, RequestMetrics
from gateway.records.outcome_intake import OutcomeIntake
from gateway.serving.errors import UnavailableError
from gateway.serving.features import PackedRows
from gateway.serving.flight import Flight
from gateway.serving.predictor import Predictor
from gateway.serving.rows import Scored, batch_pin
from registry import ValidationError

log = logging.getLogger(__name__)
# Rows of one stream being scored or answered but not yet taken by the client; reading the stream
# pauses beyond this, so a client that never reads its responses holds at most this many in memory
# (and HTTP/2 flow control then stops it sending).
MAX_STREAM_INFLIGHT = 1024
MAX_OUTCOMES_PER_CALL = 10_000  # RecordOutcomes entries; more is INVALID_ARGUMENT naming the limit
_READER_DONE = object()


def _remaining(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left before the caller's deadline (None: no deadline). Raises when none is left."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise TimeoutError("deadline exceeded before the request was scored")
    return remaining  # type: ignore[no-any-return]


class PredictionServicer(pb_grpc.PredictionServiceServicer):
    def __init__(self, predictor: Predictor, outcomes: OutcomeIntake, auth: AdminAuth,
                 metrics: Metrics, failed_models: dict[str, str] | None = None) -> None:
        self.predictor = predictor
        self.outcomes = outcomes
        self.auth = auth
        self.metrics = metrics
        self.requests = RequestMetrics(metrics, predictor.catalog.knows)
        # Models that could not start (gateway.server's start-up isolation): model -> why. Read on the
        # error path only, so a call for one is UNAVAILABLE with the reason, not NOT_FOUND.
        self.failed_models = failed_models if failed_models is not None else {}

    def _explain(self, model: str, exc: BaseException) -> BaseException:
        if (self.failed_models and model in self.failed_models
                and not self.predictor.catalog.knows(model)):
            return UnavailableError(f"model {shorten(model)!r} is not being served: no version could start "
                                    f"({self.failed_models[model]})")
        return exc

    def _message(self, method: str, code: grpc.StatusCode, exc: BaseException) -> str:
        if code == grpc.StatusCode.INTERNAL:
            return internal_detail(method, exc)
        return detail(str(exc) or type(exc).__name__)

    async def _fail(self, context: grpc.aio.ServicerContext, method: str, model: str, exc: Exception,
                    t0: float) -> None:
        exc = self._explain(model, exc)  # type: ignore[assignment]
        code = status_for(exc)
        self.requests.observe(method, model, "", code.name, t0)
        await context.abort(code, self._message(method, code, exc))

    # ------------------------------------------------------------------ unary
    async def Predict(self, request: pb.PredictRequest,
                      context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        t0 = time.perf_counter()
        model = request.model
        try:
            check_request(request)
            if request.version:
                self.auth.actor(context)
            r = await self.predictor.submit(model, request.routing_key, request.request_id, request.features,
                                            request.dense, request.version, _remaining(context), t0)
        except Exception as exc:
            await self._fail(context, "Predict", model, exc, t0)
            raise  # unreachable: abort raises
        self.requests.observe("Predict", model, r.version, "OK", t0)
        return pb.PredictResponse(request_id=r.request_id, model=model, version=r.version, score=r.score)

    # ------------------------------------------------------------------ batch
    async def PredictBatch(self, request: pb.PredictBatchRequest,
                           context: grpc.aio.ServicerContext) -> pb.PredictBatchResponse:
        t0 = time.perf_counter()
        rows = request.rows
        packed = request.HasField("matrix")
        model = request.model or (rows[0].model if rows else "")
        try:
            check_text("model", request.model, MAX_NAME_CHARS)
            if packed:
                if rows:
                    raise ValidationError("rows: set either rows or matrix, not both")
                m = request.matrix
                ids, keys = list(m.request_ids), list(m.routing_keys)  # copied out of protobuf once
                check_texts("matrix.request_ids", ids)
                check_texts("matrix.routing_keys", keys)
                batch: Any = PackedRows.from_f32(m.f32, m.cols, keys, ids)
                pinned, columns = m.version, None
            else:
                batch = list(rows)  # one wrapper per row, made once: every pass below reads the list
                pinned = batch_pin(batch, model)
                columns = check_rows(batch)
            if pinned:
                self.auth.actor(context)
            result = await self.predictor.submit_many(model, batch, pinned, _remaining(context), columns)
        except Exception as exc:
            await self._fail(context, "PredictBatch", model, exc, t0)
            raise
        response = pb.PredictBatchResponse()
        if packed:
            response.request_ids.extend(result.request_ids)
            response.versions.extend(result.versions)
            response.scores.extend(result.scores)
        else:
            add = response.results.add
            for rid, version, score in zip(result.request_ids, result.versions, result.scores, strict=True):
                add(request_id=rid, model=model, version=version, score=score)
        self.requests.observe("PredictBatch", model, "", "OK", t0)
        return response

    # ------------------------------------------------------------------ stream
    async def PredictStream(self, request_iterator: AsyncIterator[pb.PredictRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PredictStreamResponse]:
        """Rows are scored concurrently (up to MAX_STREAM_INFLIGHT at once; reading pauses beyond that)
        and answered in COMPLETION order, not request order: every response carries its request_id
        (generated when the request had none) for the client to match. A bad row gets a response
        with `error` and the stream goes on. The stream's deadline, if any, applies to every row."""
        out: asyncio.Queue[Any] = asyncio.Queue()
        outstanding: set[Flight] = set()
        slot_free = asyncio.Event()
        predictor = self.predictor
        observe = self.requests.observe
        loop = asyncio.get_running_loop()

        def done(flight: Flight, r: Scored | None, exc: BaseException | None) -> None:
            outstanding.discard(flight)
            request: pb.PredictRequest = flight.tag
            if r is not None:
                observe("PredictStream", request.model, r.version, "OK", flight.started)
                # Fields set in place: a PredictResponse passed to the constructor would be copied
                # (about twice the cost per row).
                response = pb.PredictStreamResponse(request_id=r.request_id)
                prediction = response.prediction
                prediction.request_id = r.request_id
                prediction.model = request.model
                prediction.version = r.version
                prediction.score = r.score
                out.put_nowait(response)
            elif exc is not None:
                out.put_nowait(self._row_error("PredictStream", request, exc, flight.started))
            # A finished row moves from `outstanding` to `out`: the reader's bound (their sum) is
            # unchanged, so only the writer taking a response can free a slot (see below).

        async def reader() -> None:
            try:
                async for request in request_iterator:
                    while len(outstanding) + out.qsize() >= MAX_STREAM_INFLIGHT:
                        slot_free.clear()
                        await slot_free.wait()
                    t0 = time.perf_counter()
                    try:
                        check_request(request)
                        if request.version:
                            self.auth.actor(context)
                        flight = predictor.submit_nowait(
                            request.model, request.routing_key, request.request_id, request.features,
                            request.dense, request.version, _remaining(context), t0, done, request)
                    except Exception as exc:
                        out.put_nowait(self._row_error("PredictStream", request, exc, t0))
                        continue
                    outstanding.add(flight)
                out.put_nowait(_READER_DONE)
            except BaseException as exc:  # the client went away or sent garbage: end the stream
                out.put_nowait(exc)
                raise

        read_task = loop.create_task(reader())
        finished_reading = False
        try:
            while True:
                item = await out.get()
                if len(outstanding) + out.qsize() < MAX_STREAM_INFLIGHT:
                    slot_free.set()  # the client took a response: room for one more row
                if item is _READER_DONE:
                    finished_reading = True
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
                if finished_reading and not outstanding and out.empty():
                    return
        finally:
            read_task.cancel()
            for f in list(outstanding):
                f.cancel()

    def _row_error(self, method: str, request: pb.PredictRequest, exc: BaseException,
                   t0: float) -> pb.PredictStreamResponse:
        exc = self._explain(request.model, exc)
        code = status_for(exc)
        self.requests.observe(method, request.model, "", code.name, t0)
        rid = request.request_id  # echoed so the client can match the row, unless it is itself the problem
        if len(rid) > 128 or "\x00" in rid:
            rid = ""
        return pb.PredictStreamResponse(request_id=rid,
                                        error=pb.RowError(code=code.value[0],
                                                          message=self._message(method, code, exc)))

    # ------------------------------------------------------------------ outcomes
    async def RecordOutcome(self, request: pb.RecordOutcomeRequest,
                            context: grpc.aio.ServicerContext) -> pb.RecordOutcomeResponse:
        t0 = time.perf_counter()
        try:
            check_text("request_id", request.request_id)
            await self.outcomes.record(request.request_id, request.value)
        except Exception as exc:
            await self._fail(context, "RecordOutcome", "", exc, t0)
            raise
        self.requests.observe("RecordOutcome", "", "", "OK", t0)
        return pb.RecordOutcomeResponse()

    async def RecordOutcomes(self, request: pb.RecordOutcomesRequest,
                             context: grpc.aio.ServicerContext) -> pb.RecordOutcomesResponse:
        """One bulk write for all items; each item gets the status RecordOutcome would have given it."""
        t0 = time.perf_counter()
        n = len(request.outcomes)
        if n > MAX_OUTCOMES_PER_CALL:
            await self._fail(context, "RecordOutcomes", "", ValidationError(
                f"outcomes: {n} entries, limit {MAX_OUTCOMES_PER_CALL} per call; send them in several "
                "calls"), t0)
        items = [(o.request_id, o.value) for o in request.outcomes]
        errors: list[BaseException | None] = [None] * n
        good: list[int] = []
        for i, (rid, _) in enumerate(items):
            try:
                check_text("request_id", rid)
                good.append(i)
            except ValidationError as exc:
                errors[i] = exc
        if good:
            stored = await self.outcomes.record_many(items if len(good) == n else [items[i] for i in good])
            for i, err in zip(good, stored, strict=True):
                errors[i] = err
        statuses = []
        for err in errors:
            if err is None:
                statuses.append(pb.RowError(code=0))
            else:
                code = status_for(err)
                statuses.append(pb.RowError(code=code.value[0], message=self._message("RecordOutcomes", code,
                                                                                        err)))
        self.requests.observe("RecordOutcomes", "", "", "OK", t0)
        return pb.RecordOutcomesResponse(statuses=statuses)
