"""`chimera scheduler`: run retrain and drift jobs on cron-like schedules, one scheduler at a time.

Schedules are five-field cron specs in UTC (training.cron); chimera.settings.SchedulerSettings reads
them from the environment and `check_settings` checks what they mean:

    CHIMERA_RETRAIN_SCHEDULE         default "0 3 * * *" (daily 03:00 UTC); "off" disables
    CHIMERA_DRIFT_SCHEDULE           default "*/30 * * * *"; "off" disables
    CHIMERA_SCHEDULER_MODELS         comma-separated; default every model with a production version
    CHIMERA_RETRAIN_WINDOW           default 90d     CHIMERA_RETRAIN_MODE       full | incremental
    CHIMERA_RETRAIN_TOLERANCE        default 0.0     CHIMERA_RETRAIN_CANARY_PERCENT  default: first
                                                     rollout step; 0 publishes without a canary
    CHIMERA_DRIFT_WINDOW             default 1d      CHIMERA_SCHEDULER_POLL_SECONDS  default 15

The load test of a published candidate before its canary is injected: `Scheduler(loadtest_gate=...)`
(training.retrain_gate.CandidateLoadTest). `chimera scheduler` builds it from CHIMERA_GATEWAY_TARGET
and CHIMERA_RETRAIN_LOADTEST_* (loadtest.candidate_gate.LoadTestGate); without one, candidates are not
load-tested and the controller holds their canary until someone runs a load test.

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

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from chimera.settings import SchedulerSettings
from registry import Registry
from registry.locks import SessionLock
from registry.models import as_utc
from training.cron import CronSpec
from training.feedback import parse_window, production_version
from training.retrain_config import MODES, RetrainConfig
from training.retrain_errors import RetrainBusy, RetrainError
from training.retrain_gate import CandidateLoadTest

log = logging.getLogger(__name__)

LOCK_NAME = "chimera-scheduler"


# ------------------------------------------------------------------------------------ settings
def check_settings(settings: SchedulerSettings) -> SchedulerSettings:
    """ValueError unless the cron specs, windows, mode and poll interval make sense (chimera.settings
    parses the environment; the meaning of these values is checked here, where they are used)."""
    for spec in (settings.retrain_schedule, settings.drift_schedule):
        if spec is not None:
            CronSpec.parse(spec)
    parse_window(settings.retrain_window)
    parse_window(settings.drift_window)
    if settings.retrain_mode not in MODES:
        raise ValueError(f"CHIMERA_RETRAIN_MODE: full or incremental, got {settings.retrain_mode!r}")
    if not (settings.poll_seconds > 0 and math.isfinite(settings.poll_seconds)):
        raise ValueError("CHIMERA_SCHEDULER_POLL_SECONDS: must be positive")
    return settings


def retrain_config(settings: SchedulerSettings, loadtest: CandidateLoadTest | None = None) -> RetrainConfig:
    """A scheduled retrain's configuration, with the injected pre-canary load test (if any)."""
    return RetrainConfig(window=parse_window(settings.retrain_window), mode=settings.retrain_mode,
                         tolerance=settings.retrain_tolerance, canary=settings.canary_percent != 0,
                         canary_percent=settings.canary_percent or None, loadtest=loadtest)


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
    """Runs due jobs on every `tick`; `run_forever` ticks every poll_seconds until stopped.

    `loadtest_gate` load-tests each published candidate before its canary (injected by the caller:
    training never imports loadtest); None: no load test, promotion waits for one."""

    def __init__(
        self,
        registry: Registry,
        settings: SchedulerSettings,
        *,
        retrain_fn: RetrainFn | None = None,
        drift_fn: DriftFn | None = None,
        loadtest_gate: CandidateLoadTest | None = None,
        metrics_registry: CollectorRegistry = REGISTRY,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        lock_name: str = LOCK_NAME,
    ) -> None:
        self.registry = registry
        self.settings = check_settings(settings)
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
        self.loadtest_gate = loadtest_gate
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
        try:
            if job == "retrain":
                weights = dict(self.registry.get_split(model).weights)
                if len(weights) > 1:  # let the rollout controller finish judging the current canary first
                    busy = ", ".join(f"v{v}={w}%" for v, w in sorted(weights.items()))
                    return JobResult(job, model, "skipped", f"a canary is in progress ({busy})")
                fn = self._retrain_fn
                if fn is None:
                    from training.retrain import retrain as fn
                outcome = fn(self.registry, model, retrain_config(self.settings, self.loadtest_gate),
                             trigger="scheduler")
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
