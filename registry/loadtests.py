"""Load-test runs stored against a model version, and the promotion precondition built on them.

A release engineer proves a version holds its latency SLO at the expected load (`chimera loadtest
--version V ...`); every run, passing or failing, lands in `load_tests`. Promotion (manual or by the
rollout controller) then calls `require_passing_loadtest`, which refuses unless a *passing* run for
exactly that version is recent enough.

Why a new `PreconditionFailed` rather than `ValidationError`: the caller's request is well-formed; the
world is not ready yet (no recent passing run). gRPC has a code for exactly that, FAILED_PRECONDITION,
whereas ValidationError maps to INVALID_ARGUMENT and would tell a client to fix its request.
It derives from RegistryError so existing `except RegistryError` handlers still catch it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from registry.errors import PreconditionFailed, ValidationError
from registry.models import LoadTestRun, as_utc, utcnow
from registry.repository import Registry

ROUTED = 0  # `version` of a run whose traffic was routed across several versions (PredictRequest.version 0)


@dataclass(frozen=True)
class LoadTestRecord:
    id: int
    model: str
    version: int
    target: str
    passed: bool
    failures: tuple[str, ...]
    slo: Mapping[str, Any]
    report: Mapping[str, Any]
    created_at: datetime

    @property
    def target_rps(self) -> float | None:
        v = self.report.get("target_rps")
        return float(v) if isinstance(v, int | float) else None


def _record(row: LoadTestRun) -> LoadTestRecord:
    return LoadTestRecord(id=row.id, model=row.model, version=row.version, target=row.target,
                          passed=bool(row.passed), failures=tuple(row.failures or ()),
                          slo=dict(row.slo or {}), report=dict(row.report or {}),
                          created_at=as_utc(row.created_at))


def record_load_test(registry: Registry, model: str, version: int, *, target: str, passed: bool,
                     failures: Sequence[str] = (), slo: Mapping[str, Any] | None = None,
                     report: Mapping[str, Any] | None = None,
                     created_at: datetime | None = None) -> LoadTestRecord:
    """Store one run. `version` must exist (or be ROUTED = 0 for a mixed, routed run of an existing
    model), so a typo cannot create a record nothing will ever match. A failing run must say why."""
    if version < 0:
        raise ValidationError(f"version: must be >= 0, got {version}")
    if not passed and not failures:
        raise ValidationError("failures: a failing run must name at least one failed SLO")
    if version == ROUTED:
        registry.get_model(model)  # NotFoundError for an unknown model
    else:
        registry.get_version(model, version)  # NotFoundError for an unknown version
    row = LoadTestRun(model=model, version=version, target=target[:256], passed=passed,
                      failures=list(failures), slo=dict(slo or {}), report=dict(report or {}),
                      created_at=created_at or utcnow())
    with registry.transaction() as s:
        s.add(row)
        s.flush()
        return _record(row)


def list_load_tests(registry: Registry, model: str, version: int | None = None, *,
                    limit: int = 50) -> list[LoadTestRecord]:
    """Most recent first."""
    q = select(LoadTestRun).where(LoadTestRun.model == model)
    if version is not None:
        q = q.where(LoadTestRun.version == version)
    q = q.order_by(LoadTestRun.created_at.desc(), LoadTestRun.id.desc()).limit(limit)
    with registry.session() as s:
        return [_record(r) for r in s.scalars(q)]


def latest_passing_load_test(registry: Registry, model: str, version: int,
                             max_age: timedelta | None = None, *, now: datetime | None = None,
                             min_rps: float | None = None) -> LoadTestRecord | None:
    """The newest passing run of (model, version) no older than max_age (None: any age) whose target
    rate was at least min_rps (None: any rate)."""
    now = as_utc(now or utcnow())
    q = select(LoadTestRun).where(LoadTestRun.model == model, LoadTestRun.version == version,
                                  LoadTestRun.passed.is_(True))
    if max_age is not None:
        q = q.where(LoadTestRun.created_at >= now - max_age)
    q = q.order_by(LoadTestRun.created_at.desc(), LoadTestRun.id.desc())
    with registry.session() as s:
        for row in s.scalars(q):
            rec = _record(row)
            if max_age is not None and now - rec.created_at > max_age:  # belt and braces across backends
                continue
            if min_rps is not None and (rec.target_rps or 0.0) < min_rps:
                continue
            return rec
    return None


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def require_passing_loadtest(registry: Registry, model: str, version: int, max_age: timedelta, *,
                             now: datetime | None = None, min_rps: float | None = None) -> LoadTestRecord:
    """The passing run that allows promoting (model, version); PreconditionFailed naming what is
    missing (no run, only failing runs, or only stale ones) otherwise."""
    if version < 1:
        raise ValidationError(f"version: must be >= 1, got {version}")
    if max_age <= timedelta(0):
        raise ValidationError(f"max_age: must be positive, got {max_age}")
    now = as_utc(now or utcnow())
    found = latest_passing_load_test(registry, model, version, max_age, now=now, min_rps=min_rps)
    if found is not None:
        return found
    what = f"{model} v{version}"
    how = (f"run `chimera loadtest --model {model} --version {version} --rps R --duration S "
           f"--slo-p99-ms X` against a gateway first")
    need = f"a passing load test within {_age(max_age)}" + (f" at >= {min_rps:g} req/s" if min_rps else "")
    runs = list_load_tests(registry, model, version, limit=20)
    if not runs:
        raise PreconditionFailed(f"{what} needs {need}: no load test recorded; {how}")
    passing = [r for r in runs if r.passed]
    latest = runs[0]
    if passing and now - passing[0].created_at > max_age:
        detail = f"the latest passing run (#{passing[0].id}) is {_age(now - passing[0].created_at)} old"
    elif passing and min_rps is not None:
        detail = f"no recent passing run reached {min_rps:g} req/s"
    else:
        detail = f"the latest run (#{latest.id}) failed: {'; '.join(latest.failures) or 'no reason stored'}"
    raise PreconditionFailed(f"{what} needs {need}: {detail}; {how}")
