"""Covariate adjustment (CUPED) of a canary's business metric read from the database, on both backends:
the production version's score is the covariate (its own score on the rows it served, the score the
gateway's covariate mirror stored in shadow_predictions under its version number on canary rows), the
controller stores θ and R² with the decision, the adjusted test has a smaller variance than the plain one
on the same rows, and `chimera analyze` recomputes adjusted and unadjusted decisions exactly."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np

from registry import Registry
from registry.repository import PredictionRow
from registry.rollouts import decisions, insert_rollout_rows, look_rows, split_periods
from rollout.analysis import recompute
from rollout.controller import RolloutController, build_look_data
from rollout.decision import SequentialState
from rollout.splits import stored_policy

CONFIG = {"steps": [10, 50, 100], "min_samples_per_arm": 100, "min_canary_samples_per_step": 50,
          "covariate_calibration": 300}


def _model(registry: Registry, config: dict) -> str:
    model = "cov-" + uuid.uuid4().hex[:6]
    registry.publish_version(model, b"model-one", ["a"], status="production")
    registry.publish_version(model, b"model-two", ["a"])
    registry.set_split(model, {1: 100}, expected_revision=0, actor="op")
    registry.set_rollout_config(model, config)
    registry.set_split(model, {1: 80, 2: 20}, expected_revision=1, actor="op", reason="start canary")
    return model


def _traffic(registry: Registry, model: str, n: int, rng: np.random.Generator, *,
             mirror: bool = True) -> int:
    """n requests routed 80/20, outcome ~ Bernoulli(x) where x is production's score for the row (so x
    explains a large share of the outcome's variance); canary rows carry their own score and, with
    ``mirror``, production's score in shadow_predictions. Pinned rows (a load test) are mixed in, with a
    mirror row too: the look must leave them out. Returns the canary rows inserted."""
    rev = registry.get_split(model).revision
    now = datetime.now(UTC)
    x = rng.beta(0.6, 0.6, n)
    canary = rng.random(n) < 0.2
    rows, mirrored, outcomes = [], [], []
    for i in range(n):
        rid = uuid.uuid4().hex
        version = 2 if canary[i] else 1
        rows.append({"request_id": rid, "model": model, "version": version, "routing_key": "",
                     "score": float(rng.random()) if canary[i] else float(x[i]), "latency_ms": 5.0,
                     "created_at": now, "split_revision": rev, "pinned": False, "failed_version": None,
                     "features": None})
        if canary[i] and mirror:
            mirrored.append(PredictionRow(request_id=rid, model=model, version=1, score=float(x[i]),
                                          latency_ms=1.0, created_at=now))
        outcomes.append((rid, float(rng.random() < x[i])))
    pinned_id = uuid.uuid4().hex
    rows.append({"request_id": pinned_id, "model": model, "version": 2, "routing_key": "", "score": 0.9,
                 "latency_ms": 900.0, "created_at": now, "split_revision": rev, "pinned": True,
                 "failed_version": None, "features": None})
    mirrored.append(PredictionRow(request_id=pinned_id, model=model, version=1, score=0.1, latency_ms=1.0,
                                  created_at=now))
    insert_rollout_rows(registry, rows)
    registry.insert_shadow_predictions(mirrored)
    assert all(e is None for e in registry.record_outcomes(outcomes))
    return int(canary.sum())


def test_look_rows_carry_production_score_as_covariate(registry: Registry) -> None:
    model = _model(registry, CONFIG)
    n_canary = _traffic(registry, model, 400, np.random.default_rng(3))
    since = datetime.now(UTC) - timedelta(hours=1)
    rows = look_rows(registry, model, (1, 2), since, datetime.now(UTC))
    assert rows.routed.size == 400  # the pinned row is not a routed request
    canary = rows.routed == 2
    assert canary.sum() == n_canary and np.isfinite(rows.covariate).all()
    assert np.array_equal(rows.covariate[~canary], rows.score[~canary])  # baseline: its own score
    assert not np.array_equal(rows.covariate[canary], rows.score[canary])  # canary: production's


def test_controller_adjusts_a_success_rate_canary_and_analyze_recomputes_it(registry: Registry) -> None:
    model = _model(registry, CONFIG)
    rng = np.random.default_rng(5)
    _traffic(registry, model, 900, rng)
    d = RolloutController(registry).run_once(model)
    assert d is not None
    stored = decisions(registry, model, limit=1)[0]
    cov = stored["details"]["covariate"]
    assert cov["name"] == "production_score" and cov["theta"] is not None, cov
    # θ ≈ 1 (y ~ Bernoulli(x)) and x explains well over a third of the outcome's variance here.
    assert 0.7 < cov["theta"] < 1.3 and cov["r2"] > 0.3 and cov["calibration_n"] >= 300, cov
    assert max(recompute(registry, stored["id"]).differences().values()) <= 1e-9

    # The same rows without the adjustment: the test's variance is larger by about 1 / (1 − R²).
    since = datetime.fromisoformat(stored["details"]["window"]["since"])
    until = datetime.fromisoformat(stored["details"]["window"]["until"])
    plain = dataclasses.replace(stored_policy(stored["details"]["policy"]), covariate=None)
    data = build_look_data(plain, look_rows(registry, model, (1, 2), since, until),
                           split_periods(registry, model, until), 1, 2, until.timestamp(),
                           stored["weight_before"], None)
    assert stored["details"]["variance"] < 0.8 * data.variance

    # A later look keeps θ (from the stored state), and analyze recomputes it too.
    _traffic(registry, model, 300, rng)
    RolloutController(registry).run_once(model)
    later = decisions(registry, model, limit=1)[0]
    assert later["id"] != stored["id"] and later["details"]["covariate"]["theta"] == cov["theta"]
    assert max(recompute(registry, later["id"]).differences().values()) <= 1e-9


def test_a_rollout_started_unadjusted_stays_unadjusted_and_recomputes_as_made(registry: Registry) -> None:
    """A decision made without the adjustment (here: the config turned it off, as every decision made
    before the gateway mirrored canary rows) keeps its rollout unadjusted once the policy asks for it,
    so the sequential p-values test one statistic: the rollout keeps the policy of its first look, and
    the new config waits for the next rollout (`policy_pending`); analyze recomputes both decisions as
    they were made."""
    model = _model(registry, {**CONFIG, "covariate": ""})
    rng = np.random.default_rng(8)
    _traffic(registry, model, 600, rng)
    assert RolloutController(registry).run_once(model) is not None
    first = decisions(registry, model, limit=1)[0]
    assert first["details"]["covariate"] is None
    assert SequentialState.from_dict(first["details"]["state"]).covariate is None
    registry.set_rollout_config(model, CONFIG)  # covariate: the default, production_score
    _traffic(registry, model, 300, rng)
    assert RolloutController(registry).run_once(model) is not None
    second = decisions(registry, model, limit=1)[0]
    assert second["id"] != first["id"] and second["details"]["covariate"] is None
    assert second["details"]["policy"]["covariate"] == ""
    assert second["details"]["policy_pending"]["covariate"] == "production_score"
    for row in (first, second):
        assert max(recompute(registry, row["id"]).differences().values()) <= 1e-9


def test_canary_rows_without_a_mirror_score_still_decide_and_recompute(registry: Registry) -> None:
    """Mirror scores dropped (queue full, production down): the canary's rows get the recent baseline mean
    of x (rollout.covariate.TrailingMean), the baseline's are adjusted by their own, and the look still
    decides and recomputes."""
    model = _model(registry, CONFIG)
    _traffic(registry, model, 900, np.random.default_rng(11), mirror=False)
    assert RolloutController(registry).run_once(model) is not None
    stored = decisions(registry, model, limit=1)[0]
    assert stored["details"]["covariate"]["theta"] is not None
    assert stored["details"]["n_canary"] > 100
    assert max(recompute(registry, stored["id"]).differences().values()) <= 1e-9


def test_the_gateway_mirrors_canary_rows_only_where_the_look_adjusts(registry: Registry) -> None:
    """What the gateway's catalog reads with the split (gateway.serving.catalog.covariate_source): the
    baseline to mirror canary rows to, only for a business metric with a canary and the covariate on."""
    from gateway.serving.catalog import Catalog

    catalog = Catalog(registry)
    model = _model(registry, CONFIG)
    assert catalog.load(model).covariate_from == 1
    registry.set_rollout_config(model, {**CONFIG, "covariate": ""})
    assert catalog.load(model).covariate_from is None
    registry.set_rollout_config(model, {**CONFIG, "tau": -1})  # does not parse: serve, mirror nothing
    assert catalog.load(model).covariate_from is None
    alone = "cov-" + uuid.uuid4().hex[:6]
    registry.publish_version(alone, b"one", ["a"], status="production")
    registry.set_split(alone, {1: 100}, expected_revision=0, actor="op")
    assert catalog.load(alone).covariate_from is None  # no canary, nothing to adjust
    scored = "cov-" + uuid.uuid4().hex[:6]
    registry.publish_version(scored, b"one", ["a"], status="production", metric="brier")
    registry.publish_version(scored, b"two", ["a"], metric="brier")
    registry.set_split(scored, {1: 90, 2: 10}, expected_revision=0, actor="op")
    assert catalog.load(scored).covariate_from is None  # score quality: the paired shadow test's job


def test_a_look_before_theta_is_fixed_keeps_the_rollout_adjusted(registry: Registry) -> None:
    """The first look comes before the 300 calibration outcomes: nothing enters the test yet, the
    decision says the adjustment was chosen (θ null); the next look fixes θ and adjusts."""
    model = _model(registry, CONFIG)
    rng = np.random.default_rng(13)
    _traffic(registry, model, 150, rng)
    assert RolloutController(registry).run_once(model) is not None
    first = decisions(registry, model, limit=1)[0]
    assert first["action"] == "hold" and first["n_baseline"] == 0
    assert first["details"]["covariate"]["theta"] is None
    _traffic(registry, model, 600, rng)
    assert RolloutController(registry).run_once(model) is not None
    second = decisions(registry, model, limit=1)[0]
    assert second["id"] != first["id"] and second["details"]["covariate"]["theta"] is not None
    for row in (first, second):
        assert max(recompute(registry, row["id"]).differences().values()) <= 1e-9
