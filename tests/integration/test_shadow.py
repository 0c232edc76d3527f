"""Shadow (mirror) versions through a live gateway: every accepted Predict, PredictBatch and stream row
is scored by the shadow version too and logged under the same request id, while callers only ever
see the served version's score; a hung shadow, a full mirror queue or a shadow with other features
never fails or holds a caller."""

from __future__ import annotations

import os
import signal
import time
import uuid

import numpy as np
import onnxruntime as ort
import pytest
from sqlalchemy import select

from chimera.v1 import prediction_pb2 as pb
from registry import Registry
from registry.models import Prediction, ShadowPrediction
from tests.harness import GatewayThread, replica_pids, small_onnx, wait_for

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


def onnx_scores(data: bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(["probabilities"], {sess.get_inputs()[0].name: x.astype(np.float32)})[0][:, 1]


ROW = [0.5, 0.1, 0.2, 0.3]


def predict(gw: GatewayThread, model: str, request_id: str, **row: object) -> pb.PredictResponse:
    row = row or {"dense": ROW}
    return gw.predict.Predict(pb.PredictRequest(model=model, request_id=request_id, **row), timeout=5)


def shadow_rows(reg: Registry, model: str) -> dict[str, tuple[int, float]]:
    with reg.engine.connect() as c:
        q = select(ShadowPrediction.request_id, ShadowPrediction.version, ShadowPrediction.score)
        return {rid: (v, s) for rid, v, s in c.execute(q.where(ShadowPrediction.model == model))}


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("shadow")
    reg = Registry(f"sqlite:///{tmp / 'registry.db'}")
    reg.upgrade()
    model = "sh" + uuid.uuid4().hex[:6]
    b1, names = small_onnx(seed=1)
    b2, _ = small_onnx(seed=2, flip=True)
    reg.publish_version(model, b1, names, status="production")
    reg.publish_version(model, b2, names, status="staged")
    reg.set_split(model, {1: 100}, expected_revision=0, actor="test")
    reg.set_shadow(model, 2, actor="test")
    gw = GatewayThread(reg.url, tmp, controller_interval_s=0).start()
    g = gw.gateway
    assert g is not None
    wait_for(lambda: g.pool.is_ready(model, 2), 60, "the shadow's replicas")
    try:
        yield reg, gw, model, {1: b1, 2: b2}
    finally:
        gw.stop()
        reg.dispose()


def test_every_path_is_mirrored_and_callers_only_see_the_served_version(mirrored) -> None:
    reg, gw, model, onnx = mirrored
    g = gw.gateway
    rng = np.random.default_rng(7)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    served: dict[str, float] = {}
    for i in range(40):
        r = gw.predict.Predict(pb.PredictRequest(model=model, request_id=f"u{i}", routing_key=f"k{i}",
                                                 dense=x[i].tolist()), timeout=5)
        assert r.version == 1
        served[r.request_id] = r.score
    rows = [pb.PredictRequest(request_id=f"b{i}", routing_key=f"k{i}", dense=x[i].tolist())
            for i in range(40, 80)]
    batch = gw.predict.PredictBatch(pb.PredictBatchRequest(model=model, rows=rows), timeout=5)
    assert {r.version for r in batch.results} == {1}
    served.update((r.request_id, r.score) for r in batch.results)
    stream = gw.predict.PredictStream(iter([
        pb.PredictRequest(model=model, request_id=f"s{i}", routing_key=f"k{i}", dense=x[i].tolist())
        for i in range(80, 120)]), timeout=10)
    for r in stream:
        assert r.prediction.version == 1
        served[r.request_id] = r.prediction.score

    ids = [f"u{i}" for i in range(40)] + [f"b{i}" for i in range(40, 80)] + [f"s{i}" for i in range(80, 120)]
    expected_served = onnx_scores(onnx[1], x)
    expected_shadow = onnx_scores(onnx[2], x)
    np.testing.assert_allclose([served[i] for i in ids], expected_served, atol=1e-6)

    wait_for(lambda: len(set(ids) & set(shadow_rows(reg, model))) == len(ids), 10, "the shadow rows")
    rows = shadow_rows(reg, model)
    assert {rows[i][0] for i in ids} == {2}
    np.testing.assert_allclose([rows[i][1] for i in ids], expected_shadow, atol=1e-6)
    assert not np.allclose(expected_served, expected_shadow)  # the two versions really differ
    # The prediction log holds what was served, never the shadow's score.
    g.log.flush()
    with reg.engine.connect() as c:
        logged = dict(c.execute(select(Prediction.request_id, Prediction.version)
                                .where(Prediction.model == model)).tuples().all())
    assert {logged[i] for i in ids} == {1}
    assert g.metrics.registry.get_sample_value(
        "chimera_shadow_rows_total", {"model": model, "version": "2", "result": "scored"}) >= len(ids)


def test_a_full_mirror_queue_drops_mirroring_not_requests(mirrored) -> None:
    reg, gw, model, _ = mirrored
    g = gw.gateway
    before = g.shadow.counts.get((model, 2, "dropped"), 0)
    g.shadow.max_pending_rows = 50
    try:
        rows = [pb.PredictRequest(request_id=f"full{i}", dense=ROW) for i in range(80)]
        batch = gw.predict.PredictBatch(pb.PredictBatchRequest(model=model, rows=rows), timeout=5)
    finally:
        g.shadow.max_pending_rows = 8192
    assert len(batch.results) == 80 and {r.version for r in batch.results} == {1}
    assert g.shadow.counts.get((model, 2, "dropped"), 0) - before == 80


def test_mirrored_rows_share_ray_calls_even_at_concurrency_one(mirrored) -> None:
    """A caller sending one request at a time gets one Ray call per request on the served version, but
    the shadow's copies wait up to 0.1 s in the mirror lane and go out together: a handful of calls for
    30 rows, not 30, so mirroring does not double the Ray calls of a quiet gateway."""
    reg, gw, model, _ = mirrored
    g = gw.gateway
    shadow, served = g.pool.get(model, 2).stats, g.pool.get(model, 1).stats
    before = (shadow.batches, shadow.rows, served.batches)
    ids = [f"lane{i}" for i in range(30)]
    for rid in ids:
        assert predict(gw, model, rid).version == 1
    wait_for(lambda: set(ids) <= set(shadow_rows(reg, model)), 10, "the mirrored rows")
    assert shadow.rows - before[1] == 30
    assert served.batches - before[2] >= 30  # the served rows: one call each
    assert shadow.batches - before[0] <= 10, shadow.batches - before[0]


def test_a_hung_shadow_never_holds_or_fails_a_caller(mirrored) -> None:
    reg, gw, model, _ = mirrored
    g = gw.gateway
    (pid,) = replica_pids(model, 2)
    os.kill(pid, signal.SIGSTOP)
    try:
        slowest = 0.0
        for i in range(60):  # spans the 3 s stall timeout after which the shadow is marked down
            t0 = time.monotonic()
            r = predict(gw, model, f"hung{i}")
            slowest = max(slowest, time.monotonic() - t0)
            assert r.version == 1
            time.sleep(0.08)
        # The shadow's calls waited out the stall timeout (3 s); no caller waited with them.
        assert slowest < 1.5, slowest
        wait_for(lambda: g.version_health.is_down(model, 2), 10, "the shadow to be marked down")
        assert g.shadow.counts.get((model, 2, "failed"), 0) > 0
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: not g.version_health.is_down(model, 2), 30, "the shadow to answer again")
    predict(gw, model, "back")
    wait_for(lambda: "back" in shadow_rows(reg, model), 10, "mirroring to resume")


def test_a_shadow_with_other_features_skips_rows_it_cannot_read(mirrored) -> None:
    reg, gw, model, _ = mirrored
    g = gw.gateway
    b3, names3 = small_onnx(n_features=5, seed=3)
    reg.publish_version(model, b3, names3, status="staged")
    reg.set_shadow(model, 3, actor="test")
    wait_for(lambda: g.catalog.get(model).shadow == 3 and g.pool.is_ready(model, 3), 60, "shadow v3")
    r = predict(gw, model, "four")
    assert r.version == 1
    assert g.shadow.counts.get((model, 3, "skipped"), 0) == 1
    # Named features that cover both versions are mirrored.
    named = {"f0": 0.5, "f1": 0.1, "f2": 0.2, "f3": 0.3, "f4": -1.0}
    r = predict(gw, model, "five", features=named)
    assert r.version == 1
    wait_for(lambda: shadow_rows(reg, model).get("five", (0,))[0] == 3, 10, "the v3 shadow row")

    reg.set_shadow(model, None, actor="test")
    wait_for(lambda: g.catalog.get(model).shadow is None, 10, "the shadow to be removed")
    predict(gw, model, "unmirrored")
    time.sleep(1.0)  # two writer flushes
    assert "unmirrored" not in shadow_rows(reg, model)
