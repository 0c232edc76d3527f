"""Concurrent split changes on one model (issue 15): SetShadow racing SetTrafficSplit, operator promote /
rollback racing a split change. On SQLite and a real PostgreSQL (the `registry` fixture gives both).

What a user would notice if this broke: a change answered OK and then silently undone by another, or two
different states announced under the same revision (gateways keyed on the revision would never see the
second one). So every test asserts on the audit trail: revisions strictly increasing with no duplicates
and no gaps, each audit row's `old` equal to the previous row's `new`, and the final stored state equal
to the last committed write."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from registry import ConflictError, Registry, ValidationError
from rollout import operations

THREADS_ITERATIONS = 40


def _model(reg: Registry, name: str = "m", versions: int = 3) -> None:
    for i in range(versions):
        reg.publish_version(name, b"onnx-bytes-%d" % i, ["a", "b"],
                            status="production" if i == 0 else "staged")
    reg.set_split(name, {1: 100}, expected_revision=0, actor="test")


def assert_consistent_trail(reg: Registry, model: str) -> list[dict]:
    """Strictly increasing, unique, gapless revisions; each change starts from the state the previous
    change left (no lost update); the last audit row is the stored state."""
    trail = reg.audit_log(model)
    revisions = [row["revision"] for row in trail]
    assert len(set(revisions)) == len(revisions), f"two states share a revision: {revisions}"
    assert revisions == list(range(1, len(trail) + 1)), revisions
    split = reg.get_split(model)
    assert split.revision == revisions[-1]

    def weights_of(state: dict) -> dict:
        return {k: v for k, v in state.items() if k != "shadow"}

    shadow = 0
    for prev, row in zip(trail, trail[1:], strict=False):
        assert weights_of(row["old"]) == weights_of(prev["new"]), (prev, row)
    for row in trail:
        if "shadow" in row["new"]:
            assert row["old"].get("shadow", shadow) == shadow, row
            shadow = row["new"]["shadow"]
    last = trail[-1]["new"]
    assert {str(k): v for k, v in split.weights.items()} == weights_of(last)
    assert (split.shadow or 0) == shadow
    return trail


def _hammer(workers: list[Callable[[int], None]]) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(len(workers))

    def run(work: Callable[[int], None]) -> None:
        start.wait()
        for i in range(THREADS_ITERATIONS):
            try:
                work(i)
            except ConflictError:
                pass  # the documented loser's answer (gRPC ABORTED)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return errors


def test_set_shadow_racing_set_traffic_split(registry: Registry) -> None:
    _model(registry)

    def splitter(i: int) -> None:
        current = registry.get_split("m")
        registry.set_split("m", {1: 100 - (i % 5) * 10, 2: (i % 5) * 10} if i % 5 else {1: 100},
                           expected_revision=current.revision, actor="splitter")

    def shadower(i: int) -> None:
        registry.set_shadow("m", 3 if i % 2 == 0 else None, actor="shadower")

    def forced(i: int) -> None:  # SetTrafficSplit with force: no revision check, still serialised
        registry.set_split("m", {1: 50, 2: 50} if i % 2 else {1: 100}, expected_revision=None,
                           actor="forcer", forced=True)

    errors = _hammer([splitter, shadower, forced, shadower])
    assert not errors, errors
    trail = assert_consistent_trail(registry, "m")
    actors = {row["actor"] for row in trail}
    assert {"shadower", "forcer"} <= actors  # unconditional writers always land
    # Every shadow call commits (it applies to whatever split is current), so none was lost.
    assert sum(row["actor"] == "shadower" for row in trail) == 2 * THREADS_ITERATIONS


def test_stale_shadow_with_expected_revision_is_refused(registry: Registry) -> None:
    _model(registry)
    seen = registry.get_split("m")
    registry.set_split("m", {1: 90, 2: 10}, expected_revision=seen.revision, actor="op")
    with pytest.raises(ConflictError):
        registry.set_shadow("m", 3, actor="op2", expected_revision=seen.revision)
    assert registry.get_split("m").shadow is None
    assert_consistent_trail(registry, "m")


def test_promote_and_rollback_racing_split_changes(registry: Registry) -> None:
    _model(registry)
    registry.set_split("m", {1: 90, 2: 10}, expected_revision=1, actor="op")
    registry.set_version_status("m", 2, "canary")

    def operator(i: int) -> None:
        if i % 2 == 0:
            operations.promote(registry, "m", 2 if i % 4 == 0 else 1, actor="promoter")
            return
        try:
            operations.rollback(registry, "m", actor="rollbacker")
        except ValidationError as exc:  # a state with no canary and no standby: a fair refusal
            assert "nothing to roll back to" in str(exc)

    def canary_mover(i: int) -> None:
        current = registry.get_split("m")
        registry.set_split("m", {1: 80, 2: 20}, expected_revision=current.revision, actor="mover",
                           status_changes={2: "canary", 1: "production"})

    def shadower(i: int) -> None:
        registry.set_shadow("m", 3 if i % 2 else None, actor="shadower")

    errors = _hammer([operator, canary_mover, shadower])
    assert not errors, errors
    trail = assert_consistent_trail(registry, "m")
    assert any(row["actor"] == "promoter" for row in trail)


def test_promote_retries_once_on_a_fresh_read(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """A split change between promote's read and its write: promote decides again on the new state
    (the documented retry), and the change it raced is in the trail, not lost."""
    _model(registry)
    registry.set_split("m", {1: 90, 2: 10}, expected_revision=1, actor="op")
    real = registry.get_model
    raced = []

    def get_model_then_race(name: str):  # noqa: ANN202
        info = real(name)
        if not raced:
            raced.append(True)
            registry.set_shadow(name, 3, actor="racer")
        return info

    monkeypatch.setattr(registry, "get_model", get_model_then_race)
    split = operations.promote(registry, "m", 2, actor="promoter")
    assert split.weights == {2: 100}
    trail = assert_consistent_trail(registry, "m")
    assert [row["actor"] for row in trail[-2:]] == ["racer", "promoter"]
    assert registry.get_split("m").shadow == 3  # the racer's change survived


def test_promote_gives_up_after_a_second_conflict(registry: Registry,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _model(registry)
    real = registry.get_model

    def always_raced(name: str):  # noqa: ANN202
        info = real(name)
        registry.set_shadow(name, None, actor="racer")
        return info

    monkeypatch.setattr(registry, "get_model", always_raced)
    with pytest.raises(ConflictError):
        operations.promote(registry, "m", 2, actor="promoter")
    assert registry.get_split("m").weights == {1: 100}
    assert_consistent_trail(registry, "m")


def test_rollback_racing_the_controllers_rollback_does_not_roll_back_production(
        registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry decides again only for the same target: once the canary is gone, a second rollback
    would otherwise move on to the production version (and its standby)."""
    _model(registry)
    registry.set_version_status("m", 3, "standby")
    registry.set_version_status("m", 2, "canary")
    registry.set_split("m", {1: 90, 2: 10}, expected_revision=1, actor="op")
    real = registry.get_model
    raced = []

    def controller_rolls_back_first(name: str):  # noqa: ANN202
        info = real(name)
        if not raced:
            raced.append(True)
            registry.set_split(name, {1: 100}, expected_revision=info.split.revision,
                               actor="rollout-controller", status_changes={2: "rolled_back"})
        return info

    monkeypatch.setattr(registry, "get_model", controller_rolls_back_first)
    with pytest.raises(ConflictError, match="changed while rolling back v2"):
        operations.rollback(registry, "m", actor="operator")
    assert registry.get_split("m").weights == {1: 100}
    assert {v.version: v.status for v in registry.list_versions("m")}[1] == "production"
    assert_consistent_trail(registry, "m")
