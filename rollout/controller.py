"""Rollout controller: at every look, read the rows of both arms from the database, build the look data
with the one builder (rollout.lookdata), judge it with the one pure policy (rollout.decision.look) and
apply the verdict through rollout.splits.

It runs inside every gateway; a PostgreSQL advisory lock makes sure one acts at a time. Everything it
counts (requests, failures, latencies, outcomes, per split period) comes from the shared database, so
every gateway would decide the same. It looks whenever anything it counts changed, not only when an
outcome arrived: a canary that fails every request is rolled back by the error guardrail before any
outcome exists. A decision and the split change it causes commit in one transaction; every look is
stored with its statistics, counts per arm and period, guardrails, SRM and data window, so
`chimera analyze` can recompute it from the rows."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from chimera.jsonsafe import nan_to_none
from registry import ConflictError, ModelInfo, Registry
from registry.loadtests import require_passing_loadtest
from registry.locks import fenced_lock
from registry.rollouts import LookRows, decisions, look_rows, record_decision, rollout_start, split_periods
from rollout import splits
from rollout.covariate import AdjustedBuilder, make_builder
from rollout.decision import Decision, SequentialState, look
from rollout.lookdata import LookData
from rollout.paired import PairedDecision
from rollout.policy import RolloutPolicy
from rollout.shadow_gate import shadow_look, stop_stale_shadow

log = logging.getLogger(__name__)
ACTOR = "rollout-controller"

PromotionGate = Callable[[Registry, str, int], None]
# (model, canary version, decision): for metrics; must not raise.
DecisionHook = Callable[[str, int, Decision], None]
# (model, shadow version, paired decision) of each shadow-stage look: for metrics; must not raise.
ShadowHook = Callable[[str, int, PairedDecision], None]


def loadtest_gate(max_age_s: float | None) -> PromotionGate | None:
    """The promotion gate of a gateway configured with ``promotion_loadtest_max_age_s``: a canary is
    promoted only with a passing load test of it no older than that (None: no gate)."""
    if max_age_s is None:
        return None

    def gate(registry: Registry, model: str, version: int) -> None:
        require_passing_loadtest(registry, model, version, timedelta(seconds=max_age_s))

    return gate


def policy_for(info: ModelInfo, config: dict[str, Any] | None = None) -> RolloutPolicy:
    """The model's declared metric plus its rollout_config overrides (unknown keys are ignored)."""
    return splits.policy_from_dict(config, metric=info.metric)


def arms(info: ModelInfo) -> tuple[int, int] | None:
    """(baseline, canary) of the model's current split (see rollout.splits.arms)."""
    return splits.arms(info.split.weights, {v.version: v.status for v in info.versions})


def _row(model: str, baseline: int, canary: int, d: Decision, weight_after: int,
         details: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model, "baseline_version": baseline, "canary_version": canary, "action": d.action,
        "metric": d.metric, "test": d.test, "statistic": nan_to_none(d.statistic),
        "p_value": nan_to_none(d.p_value), "n_baseline": d.n_baseline, "n_canary": d.n_canary,
        "mean_baseline": nan_to_none(d.mean_baseline), "mean_canary": nan_to_none(d.mean_canary),
        "weight_before": d.current_weight, "weight_after": weight_after,
        "reason": d.reason, "details": {**d.to_dict(), **details},
    }


class RolloutController:
    def __init__(
        self,
        registry: Registry,
        *,
        promotion_gate: PromotionGate | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        actor: str = ACTOR,
        on_decision: DecisionHook | None = None,
        on_shadow: ShadowHook | None = None,
    ) -> None:
        self.on_decision = on_decision
        self.on_shadow = on_shadow
        self.registry = registry
        self.promotion_gate = promotion_gate
        self.clock = clock
        self.actor = actor

    def run_once(self, model: str) -> Decision | PairedDecision | None:
        """One look at one model: its canary, or without one its shadow (rollout.shadow_gate). None when
        there is neither, no new data, or another controller holds the lock."""
        with fenced_lock(self.registry, f"chimera-rollout:{model}") as mine:
            if not mine:
                return None
            # Fenced: the look reads and writes on the lock's own connection, and nothing commits once
            # that connection no longer holds the lock (registry.locks.HeldLock).
            return self._look(model)

    def _look(self, model: str) -> Decision | PairedDecision | None:
        info = self.registry.get_model(model)
        config = self.registry.rollout_config(model)
        policy = policy_for(info, config)
        if stop_stale_shadow(self.registry, info, actor=self.actor):
            return None  # the split moved; the next look reads it again
        pair = arms(info)
        if pair is None:
            return self._shadow_look(info, policy)
        baseline, canary = pair
        weights = dict(info.split.weights)
        since = rollout_start(self.registry, model, canary) or info.versions[-1].created_at
        until = self.clock()
        previous = decisions(self.registry, model, canary=canary, since=since, limit=1, shadow=False)
        verdict = decide(policy, previous[0] if previous else None,
                         look_rows(self.registry, model, (baseline, canary), since, until),
                         split_periods(self.registry, model, until), baseline, canary, until.timestamp(),
                         weights[canary], info.split.revision)
        if verdict is None:
            return None  # nothing new since the last look
        decision, details = verdict
        details["window"] = {"since": since.isoformat(), "until": until.isoformat()}
        applied = self._apply(info, baseline, canary, decision, details)
        if self.on_decision is not None:
            try:
                self.on_decision(model, canary, applied)
            except Exception:  # metrics must never break a rollout
                log.exception("decision hook failed")
        return applied

    def _shadow_look(self, info: ModelInfo, policy: RolloutPolicy) -> PairedDecision | None:
        if info.split.shadow is None:
            return None
        d = shadow_look(self.registry, info, policy, self.clock(), actor=self.actor)
        if d is not None and self.on_shadow is not None:
            try:
                self.on_shadow(info.name, info.split.shadow, d)
            except Exception:  # metrics must never break a rollout
                log.exception("shadow decision hook failed")
        return d

    def _apply(self, info: ModelInfo, baseline: int, canary: int, d: Decision,
               details: dict[str, Any]) -> Decision:
        model = info.name
        weights = dict(info.split.weights)
        if d.action == "promote" and self.promotion_gate is not None:
            try:
                self.promotion_gate(self.registry, model, canary)
            except Exception as exc:  # e.g. no passing load test: keep the evidence, do not ship
                d = dataclasses.replace(d, action="hold", next_weight=d.current_weight,
                                        reason=f"promotion blocked: {exc}")
        if d.action == "hold":
            record_decision(self.registry, _row(model, baseline, canary, d, d.current_weight, details))
            return d
        status: dict[int, str]
        if d.action == "rollback":
            new = splits.rollback(weights, baseline, canary)
            status = {canary: "rolled_back"}
        elif d.action == "step_up":
            new = splits.step_up(weights, baseline, canary, d.next_weight)
            status = {canary: "canary"}
        else:  # promote
            new = splits.only(weights, canary)
            status = {canary: "production", baseline: "standby"}
        try:
            self.registry.set_split(model, new, expected_revision=info.split.revision, actor=self.actor,
                                    reason=f"{d.action}: {d.reason}", status_changes=status,
                                    decision=_row(model, baseline, canary, d, new[canary], details))
        except ConflictError:
            log.info("split of %s changed while deciding; will look again", model)
            return dataclasses.replace(d, action="hold", reason="split changed concurrently; retrying")
        log.warning("rollout %s v%d: %s (p=%.3g) %s", model, canary, d.action, d.p_value, d.reason)
        return d


def _policy_dict(policy: RolloutPolicy) -> dict[str, Any]:
    return nan_to_none(dataclasses.asdict(policy))


def decide(configured: RolloutPolicy, previous: dict[str, Any] | None, rows: LookRows,
           periods: list[tuple[int, dict[int, int], float]], baseline: int, canary: int, until: float,
           current_weight: int, revision: int) -> tuple[Decision, dict[str, Any]] | None:
    """One look from the rows to a verdict and the details its decision row stores, or None when nothing
    counted changed since the previous look (a hold). ``previous`` is the rollout's last decision row as
    the registry returns it (``registry.rollouts.decisions``), None at the first look.

    Everything between the database and ``_apply`` is here, without the database, so that
    ``chimera simulate --path checked`` runs this very function on its generated rows, with
    the previous decision read back through JSON as the registry stores it (rollout.controller_mirror).
    """
    state = SequentialState.from_dict(previous["details"].get("state", {})) if previous else None
    policy = configured
    if previous and previous["details"].get("policy"):
        # A rollout keeps the policy of its first look to its last: its running p-values were made
        # under it, and a level or test chosen after seeing them would void the always-valid
        # guarantee (raising alpha after p = 0.07). A changed rollout config applies to the next
        # rollout; each look records it as pending until then.
        policy = splits.stored_policy(previous["details"]["policy"])
    data = build_look_data(policy, rows, periods, baseline, canary, until, current_weight, state)
    seen = [revision, *data.fingerprint()]
    if previous and previous["action"] == "hold" and previous["details"].get("seen") == seen:
        return None
    decision, new_state = look(policy, data, state)
    details: dict[str, Any] = {"state": new_state.to_dict(), "seen": seen, "policy": _policy_dict(policy)}
    if configured != policy:
        details["policy_pending"] = _policy_dict(configured)
    return decision, details


def build_look_data(policy: RolloutPolicy, rows: LookRows, periods: list[tuple[int, dict[int, int], float]],
                    baseline: int, canary: int, until: float, current_weight: int,
                    state: SequentialState | None) -> LookData:
    """Database rows -> look data through the one builder (the controller and `chimera analyze`).

    A row's period is its split revision, or for rows logged before migration 0005 the revision in
    force when it was logged. Outcomes enter once the prediction is ``outcome_delay_s`` old and count
    only if they arrived within that window (with no declared delay: whatever has arrived by now), the
    same cutoff for both arms. Failed rows never carry an outcome into the comparison: a failed-over
    row's outcome belongs to the version that answered, and its failure is the error guardrail's.

    Covariate adjustment (rollout.covariate): on where the policy names the covariate and the metric is a
    business outcome, for a rollout whose first look chose it; a rollout looked at before without it (a
    stored state with no covariate record, e.g. a decision made before the gateway mirrored canary rows)
    stays unadjusted to its end, so its sequential p-values keep testing one statistic. θ comes from the
    state once fixed, so a restarted controller and ``chimera analyze`` reuse it.
    """
    del baseline  # rows of other versions were left out by the query; the canary marks the arm
    st = state or SequentialState()
    chosen = state is None or st.covariate is not None
    builder = make_builder(policy, covariates_available=chosen, winsor=st.winsor, covariate=st.covariate,
                           latency_thresholds=st.latency_thresholds)
    adjusted = isinstance(builder, AdjustedBuilder)
    if rows.routed.size == 0:
        return builder.data(current_weight)
    rev = rows.revision.copy()
    unknown = rev < 0
    if unknown.any() and periods:
        times = np.array([t for _, _, t in periods])
        idx = np.searchsorted(times, rows.created[unknown], side="right") - 1
        rev[unknown] = np.array([periods[max(i, 0)][0] for i in idx], dtype=np.int64)
    weight_of = {r: w.get(canary, 0) for r, w, _ in periods}
    arm = (rows.routed == canary).astype(np.int64)
    units = builder.codes(rows.unit)
    delay = policy.outcome_delay_s
    matured = rows.created <= until - delay
    arrived = ~np.isnan(rows.value) & (rows.outcome_at <= until)
    if delay > 0.0:
        arrived &= rows.outcome_at <= rows.created + delay
    value = np.where(arrived, rows.value, np.nan)
    for r in np.unique(rev):
        sel = rev == r
        w = weight_of.get(int(r), current_weight)
        builder.add_requests(int(r), w, arm[sel], units[sel], rows.failed[sel], rows.latency_ms[sel])
        out = sel & matured & ~rows.failed
        if out.any():
            if adjusted:
                builder.add_outcomes(int(r), w, arm[out], units[out], value[out], rows.score[out],
                                     covariates=rows.covariate[out])
            else:
                builder.add_outcomes(int(r), w, arm[out], units[out], value[out], rows.score[out])
    return builder.data(current_weight)
