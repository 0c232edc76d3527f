"""Rollout controller: after every batch of new outcomes, judge each model's canary with the pure
decision policy (rollout.decision) and apply the verdict to the split.

It runs inside every gateway; a PostgreSQL advisory lock makes sure one acts at a time. A decision
and the split change it causes commit in one transaction. Every look with new data is stored with
its statistic, p-value, counts and data window so `chimera analyze` can recompute it from the rows."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from chimera.jsonsafe import nan_to_none
from registry import ConflictError, ModelInfo, Registry
from registry.locks import advisory_lock
from registry.rollouts import arm_rows, decisions, record_decision, rollout_start
from rollout import splits
from rollout.decision import ArmData, Decision, RolloutPolicy, SequentialState, decide

log = logging.getLogger(__name__)
ACTOR = "rollout-controller"

ErrorCounts = Callable[[str, int], int]
PromotionGate = Callable[[Registry, str, int], None]
# (model, canary version, decision): for metrics; must not raise.
DecisionHook = Callable[[str, int, Decision], None]


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
        error_counts: ErrorCounts | None = None,
        promotion_gate: PromotionGate | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        actor: str = ACTOR,
        on_decision: DecisionHook | None = None,
    ) -> None:
        self.on_decision = on_decision
        self.registry = registry
        self.error_counts = error_counts
        self.promotion_gate = promotion_gate
        self.clock = clock
        self.actor = actor

    def run_once(self, model: str) -> Decision | None:
        """One look at one model. None when there is no canary, no new data, or another
        controller holds the lock."""
        with advisory_lock(self.registry, f"chimera-rollout:{model}") as mine:
            if not mine:
                return None
            return self._look(model)

    def _look(self, model: str) -> Decision | None:
        info = self.registry.get_model(model)
        pair = arms(info)
        if pair is None:
            return None
        baseline, canary = pair
        config = self.registry.rollout_config(model)
        policy = policy_for(info, config)
        weights = dict(info.split.weights)
        since = rollout_start(self.registry, model, canary) or info.versions[-1].created_at
        until = self.clock()
        b = arm_rows(self.registry, model, baseline, since, until)
        c = arm_rows(self.registry, model, canary, since, until)
        errors = {v: (self.error_counts(model, v) if self.error_counts else 0) for v in (baseline, canary)}
        previous = decisions(self.registry, model, canary=canary, since=since, limit=1)
        state = None
        if previous:
            prev = previous[0]
            seen = prev["details"].get("seen", {})
            if (prev["action"] == "hold" and seen == {"b": [len(b.outcomes), b.requests, errors[baseline]],
                                                      "c": [len(c.outcomes), c.requests, errors[canary]]}):
                return None  # nothing new since the last look
            state = SequentialState.from_dict(prev["details"].get("state", {}))
        decision, new_state = decide(
            policy,
            ArmData(b.outcomes, b.scores, b.requests, errors[baseline], b.p99_latency_ms / 1e3),
            ArmData(c.outcomes, c.scores, c.requests, errors[canary], c.p99_latency_ms / 1e3),
            weights[canary], state)
        details = {
            "state": new_state.to_dict(),
            "window": {"since": since.isoformat(), "until": until.isoformat()},
            "seen": {"b": [len(b.outcomes), b.requests, errors[baseline]],
                     "c": [len(c.outcomes), c.requests, errors[canary]]},
            "p99_latency_ms": {"baseline": nan_to_none(b.p99_latency_ms),
                               "canary": nan_to_none(c.p99_latency_ms)},
            "policy": _policy_dict(policy),
        }
        applied = self._apply(info, baseline, canary, decision, details)
        if self.on_decision is not None:
            try:
                self.on_decision(model, canary, applied)
            except Exception:  # metrics must never break a rollout
                log.exception("decision hook failed")
        return applied

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
