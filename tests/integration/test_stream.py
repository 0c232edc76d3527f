"""PredictStream and deadlines over real gRPC.

Most tests run the real servicer, predictor, micro-batcher and prediction log behind a real
grpc.aio server, with the replica replaced by a local scoring function (fast, no Ray): they pin
the stream's semantics (concurrent, completion order, one response per request carrying its
request_id, bad rows answered with an error and the stream going on) and deadline handling. The
last test runs the whole path with Ray Serve replicas (session `ray_cluster`)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from chimera.v1 import prediction_pb2 as pb
from chimera.v1 import prediction_pb2_grpc as pb_grpc
from gateway.api.auth import AdminAuth
from gateway.api.prediction import PredictionServicer
from gateway.metrics import Metrics
from gateway.records.outcome_intake import OutcomeIntake
from gateway.records.prediction_log import PredictionLog
from gateway.serving.batcher import MicroBatcher
from gateway.serving.catalog import Catalog, ModelEntry
from gateway.serving.features import Schema
from gateway.serving.predictor import Predictor
from gateway.serving.replica_pool import ReplicaPool
from gateway.serving.router import Router
from registry import Registry

NAMES = ["a", "b", "c", "d"]
WEIGHTS = np.array([1.0, 2.0, 3.0, 4.0])
MODEL = "m"


def expected(row: list[float], version: int) -> float:
    """The local 'replica': a deterministic function of the row and the version."""
    return float(np.asarray(row, dtype=np.float32).astype(np.float64) @ WEIGHTS) + 1000.0 * version


class LocalGateway:
    """Servicer + predictor + batchers + log on a real grpc.aio server, in a background loop.
    `delay_s` makes every scoring call slow (deadline tests)."""

    def __init__(self, tmp: Path, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[int] = []  # rows per scoring call
        self.registry = Registry(f"sqlite:///{tmp / 'registry.db'}")
        self.registry.upgrade()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self.run(self._start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.PredictionServiceStub(self.channel)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> int:
        catalog = Catalog(self.registry)
        schema = Schema(NAMES)
        catalog.install(ModelEntry(name=MODEL, metric="success_rate", revision=1,
                                   router=Router({1: 90, 2: 10}), schemas={1: schema, 2: schema}))
        self.pool = ReplicaPool("unused://")
        for version in (1, 2):
            self.pool._batchers[(MODEL, version)] = MicroBatcher(self._scorer(version), max_batch=64)
        self.log = PredictionLog(self.registry, Path(self.registry.url.split("///")[1]).parent / "spill")
        self.log.start()
        predictor = Predictor(catalog, self.pool, self.log)
        self.server = grpc.aio.server()
        outcomes = OutcomeIntake(self.registry, self.log)
        pb_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(predictor, outcomes, AdminAuth("token"), Metrics()), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def _scorer(self, version: int) -> Any:
        async def score(rows: np.ndarray) -> np.ndarray:
            self.calls.append(len(rows))
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            else:
                await asyncio.sleep(0.002)  # a call takes a moment, so rows pile up behind it
            return rows.astype(np.float64) @ WEIGHTS + 1000.0 * version

        return score

    def close(self) -> None:
        self.channel.close()
        self.run(self.server.stop(0))
        self.run(self.pool.close())
        self.log.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.registry.dispose()


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalGateway]:
    gw = LocalGateway(tmp_path)
    yield gw
    gw.close()


def _requests(n: int, bad: set[int] = frozenset(), ids: bool = True) -> list[pb.PredictRequest]:  # type: ignore[assignment]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        row = rng.normal(size=4).tolist()
        if i in bad:
            out.append(pb.PredictRequest(model=MODEL, request_id=f"r{i}" if ids else "", dense=row[:3]))
        elif i % 2:
            out.append(pb.PredictRequest(model=MODEL, routing_key=f"k{i}", request_id=f"r{i}" if ids else "",
                                         features=dict(zip(NAMES, row, strict=True))))
        else:
            out.append(pb.PredictRequest(model=MODEL, routing_key=f"k{i}", request_id=f"r{i}" if ids else "",
                                         dense=row))
    return out


def _row(req: pb.PredictRequest) -> list[float]:
    return list(req.dense) if req.dense else [req.features[n] for n in NAMES]


def test_stream_answers_every_request_once_with_its_request_id(local: LocalGateway) -> None:
    reqs = _requests(600, bad={7, 300})
    responses = list(local.stub.PredictStream(iter(reqs), timeout=60))
    assert len(responses) == len(reqs)
    by_id = {r.request_id: r for r in responses}
    assert len(by_id) == len(reqs)  # one response per request, none lost or doubled
    for i, req in enumerate(reqs):
        r = by_id[req.request_id]
        if i in (7, 300):
            assert r.WhichOneof("result") == "error"
            assert r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "dense" in r.error.message
        else:
            assert r.WhichOneof("result") == "prediction"
            p = r.prediction
            assert p.request_id == req.request_id and p.model == MODEL and p.version in (1, 2)
            assert p.score == pytest.approx(expected(_row(req), p.version), rel=1e-6)
    # Rows of one stream are scored concurrently: the batcher saw multi-row calls.
    assert max(local.calls) > 1 and len(local.calls) < len(reqs)
    assert local.log.flush()
    counts = local.registry.count_predictions(MODEL)
    assert sum(counts.values()) == len(reqs) - 2


def test_stream_generates_ids_and_answers_in_completion_order(local: LocalGateway) -> None:
    reqs = _requests(200, ids=False)
    responses = list(local.stub.PredictStream(iter(reqs), timeout=60))
    ids = [r.request_id for r in responses]
    assert len(set(ids)) == 200 and all(len(i) >= 16 for i in ids)
    assert all(r.prediction.request_id == r.request_id for r in responses)


def test_stream_from_an_async_client_with_many_in_flight(local: LocalGateway) -> None:
    async def main() -> list[pb.PredictStreamResponse]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{local.port}") as ch:
            call = pb_grpc.PredictionServiceStub(ch).PredictStream(timeout=60)
            for req in _requests(300):
                await call.write(req)
            await call.done_writing()
            return [r async for r in call]

    responses = asyncio.run(main())
    assert sorted(int(r.request_id[1:]) for r in responses) == list(range(300))


def test_unary_deadline_gives_deadline_exceeded_never_a_hang(tmp_path: Path) -> None:
    slow = LocalGateway(tmp_path, delay_s=2.0)
    try:
        import time

        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            slow.stub.Predict(pb.PredictRequest(model=MODEL, dense=[1, 2, 3, 4]), timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 1.5
        with pytest.raises(grpc.RpcError) as err:
            slow.stub.PredictBatch(pb.PredictBatchRequest(
                model=MODEL, rows=[pb.PredictRequest(dense=[1, 2, 3, 4])] * 10), timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.RpcError) as err:
            list(slow.stub.PredictStream(iter(_requests(5)), timeout=0.3))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Still serving afterwards, with enough time.
        r = slow.stub.Predict(pb.PredictRequest(model=MODEL, dense=[1, 2, 3, 4]), timeout=10)
        assert r.score == pytest.approx(expected([1, 2, 3, 4], r.version))
    finally:
        slow.close()


def test_predict_batch_matches_unary(local: LocalGateway) -> None:
    reqs = _requests(300)
    batch = local.stub.PredictBatch(pb.PredictBatchRequest(model=MODEL, rows=reqs), timeout=30)
    assert [r.request_id for r in batch.results] == [r.request_id for r in reqs]
    for req, res in zip(reqs, batch.results, strict=True):
        assert res.score == pytest.approx(expected(_row(req), res.version), rel=1e-6)
        one = local.stub.Predict(req, timeout=10) if int(req.request_id[1:]) % 50 == 0 else None
        if one is not None:
            assert one.version == res.version and one.score == pytest.approx(res.score)
    with pytest.raises(grpc.RpcError) as err:
        bad = list(reqs[:3]) + [pb.PredictRequest(dense=[1, 2, float("nan"), 4])]
        local.stub.PredictBatch(pb.PredictBatchRequest(model=MODEL, rows=bad), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rows[3].dense[2]" in err.value.details()


# ------------------------------------------------------------------ with Ray Serve replicas
@pytest.mark.usefixtures("ray_cluster")
def test_stream_end_to_end_through_ray_replicas(tmp_path: Path) -> None:
    from tests.harness import GatewayThread, small_onnx

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    reg = Registry(url)
    reg.upgrade()
    model = "s" + uuid.uuid4().hex[:8]
    b1, names = small_onnx(seed=1)
    b2, _ = small_onnx(seed=2, flip=True)
    reg.publish_version(model, b1, names)
    reg.publish_version(model, b2, names)
    reg.set_split(model, {1: 90, 2: 10}, expected_revision=0, actor="test")
    gw = GatewayThread(url, tmp_path).start()
    try:
        rng = np.random.default_rng(3)
        reqs = [pb.PredictRequest(model=model, routing_key=f"u{i}", request_id=f"s{i}",
                                  dense=rng.normal(size=4).tolist()) for i in range(400)]
        responses = list(gw.predict.PredictStream(iter(reqs), timeout=120))
        by_id = {r.request_id: r.prediction for r in responses}
        assert len(by_id) == 400 and all(r.WhichOneof("result") == "prediction" for r in responses)
        versions = {p.version for p in by_id.values()}
        assert versions <= {1, 2}
        for req in reqs[::40]:  # same key, same version and score as a unary call (batch size moves
            # onnxruntime's float32 result by up to ~4e-7)
            one = gw.predict.Predict(pb.PredictRequest(model=model, routing_key=req.routing_key,
                                                       dense=req.dense), timeout=30)
            assert one.version == by_id[req.request_id].version
            assert one.score == pytest.approx(by_id[req.request_id].score, abs=1e-6)
    finally:
        gw.stop()
        reg.dispose()
