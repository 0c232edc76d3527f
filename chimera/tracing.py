"""OpenTelemetry tracing: builds a TracerProvider from the `CHIMERA_TRACES_EXPORTER` setting and offers
the few helpers the serving path needs to carry W3C trace context from a gRPC client through the
micro-batcher and across the Ray boundary to the replica.

Spans of one Predict: `chimera.Predict` (SERVER; parent: the caller's `traceparent` metadata) →
`chimera.route`, and → `chimera.batch` (one per Ray Serve call: a child of its first caller's span,
with links to the other callers whose rows it carries) → `chimera.ray_call` (CLIENT) →
`chimera.replica.score` (in the replica, parent taken from a W3C carrier dict passed with the rows).

Exporters: `none` (default), `console`, `otlp` (the opentelemetry-exporter-otlp package, the `otlp`
extra; it reads the standard OTEL_EXPORTER_OTLP_* variables itself), `memory` (tests).

Zero cost when off: with `none` nothing here is called on the request path. Callers hold a tracer
that is None when tracing is off and check it once (the servicer does not even do that: its traced
methods are installed at construction only when tracing is on).

Each gateway and each replica owns its provider (never the process-global one), so several gateways
with different settings can share a process (tests) and Ray Serve's own tracing, if enabled, is left
alone. Only the W3C TraceContext format is read and written (`traceparent`, `tracestate`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

EXPORTERS = ("none", "console", "otlp", "memory")
OTLP_PACKAGE = "opentelemetry-exporter-otlp"
MAX_LINKS = 128  # the SDK's default span link limit: a batch of many callers links the first 128
MEMORY_MAX_SPANS = 100_000  # the in-memory exporter keeps the latest spans only (a long test cannot grow it)

_PROPAGATOR = TraceContextTextMapPropagator()


class TracingConfigError(ValueError):
    """The traces exporter setting cannot be honoured (unknown name, exporter package missing)."""


def check_exporter(name: str | None) -> str:
    """The exporter name normalised (empty: `none`); raises for an unknown one, at start-up."""
    value = (name or "none").strip().lower()
    if value not in EXPORTERS:
        raise TracingConfigError(f"CHIMERA_TRACES_EXPORTER: {name!r} is not one of {', '.join(EXPORTERS)}")
    return value


def otlp_span_exporter() -> Any:
    """The OTLP exporter over gRPC, or over HTTP when OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL says
    http/protobuf. Endpoint, headers, TLS and timeouts come from the standard OTEL_EXPORTER_OTLP_*
    variables, read by the exporter itself."""
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()
    try:
        if protocol.startswith("http"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise TracingConfigError(
            f"CHIMERA_TRACES_EXPORTER=otlp needs the {OTLP_PACKAGE} package, which is not installed "
            f"({exc}): pip install 'chimera-serving[otlp]' (or {OTLP_PACKAGE}), or choose another "
            f"exporter ({', '.join(e for e in EXPORTERS if e != 'otlp')})") from exc
    return OTLPSpanExporter()


class Tracing:
    """One TracerProvider for one gateway or replica. `tracer` is None when the exporter is `none`:
    that None is the single check the hot path makes."""

    def __init__(self, exporter: str | None = "none", service_name: str = "chimera-gateway") -> None:
        self.exporter = check_exporter(exporter)
        self.memory: Any = None  # InMemorySpanExporter with the `memory` exporter
        self.provider: Any = None
        self.tracer: Tracer | None = None
        if self.exporter == "none":
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        if self.exporter == "otlp":
            processor: Any = BatchSpanProcessor(otlp_span_exporter())
        elif self.exporter == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            processor = BatchSpanProcessor(ConsoleSpanExporter())  # printing stays off the event loop
        else:
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

            self.memory = InMemorySpanExporter(max_spans=MEMORY_MAX_SPANS)
            processor = SimpleSpanProcessor(self.memory)  # finished spans are visible at once
        # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, when set, win over our default service name;
        # OTEL_TRACES_SAMPLER is read by the provider (default: parent-based, always on).
        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
        self.provider = TracerProvider(resource=Resource.create(attributes))
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("chimera")

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    def finished_spans(self) -> list[dict[str, Any]]:
        """Spans the `memory` exporter holds, as plain dicts (picklable, for tests over Ray)."""
        return span_dicts(self.memory.get_finished_spans()) if self.memory is not None else []

    def shutdown(self) -> None:
        """Flush batched spans (export them) and stop the exporter; tracing is off afterwards."""
        provider, self.provider, self.tracer = self.provider, None, None
        if provider is not None:
            provider.shutdown()


# ---------------------------------------------------------------------------- propagation

class _MetadataGetter(Getter[Sequence[tuple[str, Any]]]):
    """Reads gRPC invocation metadata (a sequence of (key, value) pairs, keys lower case)."""

    def get(self, carrier: Sequence[tuple[str, Any]], key: str) -> list[str] | None:
        values = [v for k, v in carrier if k == key and isinstance(v, str)]
        return values or None

    def keys(self, carrier: Sequence[tuple[str, Any]]) -> list[str]:
        return [k for k, _ in carrier]


_METADATA_GETTER = _MetadataGetter()


def context_from_metadata(metadata: Sequence[tuple[str, Any]] | None) -> Context:
    """The parent context a client sent as W3C `traceparent` (and `tracestate`) metadata; an empty
    context (the span becomes a root) when there is none or it is malformed."""
    return _PROPAGATOR.extract(metadata or (), getter=_METADATA_GETTER)


def context_from_carrier(carrier: Mapping[str, str]) -> Context:
    """The parent context in a W3C carrier dict (what crosses the Ray boundary)."""
    return _PROPAGATOR.extract(carrier)


def current_carrier() -> dict[str, str]:
    """The current span's context as a W3C carrier dict ({'traceparent': ..., maybe 'tracestate'})."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


def current_span_context() -> SpanContext:
    return trace.get_current_span().get_span_context()


def batch_parent(callers: Iterable[SpanContext | None]) -> tuple[Context | None, list[Link]]:
    """Parent and links of a span that serves many callers at once (a micro-batch): the first
    caller's span is the parent, the other distinct callers' spans are links (at most MAX_LINKS).
    None as parent (a root span) when no caller had a valid span context."""
    parent: SpanContext | None = None
    links: list[Link] = []
    seen: set[int] = set()
    for sc in callers:
        if sc is None or not sc.is_valid or sc.span_id in seen:
            continue
        seen.add(sc.span_id)
        if parent is None:
            parent = sc
        elif len(links) < MAX_LINKS:
            links.append(Link(sc))
        else:
            break
    if parent is None:
        return None, links
    return trace.set_span_in_context(NonRecordingSpan(parent)), links


def span_dicts(spans: Iterable[Any]) -> list[dict[str, Any]]:
    """ReadableSpans as plain dicts: name, kind, trace_id, span_id, parent_span_id (hex; None for a
    root), attributes, links (span ids), status."""
    out = []
    for s in spans:
        ctx = s.get_span_context()
        out.append({
            "name": s.name,
            "kind": s.kind.name,
            "trace_id": f"{ctx.trace_id:032x}",
            "span_id": f"{ctx.span_id:016x}",
            "parent_span_id": f"{s.parent.span_id:016x}" if s.parent is not None else None,
            "attributes": dict(s.attributes or {}),
            "links": [f"{link.context.span_id:016x}" for link in s.links],
            "status": s.status.status_code.name,
        })
    return out
