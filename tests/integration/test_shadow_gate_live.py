"""The shadow gate through a live gateway (real Ray replicas, real gRPC, the gateway's own controller):
with a model's policy at shadow_gate on, a retrained version is shadowed on live traffic, judged not
worse on paired outcomes and only then canaried; a worse retrained version (published by a holdout gate
set far too loose) is stopped at the shadow stage and never answers a single request.

Both models serve the same live stream through PredictBatch (packed rows), and their outcomes arrive
through RecordOutcomes, as a client's would. The world does not change between the feedback the
retrains learn from and the live traffic, so the good candidate is about as good as production."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, select

from chimera.v1 import prediction_pb2 as pb
from chimera.v1 import rollout_pb2 as rpb
from registry import Registry
from registry.models import Prediction, ShadowPrediction
from registry.rollouts import decisions
from tests.harness import ADMIN_MD, GatewayThread, poll_until
from tests.integration.test_feedback import FAST_XGB, log_served, new_model_name, publish_production
from training.datasets import LABEL, TIMESTAMP, synthetic_signals
from training.retrain import retrain
from training.retrain_config import RetrainConfig

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

POLICY = {"shadow_gate": True, "steps": [10, 100], "shadow_min_pairs": 200, "min_samples_per_arm": 200}
CHUNK = 250


def _model(reg: Registry, prefix: str, stream: pd.DataFrame) -> tuple[str, pd.Timestamp]:
    model = new_model_name(prefix)
    v1, _ = publish_production(reg, model, stream.iloc[:1500])
    log_served(reg, model, v1.version, stream.iloc[1500:4000])  # the feedback a retrain learns from
    reg.set_rollout_config(model, POLICY)
    return model, stream[TIMESTAMP].iloc[3999].to_pydatetime() + timedelta(seconds=1)


def _serve(gw: GatewayThread, model: str, rows: pd.DataFrame, names: list[str]) -> list[int]:
    """One packed PredictBatch of `rows`, then their outcomes through RecordOutcomes; the versions
    that answered."""
    x = rows[names].to_numpy(dtype=np.float32)
    resp = gw.predict.PredictBatch(pb.PredictBatchRequest(
        model=model, matrix=pb.DenseMatrix(f32=x.tobytes(), cols=x.shape[1])), timeout=30)
    labels = rows[LABEL].to_numpy(dtype=float)
    out = gw.predict.RecordOutcomes(pb.RecordOutcomesRequest(outcomes=[
        pb.RecordOutcomeRequest(request_id=rid, value=float(y))
        for rid, y in zip(resp.request_ids, labels, strict=True)]), timeout=30)
    assert not [s for s in out.statuses if s.code], out.statuses
    return list(resp.versions)


def _count(reg: Registry, table: type, model: str, version: int) -> int:
    with reg.session() as s:
        return int(s.scalar(select(func.count()).select_from(table)
                            .where(table.model == model, table.version == version)) or 0)


def test_retrained_versions_pass_or_stop_at_the_shadow_stage(tmp_path: Path) -> None:
    reg = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    reg.upgrade()
    stream = synthetic_signals(12_000, seed=21, quality=3.0)
    good_model, good_end = _model(reg, "sgood", stream)
    bad_model, bad_end = _model(reg, "sbad", stream)
    names = list(reg.get_version(good_model, 1).feature_names)
    gw = GatewayThread(reg.url, tmp_path, controller_interval_s=0.5).start()
    g = gw.gateway
    assert g is not None
    try:
        window = timedelta(days=3650)
        # Same world: the candidate is about as good as production, so the holdout gate allows a small
        # tolerance; whether it is good enough to serve is the shadow stage's call, on live outcomes.
        good = retrain(reg, good_model, RetrainConfig(window=window, params=FAST_XGB, tolerance=0.02),
                       now=good_end)
        assert good.published is not None, good.reason
        assert good.canary is None and "in shadow" in good.reason, good.reason
        # An operator cannot hand it traffic before its shadow evaluation passes (force could).
        with pytest.raises(grpc.RpcError) as refused:
            gw.rollout.SetTrafficSplit(rpb.SetTrafficSplitRequest(
                model=good_model, weights=[rpb.VersionWeight(version=1, weight=90),
                                           rpb.VersionWeight(version=good.published.version, weight=10)],
                expected_revision=reg.get_split(good_model).revision, reason="too early"),
                metadata=ADMIN_MD, timeout=10)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "weights: v2 has not passed its shadow evaluation" in (refused.value.details() or "")
        # Labels shuffled, and a holdout gate loose enough to publish it anyway: the shadow gate's case.
        loose = RetrainConfig(window=window, params=FAST_XGB, degrade=1.0, tolerance=1.0)
        bad = retrain(reg, bad_model, loose, now=bad_end)
        assert bad.published is not None, bad.reason
        assert bad.candidate["auc"] < bad.production["auc"] - 0.1, (bad.candidate, bad.production)
        vg, vb = good.published.version, bad.published.version
        assert reg.get_split(good_model).shadow == vg and reg.get_split(bad_model).shadow == vb
        for model, v in ((good_model, vg), (bad_model, vb)):
            assert poll_until(lambda m=model, v=v: g.pool.is_ready(m, v), 120), f"{model} v{v} replicas"
            assert dict(reg.get_split(model).weights) == {1: 100}

        live = stream.iloc[4000:]
        answered: dict[str, set[int]] = {good_model: set(), bad_model: set()}
        deadline = time.monotonic() + 240
        done = False
        for start in range(0, len(live), CHUNK):
            chunk = live.iloc[start:start + CHUNK]
            for model in (good_model, bad_model):
                answered[model].update(_serve(gw, model, chunk, names))
            done = (vg in reg.get_split(good_model).weights and reg.get_split(bad_model).shadow is None)
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.6)  # a look of the gateway's controller between chunks
        assert done, (decisions(reg, good_model, limit=1), decisions(reg, bad_model, limit=1))

        # The good one: shadowed, "not worse", and only then canaried.
        passed = decisions(reg, good_model, canary=vg, shadow=True)
        assert passed[0]["action"] == "shadow_not_worse", passed[0]["reason"]
        assert all(d["action"] == "shadow_continue" for d in passed[1:])
        assert passed[0]["n_baseline"] >= 200 and passed[0]["details"]["gate"] is True
        assert dict(reg.get_split(good_model).weights) == {1: 90, vg: 10}
        assert reg.get_version(good_model, vg).status == "canary"
        with reg.session() as s:
            first_served = s.scalar(select(func.min(Prediction.created_at))
                                    .where(Prediction.model == good_model, Prediction.version == vg))
        assert first_served is None or first_served >= passed[0]["created_at"].replace(
            tzinfo=first_served.tzinfo)
        assert _count(reg, ShadowPrediction, good_model, vg) >= passed[0]["n_baseline"]
        # It serves now: its share of a few hundred requests is the canary's 10 %.
        versions: list[int] = []
        poll_until(lambda: g.catalog.get(good_model).router.weights.get(vg, 0) == 10, 10)
        for start in range(0, 4 * CHUNK, CHUNK):
            versions += _serve(gw, good_model, live.iloc[start:start + CHUNK], names)
        assert 0.03 < versions.count(vg) / len(versions) < 0.2

        # The bad one: stopped at the shadow stage, never answered anyone.
        stopped = decisions(reg, bad_model, canary=vb, shadow=True)
        assert stopped[0]["action"] == "shadow_worse", stopped[0]["reason"]
        assert stopped[0]["mean_canary"] > stopped[0]["mean_baseline"]
        assert reg.get_version(bad_model, vb).status == "rolled_back"
        assert dict(reg.get_split(bad_model).weights) == {1: 100}
        assert vb not in answered[bad_model] and _count(reg, Prediction, bad_model, vb) == 0
        assert _count(reg, ShadowPrediction, bad_model, vb) >= stopped[0]["n_baseline"]
        # Shown like a canary decision (what `chimera rollout status` prints).
        st = gw.rollout.GetRolloutStatus(rpb.GetRolloutStatusRequest(model=bad_model, decisions=3),
                                         metadata=ADMIN_MD, timeout=10)
        assert (st.decisions[0].action, st.decisions[0].test) == ("shadow_worse", "paired-msprt")
        assert st.decisions[0].canary_version == vb and st.decisions[0].n_baseline >= 200
        # The gateway stops mirroring it: its shadow row count stays put under more traffic.
        assert poll_until(lambda: g.catalog.get(bad_model).shadow is None, 10)
        mirrored = _count(reg, ShadowPrediction, bad_model, vb)
        _serve(gw, bad_model, live.iloc[:CHUNK], names)
        time.sleep(1.0)
        assert _count(reg, ShadowPrediction, bad_model, vb) == mirrored
    finally:
        gw.stop()
        reg.dispose()
