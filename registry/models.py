"""SQLAlchemy 2 table definitions: every table of the registry, in this one module. Alembic migrations in
registry/migrations are the source of truth for the schema in databases; these classes must match them
(tests/integration/test_registry.py compares them with Alembic's autogenerate diff).

Also the two value rules every table shares: times are stored as UTC (`utcnow` for defaults, `as_utc`
for the naive datetimes SQLite hands back) and JSON columns never hold NaN/inf (`FiniteJSON`).

Over 400 lines because every table is declared here: the one metadata that Alembic's autogenerate diff
(and that test) compares with the migrations; split up, its parts would only be gathered again for that.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Any, overload

import numpy as np

try:  # the same encoder the prediction log writes JSON feature rows with
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None  # type: ignore[assignment]
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import ColumnElement, and_, false

from chimera.jsonsafe import nan_to_none

# The width of every request_id column, and so the longest request id the gateway takes: its checks
# (gateway.serving.rows for predictions, gateway.records.outcome_intake for outcomes) refuse a longer
# one with INVALID_ARGUMENT instead of letting PostgreSQL refuse the row later (SQLite would store it).
MAX_REQUEST_ID = 128


def utcnow() -> datetime:
    """Now, timezone-aware in UTC: the default of every created_at and the clock of registry code."""
    return datetime.now(UTC)


@overload
def as_utc(dt: datetime) -> datetime: ...
@overload
def as_utc(dt: None) -> None: ...
def as_utc(dt: datetime | None) -> datetime | None:
    """`dt` as an aware UTC datetime. SQLite hands back naive datetimes (everything stored is UTC), and
    comparing a naive with an aware datetime raises; None passes through for nullable columns."""
    if dt is None:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


class FiniteJSON(TypeDecorator[Any]):
    """JSON that stores NaN and ±inf as null, at any depth (`chimera.jsonsafe.nan_to_none`).

    PostgreSQL's json type refuses NaN/Infinity and SQLite would store tokens no JSON reader accepts,
    so the rule lives in the column: callers may hand statistics over as they are. Same database type
    as JSON (Alembic sees no schema change); options such as `none_as_null` pass through to JSON."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return nan_to_none(value)


class FeatureVector(FiniteJSON):
    """A prediction's feature row, read back as a list of floats whether it is stored as JSON text or as
    a packed little-endian float32 vector (bytes).

    Why two forms: the gateway's prediction log writes packed float32 (32 features: 128 bytes instead
    of ~300 characters of JSON; less database CPU a row and no text to encode; issue 17,
    gateway.records.inserter). PostgreSQL's column is bytea since migration 0008, so there every write,
    the ORM's too, is packed (a list, or JSON text from a spill line, is packed here) and every reader
    sees one form. SQLite's column keeps its JSON type (SQLite keeps any value in any column, so Alembic
    sees no schema change): the log writes bytes, the ORM JSON, old rows are JSON, and both read back as
    the same floats (the float32 values the model scored)."""

    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(LargeBinary())
        return super().load_dialect_impl(dialect)

    def bind_processor(self, dialect: Dialect) -> Any:
        if dialect.name == "postgresql":
            to_db = LargeBinary().dialect_impl(dialect).bind_processor(dialect)

            def pack(value: Any) -> Any:
                value = list_to_packed(value)
                return to_db(value) if to_db is not None and value is not None else value

            return pack
        as_json = super().bind_processor(dialect)

        def process(value: Any) -> Any:  # bytes (the log's packed rows) pass as they are
            if isinstance(value, (bytes, bytearray, memoryview)) or as_json is None:
                return value
            return as_json(value)

        return process

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        from_json = super().result_processor(dialect, coltype) if dialect.name != "postgresql" else None

        def process(value: Any) -> Any:
            if isinstance(value, (bytes, bytearray, memoryview)):
                return packed_to_list(value)
            return from_json(value) if from_json is not None else value

        return process


def list_to_packed(value: Any) -> bytes | None:
    """A feature row (list of numbers, None for NaN; JSON text of one; or bytes already packed) as packed
    little-endian float32 bytes; None stays None (SQL NULL)."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        import json

        value = json.loads(value)
        if value is None:
            return None
    with np.errstate(over="ignore"):  # beyond float32's range: +-inf, as the log's own cast
        return np.asarray([np.nan if v is None else v for v in value], dtype="<f4").tobytes()


def packed_to_list(value: bytes | bytearray | memoryview) -> list[float]:
    """A packed float32 vector as the list its JSON text would read back as: the shortest decimal that
    round-trips each float32 (orjson, as the log writes JSON), so 0.1f reads 0.1 in both forms rather
    than 0.10000000149011612 from one and 0.1 from the other. Without orjson, the writer's own
    fallback format (9 significant digits, gateway.records.feature_rows.features_json)."""
    arr = np.frombuffer(value, dtype="<f4")
    if _orjson is not None:
        return _orjson.loads(_orjson.dumps(arr, option=_orjson.OPT_SERIALIZE_NUMPY))  # type: ignore[no-any-return]
    return [float(f"{v:.9g}") for v in arr.tolist()]


class Base(DeclarativeBase):
    pass


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True, nullable=False)
    # Comparison metric for canary analysis: success_rate | mean_outcome | brier | log_loss.
    metric: Mapped[str] = mapped_column(String(32), nullable=False, default="success_rate")
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    # Bumped on every split change; SetTrafficSplit compares it (optimistic concurrency).
    split_revision: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    # Scored on live traffic and logged to shadow_predictions, never returned (None: no shadow).
    shadow_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Rollout policy overrides (steps, alpha, min samples, tau, guardrails) as JSON.
    rollout_config: Mapped[dict[str, Any]] = mapped_column(FiniteJSON, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), nullable=False, index=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    # staged | canary | production | rolled_back | failed | archived
    status: Mapped[str] = mapped_column(String(32), nullable=False, default="staged")
    onnx: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    feature_names: Mapped[list[str]] = mapped_column(FiniteJSON, nullable=False)
    metrics: Mapped[dict[str, Any]] = mapped_column(FiniteJSON, nullable=False, default=dict)
    params: Mapped[dict[str, Any]] = mapped_column(FiniteJSON, nullable=False, default=dict)
    data_hash: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    parent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class TrafficSplit(Base):
    """One row per (model, version) with weight > 0; the whole split shares models.split_revision."""

    __tablename__ = "traffic_splits"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    weight: Mapped[int] = mapped_column(Integer, nullable=False)


def created_day(context: Any) -> date:
    """predictions.day (and that of shadow_predictions and request_errors) when a writer gives none: the
    UTC date of the row's created_at (now without one). Migrations 0009 and 0011 say why the log needs the
    day as a column (PostgreSQL partitions by it)."""
    created = context.get_current_parameters().get("created_at") if context is not None else None
    if not isinstance(created, datetime):
        created = utcnow()
    return (created if created.tzinfo is None else created.astimezone(UTC)).date()


# The names of the day partitions of predictions (migration 0009), shadow_predictions and request_errors
# (0011) and outcomes (0012) on PostgreSQL (registry.partitions): one table a UTC day, the first (the table
# before the migration) and the DEFAULT one. Not declared here: they are the parent's.
LOG_PARTITION = re.compile(
    r"(?:predictions|shadow_predictions|request_errors|outcomes)_(?:\d{8}|upto_\d{8}|default)")


def prediction_key(dialect: str) -> list[str]:
    """The columns a request id is unique with in predictions, for ON CONFLICT: (request_id, day) on
    PostgreSQL, where the table is partitioned by day (migration 0009), request_id alone on SQLite."""
    return ["request_id", "day"] if dialect == "postgresql" else ["request_id"]


def shadow_key(dialect: str) -> list[str]:
    """The columns a mirror score is unique with in shadow_predictions, for ON CONFLICT: (request_id,
    version, day) on PostgreSQL, partitioned by day (migration 0011), (request_id, version) on SQLite."""
    return ["request_id", "version", "day"] if dialect == "postgresql" else ["request_id", "version"]


class Prediction(Base):
    """One answered prediction. On PostgreSQL the table is partitioned by `day` (migration 0009), so its
    keys there are PRIMARY KEY (id, day) and UNIQUE (request_id, day) instead of the two declared here
    (which are SQLite's), with CHECK (day = created_at's UTC date);
    tests/integration/test_registry.py::test_models_match_the_migrations knows."""

    __tablename__ = "predictions"
    # One index for every range read (rollout looks, retraining, retention): model = ? AND created_at in
    # a range (migration 0006, which says why it replaced created_at and (model, version)).
    __table_args__ = (Index("ix_predictions_model_created", "model", "created_at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(MAX_REQUEST_ID), nullable=False, unique=True)
    model: Mapped[str] = mapped_column(String(128), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    routing_key: Mapped[str] = mapped_column(String(256), nullable=False, default="")
    score: Mapped[float] = mapped_column(Float, nullable=False)
    latency_ms: Mapped[float] = mapped_column(Float, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    # The scored feature row (or a sample of rows), for retraining from feedback and drift checks.
    features: Mapped[list[float] | None] = mapped_column(FeatureVector(none_as_null=True), nullable=True)
    # Rollout statistics (migration 0005): the split revision the row was routed under (None: before
    # 0005), pinned/load-test traffic (excluded from every rollout test), and the version whose failure
    # made this row fail over to `version` (None: served by the routed version).
    split_revision: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    pinned: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())
    failed_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The UTC date of created_at (migration 0009): PostgreSQL's partition key, filled by every writer.
    day: Mapped[date] = mapped_column(Date, nullable=False, default=created_day)


def logged_between(postgres: bool, since: datetime | None = None, until: datetime | None = None, *,
                   before: datetime | None = None, table: Any = None) -> list[ColumnElement[bool]]:
    """The conditions that select predictions logged in [since, until], or [since, before) with `before`
    (a bound left None is open): the range on created_at, and on PostgreSQL the same range in days.
    `table`: another table partitioned the same way (ShadowPrediction, RequestError: migration 0011)
    instead of Prediction.

    Why the days: PostgreSQL prunes partitions by the partition key only. A range on created_at alone is
    planned against every day's table (with 90 days kept, 90 index probes and 90 plan nodes for a rollout
    look that reads one day), the day range lets the planner leave the other days out. It selects no fewer
    rows: every partition has CHECK (day = created_at's UTC date), migrations 0009 and 0011. SQLite keeps
    one table and has no such CHECK, so there the created_at range stands alone: a condition whose truth
    would rest on every writer's care is not added where it buys nothing."""
    t = Prediction if table is None else table
    conds: list[ColumnElement[bool]] = []
    if since is not None:
        conds.append(t.created_at >= since)
    if until is not None:
        conds.append(t.created_at <= until)
    if before is not None:
        conds.append(t.created_at < before)
    if postgres:
        conds += days_between(t, since, until if until is not None else before)
    return conds


def days_between(table: Any, first: datetime | None, last: datetime | None) -> list[ColumnElement[bool]]:
    """`table`.day from `first`'s UTC date to `last`'s (a bound left None is open): the partition key's
    range for a read of [first, last] (PostgreSQL; logged_between says why)."""
    conds: list[ColumnElement[bool]] = []
    if first is not None:
        conds.append(table.day >= as_utc(first).date())
    if last is not None:
        conds.append(table.day <= as_utc(last).date())
    return conds


class RequestError(Base):
    """A routed request that failed entirely (no version could answer): counts against `version`, the
    version it was routed to, in the rollout's error guardrail (migration 0005). On PostgreSQL the table
    is partitioned by `day` like predictions (migration 0011): PRIMARY KEY (id, day) there, with CHECK
    (day = created_at's UTC date)."""

    __tablename__ = "request_errors"
    __table_args__ = (Index("ix_request_errors_model_created", "model", "created_at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(MAX_REQUEST_ID), nullable=False, default="")
    model: Mapped[str] = mapped_column(String(128), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    split_revision: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    routing_key: Mapped[str] = mapped_column(String(256), nullable=False, default="")
    pinned: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str] = mapped_column(Text, nullable=False, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    # The UTC date of created_at (migration 0011): PostgreSQL's partition key, filled by every writer.
    day: Mapped[date] = mapped_column(Date, nullable=False, default=created_day)


def outcome_key(dialect: str) -> list[str]:
    """The columns an outcome is unique with, for ON CONFLICT: (request_id, day) on PostgreSQL, where
    outcomes is partitioned by day (migration 0012), request_id alone on SQLite."""
    return ["request_id", "day"] if dialect == "postgresql" else ["request_id"]


class Outcome(Base):
    """The real-world outcome of one prediction, reported later (RecordOutcome), one per prediction.

    `day` is its prediction's day, not the day the outcome came (migration 0012): the newest stored
    prediction with that request id when the outcome is stored (registry.repository.Registry.record_outcomes).
    So on PostgreSQL, where outcomes is partitioned by day like the log, an outcome sits in the partition
    of its prediction's day and `chimera log prune` drops both days together: an outcome is kept exactly
    as long as its prediction, however late it came. An outcome joins its prediction on request id and
    day (`outcome_of`). The key there is PRIMARY KEY (request_id, day) instead of the request_id declared
    here (SQLite's): a request id PostgreSQL logged again on a later day (README, Failure modes) is a new
    prediction, and an outcome reported after that is stored for it (SQLite never logs the id twice)."""

    __tablename__ = "outcomes"
    __table_args__ = (Index("ix_outcomes_created", "created_at"),)  # retention (`chimera log prune`), 0010

    request_id: Mapped[str] = mapped_column(String(MAX_REQUEST_ID), primary_key=True)
    value: Mapped[float] = mapped_column(Float, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    # The day of the prediction it reports on (migration 0012): PostgreSQL's partition key.
    day: Mapped[date] = mapped_column(Date, nullable=False)


def outcome_of(postgres: bool, since: datetime | None = None,
               until: datetime | None = None) -> ColumnElement[bool]:
    """The join condition of a prediction (logged in [since, until], as `logged_between` selects it; a
    bound left None is open) with its outcome: the same request id and the same day.

    Why the day (migration 0012): an outcome carries its prediction's day, the key of both tables'
    partitions on PostgreSQL. With it, an outcome joins the one prediction it was stored against, also
    when a request id was logged again on a later day (README, Failure modes), and on PostgreSQL the same
    day range as the predictions' is added on outcomes: the planner does not carry a range across an
    equality, so without it every read of a window would probe (or scan) every day's outcomes."""
    conds: list[ColumnElement[bool]] = [Outcome.request_id == Prediction.request_id,
                                        Outcome.day == Prediction.day]
    if postgres:
        conds += days_between(Outcome, since, until)
    return and_(*conds)


class SplitAudit(Base):
    __tablename__ = "split_audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    actor: Mapped[str] = mapped_column(String(128), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False, default="")
    old: Mapped[dict[str, int]] = mapped_column(FiniteJSON, nullable=False)
    new: Mapped[dict[str, int]] = mapped_column(FiniteJSON, nullable=False)
    revision: Mapped[int] = mapped_column(BigInteger, nullable=False)
    forced: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class Decision(Base):
    """One rollout-controller decision with everything needed to recompute it from logged rows."""

    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    baseline_version: Mapped[int] = mapped_column(Integer, nullable=False)
    canary_version: Mapped[int] = mapped_column(Integer, nullable=False)
    # rollback | step_up | promote | hold (and manual_promote / manual_rollback from operators)
    action: Mapped[str] = mapped_column(String(32), nullable=False)
    metric: Mapped[str] = mapped_column(String(32), nullable=False)
    test: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    statistic: Mapped[float | None] = mapped_column(Float, nullable=True)
    p_value: Mapped[float | None] = mapped_column(Float, nullable=True)
    n_baseline: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    n_canary: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    mean_baseline: Mapped[float | None] = mapped_column(Float, nullable=True)
    mean_canary: Mapped[float | None] = mapped_column(Float, nullable=True)
    weight_before: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    weight_after: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    reason: Mapped[str] = mapped_column(Text, nullable=False, default="")
    # Full decision record (thresholds, tau, alpha, naive p-value, guardrails, sequential state) and
    # the id range of the rows it saw, so `chimera analyze` can recompute it.
    details: Mapped[dict[str, Any]] = mapped_column(FiniteJSON, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class LoadTestRun(Base):
    """A load test against one version; promotion requires a recent passing one."""

    __tablename__ = "load_tests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    target: Mapped[str] = mapped_column(String(256), nullable=False, default="")
    passed: Mapped[bool] = mapped_column(Boolean, nullable=False)
    failures: Mapped[list[str]] = mapped_column(FiniteJSON, nullable=False, default=list)
    slo: Mapped[dict[str, Any]] = mapped_column(FiniteJSON, nullable=False, default=dict)
    report: Mapped[dict[str, Any]] = mapped_column(FiniteJSON, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class ShadowPrediction(Base):
    """A mirror version's score for a live request (same request id as the served prediction): the
    shadow version's, or production's for a canary row (its covariate); one row per (request id,
    version), migration 0007. On PostgreSQL the table is partitioned by `day` like predictions
    (migration 0011): its keys there are PRIMARY KEY (id, day) and UNIQUE (request_id, version, day), with
    CHECK (day = created_at's UTC date). A mirror score pairs with its request's prediction only on the
    same day (`mirrored_with`), which is what keeps a retry that crossed midnight from pairing twice."""

    __tablename__ = "shadow_predictions"
    __table_args__ = (Index("ix_shadow_predictions_model_version", "model", "version"),
                      Index("ix_shadow_predictions_model_created", "model", "created_at"),  # retention, 0010
                      UniqueConstraint("request_id", "version", name="uq_shadow_predictions_request_version"))

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(MAX_REQUEST_ID), nullable=False)
    model: Mapped[str] = mapped_column(String(128), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    score: Mapped[float] = mapped_column(Float, nullable=False)
    latency_ms: Mapped[float] = mapped_column(Float, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    # The UTC date of created_at (migration 0011): PostgreSQL's partition key, filled by every writer.
    day: Mapped[date] = mapped_column(Date, nullable=False, default=created_day)


def mirrored_with(postgres: bool, model: str, version: int, since: datetime | None = None,
                  until: datetime | None = None) -> ColumnElement[bool]:
    """The join condition that pairs a served prediction (logged in [since, until], as `logged_between`
    selects it) with `version`'s mirror score of the same request: same model, request id and day.

    Why the day (migration 0011): on PostgreSQL a (request id, version) is unique per day, as a request id
    is in predictions, so a client's retry that crossed midnight can leave a mirror score on both days
    while the log keeps one prediction (gateway.records.pg_ids). Only the one of the kept prediction's day
    pairs with it: no request is counted twice. The same rule holds on SQLite, where the retry's score is
    refused instead. A mirror score written after 00:00 UTC for a request answered just before it (the
    mirror's milliseconds) pairs with nothing and the row has no mirror score, as when a mirror fails.
    On PostgreSQL the same day range as the predictions' is added, so the planner reads only those days'
    partitions of shadow_predictions."""
    conds: list[ColumnElement[bool]] = [
        ShadowPrediction.request_id == Prediction.request_id, ShadowPrediction.day == Prediction.day,
        ShadowPrediction.model == model, ShadowPrediction.version == version]
    if postgres:
        conds += days_between(ShadowPrediction, since, until)
    return and_(*conds)


class TrainingRun(Base):
    """One retrain (migration 0003): status, progress, data window, metrics of candidate and production,
    and the version it published (NULL when it published nothing, with the reason)."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="queued")
    mode: Mapped[str] = mapped_column(String(16), nullable=False, default="full")
    trigger: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    progress: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    stage: Mapped[str] = mapped_column(String(128), nullable=False, default="")
    window_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    window_end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    n_rows: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    data_hash: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    parent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    params: Mapped[dict[str, Any]] = mapped_column(FiniteJSON, nullable=False, default=dict)
    code_revision: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    # {"candidate": {...}, "production": {...}, "comparison": [...], ...}
    metrics: Mapped[dict[str, Any]] = mapped_column(FiniteJSON, nullable=False, default=dict)
    published_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str] = mapped_column(Text, nullable=False, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)


class ModelArtifact(Base):
    """The native model of a version next to its ONNX bytes (e.g. an XGBoost booster as UBJSON): ONNX
    cannot be trained further, incremental training continues from these bytes."""

    __tablename__ = "model_artifacts"

    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), primary_key=True)
    format: Mapped[str] = mapped_column(String(32), nullable=False)
    data: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    meta: Mapped[dict[str, Any]] = mapped_column(FiniteJSON, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
