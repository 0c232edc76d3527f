"""The two model families and their optional calibration.

- XGBoost (`XGBClassifier`, hist, fixed seed, n_jobs=2) with early stopping on the validation window:
  the production candidate.
- Logistic regression (`StandardScaler` + `LogisticRegression` in a Pipeline): the baseline that any
  candidate must beat, and a second, structurally different model for canary demos.

Calibration is Platt scaling fitted on the validation window, chosen because it can be folded into
the exported model *exactly*, so the ONNX bytes serve the calibrated probabilities and the parity
check covers calibration too (isotonic calibration has no clean ONNX form for XGBoost):

- logistic regression: sigmoid(a * (w.x + b) + c) is again a logistic regression, so the slope and
  intercept are folded into `coef_` / `intercept_`; the result is a plain Pipeline.
- XGBoost: the Platt map acts on the margin, sigmoid(a * margin + c); `PlattXGBoost` wraps the
  classifier natively and `training.export` scales the tree leaf weights by a and sets the base value
  to a * base + c in the ONNX tree ensemble, which computes exactly that.

All models take float32 rows: XGBoost trains and predicts in float32 and ONNX inputs are float32,
so feeding everything the same float32 matrix is what makes native-vs-ONNX parity meaningful.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Protocol

import numpy as np
import xgboost as xgb
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

Algo = Literal["xgboost", "logreg"]
ALGOS: tuple[str, ...] = ("xgboost", "logreg")
CALIBRATIONS: tuple[str, ...] = ("none", "platt")


class ProbabilityModel(Protocol):
    """What the rest of the package needs from a fitted model."""

    def predict_proba(self, X: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class XGBoostParams:
    """Hyper-parameters of the XGBoost model. `early_stopping_rounds=None` trains all trees."""

    n_estimators: int = 300
    max_depth: int = 4
    learning_rate: float = 0.05
    early_stopping_rounds: int | None = 30
    min_child_weight: float = 1.0
    subsample: float = 1.0
    colsample_bytree: float = 1.0
    reg_lambda: float = 1.0
    n_jobs: int = 2


@dataclass(frozen=True)
class LogRegParams:
    """Hyper-parameters of the logistic-regression baseline (L2, lbfgs)."""

    C: float = 1.0
    max_iter: int = 1000


def make_params(algo: str, overrides: dict[str, Any] | None = None) -> XGBoostParams | LogRegParams:
    """Defaults for `algo` with `overrides` applied; an unknown key is an error (a typo in a
    hyper-parameter must not silently train the default model)."""
    cls: type[XGBoostParams] | type[LogRegParams]
    if algo == "xgboost":
        cls = XGBoostParams
    elif algo == "logreg":
        cls = LogRegParams
    else:
        raise ValueError(f"algo: must be one of {', '.join(ALGOS)}, got {algo!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise ValueError(
            f"params: unknown for {algo}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**(overrides or {}))


def params_dict(params: XGBoostParams | LogRegParams) -> dict[str, Any]:
    """JSON-ready form of the parameters, stored with the published version."""
    return asdict(params)


def fit_xgboost(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray | None,
    y_val: np.ndarray | None,
    *,
    params: XGBoostParams,
    seed: int = 0,
) -> xgb.XGBClassifier:
    """Fit with early stopping on the validation window when `early_stopping_rounds` is set.

    After early stopping the booster still holds the extra rounds, but `predict_proba` and the ONNX
    converter both use only the trees up to `best_iteration` (the parity check proves they agree)."""
    early = params.early_stopping_rounds
    if early is not None and (X_val is None or y_val is None or len(X_val) == 0):
        raise ValueError("early stopping needs a non-empty validation window")
    model = xgb.XGBClassifier(
        n_estimators=params.n_estimators,
        max_depth=params.max_depth,
        learning_rate=params.learning_rate,
        min_child_weight=params.min_child_weight,
        subsample=params.subsample,
        colsample_bytree=params.colsample_bytree,
        reg_lambda=params.reg_lambda,
        tree_method="hist",
        objective="binary:logistic",
        eval_metric="logloss",
        early_stopping_rounds=early,
        n_jobs=params.n_jobs,
        random_state=seed,
    )
    eval_set = [(X_val, y_val)] if X_val is not None and y_val is not None and len(X_val) else None
    model.fit(X_train, y_train, eval_set=eval_set, verbose=False)
    return model


def fit_logreg(X_train: np.ndarray, y_train: np.ndarray, *, params: LogRegParams) -> Pipeline:
    """Scaler + logistic regression; scaling matters because features differ by orders of
    magnitude (funding_rate ~1e-4, spread_bp ~1)."""
    model = Pipeline([
        ("scale", StandardScaler()),
        ("clf", LogisticRegression(C=params.C, max_iter=params.max_iter)),
    ])
    model.fit(X_train, y_train)
    return model


@dataclass(frozen=True)
class PlattXGBoost:
    """XGBoost with Platt scaling on the margin: P(1) = sigmoid(slope * margin + intercept)."""

    model: xgb.XGBClassifier
    slope: float
    intercept: float

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        margin = np.asarray(self.model.predict(X, output_margin=True), dtype=np.float64)
        p1 = expit(self.slope * margin + self.intercept)
        return np.column_stack([1.0 - p1, p1])


def _platt_fit(margin: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Slope and intercept of a (nearly unregularised) 1-D logistic fit of y on the margin."""
    if len(np.unique(y)) < 2:
        raise ValueError("calibration: the validation window has a single class")
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(margin.reshape(-1, 1), y)
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def platt_calibrate(model: ProbabilityModel, X_val: np.ndarray, y_val: np.ndarray) -> ProbabilityModel:
    """Return a calibrated copy of `model` (the input is left untouched); see the module docstring."""
    if isinstance(model, xgb.XGBClassifier):
        slope, intercept = _platt_fit(np.asarray(model.predict(X_val, output_margin=True)), y_val)
        return PlattXGBoost(model, slope, intercept)
    if isinstance(model, Pipeline) and isinstance(model[-1], LogisticRegression):
        slope, intercept = _platt_fit(np.asarray(model.decision_function(X_val)), y_val)
        folded = copy.deepcopy(model)
        clf: LogisticRegression = folded[-1]
        clf.coef_ = clf.coef_ * slope
        clf.intercept_ = clf.intercept_ * slope + intercept
        return folded
    raise TypeError(f"calibration: unsupported model type {type(model).__name__}")


def positive_scores(model: ProbabilityModel, X: np.ndarray) -> np.ndarray:
    """Native P(label=1) for float32 rows, as float64."""
    return np.asarray(model.predict_proba(np.asarray(X, dtype=np.float32))[:, 1], dtype=np.float64)


def n_trees(model: ProbabilityModel) -> int | None:
    """Trees that predictions use (best_iteration + 1 after early stopping); None for non-tree models."""
    if isinstance(model, PlattXGBoost):
        model = model.model
    if isinstance(model, xgb.XGBClassifier):
        best = getattr(model, "best_iteration", None) if model.early_stopping_rounds is not None else None
        return int(best) + 1 if best is not None else int(model.get_booster().num_boosted_rounds())
    return None
