"""Static and transactional safety: no SQL assembled from strings, split changes all-or-nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session

from registry import Registry

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("chimera", "gateway", "registry", "replicas", "training", "loadtest")
# An f-string, %-format or .format() handed to text()/execute()/exec_driver_sql() is SQL built
# from strings; bound parameters are the only way values reach SQL here.
SQL_FROM_STRINGS = re.compile(
    r"""\b(text|execute|exec_driver_sql)\(\s*(f["']|["'][^"']*["']\s*(%|\.format\())""")


def test_no_sql_is_assembled_from_strings() -> None:
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "_pb2" in path.name:
                continue
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if SQL_FROM_STRINGS.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_pattern_catches_what_it_should() -> None:
    assert SQL_FROM_STRINGS.search('conn.execute(f"DELETE FROM t WHERE id = {x}")')
    assert SQL_FROM_STRINGS.search('text("SELECT %s" % name)')
    assert not SQL_FROM_STRINGS.search('text("SELECT pg_notify(:ch, :model)")')
    # A function whose name merely ends in "text" (the door's check_text) builds no SQL.
    assert not SQL_FROM_STRINGS.search('check_text(f"{prefix}model", request.model)')


def test_controller_crash_mid_decision_leaves_old_split(registry: Registry) -> None:
    """The split rows, the version statuses and the decision row commit together: a crash just
    before the commit (simulated by failing the commit) leaves the old state entirely."""
    registry.publish_version("m", b"one", ["a"], status="production")
    registry.publish_version("m", b"two", ["a"], status="canary")
    registry.set_split("m", {1: 90, 2: 10}, expected_revision=0, actor="op")

    def crash(_session: Session) -> None:
        raise RuntimeError("controller process died")

    event.listen(Session, "before_commit", crash)
    try:
        with pytest.raises(RuntimeError, match="died"):
            registry.set_split("m", {1: 100}, expected_revision=1, actor="rollout-controller",
                               reason="rollback", status_changes={2: "rolled_back"},
                               decision={"model": "m", "baseline_version": 1, "canary_version": 2,
                                         "action": "rollback", "metric": "success_rate", "test": "msprt",
                                         "n_baseline": 1, "n_canary": 1, "weight_before": 10,
                                         "weight_after": 0, "reason": "x", "details": {}})
    finally:
        event.remove(Session, "before_commit", crash)
    split = registry.get_split("m")
    assert split.revision == 1 and dict(split.weights) == {1: 90, 2: 10}
    assert registry.get_version("m", 2).status == "canary"
    from registry.rollouts import decisions

    assert decisions(registry, "m") == []
    assert len(registry.audit_log("m")) == 1
