"""SQLAlchemy 2 table definitions. Alembic migrations in registry/migrations are the source of truth
for the schema in databases; these classes must match them (a test compares them)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


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
    rollout_config: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
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
    feature_names: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    data_hash: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    parent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class TrafficSplit(Base):
    """One row per (model, version) with weight > 0; the whole split shares models.split_revision."""

    __tablename__ = "traffic_splits"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    weight: Mapped[int] = mapped_column(Integer, nullable=False)


class Prediction(Base):
    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(128), nullable=False, unique=True)
    model: Mapped[str] = mapped_column(String(128), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    routing_key: Mapped[str] = mapped_column(String(256), nullable=False, default="")
    score: Mapped[float] = mapped_column(Float, nullable=False)
    latency_ms: Mapped[float] = mapped_column(Float, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow,
                                                 index=True)
    # The scored feature row (or a sample of rows), for retraining from feedback and drift checks.
    features: Mapped[list[float] | None] = mapped_column(JSON(none_as_null=True), nullable=True)


class Outcome(Base):
    __tablename__ = "outcomes"

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[float] = mapped_column(Float, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class SplitAudit(Base):
    __tablename__ = "split_audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    actor: Mapped[str] = mapped_column(String(128), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False, default="")
    old: Mapped[dict[str, int]] = mapped_column(JSON, nullable=False)
    new: Mapped[dict[str, int]] = mapped_column(JSON, nullable=False)
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
    details: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class LoadTestRun(Base):
    """A load test against one version; promotion requires a recent passing one."""

    __tablename__ = "load_tests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    target: Mapped[str] = mapped_column(String(256), nullable=False, default="")
    passed: Mapped[bool] = mapped_column(Boolean, nullable=False)
    failures: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list)
    slo: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    report: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class ShadowPrediction(Base):
    """A mirror version's score for a live request (same request id as the served prediction)."""

    __tablename__ = "shadow_predictions"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(128), nullable=False, unique=True)
    model: Mapped[str] = mapped_column(String(128), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    score: Mapped[float] = mapped_column(Float, nullable=False)
    latency_ms: Mapped[float] = mapped_column(Float, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
