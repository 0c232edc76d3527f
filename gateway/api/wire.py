"""What happens to a call before the servicer sees it: request decoding and the optional Predict token.

grpc answers a request body it cannot decode with UNKNOWN ("Unexpected DecodeError", measured on grpcio
1.85), which tells a client nothing and looks like a server fault. A client mistake must never be
UNKNOWN or INTERNAL, so every method is registered with a tolerant deserializer: bytes that do not
parse become a `Malformed` marker, and the method answers INVALID_ARGUMENT naming the message type.
Streams do the same on the first undecodable message (the stream ends with INVALID_ARGUMENT).

The wrapping happens once, at registration (see `register`), so the per-call cost is one isinstance
check and, with a Predict token configured, one metadata lookup and a constant-time compare.

Decoding rules worth knowing (protobuf, not ours): a map with the same key twice keeps the LAST value;
a field sent with the wrong wire type (e.g. a varint where `dense` is expected) is kept as an unknown
field and the known field stays empty; a `string` field holding invalid UTF-8 does not decode.

Load shedding: `Admission.max_active` caps the calls being handled at once over every wrapped method
(health and reflection are not wrapped, so a load balancer's probe still gets through). A call beyond
the cap is answered RESOURCE_EXHAUSTED at once, not queued: a queue in front of a saturated gateway
only turns overload into timeouts, and thousands of waiting calls without deadlines into memory.
The count is two integer updates per call on the event loop thread (no lock needed)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from gateway.api.auth import AuthError, TokenAuth
from gateway.drain import Admission

SHED_MESSAGE = ("gateway is at its limit of {} concurrent calls (CHIMERA_MAX_CONCURRENT_CALLS); retry "
                "with backoff or on another instance")

log = logging.getLogger(__name__)


class Malformed:
    """Stands in for a request whose bytes did not decode."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class MalformedRequestError(ValueError):
    """A streamed message did not decode (ends the stream with INVALID_ARGUMENT)."""


def tolerant(deserializer: Callable[[bytes], Any] | None, type_name: str) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data) if deserializer is not None else data
        except Exception as exc:
            return Malformed(f"request: not a valid {type_name} message ({exc.__class__.__name__}: "
                             f"{str(exc).rpartition(': ')[2] or 'cannot decode'})")

    return parse


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for r in requests:
        if isinstance(r, Malformed):
            raise MalformedRequestError(r.message)
        yield r


def _wrap(handler: grpc.RpcMethodHandler, type_name: str, auth: TokenAuth | None, name: str = "",
          inflight: dict[str, int] | None = None,
          admission: Admission | None = None) -> grpc.RpcMethodHandler:
    deserialize = tolerant(handler.request_deserializer, type_name)
    serialize = handler.response_serializer
    calls = inflight if inflight is not None else {}
    calls.setdefault(name, 0)
    gate = admission if admission is not None else Admission()

    async def enter(context: grpc.aio.ServicerContext) -> None:
        """Refuse the call when closing or at the concurrency cap; else count it (see `leave`)."""
        if gate.closed:
            await gate.refuse(context)
        cap = gate.max_active
        if cap is not None and gate.active >= cap:
            gate.shed += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, SHED_MESSAGE.format(cap))
        gate.active += 1
        calls[name] += 1

    def leave() -> None:
        gate.active -= 1
        calls[name] -= 1

    async def check(context: grpc.aio.ServicerContext) -> None:
        if auth is not None:
            try:
                auth.check(context)
            except AuthError as exc:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))

    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await enter(context)
            try:
                if isinstance(request, Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                if auth is not None:
                    await check(context)
                return await inner_uu(request, context)
            finally:
                leave()

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, serialize)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await enter(context)
            try:
                if isinstance(request, Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                await check(context)
                async for response in inner_us(request, context):
                    yield response
            finally:
                leave()

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, serialize)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            await enter(context)
            try:
                await check(context)
                return await inner_su(_checked(requests), context)
            except MalformedRequestError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            finally:
                leave()

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserialize, serialize)
    inner_ss = handler.stream_stream
    assert inner_ss is not None

    async def stream_stream(requests: AsyncIterator[Any],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await enter(context)
        try:
            await check(context)
            async for response in inner_ss(_checked(requests), context):
                yield response
        except MalformedRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            leave()

    return grpc.stream_stream_rpc_method_handler(stream_stream, deserialize, serialize)


class _Registrar:
    """Looks like a grpc server to generated `add_*Servicer_to_server` functions and hands the real
    server wrapped method handlers."""

    def __init__(self, server: grpc.aio.Server, auth: TokenAuth | None, types: dict[str, str],
                 inflight: dict[str, int] | None, admission: Admission | None,
                 method_auth: dict[str, TokenAuth | None] | None = None) -> None:
        self.server = server
        self.auth = auth
        self.method_auth = method_auth or {}
        self.types = types
        self.inflight = inflight
        self.admission = admission

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: the generated code registers the same methods through the call below."""

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        wrapped = {name: _wrap(h, self.types.get(name, name), self.method_auth.get(name, self.auth), name,
                               self.inflight, self.admission)
                   for name, h in handlers.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        add = getattr(self.server, "add_registered_method_handlers", None)
        if add is not None:
            add(service, wrapped)


def register(add_to_server: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server,
             service_descriptor: Any, auth: TokenAuth | None = None,
             inflight: dict[str, int] | None = None, admission: Admission | None = None,
             method_auth: dict[str, TokenAuth | None] | None = None) -> None:
    """`add_to_server(servicer, server)` (a generated function) with tolerant decoding on every method
    and, when `auth` is given, its token required on every method (`method_auth` names methods that
    take another token instead, e.g. RecordOutcome with the outcomes token). `inflight` (method -> calls being
    handled) is kept up to date: two integer updates per call, read by the metrics at scrape time.
    Once `admission` is closed, new calls are refused with UNAVAILABLE (see gateway.drain)."""
    types = {m.name: m.input_type.full_name for m in service_descriptor.methods}
    add_to_server(servicer, _Registrar(server, auth, types, inflight, admission, method_auth))
