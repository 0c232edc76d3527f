"""Feedback data set, training runs and native artifacts in the registry (SQLite and PostgreSQL).

Also home of the helpers the drift and retrain tests share: a synthetic stream served by a
production version, logged the way the gateway logs it (features + outcome per request)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import inspect

from registry import Registry, ValidationError, VersionInfo
from registry.repository import PredictionRow
from registry.rollouts import insert_rollout_rows
from registry.training_runs import (
    ModelArtifact,
    TrainingRun,
    create_run,
    get_run,
    list_runs,
    load_artifact,
    save_artifact,
    served_rows,
    update_run,
)
from training.datasets import DOMAIN_FEATURES, LABEL, TIMESTAMP, synthetic_signals
from training.export import onnx_scores
from training.feedback import feature_names, feedback_frame, parse_window, served_frame
from training.pipeline import TrainResult, train
from training.publish import publish_result

FAST_XGB = {"n_estimators": 200, "max_depth": 3, "learning_rate": 0.1, "early_stopping_rounds": 20}
FEATURES = list(DOMAIN_FEATURES)
T0 = datetime(2025, 3, 1, tzinfo=UTC)


# ------------------------------------------------------------------------------------ shared helpers
def new_model_name(prefix: str = "ct") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def publish_production(registry: Registry, model: str, df: pd.DataFrame, *, metric: str = "brier",
                       native: bool = True) -> tuple[VersionInfo, TrainResult]:
    """Train on `df`, publish as the production version at 100 % (and store its booster)."""
    result = train(df, params=FAST_XGB, features=FEATURES, baseline=False)
    info = publish_result(registry, model, result, status="production", metric=metric, save_booster=native)
    split = registry.get_split(model)
    registry.set_split(model, {info.version: 100}, expected_revision=split.revision, actor="test")
    return info, result


def record_outcomes(registry: Registry, items: list[tuple[str, float]]) -> None:
    bulk = getattr(registry, "record_outcomes", None)
    if bulk is not None:
        assert all(e is None for e in bulk(items))
    else:
        for rid, value in items:
            registry.record_outcome(rid, value)


def log_served(registry: Registry, model: str, version: int, df: pd.DataFrame, *,
               use_timestamps: bool = True, outcomes: bool = True,
               features: list[str] | None = None) -> list[str]:
    """What the gateway does for each request: score with the version's ONNX bytes, log the
    prediction with its feature row, later record the outcome (here: the label).

    All rows are one version's. For traffic split across a canary's arms while a rollout controller
    is looking, use `log_routed`: writing one arm's rows (and outcomes) before the other's shows the
    controller a sample ratio and an outcome coverage no gateway produces."""
    names = features or list(registry.get_version(model, version).feature_names)
    onnx_bytes, _ = registry.get_onnx(model, version)
    X = df[names].to_numpy(dtype=np.float32)
    scores = onnx_scores(onnx_bytes, X) if len(df) else np.empty(0)
    stamps = df[TIMESTAMP].tolist()
    rows = [PredictionRow(request_id=uuid.uuid4().hex, model=model, version=version, score=float(s),
                          latency_ms=2.0, created_at=(stamps[i].to_pydatetime() if use_timestamps else None),
                          features=[float(x) for x in X[i]])
            for i, s in enumerate(scores)]
    registry.insert_predictions(rows)
    if outcomes:
        labels = df[LABEL].to_numpy()
        record_outcomes(registry, [(r.request_id, float(labels[i])) for i, r in enumerate(rows)])
    return [r.request_id for r in rows]


def log_routed(registry: Registry, model: str, df: pd.DataFrame, routed: np.ndarray, *,
               outcomes: bool = True) -> list[str]:
    """What a gateway's prediction log writes for live traffic routed by the current split: row i of
    `df` was routed to version `routed[i]` and scored by that version's ONNX; the rows of all versions
    are inserted in arrival order, in one transaction, stamped now with the split revision they were
    routed under (as gateway.records.prediction_log does); then the outcomes of all of them arrive
    together (outcome timing does not depend on the version that answered).

    Why not `log_served` per version: a rollout controller looking in the gap between one arm's insert
    and the other's sees, e.g., 900 new baseline rows and no new canary rows, or the baseline's outcomes
    all recorded and the canary's none. Its always-valid sample-ratio and coverage tests rightly flag
    that, and an always-valid p-value never recovers (it is a running minimum), so the rollout holds
    for good. A gateway's log writer never writes one arm ahead of the other like that."""
    routed = np.asarray(routed)
    if len(df) == 0:
        return []
    revision = registry.get_split(model).revision
    scores = np.empty(len(df))
    feats: list[list[float]] = [[] for _ in range(len(df))]
    for v in np.unique(routed).tolist():
        idx = np.flatnonzero(routed == v)
        names = list(registry.get_version(model, int(v)).feature_names)
        onnx_bytes, _ = registry.get_onnx(model, int(v))
        X = df.iloc[idx][names].to_numpy(dtype=np.float32)
        scores[idx] = onnx_scores(onnx_bytes, X)
        for j, i in enumerate(idx.tolist()):
            feats[i] = [float(x) for x in X[j]]
    ids = [uuid.uuid4().hex for _ in range(len(df))]
    insert_rollout_rows(registry, [
        {"request_id": ids[i], "model": model, "version": int(routed[i]), "routing_key": "",
         "score": float(scores[i]), "latency_ms": 2.0, "created_at": datetime.now(UTC),
         "features": feats[i], "split_revision": revision}
        for i in range(len(df))])
    if outcomes:
        labels = df[LABEL].to_numpy()
        record_outcomes(registry, [(rid, float(labels[i])) for i, rid in enumerate(ids)])
    return ids


def shifted_stream(n: int = 9000, seed: int = 11) -> pd.DataFrame:
    """Trading signals whose relationship (and some feature distributions) shift halfway, with a
    strong enough signal that the shift matters for calibrated scores."""
    return synthetic_signals(n, seed=seed, shift_at=0.5, quality=3.0)


# ------------------------------------------------------------------------------------ tests
def test_parse_window() -> None:
    assert parse_window("90d") == timedelta(days=90)
    assert parse_window("12h") == timedelta(hours=12)
    assert parse_window("30m") == timedelta(minutes=30)
    assert parse_window("2w") == timedelta(weeks=2)
    assert parse_window("1.5d") == timedelta(hours=36)
    for bad in ("", "90", "d", "-1d", "0d", "3y"):
        with pytest.raises(ValueError, match="window"):
            parse_window(bad)


def _prediction(model: str, version: int, at: datetime, features: list[float] | None,
                score: float = 0.5) -> PredictionRow:
    return PredictionRow(uuid.uuid4().hex, model, version, score, 1.0, created_at=at, features=features)


def test_feedback_frame_joins_outcomes_and_names_features(registry: Registry) -> None:
    m = "fb"
    registry.publish_version(m, b"one", ["a", "b", "c"], metric="success_rate")
    registry.publish_version(m, b"two", ["c", "a"])  # a canary with another schema and order
    rows = [
        _prediction(m, 1, T0 + timedelta(minutes=1), [1.0, 2.0, 3.0], 0.1),
        _prediction(m, 2, T0 + timedelta(minutes=2), [30.0, 10.0], 0.2),
        _prediction(m, 1, T0 + timedelta(minutes=3), [4.0, 5.0, 6.0], 0.3),   # no outcome
        _prediction(m, 1, T0 + timedelta(minutes=4), None, 0.4),              # not sampled
        _prediction(m, 1, T0 + timedelta(minutes=5), [7.0, 8.0], 0.5),        # wrong length
        _prediction(m, 1, T0 - timedelta(minutes=1), [0.0, 0.0, 0.0], 0.6),   # before the window
        _prediction(m, 1, T0 + timedelta(hours=1), [9.0, 9.0, 9.0], 0.7),     # at `until`: excluded
    ]
    registry.insert_predictions(rows)
    for r in rows:
        if r.score != 0.3:
            registry.record_outcome(r.request_id, 1.0 if r.score in (0.1, 0.5) else 0.0)
    fb = feedback_frame(registry, m, since=T0, until=T0 + timedelta(hours=1))
    assert list(fb.columns) == ["request_id", "timestamp", "version", "score", "a", "b", "c", "outcome",
                                "label"]
    assert feature_names(fb) == ["a", "b", "c"]
    assert fb["request_id"].tolist() == [rows[0].request_id, rows[1].request_id]
    assert fb[["a", "b", "c"]].iloc[0].tolist() == [1.0, 2.0, 3.0]
    # v2 logged [c, a]: named back into place, and the feature it lacks is NaN.
    assert fb["a"].iloc[1] == 10.0 and fb["c"].iloc[1] == 30.0 and np.isnan(fb["b"].iloc[1])
    assert fb[LABEL].tolist() == [1, 0] and fb[LABEL].dtype == np.int64
    assert fb["timestamp"].iloc[0] == pd.Timestamp(T0 + timedelta(minutes=1))
    assert fb.attrs["skipped"] == 1

    only_v1 = feedback_frame(registry, m, since=T0, until=T0 + timedelta(hours=1), versions=[1],
                             features=["c", "a"])
    assert list(only_v1.columns)[4:6] == ["c", "a"] and len(only_v1) == 1

    served = served_frame(registry, m, since=T0, until=T0 + timedelta(hours=1))
    assert len(served) == 3  # with and without outcome; not the unsampled or malformed rows
    assert np.isnan(served[LABEL].iloc[2]) and served["score"].iloc[2] == 0.3


def test_continuous_outcomes_are_labelled_by_threshold(registry: Registry) -> None:
    m = "fb-roi"
    registry.publish_version(m, b"one", ["x"], metric="mean_outcome")
    rows = [_prediction(m, 1, T0 + timedelta(seconds=i), [float(i)]) for i in range(4)]
    registry.insert_predictions(rows)
    for r, value in zip(rows, (-0.002, 0.0005, 0.003, 0.0), strict=True):
        registry.record_outcome(r.request_id, value)
    fb = feedback_frame(registry, m, since=T0, until=T0 + timedelta(minutes=1), threshold=0.001)
    assert fb[LABEL].tolist() == [0, 0, 1, 0]
    assert fb["outcome"].tolist() == [-0.002, 0.0005, 0.003, 0.0]
    assert not fb.attrs["binary_outcome"]


def test_served_rows_window_is_half_open_on_both_backends(registry: Registry) -> None:
    m = "fb-win"
    registry.publish_version(m, b"one", ["x"])
    rows = [_prediction(m, 1, T0 + timedelta(seconds=i), [float(i)]) for i in range(10)]
    registry.insert_predictions(rows)
    got = served_rows(registry, m, since=T0 + timedelta(seconds=3), until=T0 + timedelta(seconds=7))
    assert [r.features[0] for r in got] == [3.0, 4.0, 5.0, 6.0]
    assert all(r.created_at.tzinfo is not None for r in got)


def test_training_run_lifecycle(registry: Registry) -> None:
    run = create_run(registry, "m", mode="incremental", params={"window": 86400.0}, trigger="test",
                     code_revision="abc")
    assert run.status == "queued" and run.progress == 0.0 and run.published_version is None
    update_run(registry, run.id, status="running", window_start=T0, window_end=T0 + timedelta(days=1),
               parent_version=3)
    update_run(registry, run.id, progress=1.7, stage="training")
    mid = get_run(registry, run.id)
    assert mid.status == "running" and mid.progress == 1.0 and mid.started_at is not None
    assert mid.window_start == T0 and mid.parent_version == 3
    update_run(registry, run.id, status="succeeded", metrics={"candidate": {"auc": 0.7}}, published_version=4,
               reason="published v4")
    done = get_run(registry, run.id)
    assert done.status == "succeeded" and done.published and done.duration_s is not None
    assert done.duration_s >= 0 and done.finished_at is not None and done.metrics["candidate"]["auc"] == 0.7
    other = create_run(registry, "m")
    assert [r.id for r in list_runs(registry, "m")] == [other.id, run.id]
    assert [r.id for r in list_runs(registry, "m", published_version=4)] == [run.id]
    with pytest.raises(ValidationError, match="status"):
        update_run(registry, run.id, status="exploded")
    with pytest.raises(ValidationError, match="mode"):
        create_run(registry, "m", mode="sideways")


def test_native_artifact_roundtrip(registry: Registry) -> None:
    registry.publish_version("m", b"onnx", ["a"])
    assert load_artifact(registry, "m", 1) is None
    save_artifact(registry, "m", 1, b"\x00booster", format="xgboost-ubj", meta={"n_trees": 3})
    art = load_artifact(registry, "m", 1)
    assert art is not None and art.data == b"\x00booster" and art.meta == {"n_trees": 3}
    save_artifact(registry, "m", 1, b"replaced", format="xgboost-ubj")
    again = load_artifact(registry, "m", 1)
    assert again is not None and again.data == b"replaced"


def test_orm_matches_migration_0003(registry: Registry) -> None:
    insp = inspect(registry.engine)
    for cls in (TrainingRun, ModelArtifact):
        table = cls.__table__
        db = {c["name"]: c for c in insp.get_columns(table.name)}
        assert set(db) == {c.name for c in table.columns}, table.name
        for col in table.columns:
            assert db[col.name]["nullable"] == col.nullable, (table.name, col.name)
