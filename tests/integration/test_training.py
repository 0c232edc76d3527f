"""Training package: data with a real signal, walk-forward windows, ONNX export with one interface
and exact parity, the parity gate in front of the registry (SQLite and Postgres), benchmark model."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pandas as pd
import pytest

from training.benchmark import N_FEATURES, N_TREES, benchmark_model
from training.datasets import (
    DOMAIN_FEATURES,
    LABEL,
    NET_ROI,
    TIMESTAMP,
    data_hash,
    feature_columns,
    load_dataset,
    synthetic_signals,
)
from training.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    ParityError,
    interface,
    onnx_scores,
    parity_check,
    session,
    to_onnx,
)
from training.metrics import auc, brier, ece, evaluate, logloss, reliability
from training.models import PlattXGBoost, positive_scores
from training.pipeline import TrainResult, train
from training.publish import publish_result, train_and_publish
from training.split import time_split, walk_forward_folds

N_ROWS = 5000
FAST_XGB = {"n_estimators": 150, "max_depth": 3, "learning_rate": 0.1, "early_stopping_rounds": 20}


@pytest.fixture(scope="module")
def signals() -> pd.DataFrame:
    return synthetic_signals(N_ROWS, seed=0)


@pytest.fixture(scope="module")
def trained(signals: pd.DataFrame) -> dict[str, TrainResult]:
    return {
        "xgboost": train(signals, algo="xgboost", params=FAST_XGB, seed=0),
        "logreg": train(signals, algo="logreg", seed=0),
    }


def _export(result: TrainResult) -> bytes:
    return to_onnx(result.model, len(result.feature_names), list(result.feature_names))


# ------------------------------------------------------------------------------------------ data
def test_synthetic_data_is_time_ordered_reproducible_and_numeric() -> None:
    df = synthetic_signals(2000, seed=3, n_noise=4)
    ts = df[TIMESTAMP]
    assert isinstance(ts.dtype, pd.DatetimeTZDtype)
    assert (ts.diff().dropna() > pd.Timedelta(0)).all(), "timestamps must strictly increase"
    features = feature_columns(df)
    assert features == [*DOMAIN_FEATURES, "noise_0", "noise_1", "noise_2", "noise_3"]
    assert all(df[c].dtype == np.float64 for c in features)
    assert set(df["regime"].unique()) == {0.0, 1.0, 2.0}
    assert ((df[NET_ROI] > 0).astype(int) == df[LABEL]).all()
    assert 0.1 < df[LABEL].mean() < 0.9
    pd.testing.assert_frame_equal(df, synthetic_signals(2000, seed=3, n_noise=4))
    assert data_hash(df) != data_hash(synthetic_signals(2000, seed=4, n_noise=4))
    higher = synthetic_signals(2000, seed=3, n_noise=4, threshold=0.002)
    assert higher[LABEL].mean() < df[LABEL].mean()


def test_shift_keeps_the_past_and_changes_the_future() -> None:
    n = 12_000
    plain = synthetic_signals(n, seed=1)
    shifted = synthetic_signals(n, seed=1, shift_at=0.5)
    cut = n // 2
    pd.testing.assert_frame_equal(plain.iloc[:cut], shifted.iloc[:cut])
    after, before = shifted.iloc[cut:], shifted.iloc[:cut]
    assert after["realized_vol"].mean() > 1.3 * before["realized_vol"].mean()
    assert after["spread_bp"].mean() > 1.3 * before["spread_bp"].mean()
    assert after["funding_rate"].mean() > before["funding_rate"].mean() + 1e-4
    # A model fit before the shift ranks well on later pre-shift rows and clearly worse after it.
    fit = shifted.iloc[: cut - 1500]
    result = train(fit, algo="logreg", fractions=(0.8, 0.0, 0.2), baseline=False)
    names = list(result.feature_names)

    def holdout_auc(rows: pd.DataFrame) -> float:
        return auc(rows[LABEL].to_numpy(), positive_scores(result.model, rows[names].to_numpy(np.float32)))

    pre, post = holdout_auc(shifted.iloc[cut - 1500 : cut]), holdout_auc(shifted.iloc[cut + 1500 :])
    assert pre > 0.65
    assert post < pre - 0.05


def test_quality_scales_the_signal() -> None:
    good = train(synthetic_signals(4000, seed=2), algo="logreg", baseline=False)
    weak = train(synthetic_signals(4000, seed=2, quality=0.2), algo="logreg", baseline=False)
    assert weak.metrics["auc"] < good.metrics["auc"] - 0.05


def test_csv_and_parquet_roundtrip(tmp_path, signals: pd.DataFrame) -> None:
    df = signals.iloc[:500]
    for path in (tmp_path / "s.csv", tmp_path / "s.parquet"):
        if path.suffix == ".csv":
            df.to_csv(path, index=False)
        else:
            df.to_parquet(path, index=False)
        loaded = load_dataset(path)
        pd.testing.assert_frame_equal(loaded, df, check_dtype=False, check_exact=True)
        assert loaded[TIMESTAMP].dt.tz is not None
        assert feature_columns(loaded) == feature_columns(df)
        assert data_hash(loaded) == data_hash(df), path.suffix


def test_load_dataset_derives_label_sorts_and_localises(tmp_path) -> None:
    raw = pd.DataFrame({
        TIMESTAMP: ["2024-01-01 00:02:00", "2024-01-01 00:00:00", "2024-01-01 00:01:00"],
        "x": [3, 1, 2],  # integers: must come back as float features
        "symbol": ["BTC", "ETH", "SOL"],  # text: not a feature
        NET_ROI: [0.01, -0.02, 0.0],
    })
    raw.to_csv(tmp_path / "r.csv", index=False)
    df = load_dataset(tmp_path / "r.csv", threshold=-0.001)
    assert df[TIMESTAMP].is_monotonic_increasing and str(df[TIMESTAMP].dt.tz) == "UTC"
    assert df["x"].tolist() == [1.0, 2.0, 3.0] and df["x"].dtype == np.float64
    assert df[LABEL].tolist() == [0, 1, 1]
    assert feature_columns(df) == ["x"]
    with pytest.raises(ValueError, match="label"):
        raw.drop(columns=[NET_ROI]).to_csv(tmp_path / "bad.csv", index=False)
        load_dataset(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="unsupported"):
        load_dataset(tmp_path / "r.json")


def test_data_hash_is_canonical_but_sensitive(signals: pd.DataFrame) -> None:
    df = signals.iloc[:300].copy()
    h = data_hash(df)
    assert len(h) == 64 and int(h, 16) >= 0
    assert data_hash(df[list(reversed(df.columns))]) == h  # column order is not content
    tweaked = df.copy()
    tweaked.loc[7, "spread_bp"] = np.nextafter(tweaked.loc[7, "spread_bp"], np.inf)
    assert data_hash(tweaked) != h
    assert data_hash(df.iloc[::-1].reset_index(drop=True)) != h  # row order is time order
    assert data_hash(df.rename(columns={"spread_bp": "spread"})) != h


# ---------------------------------------------------------------------------------------- splits
def test_time_split_windows_are_ordered_and_disjoint(signals: pd.DataFrame) -> None:
    s = time_split(signals)
    assert len(s.train) + len(s.validation) + len(s.test) == len(signals)
    assert abs(len(s.train) - 0.6 * len(signals)) <= 1 and abs(len(s.test) - 0.2 * len(signals)) <= 1
    assert s.train[TIMESTAMP].max() < s.validation[TIMESTAMP].min()
    assert s.validation[TIMESTAMP].max() < s.test[TIMESTAMP].min()
    assert not set(s.train.index) & set(s.validation.index)
    assert not set(s.validation.index) & set(s.test.index)


def test_time_split_never_cuts_through_a_timestamp() -> None:
    days = ["2024-01-01"] * 3 + ["2024-01-02"] * 3 + ["2024-01-03"] * 2 + ["2024-01-04"] * 2
    df = pd.DataFrame({TIMESTAMP: pd.to_datetime(days, utc=True), "x": np.arange(10.0), LABEL: [0, 1] * 5})
    s = time_split(df, 0.5, 0.3, 0.2)  # a naive cut at row 5 would split 2024-01-02
    windows = [set(w[TIMESTAMP]) for w in (s.train, s.validation, s.test)]
    assert all(len(w) > 0 for w in windows) and sum(len(w) for w in (s.train, s.validation, s.test)) == 10
    assert not (windows[0] & windows[1]) and not (windows[1] & windows[2]) and not (windows[0] & windows[2])
    with pytest.raises(ValueError, match="empty window"):
        time_split(df.assign(**{TIMESTAMP: df[TIMESTAMP].iloc[0]}))  # one instant cannot be split
    with pytest.raises(ValueError, match="sorted"):
        time_split(df.iloc[::-1])


def test_walk_forward_folds_expand_and_move_forward(signals: pd.DataFrame) -> None:
    folds = list(walk_forward_folds(signals, 4))
    assert [f.index for f in folds] == [0, 1, 2, 3]
    for prev, fold in zip(folds, folds[1:], strict=False):
        assert len(fold.train) > len(prev.train)
        assert fold.train.index[0] == prev.train.index[0]  # expanding, same start
        assert fold.test[TIMESTAMP].min() > prev.test[TIMESTAMP].max()
        assert fold.train.index[-1] == prev.test.index[-1]  # last test block joins training
    for fold in folds:
        assert fold.train[TIMESTAMP].max() < fold.test[TIMESTAMP].min()
    assert folds[-1].test.index[-1] == signals.index[-1]
    with pytest.raises(ValueError, match="too few"):
        walk_forward_folds(signals.iloc[:3], 4)  # fails at the call, not at first iteration


# ---------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("algo", ["xgboost", "logreg"])
def test_models_beat_chance_on_the_test_window(trained: dict[str, TrainResult], algo: str) -> None:
    r = trained[algo]
    m = r.metrics
    assert m["auc"] > 0.65
    # AUC standard error on ~1k rows is ~0.02: 0.65 is many standard errors above chance.
    assert m["n_test"] == len(r.X_test) == len(r.y_test)
    assert m["brier"] < m["base_rate"] * (1 - m["base_rate"])  # better than predicting the base rate
    assert 0 <= m["ece"] < 0.1
    assert r.params["algo"] == algo and r.params["seed"] == 0
    assert r.feature_names == tuple(DOMAIN_FEATURES)


def test_early_stopping_uses_the_validation_window(signals: pd.DataFrame) -> None:
    r = train(signals, algo="xgboost", params={"n_estimators": 400, "learning_rate": 0.3,
                                                "early_stopping_rounds": 10}, baseline=False)
    assert r.params["n_trees"] < 400  # stopped early
    off = train(signals, algo="xgboost", params={"n_estimators": 40, "early_stopping_rounds": None},
                baseline=False)
    assert off.params["n_trees"] == 40


def test_degrade_and_feature_subset_make_worse_models(signals: pd.DataFrame,
                                                      trained: dict[str, TrainResult]) -> None:
    clean = trained["xgboost"]
    degraded = train(signals, algo="xgboost", params=FAST_XGB, degrade=0.9)
    assert degraded.metrics["auc"] < clean.metrics["auc"] - 0.05
    # The baseline is fit on the true labels: an honest reference even for a degraded candidate.
    assert degraded.metrics["baseline_auc"] == pytest.approx(clean.metrics["baseline_auc"])
    weak_features = ["volume_zscore", "realized_vol", "hour_of_day"]
    subset = train(signals, algo="logreg", features=weak_features)
    assert subset.feature_names == tuple(weak_features)
    assert subset.metrics["auc"] < trained["logreg"].metrics["auc"] - 0.05


def test_bad_arguments_are_named(signals: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="max_dept"):
        train(signals, algo="xgboost", params={"max_dept": 3})
    with pytest.raises(ValueError, match="algo"):
        train(signals, algo="svm")
    with pytest.raises(ValueError, match="features"):
        train(signals, algo="logreg", features=["no_such_column"])
    with pytest.raises(ValueError, match="degrade"):
        train(signals, algo="logreg", degrade=1.5)


# ---------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("algo", ["xgboost", "logreg"])
def test_onnx_parity_within_tolerance(trained: dict[str, TrainResult], algo: str) -> None:
    r = trained[algo]
    blob = _export(r)
    worst = parity_check(r.model, blob, r.X_test, tol=1e-5)
    assert 0 <= worst <= 1e-5
    exported = onnx_scores(blob, r.X_test)
    native = positive_scores(r.model, r.X_test)
    assert np.max(np.abs(exported - native)) == pytest.approx(worst)
    assert exported.std() > 0.05  # a real model, not a constant


@pytest.mark.parametrize("algo", ["xgboost", "logreg"])
def test_onnx_interface_is_plain_tensors(trained: dict[str, TrainResult], algo: str) -> None:
    r = trained[algo]
    blob = _export(r)
    iface = interface(blob)
    assert iface.input_name == INPUT_NAME == "input"
    assert iface.input_type == "tensor(float)"
    assert iface.n_features == len(r.feature_names)
    assert [(name, typ) for name, typ, _ in iface.outputs] == [(OUTPUT_NAME, "tensor(float)")]
    assert OUTPUT_NAME == "probabilities" and iface.outputs[0][2][-1] == 2
    proto = onnx.load_from_string(blob)
    assert "ZipMap" not in {n.op_type for n in proto.graph.node}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["feature_names"]) == list(r.feature_names)
    (probs,) = session(blob).run(None, {"input": r.X_test[:50]})
    assert isinstance(probs, np.ndarray) and probs.dtype == np.float32 and probs.shape == (50, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)


def test_platt_calibration_is_folded_into_the_onnx_model(signals: pd.DataFrame) -> None:
    # Few, slow trees are under-confident: Platt must stretch them (slope well above 1).
    underfit = {"n_estimators": 40, "learning_rate": 0.01, "early_stopping_rounds": None}
    raw = train(signals, algo="xgboost", params=underfit, baseline=False)
    cal = train(signals, algo="xgboost", params=underfit, calibration="platt", baseline=False)
    assert isinstance(cal.model, PlattXGBoost) and abs(cal.model.slope - 1) > 0.2
    assert cal.metrics["log_loss"] < raw.metrics["log_loss"]
    assert cal.metrics["auc"] == pytest.approx(raw.metrics["auc"])  # monotone map keeps the ranking
    assert parity_check(cal.model, _export(cal), cal.X_test) <= 1e-5
    # The exported bytes differ from the uncalibrated export in their scores, not only in metadata.
    shift = onnx_scores(_export(cal), cal.X_test) - onnx_scores(_export(raw), raw.X_test)
    assert np.max(np.abs(shift)) > 0.01

    lr_raw = train(signals, algo="logreg", params={"C": 1e-3}, baseline=False)
    lr_cal = train(signals, algo="logreg", params={"C": 1e-3}, calibration="platt", baseline=False)
    assert lr_cal.metrics["log_loss"] < lr_raw.metrics["log_loss"]
    assert parity_check(lr_cal.model, _export(lr_cal), lr_cal.X_test) <= 1e-5


def test_parity_check_reports_diff_and_tolerance(trained: dict[str, TrainResult]) -> None:
    xgb_r, lr_r = trained["xgboost"], trained["logreg"]
    with pytest.raises(ParityError, match=r"max \|ONNX - native\| = .* exceeds tolerance 1e-05"):
        parity_check(xgb_r.model, _export(lr_r), xgb_r.X_test)
    narrow = train(synthetic_signals(2000, seed=5), algo="logreg", features=["signal_strength", "spread_bp"])
    with pytest.raises(ParityError, match="expects 2 features"):
        parity_check(xgb_r.model, _export(narrow), xgb_r.X_test)
    with pytest.raises(ParityError, match="cannot be loaded"):
        parity_check(xgb_r.model, b"not an onnx model", xgb_r.X_test)


# -------------------------------------------------------------------------------------- registry
def test_parity_failure_publishes_nothing(registry, trained: dict[str, TrainResult]) -> None:
    from registry import NotFoundError

    with pytest.raises(ParityError, match="tolerance"):
        publish_result(registry, "tampered", trained["xgboost"], onnx_bytes=_export(trained["logreg"]))
    assert "tampered" not in registry.model_names()
    with pytest.raises(NotFoundError):
        registry.list_versions("tampered")


def test_train_and_publish_stores_a_faithful_version(registry, signals: pd.DataFrame) -> None:
    info, result = train_and_publish(registry, "signals", signals, algo="xgboost", params=FAST_XGB, seed=1)
    assert (info.model, info.version, info.status, info.parent_version) == ("signals", 1, "staged", None)

    blob, sha = registry.get_onnx("signals", 1)
    assert sha == info.sha256 == hashlib.sha256(blob).hexdigest()
    stored_scores = onnx_scores(blob, result.X_test)
    assert np.max(np.abs(stored_scores - positive_scores(result.model, result.X_test))) <= 1e-5

    stored = registry.get_version("signals", 1)
    assert stored.feature_names == result.feature_names
    assert stored.data_hash == data_hash(signals)
    assert stored.params["algo"] == "xgboost" and stored.params["seed"] == 1
    assert stored.params["n_trees"] == result.params["n_trees"]
    assert stored.params["max_depth"] == FAST_XGB["max_depth"]
    for key in ("auc", "brier", "log_loss", "ece", "n_train", "n_test", "baseline_auc"):
        assert stored.metrics[key] == pytest.approx(result.metrics[key]), key
    assert 0 <= stored.metrics["onnx_max_abs_diff"] <= 1e-5

    info2, result2 = train_and_publish(registry, "signals", signals, algo="logreg", parent_version=1,
                                       status="canary")
    assert (info2.version, info2.parent_version, info2.status) == (2, 1, "canary")
    assert registry.get_version("signals", 2).params["algo"] == "logreg"
    blob2, _ = registry.get_onnx("signals", 2)
    assert not np.allclose(onnx_scores(blob2, result2.X_test), stored_scores)  # really the other model


# ------------------------------------------------------------------------------------- benchmark
def test_benchmark_model_has_32_inputs_and_200_trees() -> None:
    blob, names, sample = benchmark_model(seed=0)
    assert len(names) == N_FEATURES == 32 and len(set(names)) == 32
    assert names[: len(DOMAIN_FEATURES)] == list(DOMAIN_FEATURES)
    assert interface(blob).n_features == 32
    proto = onnx.load_from_string(blob)
    (ensemble,) = [n for n in proto.graph.node if n.op_type == "TreeEnsembleClassifier"]
    tree_ids = next(a.ints for a in ensemble.attribute if a.name == "nodes_treeids")
    assert len(set(tree_ids)) == N_TREES == 200
    max_depth_nodes = max(np.bincount(np.asarray(tree_ids)))
    assert max_depth_nodes <= 2 ** (6 + 1) - 1  # depth 6 at most
    assert sample.dtype == np.float32 and sample.shape == (1024, 32)
    scores = onnx_scores(blob, sample)
    assert ((scores > 0) & (scores < 1)).all() and scores.std() > 0.05


# --------------------------------------------------------------------------------------- metrics
def test_metrics_agree_with_definitions() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 20_000)
    y = (rng.uniform(0, 1, p.size) < p).astype(int)  # perfectly calibrated by construction
    assert ece(y, p) < 0.02
    distorted = p**3
    assert ece(y, distorted) > 0.1
    assert brier(y, p) == pytest.approx(np.mean((p - y) ** 2))
    assert logloss(y, p) == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    bins = reliability(y, p, n_bins=10)
    assert sum(b.count for b in bins) == len(y)
    assert all(b.lower <= b.mean_predicted <= b.upper for b in bins)
    assert auc(y, p) > 0.7 and auc(y, 1 - p) == pytest.approx(1 - auc(y, p))
    assert np.isnan(auc(np.ones(5), np.linspace(0.1, 0.9, 5)))
    assert set(evaluate(y, p)) >= {"auc", "brier", "log_loss", "ece"}
    with pytest.raises(ValueError, match="probabilities"):
        brier(y[:2], np.array([0.5, 1.5]))
