"""The rollout controller's lock is fenced (issue 15), on a real PostgreSQL.

Two controllers (two Registry instances, as in two gateways) on one model. Controller A takes the
advisory lock and decides; before its decision commits, its lock connection's backend is terminated
(pg_terminate_backend: what a network cut or a server-side idle kill does), and controller B takes the
lock over and acts. A must then be unable to write anything: neither a split change that the revision
check alone would have let through (B held, so the revision A read is still current) nor a hold decision
(no revision check at all). Without the fence, A's write landed on another pooled connection.

The statistics are not under test here: `look` is wrapped to return the verdict each step needs."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from registry import ConflictError, Registry
from registry.locks import lock_key
from registry.rollouts import decisions
from rollout import controller as controller_mod
from rollout.controller import RolloutController
from tests.pg import PostgresServer

MODEL = "fenced"


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    url = postgres.create_database()
    reg = Registry(url)
    reg.upgrade()
    reg.publish_version(MODEL, b"v1", ["a"], status="production")
    reg.publish_version(MODEL, b"v2", ["a"], status="canary")
    reg.set_split(MODEL, {1: 90, 2: 10}, expected_revision=0, actor="test")
    reg.dispose()
    return url


@pytest.fixture
def two(pg_url: str) -> Iterator[tuple[Registry, Registry]]:
    a, b = Registry(pg_url), Registry(pg_url)
    yield a, b
    a.dispose()
    b.dispose()


def lock_holder_pid(url: str) -> int | None:
    key = lock_key(f"chimera-rollout:{MODEL}")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
                "AND classid = :hi AND objid = :lo"),
                {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF}).scalar()
    finally:
        engine.dispose()


def terminate(url: str, pid: int) -> None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
    finally:
        engine.dispose()


def scripted_look(monkeypatch: pytest.MonkeyPatch, actions: list[str]) -> None:
    """Each call of controller.look returns the real verdict with the next scripted action."""
    real = controller_mod.look
    queue = list(actions)

    def look(policy, data, state):  # noqa: ANN001, ANN202
        decision, new_state = real(policy, data, state)
        action = queue.pop(0)
        return dataclasses.replace(decision, action=action, next_weight=decision.current_weight), new_state

    monkeypatch.setattr(controller_mod, "look", look)


@pytest.mark.parametrize("a_verdict", ["rollback", "hold"])
def test_old_holder_cannot_write_after_losing_its_lock(two: tuple[Registry, Registry], pg_url: str,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       a_verdict: str) -> None:
    reg_a, reg_b = two
    a, b = RolloutController(reg_a, actor="controller-a"), RolloutController(reg_b, actor="controller-b")
    scripted_look(monkeypatch, [a_verdict, "hold"])
    before = reg_a.get_split(MODEL)
    b_result = []
    real_apply = RolloutController._apply

    def apply_after_losing_the_lock(self, info, baseline, canary, d, details):  # noqa: ANN001, ANN202
        if self.actor == "controller-a" and not b_result:  # controller A, mid-run, before it writes
            pid = lock_holder_pid(pg_url)
            assert pid is not None
            terminate(pg_url, pid)
            for _ in range(50):  # the server releases the lock when the backend has exited
                if lock_holder_pid(pg_url) is None:
                    break
                time.sleep(0.1)
            b_result.append(b.run_once(MODEL))  # B takes over and acts
        return real_apply(self, info, baseline, canary, d, details)

    monkeypatch.setattr(RolloutController, "_apply", apply_after_losing_the_lock)
    outcome: object
    try:
        outcome = a.run_once(MODEL)
    except ConflictError as exc:  # registry.locks.LockLost
        outcome = exc
    except Exception as exc:  # noqa: BLE001 - the dead connection itself (OperationalError)
        outcome = exc

    # B took over and its hold is the only decision stored.
    assert b_result and b_result[0] is not None and b_result[0].action == "hold"
    stored = decisions(reg_b, MODEL)
    assert [d["action"] for d in stored] == ["hold"], stored
    # A wrote nothing: the split is as before, no audit row after the set-up's, and A did not report
    # its verdict as applied.
    after = reg_b.get_split(MODEL)
    assert (after.revision, dict(after.weights)) == (before.revision, dict(before.weights))
    assert len(reg_b.audit_log(MODEL)) == 1
    assert not (hasattr(outcome, "action") and outcome.action == a_verdict == "rollback"), outcome
    # Both controllers work normally afterwards: A's next look takes the lock on a fresh connection.
    monkeypatch.setattr(RolloutController, "_apply", real_apply)
    scripted_look(monkeypatch, ["hold"])
    d = a.run_once(MODEL)
    assert d is None or d.action == "hold"


def test_lock_is_exclusive_and_checked_in_the_committing_transaction(two: tuple[Registry, Registry]) -> None:
    """While A holds the lock B gets none; A's fenced writes commit; after release B gets it."""
    from registry.locks import fenced_lock
    from registry.rollouts import record_decision

    reg_a, reg_b = two
    with fenced_lock(reg_a, "chimera-rollout:x") as held:
        assert held
        with fenced_lock(reg_b, "chimera-rollout:x") as other:
            assert not other
        record_decision(held.registry, {"model": MODEL, "baseline_version": 1, "canary_version": 2,
                                        "action": "hold", "metric": "", "test": "", "n_baseline": 0,
                                        "n_canary": 0, "weight_before": 10, "weight_after": 10,
                                        "reason": "fenced write", "details": {}})
    with fenced_lock(reg_b, "chimera-rollout:x") as other:
        assert other
    assert [d["reason"] for d in decisions(reg_a, MODEL)] == ["fenced write"]


def test_a_reconnected_lock_connection_is_not_trusted(two: tuple[Registry, Registry], pg_url: str) -> None:
    """SQLAlchemy reconnects a Connection transparently on its next use after a disconnect: the new
    backend does not hold the lock, and the check inside the committing transaction refuses it."""
    from registry.locks import LockLost, fenced_lock
    from registry.rollouts import record_decision

    reg_a, reg_b = two
    row = {"model": MODEL, "baseline_version": 1, "canary_version": 2, "action": "hold", "metric": "",
           "test": "", "n_baseline": 0, "n_canary": 0, "weight_before": 10, "weight_after": 10,
           "reason": "stale holder", "details": {}}
    with fenced_lock(reg_a, f"chimera-rollout:{MODEL}") as held:
        assert held
        pid = lock_holder_pid(pg_url)
        terminate(pg_url, pid)
        with pytest.raises(Exception):  # noqa: B017 - the terminated backend: any DBAPI error
            held.registry.get_split(MODEL)
        with fenced_lock(reg_b, f"chimera-rollout:{MODEL}") as other:
            assert other  # B takes over
            with pytest.raises(LockLost):
                record_decision(held.registry, row)
    assert decisions(reg_b, MODEL) == []
