"""Continuous training in the registry: training runs, native model artifacts and the feedback read
(logged predictions with their features, joined with outcomes).

Tables (`registry.models.TrainingRun` and `ModelArtifact`, migration 0003):

- `training_runs`  one row per retrain: status (queued, running, succeeded, failed), progress 0..1,
  stage, data window, row count, data hash, parent version, parameters, code revision, metrics of the
  candidate and of production on the same holdout, the version it published (NULL when it published
  nothing) and the reason when it did not.
- `model_artifacts` the native model of a version next to its ONNX bytes (e.g. the XGBoost booster
  as UBJSON). ONNX cannot be trained further; incremental training continues from these bytes.

The scheduler's leadership lock is `registry.locks.SessionLock`. Like `registry.repository`, callers
get frozen dataclasses, never ORM objects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Text, cast, select

from registry.errors import NotFoundError, ValidationError
from registry.models import (
    Model,
    ModelArtifact,
    ModelVersion,
    Outcome,
    Prediction,
    TrainingRun,
    as_utc,
    logged_between,
    outcome_of,
    utcnow,
)
from registry.repository import Registry

RUN_STATUSES = ("queued", "running", "succeeded", "failed")
RUN_MODES = ("full", "incremental")


# ------------------------------------------------------------------------------------ training runs
@dataclass(frozen=True)
class TrainingRunInfo:
    id: int
    model: str
    status: str
    mode: str
    trigger: str
    progress: float
    stage: str
    window_start: datetime | None
    window_end: datetime | None
    n_rows: int
    data_hash: str
    parent_version: int | None
    params: Mapping[str, Any]
    code_revision: str
    metrics: Mapping[str, Any]
    published_version: int | None
    reason: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None

    @property
    def published(self) -> bool:
        return self.published_version is not None


def _run_info(r: TrainingRun) -> TrainingRunInfo:
    return TrainingRunInfo(
        id=r.id, model=r.model, status=r.status, mode=r.mode, trigger=r.trigger, progress=r.progress,
        stage=r.stage, window_start=as_utc(r.window_start), window_end=as_utc(r.window_end),
        n_rows=r.n_rows, data_hash=r.data_hash, parent_version=r.parent_version,
        params=dict(r.params or {}), code_revision=r.code_revision, metrics=dict(r.metrics or {}),
        published_version=r.published_version, reason=r.reason,
        created_at=as_utc(r.created_at),
        started_at=as_utc(r.started_at), finished_at=as_utc(r.finished_at), duration_s=r.duration_s)


def create_run(
    registry: Registry,
    model: str,
    *,
    mode: str = "full",
    params: Mapping[str, Any] | None = None,
    trigger: str = "",
    code_revision: str = "",
) -> TrainingRunInfo:
    """A new run in status `queued`."""
    if mode not in RUN_MODES:
        raise ValidationError(f"mode: must be one of {', '.join(RUN_MODES)}, got {mode!r}")
    with registry.transaction() as s:
        row = TrainingRun(model=model, status="queued", mode=mode, trigger=trigger[:64], progress=0.0,
                          stage="queued", n_rows=0, data_hash="", params=dict(params or {}),
                          code_revision=code_revision[:64], metrics={}, reason="")
        s.add(row)
        s.flush()
        return _run_info(row)


_UPDATABLE = frozenset({"status", "progress", "stage", "window_start", "window_end", "n_rows", "data_hash",
                        "parent_version", "params", "metrics", "published_version", "reason"})


def update_run(registry: Registry, run_id: int, **fields: Any) -> None:
    """Change some fields of a run. Status `running` stamps started_at (first time); `succeeded` and
    `failed` stamp finished_at and the duration. Progress is clamped to 0..1."""
    unknown = sorted(set(fields) - _UPDATABLE)
    if unknown:
        raise ValidationError(f"training run: unknown fields {', '.join(unknown)}")
    if "status" in fields and fields["status"] not in RUN_STATUSES:
        raise ValidationError(f"status: must be one of {', '.join(RUN_STATUSES)}, got {fields['status']!r}")
    values = dict(fields)
    if "progress" in values:
        values["progress"] = min(1.0, max(0.0, float(values["progress"])))
    if "stage" in values:
        values["stage"] = str(values["stage"])[:128]
    with registry.transaction() as s:
        row = s.get(TrainingRun, run_id)
        if row is None:
            raise NotFoundError(f"training run {run_id} not found")
        now = utcnow()
        status = values.get("status")
        if status == "running" and row.started_at is None:
            row.started_at = now
        if status in ("succeeded", "failed"):
            row.finished_at = now
            started = as_utc(row.started_at) or as_utc(row.created_at) or now
            row.duration_s = max(0.0, (now - started).total_seconds())
            values.setdefault("progress", 1.0 if status == "succeeded" else row.progress)
        for key, value in values.items():
            setattr(row, key, value)


def get_run(registry: Registry, run_id: int) -> TrainingRunInfo:
    with registry.session() as s:
        row = s.get(TrainingRun, run_id)
        if row is None:
            raise NotFoundError(f"training run {run_id} not found")
        return _run_info(row)


def list_runs(registry: Registry, model: str | None = None, *, limit: int = 20,
              published_version: int | None = None) -> list[TrainingRunInfo]:
    """Newest first."""
    q = select(TrainingRun)
    if model is not None:
        q = q.where(TrainingRun.model == model)
    if published_version is not None:
        q = q.where(TrainingRun.published_version == published_version)
    q = q.order_by(TrainingRun.id.desc()).limit(limit)
    with registry.session() as s:
        return [_run_info(r) for r in s.scalars(q)]


# ------------------------------------------------------------------------------------ artifacts
@dataclass(frozen=True)
class Artifact:
    model: str
    version: int
    format: str
    data: bytes
    sha256: str
    meta: Mapping[str, Any]


def _version_row(s: Any, model: str, version: int) -> ModelVersion:
    row = s.scalar(select(ModelVersion).join(Model, Model.id == ModelVersion.model_id)
                   .where(Model.name == model, ModelVersion.version == version))
    if row is None:
        raise NotFoundError(f"version {version} of model {model!r} not found")
    return row


def save_artifact(registry: Registry, model: str, version: int, data: bytes, *, format: str,
                  meta: Mapping[str, Any] | None = None) -> None:
    """Store (or replace) the native model bytes of a version."""
    if not data:
        raise ValidationError("artifact: bytes are empty")
    with registry.transaction() as s:
        v = _version_row(s, model, version)
        row = s.get(ModelArtifact, v.id)
        digest = hashlib.sha256(data).hexdigest()
        if row is None:
            s.add(ModelArtifact(version_id=v.id, format=format, data=data, sha256=digest,
                                meta=dict(meta or {})))
        else:
            row.format, row.data, row.sha256, row.meta = format, data, digest, dict(meta or {})


def load_artifact(registry: Registry, model: str, version: int) -> Artifact | None:
    """The native bytes of a version, None when none were stored. A sha256 mismatch is an error."""
    with registry.session() as s:
        v = _version_row(s, model, version)
        row = s.get(ModelArtifact, v.id)
        if row is None:
            return None
        data = bytes(row.data)
        if hashlib.sha256(data).hexdigest() != row.sha256:
            raise ValidationError(f"artifact of {model} v{version}: stored bytes do not match their sha256")
        return Artifact(model, version, row.format, data, row.sha256, dict(row.meta or {}))


# ------------------------------------------------------------------------------------ feedback read
@dataclass(frozen=True)
class ServedRow:
    """One logged prediction that carries its scored features (and its outcome, when known)."""

    request_id: str
    version: int
    score: float
    created_at: datetime
    features: list[float]
    outcome: float | None


def served_rows(
    registry: Registry,
    model: str,
    *,
    since: datetime,
    until: datetime,
    versions: Sequence[int] | None = None,
    with_outcome: bool = False,
) -> list[ServedRow]:
    """Predictions of `model` logged in [since, until) that carry features, oldest first; with
    `with_outcome` only those with an outcome (inner join), otherwise outcome is None when unknown."""
    since_utc, until_utc = as_utc(since), as_utc(until)
    q = (select(Prediction.request_id, Prediction.version, Prediction.score, Prediction.created_at,
                Prediction.features, Outcome.value)
         .where(Prediction.model == model, Prediction.features.is_not(None),
                # Python None goes into a JSON column as the JSON text 'null', not SQL NULL.
                cast(Prediction.features, Text) != "null",
                *logged_between(registry.is_postgres, since_utc, before=until_utc))
         .order_by(Prediction.created_at, Prediction.id))
    if with_outcome:
        q = q.join(Outcome, outcome_of(registry.is_postgres, since_utc, until_utc))
    else:
        q = q.outerjoin(Outcome, outcome_of(registry.is_postgres, since_utc, until_utc))
    if versions is not None:
        q = q.where(Prediction.version.in_(list(versions)))
    with registry.session() as s:
        rows = s.execute(q).all()
    out = []
    for rid, version, score, created, features, value in rows:
        if not isinstance(features, list):  # JSON null stored by an old writer
            continue
        out.append(ServedRow(rid, int(version), float(score), as_utc(created), features,
                             None if value is None else float(value)))
    return out
