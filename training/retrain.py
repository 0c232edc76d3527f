"""Retrain from logged outcomes, publish only if not worse than production, start the canary.

One retrain, recorded as a `training_runs` row from start to end:

1. Production = the version with status "production", else the one with the most traffic.
2. Feedback = logged predictions with features and outcomes in [now - window, now), projected on the
   production schema (rows scored by a version lacking a production feature are dropped).
3. Candidate:
   - `full`: `training.pipeline.train` on the window (walk-forward train / validation / holdout);
   - `incremental`: XGBoost continued training (`xgb_model=`) from the production version's stored
     native booster on the window's training part, early-stopped on its validation part.
4. Evaluation on the most recent holdout (the window's last rows, which the candidate never saw):
   the candidate natively and production through its ONNX bytes, on the same rows, with AUC, Brier,
   expected calibration error and the model's declared outcome metric (`outcome_metric`).
5. Gate: for every metric in `gate`, the candidate must not be worse than production by more than
   `tolerance` (in the metric's own units; a negative tolerance demands an improvement). If it is,
   nothing is published and the run records why.
6. Publish (export, parity gate, registry; the native booster goes to `model_artifacts`), then,
   unless disabled, a canary: split {production: 100 - p, candidate: p} with p the first step of the
   model's rollout policy, candidate status "canary". The rollout controller judges it from there.
   When another canary already has traffic, none is started (the run says so).
7. Load test (when a gateway target is given: `LoadTestGate`, CHIMERA_GATEWAY_TARGET or
   `chimera retrain --loadtest-target`): before the canary starts, the product's open-loop load test
   runs pinned to the candidate (like `chimera loadtest --version N`) and is stored against it in
   `load_tests`, which is what promotion (manual and the controller's) requires. A candidate that fails
   its SLO, or whose load test cannot run, is not canaried (the run says why). Without a target nothing
   changes, and the run notes that promotion will wait for a passing load test of the candidate.

The model's declared outcome metric on a holdout:
- brier / log_loss: the loss of the scores against the labels;
- success_rate: the success rate of the requests the model would act on (score >= decision threshold);
- mean_outcome: the mean outcome per request when acting on score >= decision threshold (0 otherwise).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb

from registry import ConflictError, Registry, Split, VersionInfo
from registry.locks import advisory_lock
from registry.training_runs import TrainingRunInfo, create_run, get_run, update_run
from rollout import splits
from training.artifacts import load_booster, save_native
from training.datasets import LABEL, TIMESTAMP, data_hash
from training.export import onnx_scores
from training.feedback import OUTCOME, feedback_frame, production_version
from training.metrics import evaluate, logloss
from training.models import (
    XGBoostParams,
    make_params,
    n_trees,
    params_dict,
    platt_calibrate,
    positive_scores,
)
from training.pipeline import TrainResult, train
from training.publish import publish_result
from training.split import time_split

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
MODES = ("full", "incremental")
GATE_METRICS: tuple[str, ...] = ("auc", "brier", "ece", "outcome_metric")
LOWER_IS_BETTER = frozenset({"brier", "log_loss", "ece"})
DEFAULT_CANARY_PERCENT = 5  # RolloutPolicy's first step when the model has no rollout_config
ACTOR = "retrain"

# Load test of a candidate before its canary (LoadTestGate defaults; CHIMERA_RETRAIN_LOADTEST_* override).
LOADTEST_RPS = 50.0
LOADTEST_DURATION_S = 10.0
LOADTEST_WARMUP_S = 2.0
LOADTEST_SLO_P99_MS = 250.0
LOADTEST_MAX_ERROR_RATE = 0.01


class RetrainError(Exception):
    """The retrain cannot run as asked (no production version, too little feedback, ...)."""


class RetrainBusy(RetrainError):
    """Another process is retraining this model right now (advisory lock held)."""


@dataclass(frozen=True)
class LoadTestGate:
    """Load-test a published candidate through a gateway before starting its canary.

    `target` is the gateway (host:port); the run is pinned to the candidate, which needs the gateway's
    admin token (`admin_token`, default CHIMERA_ADMIN_TOKEN). The SLO is the product's gate
    (loadtest.slo.SLO): p99 at most `slo_p99_ms` (None: not checked), error rate at most
    `max_error_rate`, achieved rate at least `min_achieved_ratio` of `rps`. `visible_timeout_s` bounds
    the wait for the gateway to learn of the just-published version (its catalog polls the registry)."""

    target: str
    rps: float = LOADTEST_RPS
    duration_s: float = LOADTEST_DURATION_S
    warmup_s: float = LOADTEST_WARMUP_S
    slo_p99_ms: float | None = LOADTEST_SLO_P99_MS
    max_error_rate: float = LOADTEST_MAX_ERROR_RATE
    min_achieved_ratio: float = 0.9
    admin_token: str | None = field(default=None, repr=False)
    visible_timeout_s: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("loadtest target: required (host:port)")
        for name in ("rps", "duration_s", "visible_timeout_s"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"loadtest {name}: must be > 0, got {v}")
        if not (self.warmup_s >= 0 and math.isfinite(self.warmup_s)):
            raise ValueError(f"loadtest warmup_s: must be >= 0, got {self.warmup_s}")
        self.slo().validate()

    def slo(self) -> Any:
        from loadtest.slo import SLO

        return SLO(p99_ms=self.slo_p99_ms, max_error_rate=self.max_error_rate,
                   min_achieved_ratio=self.min_achieved_ratio)

    def token(self) -> str | None:
        return self.admin_token or os.environ.get("CHIMERA_ADMIN_TOKEN") or None

    def to_dict(self) -> dict[str, Any]:
        """Stored with the run's parameters: never the token."""
        out = dataclasses.asdict(self)
        out.pop("admin_token")
        return out

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> LoadTestGate | None:
        """CHIMERA_GATEWAY_TARGET (none: no load test), CHIMERA_RETRAIN_LOADTEST_RPS,
        CHIMERA_RETRAIN_LOADTEST_DURATION_S, CHIMERA_RETRAIN_LOADTEST_WARMUP_S,
        CHIMERA_RETRAIN_LOADTEST_SLO_P99_MS ("off": not checked), CHIMERA_RETRAIN_LOADTEST_MAX_ERROR_RATE;
        keyword overrides that are not None win (the CLI's options)."""
        e = os.environ if env is None else env
        values: dict[str, Any] = {"target": e.get("CHIMERA_GATEWAY_TARGET", "").strip()}
        for key, name in (("rps", "RPS"), ("duration_s", "DURATION_S"), ("warmup_s", "WARMUP_S"),
                          ("max_error_rate", "MAX_ERROR_RATE")):
            raw = e.get(f"CHIMERA_RETRAIN_LOADTEST_{name}", "").strip()
            if raw:
                values[key] = float(raw)
        p99 = e.get("CHIMERA_RETRAIN_LOADTEST_SLO_P99_MS", "").strip()
        if p99:
            values["slo_p99_ms"] = None if p99.lower() in ("off", "none") else float(p99)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if not values["target"]:
            return None
        return cls(**values)


@dataclass(frozen=True)
class RetrainConfig:
    """How to retrain. `canary_percent=None` starts the canary at the first step of the model's
    rollout policy (rollout_config["steps"][0], default 5); `canary=False` publishes without one."""

    window: timedelta = timedelta(days=90)
    mode: str = "full"
    tolerance: float = 0.0
    canary: bool = True
    canary_percent: int | None = None
    algo: str = "xgboost"
    params: Mapping[str, Any] | None = None
    seed: int = 0
    calibration: str = "none"
    degrade: float = 0.0
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    threshold: float = 0.0
    decision_threshold: float = 0.5
    min_rows: int = 500
    gate: tuple[str, ...] = GATE_METRICS
    incremental_rounds: int = 100
    loadtest: LoadTestGate | None = None  # None: no load test; promotion waits for one

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "incremental" and self.algo != "xgboost":
            raise ValueError("mode: incremental training needs algo xgboost")
        if self.window <= timedelta(0):
            raise ValueError("window: must be positive")
        if self.canary_percent is not None and not 1 <= self.canary_percent <= 99:
            raise ValueError(f"canary_percent: must be within 1..99, got {self.canary_percent}")
        unknown = [g for g in self.gate if g not in (*GATE_METRICS, "log_loss")]
        if unknown or not self.gate:
            raise ValueError("gate: metrics must be among auc, brier, ece, log_loss, outcome_metric; "
                             f"got {unknown}")
        if not math.isfinite(self.tolerance):
            raise ValueError("tolerance: must be finite")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["window"] = self.window.total_seconds()
        out["params"] = dict(self.params or {})
        out["fractions"] = list(self.fractions)
        out["gate"] = list(self.gate)
        out["loadtest"] = self.loadtest.to_dict() if self.loadtest is not None else None
        return out


@dataclass(frozen=True)
class MetricComparison:
    metric: str
    production: float
    candidate: float
    higher_is_better: bool
    worse: bool
    note: str = ""

    @property
    def delta(self) -> float:
        return self.candidate - self.production


@dataclass(frozen=True)
class RetrainOutcome:
    run: TrainingRunInfo
    production_version: int
    published: VersionInfo | None
    candidate: Mapping[str, float]
    production: Mapping[str, float]
    comparison: tuple[MetricComparison, ...]
    canary: Split | None
    reason: str
    notes: tuple[str, ...] = field(default_factory=tuple)
    loadtest: Any = None  # registry.loadtests.LoadTestRecord of the candidate's load test, if one ran


# ------------------------------------------------------------------------------------ evaluation
def outcome_metric(metric: str, y: np.ndarray, scores: np.ndarray, outcomes: np.ndarray,
                   decision_threshold: float = 0.5) -> float:
    """The model's declared metric on a holdout (see the module docstring). NaN when undefined
    (e.g. success_rate of a model that would act on no request)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(scores, dtype=np.float64)
    if metric == "brier":
        return float(np.mean((p - y) ** 2))
    if metric == "log_loss":
        return logloss(y, p)
    acted = p >= decision_threshold
    if metric == "success_rate":
        return float(y[acted].mean()) if acted.any() else math.nan
    if metric == "mean_outcome":
        return float(np.mean(np.where(acted, np.asarray(outcomes, dtype=np.float64), 0.0)))
    raise ValueError(f"metric: unknown outcome metric {metric!r}")


def holdout_metrics(y: np.ndarray, scores: np.ndarray, outcomes: np.ndarray, metric: str,
                    decision_threshold: float = 0.5) -> dict[str, float]:
    """AUC, Brier, log loss, ECE, base rate, mean score and `outcome_metric` on one holdout."""
    out = evaluate(y, scores)
    out["outcome_metric"] = outcome_metric(metric, y, scores, outcomes, decision_threshold)
    out["n"] = float(len(y))
    return out


def compare_metrics(candidate: Mapping[str, float], production: Mapping[str, float], *, metric: str,
                    gate: Sequence[str] = GATE_METRICS, tolerance: float = 0.0) -> list[MetricComparison]:
    """Per gate metric: is the candidate worse than production by more than `tolerance`? A metric the
    candidate leaves undefined while production has it counts as worse; one production lacks is
    skipped (nothing to compare against)."""
    out = []
    for name in gate:
        if name == "outcome_metric":
            hib = metric not in ("brier", "log_loss")
        else:
            hib = name not in LOWER_IS_BETTER
        c, p = float(candidate.get(name, math.nan)), float(production.get(name, math.nan))
        label = f"{name} ({metric})" if name == "outcome_metric" else name
        if not math.isfinite(p):
            out.append(MetricComparison(label, p, c, hib, False, "production undefined; not compared"))
            continue
        if not math.isfinite(c):
            out.append(MetricComparison(label, p, c, hib, True, "candidate undefined"))
            continue
        worse = c < p - tolerance if hib else c > p + tolerance
        note = ""
        if worse:
            bound = f"at least {p - tolerance:.4f}" if hib else f"at most {p + tolerance:.4f}"
            note = f"{label} {c:.4f} vs production {p:.4f}: needs {bound} (tolerance {tolerance:g})"
        out.append(MetricComparison(label, p, c, hib, worse, note))
    return out


# ------------------------------------------------------------------------------------ helpers
def code_revision() -> str:
    """CHIMERA_CODE_REVISION (set in container images), else `git rev-parse HEAD` of this checkout
    with "+dirty" when it has local changes, else ""."""
    env = os.environ.get("CHIMERA_CODE_REVISION")
    if env:
        return env[:64]
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return (head + ("+dirty" if dirty else ""))[:64]


def first_step(registry: Registry, model: str) -> int:
    """The first canary step of the model's rollout policy (rollout_config["steps"][0]), else 5."""
    getter = getattr(registry, "rollout_config", None)
    config = getter(model) if callable(getter) else {}
    steps = (config or {}).get("steps")
    if steps:
        return int(steps[0])
    return DEFAULT_CANARY_PERCENT


def start_canary(registry: Registry, model: str, production: int, candidate: int, percent: int, *,
                 actor: str = ACTOR, reason: str = "") -> tuple[Split | None, str]:
    """Split {production: 100 - percent, candidate: percent} with the optimistic revision check
    (one retry after a concurrent change) and candidate status "canary". (None, why) when another
    version already has traffic besides production: one canary at a time."""
    for _ in range(2):
        split = registry.get_split(model)
        others = {v: w for v, w in split.weights.items() if v != production}
        if others:
            busy = ", ".join(f"v{v}={w}%" for v, w in sorted(others.items()))
            return None, f"canary not started: another version already has traffic ({busy})"
        try:
            new = registry.set_split(model, splits.canary_start(production, candidate, percent),
                                     expected_revision=split.revision, actor=actor,
                                     reason=reason or f"retrain: canary v{candidate} at {percent}%")
        except ConflictError:
            continue
        registry.set_version_status(model, candidate, "canary")
        return new, ""
    return None, "canary not started: the split kept changing under us"


class LoadTestFailed(RetrainError):
    """The candidate's load test could not run (gateway unreachable, version never visible, no token)."""


def _wait_until_visible(config: Any, row: Mapping[str, float], timeout_s: float) -> None:
    """Prime the pinned version until the gateway knows it: a version published a moment ago reaches
    the gateway's catalog on its next registry poll (NOT_FOUND until then)."""
    from loadtest.runner import LoadTestError, prime

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            prime(config, dict(row))
            return
        except LoadTestError as exc:
            if "NOT_FOUND" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.25)


def loadtest_candidate(registry: Registry, model: str, version: VersionInfo, gate: LoadTestGate) -> Any:
    """Run the product's open-loop load test pinned to `version` through `gate.target` (what
    `chimera loadtest --version N` does), store it in the registry against the version and return
    the stored LoadTestRecord (passed or not, with the failed SLOs). LoadTestFailed when it cannot run."""
    from loadtest.payload import from_schema
    from loadtest.report import build_report, git_revision
    from loadtest.runner import LoadTestConfig, LoadTestError, run_load_test
    from loadtest.slo import evaluate_slo
    from registry.loadtests import record_load_test

    token = gate.token()
    if not token:
        raise LoadTestFailed("pinning the candidate needs the gateway's admin token: set CHIMERA_ADMIN_TOKEN")
    metadata = (("authorization", f"Bearer {token}"), ("x-chimera-actor", f"loadtest:{ACTOR}"))
    payload = from_schema(version.feature_names, seed=gate.seed)
    config = LoadTestConfig(target=gate.target, model=model, rps=gate.rps, duration_s=gate.duration_s,
                            version=version.version, warmup_s=gate.warmup_s, metadata=metadata,
                            seed=gate.seed)
    slo = gate.slo()
    try:
        config.validate()
        _wait_until_visible(config, payload.rows[0], gate.visible_timeout_s)
        result = run_load_test(config, payload.rows)
    except (LoadTestError, ValueError) as exc:
        raise LoadTestFailed(f"load test of v{version.version} at {gate.target} could not run: "
                             f"{exc}") from None
    failures = evaluate_slo(slo, latency_ms=result.latency_ms(), error_rate=result.error_rate,
                            achieved_ratio=result.achieved_ratio, target_rps=gate.rps)
    report = build_report(result, slo, failures, payload_source=payload.source, git=git_revision(),
                          extra={"trigger": ACTOR})
    return record_load_test(registry, model, version.version, target=gate.target, passed=not failures,
                            failures=failures, slo=slo.stated(), report=report)


class _Tracker:
    """Reports progress to the caller and (throttled) to the run row."""

    def __init__(self, registry: Registry, run_id: int, callback: ProgressFn | None) -> None:
        self.registry, self.run_id, self.callback = registry, run_id, callback
        self._saved = (-1.0, "")

    def __call__(self, fraction: float, stage: str) -> None:
        if self.callback is not None:
            self.callback(fraction, stage)
        last_fraction, last_stage = self._saved
        if stage != last_stage or fraction - last_fraction >= 0.05:
            update_run(self.registry, self.run_id, progress=fraction, stage=stage)
            self._saved = (fraction, stage)


class _XGBProgress(xgb.callback.TrainingCallback):
    def __init__(self, tracker: _Tracker, lo: float, hi: float, rounds: int, stage: str) -> None:
        super().__init__()
        self.tracker, self.lo, self.hi, self.rounds, self.stage = tracker, lo, hi, max(1, rounds), stage
        self.done = 0

    def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
        self.done += 1
        self.tracker(self.lo + (self.hi - self.lo) * min(1.0, self.done / self.rounds), self.stage)
        return False


def _shuffle_labels(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Same recipe as training.pipeline's `degrade`: shuffle the labels of a random fraction of rows."""
    y = y.copy()
    k = int(round(fraction * len(y)))
    if k >= 2:
        idx = rng.choice(len(y), size=k, replace=False)
        y[idx] = y[rng.permutation(idx)]
    return y


def train_incremental(data: pd.DataFrame, features: Sequence[str], booster: xgb.Booster,
                      base_meta: Mapping[str, Any], config: RetrainConfig,
                      tracker: _Tracker | None = None) -> TrainResult:
    """Continue boosting `booster` on the window's training part (early stopping on validation) and
    evaluate on its holdout; returns a TrainResult like `training.pipeline.train` does."""
    overrides = {"n_estimators": config.incremental_rounds, **dict(config.params or {})}
    hp = make_params("xgboost", overrides)
    assert isinstance(hp, XGBoostParams)
    names = list(features)
    windows = time_split(data, *config.fractions)
    X_tr, X_val, X_te = (np.ascontiguousarray(w[names].to_numpy(dtype=np.float32))
                         for w in (windows.train, windows.validation, windows.test))
    y_tr, y_val, y_te = (w[LABEL].to_numpy(dtype=np.int64) for w in (windows.train, windows.validation,
                                                                       windows.test))
    if len(np.unique(y_tr)) < 2:
        raise RetrainError("data: the training window has a single class")
    if booster.num_features() != len(names):
        raise RetrainError(f"incremental: the production booster has {booster.num_features()} features, "
                           f"the schema {len(names)}")
    rng = np.random.default_rng(config.seed)
    y_fit = _shuffle_labels(y_tr, config.degrade, rng) if config.degrade else y_tr
    callbacks = None
    if tracker is not None:
        callbacks = [_XGBProgress(tracker, 0.15, 0.65, hp.n_estimators, "training (incremental)")]
    model = xgb.XGBClassifier(
        n_estimators=hp.n_estimators, max_depth=hp.max_depth, learning_rate=hp.learning_rate,
        min_child_weight=hp.min_child_weight, subsample=hp.subsample, colsample_bytree=hp.colsample_bytree,
        reg_lambda=hp.reg_lambda, tree_method="hist", objective="binary:logistic", eval_metric="logloss",
        early_stopping_rounds=hp.early_stopping_rounds if len(X_val) else None, n_jobs=hp.n_jobs,
        random_state=config.seed, callbacks=callbacks)
    eval_set = [(X_val, y_val)] if len(X_val) else None
    model.fit(X_tr, y_fit, eval_set=eval_set, verbose=False, xgb_model=booster)
    fitted: Any = model
    if config.calibration == "platt":
        fitted = platt_calibrate(model, X_val, y_val)
    metrics = evaluate(y_te, positive_scores(fitted, X_te))
    metrics.update(n_train=float(len(X_tr)), n_validation=float(len(X_val)), n_test=float(len(X_te)))
    record: dict[str, Any] = {
        "algo": "xgboost", **params_dict(hp), "seed": config.seed, "calibration": config.calibration,
        "degrade": config.degrade, "fractions": list(config.fractions), "n_features": len(names),
        "base_trees": int(base_meta.get("n_trees", booster.num_boosted_rounds())),
    }
    trees = n_trees(fitted)
    if trees is not None:
        record["n_trees"] = trees
    return TrainResult(algo="xgboost", model=fitted, feature_names=tuple(names), metrics=metrics,
                       params=record, data_hash=data_hash(data), X_test=X_te, y_test=y_te)


def _json_safe(values: Mapping[str, float]) -> dict[str, float | None]:
    return {k: (float(v) if math.isfinite(v) else None) for k, v in values.items()}


# ------------------------------------------------------------------------------------ retrain
def retrain(
    registry: Registry,
    model: str,
    config: RetrainConfig = RetrainConfig(),
    *,
    now: datetime | None = None,
    trigger: str = "cli",
    progress: ProgressFn | None = None,
) -> RetrainOutcome:
    """Run one retrain of `model` (see the module docstring) and return what happened.

    Raises RetrainBusy when another process holds this model's retrain lock (no run is recorded),
    RetrainError when the retrain cannot run (the run is recorded as failed with the reason), and
    re-raises any other error after recording the run as failed."""
    info = registry.get_model(model)  # NotFoundError for an unknown model, before any run exists
    with advisory_lock(registry, f"chimera-retrain:{model}") as mine:
        if not mine:
            raise RetrainBusy(f"another process is retraining {model!r} right now")
        run = create_run(registry, model, mode=config.mode, params=config.to_dict(), trigger=trigger,
                         code_revision=code_revision())
        tracker = _Tracker(registry, run.id, progress)
        try:
            return _retrain(registry, info.name, info.metric, config, run.id, now, tracker)
        except Exception as exc:
            update_run(registry, run.id, status="failed", reason=f"{type(exc).__name__}: {exc}"[:4000])
            raise


def _retrain(registry: Registry, model: str, metric: str, config: RetrainConfig, run_id: int,
             now: datetime | None, tracker: _Tracker) -> RetrainOutcome:
    until = now or datetime.now(UTC)
    since = until - config.window
    update_run(registry, run_id, status="running", window_start=since, window_end=until)
    tracker(0.02, "resolving production")
    prod = production_version(registry, model)
    if prod is None:
        raise RetrainError(f"model {model!r} has no production version and no traffic to compare against")
    names = list(prod.feature_names)
    update_run(registry, run_id, parent_version=prod.version)

    tracker(0.05, "reading feedback")
    fb = feedback_frame(registry, model, since=since, until=until, features=names, threshold=config.threshold)
    dropped = int(fb[names].isna().any(axis=1).sum()) if len(fb) else 0
    fb = fb.dropna(subset=names).reset_index(drop=True)
    data = fb[[TIMESTAMP, *names, LABEL]]
    update_run(registry, run_id, n_rows=len(data), data_hash=data_hash(data))
    if len(data) < config.min_rows:
        raise RetrainError(f"feedback: {len(data)} rows with features and outcomes in the window "
                           f"{since.isoformat()} .. {until.isoformat()}, need at least {config.min_rows}")
    if data[LABEL].nunique() < 2:
        raise RetrainError("feedback: every outcome in the window has the same label")

    notes: list[str] = []
    if dropped:
        notes.append(f"{dropped} feedback rows lacked a production feature and were left out")
    if config.mode == "incremental":
        tracker(0.1, "loading the production booster")
        loaded = load_booster(registry, model, prod.version)
        if loaded is None:
            raise RetrainError(f"incremental: production v{prod.version} has no stored native booster "
                               f"(published outside the retrain loop?); run a full retrain")
        booster, meta = loaded
        result = train_incremental(data, names, booster, meta, config, tracker)
    else:
        tracker(0.15, "training (full)")
        result = train(data, algo=config.algo, params=config.params, seed=config.seed,  # type: ignore[arg-type]
                       features=names, calibration=config.calibration, degrade=config.degrade,
                       fractions=config.fractions)

    tracker(0.7, "evaluating on the holdout")
    holdout = time_split(fb, *config.fractions).test
    if len(holdout) != len(result.y_test):  # same rows, same cut: anything else is a bug
        raise RetrainError(f"holdout mismatch: {len(holdout)} rows vs {len(result.y_test)} evaluated")
    y = holdout[LABEL].to_numpy(dtype=np.int64)
    outcomes = holdout[OUTCOME].to_numpy(dtype=np.float64)
    X = result.X_test
    onnx_bytes, _ = registry.get_onnx(model, prod.version)
    cand = holdout_metrics(y, positive_scores(result.model, X), outcomes, metric, config.decision_threshold)
    prod_m = holdout_metrics(y, onnx_scores(onnx_bytes, X), outcomes, metric, config.decision_threshold)
    comparison = compare_metrics(cand, prod_m, metric=metric, gate=config.gate, tolerance=config.tolerance)
    worse = [c for c in comparison if c.worse]
    record: dict[str, Any] = {
        "candidate": _json_safe(cand),
        "production": _json_safe(prod_m),
        "production_version": prod.version,
        "outcome_metric": metric,
        "holdout": {"rows": len(holdout), "since": holdout[TIMESTAMP].iloc[0].isoformat(),
                    "until": holdout[TIMESTAMP].iloc[-1].isoformat()},
        "comparison": [{"metric": c.metric, "production": _finite(c.production),
                        "candidate": _finite(c.candidate), "worse": c.worse, "note": c.note}
                       for c in comparison],
        "train": _json_safe({k: v for k, v in result.metrics.items() if isinstance(v, float)}),
    }

    if worse:
        reason = (f"not published: candidate worse than production v{prod.version} on the holdout "
                  f"({len(holdout)} rows): " + "; ".join(c.note for c in worse))
        update_run(registry, run_id, status="succeeded", metrics=record, reason=reason)
        log.info("retrain %s: %s", model, reason)
        return RetrainOutcome(get_run(registry, run_id), prod.version, None, cand, prod_m, tuple(comparison),
                              None, reason, tuple(notes))

    tracker(0.8, "export, parity check, publish")
    params = {**result.params, "mode": config.mode, "training_run": run_id,
              "training_window": [since.isoformat(), until.isoformat()], "feedback_rows": len(data)}
    extra = {f"production_{k}": v for k, v in prod_m.items()
             if k in ("auc", "brier", "ece", "outcome_metric")}
    result = dataclasses.replace(result, params=params, metrics={**result.metrics, **extra,
                                                                 "outcome_metric": cand["outcome_metric"]})
    published = publish_result(registry, model, result, parent_version=prod.version, status="staged",
                               metric=metric)
    save_native(registry, model, published.version, result.model)
    update_run(registry, run_id, published_version=published.version)

    split = None
    lt = None
    canary_ok = config.canary
    if config.loadtest is not None:
        gate = config.loadtest
        tracker(0.85, f"load test of v{published.version} at {gate.target}")
        try:
            lt = loadtest_candidate(registry, model, published, gate)
        except LoadTestFailed as exc:
            record["loadtest"] = {"passed": False, "error": str(exc), "target": gate.target}
            notes.append(f"not canaried: {exc}")
            canary_ok = False
        else:
            p99 = (lt.report.get("latency_ms") or {}).get("p99")
            record["loadtest"] = {"id": lt.id, "passed": lt.passed, "failures": list(lt.failures),
                                  "target": gate.target, "slo": dict(lt.slo), "p99_ms": p99}
            if lt.passed:
                notes.append(f"load test #{lt.id} passed ({gate.rps:g} req/s, p99 "
                             f"{_fmt_ms(p99)})")
            else:
                notes.append(f"not canaried: load test #{lt.id} of v{published.version} failed its SLO: "
                             + "; ".join(lt.failures))
                canary_ok = False
    if canary_ok:
        tracker(0.95, "starting the canary")
        percent = config.canary_percent or first_step(registry, model)
        split, why = start_canary(registry, model, prod.version, published.version, percent,
                                  reason=f"retrain run {run_id}: canary v{published.version} at {percent}% "
                                         f"against v{prod.version}")
        if why:
            notes.append(why)
    if config.loadtest is None:
        notes.append(f"promotion will wait for a passing load test of v{published.version} (no load-test "
                     f"target: set CHIMERA_GATEWAY_TARGET or --loadtest-target, or run `chimera loadtest "
                     f"--model {model} --version {published.version}`)")
    reason = (f"published v{published.version}: not worse than production v{prod.version} on the holdout "
              f"({len(holdout)} rows)")
    if split is not None:
        reason += f"; canary at {split.weights[published.version]}%"
    if notes:
        reason += "; " + "; ".join(notes)
    update_run(registry, run_id, status="succeeded", metrics=record, reason=reason)
    tracker(1.0, "done")
    log.info("retrain %s: %s", model, reason)
    return RetrainOutcome(get_run(registry, run_id), prod.version,
                          registry.get_version(model, published.version), cand, prod_m, tuple(comparison),
                          split, reason, tuple(notes), lt)


def _fmt_ms(value: Any) -> str:
    return f"{value:.1f} ms" if isinstance(value, int | float) and math.isfinite(value) else "n/a"


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
