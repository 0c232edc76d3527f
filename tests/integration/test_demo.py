"""`make demo` end to end (the command README.md starts with): `chimera demo` trains, publishes, serves
90/10, rolls back a worse canary and promotes a better one on the controller's own decisions, then
goes through drift -> retrain -> canary -> promote, in under five minutes. It joins the session's Ray
cluster (as `chimera serve` joins RAY_ADDRESS) instead of starting a second one on two cores."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from registry import Registry
from registry.rollouts import decisions

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


# How many demos in a row: 1 in `make test` (a demo takes 80-130 s and the suite's budget is 30 minutes),
# 5 with `make demo-repeat` (CHIMERA_DEMO_RUNS=5), the issue-14 check that the demo never rolls back its
# better versions.
RUNS = int(os.environ.get("CHIMERA_DEMO_RUNS", "1"))


@pytest.mark.timeout(450 * RUNS + 150)  # each demo may take up to its own subprocess timeout (420 s)
def test_demo_runs_every_act_on_its_own_within_five_minutes(tmp_path: Path) -> None:
    """Each of RUNS demos in a row, at the default rollout policy's statistics (the demo only shortens
    the steps): every act as the story says, and the better v3 and the retrained v4 never rolled back.

    Why one run in `make test` is not the whole check: five clean runs in a row bound a per-run false
    rollback probability only below 45 % (95 % confidence: 0.55**5 = 0.05), so no affordable number of
    demos measures the rate. The rate is held by the decision path and measured where it can be, by
    `chimera simulate` through the same builder and look (docs/statistics.md, 1,000 runs per scenario,
    including aa-bursts: each replica stalling on its own, and aa-cold: a canary replica 4x slower for
    its first 15 s). What the demo run checks on every run is what made it fail before: pinned load-test
    rows counted as canary traffic, one latency stamped on a batch's rows of both arms, and a burst of
    slow requests from one replica counted as hundreds of independent requests (the latency guardrail
    now takes its variance over time windows). `make demo-repeat` runs the five in a row."""
    import ray

    for run in range(RUNS):
        _one_demo(tmp_path / f"demo{run}", ray.get_runtime_context().gcs_address, run)


def _one_demo(workdir: Path, gcs_address: str, run: int) -> None:
    env = dict(os.environ, RAY_ADDRESS=gcs_address, COLUMNS="200", RAY_USAGE_STATS_ENABLED="0")
    env.pop("CHIMERA_REGISTRY_URL", None)
    exe = Path(sys.executable).with_name("chimera")
    proc = subprocess.run([str(exe), "demo", "--workdir", str(workdir)], env=env, capture_output=True,
                          text=True, timeout=420)
    out = proc.stdout
    assert proc.returncode == 0, f"run {run + 1} of {RUNS}: " + out[-4000:] + proc.stderr[-4000:]
    finished = re.search(r"demo finished in (\d+) s", out)
    assert finished and int(finished.group(1)) < 300, out[-2000:]
    print(f"demo run {run + 1} of {RUNS}: finished in {finished.group(1)} s")
    assert "observed split" in out
    for act in ("Act 1", "Act 2", "Act 3"):
        assert act in out

    reg = Registry(f"sqlite:///{(workdir / 'registry.db').resolve()}")
    try:
        (model,) = [m.name for m in reg.list_models()]
        statuses = {v.version: v.status for v in reg.list_versions(model)}
        assert statuses[2] == "rolled_back" and statuses[4] == "production", statuses
        assert dict(reg.get_split(model).weights) == {4: 100}
        made = decisions(reg, model)
        by_canary = {(d["canary_version"], d["action"]) for d in made}
        assert {(2, "rollback"), (3, "promote"), (4, "promote")} <= by_canary, by_canary
        rollback = next(d for d in made if d["canary_version"] == 2 and d["action"] == "rollback")
        # The operator sees the decision with its always-valid p-value, as stored.
        assert f"decision rollback for v2 (vs v1): {rollback['test']} always-valid p-value = " \
            f"{rollback['p_value']:.2e}" in " ".join(out.split()), out[-3000:]
        # Issue 14: the better retrained v4 (and v3) are never rolled back (see the test's docstring).
        assert not {(v, a) for v, a in by_canary if v in (3, 4) and a == "rollback"}, by_canary
        for d in made:
            print(f"decision v{d['canary_version']} {d['action']}: {d['reason']}")
        with reg.session() as s:
            from sqlalchemy import func, select

            from registry.models import Prediction

            pinned = dict(s.execute(select(Prediction.version, func.count())
                                    .where(Prediction.pinned.is_(True)).group_by(Prediction.version)).all())
        assert pinned.get(3, 0) > 0 and pinned.get(4, 0) > 0, pinned  # the load tests were logged as pinned
    finally:
        reg.dispose()
