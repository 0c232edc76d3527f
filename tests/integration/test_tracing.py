"""OpenTelemetry tracing: a client's W3C traceparent becomes the parent of the gateway's spans, and the
trace continues through routing, the micro-batch and the Ray call into the replica (real Ray, real gRPC
over loopback, real onnxruntime, the in-memory exporter on both sides). With tracing off, no span is
started and no context is extracted, and the responses are the same."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from chimera.tracing import (
    EXPORTERS,
    OTLP_PACKAGE,
    Tracing,
    TracingConfigError,
    batch_parent,
    context_from_metadata,
    span_dicts,
)
from chimera.v1 import prediction_pb2 as pb
from gateway.serving.batcher import MicroBatcher
from registry import Registry
from replicas.scorer import OnnxScorer
from tests.harness import GatewayThread, small_onnx

ROWS = [[0.3, -0.2, 0.1, 0.9], [-1.0, 0.5, 0.0, 0.2], [0.7, 0.7, -0.3, -0.1], [0.0, 0.0, 1.0, 1.0],
        [2.0, -1.5, 0.4, 0.3]]


# ---------------------------------------------------------------------------- unit

def test_exporter_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from chimera.settings import TRACES_EXPORTERS, Settings

    assert TRACES_EXPORTERS == EXPORTERS
    monkeypatch.delenv("CHIMERA_TRACES_EXPORTER", raising=False)
    assert Settings.from_env().traces_exporter == "none"
    monkeypatch.setenv("CHIMERA_TRACES_EXPORTER", "Console")
    assert Settings.from_env().traces_exporter == "console"
    monkeypatch.setenv("CHIMERA_TRACES_EXPORTER", "jaeger")
    with pytest.raises(ValueError, match="CHIMERA_TRACES_EXPORTER.*none, console, otlp, memory"):
        Settings.from_env()
    with pytest.raises(TracingConfigError, match="jaeger"):
        Tracing("jaeger")
    off = Tracing("none")
    assert off.tracer is None and not off.enabled and off.finished_spans() == []


def test_otlp_exporter_needs_its_package(tmp_path: Path) -> None:
    """Without opentelemetry-exporter-otlp: a clear error at start-up that names the package (and the
    gateway does not start); with it, an OTLP exporter (spans batched; nothing is sent here)."""
    from gateway.server import Gateway, GatewayConfig

    try:
        import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # noqa: F401
    except ImportError:
        with pytest.raises(TracingConfigError, match=f"needs the {OTLP_PACKAGE} package.*pip install"):
            Tracing("otlp")
        with pytest.raises(TracingConfigError, match=OTLP_PACKAGE):
            Gateway(GatewayConfig(registry_url=f"sqlite:///{tmp_path / 'r.db'}", traces_exporter="otlp"))
        assert not (tmp_path / "r.db").exists()  # failed before touching anything
    else:
        t = Tracing("otlp")
        assert t.enabled
        t.shutdown()


def test_traceparent_metadata_is_the_parent() -> None:
    md = (("user-agent", "x"), ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"))
    from opentelemetry import trace

    sc = trace.get_current_span(context_from_metadata(md)).get_span_context()
    assert (f"{sc.trace_id:032x}", f"{sc.span_id:016x}") == ("0af7651916cd43dd8448eb211c80319c",
                                                             "b7ad6b7169203331")
    assert sc.is_remote
    for bad in ((), None, (("traceparent", "garbage"),)):
        assert not trace.get_current_span(context_from_metadata(bad)).get_span_context().is_valid


def test_batch_span_is_child_of_first_caller_and_links_the_others() -> None:
    tracing = Tracing("memory")
    tracer = tracing.tracer
    assert tracer is not None

    async def score(rows: np.ndarray) -> np.ndarray:
        with tracer.start_as_current_span("inner"):  # the score function sees the batch span as current
            return rows[:, 0].astype(np.float64)

    async def main() -> list[float]:
        batcher = MicroBatcher(score, tracer=tracer, span_attributes={"chimera.model": "m"})
        futures = []
        for i in range(3):
            with tracer.start_as_current_span(f"caller{i}"):
                futures.append(batcher.enqueue(np.full((1, 2), float(i), dtype=np.float32), one=True))
        results = await asyncio.gather(*futures)
        await batcher.close()
        return results

    assert asyncio.run(main()) == [0.0, 1.0, 2.0]
    spans = {s["name"]: s for s in span_dicts(tracing.memory.get_finished_spans())}
    batch = spans["chimera.batch"]
    assert batch["parent_span_id"] == spans["caller0"]["span_id"]
    assert batch["links"] == [spans["caller1"]["span_id"], spans["caller2"]["span_id"]]
    attrs = batch["attributes"]
    assert (attrs["chimera.batch.rows"], attrs["chimera.batch.callers"]) == (3, 3)
    assert attrs["chimera.model"] == "m"
    assert spans["inner"]["parent_span_id"] == batch["span_id"]
    assert batch_parent([None]) == (None, [])


# ---------------------------------------------------------------------------- real Ray, gRPC, onnxruntime

pytest_ray = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path, np.ndarray]:
    """A fresh model with one version at 100 %, and the scores onnxruntime gives ROWS directly."""
    tmp = tmp_path_factory.mktemp("tracing")
    url = f"sqlite:///{tmp / 'registry.db'}"
    reg = Registry(url)
    reg.upgrade()
    model = "tr" + uuid.uuid4().hex[:8]
    data, names = small_onnx(seed=3)
    reg.publish_version(model, data, names, status="production")
    reg.set_split(model, {1: 100}, expected_revision=0, actor="test")
    reg.dispose()
    expected = OnnxScorer(data, hashlib.sha256(data).hexdigest()).score(np.array(ROWS))
    return url, model, tmp, expected


class Client:
    """The client's own tracer: it starts a span and sends its context as `traceparent` metadata."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = provider.get_tracer("client")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        return tuple(carrier.items())


def call_all(gw: GatewayThread, model: str, client: Client | None) -> dict[str, Any]:
    """Predict, PredictBatch and PredictStream on ROWS, each in a client span of its own when a client
    is given (and with a traceparent even without one, which a gateway that does not trace ignores)."""
    fixed = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    out: dict[str, Any] = {}

    def traced(name: str, call: Any) -> Any:
        if client is None:
            return call((("traceparent", fixed),))
        with client.tracer.start_as_current_span(name) as span:
            result = call(client.metadata())
        out[name + ".span"] = f"{span.get_span_context().span_id:016x}"
        out[name + ".trace"] = f"{span.get_span_context().trace_id:032x}"
        return result

    out["predict"] = traced("client.predict", lambda md: gw.predict.Predict(
        pb.PredictRequest(model=model, request_id="p0", routing_key="k0", dense=ROWS[0]), metadata=md,
        timeout=30))
    out["batch"] = traced("client.batch", lambda md: gw.predict.PredictBatch(pb.PredictBatchRequest(
        model=model, rows=[pb.PredictRequest(request_id=f"b{i}", routing_key=f"k{i}", dense=r)
                           for i, r in enumerate(ROWS)]), metadata=md, timeout=30))
    out["stream"] = traced("client.stream", lambda md: list(gw.predict.PredictStream(iter(
        [pb.PredictRequest(model=model, request_id=f"s{i}", routing_key=f"k{i}", dense=r)
         for i, r in enumerate(ROWS[:2])]), metadata=md, timeout=30)))
    return out


def replica_spans(model: str) -> list[dict[str, Any]]:
    from ray import serve

    from replicas.deployment import app_name

    return serve.get_app_handle(app_name(model, 1)).finished_spans.remote().result(timeout_s=30)


def check_responses(out: dict[str, Any], model: str, expected: np.ndarray) -> None:
    p = out["predict"]
    assert (p.request_id, p.model, p.version) == ("p0", model, 1)
    assert p.score == pytest.approx(expected[0], abs=1e-6)
    b = out["batch"].results
    assert [r.request_id for r in b] == [f"b{i}" for i in range(len(ROWS))] and {r.version for r in b} == {1}
    assert [r.score for r in b] == pytest.approx(expected.tolist(), abs=1e-6)
    s = sorted((r.prediction.request_id, r.prediction.score) for r in out["stream"])
    assert [rid for rid, _ in s] == ["s0", "s1"]
    assert [x for _, x in s] == pytest.approx(expected[:2], abs=1e-6)


def one(spans: list[dict[str, Any]], name: str, **where: Any) -> dict[str, Any]:
    found = [s for s in spans if s["name"] == name and all(s.get(k) == v for k, v in where.items())]
    assert len(found) == 1, (name, where, [(s["name"], s["parent_span_id"]) for s in spans])
    return found[0]


def chain_below(spans: list[dict[str, Any]], server: dict[str, Any], replica: list[dict[str, Any]],
                model: str, rows: int) -> None:
    """server → route; server → batch → ray_call → replica.score, one trace, model/version attributes."""
    trace = server["trace_id"]
    route = one(spans, "chimera.route", parent_span_id=server["span_id"])
    batch = one(spans, "chimera.batch", parent_span_id=server["span_id"])
    call = one(spans, "chimera.ray_call", parent_span_id=batch["span_id"])
    score = one(replica, "chimera.replica.score", parent_span_id=call["span_id"])
    for s in (route, batch, call, score):
        assert s["trace_id"] == trace
        assert s["attributes"]["chimera.model"] == model and s["attributes"]["chimera.version"] == 1, s
    assert call["kind"] == "CLIENT" and score["kind"] == "SERVER"
    assert batch["attributes"]["chimera.batch.rows"] == rows
    assert batch["attributes"]["chimera.batch.queue_wait_ms"] >= 0
    assert call["attributes"]["chimera.rows"] == rows and score["attributes"]["chimera.rows"] == rows
    assert score["attributes"]["chimera.inference_ms"] >= 0


@pytest_ray
def test_trace_goes_from_the_client_to_the_replica(published, tmp_path: Path) -> None:
    url, model, _, expected = published
    client = Client()
    gw = GatewayThread(url, tmp_path, controller_interval_s=0, traces_exporter="memory").start()
    try:
        out = call_all(gw, model, client)
        check_responses(out, model, expected)
        spans = gw.gateway.tracing.finished_spans()
        replica = replica_spans(model)
    finally:
        gw.stop()

    predict = one(spans, "chimera.Predict")
    assert predict["kind"] == "SERVER"
    assert (predict["trace_id"], predict["parent_span_id"]) == (out["client.predict.trace"],
                                                                out["client.predict.span"])
    assert predict["attributes"] == {"rpc.system": "grpc", "rpc.service": "chimera.v1.PredictionService",
                                     "rpc.method": "Predict", "chimera.model": model, "chimera.rows": 1,
                                     "chimera.version": 1, "rpc.grpc.status_code": 0}
    chain_below(spans, predict, replica, model, rows=1)

    batch = one(spans, "chimera.PredictBatch")
    assert (batch["trace_id"], batch["parent_span_id"]) == (out["client.batch.trace"],
                                                            out["client.batch.span"])
    assert batch["attributes"]["chimera.rows"] == len(ROWS) and batch["attributes"]["chimera.version"] == 1
    assert batch["attributes"]["rpc.grpc.status_code"] == 0
    chain_below(spans, batch, replica, model, rows=len(ROWS))

    # A stream is one server span; its rows' batches are its children or link to it.
    stream = one(spans, "chimera.PredictStream")
    assert (stream["trace_id"], stream["parent_span_id"]) == (out["client.stream.trace"],
                                                              out["client.stream.span"])
    assert stream["attributes"]["chimera.rows"] == 2
    batches = [s for s in spans if s["name"] == "chimera.batch"
               and (s["parent_span_id"] == stream["span_id"] or stream["span_id"] in s["links"])]
    assert sum(s["attributes"]["chimera.batch.callers"] for s in batches) == 2

    # Every gateway span belongs to one of the client's three traces: nothing was started without a parent.
    traces = {out[f"client.{n}.trace"] for n in ("predict", "batch", "stream")}
    assert {s["trace_id"] for s in spans} == traces


@pytest_ray
def test_tracing_off_starts_no_span_and_answers_the_same(published, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default (`none`), requests carrying a traceparent start no span anywhere in the process
    (every SDK tracer goes through Tracer.start_span), extract no context, and the replica it deploys
    records nothing; the responses are the onnxruntime scores, as with tracing on."""
    from opentelemetry.sdk.trace import Tracer as SdkTracer

    url, model, _, expected = published
    calls = {"start_span": 0, "extract": 0}
    start_span, extract = SdkTracer.start_span, TraceContextTextMapPropagator.extract

    def counting_start_span(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["start_span"] += 1
        return start_span(self, *args, **kwargs)

    def counting_extract(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["extract"] += 1
        return extract(self, *args, **kwargs)

    gw = GatewayThread(url, tmp_path, controller_interval_s=0).start()
    try:
        g = gw.gateway
        assert g.tracing.tracer is None and g.pool.tracer is None and g.predictor.tracer is None
        monkeypatch.setattr(SdkTracer, "start_span", counting_start_span)
        monkeypatch.setattr(TraceContextTextMapPropagator, "extract", counting_extract)
        out = call_all(gw, model, None)
        monkeypatch.undo()
        check_responses(out, model, expected)
        assert calls == {"start_span": 0, "extract": 0}
        assert replica_spans(model) == []
    finally:
        gw.stop()
