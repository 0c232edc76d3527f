"""The shadow stage of a rollout: a version that mirrors live traffic is judged on paired outcomes before
it serves anyone.

At each look the controller reads every paired row since the version became the shadow
(``registry.shadow_eval.paired_rows``: its score beside production's for the same request, with the
outcome), judges them with the one paired test (``rollout.paired.paired_look``: two one-sided
always-valid tests, "worse" and "not worse by the margin") and stores the look like a canary decision,
in the same table, with action ``shadow_continue`` | ``shadow_worse`` | ``shadow_not_worse`` and the
whole record (both p-values, n pairs and keys, both mean losses, the policy, the state carried between
looks, the data window) in ``details``. ``chimera analyze`` recomputes it from the rows.

What the verdict does depends on the model's policy (``RolloutPolicy.shadow_gate``):

* gate on, "not worse": the shadow leaves the mirror and becomes the canary at the policy's first step,
  in one split change that stores the decision; the canary analysis takes over from there.
* gate on, "worse": the shadow is stopped (no longer mirrored) and marked ``rolled_back``; it never
  served a request.
* gate off: the verdict is stored and shown, nothing moves (an operator's shadow for information).

The guarantee is the paired test's (docs/statistics.md, "Paired evaluation on shadow traffic"): an
equal shadow is called worse with probability at most ``alpha_worse`` and a shadow worse by the margin
is let through with probability at most ``alpha_not_worse``, however often the controller looks.

Every other paired metric (``PAIRED_METRICS``: Brier and log-loss) is judged at each look too, by its
own test on the same pairs with its own default margin and state, and stored in ``details["others"]``
and in the reason, so the status shows a shadow's standing on each quality metric. Only the policy's
``shadow_metric`` moves anything: it is chosen before the evaluation starts, so the gate's two error
rates are exactly the stated ones; letting any of two metrics gate would spend the budget twice. Each
secondary verdict keeps its own guarantee taken alone. AUC and calibration error are not means of
per-row losses, so they have no paired sequential test here (nor, yet, a place in the shadow report,
which shows Brier and log-loss per version).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime
from typing import Any

import numpy as np

from chimera.jsonsafe import nan_to_none
from registry import ConflictError, ModelInfo, Registry
from registry.errors import PreconditionFailed
from registry.rollouts import SHADOW_PREFIX, decisions, record_decision
from registry.shadow_eval import PairedRows, paired_rows, shadow_started
from rollout import splits
from rollout.paired import PairedData, PairedDecision, PairedPolicy, PairedState, paired_look
from rollout.policy import PAIRED_METRICS, RolloutPolicy

log = logging.getLogger(__name__)

SHADOW_ACTIONS = tuple(f"{SHADOW_PREFIX}{a}" for a in ("continue", "worse", "not_worse"))
TEST = "paired-msprt"
# The numbers `chimera analyze` recomputes for a shadow look (each within 1e-9), besides the counts.
CHECKED = ("effect", "variance", "p_worse", "p_not_worse", "p_worse_look", "p_not_worse_look", "loss_served",
           "loss_shadow")


def paired_policy(policy: RolloutPolicy) -> PairedPolicy:
    """The paired test's settings from the model's rollout policy (stored with every shadow decision)."""
    return PairedPolicy(metric=policy.resolved_shadow_metric, alpha_worse=policy.alpha,
                        alpha_not_worse=policy.alpha, margin=policy.shadow_margin,
                        point_mass=policy.point_mass, min_pairs=policy.shadow_min_pairs)


def production_of(info: ModelInfo) -> int | None:
    """The version that serves all traffic, or None while a canary (or any split) is running: a shadow
    is judged against one served version only."""
    weighted = [v for v, w in info.split.weights.items() if w > 0]
    return weighted[0] if len(weighted) == 1 else None


def secondary_policies(primary: PairedPolicy) -> dict[str, PairedPolicy]:
    """The paired metrics other than the gating one, each with its own default margin and τ and the
    primary's error rates and minimum pairs (reported, never gating: module docstring)."""
    return {m: replace(primary, metric=m, margin=None, tau=None)
            for m in PAIRED_METRICS if m != primary.metric}


def judge_others(policies: dict[str, PairedPolicy], rows: PairedRows, stored: dict[str, Any], *,
                 until: float, outcome_delay_s: float = 0.0) -> dict[str, tuple[PairedDecision, PairedState]]:
    """Each secondary metric's look on the same rows, from the states ``stored`` (a previous look's
    ``details["others"]``, or {} for the first look)."""
    out = {}
    for metric, policy in policies.items():
        before = stored.get(metric)
        state = PairedState.from_dict(before["state"]) if before else None
        out[metric] = judge(policy, rows, state, until=until, outcome_delay_s=outcome_delay_s)
    return out


def judge(policy: PairedPolicy, rows: PairedRows, state: PairedState | None, *, until: float,
          outcome_delay_s: float = 0.0) -> tuple[PairedDecision, PairedState]:
    """Paired rows -> the look (the controller and ``chimera analyze`` both come through here).

    Late outcomes: with the rollout policy's ``outcome_delay_s`` set, a pair counts only once its
    request is that old and only if its outcome arrived within that time, the canary's maturity rule.
    Both scores of a pair share its outcome, so a delay cannot favour one version; the rule keeps the
    verdict about all requests of a period rather than about those whose outcomes come first (when
    successes arrive later than failures, early pairs are mostly failures)."""
    keep = np.ones(rows.outcome.size, dtype=bool)
    if outcome_delay_s > 0.0:
        keep = ((rows.created <= until - outcome_delay_s)
                & (rows.outcome_at <= rows.created + outcome_delay_s))
    data = PairedData(policy)
    data.add(rows.outcome[keep], rows.served[keep], rows.shadow[keep],
             [u for u, k in zip(rows.unit, keep.tolist(), strict=True) if k])
    return paired_look(policy, data, state)


def shadow_look(registry: Registry, info: ModelInfo, policy: RolloutPolicy, until: datetime, *,
                actor: str) -> PairedDecision | None:
    """One look at the model's shadow; None when there is none, production is not alone, or nothing new
    arrived since the last look. Applies the verdict when the policy's gate is on (module docstring)."""
    shadow = info.split.shadow
    served = production_of(info)
    if shadow is None or served is None or shadow == served:
        return None
    model = info.name
    since = shadow_started(registry, model, shadow) or info.versions[-1].created_at
    previous = same_pair(decisions(registry, model, canary=shadow, since=since, limit=1, shadow=True), served)
    details_before = previous[0]["details"] if previous else {}
    state = PairedState.from_dict(details_before.get("state", {})) if previous else None
    if state is not None and state.verdict is not None:
        # The verdict is stored. Gated: carry it out (again, if the process died between storing it and
        # acting, or the gate was switched on after an ungated verdict); ungated: nothing to decide.
        if policy.shadow_gate and state.verdict == "worse":
            _stop(registry, model, shadow, previous[0]["reason"], actor)
        elif policy.shadow_gate:
            _start(registry, info, served, shadow, policy.steps[0], actor,
                   f"canary at {policy.steps[0]}% after the shadow stage: {previous[0]['reason']}")
        return None
    rows = paired_rows(registry, model, shadow=shadow, served=served, since=since, until=until)
    seen = [info.split.revision, rows.outcome.size, rows.last_id]
    if previous and details_before.get("seen") == seen:
        return None  # nothing new since the last look
    ppolicy, delay_s, pending = pinned_policy(policy, details_before)
    decision, new_state = judge(ppolicy, rows, state, until=until.timestamp(), outcome_delay_s=delay_s)
    secondary = secondary_policies(ppolicy)
    others = judge_others(secondary, rows, details_before.get("others", {}) if previous else {},
                          until=until.timestamp(), outcome_delay_s=delay_s)
    details = {**decision.to_dict(), "state": new_state.to_dict(), "policy": ppolicy.to_dict(),
               **({"policy_pending": pending} if pending else {}),
               "outcome_delay_s": delay_s, "gate": policy.shadow_gate,
               "served_version": served, "seen": seen,
               "window": {"since": since.isoformat(), "until": until.isoformat()},
               "others": {m: {**d.to_dict(), "state": st.to_dict(), "policy": secondary[m].to_dict()}
                          for m, (d, st) in others.items()}}
    _apply(registry, info, served, shadow, decision, details, policy, actor,
           others_note(d for d, _ in others.values()))
    return decision


def pinned_policy(policy: RolloutPolicy, before: dict[str, Any]) -> tuple[PairedPolicy, float,
                                                                           dict[str, Any] | None]:
    """What this look judges with: the paired policy and outcome delay of the evaluation's first look
    (`before`: the details of the look before this one, empty for a first look), and what the config
    says now when that differs (stored as `policy_pending`), as the canary keeps its first look's
    policy (rollout.controller). Why: the running p-values were made under the first look's level,
    margin and metric; a level raised after seeing p = 0.07 would void the always-valid guarantee. A
    changed config applies to the shadow's next evaluation. The gate and the first step are what a
    verdict does, not how it is reached, so they are read from the config at each look."""
    configured = paired_policy(policy)
    if not before.get("policy"):
        return configured, policy.outcome_delay_s, None
    pinned = PairedPolicy.from_dict(before["policy"])
    delay_s = float(before.get("outcome_delay_s", policy.outcome_delay_s))
    if pinned == configured and delay_s == policy.outcome_delay_s:
        return pinned, delay_s, None
    return pinned, delay_s, {**configured.to_dict(), "outcome_delay_s": policy.outcome_delay_s}


def same_pair(previous: list[dict[str, Any]], served: int) -> list[dict[str, Any]]:
    """The shadow's latest look (`previous`, newest first, at most one) if it compared the shadow with
    the version that serves now, else nothing: a promotion or rollback that changes production starts
    the shadow's evaluation afresh. Its running p-values and verdict were evidence about the shadow
    against the earlier production; carried over, they would decide against the new one (docs/
    statistics.md, "The shadow stage in a rollout", assumption (1))."""
    return [r for r in previous[:1] if int(r.get("baseline_version", served)) == served]


def others_note(others: Iterable[PairedDecision]) -> str:
    """The secondary metrics' standing, appended to the stored reason (what status and the dashboard
    show): "; log_loss (reported, not gating): not_worse, shadow 0.5012 vs served 0.5034, ..."."""
    parts = []
    for d in others:
        if d.n_pairs < 1 or d.look == 0:
            state = f"{d.n_pairs} pairs"
        else:
            state = (f"shadow {d.loss_shadow:.4f} vs served {d.loss_served:.4f}, p_worse={d.p_worse:.4g}, "
                     f"p_not_worse={d.p_not_worse:.4g}")
        parts.append(f"; {d.metric} (reported, not gating): {d.action}, {state}")
    return "".join(parts)


def recompute(registry: Registry, row: dict[str, Any]) -> tuple[PairedDecision, dict[str, PairedDecision]]:
    """A stored shadow look, recomputed from the rows of its window with the state of the look before it
    and the paired policy it stored (rollout.analysis dispatches here): the gating metric's decision and
    each secondary metric's."""
    details = row["details"]
    window = details["window"]
    since, until = datetime.fromisoformat(window["since"]), datetime.fromisoformat(window["until"])
    model, served, shadow = row["model"], row["baseline_version"], row["canary_version"]
    earlier = same_pair([r for r in decisions(registry, model, canary=shadow, since=since, shadow=True)
                         if r["id"] < row["id"]][:1], served)
    state = PairedState.from_dict(earlier[0]["details"]["state"]) if earlier else None
    rows = paired_rows(registry, model, shadow=shadow, served=served, since=since, until=until)
    primary = PairedPolicy.from_dict(details["policy"])
    delay = float(details.get("outcome_delay_s", 0.0))
    decision, _ = judge(primary, rows, state, until=until.timestamp(), outcome_delay_s=delay)
    if "others" not in details:  # stored before secondary metrics were looked at
        return decision, {}
    # Each secondary with the policy it stored, as the primary: a later change of defaults must not
    # change what an old look recomputes to.
    stored_policies = {m: PairedPolicy.from_dict(o["policy"]) for m, o in details["others"].items()}
    others = judge_others(stored_policies, rows, earlier[0]["details"].get("others", {}) if earlier else {},
                          until=until.timestamp(), outcome_delay_s=delay)
    return decision, {m: d for m, (d, _) in others.items()}


def _row(model: str, served: int, shadow: int, d: PairedDecision, weight_after: int, reason: str,
         details: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model, "baseline_version": served, "canary_version": shadow,
        "action": f"{SHADOW_PREFIX}{d.action}", "metric": d.metric, "test": TEST,
        "statistic": nan_to_none(d.effect), "p_value": nan_to_none(min(d.p_worse, d.p_not_worse)),
        "n_baseline": d.n_pairs, "n_canary": d.n_pairs,
        "mean_baseline": nan_to_none(d.loss_served), "mean_canary": nan_to_none(d.loss_shadow),
        "weight_before": 0, "weight_after": weight_after, "reason": reason, "details": details,
    }


def _apply(registry: Registry, info: ModelInfo, served: int, shadow: int, d: PairedDecision,
           details: dict[str, Any], policy: RolloutPolicy, actor: str, others: str = "") -> None:
    model = info.name
    if d.action == "continue" or not policy.shadow_gate:
        note = "" if d.action == "continue" else " (shadow_gate off: nothing moves)"
        record_decision(registry, _row(model, served, shadow, d, 0, d.reason + note + others, details))
        return
    if d.action == "worse":
        # Stored first: if the process dies before the shadow is stopped, the next look finds the
        # verdict in the state and stops it then.
        reason = f"stopped at the shadow stage: {d.reason}{others}"
        record_decision(registry, _row(model, served, shadow, d, 0, reason, details))
        _stop(registry, model, shadow, reason, actor)
        return
    percent = policy.steps[0]
    reason = f"canary at {percent}% after the shadow stage: {d.reason}"
    _start(registry, info, served, shadow, percent, actor, reason,
           _row(model, served, shadow, d, percent, reason + others, details))


def _start(registry: Registry, info: ModelInfo, served: int, shadow: int, percent: int, actor: str,
           reason: str, decision: dict[str, Any] | None = None) -> None:
    """A passing shadow becomes the canary at ``percent`` (status canary; the decision, when given, is
    stored in the same transaction) and stops being mirrored."""
    model = info.name
    try:
        registry.set_split(model, splits.canary_start(served, shadow, percent),
                           expected_revision=info.split.revision, actor=actor, reason=reason,
                           status_changes={shadow: "canary"}, decision=decision)
    except ConflictError:
        log.info("split of %s changed while judging its shadow; will look again", model)
        return
    try:
        registry.set_shadow(model, None, actor=actor, reason=f"shadow v{shadow} is now the canary")
    except ConflictError:  # the canary is started; a shadow left set only mirrors, stopped next time
        log.info("shadow of %s not cleared (split moved); the canary runs", model)
    log.warning("shadow %s v%d passed: %s", model, shadow, reason)


def _stop(registry: Registry, model: str, shadow: int, reason: str, actor: str) -> None:
    """A worse shadow: marked rolled_back (so nothing starts it by accident) and no longer mirrored."""
    registry.set_version_status(model, shadow, "rolled_back")
    try:
        registry.set_shadow(model, None, actor=actor, reason=f"shadow v{shadow}: {reason}")
    except ConflictError:  # the split moved; the next look carries the stored verdict out again
        return
    log.warning("shadow %s v%d stopped: %s", model, shadow, reason)


def stop_stale_shadow(registry: Registry, info: ModelInfo, *, actor: str) -> bool:
    """A version that is both the shadow and weighted (a gated shadow whose canary started but whose
    mirror was not cleared) stops being mirrored: it serves now, pairs with itself would mean nothing."""
    shadow = info.split.shadow
    if shadow is None or info.split.weights.get(shadow, 0) == 0:
        return False
    try:
        registry.set_shadow(model=info.name, version=None, actor=actor,
                            reason=f"v{shadow} serves traffic; its mirror is stopped",
                            expected_revision=info.split.revision)
    except ConflictError:
        return False
    return True


# Statuses that may take traffic without a shadow evaluation: they served before (a rollback target).
_SERVED_BEFORE = ("production", "standby")


def require_shadow_pass(registry: Registry, info: ModelInfo, weights: dict[int, int]) -> None:
    """With the model's shadow_gate on, a version that is about to take traffic for the first time (no
    weight now, some in ``weights``, never production) must have passed its shadow evaluation: its
    latest shadow verdict is "not worse". Raises PreconditionFailed naming the version otherwise; an
    operator's forced split skips this (the audit row records the force)."""
    policy = splits.policy_from_dict(registry.rollout_config(info.name), metric=info.metric)
    if not policy.shadow_gate:
        return
    status = {v.version: v.status for v in info.versions}
    for version, weight in sorted(weights.items()):
        if weight <= 0 or info.split.weights.get(version, 0) > 0 or status.get(version) in _SERVED_BEFORE:
            continue
        verdicts = [d for d in decisions(registry, info.name, canary=version, shadow=True)
                    if d["action"] != f"{SHADOW_PREFIX}continue"]
        if not verdicts or verdicts[0]["action"] != f"{SHADOW_PREFIX}not_worse":
            last = verdicts[0]["action"] if verdicts else "no shadow verdict"
            raise PreconditionFailed(
                f"weights: v{version} has not passed its shadow evaluation ({last}); the policy's "
                f"shadow_gate requires it: shadow it first (chimera canary shadow), or force")

