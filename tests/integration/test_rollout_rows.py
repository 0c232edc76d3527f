"""The rollout controller driven through the rows the gateway logs (migration 0005 columns inserted
directly, as the gateway's prediction log will): failures counted against the routed version from the
database, pinned traffic left out, split periods never pooled, and every decision recomputable."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy import insert, or_, select

from registry import Registry
from registry.models import Outcome, Prediction, RequestError, ShadowPrediction, as_utc
from registry.rollouts import decisions, insert_rollout_rows, look_rows
from rollout.analysis import recompute
from rollout.controller import RolloutController


def _model(registry: Registry, canary_weight: int = 10) -> str:
    model = "rows-" + uuid.uuid4().hex[:6]
    registry.publish_version(model, b"model-one", ["a"], status="production")
    registry.publish_version(model, b"model-two", ["a"])
    registry.set_split(model, {1: 100}, expected_revision=0, actor="op")
    registry.set_rollout_config(model, {"steps": [10, 50, 100], "min_samples_per_arm": 100,
                                        "min_canary_samples_per_step": 50})
    registry.set_split(model, {1: 100 - canary_weight, 2: canary_weight}, expected_revision=1, actor="op",
                       reason="start canary")
    return model


def _prediction(model: str, version: int, revision: int | None, *, failed_version: int | None = None,
                pinned: bool = False, latency_ms: float = 5.0, key: str = "") -> dict:
    """One predictions row with every column the gateway fills (the keys of the contract)."""
    return {"request_id": uuid.uuid4().hex, "model": model, "version": version, "routing_key": key,
            "score": 0.5, "latency_ms": latency_ms, "created_at": datetime.now(UTC),
            "split_revision": revision, "pinned": pinned, "failed_version": failed_version,
            "features": None}


def _routed(registry: Registry, model: str, n: int, p: dict[int, float], rng: np.random.Generator,
            *, legacy: bool = False) -> None:
    """n requests routed by the current split, each with a binary outcome."""
    split = registry.get_split(model)
    versions = list(split.weights)
    probs = np.array([split.weights[v] for v in versions], dtype=float) / 100
    rows = [_prediction(model, int(v), None if legacy else split.revision)
            for v in rng.choice(versions, size=n, p=probs)]
    insert_rollout_rows(registry, rows)
    assert all(e is None for e in registry.record_outcomes(
        [(r["request_id"], float(rng.random() < p[r["version"]])) for r in rows]))


def test_canary_failing_every_request_is_rolled_back_from_database_counts(registry: Registry) -> None:
    """The canary never answers: its requests fail over to v1 (failed_version=2) or fail entirely
    (request_errors). No canary outcome exists; the error guardrail rolls it back at the first look."""
    model = _model(registry)
    rng = np.random.default_rng(1)
    rev = registry.get_split(model).revision
    served = [_prediction(model, 1, rev) for _ in range(180)]
    insert_rollout_rows(registry, served)
    registry.record_outcomes([(r["request_id"], float(rng.random() < 0.5)) for r in served])
    failed_over = [_prediction(model, 1, rev, failed_version=2, latency_ms=250.0) for _ in range(12)]
    errors = [{"request_id": uuid.uuid4().hex, "model": model, "version": 2, "split_revision": rev,
               "routing_key": "", "pinned": False, "latency_ms": None, "error": "UNAVAILABLE: replica down",
               "created_at": datetime.now(UTC)} for _ in range(8)]
    insert_rollout_rows(registry, failed_over, errors)
    d = RolloutController(registry).run_once(model)
    assert d is not None and d.action == "rollback" and d.guardrail == "error_rate", d
    assert d.n_canary == 0 and d.periods[0]["errors"][1] == 20 and d.periods[0]["requests"][1] == 20
    assert dict(registry.get_split(model).weights) == {1: 100}
    stored = decisions(registry, model, limit=1)[0]
    assert stored["details"]["p_errors"] <= stored["details"]["alpha"] / 50
    assert max(recompute(registry, stored["id"]).differences().values()) <= 1e-9


def test_pinned_traffic_is_left_out(registry: Registry) -> None:
    """A load test pinned to the canary (slow, many requests) is neither canary traffic for the SRM
    check nor latency evidence."""
    model = _model(registry)
    rng = np.random.default_rng(2)
    _routed(registry, model, 600, {1: 0.5, 2: 0.5}, rng)
    rev = registry.get_split(model).revision
    insert_rollout_rows(registry, [_prediction(model, 2, rev, pinned=True, latency_ms=500.0)
                                   for _ in range(2_000)])
    d = RolloutController(registry).run_once(model)
    assert d is not None and d.action == "hold" and not d.srm, d.reason
    assert sum(d.periods[0]["requests"]) == 600


def test_split_change_with_a_base_rate_shift_is_not_an_effect(registry: Registry) -> None:
    """The issue's live case: A/A at 10 %, stepped to 50 % while the rate falls from 0.60 to 0.50 for
    everyone. Periods are compared within, so the canary is not rolled back; old rows without a
    split_revision are placed in their period by time."""
    model = _model(registry)
    rng = np.random.default_rng(3)
    ctl = RolloutController(registry)
    _routed(registry, model, 3_000, {1: 0.6, 2: 0.6}, rng, legacy=True)
    assert ctl.run_once(model).action == "hold"
    registry.set_split(model, {1: 50, 2: 50}, expected_revision=None, actor="op", reason="canary set 50")
    for _ in range(4):
        _routed(registry, model, 1_000, {1: 0.5, 2: 0.5}, rng)
        d = ctl.run_once(model)
        assert d is not None and d.action == "hold", d.reason
    assert [p["weight"] for p in d.periods] == [10, 50]
    assert d.mean_canary < d.mean_baseline - 0.02  # what pooling would have compared
    for row in decisions(registry, model):
        assert max(recompute(registry, row["id"]).differences().values()) <= 1e-9


def test_outcome_delay_uses_the_same_cutoff_for_both_arms(registry: Registry) -> None:
    model = _model(registry)
    registry.set_rollout_config(model, {"min_samples_per_arm": 100, "outcome_delay_s": 60.0})
    rng = np.random.default_rng(4)
    _routed(registry, model, 1_500, {1: 0.5, 2: 0.5}, rng)
    now = datetime.now(UTC)
    d = RolloutController(registry, clock=lambda: now).run_once(model)
    assert d is not None and d.n_baseline == d.n_canary == 0 and "collecting" in d.reason
    later = RolloutController(registry, clock=lambda: now + timedelta(seconds=61)).run_once(model)
    assert later is not None and later.n_baseline + later.n_canary == 1_500


def _rows_one_by_one(registry: Registry, model: str, versions: tuple[int, int], since: datetime,
                     until: datetime) -> dict[str, list]:
    """The specification of registry.rollouts.look_rows, as it was written before it read columns: every
    row through the ORM, times from the datetimes, sorted by (time, predictions before errors)."""
    nan = float("nan")
    with registry.session() as s:
        preds = s.execute(
            select(Prediction.version, Prediction.failed_version, Prediction.split_revision,
                   Prediction.routing_key, Prediction.request_id, Prediction.created_at,
                   Prediction.latency_ms, Prediction.score, Outcome.value, Outcome.created_at,
                   ShadowPrediction.score)
            .join(Outcome, (Outcome.request_id == Prediction.request_id) & (Outcome.created_at <= until),
                  isouter=True)
            .join(ShadowPrediction, (ShadowPrediction.request_id == Prediction.request_id)
                  & (ShadowPrediction.day == Prediction.day)  # registry.models.mirrored_with's rule
                  & (ShadowPrediction.model == model) & (ShadowPrediction.version == versions[0])
                  & (ShadowPrediction.created_at <= until), isouter=True)
            .where(Prediction.model == model, Prediction.created_at >= since, Prediction.created_at <= until,
                   Prediction.pinned.is_(False),
                   or_(Prediction.failed_version.in_(versions),
                       Prediction.failed_version.is_(None) & Prediction.version.in_(versions)))
            .order_by(Prediction.id)).all()
        errs = s.execute(
            select(RequestError.version, RequestError.split_revision, RequestError.routing_key,
                   RequestError.request_id, RequestError.id, RequestError.created_at, RequestError.latency_ms)
            .where(RequestError.model == model, RequestError.created_at >= since,
                   RequestError.created_at <= until, RequestError.pinned.is_(False),
                   RequestError.version.in_(versions))
            .order_by(RequestError.id)).all()

    def t(dt: datetime | None) -> float:
        return as_utc(dt).timestamp() if dt is not None else nan

    rows = []
    for version, failed, rev, key, rid, created, lat, score, value, out_at, mirrored in preds:
        cov = score if version == versions[0] else (nan if mirrored is None else mirrored)
        rows.append((t(created), 0, failed if failed is not None else version, -1 if rev is None else rev,
                     key or f"r:{rid}", lat, failed is not None, score, nan if value is None else value,
                     t(out_at), cov))
    for version, rev, key, rid, eid, created, lat in errs:
        rows.append((t(created), 1, version, -1 if rev is None else rev, key or f"e:{rid or eid}",
                     nan if lat is None else lat, True, nan, nan, nan, nan))
    rows.sort(key=lambda r: (r[0], r[1]))
    names = ("created", "kind", "routed", "revision", "unit", "latency_ms", "failed", "score", "value",
             "outcome_at", "covariate")
    return {name: [r[i] for r in rows] for i, name in enumerate(names)}


def test_look_rows_are_the_rows_read_one_by_one(registry: Registry) -> None:
    """look_rows reads columns (numpy, epoch microseconds from PostgreSQL) for speed; it must return
    exactly what the row-by-row reading returned: every column, in the same log order, to the bit."""
    model = _model(registry)
    rng = np.random.default_rng(11)
    base = datetime.now(UTC) - timedelta(seconds=100)
    preds, errs = [], []
    for i in range(400):
        at = base + timedelta(microseconds=int(rng.integers(0, 50_000_000)))
        p = _prediction(model, int(rng.choice([1, 1, 2, 3])), None if i % 17 == 0 else 2,
                        failed_version=2 if i % 23 == 0 else None, pinned=i % 29 == 0,
                        latency_ms=float(rng.gamma(2.0, 3.0)), key=f"k{i % 7}" if i % 3 == 0 else "")
        p["created_at"], p["score"] = at, float(rng.random())
        preds.append(p)
        if i % 9 == 0:  # a request error at exactly the same time as a prediction
            errs.append({"request_id": "" if i % 2 else uuid.uuid4().hex, "model": model, "version": 2,
                         "split_revision": 2, "routing_key": "", "pinned": False, "error": "boom",
                         "latency_ms": None if i % 4 else 3.5, "created_at": at})
    insert_rollout_rows(registry, preds, errs)
    assert all(e is None for e in registry.record_outcomes(
        [(p["request_id"], float(rng.random() < 0.5)) for p in preds[::2]]))
    with registry.session() as s:  # mirror scores of the covariate version (1) for canary rows
        s.execute(insert(ShadowPrediction), [
            {"request_id": p["request_id"], "model": model, "version": 1, "score": float(rng.random()),
             "latency_ms": 1.0, "created_at": p["created_at"]} for p in preds[1::3] if p["version"] == 2])
        s.commit()
    until = datetime.now(UTC)
    registry.record_outcomes([(p["request_id"], 1.0) for p in preds[1::4]])  # after until: left out
    got = look_rows(registry, model, (1, 2), base - timedelta(seconds=1), until)
    want = _rows_one_by_one(registry, model, (1, 2), base - timedelta(seconds=1), until)
    assert len(want["routed"]) > 300 and got.unit == want["unit"]
    for name in ("created", "routed", "revision", "latency_ms", "failed", "score", "value", "outcome_at",
                 "covariate"):
        np.testing.assert_array_equal(getattr(got, name), np.array(want[name]), err_msg=name)
    assert np.isfinite(got.covariate).sum() > np.isfinite(got.score[got.routed == 1]).sum()  # mirrors read
    empty = look_rows(registry, model, (1, 2), until + timedelta(seconds=1), until + timedelta(seconds=2))
    assert empty.routed.size == 0 and empty.unit == []
