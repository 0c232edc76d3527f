"""Operator actions on rollouts (promote, rollback, status) as domain calls shared by the admin
gRPC service and the CLI. Manual actions are stored as decisions too, so the history is complete."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from registry import ConflictError, NotFoundError, Registry, Split, ValidationError
from registry.rollouts import arm_rows, decisions, rollout_start
from rollout import splits
from rollout.controller import PromotionGate, arms
from rollout.policy import SCALING_FIELDS
from rollout.shadow_gate import require_shadow_pass
from rollout.stats import per_request_values


def _manual_decision(
    model: str,
    baseline: int,
    canary: int,
    action: str,
    before: int,
    after: int,
    reason: str,
    actor: str,
    forced: bool = False,
) -> dict[str, Any]:
    return {
        "model": model,
        "baseline_version": baseline,
        "canary_version": canary,
        "action": action,
        "metric": "",
        "test": "",
        "n_baseline": 0,
        "n_canary": 0,
        "weight_before": before,
        "weight_after": after,
        "reason": reason,
        "details": {"actor": actor, "forced": forced},
    }


def _with_one_retry(action: Callable[[], Split]) -> Split:
    """Run an operator action that reads the model, decides and writes with the revision it read.

    A concurrent split change (another operator, the controller, a gateway's failover) makes the write
    fail with ConflictError; the action is then decided again once on a fresh read, because what an
    operator asked for ("promote v3", "roll the canary back") still has a meaning on the new state. A
    second conflict is returned to the caller (gRPC ABORTED): the split is moving under them."""
    try:
        return action()
    except ConflictError:
        return action()


def set_split(registry: Registry, model: str, weights: Mapping[int, int], *, expected_revision: int | None,
              actor: str, reason: str = "", forced: bool = False) -> Split:
    """An operator's split (SetTrafficSplit, `chimera canary set`). With the policy's shadow_gate on, a
    version never served before takes traffic only after a passing shadow evaluation, unless forced."""
    if not forced:
        require_shadow_pass(registry, registry.get_model(model), dict(weights))
    return registry.set_split(model, weights, expected_revision=expected_revision, actor=actor, reason=reason,
                              forced=forced)


def promote(
    registry: Registry,
    model: str,
    version: int,
    *,
    actor: str,
    reason: str = "",
    force: bool = False,
    gate: PromotionGate | None = None,
) -> Split:
    """Make `version` the only production version (100 %), the previous production one standby.
    Written with the revision read here (retried once on a fresh read, see _with_one_retry)."""
    return _with_one_retry(lambda: _promote(registry, model, version, actor=actor, reason=reason,
                                            force=force, gate=gate))


def _promote(registry: Registry, model: str, version: int, *, actor: str, reason: str, force: bool,
             gate: PromotionGate | None) -> Split:
    info = registry.get_model(model)
    if version not in {v.version for v in info.versions}:
        raise ValidationError(f"version: model {model!r} has no version {version}")
    if gate is not None and not force:
        gate(registry, model, version)
    weights = dict(info.split.weights)
    status = {v.version: v.status for v in info.versions}
    changes = {v: "standby" for v, s in status.items() if s == "production" and v != version}
    changes[version] = "production"
    previous = next(iter(changes.keys() - {version}), 0)
    return registry.set_split(
        model,
        splits.only(weights, version),
        expected_revision=info.split.revision,
        actor=actor,
        reason=reason or f"promote v{version}" + (" (forced)" if force else ""),
        forced=force,
        status_changes=changes,
        decision=_manual_decision(
            model,
            previous,
            version,
            "manual_promote",
            weights.get(version, 0),
            100,
            reason or "operator promote",
            actor,
            force,
        ),
    )


def rollback(registry: Registry, model: str, version: int = 0, *, actor: str, reason: str = "") -> Split:
    """Canary present: its weight goes to the baseline. Otherwise: back to the standby version.
    Written with the revision read here, and retried once on a fresh read (see _with_one_retry) only
    if that read still rolls back the same version to the same baseline: a rollback racing the
    controller's own rollback of the canary must not go on to roll back the production version."""
    target: list[tuple[int, int]] = []
    return _with_one_retry(lambda: _rollback(registry, model, version, actor=actor, reason=reason,
                                             target=target))


def _rollback(registry: Registry, model: str, version: int, *, actor: str, reason: str,
              target: list[tuple[int, int]]) -> Split:
    info = registry.get_model(model)
    weights = dict(info.split.weights)
    status = {v.version: v.status for v in info.versions}
    pair = arms(info)
    if pair is not None and version in (0, pair[1]):
        baseline, canary = pair
        new = splits.rollback(weights, baseline, canary)
        changes = {canary: "rolled_back"}
    else:
        current = version or next(
            (v for v in weights if status.get(v) == "production"),
            max(weights, key=lambda v: weights[v]) if weights else 0,
        )
        standby = [v for v, s in status.items() if s == "standby" and v != current]
        if not standby:
            raise ValidationError(f"version: nothing to roll back to for {model!r} (no canary, no standby)")
        baseline, canary = max(standby), current
        new = splits.only(weights, baseline)
        changes = {current: "rolled_back", baseline: "production"}
    if target and target[0] != (baseline, canary):
        raise ConflictError(f"expected_revision: the split of {model!r} changed while rolling back "
                            f"v{target[0][1]} (now revision {info.split.revision}); nothing was changed, "
                            "read it again")
    target.append((baseline, canary))
    return registry.set_split(
        model,
        new,
        expected_revision=info.split.revision,
        actor=actor,
        reason=reason or f"rollback v{canary}",
        status_changes=changes,
        decision=_manual_decision(
            model,
            baseline,
            canary,
            "manual_rollback",
            weights.get(canary, 0),
            0,
            reason or "operator rollback",
            actor,
        ),
    )


@dataclass(frozen=True)
class ArmSummary:
    version: int
    status: str
    weight: int
    role: str
    requests: int = 0
    outcomes: int = 0
    metric_value: float = float("nan")


@dataclass(frozen=True)
class RolloutSummary:
    model: str
    metric: str
    revision: int
    started_at: datetime | None
    arms: list[ArmSummary] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)


def status(registry: Registry, model: str, n_decisions: int = 5) -> RolloutSummary:
    info = registry.get_model(model)
    pair = arms(info)
    weights = dict(info.split.weights)
    started = rollout_start(registry, model, pair[1]) if pair else None
    until = datetime.now(UTC)
    out = []
    for v in info.versions:
        role = (
            ""
            if pair is None
            else ("baseline" if v.version == pair[0] else "canary" if v.version == pair[1] else "")
        ) or ("shadow" if v.version == info.split.shadow else "")
        if started is not None and role:
            rows = arm_rows(registry, model, v.version, started, until)
            try:
                values = (
                    per_request_values(info.metric, rows.outcomes, rows.scores)
                    if rows.outcomes.size
                    else None
                )
            except ValueError:  # outcomes that do not fit the declared metric: show counts only
                values = None
            out.append(
                ArmSummary(
                    v.version,
                    v.status,
                    weights.get(v.version, 0),
                    role,
                    rows.requests,
                    int(rows.outcomes.size),
                    float(np.mean(values)) if values is not None else float("nan"),
                )
            )
        else:
            out.append(ArmSummary(v.version, v.status, weights.get(v.version, 0), role))
    return RolloutSummary(
        info.name,
        info.metric,
        info.split.revision,
        started,
        out,
        decisions(registry, model, limit=n_decisions),
    )


def store_scaling(registry: Registry, model: str, given: Mapping[str, Any], *, reset: bool = False) -> dict:
    """Write replica fields into the model's rollout policy in one transaction (the row locked on
    PostgreSQL, so two admin calls cannot lose each other's fields), after checking the whole policy
    the way the controller will read it (rollout.splits.policy_from_dict): a bad value is a
    ValidationError (INVALID_ARGUMENT) whose message starts with the field. `reset` drops the stored
    replica fields first. Returns the stored policy dict."""
    from sqlalchemy import select

    from registry.models import Model

    counts = ("replicas_min", "replicas_max", "canary_replicas_max")
    changes = {k: int(v) if k in counts else float(v) for k, v in given.items()}
    with registry.transaction() as s:
        m = s.scalars(select(Model).where(Model.name == model).with_for_update()).first()
        if m is None:
            raise NotFoundError(f"model: {model!r} is not a registered model" if model else "model: required")
        config = {k: v for k, v in (m.rollout_config or {}).items() if not (reset and k in SCALING_FIELDS)}
        config.update(changes)
        try:
            splits.policy_from_dict(config, metric=m.metric)
        except (ValueError, TypeError) as exc:
            raise ValidationError(str(exc)) from None
        m.rollout_config = config
    return config
