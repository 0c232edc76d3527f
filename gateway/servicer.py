"""gRPC servicers: translate protobuf to domain calls and domain errors to status codes. Nothing
else lives here."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc

from chimera.v1 import prediction_pb2 as pb
from chimera.v1 import prediction_pb2_grpc as pb_grpc
from gateway.auth import AdminAuth
from gateway.errors import status_for
from gateway.metrics import Metrics
from gateway.predictor import Predictor, RowInput
from registry import ValidationError

log = logging.getLogger(__name__)
MAX_BATCH_ROWS = 10_000


def _status(exc: BaseException) -> grpc.StatusCode:
    return status_for(exc)


def _row(r: pb.PredictRequest) -> RowInput:
    return RowInput(r.routing_key, r.request_id, r.features, r.dense)


class PredictionServicer(pb_grpc.PredictionServiceServicer):
    def __init__(self, predictor: Predictor, auth: AdminAuth, metrics: Metrics) -> None:
        self.predictor = predictor
        self.auth = auth
        self.metrics = metrics

    def _label(self, model: str) -> str:
        """Bounded label values: only registered model names become labels."""
        try:
            self.predictor.catalog.get(model)
            return model
        except Exception:
            return "_unknown"

    def _observe(self, method: str, model: str, version: int | str, code: grpc.StatusCode, t0: float) -> None:
        labels = (self._label(model), str(version or ""), method, code.name)
        self.metrics.request_latency.labels(*labels).observe(time.perf_counter() - t0)
        self.metrics.requests.labels(*labels).inc()

    async def _fail(self, context: grpc.aio.ServicerContext, method: str, model: str, exc: Exception,
                    t0: float) -> None:
        code = _status(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", method)
        self._observe(method, model, "", code, t0)
        await context.abort(code, str(exc) or type(exc).__name__)

    async def Predict(self, request: pb.PredictRequest,
                      context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        t0 = time.perf_counter()
        try:
            if request.version:
                self.auth.actor(context)
            s = await self.predictor.predict(request.model, _row(request), request.version)
        except Exception as exc:
            await self._fail(context, "Predict", request.model, exc, t0)
            raise  # unreachable: abort raises
        self._observe("Predict", request.model, s.version, grpc.StatusCode.OK, t0)
        return pb.PredictResponse(request_id=s.request_id, model=s.model, version=s.version, score=s.score)

    async def PredictBatch(self, request: pb.PredictBatchRequest,
                           context: grpc.aio.ServicerContext) -> pb.PredictBatchResponse:
        t0 = time.perf_counter()
        model = request.model or (request.rows[0].model if request.rows else "")
        try:
            if not request.rows:
                raise ValidationError("rows: empty batch")
            if len(request.rows) > MAX_BATCH_ROWS:
                raise ValidationError(f"rows: {len(request.rows)} rows, limit {MAX_BATCH_ROWS}")
            pinned = 0
            for i, r in enumerate(request.rows):
                if r.model and r.model != model:
                    raise ValidationError(f"rows[{i}].model: {r.model!r} differs from batch model {model!r}")
                if r.version:
                    pinned = pinned or r.version
                    if r.version != pinned:
                        raise ValidationError(f"rows[{i}].version: one pinned version per batch")
            if pinned:
                self.auth.actor(context)
            results = await self.predictor.predict_many(model, [_row(r) for r in request.rows], pinned)
        except Exception as exc:
            await self._fail(context, "PredictBatch", model, exc, t0)
            raise
        self._observe("PredictBatch", model, "", grpc.StatusCode.OK, t0)
        return pb.PredictBatchResponse(results=[
            pb.PredictResponse(request_id=s.request_id, model=s.model, version=s.version, score=s.score)
            for s in results])

    async def PredictStream(self, request_iterator: AsyncIterator[pb.PredictRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PredictStreamResponse]:
        """Rows are answered in order; a bad row gets an error response and the stream goes on."""
        async for request in request_iterator:
            t0 = time.perf_counter()
            try:
                if request.version:
                    self.auth.actor(context)
                s = await self.predictor.predict(request.model, _row(request), request.version)
            except Exception as exc:
                code = _status(exc)
                self._observe("PredictStream", request.model, "", code, t0)
                yield pb.PredictStreamResponse(request_id=request.request_id,
                                               error=pb.RowError(code=code.value[0], message=str(exc)))
                continue
            self._observe("PredictStream", request.model, s.version, grpc.StatusCode.OK, t0)
            yield pb.PredictStreamResponse(request_id=s.request_id, prediction=pb.PredictResponse(
                request_id=s.request_id, model=s.model, version=s.version, score=s.score))

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
