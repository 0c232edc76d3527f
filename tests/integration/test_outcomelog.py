"""Outcome spill and replay (gateway.records.outcome_log) on a real SQLite registry: every accepted
outcome ends stored or dead-lettered with a reason, never lost and never stored twice."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select

from gateway.records.outcome_log import OutcomeLog, database_unavailable
from registry import Registry
from registry.models import Outcome
from registry.repository import PredictionRow


@pytest.fixture
def reg(tmp_path: Path):
    r = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    r.upgrade()
    r.insert_predictions([PredictionRow(request_id=f"p{i}", model="m", version=1, score=0.5, latency_ms=1.0)
                          for i in range(10)])
    yield r
    r.dispose()


def outcomes(reg: Registry) -> dict[str, float]:
    with reg.engine.connect() as c:
        return dict(c.execute(select(Outcome.request_id, Outcome.value)).tuples().all())


def test_replay_stores_each_outcome_once_and_dead_letters_the_rest(reg: Registry, tmp_path: Path) -> None:
    reg.record_outcome("p9", 1.0)
    olog = OutcomeLog(reg, tmp_path / "outcomes-0.spill", unknown_grace_s=0.0)
    for i in range(5):
        olog.accept(f"p{i}", float(i % 2))
    olog.accept("p0", 0.0)  # the same outcome twice: stored once
    olog.accept("p9", 0.0)  # conflicts with the stored 1.0
    olog.accept("ghost", 1.0)  # no such prediction
    with pytest.raises(ValueError, match="finite"):
        olog.accept("p1", math.nan)
    assert olog.pending() == 8 and olog.stats.spilled == 8
    assert olog.replay() is True
    assert outcomes(reg) == {"p0": 0.0, "p1": 1.0, "p2": 0.0, "p3": 1.0, "p4": 0.0, "p9": 1.0}
    assert olog.stats.replayed == 6  # p0..p4 and p0 again (already stored with the same value)
    dead = [json.loads(line) for line in olog.dead_letter_path.read_text().splitlines()]
    assert {(d["id"], d["reason"]) for d in dead} == {("p9", "conflict"), ("ghost", "unknown_request_id")}
    assert olog.stats.dead_letter == {"unknown_request_id": 1, "conflict": 1, "invalid": 0}
    assert not olog.has_spill and olog.replay() is True


def test_unknown_id_waits_for_its_prediction_within_the_grace(reg: Registry, tmp_path: Path) -> None:
    olog = OutcomeLog(reg, tmp_path / "o.spill", unknown_grace_s=60.0)
    olog.accept("late", 1.0)
    assert olog.replay() is False and olog.pending() == 1  # kept: the prediction may still arrive
    reg.insert_predictions([PredictionRow(request_id="late", model="m", version=1, score=0.1, latency_ms=1)])
    assert olog.replay() is True
    assert outcomes(reg)["late"] == 1.0 and not olog.dead_letter_path.exists()


def test_waits_while_predictions_are_still_spilled(reg: Registry, tmp_path: Path) -> None:
    pending = {"yes": True}
    olog = OutcomeLog(reg, tmp_path / "o.spill", predictions_pending=lambda: pending["yes"])
    olog.accept("p1", 1.0)
    assert olog.replay() is False and olog.pending() == 1 and outcomes(reg) == {}
    pending["yes"] = False
    assert olog.replay() is True and outcomes(reg) == {"p1": 1.0}


def test_database_down_keeps_everything_and_a_crash_mid_replay_duplicates_nothing(
        reg: Registry, tmp_path: Path) -> None:
    olog = OutcomeLog(reg, tmp_path / "o.spill")
    for i in range(4):
        olog.accept(f"p{i}", 1.0)
    real = reg.record_outcomes

    def down(items):
        raise sa_exc.OperationalError("INSERT", {}, Exception("connection refused"))

    reg.record_outcomes = down  # type: ignore[method-assign]
    assert olog.replay() is False and olog.pending() == 4
    # A crash after the database committed but before the file was removed: the next replay (e.g. by a
    # restarted gateway) sees the same lines again; they are stored once.
    reg.record_outcomes = real  # type: ignore[method-assign]
    real([("p0", 1.0), ("p1", 1.0)])
    olog.accept("p5", 0.0)  # accepted while the first file was being replayed
    restarted = OutcomeLog(reg, tmp_path / "o.spill")
    assert restarted.replay() is True
    assert outcomes(reg) == {"p0": 1.0, "p1": 1.0, "p2": 1.0, "p3": 1.0, "p5": 0.0}
    with reg.engine.connect() as c:
        assert c.execute(select(func.count()).select_from(Outcome)).scalar() == 5


def test_replay_thread_runs_at_start(reg: Registry, tmp_path: Path) -> None:
    OutcomeLog(reg, tmp_path / "o.spill").accept("p7", 1.0)
    olog = OutcomeLog(reg, tmp_path / "o.spill", replay_interval_s=0.05)
    olog.start()
    try:
        deadline = time.monotonic() + 10
        while olog.has_spill and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        olog.stop()
    assert outcomes(reg) == {"p7": 1.0}


def test_database_unavailable_classification() -> None:
    assert database_unavailable(sa_exc.OperationalError("x", {}, Exception("refused")))
    assert database_unavailable(sa_exc.InterfaceError("x", {}, Exception("closed")))
    assert database_unavailable(sa_exc.TimeoutError("pool"))
    assert not database_unavailable(sa_exc.IntegrityError("x", {}, Exception("dup")))
    assert not database_unavailable(ValueError("x"))


def test_an_outcome_past_the_spill_bound_is_refused_and_every_accepted_one_is_stored(
        reg: Registry, tmp_path: Path) -> None:
    """The database away (no replay runs) and a small spill bound: outcomes are accepted, fsynced, until
    the next would pass the bound; that one is refused with SpillUnavailable ("limit", counted), which
    the gateway answers RESOURCE_EXHAUSTED; nothing accepted is dropped, and once the replay runs every
    accepted outcome is stored, none of the refused."""
    from gateway.records.spill import SpillUnavailable

    olog = OutcomeLog(reg, tmp_path / "o.spill", spill_max_bytes=400)
    accepted, refused = [], []
    for i in range(10):
        try:
            olog.accept(f"p{i}", 1.0)
            accepted.append(f"p{i}")
        except SpillUnavailable as exc:
            assert exc.reason == "limit" and "size limit" in str(exc)
            refused.append(f"p{i}")
    assert accepted and refused, (accepted, refused)
    assert (tmp_path / "o.spill").stat().st_size <= 400 and olog.pending() == len(accepted)
    assert olog.stats.spill_failures["limit"] == len(refused)
    assert olog.replay() is True
    assert outcomes(reg) == dict.fromkeys(accepted, 1.0)

