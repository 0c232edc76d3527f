"""The `Registry` class: models and versions, traffic splits and shadows with their audit, and the
prediction/outcome log writes. Callers get plain frozen dataclasses, never ORM objects, so nothing
outside this module holds a session open or lazily loads rows.

Over 400 lines because `Registry` is one class whose three sections share its session factory, its
dialect switches (pg_notify, ON CONFLICT) and the private `_model`/`_split` lookups, and `set_split`
writes splits, version statuses, the audit row and the decision row in one transaction; split into
mixins across files, those invariants would be read in three places. The read-side helpers that need
no such sharing already live beside it as functions over a Registry: `registry.rollouts` (arm rows,
decisions), `registry.training_runs`, `registry.loadtests`; locks are in `registry.locks`.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Select, event, func, select, text, union_all, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from chimera.jsonsafe import nan_to_none
from chimera.settings import RegistrySettings
from registry.engine import driver_url, make_engine, postgres_connect_args
from registry.errors import AlreadyExistsError, ConflictError, NotFoundError, ValidationError
from registry.models import Decision as DecisionRow
from registry.models import (
    Model,
    ModelVersion,
    Outcome,
    Prediction,
    ShadowPrediction,
    SplitAudit,
    TrafficSplit,
    outcome_key,
    outcome_of,
    prediction_key,
    shadow_key,
    utcnow,
)

METRICS = ("success_rate", "mean_outcome", "brier", "log_loss")
VERSION_STATUSES = ("staged", "canary", "production", "standby", "rolled_back", "failed", "archived")
SPLIT_CHANNEL = "chimera_split"
MAX_MODEL_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class VersionInfo:
    model: str
    version: int
    status: str
    sha256: str
    feature_names: tuple[str, ...]
    metrics: Mapping[str, Any]
    params: Mapping[str, Any]
    data_hash: str
    parent_version: int | None
    created_at: datetime
    size_bytes: int = 0


@dataclass(frozen=True)
class Split:
    model: str
    revision: int
    weights: Mapping[int, int]  # version -> percent, only versions with weight > 0
    shadow: int | None = None  # mirror version: scored and logged, never returned


@dataclass(frozen=True)
class ModelInfo:
    name: str
    metric: str
    description: str
    split: Split
    versions: tuple[VersionInfo, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class PredictionRow:
    request_id: str
    model: str
    version: int
    score: float
    latency_ms: float
    routing_key: str = ""
    created_at: datetime | None = None
    features: list[float] | None = None


RECENT_DAYS = 2  # outcome lookups on PostgreSQL try today's and yesterday's partitions first
# Registry._insert_outcomes on PostgreSQL; ON CONFLICT names models.outcome_key("postgresql").
OUTCOMES_FROM_ARRAYS = text(
    "INSERT INTO outcomes (request_id, value, created_at, day) SELECT * FROM unnest("
    "CAST(:ids AS varchar[]), CAST(:vals AS double precision[]), CAST(:times AS timestamptz[]), "
    "CAST(:days AS date[])) ON CONFLICT (request_id, day) DO NOTHING")


def by_request_ids(session: Session, query: Select[Any], ids: Sequence[str], postgres: bool) -> list[Any]:
    """`query`'s rows for the predictions with these request ids (`query` selects from predictions and
    its first column is the request id). On PostgreSQL, where the log has a table a day (migration
    0009), today's and yesterday's are looked in first and the others only for the ids not found there:
    a lookup by id alone probes every day's index, and most outcomes come within a day (measured, 500
    ids a query over 30 days: 33 us an outcome across all days, 4.3 us within the newest two;
    docs/performance.md). Late outcomes are still found, just at the slower cost."""
    if not postgres:
        return list(session.execute(query.where(Prediction.request_id.in_(ids))).all())
    since = utcnow().date() - timedelta(days=RECENT_DAYS - 1)
    rows = list(session.execute(query.where(Prediction.request_id.in_(ids), Prediction.day >= since)).all())
    rest = set(ids).difference(r[0] for r in rows)
    if rest:
        rows += session.execute(query.where(Prediction.request_id.in_(sorted(rest)),
                                            Prediction.day < since)).all()
    return rows


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Kept for the gateway's LISTEN connection (gateway.serving.split_watch), which connects on its own:
# connect timeout and TCP keepalives from the registry settings.
POSTGRES_CONNECT_ARGS = {k: v for k, v in postgres_connect_args(RegistrySettings.from_env()).items()
                         if k != "options"}


def _version_info(model_name: str, row: ModelVersion, size: int | None = None) -> VersionInfo:
    return VersionInfo(
        model=model_name,
        version=row.version,
        status=row.status,
        sha256=row.sha256,
        feature_names=tuple(row.feature_names),
        metrics=dict(row.metrics or {}),
        params=dict(row.params or {}),
        data_hash=row.data_hash,
        parent_version=row.parent_version,
        created_at=row.created_at,
        size_bytes=size or 0,
    )


def validate_weights(weights: Mapping[int, int], known_versions: Iterable[int]) -> dict[int, int]:
    """Reject a split that is not a distribution over known versions; messages name the field."""
    known = set(known_versions)
    if not weights:
        raise ValidationError("weights: a split needs at least one version")
    clean: dict[int, int] = {}
    for version, weight in weights.items():
        if version in clean:
            raise ValidationError(f"weights: version {version} appears twice")
        if version not in known:
            raise ValidationError(f"weights: version {version} does not exist")
        if not isinstance(weight, int) or isinstance(weight, bool):
            raise ValidationError(f"weights: weight of version {version} must be an integer")
        if weight < 0 or weight > 100:
            raise ValidationError(f"weights: weight of version {version} must be within 0..100, got {weight}")
        clean[version] = weight
    total = sum(clean.values())
    if total != 100:
        raise ValidationError(f"weights: weights must sum to 100, got {total}")
    return {v: w for v, w in clean.items() if w > 0}


class Registry:
    """All registry access goes through here; one instance per process, thread-safe (one session
    per call)."""

    def __init__(self, url: str, engine: Engine | None = None) -> None:
        self.url = driver_url(url)
        self.engine = engine or make_engine(self.url)
        self._pooled_sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._bound = threading.local()

    def session(self) -> Session:
        """A read session (`with registry.session() as s:`); nothing it does is committed."""
        return self._sessions()

    def transaction(self) -> AbstractContextManager[Session]:
        """A session inside one transaction (`with registry.transaction() as s:`): committed when
        the block ends, rolled back if it raises. The one way to write outside this class."""
        return self._sessions.begin()

    @property
    def _sessions(self) -> sessionmaker[Session]:
        """The calling thread's session factory: the engine's pool, or the connection `bound_to` set."""
        return getattr(self._bound, "sessions", None) or self._pooled_sessions

    @contextmanager
    def bound_to(self, conn: Connection,
                 before_commit: Callable[[Session], None] | None = None) -> Iterator[None]:
        """For the calling thread only, run every session of this registry on `conn`, with
        `before_commit(session)` run inside each write transaction just before it commits (raising there
        rolls it back). Other threads keep using the pool. What registry.locks.fenced_lock uses so the
        work done under a lock is done on the lock's own connection and cannot commit without it."""
        sessions = sessionmaker(bind=conn, expire_on_commit=False)
        if before_commit is not None:
            event.listen(sessions, "before_commit", before_commit)
        previous = getattr(self._bound, "sessions", None)
        self._bound.sessions = sessions
        try:
            yield
        finally:
            self._bound.sessions = previous

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def upgrade(self) -> None:
        """Apply Alembic migrations up to head (what `chimera db upgrade` runs)."""
        from registry.migrate import upgrade

        upgrade(self.url, self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    # ---------------------------------------------------------------- models and versions
    def _model(self, s: Session, name: str) -> Model:
        model = s.scalar(select(Model).where(Model.name == name))
        if model is None:
            raise NotFoundError(f"model {name!r} not found")
        return model

    def publish_version(
        self,
        model: str,
        onnx_bytes: bytes,
        feature_names: Sequence[str],
        *,
        metrics: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        data_hash: str = "",
        parent_version: int | None = None,
        status: str = "staged",
        metric: str = "success_rate",
    ) -> VersionInfo:
        """Store a new version (next number for the model); creates the model on first publish."""
        if not onnx_bytes:
            raise ValidationError("onnx: model bytes are empty")
        if len(onnx_bytes) > MAX_MODEL_BYTES:
            raise ValidationError(f"onnx: model is {len(onnx_bytes)} bytes, limit {MAX_MODEL_BYTES}")
        names = list(feature_names)
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValidationError("feature_names: must be non-empty, unique, non-empty strings")
        if status not in VERSION_STATUSES:
            raise ValidationError(f"status: unknown status {status!r}")
        # Numbers as floats, NaN/inf as None: what the column stores (FiniteJSON), so the VersionInfo
        # returned here says the same as a later get_version.
        clean_metrics = nan_to_none({k: (float(v) if isinstance(v, int | float) else v)
                                     for k, v in (metrics or {}).items()})
        with self._sessions.begin() as s:
            m = s.scalar(select(Model).where(Model.name == model))
            if m is None:
                if metric not in METRICS:
                    raise ValidationError(f"metric: must be one of {', '.join(METRICS)}")
                m = Model(name=model, metric=metric, description="", split_revision=0, rollout_config={})
                s.add(m)
                s.flush()
            # Lock the model row so two publishers cannot take the same number (no-op on SQLite,
            # whose writers are serialised anyway).
            s.execute(select(Model.id).where(Model.id == m.id).with_for_update())
            last = s.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.model_id == m.id))
            row = ModelVersion(
                model_id=m.id,
                version=(last or 0) + 1,
                status=status,
                onnx=onnx_bytes,
                sha256=sha256_hex(onnx_bytes),
                feature_names=names,
                metrics=clean_metrics,
                params=dict(params or {}),
                data_hash=data_hash,
                parent_version=parent_version,
            )
            s.add(row)
            s.flush()
            if self.is_postgres:  # gateways load the new version's schema without waiting for a poll
                s.execute(text("SELECT pg_notify(:ch, :model)"), {"ch": SPLIT_CHANNEL, "model": model})
            return _version_info(model, row, len(onnx_bytes))

    def get_version(self, model: str, version: int) -> VersionInfo:
        with self._sessions() as s:
            m = self._model(s, model)
            row = s.scalar(select(ModelVersion).where(ModelVersion.model_id == m.id,
                                                      ModelVersion.version == version))
            if row is None:
                raise NotFoundError(f"version {version} of model {model!r} not found")
            return _version_info(model, row, len(row.onnx))

    def get_onnx(self, model: str, version: int) -> tuple[bytes, str]:
        """The stored bytes and the sha256 recorded at publish time (verify before trusting)."""
        with self._sessions() as s:
            m = self._model(s, model)
            row = s.execute(select(ModelVersion.onnx, ModelVersion.sha256).where(
                ModelVersion.model_id == m.id, ModelVersion.version == version)).first()
            if row is None:
                raise NotFoundError(f"version {version} of model {model!r} not found")
            return bytes(row[0]), row[1]

    def list_versions(self, model: str) -> list[VersionInfo]:
        with self._sessions() as s:
            m = self._model(s, model)
            rows = s.scalars(select(ModelVersion).where(ModelVersion.model_id == m.id)
                             .order_by(ModelVersion.version)).all()
            return [_version_info(model, r, len(r.onnx)) for r in rows]

    def set_version_status(self, model: str, version: int, status: str) -> None:
        if status not in VERSION_STATUSES:
            raise ValidationError(f"status: unknown status {status!r}")
        with self._sessions.begin() as s:
            m = self._model(s, model)
            res = s.execute(update(ModelVersion).where(ModelVersion.model_id == m.id,
                                                       ModelVersion.version == version)
                            .values(status=status))
            if res.rowcount == 0:
                raise NotFoundError(f"version {version} of model {model!r} not found")

    def rollout_config(self, model: str) -> dict[str, Any]:
        with self._sessions() as s:
            return dict(self._model(s, model).rollout_config or {})

    def set_rollout_config(self, model: str, config: Mapping[str, Any]) -> None:
        """Per-model rollout policy overrides (steps, alpha, min_samples_per_arm, tau, guardrails)."""
        with self._sessions.begin() as s:
            self._model(s, model).rollout_config = dict(config)

    def model_names(self) -> list[str]:
        with self._sessions() as s:
            return list(s.scalars(select(Model.name).order_by(Model.name)))

    def get_model(self, name: str) -> ModelInfo:
        with self._sessions() as s:
            m = self._model(s, name)
            rows = s.scalars(select(ModelVersion).where(ModelVersion.model_id == m.id)
                             .order_by(ModelVersion.version)).all()
            return ModelInfo(
                name=m.name,
                metric=m.metric,
                description=m.description,
                split=self._split(s, m),
                versions=tuple(_version_info(m.name, r, len(r.onnx)) for r in rows),
            )

    def list_models(self) -> list[ModelInfo]:
        return [self.get_model(n) for n in self.model_names()]

    # ---------------------------------------------------------------- traffic splits
    def _split(self, s: Session, m: Model) -> Split:
        rows = s.execute(select(TrafficSplit.version, TrafficSplit.weight)
                         .where(TrafficSplit.model_id == m.id).order_by(TrafficSplit.version)).all()
        return Split(model=m.name, revision=m.split_revision, weights={v: w for v, w in rows if w > 0},
                     shadow=m.shadow_version)

    def get_split(self, model: str) -> Split:
        with self._sessions() as s:
            return self._split(s, self._model(s, model))

    def split_revisions(self) -> dict[str, tuple[int, int]]:
        """Cheap poll target: per model (split revision, newest version number), so a gateway sees a
        split change and a newly published version (whose schema it needs for pinned calls)."""
        with self._sessions() as s:
            q = (select(Model.name, Model.split_revision, func.max(ModelVersion.version))
                 .join(ModelVersion, ModelVersion.model_id == Model.id, isouter=True)
                 .group_by(Model.name, Model.split_revision))
            return {name: (int(rev), int(last or 0)) for name, rev, last in s.execute(q).tuples().all()}

    def _claim_revision(self, s: Session, m: Model, expected_revision: int | None) -> Split:
        """Take the next split revision of `m` inside `s`'s transaction, before reading anything else,
        and return the split as it was just before (the state this change replaces).

        The conditional UPDATE comes first on purpose: it takes the model row's write lock (PostgreSQL
        row lock; SQLite's database write lock), so every split change of a model is serialised, two
        states can never share a revision, and the `old` state in the audit row is the state actually
        replaced rather than one read before a concurrent writer committed. With an expected revision
        a stale caller changes nothing and gets ConflictError (gRPC ABORTED); `None` is the forced
        form (the operator's explicit override): still serialised and audited, never a lost revision."""
        cond = [Model.id == m.id]
        if expected_revision is not None:
            cond.append(Model.split_revision == expected_revision)
        res = s.execute(update(Model).where(*cond).values(split_revision=Model.split_revision + 1)
                        .execution_options(synchronize_session=False))
        if res.rowcount != 1:
            now = s.scalar(select(Model.split_revision).where(Model.id == m.id))
            raise ConflictError(
                f"expected_revision: split of {m.name!r} changed since revision {expected_revision} "
                f"(now {now}); read it again")
        revision, shadow = s.execute(select(Model.split_revision, Model.shadow_version)
                                     .where(Model.id == m.id)).one()
        rows = s.execute(select(TrafficSplit.version, TrafficSplit.weight)
                         .where(TrafficSplit.model_id == m.id).order_by(TrafficSplit.version)).all()
        return Split(model=m.name, revision=int(revision) - 1, weights={v: w for v, w in rows if w > 0},
                     shadow=shadow)

    def set_split(
        self,
        model: str,
        weights: Mapping[int, int],
        *,
        expected_revision: int | None,
        actor: str,
        reason: str = "",
        forced: bool = False,
        status_changes: Mapping[int, str] | None = None,
        decision: Mapping[str, Any] | None = None,
    ) -> Split:
        """Replace the split atomically. A stale expected_revision raises ConflictError and changes
        nothing; expected_revision=None is the forced override (SetTrafficSplit with force), still
        serialised with every other split change (see _claim_revision). Operator and controller paths
        pass the revision they read. Version status changes and the decision row that caused the
        change commit in the same transaction, so a crash leaves either the old state or the new one."""
        for status in (status_changes or {}).values():
            if status not in VERSION_STATUSES:
                raise ValidationError(f"status: unknown status {status!r}")
        with self._sessions.begin() as s:
            m = self._model(s, model)
            known = s.scalars(select(ModelVersion.version).where(ModelVersion.model_id == m.id)).all()
            new = validate_weights(weights, known)
            old = self._claim_revision(s, m, expected_revision)
            s.execute(TrafficSplit.__table__.delete().where(TrafficSplit.model_id == m.id))
            for version, weight in new.items():
                s.add(TrafficSplit(model_id=m.id, version=version, weight=weight))
            s.add(SplitAudit(model=model, actor=actor, reason=reason, forced=forced,
                             old={str(k): v for k, v in old.weights.items()},
                             new={str(k): v for k, v in new.items()}, revision=old.revision + 1))
            for version, status in (status_changes or {}).items():
                s.execute(update(ModelVersion).where(ModelVersion.model_id == m.id,
                                                     ModelVersion.version == version).values(status=status))
            if decision is not None:
                s.add(DecisionRow(**decision))
            if self.is_postgres:
                # Delivered at commit to every gateway LISTENing: split changes spread in milliseconds.
                s.execute(text("SELECT pg_notify(:ch, :model)"), {"ch": SPLIT_CHANNEL, "model": model})
            return Split(model=model, revision=old.revision + 1, weights=new, shadow=old.shadow)

    def set_shadow(self, model: str, version: int | None, *, actor: str, reason: str = "",
                   expected_revision: int | None = None) -> Split:
        """Mirror `version` on the model's live traffic (None: stop). Bumps the split revision so
        every gateway picks it up like a split change, and is audited like one.

        The shadow is set on whatever weights are current when this commits: the revision is claimed
        first (_claim_revision), so a concurrent SetTrafficSplit is either wholly before or wholly after
        this change and neither is lost. Pass expected_revision to refuse a split that moved since it
        was read (ConflictError)."""
        with self._sessions.begin() as s:
            m = self._model(s, model)
            if version is not None:
                known = set(s.scalars(select(ModelVersion.version).where(ModelVersion.model_id == m.id)))
                if version not in known:
                    raise ValidationError(f"version: model {model!r} has no version {version}")
            old = self._claim_revision(s, m, expected_revision)
            s.execute(update(Model).where(Model.id == m.id).values(shadow_version=version)
                      .execution_options(synchronize_session=False))
            weights = {str(k): v for k, v in old.weights.items()}
            s.add(SplitAudit(model=model, actor=actor, reason=reason or f"shadow -> {version}", forced=False,
                             old={**weights, "shadow": old.shadow or 0},
                             new={**weights, "shadow": version or 0}, revision=old.revision + 1))
            if self.is_postgres:
                s.execute(text("SELECT pg_notify(:ch, :model)"), {"ch": SPLIT_CHANNEL, "model": model})
            return Split(model=model, revision=old.revision + 1, weights=old.weights, shadow=version)

    def insert_shadow_predictions(self, rows: Sequence[PredictionRow]) -> int:
        """Like insert_predictions, for mirror scores (paired with the served row and its outcome by the
        shadow stage, registry.shadow_eval)."""
        if not rows:
            return 0
        dialect_insert = postgresql.insert if self.is_postgres else sqlite.insert
        values = [{"request_id": r.request_id, "model": r.model, "version": r.version, "score": r.score,
                   "latency_ms": r.latency_ms, "created_at": r.created_at or utcnow()} for r in rows]
        with self._sessions.begin() as s:
            s.execute(dialect_insert(ShadowPrediction).on_conflict_do_nothing(
                index_elements=shadow_key(self.engine.dialect.name)), values)
        return len(values)

    def count_shadow_predictions(self, model: str) -> dict[int, int]:
        with self._sessions() as s:
            q = (select(ShadowPrediction.version, func.count()).where(ShadowPrediction.model == model)
                 .group_by(ShadowPrediction.version))
            return dict(s.execute(q).tuples().all())

    def audit_log(self, model: str) -> list[dict[str, Any]]:
        with self._sessions() as s:
            rows = s.scalars(select(SplitAudit).where(SplitAudit.model == model).order_by(SplitAudit.id))
            return [{"actor": r.actor, "reason": r.reason, "old": r.old, "new": r.new,
                     "revision": r.revision, "forced": r.forced, "at": r.created_at} for r in rows]

    # ---------------------------------------------------------------- predictions and outcomes
    def insert_predictions(self, rows: Sequence[PredictionRow]) -> int:
        """Batched insert (one statement, executemany / multi-row VALUES). A request id that is
        already stored is skipped, so replaying a spill file cannot duplicate rows."""
        if not rows:
            return 0
        dialect_insert = postgresql.insert if self.is_postgres else sqlite.insert
        values = [{"request_id": r.request_id, "model": r.model, "version": r.version,
                   "routing_key": r.routing_key, "score": r.score, "latency_ms": r.latency_ms,
                   "features": r.features, "created_at": r.created_at or utcnow()} for r in rows]
        stmt = dialect_insert(Prediction).on_conflict_do_nothing(
            index_elements=prediction_key(self.engine.dialect.name))
        with self._sessions.begin() as s:
            s.execute(stmt, values)
        return len(values)

    def get_prediction(self, request_id: str) -> PredictionRow:
        with self._sessions() as s:
            r = s.scalar(select(Prediction).where(Prediction.request_id == request_id))
            if r is None:
                raise NotFoundError(f"request_id: no prediction with id {request_id!r}")
            return PredictionRow(request_id=r.request_id, model=r.model, version=r.version, score=r.score,
                                 latency_ms=r.latency_ms, routing_key=r.routing_key, created_at=r.created_at)

    def record_outcome(self, request_id: str, value: float) -> bool:
        """Store an outcome. True when stored now, False when the same value was already stored;
        a different value raises AlreadyExistsError, an unknown request id NotFoundError."""
        if not request_id:
            raise ValidationError("request_id: required")
        if not math.isfinite(value):
            raise ValidationError(f"value: must be finite, got {value}")
        dialect_insert = postgresql.insert if self.is_postgres else sqlite.insert
        with self._sessions.begin() as s:
            day_of = self._outcome_days(s, [request_id])
            if request_id not in day_of:
                raise NotFoundError(f"request_id: no prediction with id {request_id!r}")
            # Insert first, read only on a conflict: the (request id, day) key is the outcome's identity.
            res = s.execute(dialect_insert(Outcome)
                            .values(request_id=request_id, value=value, day=day_of[request_id])
                            .on_conflict_do_nothing(index_elements=outcome_key(self.engine.dialect.name)))
            if res.rowcount == 1:
                return True
            stored = self._stored_outcomes(s, day_of)
        prior = stored.get(request_id)
        if prior is not None and prior == value:
            return False
        raise AlreadyExistsError(
            f"value: outcome for request_id {request_id!r} already stored as {prior}, got {value}")

    def _outcome_days(self, s: Session, ids: Sequence[str]) -> dict[str, date]:
        """For these request ids, the day each one's outcome is stored under: that of the newest prediction
        logged with it (models.Outcome says why; an id with no prediction is left out). One outcome a
        prediction: where a request id was logged again on a later day (PostgreSQL, README "Failure
        modes"), the later prediction is the one an outcome reports on."""
        day_of: dict[str, date] = {}
        for i in range(0, len(ids), 5000):
            for rid, day in by_request_ids(s, select(Prediction.request_id, Prediction.day), ids[i:i + 5000],
                                           self.is_postgres):
                day_of[rid] = max(day, day_of.get(rid, day))
        return day_of

    def _stored_outcomes(self, s: Session, day_of: Mapping[str, date]) -> dict[str, float]:
        """The values of the outcomes already stored for these predictions (request id -> its day, from
        `_outcome_days`), read day by day in one statement: on PostgreSQL each branch probes one day's
        table for that day's ids only, where one read for all the ids probed every one of their days'
        tables for every id (docs/performance.md, "Time partitioning", point 7)."""
        values: dict[str, float] = {}
        items = list(day_of.items())
        for i in range(0, len(items), 5000):
            by_day: dict[date, list[str]] = {}
            for rid, day in items[i:i + 5000]:
                by_day.setdefault(day, []).append(rid)
            reads = [select(Outcome.request_id, Outcome.value).where(Outcome.day == day,
                                                                      Outcome.request_id.in_(rids))
                     for day, rids in sorted(by_day.items())]
            values.update(s.execute(union_all(*reads) if len(reads) > 1 else reads[0]).tuples().all())
        return values

    def record_outcomes(self, items: Sequence[tuple[str, float]]) -> list[BaseException | None]:
        """Bulk form of record_outcome in one transaction: per item None (stored or already stored
        with the same value) or the error it would have raised."""
        results: list[BaseException | None] = [None] * len(items)
        ids = list({rid for rid, _ in items if rid})
        with self._sessions.begin() as s:
            day_of = self._outcome_days(s, ids)
            stored = self._stored_outcomes(s, day_of)
            new: dict[str, float] = {}
            for i, (rid, value) in enumerate(items):
                if not rid:
                    results[i] = ValidationError(f"outcomes[{i}].request_id: required")
                elif not math.isfinite(value):
                    results[i] = ValidationError(f"outcomes[{i}].value: must be finite, got {value}")
                elif rid not in day_of:
                    results[i] = NotFoundError(f"outcomes[{i}].request_id: no prediction with id {rid!r}")
                else:
                    prior = stored.get(rid, new.get(rid))
                    if prior is None:
                        new[rid] = value
                    elif prior != value:
                        results[i] = AlreadyExistsError(
                            f"outcomes[{i}].value: outcome for {rid!r} already stored as {prior}, "
                            f"got {value}")
            if new:
                self._insert_outcomes(s, new, day_of)
        return results

    def _insert_outcomes(self, s: Session, new: Mapping[str, float], day_of: Mapping[str, date]) -> None:
        """Store `new` (request id -> value, none stored yet) under their days, skipping one stored
        meanwhile by another call. PostgreSQL: one statement over four arrays. A list of parameter sets
        would go to psycopg2's executemany, a round trip a row (~75 % of a 500-outcome call, profiled),
        and a many-row VALUES costs SQLAlchemy ~75 us an outcome to compile (profiled): the array
        statement is compiled once. SQLite: executemany, which runs in-process."""
        now = utcnow()
        if self.is_postgres:
            s.execute(OUTCOMES_FROM_ARRAYS, {"ids": list(new), "vals": list(new.values()),
                                             "times": [now] * len(new), "days": [day_of[k] for k in new]})
            return
        s.execute(sqlite.insert(Outcome).on_conflict_do_nothing(index_elements=outcome_key("sqlite")),
                  [{"request_id": k, "value": v, "created_at": now, "day": day_of[k]}
                   for k, v in new.items()])

    def count_predictions(self, model: str | None = None) -> dict[int, int]:
        """Prediction rows per version (for one model, or all)."""
        with self._sessions() as s:
            q = select(Prediction.version, func.count()).group_by(Prediction.version)
            if model is not None:
                q = q.where(Prediction.model == model)
            return dict(s.execute(q).tuples().all())

    def outcome_means(self, model: str) -> dict[int, tuple[int, float]]:
        """Per version: (number of outcomes, mean outcome), each outcome with its prediction."""
        with self._sessions() as s:
            q = (select(Prediction.version, func.count(), func.avg(Outcome.value))
                 .join(Outcome, outcome_of(self.is_postgres))
                 .where(Prediction.model == model).group_by(Prediction.version))
            return {v: (int(n), float(mean)) for v, n, mean in s.execute(q).tuples().all()}
