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


def test_demo_runs_every_act_on_its_own_within_five_minutes(tmp_path: Path) -> None:
    import ray

    workdir = tmp_path / "demo"
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, COLUMNS="200",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("CHIMERA_REGISTRY_URL", None)
    exe = Path(sys.executable).with_name("chimera")
    proc = subprocess.run([str(exe), "demo", "--workdir", str(workdir)], env=env, capture_output=True,
                          text=True, timeout=420)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    finished = re.search(r"demo finished in (\d+) s", out)
    assert finished and int(finished.group(1)) < 300, out[-2000:]
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
        # Issue 14: the better retrained v4 (and v3) are never rolled back. One run per `make test`, not
        # five: five clean runs would bound the false-rollback rate only below 45 % (95 %), while the
        # rate is held by the decision path itself and checked where it can be measured, in
        # tests/unit/test_simulate.py (1,000-run figures in docs/statistics.md). What failed before was
        # structural and is checked here on every run: the pinned load-test requests counted as canary
        # traffic, and a batch stamped one latency on the rows of both arms.
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
