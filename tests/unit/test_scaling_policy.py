"""Replica scaling per model (issue 16): the rollout policy's replica fields over the process settings,
production vs canary bounds, validation that names the field, the stored policy an admin call writes,
the Serve deployment version that a scaling change leaves alone, and the replica gauges."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from chimera.settings import ReplicaScaling
from gateway.metrics import Metrics
from gateway.serving.replica_pool import describe, scaling_plan
from registry import Registry
from registry.errors import NotFoundError, ValidationError
from rollout.operations import store_scaling
from rollout.policy import RolloutPolicy
from rollout.splits import policy_from_dict

DEFAULT = ReplicaScaling()  # one fixed replica: the process default
AUTO = ReplicaScaling(min_replicas=1, max_replicas=4, target_ongoing_requests=2.0, upscale_delay_s=30.0,
                      downscale_delay_s=600.0, look_back_s=30.0)


def test_a_policy_without_replica_fields_runs_the_process_settings_for_every_role() -> None:
    for default in (DEFAULT, AUTO):
        for canary in (False, True):
            assert RolloutPolicy().replica_scaling(default, canary=canary) == default


def test_production_and_canary_bounds() -> None:
    p = RolloutPolicy(replicas_min=1, replicas_max=3, canary_replicas_max=2, target_ongoing_requests=0.5,
                      upscale_delay_s=1.0, downscale_delay_s=4.0)
    prod, canary = p.replica_scaling(DEFAULT, canary=False), p.replica_scaling(DEFAULT, canary=True)
    assert (prod.min_replicas, prod.max_replicas, canary.min_replicas, canary.max_replicas) == (1, 3, 1, 2)
    config = prod.serve_options()["autoscaling_config"]
    assert (config["target_ongoing_requests"], config["upscale_delay_s"], config["downscale_delay_s"]) == (
        0.5, 1.0, 4.0)
    assert describe(prod) == "1..3 at 0.5 ongoing, up 1 s, down 4 s"
    # A canary at 5 % never holds production's fixed replicas when capped.
    fixed = RolloutPolicy(replicas_min=3, replicas_max=3, canary_replicas_max=1)
    assert fixed.replica_scaling(DEFAULT, canary=False).serve_options() == {"num_replicas": 3}
    assert fixed.replica_scaling(DEFAULT, canary=True).serve_options() == {"num_replicas": 1}
    # Without a canary cap the canary runs production's bounds (today's behaviour).
    assert RolloutPolicy(replicas_max=3).replica_scaling(DEFAULT, canary=True).max_replicas == 3


def test_an_unset_bound_follows_the_one_the_policy_sets() -> None:
    assert RolloutPolicy(replicas_min=3).replica_scaling(DEFAULT, canary=False).serve_options() == {
        "num_replicas": 3}
    four = ReplicaScaling(min_replicas=4, max_replicas=4)
    assert RolloutPolicy(replicas_max=2).replica_scaling(four, canary=False).serve_options() == {
        "num_replicas": 2}
    assert RolloutPolicy(replicas_min=2, canary_replicas_max=1).replica_scaling(
        four, canary=True).serve_options() == {"num_replicas": 1}


@pytest.mark.parametrize(("fields", "named"), [
    ({"replicas_min": 0}, "replicas_min"),
    ({"replicas_max": -1}, "replicas_max"),
    ({"replicas_max": 1001}, "replicas_max"),
    ({"replicas_min": 2.5}, "replicas_min"),
    ({"replicas_min": True}, "replicas_min"),
    ({"replicas_min": 3, "replicas_max": 2}, "replicas_max"),
    ({"replicas_max": 2, "canary_replicas_max": 3}, "canary_replicas_max"),
    ({"canary_replicas_max": 0}, "canary_replicas_max"),
    ({"target_ongoing_requests": 0.0}, "target_ongoing_requests"),
    ({"target_ongoing_requests": math.nan}, "target_ongoing_requests"),
    ({"target_ongoing_requests": math.inf}, "target_ongoing_requests"),
    ({"upscale_delay_s": -1.0}, "upscale_delay_s"),
    ({"downscale_delay_s": math.inf}, "downscale_delay_s"),
])
def test_bad_replica_fields_are_refused_naming_the_field(fields: dict, named: str) -> None:
    with pytest.raises(ValueError, match=f"^{named}:"):
        RolloutPolicy(**fields)


def test_stored_replica_fields_parse_like_every_other_policy_field() -> None:
    p = policy_from_dict({"replicas_max": 3, "canary_replicas_max": None, "steps": [10, 100]})
    assert (p.replicas_max, p.canary_replicas_max, p.steps) == (3, None, (10, 100))


@pytest.fixture
def reg(tmp_path: Path):  # noqa: ANN201
    from tests.harness import small_onnx

    r = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    r.upgrade()
    onnx, names = small_onnx()
    for _ in range(3):
        r.publish_version("m", onnx, names)
    r.set_split("m", {1: 95, 2: 5}, expected_revision=0, actor="test", status_changes={1: "production"})
    r.set_rollout_config("m", {"steps": [5, 50, 100], "alpha": 0.04})
    yield r
    r.dispose()


def test_an_admin_change_keeps_the_other_policy_fields_and_is_checked_whole(reg: Registry) -> None:
    stored = store_scaling(reg, "m", {"replicas_min": 1, "replicas_max": 3, "canary_replicas_max": 2,
                                      "target_ongoing_requests": 0.5})
    assert stored == reg.rollout_config("m")
    assert stored["steps"] == [5, 50, 100] and stored["alpha"] == 0.04 and stored["replicas_max"] == 3
    store_scaling(reg, "m", {"replicas_max": 4})  # one field: the others stay
    assert (reg.rollout_config("m")["replicas_max"], reg.rollout_config("m")["canary_replicas_max"]) == (4, 2)
    # Checked against what is stored: a max below the stored min is refused, nothing written.
    store_scaling(reg, "m", {"replicas_min": 2})
    with pytest.raises(ValidationError, match="^replicas_max: 1 is below replicas_min"):
        store_scaling(reg, "m", {"replicas_max": 1})
    assert reg.rollout_config("m")["replicas_max"] == 4
    with pytest.raises(ValidationError, match="^target_ongoing_requests:"):
        store_scaling(reg, "m", {"target_ongoing_requests": math.nan})
    with pytest.raises(NotFoundError, match="model"):
        store_scaling(reg, "nope", {"replicas_max": 2})
    store_scaling(reg, "m", {"downscale_delay_s": 60.0}, reset=True)  # back to the process settings first
    assert reg.rollout_config("m") == {"steps": [5, 50, 100], "alpha": 0.04, "downscale_delay_s": 60.0}


def test_the_plan_gives_production_its_bounds_and_every_other_version_the_canary_cap(reg: Registry) -> None:
    store_scaling(reg, "m", {"replicas_min": 1, "replicas_max": 3, "canary_replicas_max": 2})
    plan = scaling_plan(reg, "m", DEFAULT)
    assert {v: (p.role, p.scaling.max_replicas, p.live) for v, p in plan.items()} == {
        1: ("production", 3, True), 2: ("canary", 2, True), 3: ("canary", 2, False)}
    # A promotion makes v2 production: its bounds follow the role.
    reg.set_split("m", {1: 0, 2: 100}, expected_revision=1, actor="test",
                  status_changes={1: "archived", 2: "production"})
    plan = scaling_plan(reg, "m", DEFAULT)
    assert (plan[2].role, plan[2].scaling.max_replicas, plan[1].role) == ("production", 3, "canary")
    assert scaling_plan(reg, "nope", DEFAULT) == {}


def test_a_scaling_change_keeps_the_deployment_version_and_changes_the_fingerprint() -> None:
    """Serve restarts replicas only when the deployment's version changes: a scaling change must not
    (replicas.deployment), while gateways still tell deployments apart by the fingerprint."""
    from replicas.deployment import version_app

    apps = [version_app("sqlite:////tmp/x.db", "m", 1, scaling=s)
            for s in (DEFAULT, AUTO, ReplicaScaling(min_replicas=2, max_replicas=2))]
    versions = {a._bound_deployment._version for a in apps}
    prints = {a._bound_deployment._deployment_config.user_config["fingerprint"] for a in apps}
    assert len(versions) == 1 and len(prints) == 3
    other = version_app("sqlite:////tmp/x.db", "m", 2)
    assert other._bound_deployment._version not in versions  # other replicas: another version


def test_replica_gauges_follow_the_readings_and_drop_removed_versions() -> None:
    m = Metrics()
    m.observe_replicas({("m", 1): 3, ("m", 2): 1}, {("m", 1): (1, 3), ("m", 2): (1, 2)})

    def value(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, labels)

    assert value("chimera_replicas", model="m", version="1") == 3
    assert value("chimera_replicas_bound", model="m", version="2", bound="max") == 2
    m.observe_replicas({("m", 1): 2}, {("m", 1): (1, 3)})  # v2 undeployed
    assert value("chimera_replicas", model="m", version="1") == 2
    assert value("chimera_replicas", model="m", version="2") is None
    assert value("chimera_replicas_bound", model="m", version="2", bound="max") is None
