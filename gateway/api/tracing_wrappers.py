"""Tracing wrappers for the PredictionService servicer (chimera.tracing is the ground floor these build
on). When tracing is on, `instrument` replaces the servicer's Predict, PredictBatch and PredictStream
with wrappers that open a SERVER span whose parent is the caller's `traceparent` metadata and keep it
current while the call runs (the batcher picks it up from there). When it is off nothing is installed:
the servicer's methods run as they are, with no per-call check at all."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer, set_span_in_context

from chimera.tracing import context_from_metadata
from chimera.v1 import prediction_pb2 as pb

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


def instrument(servicer: Any, tracer: Tracer) -> None:
    """Install the traced methods on `servicer` (instance attributes: what gateway.api.wire registers)."""
    servicer.Predict = _traced_unary(tracer, "Predict", servicer.Predict, _predict_attributes)
    servicer.PredictBatch = _traced_unary(tracer, "PredictBatch", servicer.PredictBatch, _batch_attributes)
    servicer.PredictStream = _traced_stream(tracer, "PredictStream", servicer.PredictStream)
