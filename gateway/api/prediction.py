"""gRPC servicers: translate protobuf to domain calls and domain errors to status codes. Nothing
else lives here.

Deadlines: every prediction call reads the caller's remaining time (`context.time_remaining()`); a
call whose deadline already passed is answered DEADLINE_EXCEEDED at once, and the rest carry the
remaining time into the micro-batcher as a timer on the caller's own future, so an expired caller is
answered DEADLINE_EXCEEDED (and its row dropped if not yet sent) instead of waiting on a slow replica.

Replica faults: a row whose version failed to score it (UNAVAILABLE from the batcher) is scored again
on the version's fallback through `Predictor.failover` while the caller's deadline allows; see
gateway.serving.failover.

Metrics: label children are looked up once per (model, version, method) and cached; the hot path
pays one histogram observe and one counter increment.

Tracing (chimera.tracing): when it is on, Predict, PredictBatch and PredictStream are replaced at
construction by wrappers that open a SERVER span whose parent is the caller's `traceparent` metadata
and keep it current while the call runs (the batcher picks it up from there). When it is off the
class's methods run as they are: no per-call check at all."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import grpc
import numpy as np
from opentelemetry import context as otel_context
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer, set_span_in_context

from chimera.tracing import Tracing, context_from_metadata
from chimera.v1 import prediction_pb2 as pb
from chimera.v1 import prediction_pb2_grpc as pb_grpc
from gateway.api.auth import AdminAuth
from gateway.api.errors import UnavailableError, status_for
from gateway.metrics import Metrics
from gateway.serving.features import PackedRows
from gateway.serving.predictor import Predictor
from registry import ValidationError

log = logging.getLogger(__name__)
MAX_BATCH_ROWS = 10_000
MAX_STREAM_INFLIGHT = 1024  # rows of one stream being scored at once; reading pauses beyond this
_READER_DONE = object()


def _status(exc: BaseException) -> grpc.StatusCode:
    return status_for(exc)


def _batch_pin(rows: Any, model: str) -> int:
    """Check a PredictBatch's rows agree on model and pinned version; returns the pinned version."""
    if not rows:
        raise ValidationError("rows: empty batch")
    if len(rows) > MAX_BATCH_ROWS:
        raise ValidationError(f"rows: {len(rows)} rows, limit {MAX_BATCH_ROWS}")
    pinned = 0
    for i, r in enumerate(rows):
        if r.model and r.model != model:
            raise ValidationError(f"rows[{i}].model: {r.model!r} differs from batch model {model!r}")
        if r.version:
            pinned = pinned or r.version
            if r.version != pinned:
                raise ValidationError(f"rows[{i}].version: one pinned version per batch")
    return pinned


def unpack_matrix(m: pb.DenseMatrix) -> PackedRows:
    """A DenseMatrix's rows without copying its values (the matrix is a read-only view of the bytes)."""
    if m.cols <= 0:
        raise ValidationError(f"matrix.cols: must be positive, got {m.cols}")
    size = len(m.f32)
    if size == 0 or size % (4 * m.cols):
        raise ValidationError(f"matrix.f32: {size} bytes is not a whole number of rows of {m.cols} float32 "
                              f"values ({4 * m.cols} bytes each)")
    n = size // (4 * m.cols)
    if n > MAX_BATCH_ROWS:
        raise ValidationError(f"matrix: {n} rows, limit {MAX_BATCH_ROWS}")
    keys, ids = list(m.routing_keys), list(m.request_ids)
    for name, values in (("routing_keys", keys), ("request_ids", ids)):
        if values and len(values) != n:
            raise ValidationError(f"matrix.{name}: {len(values)} given for {n} rows "
                                  "(give one per row, or none)")
    x = np.frombuffer(m.f32, dtype="<f4").reshape(n, m.cols)
    return PackedRows(x, keys or [""] * n, ids or [""] * n)


_frozen = False


def freeze_startup_heap() -> None:
    """Move everything allocated so far into the garbage collector's permanent generation, once per
    process. The servicer is built after the replicas are up, so that is Ray, gRPC, SQLAlchemy, numpy
    and the catalog: ~250k long-lived objects that every full collection would otherwise walk
    (measured under load: a 100-180 ms pause every ~10 s, which set the p99; after: under 3 ms).
    Requests' garbage is still collected. Ray Serve does the same in its proxy and replicas."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()


def _remaining(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left before the caller's deadline (None: no deadline). Raises when none is left."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise TimeoutError("deadline exceeded before the request was scored")
    return remaining  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------- tracing
SERVICE = pb.DESCRIPTOR.services_by_name["PredictionService"].full_name
# gRPC codes that mark a server span as an error (OpenTelemetry's RPC conventions); a client's
# mistake (INVALID_ARGUMENT, NOT_FOUND, ...) is not the server's error.
_SERVER_ERRORS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL,
                            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})
_CODES = {c.value[0]: c for c in grpc.StatusCode}


def _call_code(context: grpc.aio.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    """The status an RPC that raised ends with (set by context.abort), else `default`."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return _CODES.get(code, default) if isinstance(code, int) else default


def _end_span(span: Span, code: grpc.StatusCode) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_ERRORS:
        span.set_status(StatusCode.ERROR, code.name)


def _predict_attributes(request: pb.PredictRequest) -> dict[str, Any]:
    return {"chimera.model": request.model, "chimera.rows": 1}


def _batch_attributes(request: pb.PredictBatchRequest) -> dict[str, Any]:
    rows = request.rows
    m = request.matrix
    n = len(rows) or (len(m.f32) // (4 * m.cols) if m.cols > 0 else 0)
    return {"chimera.model": request.model or (rows[0].model if rows else ""), "chimera.rows": n}


def _response_attributes(response: Any) -> dict[str, Any]:
    if isinstance(response, pb.PredictResponse):
        return {"chimera.version": response.version}
    versions = sorted({r.version for r in response.results} | set(response.versions))
    if len(versions) == 1:
        return {"chimera.version": versions[0], "chimera.versions": versions}
    return {"chimera.versions": versions}


def _traced_unary(tracer: Tracer, method: str, inner: Callable[[Any, Any], Awaitable[Any]],
                  attributes: Callable[[Any], dict[str, Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    """`inner` inside a SERVER span `chimera.<method>` whose parent is the caller's traceparent."""
    name = f"chimera.{method}"
    base = {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method}

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with tracer.start_as_current_span(
                name, context=context_from_metadata(context.invocation_metadata()), kind=SpanKind.SERVER,
                attributes={**base, **attributes(request)}, record_exception=False,
                set_status_on_exception=False) as span:
            try:
                response = await inner(request, context)
            except BaseException:
                _end_span(span, _call_code(context, grpc.StatusCode.CANCELLED))
                raise
            span.set_attributes(_response_attributes(response))
            _end_span(span, grpc.StatusCode.OK)
            return response

    return call


StreamMethod = Callable[[Any, Any], AsyncIterator[Any]]


def _traced_stream(tracer: Tracer, method: str, inner: StreamMethod) -> StreamMethod:
    """A stream inside one SERVER span: current while the stream's own code runs (not while the
    caller holds a response), so its rows' batches are its children or link to it."""
    name = f"chimera.{method}"
    base = {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method}

    async def call(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        span = tracer.start_span(name, context=context_from_metadata(context.invocation_metadata()),
                                 kind=SpanKind.SERVER, attributes=base, record_exception=False,
                                 set_status_on_exception=False)
        current = set_span_in_context(span)
        responses = inner(requests, context)
        answered = 0
        code = grpc.StatusCode.OK
        try:
            while True:
                token = otel_context.attach(current)
                try:
                    response = await responses.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    otel_context.detach(token)
                answered += 1
                yield response
        except BaseException:
            code = _call_code(context, grpc.StatusCode.CANCELLED)
            raise
        finally:
            await responses.aclose()
            span.set_attribute("chimera.rows", answered)
            _end_span(span, code)
            span.end()

    return call


class PredictionServicer(pb_grpc.PredictionServiceServicer):
    def __init__(self, predictor: Predictor, auth: AdminAuth, metrics: Metrics,
                 tracing: Tracing | None = None) -> None:
        self.predictor = predictor
        self.auth = auth
        self.metrics = metrics
        self._children: dict[tuple[str, int | str, str, str], tuple[Any, Any]] = {}
        tracer = tracing.tracer if tracing is not None else None
        if tracer is not None:  # instance attributes: what gateway.api.wire registers
            self.Predict = _traced_unary(tracer, "Predict", self.Predict, _predict_attributes)  # type: ignore[method-assign]
            self.PredictBatch = _traced_unary(tracer, "PredictBatch", self.PredictBatch,  # type: ignore[method-assign]
                                              _batch_attributes)
            self.PredictStream = _traced_stream(tracer, "PredictStream", self.PredictStream)  # type: ignore[method-assign]
        freeze_startup_heap()
        backpressure = getattr(metrics, "log_backpressure", None)
        if backpressure is not None:
            log_ = predictor.log
            backpressure.set_function(lambda: log_.stats.backpressure)

    # ------------------------------------------------------------------ metrics
    def _label(self, model: str) -> str:
        """Bounded label values: only registered model names become labels."""
        try:
            self.predictor.catalog.get(model)
            return model
        except Exception:
            return "_unknown"

    def _observe(self, method: str, model: str, version: int | str, code: grpc.StatusCode, t0: float) -> None:
        key = (model, version, method, code.name)
        children = self._children.get(key)
        if children is None:
            labels = (self._label(model), str(version or ""), method, code.name)
            children = (self.metrics.request_latency.labels(*labels), self.metrics.requests.labels(*labels))
            if labels[0] != "_unknown" or model == "_unknown":
                self._children[key] = children  # unknown names are not cached: the cache stays bounded
        children[0].observe(time.perf_counter() - t0)
        children[1].inc()

    async def _fail(self, context: grpc.aio.ServicerContext, method: str, model: str, exc: Exception,
                    t0: float) -> None:
        code = _status(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", method)
        self._observe(method, model, "", code, t0)
        await context.abort(code, str(exc) or type(exc).__name__)

    # ------------------------------------------------------------------ unary
    async def Predict(self, request: pb.PredictRequest,
                      context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        t0 = time.perf_counter()
        model = request.model
        try:
            if request.version:
                self.auth.actor(context)
            predictor = self.predictor
            routing_key = request.routing_key
            fut, version, x, request_id = predictor.start(model, routing_key, request.request_id,
                                                          request.features, request.dense, request.version,
                                                          _remaining(context))
            try:
                score = await fut
            except UnavailableError as exc:  # the version failed the row: its fallback scores it
                version, x, score = await predictor.failover(model, version, request.features, request.dense,
                                                             request.version, _remaining(context), exc)
            predictor.finish(model, version, x, request_id, routing_key, score, t0)
        except Exception as exc:
            await self._fail(context, "Predict", model, exc, t0)
            raise  # unreachable: abort raises
        self._observe("Predict", model, version, grpc.StatusCode.OK, t0)
        return pb.PredictResponse(request_id=request_id, model=model, version=version, score=score)

    # ------------------------------------------------------------------ batch
    async def PredictBatch(self, request: pb.PredictBatchRequest,
                           context: grpc.aio.ServicerContext) -> pb.PredictBatchResponse:
        t0 = time.perf_counter()
        rows = request.rows
        packed = request.HasField("matrix")
        model = request.model or (rows[0].model if rows else "")
        try:
            if packed:
                if rows:
                    raise ValidationError("rows: set either rows or matrix, not both")
                batch: Any = unpack_matrix(request.matrix)
                pinned = request.matrix.version
            else:
                batch, pinned = rows, _batch_pin(rows, model)
            if pinned:
                self.auth.actor(context)
            result = await self.predictor.predict_many(model, batch, pinned, _remaining(context))
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
        self._observe("PredictBatch", model, "", grpc.StatusCode.OK, t0)
        return response

    # ------------------------------------------------------------------ stream
    async def PredictStream(self, request_iterator: AsyncIterator[pb.PredictRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PredictStreamResponse]:
        """Rows are scored concurrently (up to MAX_STREAM_INFLIGHT at once; reading pauses beyond that)
        and answered in COMPLETION order, not request order: every response carries its request_id
        (generated when the request had none) for the client to match. A bad row gets a response
        with `error` and the stream goes on. The stream's deadline, if any, applies to every row."""
        out: asyncio.Queue[Any] = asyncio.Queue()
        outstanding: set[asyncio.Future[Any]] = set()
        slot_free = asyncio.Event()
        predictor = self.predictor
        loop = asyncio.get_running_loop()

        def done(fut: asyncio.Future[Any], request: pb.PredictRequest, version: int, x: Any,
                 request_id: str, t0: float, failed_over: bool = False) -> None:
            outstanding.discard(fut)
            if fut.cancelled():
                return
            exc = fut.exception()
            if isinstance(exc, UnavailableError) and not failed_over:
                # The version failed the row: score it on the fallback (a task; the reader goes on).
                try:
                    retry = loop.create_task(predictor.failover(
                        request.model, version, request.features, request.dense, request.version,
                        _remaining(context), exc))
                except Exception as err:
                    exc = err
                else:
                    outstanding.add(retry)
                    retry.add_done_callback(partial(done, request=request, version=version, x=x,
                                                    request_id=request_id, t0=t0, failed_over=True))
                    return
            if exc is None:
                if failed_over:
                    version, x, score = fut.result()
                else:
                    score = fut.result()
                predictor.finish(request.model, version, x, request_id, request.routing_key, score, t0)
                self._observe("PredictStream", request.model, version, grpc.StatusCode.OK, t0)
                out.put_nowait(pb.PredictStreamResponse(request_id=request_id, prediction=pb.PredictResponse(
                    request_id=request_id, model=request.model, version=version, score=score)))
            else:
                out.put_nowait(self._row_error("PredictStream", request, exc, t0))
            if len(outstanding) < MAX_STREAM_INFLIGHT:
                slot_free.set()

        async def reader() -> None:
            try:
                async for request in request_iterator:
                    while len(outstanding) >= MAX_STREAM_INFLIGHT:
                        slot_free.clear()
                        await slot_free.wait()
                    t0 = time.perf_counter()
                    try:
                        if request.version:
                            self.auth.actor(context)
                        fut, version, x, request_id = predictor.start(
                            request.model, request.routing_key, request.request_id, request.features,
                            request.dense, request.version, _remaining(context))
                    except Exception as exc:
                        out.put_nowait(self._row_error("PredictStream", request, exc, t0))
                        continue
                    f = fut if isinstance(fut, asyncio.Future) else loop.create_task(fut)  # type: ignore[arg-type]
                    outstanding.add(f)
                    f.add_done_callback(partial(done, request=request, version=version, x=x,
                                                request_id=request_id, t0=t0))
                out.put_nowait(_READER_DONE)
            except BaseException as exc:  # the client went away or sent garbage: end the stream
                out.put_nowait(exc)
                raise

        read_task = loop.create_task(reader())
        finished_reading = False
        try:
            while True:
                item = await out.get()
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
        code = _status(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s row failed: %s: %s", method, type(exc).__name__, exc)
        self._observe(method, request.model, "", code, t0)
        return pb.PredictStreamResponse(request_id=request.request_id,
                                        error=pb.RowError(code=code.value[0], message=str(exc)))

    # ------------------------------------------------------------------ outcomes
    async def RecordOutcome(self, request: pb.RecordOutcomeRequest,
                            context: grpc.aio.ServicerContext) -> pb.RecordOutcomeResponse:
        t0 = time.perf_counter()
        try:
            await self.predictor.record_outcome(request.request_id, request.value)
        except Exception as exc:
            await self._fail(context, "RecordOutcome", "", exc, t0)
            raise
        self._observe("RecordOutcome", "", "", grpc.StatusCode.OK, t0)
        return pb.RecordOutcomeResponse()

    async def RecordOutcomes(self, request: pb.RecordOutcomesRequest,
                             context: grpc.aio.ServicerContext) -> pb.RecordOutcomesResponse:
        t0 = time.perf_counter()
        statuses = []
        for o in request.outcomes:
            try:
                await self.predictor.record_outcome(o.request_id, o.value)
                statuses.append(pb.RowError(code=0))
            except Exception as exc:
                code = _status(exc)
                statuses.append(pb.RowError(code=code.value[0], message=str(exc)))
        self._observe("RecordOutcomes", "", "", grpc.StatusCode.OK, t0)
        return pb.RecordOutcomesResponse(statuses=statuses)
