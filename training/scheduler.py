"""`chimera scheduler`: run retrain and drift jobs on cron-like schedules, one scheduler at a time.

Schedules are five-field cron specs in UTC ("minute hour day-of-month month day-of-week"; `*`, lists,
ranges, steps, month/day names, @hourly/@daily/@weekly/@monthly/@yearly), read from the environment:

    CHIMERA_RETRAIN_SCHEDULE         default "0 3 * * *" (daily 03:00 UTC); "off" disables
    CHIMERA_DRIFT_SCHEDULE           default "*/30 * * * *"; "off" disables
    CHIMERA_SCHEDULER_MODELS         comma-separated; default every model with a production version
    CHIMERA_RETRAIN_WINDOW           default 90d     CHIMERA_RETRAIN_MODE       full | incremental
    CHIMERA_RETRAIN_TOLERANCE        default 0.0     CHIMERA_RETRAIN_CANARY_PERCENT  default: first
                                                     rollout step; 0 publishes without a canary
    CHIMERA_DRIFT_WINDOW             default 1d      CHIMERA_SCHEDULER_POLL_SECONDS  default 15
    CHIMERA_GATEWAY_TARGET           host:port of a gateway: a published candidate is load-tested there
                                     (pinned, needs CHIMERA_ADMIN_TOKEN) before its canary starts, and
                                     not canaried when it fails the SLO; unset: no load test, and the
                                     controller holds the canary until someone runs one
    CHIMERA_RETRAIN_LOADTEST_RPS / _DURATION_S / _WARMUP_S / _SLO_P99_MS / _MAX_ERROR_RATE
                                     default 50 req/s, 10 s, 2 s, p99 <= 250 ms, errors <= 1 %

Several schedulers may run (e.g. one per gateway host): the one holding the PostgreSQL advisory lock
"chimera-scheduler" is the leader and runs the jobs; the others keep trying to take the lock and take
over when the leader's connection goes away. Each retrain also takes its own per-model lock, so a
manual `chimera retrain` or the Kubernetes CronJob never trains the same model concurrently. On
SQLite (one process, embedded) the locks are no-ops.

A job is due when a matching minute passed since the previous tick; minutes missed while a long job ran
coalesce into one run, as with cron. A scheduled retrain is skipped while the model has a canary in
progress (more than one version with traffic): the rollout controller finishes judging it first.
"""

from __future__ import annotations

import calendar
import logging
import math
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from registry import Registry
from registry.locks import SessionLock
from registry.models import as_utc
from training.feedback import parse_window, production_version

log = logging.getLogger(__name__)

LOCK_NAME = "chimera-scheduler"

_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_FIELDS = ("minute", "hour", "day of month", "month", "day of week")
_MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_abbr) if name}
_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
           "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}


# ------------------------------------------------------------------------------------ cron
def _value(token: str, index: int) -> int:
    names = _MONTHS if index == 3 else _DAYS if index == 4 else {}
    t = token.lower()
    if t in names:
        return names[t]
    if not t.isdigit():
        raise ValueError(f"cron: bad {_FIELDS[index]} value {token!r}")
    lo, hi = _RANGES[index]
    v = int(t)
    if not lo <= v <= hi:
        raise ValueError(f"cron: {_FIELDS[index]} {v} is outside {lo}..{hi}")
    return v


def _field(text: str, index: int) -> tuple[frozenset[int], bool]:
    """The set of values a field allows, and whether it is restricted (not a bare '*')."""
    lo, hi = _RANGES[index]
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise ValueError(f"cron: empty list item in {_FIELDS[index]} {text!r}")
        body, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValueError(f"cron: bad step {step_text!r} in {_FIELDS[index]}")
            step = int(step_text)
        if body == "*":
            start, end = lo, hi
        elif "-" in body:
            a, b = body.split("-", 1)
            start, end = _value(a, index), _value(b, index)
            if end < start:
                raise ValueError(f"cron: range {body!r} in {_FIELDS[index]} runs backwards")
        else:
            start = _value(body, index)
            end = hi if step_text else start
        values.update(range(start, end + 1, step))
    if index == 4 and 7 in values:  # both 0 and 7 mean Sunday
        values.discard(7)
        values.add(0)
    return frozenset(values), text != "*"


@dataclass(frozen=True)
class CronSpec:
    """A parsed five-field cron expression, evaluated in UTC."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool
    weekdays_restricted: bool

    @classmethod
    def parse(cls, text: str) -> CronSpec:
        expanded = _MACROS.get(text.strip().lower(), text)
        parts = expanded.split()
        if len(parts) != 5:
            raise ValueError(f"cron: expected 5 fields (minute hour day month weekday), got {text!r}")
        (mi, _), (ho, _), (dom, dom_r), (mo, _), (dow, dow_r) = (_field(p, i) for i, p in enumerate(parts))
        return cls(text.strip(), mi, ho, dom, mo, dow, dom_r, dow_r)

    def _day_matches(self, dt: datetime) -> bool:
        dom = dt.day in self.days
        dow = (dt.weekday() + 1) % 7 in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return dom or dow  # classic cron: either restriction may match
        return dom and dow

    def matches(self, dt: datetime) -> bool:
        """Whether the minute containing `dt` (taken in UTC) is a scheduled minute."""
        t = as_utc(dt)
        return (t.minute in self.minutes and t.hour in self.hours and t.month in self.months
                and self._day_matches(t))

    def next_after(self, dt: datetime) -> datetime:
        """The first scheduled minute strictly after `dt` (UTC). ValueError when there is none
        within five years (e.g. 30 February)."""
        t = as_utc(dt).replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = t + timedelta(days=366 * 5)
        while t <= limit:
            if t.month not in self.months:
                t = (t.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
                continue
            if not self._day_matches(t):
                t = t.replace(hour=0, minute=0) + timedelta(days=1)
                continue
            if t.hour not in self.hours:
                t = t.replace(minute=0) + timedelta(hours=1)
                continue
            if t.minute not in self.minutes:
                t += timedelta(minutes=1)
                continue
            return t
        raise ValueError(f"cron: {self.text!r} never matches")


# ------------------------------------------------------------------------------------ settings
def _schedule(env: Mapping[str, str], name: str, default: str) -> str | None:
    value = env.get(name, default).strip()
    return None if value.lower() in ("", "off", "none", "disabled") else value


@dataclass(frozen=True)
class SchedulerSettings:
    retrain_schedule: str | None = "0 3 * * *"
    drift_schedule: str | None = "*/30 * * * *"
    models: tuple[str, ...] = ()
    retrain_window: str = "90d"
    retrain_mode: str = "full"
    retrain_tolerance: float = 0.0
    canary_percent: int | None = None  # None: first rollout step; 0: publish without a canary
    drift_window: str = "1d"
    poll_seconds: float = 15.0
    loadtest: Any = None  # training.retrain.LoadTestGate: load-test candidates before their canary

    def __post_init__(self) -> None:
        for spec in (self.retrain_schedule, self.drift_schedule):
            if spec is not None:
                CronSpec.parse(spec)
        parse_window(self.retrain_window)
        parse_window(self.drift_window)
        if self.retrain_mode not in ("full", "incremental"):
            raise ValueError(f"CHIMERA_RETRAIN_MODE: full or incremental, got {self.retrain_mode!r}")
        if not (self.poll_seconds > 0 and math.isfinite(self.poll_seconds)):
            raise ValueError("CHIMERA_SCHEDULER_POLL_SECONDS: must be positive")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SchedulerSettings:
        e = os.environ if env is None else env
        canary = e.get("CHIMERA_RETRAIN_CANARY_PERCENT", "").strip()
        from training.retrain import LoadTestGate

        try:
            loadtest = LoadTestGate.from_env(e)
        except ValueError as exc:
            raise ValueError(f"CHIMERA_RETRAIN_LOADTEST_*: {exc}") from None
        return cls(
            retrain_schedule=_schedule(e, "CHIMERA_RETRAIN_SCHEDULE", cls.retrain_schedule or ""),
            drift_schedule=_schedule(e, "CHIMERA_DRIFT_SCHEDULE", cls.drift_schedule or ""),
            models=tuple(m.strip() for m in e.get("CHIMERA_SCHEDULER_MODELS", "").split(",") if m.strip()),
            retrain_window=e.get("CHIMERA_RETRAIN_WINDOW", cls.retrain_window),
            retrain_mode=e.get("CHIMERA_RETRAIN_MODE", cls.retrain_mode),
            retrain_tolerance=float(e.get("CHIMERA_RETRAIN_TOLERANCE", cls.retrain_tolerance)),
            canary_percent=int(canary) if canary else None,
            drift_window=e.get("CHIMERA_DRIFT_WINDOW", cls.drift_window),
            poll_seconds=float(e.get("CHIMERA_SCHEDULER_POLL_SECONDS", cls.poll_seconds)),
            loadtest=loadtest,
        )

    def retrain_config(self) -> Any:
        from training.retrain import RetrainConfig

        return RetrainConfig(window=parse_window(self.retrain_window), mode=self.retrain_mode,
                             tolerance=self.retrain_tolerance, canary=self.canary_percent != 0,
                             canary_percent=self.canary_percent or None, loadtest=self.loadtest)


# ------------------------------------------------------------------------------------ scheduler
@dataclass(frozen=True)
class JobResult:
    job: str  # retrain | drift
    model: str
    status: str  # published | not_published | failed | busy | ok | drifted | skipped | not_leader
    detail: str = ""


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Counter("chimera_scheduler_jobs", "scheduled jobs run, by job and result",
                            ["job", "result"], registry=registry)
        self.leader = Gauge("chimera_scheduler_leader", "1 while this scheduler holds the leader lock",
                            registry=registry)


_METRICS: dict[int, tuple[CollectorRegistry, SchedulerMetrics]] = {}


def scheduler_metrics(registry: CollectorRegistry = REGISTRY) -> SchedulerMetrics:
    entry = _METRICS.get(id(registry))
    if entry is None or entry[0] is not registry:
        entry = (registry, SchedulerMetrics(registry))
        _METRICS[id(registry)] = entry
    return entry[1]


RetrainFn = Callable[..., Any]
DriftFn = Callable[..., Any]


class Scheduler:
    """Runs due jobs on every `tick`; `run_forever` ticks every poll_seconds until stopped."""

    def __init__(
        self,
        registry: Registry,
        settings: SchedulerSettings,
        *,
        retrain_fn: RetrainFn | None = None,
        drift_fn: DriftFn | None = None,
        metrics_registry: CollectorRegistry = REGISTRY,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        lock_name: str = LOCK_NAME,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.clock = clock
        self.metrics_registry = metrics_registry
        self.metrics = scheduler_metrics(metrics_registry)
        self.lock = SessionLock(registry, lock_name)
        self.jobs: dict[str, CronSpec] = {}
        if settings.retrain_schedule:
            self.jobs["retrain"] = CronSpec.parse(settings.retrain_schedule)
        if settings.drift_schedule:
            self.jobs["drift"] = CronSpec.parse(settings.drift_schedule)
        self._retrain_fn = retrain_fn
        self._drift_fn = drift_fn
        self._last: dict[str, datetime] = {}

    def models(self) -> list[str]:
        if self.settings.models:
            return list(self.settings.models)
        return [m for m in self.registry.model_names() if production_version(self.registry, m) is not None]

    def due(self, now: datetime) -> list[str]:
        """Jobs with a scheduled minute in (previous tick, now]; the first tick looks at now's minute."""
        now = as_utc(now)
        out = []
        for job, spec in self.jobs.items():
            last = self._last.get(job, now.replace(second=0, microsecond=0) - timedelta(seconds=1))
            if spec.next_after(last) <= now:
                out.append(job)
            self._last[job] = now
        return out

    def tick(self, now: datetime | None = None) -> list[JobResult]:
        """Run the jobs due at `now` (default: the clock) if this scheduler is the leader."""
        return self._run_jobs(self.due(now or self.clock()))

    def run_now(self, jobs: list[str] | None = None) -> list[JobResult]:
        """Run the given jobs (default: every configured one) once, now, if this scheduler is the
        leader; for `chimera scheduler --once` and one-shot Kubernetes jobs."""
        return self._run_jobs(list(self.jobs) if jobs is None else jobs)

    def _leader(self) -> bool:
        try:
            leader = self.lock.acquire()
        except Exception as exc:  # database unreachable: nobody leads from here until it returns
            log.warning("scheduler lock: %s", exc)
            leader = False
        self.metrics.leader.set(1.0 if leader else 0.0)
        return leader

    def _run_jobs(self, due: list[str]) -> list[JobResult]:
        leader = self._leader()
        if not due:
            return []
        if not leader:
            log.info("jobs %s due, but another scheduler is the leader", ", ".join(due))
            return [JobResult(job, "*", "not_leader", "another scheduler holds the lock") for job in due]
        results = []
        for job in due:
            for model in self.models():
                result = self._run(job, model)
                self.metrics.jobs.labels(job, result.status).inc()
                results.append(result)
        return results

    def _run(self, job: str, model: str) -> JobResult:
        from training.retrain import RetrainBusy, RetrainError

        try:
            if job == "retrain":
                weights = dict(self.registry.get_split(model).weights)
                if len(weights) > 1:  # let the rollout controller finish judging the current canary first
                    busy = ", ".join(f"v{v}={w}%" for v, w in sorted(weights.items()))
                    return JobResult(job, model, "skipped", f"a canary is in progress ({busy})")
                fn = self._retrain_fn
                if fn is None:
                    from training.retrain import retrain as fn
                outcome = fn(self.registry, model, self.settings.retrain_config(), trigger="scheduler")
                status = "published" if outcome.published is not None else "not_published"
                return JobResult(job, model, status, outcome.reason)
            from training.drift import export_drift_metrics

            dfn = self._drift_fn
            if dfn is None:
                from training.drift import drift_report as dfn
            report = dfn(self.registry, model, window=parse_window(self.settings.drift_window))
            export_drift_metrics(report, self.metrics_registry)
            flagged = ", ".join(report.flagged)
            return JobResult(job, model, "drifted" if report.drifted else "ok",
                             f"flagged: {flagged}" if flagged else "no drift")
        except RetrainBusy as exc:
            return JobResult(job, model, "busy", str(exc))
        except (RetrainError, ValueError) as exc:
            log.warning("%s %s: %s", job, model, exc)
            return JobResult(job, model, "skipped" if job == "drift" else "failed", str(exc))
        except Exception as exc:  # one failing model must not stop the others or the scheduler
            log.exception("%s %s failed", job, model)
            return JobResult(job, model, "failed", f"{type(exc).__name__}: {exc}")

    def run_forever(self, stop: threading.Event | None = None,
                    on_results: Callable[[list[JobResult]], None] | None = None) -> None:
        stop = stop or threading.Event()
        try:
            while not stop.is_set():
                results = self.tick()
                if results and on_results is not None:
                    on_results(results)
                stop.wait(self.settings.poll_seconds)
        finally:
            self.lock.release()
            self.metrics.leader.set(0.0)
