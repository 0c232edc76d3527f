"""The only place where traffic-split weights are computed, and where a rollout policy is read from
its stored dict form. Every caller (the controller, operator operations, retraining's canary start,
the CLI's `canary set`, the audit recomputation) goes through these functions, so a rule about
weights (they sum to 100, the baseline absorbs what the canary gives up, ...) lives once.

Pure functions over `{version: percent}` dicts: no registry, no gRPC."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from rollout.policy import RolloutPolicy

Weights = dict[int, int]


class SplitError(ValueError):
    """The requested split cannot be made from the current one; the message says why."""


def arms(weights: Mapping[int, int], status: Mapping[int, str]) -> tuple[int, int] | None:
    """(baseline, canary) among the weighted versions: the production version (else the heaviest)
    is the baseline; the newest other weighted version is the canary."""
    weights = dict(weights)
    if len(weights) < 2:
        return None
    production = [v for v in weights if status.get(v) == "production"]
    baseline = production[0] if production else max(weights, key=lambda v: (weights[v], -v))
    canary = max(v for v in weights if v != baseline)
    return baseline, canary


def rollback(weights: Mapping[int, int], baseline: int, canary: int) -> Weights:
    """The canary's weight goes back to the baseline."""
    return {**weights, baseline: weights[baseline] + weights[canary], canary: 0}


def step_up(weights: Mapping[int, int], baseline: int, canary: int, new_weight: int) -> Weights:
    """The canary grows to `new_weight`; the baseline gives up what the canary gains."""
    grow = new_weight - weights[canary]
    return {**weights, canary: new_weight, baseline: max(0, weights[baseline] - grow)}


def only(weights: Mapping[int, int], version: int) -> Weights:
    """Every listed version at 0 and `version` at 100 (promotion, or rollback to a standby)."""
    return {v: 0 for v in weights} | {version: 100}


def canary_start(production: int, candidate: int, percent: int) -> Weights:
    """A fresh canary beside production."""
    _check_percent(percent)
    return {production: 100 - percent, candidate: percent}


def set_weight(current: Mapping[int, int], version: int, percent: int) -> Weights:
    """`version` at `percent`; the heaviest other version absorbs the difference (the operator's
    `chimera canary set`). Raises SplitError when the other versions cannot make room."""
    _check_percent(percent)
    others = {v: w for v, w in current.items() if v != version and w > 0}
    if not others:
        if percent != 100:
            raise SplitError(f"no other version has traffic to take the remaining {100 - percent}%")
        return {version: 100}
    main = max(others, key=lambda v: (others[v], -v))
    rest = sum(w for v, w in others.items() if v != main)
    main_weight = 100 - percent - rest
    if main_weight < 0:
        raise SplitError(f"other versions already hold {rest}%; lower them first")
    return {**others, main: main_weight, version: percent}


def _check_percent(percent: int) -> None:
    if not 0 <= percent <= 100:
        raise SplitError("percent must be within 0..100")


def policy_from_dict(data: Mapping[str, Any] | None, *, metric: str | None = None) -> RolloutPolicy:
    """A RolloutPolicy from a stored dict (a model's rollout_config, or a decision row's policy).
    Unknown keys and None values are ignored, so an old row still parses; `metric` (the model's
    declared metric) wins over the dict's."""
    fields = {f.name for f in dataclasses.fields(RolloutPolicy)}
    kwargs = {k: v for k, v in (data or {}).items() if k in fields and v is not None}
    if "steps" in kwargs:
        kwargs["steps"] = tuple(int(s) for s in kwargs["steps"])
    if metric is not None:
        kwargs["metric"] = metric
    return RolloutPolicy(**kwargs)


# A latency window this long holds a whole period: one window, so the guardrail falls back to the
# per-request variance, the rule decisions were made with before time windows existed.
_ONE_WINDOW = 2**31 - 1


def stored_policy(stored: Mapping[str, Any]) -> RolloutPolicy:
    """The policy a stored decision was made with (its `details["policy"]`): what `chimera analyze`
    recomputes with, and what the controller keeps for the rest of a rollout (rollout.controller). Every
    field is stored, so a missing one is one the code did not have then: a decision stored before the
    latency guardrail's time windows (2026-12-03) is recomputed with the per-request rule it used, not
    with today's defaults; one stored before the error guardrail's windows (2026-12-07) with its
    per-request error variance; one stored before the trailing covariate stand-ins (that evening) with
    the block rule and the adjusted test's pooled canary variance."""
    policy = policy_from_dict(stored)
    if "covariate_standin" not in stored:
        policy = dataclasses.replace(policy, covariate_standin="block")
    if "canary_variance_floor" not in stored:
        policy = dataclasses.replace(policy, canary_variance_floor=False)
    if "latency_window" not in stored:
        policy = dataclasses.replace(policy, latency_window=_ONE_WINDOW, latency_min_windows=0)
    if "error_windows" not in stored:
        policy = dataclasses.replace(policy, error_windows=False)
    return policy
