"""Retraining, step "canary": split {production: 100 - p, candidate: p} with p the first step of the
model's rollout policy, candidate status "canary"; the rollout controller judges it from there. One
canary at a time: when another version already has traffic, none is started (and the run says so).
The weight arithmetic is rollout.splits' (the only place for it).

With the policy's ``shadow_gate`` on, the candidate first becomes the model's shadow instead: it scores
a copy of live traffic without answering, and the controller (rollout.shadow_gate) starts the canary
only once the paired evaluation says "not worse"."""

from __future__ import annotations

from registry import ConflictError, Registry, Split
from rollout import splits

DEFAULT_CANARY_PERCENT = 5  # RolloutPolicy's first step when the model has no rollout_config
ACTOR = "retrain"


def first_step(registry: Registry, model: str) -> int:
    """The first canary step of the model's rollout policy (rollout_config["steps"][0]), else 5."""
    getter = getattr(registry, "rollout_config", None)
    config = getter(model) if callable(getter) else {}
    steps = (config or {}).get("steps")
    if steps:
        return int(steps[0])
    return DEFAULT_CANARY_PERCENT


def _busy(split: Split, production: int) -> str:
    """The versions besides production that have traffic ("v3=10%, ..."), or "" when none has."""
    return ", ".join(f"v{v}={w}%" for v, w in sorted(split.weights.items()) if v != production)


def shadow_gated(registry: Registry, model: str) -> bool:
    """True when the model's rollout policy requires a passing shadow evaluation before any canary."""
    return splits.policy_from_dict(registry.rollout_config(model)).shadow_gate


def start_shadow(registry: Registry, model: str, production: int, candidate: int, *, actor: str = ACTOR,
                 reason: str = "") -> tuple[Split | None, str]:
    """Mirror live traffic to the candidate (its shadow evaluation). (None, why) while another version
    has traffic besides production or another version is the shadow: one evaluation at a time."""
    for _ in range(2):
        split = registry.get_split(model)
        busy = _busy(split, production)
        if busy:
            return None, f"shadow not started: another version already has traffic ({busy})"
        if split.shadow is not None and split.shadow != candidate:
            return None, f"shadow not started: v{split.shadow} is being shadowed"
        try:
            new = registry.set_shadow(model, candidate, actor=actor, expected_revision=split.revision,
                                      reason=reason or f"retrain: shadow evaluation of v{candidate}")
        except ConflictError:
            continue
        return new, ""
    return None, "shadow not started: the split kept changing under us"


def start_canary(registry: Registry, model: str, production: int, candidate: int, percent: int, *,
                 actor: str = ACTOR, reason: str = "") -> tuple[Split | None, str]:
    """Split {production: 100 - percent, candidate: percent} with the optimistic revision check
    (one retry after a concurrent change) and candidate status "canary". (None, why) when another
    version already has traffic besides production: one canary at a time."""
    for _ in range(2):
        split = registry.get_split(model)
        busy = _busy(split, production)
        if busy:
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
