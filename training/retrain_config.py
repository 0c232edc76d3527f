"""How to retrain: `RetrainConfig`, validated at construction and stored with every run's parameters."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from training.retrain_gate import CandidateLoadTest

MODES = ("full", "incremental")
GATE_METRICS: tuple[str, ...] = ("auc", "brier", "ece", "outcome_metric")  # not to get worse


@dataclass(frozen=True)
class RetrainConfig:
    """How to retrain. `canary_percent=None` starts the canary at the first step of the model's
    rollout policy (rollout_config["steps"][0], default 5); `canary=False` publishes without one.
    `loadtest` is the injected pre-canary load test (training.retrain_gate); None: no load test, and
    promotion waits for one."""

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
    loadtest: CandidateLoadTest | None = None

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
        """JSON-ready; the load-test gate contributes its own `to_dict` (which never holds secrets)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["window"] = self.window.total_seconds()
        out["params"] = dict(self.params or {})
        out["fractions"] = list(self.fractions)
        out["gate"] = list(self.gate)
        out["loadtest"] = self.loadtest.to_dict() if self.loadtest is not None else None
        return out
