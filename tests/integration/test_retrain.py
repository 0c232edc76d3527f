"""Continuous training end to end on a real registry (SQLite and PostgreSQL): a stream whose world
shifts halfway is detected as drift, retrained from its logged outcomes, published, canaried and
promoted by the rollout controller; a worse candidate is recorded as not published; incremental
training continues the production booster; locks, the cron matcher and the scheduler."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from chimera.settings import SchedulerSettings
from registry import Registry, VersionInfo
from registry.loadtests import LoadTestRecord, record_load_test
from registry.locks import SessionLock, advisory_lock
from registry.training_runs import list_runs, load_artifact
from rollout.controller import RolloutController
from tests.integration.test_feedback import (
    FAST_XGB,
    log_served,
    new_model_name,
    publish_production,
    shifted_stream,
)
from training.cron import CronSpec
from training.datasets import TIMESTAMP, synthetic_signals
from training.drift import drift_report
from training.retrain import retrain
from training.retrain_compare import compare_metrics, outcome_metric
from training.retrain_config import RetrainConfig
from training.retrain_errors import LoadTestFailed, RetrainBusy, RetrainError
from training.scheduler import JobResult, Scheduler, check_settings, retrain_config

SHIFTED = {"realized_vol", "funding_rate", "spread_bp", "regime"}
TRAIN_ROWS = 2000


def _end(df) -> datetime:  # noqa: ANN001
    return df[TIMESTAMP].iloc[-1].to_pydatetime() + timedelta(seconds=1)


# ------------------------------------------------------------------------------------ the loop
def test_shift_is_detected_retrained_canaried_and_promoted(registry: Registry) -> None:
    stream = shifted_stream(9000, seed=11)
    model = new_model_name("loop")
    v1, _ = publish_production(registry, model, stream.iloc[:TRAIN_ROWS])
    # Canary at 10 %, promote straight after the first significant "better" (steps 10 -> 100).
    registry.set_rollout_config(model, {"steps": [10, 100], "min_samples_per_arm": 200,
                                        "min_canary_samples_per_step": 200})
    log_served(registry, model, v1.version, stream.iloc[TRAIN_ROWS:])  # features + outcomes
    end = _end(stream)
    shift = stream[TIMESTAMP].iloc[len(stream) // 2].to_pydatetime()
    new_window = end - shift

    # 1. Drift: the shifted features are flagged against v1's training data.
    report = drift_report(registry, model, window=new_window, now=end, reference=stream.iloc[:TRAIN_ROWS])
    assert SHIFTED <= set(report.flagged), report.to_dict()
    assert len(set(report.flagged) - SHIFTED) <= 1, report.to_dict()  # not the unshifted ones

    # 2. Retrain on the new window: beats production on the newest holdout, published, canaried.
    progress: list[tuple[float, str]] = []
    out = retrain(registry, model, RetrainConfig(window=new_window, params=FAST_XGB), now=end, trigger="test",
                  progress=lambda f, s: progress.append((f, s)))
    assert out.published is not None, out.reason
    v2 = out.published.version
    assert v2 == 2 and out.production_version == v1.version
    assert out.candidate["auc"] > out.production["auc"]
    assert out.candidate["brier"] < out.production["brier"]
    assert out.candidate["ece"] < out.production["ece"]
    assert out.candidate["outcome_metric"] == pytest.approx(out.candidate["brier"])  # declared metric: brier
    assert out.canary is not None and dict(out.canary.weights) == {1: 90, 2: 10}
    info = registry.get_version(model, v2)
    assert info.status == "canary" and info.parent_version == 1
    assert info.params["mode"] == "full" and info.params["training_run"] == out.run.id
    assert info.metrics["production_auc"] == pytest.approx(out.production["auc"])
    assert registry.audit_log(model)[-1]["actor"] == "retrain"
    assert load_artifact(registry, model, v2) is not None  # the next incremental run can continue it

    run = out.run
    assert run.status == "succeeded" and run.published_version == v2 and run.parent_version == 1
    assert run.window_start == end - new_window and run.window_end == end
    assert run.n_rows == len(stream) - len(stream) // 2 and len(run.data_hash) == 64
    assert run.progress == 1.0 and run.duration_s is not None and run.started_at is not None
    assert run.metrics["candidate"]["auc"] == pytest.approx(out.candidate["auc"])
    assert run.metrics["production"]["brier"] == pytest.approx(out.production["brier"])
    assert run.params["mode"] == "full" and "published v2" in run.reason
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    # 3. The rollout controller judges the canary on live traffic (the new world) and promotes it.
    ctl = RolloutController(registry)
    live = synthetic_signals(14_000, seed=99, shift_at=0.0, quality=3.0)
    rng = np.random.default_rng(3)
    actions = []
    for start in range(0, len(live), 1000):
        chunk = live.iloc[start:start + 1000]
        weights = dict(registry.get_split(model).weights)
        versions = sorted(weights)
        routed = rng.choice(versions, size=len(chunk), p=[weights[v] / 100 for v in versions])
        for v in versions:
            log_served(registry, model, int(v), chunk[routed == v], use_timestamps=False)
        decision = ctl.run_once(model)
        actions.append(decision.action if decision else None)
        if decision is not None and decision.action in ("promote", "rollback"):
            break
    assert actions[-1] == "promote", actions
    assert dict(registry.get_split(model).weights) == {v2: 100}
    assert registry.get_version(model, v2).status == "production"


# ------------------------------------------------------------------------------------ not published
def _stable_scenario(registry: Registry, *, native: bool = True, n: int = 4000) -> tuple[str, datetime]:
    stream = synthetic_signals(n, seed=21, quality=3.0)
    model = new_model_name("stable")
    v1, _ = publish_production(registry, model, stream.iloc[:1500], native=native)
    log_served(registry, model, v1.version, stream.iloc[1500:])
    return model, _end(stream)


def test_worse_candidate_is_recorded_as_not_published(registry: Registry) -> None:
    model, end = _stable_scenario(registry)
    window = timedelta(days=365)
    # A candidate trained on shuffled labels has no signal left: worse than production.
    out = retrain(registry, model, RetrainConfig(window=window, params=FAST_XGB, degrade=1.0), now=end)
    assert out.published is None and out.canary is None
    assert out.reason.startswith("not published: candidate worse than production v1")
    assert "auc" in out.reason
    run = list_runs(registry, model)[0]
    assert run.id == out.run.id and run.status == "succeeded" and run.published_version is None
    assert run.reason == out.reason
    assert any(c["worse"] and c["metric"] == "auc" for c in run.metrics["comparison"])
    assert [v.version for v in registry.list_versions(model)] == [1]
    assert dict(registry.get_split(model).weights) == {1: 100}

    # A tolerance no candidate can meet (negative: demands AUC +0.5 etc.) is not published either.
    strict = retrain(registry, model, RetrainConfig(window=window, params=FAST_XGB, tolerance=-0.5), now=end)
    assert strict.published is None and "tolerance -0.5" in strict.reason
    assert [v.version for v in registry.list_versions(model)] == [1]

    # Too little feedback: the run fails and says why.
    with pytest.raises(RetrainError, match="need at least"):
        retrain(registry, model, RetrainConfig(window=window, min_rows=10**6), now=end)
    failed = list_runs(registry, model)[0]
    assert failed.status == "failed" and "need at least" in failed.reason


def test_incremental_training_continues_the_production_booster(registry: Registry) -> None:
    model, end = _stable_scenario(registry)
    window = timedelta(days=365)
    base = registry.get_version(model, 1).params["n_trees"]
    config = RetrainConfig(window=window, mode="incremental", tolerance=1.0, canary=False,
                           params={"max_depth": 3, "learning_rate": 0.1, "early_stopping_rounds": 20})
    out = retrain(registry, model, config, now=end)
    assert out.published is not None, out.reason
    v2 = registry.get_version(model, out.published.version)
    assert v2.params["mode"] == "incremental" and v2.params["base_trees"] == base
    assert v2.params["n_trees"] >= base and v2.status == "staged"
    art = load_artifact(registry, model, v2.version)
    assert art is not None and art.meta["n_trees"] == v2.params["n_trees"]
    assert dict(registry.get_split(model).weights) == {1: 100}  # --no-canary

    # Another canary already has traffic: publish, but do not start a second canary.
    registry.set_split(model, {1: 95, v2.version: 5}, expected_revision=registry.get_split(model).revision,
                       actor="operator")
    third = retrain(registry, model, RetrainConfig(window=window, params=FAST_XGB, tolerance=1.0), now=end)
    assert third.published is not None and third.canary is None
    assert "canary not started" in third.reason
    assert dict(registry.get_split(model).weights) == {1: 95, v2.version: 5}


def test_incremental_without_a_stored_booster_fails_with_reason(registry: Registry) -> None:
    model, end = _stable_scenario(registry, native=False, n=2500)
    with pytest.raises(RetrainError, match="no stored native booster"):
        retrain(registry, model, RetrainConfig(window=timedelta(days=365), mode="incremental"), now=end)
    run = list_runs(registry, model)[0]
    assert run.status == "failed" and "full retrain" in run.reason and run.mode == "incremental"


class FakeGate:
    """A CandidateLoadTest (training.retrain_gate) that stores a load test without any gateway: the
    gate is injected, so retraining's canary decision can be checked without Ray."""

    target, rps = "fake:1", 10.0

    def __init__(self, passed: bool | None) -> None:  # None: the load test cannot run
        self.passed = passed
        self.calls: list[int] = []

    def to_dict(self) -> dict[str, object]:
        return {"target": self.target, "rps": self.rps}

    def run(self, registry: Registry, model: str, version: VersionInfo) -> LoadTestRecord:
        self.calls.append(version.version)
        if self.passed is None:
            raise LoadTestFailed(f"load test of v{version.version} at {self.target} could not run: down")
        return record_load_test(registry, model, version.version, target=self.target, passed=self.passed,
                                failures=() if self.passed else ("p99 9 ms exceeds the SLO 1 ms",),
                                slo={"p99_ms": 1.0}, report={"latency_ms": {"p99": 9.0}})


def test_injected_load_test_gate_decides_the_canary(registry: Registry) -> None:
    model, end = _stable_scenario(registry)
    window = timedelta(days=365)
    down = retrain(registry, model, RetrainConfig(window=window, params=FAST_XGB, tolerance=1.0,
                                                  loadtest=FakeGate(None)), now=end)
    assert down.published is not None and down.canary is None and down.loadtest is None
    assert "not canaried: load test of v2 at fake:1 could not run: down" in down.reason
    stored = down.run.metrics["loadtest"]
    assert stored["passed"] is False and stored["target"] == "fake:1" and stored["error"].endswith("down")
    assert down.run.params["loadtest"] == {"target": "fake:1", "rps": 10.0}

    failing = FakeGate(False)
    bad = retrain(registry, model, RetrainConfig(window=window, params=FAST_XGB, tolerance=1.0,
                                                 loadtest=failing), now=end)
    vb = bad.published.version if bad.published else -1
    assert failing.calls == [vb] and bad.canary is None and bad.loadtest is not None
    assert f"not canaried: load test #{bad.loadtest.id} of v{vb} failed its SLO: p99 9 ms" in bad.reason
    assert dict(registry.get_split(model).weights) == {1: 100}

    good = retrain(registry, model, RetrainConfig(window=window, params=FAST_XGB, tolerance=1.0,
                                                  loadtest=FakeGate(True)), now=end)
    assert good.published is not None and good.canary is not None, good.reason
    assert good.loadtest is not None and good.loadtest.passed
    assert f"load test #{good.loadtest.id} passed (10 req/s, p99 9.0 ms)" in good.reason
    assert good.run.metrics["loadtest"]["p99_ms"] == 9.0 and "promotion will wait" not in good.reason
    assert dict(good.canary.weights) == {1: 95, good.published.version: 5}


def test_outcome_metric_and_gate() -> None:
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.6, 0.4, 0.1])
    roi = np.array([0.02, -0.01, 0.03, -0.02])
    assert outcome_metric("success_rate", y, p, y) == 0.5  # acts on 0.9 (win) and 0.6 (loss)
    assert outcome_metric("mean_outcome", y, p, roi) == pytest.approx((0.02 - 0.01) / 4)
    assert outcome_metric("brier", y, p, y) == pytest.approx(np.mean((p - y) ** 2))
    assert np.isnan(outcome_metric("success_rate", y, p * 0.1, y))
    prod = {"auc": 0.70, "brier": 0.20, "ece": 0.02, "outcome_metric": 0.20}
    rows = compare_metrics({"auc": 0.69, "brier": 0.19, "ece": 0.02, "outcome_metric": 0.19}, prod,
                           metric="brier", tolerance=0.0)
    assert [r.worse for r in rows] == [True, False, False, False]
    rows = compare_metrics({"auc": 0.69, "brier": 0.205, "ece": 0.02, "outcome_metric": 0.205}, prod,
                           metric="brier", tolerance=0.01)
    assert not any(r.worse for r in rows)
    undefined = compare_metrics({"outcome_metric": float("nan")}, {"outcome_metric": 0.6},
                                metric="success_rate", gate=("outcome_metric",))
    assert undefined[0].worse and undefined[0].note == "candidate undefined"


# ------------------------------------------------------------------------------------ locks
def test_locks_are_exclusive_on_postgres(registry: Registry) -> None:
    registry.publish_version("m", b"onnx", ["a"], status="production")
    other = Registry(registry.url)  # a second process: its own engine and connections
    try:
        first, second = SessionLock(registry, "chimera-test"), SessionLock(other, "chimera-test")
        assert first.acquire() and first.held()
        if registry.is_postgres:
            assert not second.acquire()  # pg_try_advisory_lock from the second connection fails
            first.release()
            assert second.acquire() and not first.acquire()
            second.release()
            with advisory_lock(other, "chimera-retrain:m") as mine:
                assert mine
                with pytest.raises(RetrainBusy):
                    retrain(registry, "m", RetrainConfig())
            assert list_runs(registry, "m") == []  # a busy retrain records nothing
        else:
            assert second.acquire()  # no-op on SQLite
        first.release()
        second.release()
    finally:
        other.dispose()


def test_only_the_leader_scheduler_runs_jobs(registry: Registry) -> None:
    registry.publish_version("m", b"onnx", ["a"], status="production")
    other = Registry(registry.url)
    calls: list[str] = []

    class FakeOutcome:
        published = None
        reason = "not published: test"

    def fake_retrain(reg: Registry, model: str, config: RetrainConfig, **kw: object) -> FakeOutcome:
        calls.append(model)
        assert config.loadtest is (gate if reg is registry else None)  # the injected gate, passed on
        return FakeOutcome()

    settings = SchedulerSettings(retrain_schedule="*/30 * * * *", drift_schedule=None)
    gate = FakeGate(True)
    try:
        a = Scheduler(registry, settings, retrain_fn=fake_retrain, metrics_registry=CollectorRegistry(),
                      loadtest_gate=gate)
        b = Scheduler(other, settings, retrain_fn=fake_retrain, metrics_registry=CollectorRegistry())
        at = datetime(2025, 1, 1, 10, 30, 5, tzinfo=UTC)
        assert a.tick(at) == [JobResult("retrain", "m", "not_published", "not published: test")]
        second = b.tick(at + timedelta(seconds=10))
        if registry.is_postgres:
            assert [r.status for r in second] == ["not_leader"]
            assert calls == ["m"]
        else:
            assert calls == ["m", "m"]
        assert a.tick(at + timedelta(seconds=20)) == []  # same minute: not due again
        assert a.tick(at + timedelta(minutes=29)) == []
        assert len(a.tick(at + timedelta(minutes=31))) == 1  # 11:00 passed since the last tick
        assert a.metrics_registry.get_sample_value("chimera_scheduler_jobs_total",
                                                   {"job": "retrain", "result": "not_published"}) == 2
        # While a canary is being judged, scheduled retrains wait.
        registry.publish_version("m", b"onnx-2", ["a"])
        registry.set_split("m", {1: 90, 2: 10}, expected_revision=None, actor="test")
        (skipped,) = a.run_now()
        assert skipped.status == "skipped" and "canary is in progress" in skipped.detail
        a.lock.release()
        b.lock.release()
    finally:
        other.dispose()


# ------------------------------------------------------------------------------------ cron
def test_cron_fields_and_matching() -> None:
    spec = CronSpec.parse("*/30 * * * *")
    assert spec.minutes == {0, 30} and len(spec.hours) == 24
    assert spec.matches(datetime(2025, 5, 5, 10, 30, 59, tzinfo=UTC))
    assert not spec.matches(datetime(2025, 5, 5, 10, 31, tzinfo=UTC))
    workday = CronSpec.parse("15 9-17/4 * * mon-fri")
    assert workday.hours == {9, 13, 17} and workday.weekdays == {1, 2, 3, 4, 5}
    saturday = datetime(2025, 1, 4, 12, 0, tzinfo=UTC)
    assert workday.next_after(saturday) == datetime(2025, 1, 6, 9, 15, tzinfo=UTC)
    assert CronSpec.parse("0 3 * * *").next_after(datetime(2025, 1, 1, 3, 0, tzinfo=UTC)) == \
        datetime(2025, 1, 2, 3, 0, tzinfo=UTC)
    # Day of month and day of week both restricted: either matches (classic cron).
    either = CronSpec.parse("0 0 13 * 5")
    assert either.matches(datetime(2025, 6, 13, tzinfo=UTC))  # the 13th (a Friday, too)
    assert either.matches(datetime(2025, 6, 6, tzinfo=UTC))   # a Friday
    assert either.matches(datetime(2025, 5, 13, tzinfo=UTC))  # a Tuesday, the 13th
    assert not either.matches(datetime(2025, 6, 12, tzinfo=UTC))
    assert CronSpec.parse("0 0 * * 7").weekdays == {0} == CronSpec.parse("0 0 * * sun").weekdays
    assert CronSpec.parse("0 0 29 2 *").next_after(datetime(2025, 3, 1, tzinfo=UTC)) == \
        datetime(2028, 2, 29, tzinfo=UTC)
    assert CronSpec.parse("@hourly").minutes == {0}
    assert CronSpec.parse("0 12 1 jan,jul *").months == {1, 7}
    with pytest.raises(ValueError, match="never matches"):
        CronSpec.parse("0 0 30 2 *").next_after(datetime(2025, 1, 1, tzinfo=UTC))
    for bad in ("61 * * * *", "* * * *", "5-1 * * * *", "*/0 * * * *", "a * * * *", "1,,2 * * * *"):
        with pytest.raises(ValueError, match="cron"):
            CronSpec.parse(bad)


def test_cron_next_after_agrees_with_a_minute_by_minute_scan() -> None:
    start = datetime(2024, 2, 27, 22, 47, 30, tzinfo=UTC)
    for text in ("*/7 * * * *", "5 */5 * * *", "0 0 1 * *", "30 8 * * 1,3", "0 0 13 * 5", "59 23 1,15 * *",
                 "0-10/5 1 1-3 3 *"):
        spec = CronSpec.parse(text)
        t = start
        for _ in range(3):
            expected = _scan(spec, t)
            assert spec.next_after(t) == expected, text
            t = expected


def _scan(spec: CronSpec, after: datetime) -> datetime:
    t = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    for _ in range(60 * 24 * 40):
        if spec.matches(t):
            return t
        t += timedelta(minutes=1)
    raise AssertionError("no match within 40 days")


def test_scheduler_settings_from_env() -> None:
    s = SchedulerSettings.from_env({
        "CHIMERA_RETRAIN_SCHEDULE": "0 */6 * * *", "CHIMERA_DRIFT_SCHEDULE": "off",
        "CHIMERA_SCHEDULER_MODELS": "a, b", "CHIMERA_RETRAIN_WINDOW": "30d",
        "CHIMERA_RETRAIN_MODE": "incremental", "CHIMERA_RETRAIN_CANARY_PERCENT": "0"})
    assert s.retrain_schedule == "0 */6 * * *" and s.drift_schedule is None and s.models == ("a", "b")
    config = retrain_config(check_settings(s))
    assert config.window == timedelta(days=30) and config.mode == "incremental" and not config.canary
    assert config.loadtest is None
    assert SchedulerSettings.from_env({}).drift_schedule == "*/30 * * * *"
    with pytest.raises(ValueError, match="cron"):
        check_settings(SchedulerSettings.from_env({"CHIMERA_RETRAIN_SCHEDULE": "every day"}))
    with pytest.raises(ValueError, match="cron"):  # the scheduler refuses what check_settings refuses
        Scheduler(Registry("sqlite://"), SchedulerSettings(drift_schedule="61 * * * *"))
    with pytest.raises(ValueError, match="CHIMERA_RETRAIN_MODE"):
        check_settings(SchedulerSettings(retrain_mode="partial"))
