"""Recompute a stored rollout decision from the logged rows, with the same decision code.

Anyone can check the controller: the decision row names its data window and policy; re-reading the
rows of that window and running `decide` again must give the stored statistic and p-values."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from registry import NotFoundError, Registry
from registry.rollouts import arm_rows, decisions, get_decision
from rollout import splits
from rollout.decision import ArmData, Decision, RolloutPolicy, SequentialState, decide


@dataclass(frozen=True)
class Recomputed:
    decision_id: int
    stored: dict[str, Any]
    decision: Decision

    def differences(self) -> dict[str, float]:
        """|stored − recomputed| for the numbers a reader would check."""
        d = self.stored["details"]
        out = {}
        for key in ("statistic", "p_value", "p_value_look", "p_value_worse", "p_value_better",
                    "naive_p_value", "mean_baseline", "mean_canary"):
            stored = d.get(key)
            new = getattr(self.decision, key)
            if stored is None and not math.isfinite(new):
                out[key] = 0.0
            elif stored is None or not math.isfinite(new):
                out[key] = math.inf
            else:
                out[key] = abs(float(stored) - float(new))
        out["n_baseline"] = float(abs(d["n_baseline"] - self.decision.n_baseline))
        out["n_canary"] = float(abs(d["n_canary"] - self.decision.n_canary))
        return out


def _policy(data: dict[str, Any]) -> RolloutPolicy:
    return splits.policy_from_dict(data)


def recompute(registry: Registry, decision_id: int) -> Recomputed:
    row = get_decision(registry, decision_id)
    if row is None:
        raise NotFoundError(f"decision: no decision with id {decision_id}")
    details = row["details"]
    window = details["window"]
    since, until = datetime.fromisoformat(window["since"]), datetime.fromisoformat(window["until"])
    model, b, c = row["model"], row["baseline_version"], row["canary_version"]
    earlier = [r for r in decisions(registry, model, canary=c, since=since) if r["id"] < decision_id]
    state = SequentialState.from_dict(earlier[0]["details"]["state"]) if earlier else None
    seen = details.get("seen", {"b": [0, 0, 0], "c": [0, 0, 0]})
    p99 = details.get("p99_latency_ms", {})
    rb = arm_rows(registry, model, b, since, until)
    rc = arm_rows(registry, model, c, since, until)
    policy = _policy(details["policy"])

    def ms(x: float | None) -> float:
        return x / 1e3 if x is not None else math.nan

    decision, _ = decide(
        policy,
        ArmData(rb.outcomes, rb.scores, rb.requests, seen["b"][2], ms(p99.get("baseline"))),
        ArmData(rc.outcomes, rc.scores, rc.requests, seen["c"][2], ms(p99.get("canary"))),
        row["weight_before"], state)
    return Recomputed(decision_id, row, decision)
