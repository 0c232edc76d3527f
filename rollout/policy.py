"""The rollout policy: every knob of a model's canary analysis, validated once, with the derived
values (τ, the error budget's shares, the next step) that every decision stores so it recomputes
without depending on defaults. Read from a stored dict by ``rollout.splits.policy_from_dict``; the
rules that use it are ``rollout.decision.look``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from chimera.settings import ReplicaScaling
from rollout.stats import METRICS, higher_is_better

# Default mixing scale τ in the metric's own units: roughly the smallest effect worth catching. The
# mSPRT has most power for effects of about this size. mean_outcome has no natural scale, so it has no
# default and the policy refuses to guess.
DEFAULT_TAU: dict[str, float] = {"success_rate": 0.04, "brier": 0.02, "log_loss": 0.05}
# Metrics a shadow can be judged on by pairs (rollout.paired): they depend only on the score and the
# outcome, so the shadow's score and the served one are compared on the same row.
PAIRED_METRICS: tuple[str, ...] = ("brier", "log_loss")

# The replica fields of a policy (None: the gateway's CHIMERA_REPLICAS_* / CHIMERA_REPLICA_* setting).
SCALING_FIELDS = ("replicas_min", "replicas_max", "canary_replicas_max", "target_ongoing_requests",
                  "upscale_delay_s", "downscale_delay_s")
MAX_REPLICAS = 1000  # per version: far beyond any cluster here, low enough to catch a typo


@dataclass(frozen=True)
class RolloutPolicy:
    """How a canary is judged (stored with every decision; unknown keys in a stored dict are ignored).

    Error budget: ``alpha`` (total false rollback of an A/A canary) = primary + 2 · ``guardrail_alpha``.
    ``outcome_delay_s``: how long after a prediction its outcome may arrive; a look compares only
    predictions older than that, and only outcomes that arrived within it (0: whatever has arrived).

    Replicas per version (Ray Serve's autoscaler; each field None: the gateway's process setting,
    chimera.settings.ReplicaScaling): the production version runs ``replicas_min`` ..
    ``replicas_max``; every other deployed version (canary, shadow, standby) at most
    ``canary_replicas_max``, so a canary at 5 % cannot hold as many replicas as production. Serve adds
    a replica when the Ray calls in flight per replica exceed ``target_ongoing_requests`` for
    ``upscale_delay_s`` and removes one after ``downscale_delay_s`` below it. Changed at run time
    (RolloutService.SetScaling, ``chimera rollout scaling``), applied without restarting replicas.
    """

    metric: str = "success_rate"
    alpha: float = 0.05
    min_samples_per_arm: int = 200
    min_expected_events: float = 20.0
    promote_alpha: float | None = None
    steps: tuple[int, ...] = (5, 10, 25, 50, 100)
    tau: float | None = None
    guardrail_alpha: float | None = None
    point_mass: float = 0.9
    max_error_rate_delta: float = 0.01
    error_tau: float = 0.1
    max_slow_share_delta: float = 0.02
    latency_tau: float = 0.1
    latency_quantile: float = 0.99
    latency_calibration: int = 500
    latency_window: int = 50
    latency_min_windows: int = 10
    # The error guardrail's variance: the larger of the per-request one and the one over the latency
    # guardrail's time windows (rollout.lookdata), so a replica down for a few seconds is one shock.
    # False: per request only, the rule of decisions stored before 2026-12-07 (rollout.splits).
    error_windows: bool = True
    srm_alpha: float = 0.001
    srm_tau: float = 0.02
    coverage_tau: float = 0.05
    outcome_delay_s: float = 0.0
    # CUPED (rollout.covariate): the per-row covariate the canary test adjusts by, used only where the
    # caller has it for its rows (on by default where available); "" turns it off (a stored config's
    # None means "the default" to policy_from_dict).
    covariate: str | None = "production_score"
    covariate_calibration: int = 1000  # baseline outcomes that fix θ (as the winsor limits)
    # A missing covariate's stand-in (rollout.covariate): "trailing", the mean of the baseline rows before
    # it; "block", the rule of decisions stored before 2026-12-07's evening (rollout.splits).
    covariate_standin: str = "trailing"
    # The adjusted test's canary variance: at least the canary's own, not only the one pooled over both
    # arms, because canary rows without x keep more of y's variance (rollout.covariate). False: pooled
    # only, the rule of decisions stored before 2026-12-07's evening (rollout.splits).
    canary_variance_floor: bool = True
    # Shadow stage (rollout.shadow_gate): a shadowed version is judged on paired outcomes; with
    # ``shadow_gate`` on, it takes traffic only after "not worse" and a "worse" one never serves.
    # ``shadow_metric`` None: the model's metric when score-based, else Brier.
    shadow_gate: bool = False
    shadow_metric: str | None = None
    shadow_margin: float | None = None
    shadow_min_pairs: int = 200
    # The score at which the model's caller acts (score >= threshold): where `chimera shadow report`
    # counts decision agreement between the served and the shadow version.
    decision_threshold: float = 0.5
    winsor_quantile: float | None = 0.01
    winsor_calibration: int = 1000
    min_canary_samples_per_step: int = 200
    non_inferiority_margin: float | None = None
    replicas_min: int | None = None
    replicas_max: int | None = None
    canary_replicas_max: int | None = None
    target_ongoing_requests: float | None = None
    upscale_delay_s: float | None = None
    downscale_delay_s: float | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; expected one of {METRICS}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError("alpha must be in (0, 1)")
        if self.guardrail_alpha is not None and not 0.0 < 2.0 * self.guardrail_alpha < self.alpha:
            raise ValueError("guardrail_alpha must be > 0 and leave part of alpha to the primary metric")
        if not 0.0 < self.srm_alpha < 1.0:
            raise ValueError("srm_alpha must be in (0, 1)")
        if self.min_samples_per_arm < 2:
            raise ValueError("min_samples_per_arm must be at least 2 (a variance needs two values)")
        steps = tuple(int(s) for s in self.steps)
        if not steps or steps[-1] != 100 or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError("steps must be strictly increasing and end at 100")
        if steps[0] <= 0:
            raise ValueError("steps must be positive")
        object.__setattr__(self, "steps", steps)
        if self.tau is None and self.metric not in DEFAULT_TAU:
            raise ValueError(f"metric {self.metric!r} has no natural scale: set tau (in outcome units)")
        for name in ("tau", "error_tau", "latency_tau", "srm_tau", "coverage_tau"):
            v = getattr(self, name)
            if v is not None and not (v > 0.0 and math.isfinite(v)):
                raise ValueError(f"{name} must be positive")
        if self.promote_alpha is not None and not 0.0 < self.promote_alpha <= self.alpha:
            raise ValueError("promote_alpha must be in (0, alpha]")
        if self.non_inferiority_margin is not None and self.non_inferiority_margin < 0.0:
            raise ValueError("non_inferiority_margin must be >= 0")
        if not 0.0 <= self.point_mass <= 1.0:
            raise ValueError("point_mass must be in [0, 1]")
        if self.outcome_delay_s < 0.0:
            raise ValueError("outcome_delay_s must be >= 0")
        if self.covariate_calibration < 2:
            raise ValueError("covariate_calibration must be at least 2 (a slope needs two rows)")
        if self.covariate_standin not in ("trailing", "block"):
            raise ValueError(f"covariate_standin: {self.covariate_standin!r} must be 'trailing' or 'block'")
        if self.latency_calibration < 1 or self.latency_window < 1 or self.latency_min_windows < 0:
            raise ValueError("latency_calibration and latency_window must be >= 1, latency_min_windows >= 0")
        if self.shadow_metric is not None and self.shadow_metric not in PAIRED_METRICS:
            raise ValueError(f"shadow_metric: {self.shadow_metric!r} must be one of {PAIRED_METRICS}")
        margin = self.shadow_margin
        if margin is not None and not (margin > 0.0 and math.isfinite(margin)):
            raise ValueError("shadow_margin must be positive")
        if self.shadow_min_pairs < 2:
            raise ValueError("shadow_min_pairs must be at least 2 (a variance needs two values)")
        if not 0.0 < self.decision_threshold < 1.0:
            raise ValueError("decision_threshold must be in (0, 1)")
        if self.winsor_quantile is not None and not 0.0 <= self.winsor_quantile < 0.5:
            raise ValueError("winsor_quantile must be in [0, 0.5)")
        self._check_scaling()

    def _check_scaling(self) -> None:
        """Each message starts with the field's name: an operator's bad value is refused at the door
        (INVALID_ARGUMENT) instead of failing a deployment later."""
        for name in ("replicas_min", "replicas_max", "canary_replicas_max"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_REPLICAS:
                raise ValueError(f"{name}: {v!r} must be a whole number of replicas in 1..{MAX_REPLICAS}")
        if self.replicas_min is not None and self.replicas_max is not None \
                and self.replicas_max < self.replicas_min:
            raise ValueError(f"replicas_max: {self.replicas_max} is below replicas_min ({self.replicas_min})")
        if self.canary_replicas_max is not None and self.replicas_max is not None \
                and self.canary_replicas_max > self.replicas_max:
            raise ValueError(f"canary_replicas_max: {self.canary_replicas_max} is above replicas_max "
                             f"({self.replicas_max}); a canary never needs more replicas than production")
        v = self.target_ongoing_requests
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                              or not (v > 0.0 and math.isfinite(v))):
            raise ValueError(f"target_ongoing_requests: {v!r} must be a positive number")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                                  or not (v >= 0.0 and math.isfinite(v))):
                raise ValueError(f"{name}: {v!r} must be a number of seconds >= 0")

    def replica_scaling(self, default: ReplicaScaling, *, canary: bool) -> ReplicaScaling:
        """The replicas one version runs: this policy's fields over the gateway's `default`. `canary`:
        any version but the production one (a canary, a shadow, the standby), capped at
        ``canary_replicas_max``. A bound the policy leaves unset follows the one it sets (min 3 with the
        default max 1 runs 3), so a valid policy always gives a valid scaling."""
        high = self.replicas_max
        low = self.replicas_min
        if high is None:
            high = max(default.max_replicas, low or 1)
        if low is None:
            low = min(default.min_replicas, high)
        if canary and self.canary_replicas_max is not None:
            high = self.canary_replicas_max
            low = min(low, high)
        return ReplicaScaling(
            min_replicas=low, max_replicas=high,
            target_ongoing_requests=float(self.target_ongoing_requests
                                          if self.target_ongoing_requests is not None
                                          else default.target_ongoing_requests),
            upscale_delay_s=float(self.upscale_delay_s if self.upscale_delay_s is not None
                                  else default.upscale_delay_s),
            downscale_delay_s=float(self.downscale_delay_s if self.downscale_delay_s is not None
                                    else default.downscale_delay_s),
            look_back_s=default.look_back_s)

    @property
    def resolved_shadow_metric(self) -> str:
        """The metric a shadow is judged on: ``shadow_metric``, else the model's when it is score-based
        (a shadow's business outcome cannot be observed: it never acts), else Brier."""
        if self.shadow_metric is not None:
            return self.shadow_metric
        return self.metric if self.metric in PAIRED_METRICS else "brier"

    @property
    def higher_is_better(self) -> bool:
        """Derived from the metric so a loss can never be configured the wrong way round."""
        return higher_is_better(self.metric)

    @property
    def resolved_tau(self) -> float:
        """The τ actually used; stored in every decision so recomputation does not depend on defaults."""
        return float(self.tau) if self.tau is not None else DEFAULT_TAU[self.metric]

    @property
    def resolved_guardrail_alpha(self) -> float:
        """Each guardrail's share of the budget: ``guardrail_alpha``, by default alpha / 50 (0.001 of
        0.05), small because a crashing or slow canary gives overwhelming evidence anyway."""
        return float(self.guardrail_alpha) if self.guardrail_alpha is not None else self.alpha / 50.0

    @property
    def resolved_promote_alpha(self) -> float:
        """Alpha of the "better" test behind a step-up or promotion: by default half the primary alpha,
        since shipping on evidence should need more of it than stopping a canary."""
        return float(self.promote_alpha) if self.promote_alpha is not None else self.primary_alpha / 2.0

    @property
    def primary_alpha(self) -> float:
        """The primary metric's share of the budget (each direction)."""
        return self.alpha - 2.0 * self.resolved_guardrail_alpha

    def next_weight(self, current_weight: int) -> int:
        """Smallest step above the current weight; 100 when the canary is already at or past the last step."""
        for s in self.steps:
            if s > current_weight:
                return s
        return self.steps[-1]

    def builder_options(self) -> dict[str, Any]:
        """The LookBuilder settings this policy implies."""
        return {"winsor_quantile": self.winsor_quantile, "winsor_calibration": self.winsor_calibration,
                "latency_quantile": self.latency_quantile, "latency_calibration": self.latency_calibration,
                "latency_window": self.latency_window}
