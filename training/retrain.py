"""Retrain from logged outcomes, publish only if not worse than production, start the canary.

This module is the orchestration: one retrain, recorded as a `training_runs` row from start to end,
each step in its own module:

1. Production and feedback (`training.retrain_data`): the production version, and the logged
   predictions with features and outcomes in [now - window, now) projected on its schema.
2. Candidate (`training.retrain_candidate`): a full retrain, or XGBoost continued from production's
   stored booster.
3. Not worse than production (`training.retrain_compare`): both on the window's most recent holdout;
   for every gate metric the candidate may be worse by at most `tolerance`. If it is worse, nothing is
   published and the run records why.
4. Publish (`training.retrain_publish`): export, parity gate, registry, native booster.
5. Load test before the canary (`training.retrain_gate`), when one is injected through
   `RetrainConfig.loadtest` (the loadtest-based implementation is `loadtest.candidate_gate.LoadTestGate`,
   wired by the CLI / scheduler caller / demo): a candidate that fails its SLO, or whose load test
   cannot run, is not canaried.
6. Canary (`training.retrain_canary`), unless disabled: at the first step of the model's rollout policy;
   or, when the policy's `shadow_gate` is on, a shadow evaluation that the rollout controller turns
   into that canary once the candidate is judged not worse on paired outcomes.

Errors live in `training.retrain_errors`, the configuration in `training.retrain_config`, the run row's
progress and provenance in `training.retrain_run`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from registry import Registry, Split, VersionInfo
from registry.loadtests import LoadTestRecord
from registry.locks import advisory_lock
from registry.training_runs import TrainingRunInfo, create_run, get_run, update_run
from training.datasets import data_hash
from training.retrain_canary import first_step, shadow_gated, start_canary, start_shadow
from training.retrain_candidate import train_candidate
from training.retrain_compare import MetricComparison, compare_on_holdout
from training.retrain_config import RetrainConfig
from training.retrain_data import feedback_dataset, require_trainable, resolve_production
from training.retrain_errors import RetrainBusy, RetrainError
from training.retrain_gate import no_gate_note, run_gate
from training.retrain_publish import publish_candidate
from training.retrain_run import ProgressFn, RunProgress, code_revision
from training.split import time_split

log = logging.getLogger(__name__)

# chimera/cli.py and chimera/demo.py (the composition root, owned elsewhere) import these from here.
__all__ = ["RetrainBusy", "RetrainConfig", "RetrainError", "RetrainOutcome", "retrain"]


@dataclass(frozen=True)
class RetrainOutcome:
    run: TrainingRunInfo
    production_version: int
    published: VersionInfo | None
    candidate: Mapping[str, float]
    production: Mapping[str, float]
    comparison: tuple[MetricComparison, ...]
    canary: Split | None
    reason: str
    notes: tuple[str, ...] = field(default_factory=tuple)
    loadtest: LoadTestRecord | None = None  # the candidate's load test, if one ran


def retrain(
    registry: Registry,
    model: str,
    config: RetrainConfig | None = None,
    *,
    now: datetime | None = None,
    trigger: str = "cli",
    progress: ProgressFn | None = None,
    revision: str | None = None,
) -> RetrainOutcome:
    """Run one retrain of `model` (see the module docstring) and return what happened.

    Raises RetrainBusy when another process holds this model's retrain lock (no run is recorded),
    RetrainError when the retrain cannot run (the run is recorded as failed with the reason), and
    re-raises any other error after recording the run as failed. `config` None: the defaults.
    `revision` is the code revision recorded on the run (default: training.retrain_run.code_revision)."""
    config = config or RetrainConfig()
    info = registry.get_model(model)  # NotFoundError for an unknown model, before any run exists
    with advisory_lock(registry, f"chimera-retrain:{model}") as mine:
        if not mine:
            raise RetrainBusy(f"another process is retraining {model!r} right now")
        run = create_run(registry, model, mode=config.mode, params=config.to_dict(), trigger=trigger,
                         code_revision=code_revision(revision))
        tracker = RunProgress(registry, run.id, progress)
        try:
            return _retrain(registry, info.name, info.metric, config, run.id, now, tracker)
        except Exception as exc:
            update_run(registry, run.id, status="failed", reason=f"{type(exc).__name__}: {exc}"[:4000])
            raise


def _retrain(registry: Registry, model: str, metric: str, config: RetrainConfig, run_id: int,
             now: datetime | None, tracker: RunProgress) -> RetrainOutcome:
    until = now or datetime.now(UTC)
    since = until - config.window
    update_run(registry, run_id, status="running", window_start=since, window_end=until)
    tracker(0.02, "resolving production")
    prod = resolve_production(registry, model)
    names = list(prod.feature_names)
    update_run(registry, run_id, parent_version=prod.version)

    tracker(0.05, "reading feedback")
    fb = feedback_dataset(registry, model, names, since=since, until=until, threshold=config.threshold)
    data = fb.data
    update_run(registry, run_id, n_rows=len(data), data_hash=data_hash(data))
    require_trainable(data, min_rows=config.min_rows, since=since, until=until)
    notes: list[str] = []
    if fb.dropped:
        notes.append(f"{fb.dropped} feedback rows lacked a production feature and were left out")
    result = train_candidate(registry, model, prod.version, data, names, config, tracker)

    tracker(0.7, "evaluating on the holdout")
    holdout = time_split(fb.feedback, *config.fractions).test
    onnx_bytes, _ = registry.get_onnx(model, prod.version)
    held = compare_on_holdout(holdout, result, onnx_bytes, prod.version, metric=metric, gate=config.gate,
                              tolerance=config.tolerance, decision_threshold=config.decision_threshold)
    record = held.record
    if held.worse:
        reason = (f"not published: candidate worse than production v{prod.version} on the holdout "
                  f"({held.rows} rows): " + "; ".join(c.note for c in held.worse))
        update_run(registry, run_id, status="succeeded", metrics=record, reason=reason)
        log.info("retrain %s: %s", model, reason)
        return RetrainOutcome(get_run(registry, run_id), prod.version, None, held.candidate, held.production,
                              held.comparison, None, reason, tuple(notes))

    tracker(0.8, "export, parity check, publish")
    published = publish_candidate(registry, model, result, production=prod.version,
                                  candidate_metrics=held.candidate, production_metrics=held.production,
                                  metric=metric, mode=config.mode, run_id=run_id, since=since, until=until,
                                  feedback_rows=len(data))
    update_run(registry, run_id, published_version=published.version)

    split = None
    lt = None
    canary_ok = config.canary
    if config.loadtest is not None:
        tracker(0.85, f"load test of v{published.version} at {config.loadtest.target}")
        verdict = run_gate(config.loadtest, registry, model, published)
        record["loadtest"] = verdict.record
        notes.append(verdict.note)
        lt = verdict.loadtest
        canary_ok = canary_ok and verdict.passed
    shadowed = False
    if canary_ok and shadow_gated(registry, model):
        tracker(0.95, "starting the shadow evaluation")
        shadow, why = start_shadow(registry, model, prod.version, published.version,
                                   reason=f"retrain run {run_id}: shadow evaluation of v{published.version} "
                                          f"against v{prod.version}")
        shadowed = shadow is not None
        notes.append(why or "shadow evaluation started: the canary starts once it is judged not worse")
    elif canary_ok:
        tracker(0.95, "starting the canary")
        percent = config.canary_percent or first_step(registry, model)
        split, why = start_canary(registry, model, prod.version, published.version, percent,
                                  reason=f"retrain run {run_id}: canary v{published.version} at {percent}% "
                                         f"against v{prod.version}")
        if why:
            notes.append(why)
    if config.loadtest is None:
        notes.append(no_gate_note(model, published.version))
    reason = (f"published v{published.version}: not worse than production v{prod.version} on the holdout "
              f"({held.rows} rows)")
    if split is not None:
        reason += f"; canary at {split.weights[published.version]}%"
    elif shadowed:
        reason += "; in shadow"
    if notes:
        reason += "; " + "; ".join(notes)
    update_run(registry, run_id, status="succeeded", metrics=record, reason=reason)
    tracker(1.0, "done")
    log.info("retrain %s: %s", model, reason)
    return RetrainOutcome(get_run(registry, run_id), prod.version,
                          registry.get_version(model, published.version), held.candidate, held.production,
                          held.comparison, split, reason, tuple(notes), lt)
