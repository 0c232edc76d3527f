"""The shadow stage through the rollout controller on a real registry (SQLite and PostgreSQL), rows
written as a gateway writes them: production's served rows, the shadow's mirrored scores under the same
request ids, outcomes. With the policy's shadow_gate on, an equally good shadow becomes the canary at
the first step only once the paired test says "not worse"; a worse one is stopped and never serves;
with the gate off the verdict is stored and nothing moves. Every stored look recomputes exactly
(`chimera analyze`'s path)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import numpy as np
import pytest

from registry import Registry
from registry.repository import PredictionRow
from registry.rollouts import decisions, insert_rollout_rows
from rollout.analysis import recompute
from rollout.controller import RolloutController
from tests.harness import small_onnx
from tests.integration.test_feedback import record_outcomes

GATED = {"shadow_gate": True, "steps": [10, 100], "shadow_min_pairs": 200}


def _model(registry: Registry, config: dict) -> str:
    model = "sg" + uuid.uuid4().hex[:6]
    data, names = small_onnx(seed=1)
    registry.publish_version(model, data, names, status="production", metric="brier")
    registry.publish_version(model, data, names, status="staged", metric="brier")
    registry.set_split(model, {1: 100}, expected_revision=0, actor="test")
    registry.set_rollout_config(model, config)
    registry.set_shadow(model, 2, actor="test")
    return model


def _traffic(registry: Registry, model: str, rng: np.random.Generator, n: int, shadow_noise: float,
             served_noise: float = 0.1, confident_misses: float = 0.0, served_version: int = 1) -> None:
    """n requests served by v1 and mirrored to v2: the outcome is Bernoulli(p); production scores p
    with noise 0.1 on the log-odds, the shadow with `shadow_noise` (0.1: as good; more: worse)."""
    logit = rng.normal(0.0, 1.2, n)
    p = 1.0 / (1.0 + np.exp(-logit))
    served = 1.0 / (1.0 + np.exp(-(logit + rng.normal(0.0, served_noise, n))))
    shadow = 1.0 / (1.0 + np.exp(-(logit + rng.normal(0.0, shadow_noise, n))))
    y = (rng.random(n) < p).astype(float)
    # A share of rows the shadow gets confidently wrong (1e-6 for an outcome of 1, 1 - 1e-6 for 0):
    # log-loss punishes them ~9 nats each (clipped at 1e-4), Brier at most 1.
    miss = rng.random(n) < confident_misses
    shadow = np.where(miss, np.where(y == 1.0, 1e-6, 1.0 - 1e-6), shadow)
    ids = [uuid.uuid4().hex for _ in range(n)]
    now = datetime.now(UTC)
    revision = registry.get_split(model).revision
    insert_rollout_rows(registry, [
        {"request_id": rid, "model": model, "version": served_version, "routing_key": "", "score": float(s),
         "latency_ms": 2.0, "created_at": now, "split_revision": revision}
        for rid, s in zip(ids, served, strict=True)])
    registry.insert_shadow_predictions([
        PredictionRow(request_id=rid, model=model, version=2, score=float(s), latency_ms=2.0, created_at=now)
        for rid, s in zip(ids, shadow, strict=True)])
    record_outcomes(registry, list(zip(ids, y.tolist(), strict=True)))


def _run_until_verdict(registry: Registry, model: str, noise: float, max_rows: int = 20_000,
                       **traffic: float) -> list[dict]:
    controller = RolloutController(registry)
    rng = np.random.default_rng(7)
    for _ in range(max_rows // 250):
        _traffic(registry, model, rng, 250, noise, **traffic)
        controller.run_once(model)
        looks = decisions(registry, model, shadow=True)
        if looks and looks[0]["action"] != "shadow_continue":
            return looks
    raise AssertionError(f"no shadow verdict after {max_rows} rows: {decisions(registry, model)[:1]}")


def _recomputes(registry: Registry, looks: list[dict]) -> None:
    for row in looks[:3]:  # the verdict and the looks before it
        diffs = recompute(registry, row["id"]).differences()
        assert max(diffs.values()) <= 1e-9, (row["action"], diffs)


def test_an_as_good_shadow_becomes_the_canary_only_after_not_worse(registry: Registry) -> None:
    model = _model(registry, GATED)
    looks = _run_until_verdict(registry, model, noise=0.1)
    verdict = looks[0]
    assert verdict["action"] == "shadow_not_worse", verdict["reason"]
    assert verdict["test"] == "paired-msprt" and verdict["metric"] == "brier"
    assert verdict["details"]["p_not_worse"] <= 0.05 < verdict["details"]["p_worse"]
    assert verdict["n_baseline"] == verdict["details"]["n_pairs"] >= 200
    assert verdict["weight_after"] == 10
    # Every look before the verdict held the shadow out of the split.
    assert all(d["action"] == "shadow_continue" and d["weight_after"] == 0 for d in looks[1:])
    split = registry.get_split(model)
    assert dict(split.weights) == {1: 90, 2: 10} and split.shadow is None
    assert registry.get_version(model, 2).status == "canary"
    _recomputes(registry, looks)
    # The canary analysis takes over; its looks never read the shadow stage's state.
    _traffic(registry, model, np.random.default_rng(8), 50, 0.1)
    RolloutController(registry).run_once(model)
    assert decisions(registry, model, shadow=False)[0]["action"] in {"hold", "rollback", "step_up", "promote"}


def test_a_worse_shadow_is_stopped_and_never_serves(registry: Registry) -> None:
    model = _model(registry, GATED)
    looks = _run_until_verdict(registry, model, noise=1.5)
    verdict = looks[0]
    assert verdict["action"] == "shadow_worse", verdict["reason"]
    assert verdict["details"]["p_worse"] <= 0.05
    assert verdict["mean_canary"] > verdict["mean_baseline"]  # the shadow's Brier is the larger
    split = registry.get_split(model)
    assert dict(split.weights) == {1: 100} and split.shadow is None
    assert registry.get_version(model, 2).status == "rolled_back"
    _recomputes(registry, looks)
    # Nothing more is looked at: no shadow, no canary.
    assert RolloutController(registry).run_once(model) is None


@pytest.mark.parametrize("gate_metric", ["brier", "log_loss"])
def test_every_paired_metric_is_tested_and_only_the_policys_gates(registry: Registry,
                                                                   gate_metric: str) -> None:
    """A shadow that is sharper than production but confidently wrong on 4 % of rows: log-loss says
    "worse" (after ~1,000 pairs), Brier "not worse" (later). Each look stores both metrics' tests
    (details["others"] and the reason); the policy's shadow_metric alone decides: gated on Brier the
    shadow becomes the canary although log-loss's test called it worse, gated on log-loss it is
    stopped. Both metrics' numbers recompute exactly."""
    model = _model(registry, {**GATED, "shadow_metric": gate_metric})
    looks = _run_until_verdict(registry, model, noise=0.1, served_noise=1.0, confident_misses=0.04)
    other = "log_loss" if gate_metric == "brier" else "brier"
    verdict = looks[0]
    assert verdict["metric"] == gate_metric
    want = {"brier": "not_worse", "log_loss": "worse"}
    # The verdict's own metric decided ...
    assert verdict["action"] == f"shadow_{want[gate_metric]}", verdict["reason"]
    # ... and the other metric was judged on the same pairs by its own test, with its own margin.
    seen = verdict["details"]["others"][other]
    assert set(verdict["details"]["others"]) == {other}
    assert seen["metric"] == other and seen["n_pairs"] == verdict["details"]["n_pairs"]
    assert seen["margin"] == {"brier": 0.01, "log_loss": 0.025}[other]
    assert f"{other} (reported, not gating)" in verdict["reason"]
    if other == "log_loss":  # log-loss's test called it worse first; Brier gates, so it is canaried
        assert seen["action"] == "worse" and seen["loss_shadow"] > seen["loss_served"]
        assert "log_loss (reported, not gating): worse" in verdict["reason"]
        assert dict(registry.get_split(model).weights) == {1: 90, 2: 10}
        assert registry.get_version(model, 2).status == "canary"
    else:  # log-loss gates: stopped, while Brier's own test has not called it worse
        assert seen["action"] != "worse" and seen["p_worse"] > 0.05
        assert dict(registry.get_split(model).weights) == {1: 100}
        assert registry.get_version(model, 2).status == "rolled_back"
    for row in looks[:3]:
        diffs = recompute(registry, row["id"]).differences()
        assert {f"{other}.p_worse", f"{other}.n_pairs"} <= set(diffs)
        assert max(diffs.values()) <= 1e-9, (row["action"], diffs)
    # `chimera analyze` lists the secondary metric's numbers beside the gating one's.
    from typer.testing import CliRunner

    from chimera.cli import app

    out = CliRunner().invoke(app, ["analyze", model, "--decision", str(verdict["id"])],
                             env={"CHIMERA_REGISTRY_URL": registry.url, "COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert f"{other}.p_worse" in out.output and f"{other}.loss_shadow" in out.output


def test_without_the_gate_the_verdict_is_stored_and_nothing_moves(registry: Registry) -> None:
    model = _model(registry, {"steps": [10, 100], "shadow_min_pairs": 200})
    looks = _run_until_verdict(registry, model, noise=1.5)
    assert looks[0]["action"] == "shadow_worse" and "shadow_gate off" in looks[0]["reason"]
    split = registry.get_split(model)
    assert dict(split.weights) == {1: 100} and split.shadow == 2
    assert registry.get_version(model, 2).status == "staged"
    n = len(decisions(registry, model))
    _traffic(registry, model, np.random.default_rng(9), 250, 1.5)
    RolloutController(registry).run_once(model)
    assert len(decisions(registry, model)) == n  # the evaluation ended; nothing new is stored


def test_a_new_production_starts_the_shadows_evaluation_afresh(registry: Registry) -> None:
    """The shadow was found worse than production v1 (gate off: stored, nothing moved). Then v3 becomes
    production. That verdict and its running p-values were evidence against v1, not v3: the next look
    judges the shadow against v3 from a fresh state, and recomputes so."""
    model = _model(registry, {"steps": [10, 100], "shadow_min_pairs": 200})
    looks = _run_until_verdict(registry, model, noise=1.5)
    assert looks[0]["action"] == "shadow_worse" and looks[0]["baseline_version"] == 1
    data, names = small_onnx(seed=1)
    registry.publish_version(model, data, names, status="production", metric="brier")
    registry.set_split(model, {3: 100}, expected_revision=registry.get_split(model).revision, actor="test")
    assert registry.get_split(model).shadow == 2
    _traffic(registry, model, np.random.default_rng(11), 250, 0.1, served_version=3)
    d = RolloutController(registry).run_once(model)
    newest = decisions(registry, model, shadow=True)[0]
    assert d is not None and newest["baseline_version"] == 3 and newest["action"] != "shadow_worse", newest
    assert newest["n_baseline"] == 250  # the pairs with v3 only
    assert newest["details"]["state"]["looks"] == 1  # not the v1 evaluation's looks
    assert max(recompute(registry, newest["id"]).differences().values()) <= 1e-9


def test_a_shadow_evaluation_keeps_the_policy_of_its_first_look(registry: Registry) -> None:
    """The operator raises alpha from 0.05 to 0.5 after the first look, when the running p-value for
    "not worse" stands between the two: at 0.5 the next look would pass the shadow into the canary on a
    level chosen after seeing the evidence. The evaluation goes on at its first look's 0.05, the new
    config is stored as pending (it applies to the next evaluation), and the look recomputes so."""
    model = _model(registry, GATED)
    controller = RolloutController(registry)
    rng = np.random.default_rng(7)
    _traffic(registry, model, rng, 250, 0.45)  # a little worse than production: no verdict at 0.05 yet
    controller.run_once(model)
    first = decisions(registry, model, shadow=True)[0]
    assert first["action"] == "shadow_continue" and first["details"]["policy"]["alpha_not_worse"] == 0.05
    assert 0.05 < first["details"]["p_not_worse"] <= 0.5, first["details"]
    registry.set_rollout_config(model, {**GATED, "alpha": 0.5})
    _traffic(registry, model, rng, 250, 0.45)
    controller.run_once(model)
    second = decisions(registry, model, shadow=True)[0]
    assert second["id"] != first["id"]
    assert 0.05 < second["details"]["p_not_worse"] <= 0.5, second["details"]  # 0.5 would have decided
    assert second["action"] == "shadow_continue", second["reason"]
    assert second["details"]["policy"] == first["details"]["policy"]
    assert second["details"]["policy_pending"]["alpha_not_worse"] == 0.5
    assert dict(registry.get_split(model).weights) == {1: 100} and registry.get_split(model).shadow == 2
    assert max(recompute(registry, second["id"]).differences().values()) <= 1e-9


def test_shadow_policy_fields_are_validated() -> None:
    from rollout.splits import policy_from_dict

    with pytest.raises(ValueError, match="shadow_metric"):
        policy_from_dict({"shadow_metric": "success_rate"})
    with pytest.raises(ValueError, match="shadow_min_pairs"):
        policy_from_dict({"shadow_min_pairs": 1})
    assert policy_from_dict({}, metric="success_rate").resolved_shadow_metric == "brier"
    assert policy_from_dict({}, metric="log_loss").resolved_shadow_metric == "log_loss"


def test_an_operator_split_needs_the_shadow_pass_unless_forced(registry: Registry) -> None:
    from registry.errors import PreconditionFailed
    from rollout import operations

    model = _model(registry, GATED)
    rev = registry.get_split(model).revision
    with pytest.raises(PreconditionFailed, match=r"weights: v2 has not passed its shadow evaluation"):
        operations.set_split(registry, model, {1: 90, 2: 10}, expected_revision=rev, actor="op")
    assert dict(registry.get_split(model).weights) == {1: 100}
    # Production itself may always be weighted (a no-op split here).
    operations.set_split(registry, model, {1: 100}, expected_revision=rev, actor="op")
    # Forced: the operator's override goes through, and the audit row says it was forced.
    operations.set_split(registry, model, {1: 90, 2: 10}, expected_revision=None, actor="op", forced=True)
    assert dict(registry.get_split(model).weights) == {1: 90, 2: 10}
    assert registry.audit_log(model)[-1]["forced"] is True

    # A version that passed its shadow evaluation may be weighted by hand.
    passed = _model(registry, GATED)
    _run_until_verdict(registry, passed, noise=0.1)
    rev = registry.get_split(passed).revision
    operations.set_split(registry, passed, {1: 50, 2: 50}, expected_revision=rev, actor="op")
    assert dict(registry.get_split(passed).weights) == {1: 50, 2: 50}


def test_pairs_count_only_once_mature_as_the_canary_counts_outcomes(registry: Registry) -> None:
    """outcome_delay_s: a pair counts once its request is that old and only if its outcome came within
    that time, so an early verdict is not about the rows whose outcomes happen to come first."""
    model = _model(registry, {**GATED, "outcome_delay_s": 3600})
    _traffic(registry, model, np.random.default_rng(3), 400, 0.1)  # logged now: not yet mature
    RolloutController(registry).run_once(model)
    (look,) = decisions(registry, model, shadow=True)
    assert look["action"] == "shadow_continue" and look["details"]["n_pairs"] == 0
    assert look["details"]["outcome_delay_s"] == 3600
    assert max(recompute(registry, look["id"]).differences().values()) <= 1e-9
    # The delay dropped mid-evaluation applies to the next evaluation (each keeps its first look's).
    registry.set_rollout_config(model, GATED)
    _traffic(registry, model, np.random.default_rng(4), 100, 0.1)
    RolloutController(registry).run_once(model)
    newest = decisions(registry, model, shadow=True)[0]
    assert newest["details"]["n_pairs"] == 0 and newest["details"]["outcome_delay_s"] == 3600
    assert newest["details"]["policy_pending"]["outcome_delay_s"] == 0
    # Without a declared delay the same kind of rows are pairs at once.
    fresh = _model(registry, GATED)
    _traffic(registry, fresh, np.random.default_rng(3), 400, 0.1)
    RolloutController(registry).run_once(fresh)
    assert decisions(registry, fresh, shadow=True)[0]["details"]["n_pairs"] == 400


def test_switching_the_gate_on_carries_out_a_stored_verdict(registry: Registry) -> None:
    ungated = {"steps": [10, 100], "shadow_min_pairs": 200}
    passed = _model(registry, ungated)
    assert _run_until_verdict(registry, passed, noise=0.1)[0]["action"] == "shadow_not_worse"
    assert dict(registry.get_split(passed).weights) == {1: 100}
    registry.set_rollout_config(passed, {**ungated, "shadow_gate": True})
    RolloutController(registry).run_once(passed)
    split = registry.get_split(passed)
    assert dict(split.weights) == {1: 90, 2: 10} and split.shadow is None
    assert registry.get_version(passed, 2).status == "canary"


def test_a_mirror_score_stored_after_the_look_is_not_in_its_window(registry: Registry) -> None:
    """Re-reading a look's window (`chimera analyze`) returns the pairs the look saw: a mirror score
    written after the look's `until` (the mirror is seconds behind) is left out, as a late outcome is."""
    from datetime import timedelta

    from registry.shadow_eval import paired_rows

    model = _model(registry, {"steps": [10, 100], "shadow_min_pairs": 200})
    now = datetime.now(UTC)
    revision = registry.get_split(model).revision
    insert_rollout_rows(registry, [
        {"request_id": f"r{i}", "model": model, "version": 1, "routing_key": "", "score": 0.5,
         "latency_ms": 2.0, "created_at": now, "split_revision": revision} for i in range(2)])
    registry.insert_shadow_predictions([
        PredictionRow(request_id="r0", model=model, version=2, score=0.4, latency_ms=2.0, created_at=now),
        PredictionRow(request_id="r1", model=model, version=2, score=0.4, latency_ms=2.0,
                      created_at=now + timedelta(seconds=5))])
    record_outcomes(registry, [("r0", 1.0), ("r1", 1.0)])
    until = now + timedelta(seconds=2)
    rows = paired_rows(registry, model, shadow=2, served=1, since=now - timedelta(seconds=1), until=until)
    assert rows.outcome.size == 1 and list(rows.unit) == ["r:r0"], rows  # a keyless row is its own unit
    later = paired_rows(registry, model, shadow=2, served=1, since=now - timedelta(seconds=1),
                        until=now + timedelta(seconds=10))
    assert later.outcome.size == 2
