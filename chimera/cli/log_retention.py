"""Retention of the prediction log (`chimera log prune`, chimera/cli/log.py): which models have rows,
what a prune would delete (count_rows, for --dry-run) and the prune itself (prune_rows).

Four tables grow with traffic, and prune bounds all four:
- predictions, request_errors and shadow_predictions (mirror scores: a shadow version's, a canary's
  production covariate): model by model, rows created before the cutoff, through their (model,
  created_at) indexes (migrations 0006, 0005, 0010). On PostgreSQL, where all three are partitioned by
  day (migrations 0009, 0011), pruning every model first drops the whole day partitions before the
  cutoff's day (registry.partitions.drop_partitions_before: the same cost for a million rows as for ten,
  reported with the planner's estimate of their rows, never counted by a scan); the batches then take the
  rest (the cutoff's own day, each table's DEFAULT partition, one --model).
- outcomes: rows created before the cutoff whose prediction (same request id and day) is no longer
  stored (NOT EXISTS, by predictions' (request_id, day) key; the outcomes side by created_at, migration
  0010). An outcome whose prediction is still stored is never deleted, however old: the rollout's
  decisions and `chimera analyze` join outcomes to stored predictions, and deleting one would change what
  they compute. On PostgreSQL outcomes are partitioned by their prediction's day (migration 0012), so
  the whole days dropped with the predictions' take their outcomes too, late ones included; the batches
  take the rest. Outcomes carry no model, so they are pruned only when prune runs for every model; with
  a model (--model) they are left as they are.
Every delete goes in batches of `batch` rows, each batch its own short transaction, so the gateway's
inserts and the controller's reads never wait behind one huge delete. Pruned rows can no longer be
recomputed by `chimera analyze`: export first (`chimera log export`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from registry import Registry


def log_models(reg: Registry) -> list[str]:
    """Every model with rows in predictions, request_errors or shadow_predictions (a model that only
    mirrors has shadow rows alone), each table read by a loose index scan over its (model, ...) index."""
    from registry.models import Prediction, RequestError, ShadowPrediction

    with reg.session() as s:
        found = {m for table in (Prediction, RequestError, ShadowPrediction) for m in _models_in(s, table)}
    return sorted(found)


def _models_in(s: Session, table: Any) -> list[str]:
    """The distinct models of `table` by a loose index scan over an index that starts with model: one
    index probe per model (WITH RECURSIVE: min(model), then min(model) > the previous one) instead of
    reading the table, which SELECT DISTINCT would do on PostgreSQL."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import aliased

    nxt = aliased(table)
    m = select(func.min(table.model).label("model")).cte("m", recursive=True)
    m = m.union_all(select(select(func.min(nxt.model)).where(nxt.model > m.c.model).scalar_subquery())
                    .where(m.c.model.is_not(None)))
    return list(s.scalars(select(m.c.model).where(m.c.model.is_not(None))))


def count_rows(reg: Registry, cutoff: datetime, *, model: str | None = None) -> dict[str, Any]:
    """What prune_rows(reg, cutoff, model=model) would do now, deleting nothing: "partitions", the
    (name, planner's estimate or None) of each whole partition it would drop first (PostgreSQL, every
    model; registry.partitions.old_partitions, no scan), and the exact rows its batches would delete:
    "predictions", "request_errors" and "shadow_predictions" (so not the rows of those partitions), and
    "outcomes" (every model only: those created before the cutoff whose prediction is not one created at
    or after it, which is what stays once the predictions are pruned, outside the outcome partitions
    dropped; 0 with a model)."""
    from sqlalchemy import func, select

    from registry.models import Prediction, RequestError, ShadowPrediction, as_utc, logged_between
    from registry.partitions import OUTCOMES_PARENT, old_partitions

    old_parts = old_partitions(reg, as_utc(cutoff).date()) if model is None else []
    # Per table, the first day of the partitions that stay: the highest upper bound among those dropped
    # (no partition that stays but DEFAULT holds an earlier day: ranges do not overlap); None: none dropped.
    kept_from: dict[str, date] = {}
    for parent, p, _rows in old_parts:
        if p.upper is not None:
            kept_from[parent] = max(p.upper, kept_from.get(parent, p.upper))
    out: dict[str, Any] = {"predictions": 0, "request_errors": 0, "shadow_predictions": 0, "outcomes": 0,
                           "partitions": [(p.name, rows) for _parent, p, rows in old_parts]}
    with reg.session() as s:
        for m in [model] if model else log_models(reg):
            for table in (Prediction, RequestError, ShadowPrediction):
                key = table.__tablename__
                old = [table.model == m, *logged_between(reg.is_postgres, before=cutoff, table=table)]
                first = kept_from.get(key)
                if first is not None:  # rows of the partitions that stay; DEFAULT's older days apart
                    old.append(table.day >= first)
                    out[key] += _older_in_default(s, key, m, first)
                out[key] += int(s.scalar(select(func.count()).select_from(table).where(*old)) or 0)
        if model is None:
            out["outcomes"] = _old_outcomes(s, reg.is_postgres, cutoff, kept_from.get(OUTCOMES_PARENT))
    return out


def _old_outcomes(s: Session, postgres: bool, cutoff: datetime, first: date | None) -> int:
    """The outcomes prune's batches would delete: created before `cutoff`, their prediction not one
    created at or after it; with `first` (PostgreSQL, outcome days before it dropped as partitions) only
    those of the days that stay, and those of earlier days in the DEFAULT partition."""
    from sqlalchemy import Date, DateTime, String, column, func, select, table

    from registry.models import Outcome, logged_between
    from registry.partitions import OUTCOMES_PARENT, default_partition

    def old(t: Any) -> list[Any]:  # prune_rows' batch, its predictions those that stay after the prune
        where, narrow = _outcome_batch(t, postgres, cutoff, *logged_between(postgres, cutoff))
        return [*where, *narrow]

    if first is None:
        return int(s.scalar(select(func.count()).select_from(Outcome).where(*old(Outcome))) or 0)
    default = table(default_partition(OUTCOMES_PARENT), column("request_id", String), column("day", Date),
                    column("created_at", DateTime(timezone=True)))
    stays = s.scalar(select(func.count()).select_from(Outcome).where(*old(Outcome), Outcome.day >= first))
    in_default = s.scalar(select(func.count()).select_from(default).where(*old(default.c),
                                                                          default.c.day < first))
    return int(stays or 0) + int(in_default or 0)


def _outcome_batch(t: Any, postgres: bool, cutoff: datetime, *kept: Any) -> tuple[list[Any], list[Any]]:
    """The rule of prune's outcome batches, for `t` (outcomes or its DEFAULT partition): (where, narrow).
    where: created before `cutoff`, and no stored prediction with the same request id and day (`kept`:
    more conditions on that prediction); narrow (PostgreSQL): an outcome created before the cutoff
    reports on a prediction of that day or earlier (its day), so only those days' partitions are read."""
    from sqlalchemy import exists

    from registry.models import Prediction, as_utc

    stored = exists().where(Prediction.request_id == t.request_id, Prediction.day == t.day, *kept)
    return [t.created_at < cutoff, ~stored], [t.day <= as_utc(cutoff).date()] if postgres else []


def _older_in_default(s: Session, parent: str, model: str, before: date) -> int:
    """PostgreSQL: `model`'s rows in `parent`'s DEFAULT partition of days before `before` (days that had
    no table of their own; the batches delete them)."""
    from sqlalchemy import Date, String, column, func, select, table

    from registry.partitions import default_partition

    default = table(default_partition(parent), column("model", String), column("day", Date))
    return int(s.scalar(select(func.count()).select_from(default).where(
        default.c.model == model, default.c.day < before)) or 0)


def prune_rows(reg: Registry, cutoff: datetime, *, model: str | None = None,
               batch: int = 10_000) -> dict[str, Any]:
    """Delete rows created before `cutoff`, `batch` rows per transaction (the module docstring says which
    rows of which table). Returns the rows the batches deleted per table ("predictions",
    "request_errors", "shadow_predictions", "outcomes": exact; "outcomes" is 0 with a `model`: an outcome
    carries no model, and one whose prediction is still stored is never deleted), "partitions_dropped":
    name -> the planner's estimate of its rows (None: not estimated) of each whole partition dropped
    first (PostgreSQL, every model; {} otherwise), and "partition_rows_estimate": the sum of the known
    estimates (registry.partitions.drop_partitions_before says why they are not counted). A partition
    that could not be dropped in time raises registry.errors.PartitionError before any row is deleted
    (those dropped before it stay dropped)."""

    from registry.models import Outcome, Prediction, RequestError, ShadowPrediction, as_utc, logged_between
    from registry.partitions import drop_partitions_before

    out: dict[str, Any] = {"predictions": 0, "request_errors": 0, "shadow_predictions": 0, "outcomes": 0,
                           "partitions_dropped": {}, "partition_rows_estimate": 0}
    if model is None:  # each of these holds only days before the cutoff's UTC day: all older than cutoff
        dropped = drop_partitions_before(reg, as_utc(cutoff).date())
        out["partitions_dropped"] = dropped
        out["partition_rows_estimate"] = sum(rows for rows in dropped.values() if rows is not None)
    for m in [model] if model else log_models(reg):
        for table in (Prediction, RequestError, ShadowPrediction):
            out[table.__tablename__] += _delete_batches(
                reg, table, table.id, batch, table.model == m,
                narrow=logged_between(reg.is_postgres, before=cutoff, table=table))
    if model is None:  # after every model's predictions: an outcome of a pruned prediction has none left
        where, narrow = _outcome_batch(Outcome, reg.is_postgres, cutoff)
        out["outcomes"] = _delete_batches(reg, Outcome, (Outcome.request_id, Outcome.day), batch, *where,
                                          narrow=narrow)
    return out


def _delete_batches(reg: Registry, table: Any, key: Any, batch: int, *where: Any,
                    narrow: Sequence[Any] = ()) -> int:
    """Delete the rows of `table` matching `where` and `narrow`, `batch` rows (picked by their `key`, a
    column or a tuple of columns) per transaction, until a batch finds fewer; returns the rows deleted.
    The DELETE itself repeats `narrow` (predictions' day range, registry.models.logged_between): a DELETE
    on a partitioned table is planned against only the partitions its own conditions allow, so without
    it every batch would probe every day's table for the keys the batch picked. Outcomes are keyed by
    (request_id, day): on PostgreSQL a request id logged again on a later day has an outcome a day, and
    only the batch's own may go."""
    from sqlalchemy import delete, select, tuple_

    cols = key if isinstance(key, tuple) else (key,)
    picked = cols[0] if len(cols) == 1 else tuple_(*cols)
    deleted = 0
    while True:
        keys = select(*cols).where(*where, *narrow).limit(batch)
        with reg.transaction() as s:
            n = s.execute(delete(table).where(picked.in_(keys), *narrow)).rowcount
        deleted += n
        if n < batch:
            return deleted
