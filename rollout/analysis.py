"""Recompute a stored rollout decision from the logged rows, with the controller's own code path.

Anyone can check the controller: the decision row names its data window, policy and the sequential
state it started from (the previous decision's); re-reading the rows of that window through the same
builder (``rollout.controller.build_look_data``) and the same ``rollout.decision.look`` must give the
stored statistics, p-values, guardrails and SRM check."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from registry import NotFoundError, Registry
from registry.rollouts import SHADOW_PREFIX, decisions, get_decision, look_rows, split_periods
from rollout import shadow_gate, splits
from rollout.controller import build_look_data
from rollout.decision import Decision, SequentialState, look
from rollout.paired import PairedDecision

# The numbers a reader would check; each must recompute to within 1e-9.
CHECKED = ("statistic", "p_value", "p_value_look", "p_value_worse", "p_value_better", "p_errors", "p_latency",
           "p_srm", "p_coverage", "effect", "variance", "mean_baseline", "mean_canary")


@dataclass(frozen=True)
class Recomputed:
    decision_id: int
    stored: dict[str, Any]
    decision: Decision | PairedDecision
    checked: tuple[str, ...] = CHECKED
    counts: tuple[str, ...] = ("n_baseline", "n_canary")
    # A shadow look's secondary metrics (rollout.shadow_gate), recomputed: checked like the primary's
    # numbers, under "<metric>.<key>".
    others: dict[str, PairedDecision] = dataclasses.field(default_factory=dict)

    def differences(self) -> dict[str, float]:
        """|stored − recomputed| for the numbers a reader would check, and the counts."""
        d = self.stored["details"]
        out = _differences(d, self.decision, self.checked, self.counts)
        for metric, decision in self.others.items():
            stored = d.get("others", {}).get(metric, {})
            out.update({f"{metric}.{k}": v
                        for k, v in _differences(stored, decision, self.checked, self.counts).items()})
        return out

    def values(self, key: str) -> tuple[Any, Any]:
        """(stored, recomputed) for a key of ``differences()`` ("<metric>.<key>" for a secondary)."""
        details, decision = self.stored["details"], self.decision
        metric, _, name = key.rpartition(".")
        if metric:
            details, decision, key = details.get("others", {}).get(metric, {}), self.others[metric], name
        return details.get(key, self.stored.get(key) if not metric else None), getattr(decision, key)


def _differences(stored: dict[str, Any], decision: Decision | PairedDecision, checked: tuple[str, ...],
                 counts: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in checked:
        out[key] = _diff(stored.get(key), getattr(decision, key))
    for key in counts:
        out[key] = float(abs(stored[key] - getattr(decision, key))) if key in stored else math.inf
    return out


def _diff(stored: Any, new: float) -> float:
    if stored is None and not math.isfinite(new):
        return 0.0
    if stored is None or not math.isfinite(new):
        return math.inf
    return abs(float(stored) - float(new))


def recompute(registry: Registry, decision_id: int) -> Recomputed:
    row = get_decision(registry, decision_id)
    if row is None:
        raise NotFoundError(f"decision: no decision with id {decision_id}")
    details = row["details"]
    if "window" not in details or "policy" not in details:
        raise NotFoundError(f"decision: {decision_id} is not a statistical decision (manual action?)")
    if row["action"].startswith(SHADOW_PREFIX):  # a shadow-stage look: the paired test's own path
        decision, others = shadow_gate.recompute(registry, row)
        return Recomputed(decision_id, row, decision, checked=shadow_gate.CHECKED,
                          counts=("n_pairs", "units"), others=others)
    window = details["window"]
    since, until = datetime.fromisoformat(window["since"]), datetime.fromisoformat(window["until"])
    model, b, c = row["model"], row["baseline_version"], row["canary_version"]
    earlier = [r for r in decisions(registry, model, canary=c, since=since, shadow=False)
               if r["id"] < decision_id]
    state = SequentialState.from_dict(earlier[0]["details"]["state"]) if earlier else None
    policy = splits.stored_policy(details["policy"])
    if not details.get("covariate"):
        # Made without covariate adjustment (before the gateway mirrored canary rows, or a rollout that
        # started unadjusted): recompute it unadjusted, as it was made.
        policy = dataclasses.replace(policy, covariate=None)
    data = build_look_data(policy, look_rows(registry, model, (b, c), since, until),
                           split_periods(registry, model, until), b, c, until.timestamp(),
                           row["weight_before"], state)
    decision, _ = look(policy, data, state)
    return Recomputed(decision_id, row, decision)
