"""Rollout controller over a real registry (SQLite and PostgreSQL): it rolls a worse canary back,
steps a better one up to promotion, stores decisions that `analyze` recomputes exactly."""

from __future__ import annotations

import uuid

import numpy as np

from registry import Registry
from registry.locks import advisory_lock
from registry.repository import PredictionRow
from registry.rollouts import decisions
from rollout.analysis import recompute
from rollout.controller import RolloutController


def _setup(registry: Registry, steps: list[int], canary_weight: int) -> str:
    model = "ctl-" + uuid.uuid4().hex[:6]
    registry.publish_version(model, b"model-one", ["a"], status="production")
    registry.publish_version(model, b"model-two", ["a"])
    registry.set_split(model, {1: 100}, expected_revision=0, actor="op")
    registry.set_rollout_config(model, {"steps": steps, "min_samples_per_arm": 100,
                                        "min_canary_samples_per_step": 50})
    registry.set_split(model, {1: 100 - canary_weight, 2: canary_weight}, expected_revision=1, actor="op",
                       reason="start canary")
    return model


def _feed(registry: Registry, model: str, n: int, p: dict[int, float], rng: np.random.Generator) -> None:
    """n routed requests by the current split, each with a binary outcome."""
    split = registry.get_split(model).weights
    versions = list(split)
    probs = np.array([split[v] for v in versions], dtype=float) / 100
    chosen = rng.choice(versions, size=n, p=probs)
    rows = [PredictionRow(uuid.uuid4().hex, model, int(v), 0.5, 2.0) for v in chosen]
    registry.insert_predictions(rows)
    outcomes = [(r.request_id, float(rng.random() < p[r.version])) for r in rows]
    assert all(e is None for e in registry.record_outcomes(outcomes))


def test_worse_canary_is_rolled_back(registry: Registry) -> None:
    model = _setup(registry, [10, 50, 100], 10)
    ctl = RolloutController(registry)
    rng = np.random.default_rng(1)
    actions = []
    for _ in range(60):
        _feed(registry, model, 500, {1: 0.60, 2: 0.40}, rng)
        d = ctl.run_once(model)
        actions.append(d.action if d else None)
        if d is not None and d.action == "rollback":
            break
    assert actions[-1] == "rollback", actions
    assert dict(registry.get_split(model).weights) == {1: 100}
    assert registry.get_version(model, 2).status == "rolled_back"
    stored = decisions(registry, model, limit=1)[0]
    assert stored["action"] == "rollback" and stored["p_value"] <= 0.05
    assert stored["mean_canary"] < stored["mean_baseline"]
    audit = registry.audit_log(model)[-1]
    assert audit["actor"] == "rollout-controller" and audit["new"] == {"1": 100}


def test_better_canary_steps_up_and_is_promoted(registry: Registry) -> None:
    model = _setup(registry, [10, 50, 100], 10)
    ctl = RolloutController(registry)
    rng = np.random.default_rng(2)
    seen = []
    for _ in range(80):
        _feed(registry, model, 500, {1: 0.50, 2: 0.65}, rng)
        d = ctl.run_once(model)
        if d is not None and d.action != "hold":
            seen.append((d.action, d.next_weight))
        if d is not None and d.action == "promote":
            break
    assert seen[0] == ("step_up", 50) and seen[-1] == ("promote", 100), seen
    assert dict(registry.get_split(model).weights) == {2: 100}
    assert registry.get_version(model, 2).status == "production"
    assert registry.get_version(model, 1).status == "standby"


def test_no_new_data_means_no_new_decision(registry: Registry) -> None:
    model = _setup(registry, [10, 100], 10)
    ctl = RolloutController(registry)
    _feed(registry, model, 300, {1: 0.5, 2: 0.5}, np.random.default_rng(3))
    assert ctl.run_once(model) is not None
    assert ctl.run_once(model) is None
    assert len(decisions(registry, model)) == 1


def test_promotion_gate_blocks_and_is_recorded(registry: Registry) -> None:
    model = _setup(registry, [10, 100], 10)

    def gate(_reg: Registry, _model: str, version: int) -> None:
        raise RuntimeError(f"no passing load test for v{version}")

    ctl = RolloutController(registry, promotion_gate=gate)
    rng = np.random.default_rng(4)
    for _ in range(60):
        _feed(registry, model, 500, {1: 0.45, 2: 0.65}, rng)
        d = ctl.run_once(model)
        if d is not None and "promotion blocked" in d.reason:
            break
    assert d is not None and d.action == "hold" and "no passing load test for v2" in d.reason
    assert dict(registry.get_split(model).weights) == {1: 90, 2: 10}


def test_analyze_recomputes_stored_decisions_exactly(registry: Registry) -> None:
    model = _setup(registry, [10, 50, 100], 10)
    ctl = RolloutController(registry)
    rng = np.random.default_rng(5)
    for _ in range(6):
        _feed(registry, model, 400, {1: 0.55, 2: 0.50}, rng)
        ctl.run_once(model)
    _feed(registry, model, 400, {1: 0.55, 2: 0.50}, rng)  # rows after the decisions must not leak in
    rows = decisions(registry, model)
    assert len(rows) >= 3
    for row in rows:
        diffs = recompute(registry, row["id"]).differences()
        assert max(diffs.values()) <= 1e-9, (row["id"], diffs)
    # `chimera analyze` as an auditor runs it against the same registry: the latest decision by default.
    from typer.testing import CliRunner

    from chimera.cli import app

    env = {"CHIMERA_REGISTRY_URL": registry.url, "COLUMNS": "200"}
    out = CliRunner().invoke(app, ["analyze", model], env=env)
    assert out.exit_code == 0, out.output
    assert f"decision {rows[0]['id']}: {rows[0]['action']} v2 vs v1" in out.output
    assert "p_value" in out.output and "recomputed action" in out.output
    missing = CliRunner().invoke(app, ["analyze", "no-such-model"], env=env)
    assert missing.exit_code != 0 and "no statistical decisions" in missing.output


def test_advisory_lock_lets_one_controller_act(registry: Registry) -> None:
    with advisory_lock(registry, "chimera-rollout:x") as first:
        with advisory_lock(registry, "chimera-rollout:x") as second:
            assert first is True
            # PostgreSQL: the second session is refused; SQLite: a no-op, one embedded writer.
            assert second is (not registry.is_postgres)


def test_a_rollout_keeps_the_policy_of_its_first_look(registry: Registry) -> None:
    """An operator loosens the rollout config mid-rollout (alpha 0.05 -> 0.5, another step schedule).
    The running p-values were made under the first policy; a level chosen after seeing them would void
    the always-valid guarantee, so the rollout goes on under its first policy, each look records the
    change as pending, and a new rollout of the model starts under the new config."""
    model = _setup(registry, [10, 50, 100], 10)
    ctl = RolloutController(registry)
    rng = np.random.default_rng(5)
    _feed(registry, model, 500, {1: 0.5, 2: 0.5}, rng)
    first = ctl.run_once(model)
    assert first is not None
    registry.set_rollout_config(model, {"steps": [10, 20, 100], "min_samples_per_arm": 100,
                                        "min_canary_samples_per_step": 50, "alpha": 0.5})
    for _ in range(4):
        _feed(registry, model, 500, {1: 0.5, 2: 0.5}, rng)
        ctl.run_once(model)
    looks = decisions(registry, model, limit=10)
    assert len(looks) >= 3
    for d in looks:
        assert d["details"]["policy"]["alpha"] == 0.05, d["details"]["policy"]
        assert d["details"]["policy"]["steps"] == [10, 50, 100]
    assert looks[0]["details"]["policy_pending"]["alpha"] == 0.5  # the newest look says what waits
    assert "policy_pending" not in looks[-1]["details"]  # the first look ran under the config it read
    # The next rollout reads the new config.
    registry.set_split(model, {1: 100}, expected_revision=registry.get_split(model).revision, actor="op",
                       reason="stop")
    registry.publish_version(model, b"model-three", ["a"])
    registry.set_split(model, {1: 90, 3: 10}, expected_revision=registry.get_split(model).revision,
                       actor="op", reason="new canary")
    _feed(registry, model, 500, {1: 0.5, 3: 0.5}, rng)
    ctl.run_once(model)
    newest = decisions(registry, model, canary=3, limit=1)[0]
    assert newest["details"]["policy"]["alpha"] == 0.5 and "policy_pending" not in newest["details"]
