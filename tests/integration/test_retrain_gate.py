"""Automatic retraining meets the promotion gate: with a live gateway (real Ray replicas, the rollout
controller running with the real load-test precondition), a retrain given the gateway as its load-test
target publishes the candidate, load-tests it pinned, stores the run, canaries it, and the controller
promotes it on outcomes; a candidate that fails its SLO is published but never canaried. SQLite and
PostgreSQL."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from gateway.server import GatewayConfig
from loadtest.candidate_gate import LoadTestGate
from registry import Registry
from registry.errors import PreconditionFailed
from registry.loadtests import list_load_tests, require_passing_loadtest
from registry.rollouts import decisions
from tests.harness import ADMIN_TOKEN, GatewayThread
from tests.harness import poll_until as _wait_for
from tests.integration.test_feedback import (
    FAST_XGB,
    log_routed,
    log_served,
    new_model_name,
    publish_production,
    shifted_stream,
)
from training.datasets import TIMESTAMP, synthetic_signals
from training.retrain import retrain
from training.retrain_config import RetrainConfig

pytestmark = pytest.mark.usefixtures("ray_cluster")

TRAIN_ROWS = 2000


def test_retrain_loadtests_canaries_and_the_controller_promotes(registry_url: str, tmp_path: Path) -> None:
    reg = Registry(registry_url)
    reg.upgrade()
    stream = shifted_stream(9000, seed=11)
    model = new_model_name("gate")
    v1, _ = publish_production(reg, model, stream.iloc[:TRAIN_ROWS])
    reg.set_rollout_config(model, {"steps": [10, 100], "min_samples_per_arm": 200,
                                   "min_canary_samples_per_step": 200})
    log_served(reg, model, v1.version, stream.iloc[TRAIN_ROWS:])
    end = stream[TIMESTAMP].iloc[-1].to_pydatetime() + timedelta(seconds=1)
    window = end - stream[TIMESTAMP].iloc[len(stream) // 2].to_pydatetime()

    gw = GatewayThread(registry_url, tmp_path, controller_interval_s=0.5).start()
    try:
        # The real gate: promotion needs a passing load test at most the default age old.
        assert gw.config.promotion_loadtest_max_age_s == GatewayConfig.promotion_loadtest_max_age_s == 86400
        target = f"127.0.0.1:{gw.port}"

        # 1. An SLO no gateway meets: published (not worse than production), load-tested, NOT canaried.
        t0 = time.monotonic()
        impossible = LoadTestGate(target, rps=20, duration_s=2, warmup_s=0.5, slo_p99_ms=0.001,
                                  admin_token=ADMIN_TOKEN)
        bad = retrain(reg, model, RetrainConfig(window=window, params=FAST_XGB, loadtest=impossible), now=end)
        print(f"retrain + failing load test: {time.monotonic() - t0:.1f}s")
        assert bad.published is not None, bad.reason
        vb = bad.published.version
        assert bad.canary is None and bad.loadtest is not None and not bad.loadtest.passed
        assert bad.loadtest.version == vb and bad.loadtest.target == target
        assert any("p99" in f and "exceeds the SLO" in f for f in bad.loadtest.failures), bad.reason
        assert f"not canaried: load test #{bad.loadtest.id} of v{vb} failed its SLO" in bad.reason
        assert bad.run.reason == bad.reason and bad.run.metrics["loadtest"]["passed"] is False
        assert bad.run.params["loadtest"]["slo_p99_ms"] == 0.001
        assert "admin_token" not in bad.run.params["loadtest"]  # never stored
        assert reg.get_version(model, vb).status == "staged"
        assert dict(reg.get_split(model).weights) == {v1.version: 100}
        (stored,) = list_load_tests(reg, model, vb)
        assert stored.id == bad.loadtest.id and not stored.passed and stored.report["version"] == vb
        assert list(stored.report["responses_by_version"]) == [str(vb)]  # pinned: only the candidate answered
        with pytest.raises(PreconditionFailed, match="failed"):
            require_passing_loadtest(reg, model, vb, timedelta(days=1))

        # 2. A loose SLO: published, load-tested (passed, stored), canaried at the first rollout step.
        t0 = time.monotonic()
        loose = LoadTestGate(target, rps=30, duration_s=3, warmup_s=0.5, slo_p99_ms=5000,
                             admin_token=ADMIN_TOKEN)
        good = retrain(reg, model, RetrainConfig(window=window, params=FAST_XGB, loadtest=loose), now=end)
        print(f"retrain + passing load test: {time.monotonic() - t0:.1f}s")
        assert good.published is not None and good.loadtest is not None, good.reason
        v2 = good.published.version
        assert good.loadtest.passed and good.loadtest.version == v2, good.loadtest.failures
        assert good.canary is not None and dict(good.canary.weights) == {v1.version: 90, v2: 10}
        assert f"load test #{good.loadtest.id} passed" in good.reason and "canary at 10%" in good.reason
        assert "promotion will wait" not in good.reason
        assert require_passing_loadtest(reg, model, v2, timedelta(days=1)).id == good.loadtest.id
        assert reg.get_version(model, v2).status == "canary"

        # 3. Outcomes of the new world arrive for both arms; the gateway's own controller (real gate)
        #    promotes the canary.
        t0 = time.monotonic()
        live = synthetic_signals(14_000, seed=99, shift_at=0.0, quality=3.0)
        rng = np.random.default_rng(3)
        promoted = False
        for start in range(0, len(live), 1000):
            weights = dict(reg.get_split(model).weights)
            assert v2 in weights, f"canary rolled back: {weights}"
            chunk = live.iloc[start:start + 1000]
            versions = sorted(weights)
            routed = rng.choice(versions, size=len(chunk), p=[weights[v] / 100 for v in versions])
            # Both arms' rows in arrival order in one insert, then their outcomes, as a gateway logs them:
            # the controller looks every 0.5 s, and rows written one arm at a time let it see an arm
            # ahead of the other (an SRM/coverage hold that never clears; see log_routed).
            log_routed(reg, model, chunk, routed)
            if _wait_for(lambda: dict(reg.get_split(model).weights) == {v2: 100}, 1.0):  # two looks
                promoted = True
                break
        print(f"controller promoted after {start + 1000} rows in {time.monotonic() - t0:.1f}s")
        last = decisions(reg, model, limit=1)
        assert promoted, (dict(reg.get_split(model).weights),
                          last and (last[0]["action"], last[0]["reason"], last[0]["details"].get("srm")))
        assert reg.get_version(model, v2).status == "production"
        # Traffic logged as a gateway logs it never looks like a broken randomisation.
        assert not [d["reason"] for d in decisions(reg, model, canary=v2) if d["details"].get("srm")]
        assert reg.get_version(model, vb).status == "staged"  # the failed candidate never took traffic
    finally:
        gw.stop()
        reg.dispose()
