"""The canary's covariate through a live gateway (rollout.covariate, "production_score"): every routed row
the canary serves (Predict, PredictBatch, PredictStream) is also scored by the production version off the
request path, and that score is stored in shadow_predictions under production's version number, while
callers only ever see the canary's score; rows production served, pinned (load-test) rows and models
whose policy names no covariate get no mirror row; a full mirror queue drops covariates, never requests.
The controller then reads those scores as the canary rows' covariate (tests/integration/
test_covariate_rows.py covers the look on both backends)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import select

from chimera.v1 import prediction_pb2 as pb
from registry import Registry
from registry.models import ShadowPrediction
from registry.rollouts import look_rows
from tests.harness import ADMIN_MD, GatewayThread, small_onnx, wait_for
from tests.integration.test_shadow import onnx_scores

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


def mirror_rows(reg: Registry, model: str) -> dict[str, tuple[int, float]]:
    with reg.engine.connect() as c:
        q = select(ShadowPrediction.request_id, ShadowPrediction.version, ShadowPrediction.score)
        return {rid: (v, s) for rid, v, s in c.execute(q.where(ShadowPrediction.model == model))}


@pytest.fixture(scope="module")
def canary(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("covariate")
    reg = Registry(f"sqlite:///{tmp / 'registry.db'}")
    reg.upgrade()
    model = "cv" + uuid.uuid4().hex[:6]
    b1, names = small_onnx(seed=1)
    b2, _ = small_onnx(seed=2, flip=True)
    reg.publish_version(model, b1, names, status="production")  # metric: success_rate, a business metric
    reg.publish_version(model, b2, names, status="canary")
    reg.set_split(model, {1: 50, 2: 50}, expected_revision=0, actor="test")
    gw = GatewayThread(reg.url, tmp, controller_interval_s=0).start()  # no controller: the split stays
    g = gw.gateway
    assert g is not None
    wait_for(lambda: g.pool.is_ready(model, 1) and g.pool.is_ready(model, 2), 60, "both versions")
    assert g.catalog.get(model).covariate_from == 1
    try:
        yield reg, gw, model, {1: b1, 2: b2}
    finally:
        gw.stop()
        reg.dispose()


def test_canary_rows_get_productions_score_and_no_other_row_does(canary) -> None:
    reg, gw, model, onnx = canary
    rng = np.random.default_rng(11)
    x = rng.normal(size=(150, 4)).astype(np.float32)
    served: dict[str, tuple[int, float]] = {}
    for i in range(50):
        r = gw.predict.Predict(pb.PredictRequest(model=model, request_id=f"u{i}", routing_key=f"k{i}",
                                                 dense=x[i].tolist()), timeout=5)
        served[r.request_id] = (r.version, r.score)
    rows = [pb.PredictRequest(request_id=f"b{i}", routing_key=f"k{i}", dense=x[i].tolist())
            for i in range(50, 100)]
    batch = gw.predict.PredictBatch(pb.PredictBatchRequest(model=model, rows=rows), timeout=5)
    served.update((r.request_id, (r.version, r.score)) for r in batch.results)
    stream = gw.predict.PredictStream(iter([
        pb.PredictRequest(model=model, request_id=f"s{i}", routing_key=f"k{i}", dense=x[i].tolist())
        for i in range(100, 150)]), timeout=10)
    for r in stream:
        served[r.request_id] = (r.prediction.version, r.prediction.score)
    # A load test pinned to the canary (admin token): never the experiment's, never mirrored.
    pinned = [f"p{i}" for i in range(20)]
    for rid in pinned:
        r = gw.predict.Predict(pb.PredictRequest(model=model, request_id=rid, dense=x[0].tolist(), version=2),
                               metadata=ADMIN_MD, timeout=5)
        assert r.version == 2

    ids = ([f"u{i}" for i in range(50)] + [f"b{i}" for i in range(50, 100)]
           + [f"s{i}" for i in range(100, 150)])
    on_canary = [i for i in ids if served[i][0] == 2]
    on_prod = [i for i in ids if served[i][0] == 1]
    assert len(on_canary) > 30 and len(on_prod) > 30
    # Callers see the version that served them, with its own score.
    want = {1: onnx_scores(onnx[1], x), 2: onnx_scores(onnx[2], x)}
    pos = {rid: k for k, rid in enumerate(ids)}
    np.testing.assert_allclose([served[i][1] for i in ids], [want[served[i][0]][pos[i]] for i in ids],
                               atol=1e-6)

    wait_for(lambda: set(on_canary) <= set(mirror_rows(reg, model)), 10, "the covariate rows")
    time.sleep(1.0)  # two writer flushes: anything wrongly mirrored has landed too
    mirrored = mirror_rows(reg, model)
    assert {mirrored[i][0] for i in on_canary} == {1}  # under production's version number
    np.testing.assert_allclose([mirrored[i][1] for i in on_canary], [want[1][pos[i]] for i in on_canary],
                               atol=1e-6)
    assert not set(on_prod) & set(mirrored) and not set(pinned) & set(mirrored)

    # What the controller reads: every row has production's score as its covariate.
    gw.gateway.log.flush()
    rows_read = look_rows(reg, model, (1, 2), datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC))
    assert rows_read.routed.size == len(ids) and np.isfinite(rows_read.covariate).all()


def test_a_full_mirror_queue_drops_covariates_not_requests(canary) -> None:
    reg, gw, model, _ = canary
    g = gw.gateway
    before = g.shadow.counts.get((model, 1, "dropped"), 0)
    g.shadow.max_pending_rows = 5
    try:
        rows = [pb.PredictRequest(request_id=f"full{i}", routing_key=f"full{i}", dense=[0.5, 0.1, 0.2, 0.3])
                for i in range(80)]
        batch = gw.predict.PredictBatch(pb.PredictBatchRequest(model=model, rows=rows), timeout=5)
    finally:
        g.shadow.max_pending_rows = 8192
    assert len(batch.results) == 80
    on_canary = sum(r.version == 2 for r in batch.results)
    assert on_canary > 0 and g.shadow.counts.get((model, 1, "dropped"), 0) - before == on_canary


def test_no_covariate_mirror_when_the_policy_names_none(canary) -> None:
    reg, gw, model, _ = canary
    g = gw.gateway
    reg.set_rollout_config(model, {"covariate": ""})
    split = reg.get_split(model)
    reg.set_split(model, {1: 60, 2: 40}, expected_revision=split.revision, actor="test")  # gateways re-read
    try:
        wait_for(lambda: g.catalog.get(model).covariate_from is None, 10, "the policy to reach the gateway")
        ids = [f"off{i}" for i in range(40)]
        for rid in ids:
            gw.predict.Predict(pb.PredictRequest(model=model, request_id=rid, routing_key=rid,
                                                 dense=[0.5, 0.1, 0.2, 0.3]), timeout=5)
        time.sleep(1.0)  # two writer flushes
        assert not set(ids) & set(mirror_rows(reg, model))
    finally:
        reg.set_rollout_config(model, {})


def test_a_shadow_and_the_covariate_mirror_both_score_canary_rows(canary) -> None:
    """A canary row can need two mirror scores at once: the shadow version's (the shadow stage's pairs)
    and production's (its covariate). Both are stored, each under its own version (migration 0007: one
    row per request id and version); production's rows get the shadow's score only."""
    reg, gw, model, _ = canary
    g = gw.gateway
    b3, names = small_onnx(seed=3)
    v3 = reg.publish_version(model, b3, names, status="staged").version
    reg.set_shadow(model, v3, actor="test")
    try:
        wait_for(lambda: g.catalog.get(model).shadow == v3 and g.pool.is_ready(model, v3), 60,
                 "the shadow version")
        x = np.random.default_rng(12).normal(size=(60, 4)).astype(np.float32)
        served = {}
        for i in range(60):
            req = pb.PredictRequest(model=model, request_id=f"both{i}", routing_key=f"both{i}",
                                    dense=x[i].tolist())
            r = gw.predict.Predict(req, timeout=5)
            served[r.request_id] = r.version
        on_canary = {rid for rid, v in served.items() if v == 2}
        assert len(on_canary) > 10 and len(served) - len(on_canary) > 10

        def stored() -> set[tuple[str, int]]:
            with reg.engine.connect() as c:
                q = select(ShadowPrediction.request_id, ShadowPrediction.version)
                return {(rid, v) for rid, v in c.execute(q.where(ShadowPrediction.model == model))
                        if rid.startswith("both")}

        want = {(rid, v3) for rid in served} | {(rid, 1) for rid in on_canary}
        wait_for(lambda: want <= stored(), 10, "the shadow's and the covariate's rows")
        time.sleep(1.0)  # two writer flushes: anything wrongly mirrored has landed too
        assert stored() == want
        scores = onnx_scores(b3, x)
        with reg.engine.connect() as c:
            q = select(ShadowPrediction.request_id, ShadowPrediction.score).where(
                (ShadowPrediction.model == model) & (ShadowPrediction.version == v3))
            got = {rid: s for rid, s in c.execute(q) if rid.startswith("both")}
        np.testing.assert_allclose([got[f"both{i}"] for i in range(60)], scores, atol=1e-6)
    finally:
        reg.set_shadow(model, None, actor="test")
