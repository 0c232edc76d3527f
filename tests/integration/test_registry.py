"""Registry behaviour on SQLite and on a real PostgreSQL server (every test runs on both)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text

from registry import AlreadyExistsError, ConflictError, NotFoundError, Registry, ValidationError
from registry.migrate import alembic_config, current_revision
from registry.repository import PredictionRow, sha256_hex
from tests.harness import alembic_downgrade


def _publish(reg: Registry, model: str = "m", payload: bytes = b"onnx-bytes-1") -> int:
    return reg.publish_version(model, payload, ["a", "b", "c"], metrics={"auc": 0.71},
                               params={"max_depth": 4}, data_hash="d" * 64).version


def test_upgrade_is_idempotent_and_reaches_head(registry: Registry) -> None:
    from alembic.script import ScriptDirectory

    registry.upgrade()
    head = ScriptDirectory.from_config(alembic_config(registry.url)).get_current_head()
    assert head is not None and current_revision(registry.engine) == head


def test_published_bytes_hash_to_stored_sha256(registry: Registry) -> None:
    payload = bytes(range(256)) * 1000
    info = registry.publish_version("m", payload, ["x", "y"])
    data, sha = registry.get_onnx("m", info.version)
    assert data == payload
    assert sha == sha256_hex(data) == info.sha256
    # The check is against what the database really holds, not what we passed in.
    with registry.engine.connect() as conn:
        raw = conn.execute(text("SELECT onnx, sha256 FROM model_versions WHERE version = :v"),
                           {"v": info.version}).one()
    assert sha256_hex(bytes(raw[0])) == raw[1]


def test_versions_number_up_and_keep_lineage(registry: Registry) -> None:
    assert _publish(registry) == 1
    assert _publish(registry, payload=b"other") == 2
    v2 = registry.get_version("m", 2)
    assert v2.feature_names == ("a", "b", "c")
    assert v2.metrics["auc"] == pytest.approx(0.71)
    assert v2.params == {"max_depth": 4}
    assert [v.version for v in registry.list_versions("m")] == [1, 2]
    with pytest.raises(NotFoundError):
        registry.get_version("m", 9)
    with pytest.raises(NotFoundError):
        registry.get_version("nope", 1)


def test_publish_rejects_bad_schema(registry: Registry) -> None:
    with pytest.raises(ValidationError, match="feature_names"):
        registry.publish_version("m", b"x", ["a", "a"])
    with pytest.raises(ValidationError, match="onnx"):
        registry.publish_version("m", b"", ["a"])


def test_split_change_bumps_revision_and_audits(registry: Registry) -> None:
    _publish(registry)
    _publish(registry, payload=b"two")
    assert registry.get_split("m").revision == 0
    s1 = registry.set_split("m", {1: 100, 2: 0}, expected_revision=0, actor="alice", reason="start")
    s2 = registry.set_split("m", {1: 90, 2: 10}, expected_revision=s1.revision, actor="bob", reason="canary")
    assert s2.revision == 2 and dict(s2.weights) == {1: 90, 2: 10}
    assert dict(registry.get_split("m").weights) == {1: 90, 2: 10}
    audit = registry.audit_log("m")
    assert [(a["actor"], a["old"], a["new"]) for a in audit] == [
        ("alice", {}, {"1": 100}), ("bob", {"1": 100}, {"1": 90, "2": 10})]


@pytest.mark.parametrize("weights, field", [
    ({1: 90, 2: 20}, "sum to 100"),
    ({1: 90, 3: 10}, "version 3 does not exist"),
    ({1: 110, 2: -10}, "within 0..100"),
    ({}, "at least one"),
])
def test_invalid_split_changes_nothing(registry: Registry, weights: dict[int, int], field: str) -> None:
    _publish(registry)
    _publish(registry, payload=b"two")
    registry.set_split("m", {1: 100}, expected_revision=0, actor="a")
    with pytest.raises(ValidationError, match=field):
        registry.set_split("m", weights, expected_revision=1, actor="a")
    split = registry.get_split("m")
    assert split.revision == 1 and dict(split.weights) == {1: 100}


def test_stale_revision_is_a_conflict(registry: Registry) -> None:
    _publish(registry)
    registry.set_split("m", {1: 100}, expected_revision=0, actor="a")
    with pytest.raises(ConflictError, match="expected_revision"):
        registry.set_split("m", {1: 100}, expected_revision=0, actor="b")


def test_concurrent_writers_with_same_revision_exactly_one_wins(registry: Registry) -> None:
    _publish(registry)
    _publish(registry, payload=b"two")
    results: list[str] = []
    barrier = threading.Barrier(2)

    def writer(weights: dict[int, int]) -> None:
        barrier.wait()
        try:
            registry.set_split("m", weights, expected_revision=0, actor="w")
            results.append("ok")
        except ConflictError:
            results.append("conflict")

    threads = [threading.Thread(target=writer, args=(w,)) for w in ({1: 100}, {1: 50, 2: 50})]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["conflict", "ok"]
    assert registry.get_split("m").revision == 1


def test_predictions_and_outcomes(registry: Registry) -> None:
    _publish(registry)
    rows = [PredictionRow(f"r{i}", "m", 1, 0.25, 1.5, routing_key=f"k{i}") for i in range(100)]
    assert registry.insert_predictions(rows) == 100
    registry.insert_predictions(rows[:10])  # a replay must not duplicate
    assert registry.count_predictions("m") == {1: 100}
    assert registry.record_outcome("r1", 1.0) is True
    assert registry.record_outcome("r1", 1.0) is False  # idempotent
    with pytest.raises(AlreadyExistsError, match="already stored"):
        registry.record_outcome("r1", 0.0)
    with pytest.raises(NotFoundError, match="request_id"):
        registry.record_outcome("unknown", 1.0)
    registry.record_outcome("r2", 0.0)
    assert registry.outcome_means("m") == {1: (2, 0.5)}


def test_shadow_version_is_validated_bumps_revision_and_is_audited(registry: Registry) -> None:
    _publish(registry)
    _publish(registry, payload=b"two")
    registry.set_split("m", {1: 100}, expected_revision=0, actor="op")
    with pytest.raises(ValidationError, match="version"):
        registry.set_shadow("m", 9, actor="op")
    split = registry.set_shadow("m", 2, actor="op", reason="mirror v2")
    assert split.shadow == 2 and split.revision == 2 and dict(split.weights) == {1: 100}
    assert registry.get_split("m").shadow == 2
    assert registry.audit_log("m")[-1]["new"] == {"1": 100, "shadow": 2}
    rows = [PredictionRow(f"s{i}", "m", 2, 0.5, 1.0) for i in range(5)]
    assert registry.insert_shadow_predictions(rows) == 5
    registry.insert_shadow_predictions(rows)  # replay-safe
    assert registry.count_shadow_predictions("m") == {2: 5}
    assert registry.set_shadow("m", None, actor="op").shadow is None


def test_a_request_keeps_one_mirror_score_per_version(registry: Registry) -> None:
    """A canary row can have the shadow's score and production's (its covariate): both are kept, each
    once, however often the writer replays them."""
    for payload in (b"one", b"two", b"three"):
        _publish(registry, payload=payload)
    rows = [PredictionRow(f"c{i}", "m", v, 0.1 * v, 1.0) for i in range(4) for v in (1, 3)]
    assert registry.insert_shadow_predictions(rows) == 8
    registry.insert_shadow_predictions(rows)  # replay-safe per (request id, version)
    assert registry.count_shadow_predictions("m") == {1: 4, 3: 4}


def test_migration_0007_keeps_every_mirror_row_and_ids_keep_counting(registry_url: str) -> None:
    """Upgrading a 0006 database rebuilds shadow_predictions with every row and id kept, and new rows
    get fresh ids (PostgreSQL's sequence is moved past the copied ones); downgrading keeps one row per
    request id."""
    from registry.migrate import upgrade

    reg = Registry(registry_url)
    try:
        upgrade(registry_url, reg.engine, revision="0006")
        _publish(reg, payload=b"one")
        _publish(reg, payload=b"two")
        with reg.engine.begin() as c:  # as a 0006 gateway wrote them (its conflict target is request_id)
            c.execute(text("INSERT INTO shadow_predictions (request_id, model, version, score, latency_ms, "
                           "created_at) VALUES (:r, 'm', 2, 0.5, 1.0, CURRENT_TIMESTAMP)"),
                      [{"r": f"o{i}"} for i in range(5)])
        with reg.engine.connect() as c:
            before = c.execute(text("SELECT id, request_id FROM shadow_predictions ORDER BY id")).all()
        upgrade(registry_url, reg.engine)
        reg.insert_shadow_predictions([PredictionRow("o0", "m", 1, 0.4, 1.0)])
        with reg.engine.connect() as c:
            q = "SELECT id, request_id, version FROM shadow_predictions ORDER BY id"
            after = c.execute(text(q)).all()
        assert [tuple(r[:2]) for r in after[:5]] == [tuple(r) for r in before]
        assert after[5][1:] == ("o0", 1) and after[5][0] > before[-1][0]
        assert reg.count_shadow_predictions("m") == {1: 1, 2: 5}
        alembic_downgrade(reg, "0006")  # the earliest row per request id is kept
        with reg.engine.connect() as c:
            assert c.execute(text("SELECT COUNT(*) FROM shadow_predictions")).scalar() == 5
    finally:
        reg.dispose()


def test_models_match_the_migrations(registry: Registry) -> None:
    """Every table is declared once in registry.models and says exactly what the migrations built:
    Alembic's autogenerate diff between the migrated database and the ORM metadata is empty."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from registry.models import LOG_PARTITION, Base

    def declared(name: str | None, kind: str, parent: object) -> bool:  # a partition is its parent's
        return not (kind == "table" and name and LOG_PARTITION.fullmatch(name))

    opts = {"compare_type": True, "include_name": declared}
    with registry.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts=opts), Base.metadata)
    if registry.engine.dialect.name == "postgresql":
        # The partitioned log's keys (migrations 0009 and 0011; registry.models.Prediction and
        # ShadowPrediction say why they differ): the models' UNIQUE (request_id) and (request_id, version)
        # are UNIQUE (request_id, day) and (request_id, version, day) there, and nothing else differs.
        keys = [d for d in diff if d[0] in ("add_constraint", "remove_constraint")
                and d[1].table.name in ("predictions", "shadow_predictions")]
        assert sorted((d[1].table.name, d[0], tuple(c.name for c in d[1].columns)) for d in keys) == [
            ("predictions", "add_constraint", ("request_id",)),
            ("predictions", "remove_constraint", ("request_id", "day")),
            ("shadow_predictions", "add_constraint", ("request_id", "version")),
            ("shadow_predictions", "remove_constraint", ("request_id", "version", "day"))]
        diff = [d for d in diff if d not in keys]
    assert diff == []
    assert {"training_runs", "model_artifacts", "load_tests"} <= set(Base.metadata.tables)


def test_json_columns_store_nan_and_inf_as_null(registry: Registry) -> None:
    """Statistics may be NaN ("no data yet"); PostgreSQL's json refuses NaN, so every JSON column turns
    non-finite floats into null at any depth instead of failing the write."""
    from registry.rollouts import decisions, record_decision

    info = registry.publish_version("m", b"x", ["a"], metrics={"auc": float("nan"), "n": 3})
    assert info.metrics == {"auc": None, "n": 3.0}
    assert registry.get_version("m", 1).metrics == {"auc": None, "n": 3.0}
    record_decision(registry, {
        "model": "m", "baseline_version": 1, "canary_version": 1, "action": "hold", "metric": "success_rate",
        "details": {"p99": {"baseline": float("inf"), "canary": 0.5}, "seq": [float("-inf"), 1.0]}})
    assert decisions(registry, "m")[0]["details"] == {"p99": {"baseline": None, "canary": 0.5},
                                                      "seq": [None, 1.0]}


def test_prediction_without_features_is_sql_null(registry: Registry) -> None:
    """`features=None` stays SQL NULL (the column is none_as_null), which the feedback read relies on."""
    _publish(registry)
    registry.insert_predictions([PredictionRow("r1", "m", 1, 0.5, 1.0),
                                 PredictionRow("r2", "m", 1, 0.5, 1.0, features=[1.0, 2.0])])
    with registry.engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT request_id, features FROM predictions")).tuples().all())
    assert rows["r1"] is None and rows["r2"] is not None


def test_nan_to_none_is_recursive_and_leaves_the_rest_alone() -> None:
    import numpy as np

    from chimera.jsonsafe import nan_to_none

    value = {"a": float("nan"), "b": [1, (2.5, float("inf"))], "c": np.float32(0.5), "d": np.int64(7),
             "e": "nan", 3: None}
    assert nan_to_none(value) == {"a": None, "b": [1, [2.5, None]], "c": 0.5, "d": 7, "e": "nan", 3: None}
    assert nan_to_none(float("-inf")) is None and nan_to_none(1.5) == 1.5


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_driverless_postgres_urls_use_psycopg2(postgres, scheme: str) -> None:  # noqa: ANN001
    """`postgresql://` (SQLAlchemy 2.1 maps it to psycopg 3, not installed: ModuleNotFoundError) and
    `postgres://` (unknown to SQLAlchemy) are what operators write; both reach the same database through
    psycopg2 with the engine's deadlines, and migrations run on them."""
    url = postgres.create_database().replace("postgresql+psycopg2://", f"{scheme}://")
    reg = Registry(url)
    try:
        reg.upgrade()
        _publish(reg)
        assert reg.get_split("m").revision == 0
        assert reg.url.startswith("postgresql+psycopg2://") and reg.engine.dialect.driver == "psycopg2"
        assert current_revision(reg.engine) is not None
    finally:
        reg.dispose()


def test_other_urls_are_left_as_given() -> None:
    from registry.engine import driver_url

    for url in ("sqlite:///x.db", "postgresql+psycopg2://u:p%40ss@h:5432/d", "sqlite://"):
        assert driver_url(url) == url
    assert driver_url("postgres://u:p%40ss@h:5432/d") == "postgresql+psycopg2://u:p%40ss@h:5432/d"
