"""The simulation decides as the live controller does (rollout.controller_mirror): on the same generated
rows, the controller's own look (``rollout.controller.decide``: every row so far rebuilt through
``build_look_data``, the state and pinned policy read back through JSON) and the simulator's incremental
feed give the same verdict at every look, for every scenario the simulator runs itself. And the check
is not one that cannot fail: a controller that reads the rows or its stored state differently is caught.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import rollout.controller as controller
from rollout import simulate_methods
from rollout.controller_mirror import ControllerPathMismatch
from rollout.decision import SequentialState
from rollout.scenarios import SCENARIO_LIST, SCENARIOS
from rollout.simulate import main, run_once, simulate

RUN_ONCE_SCENARIOS = [s.name for s in SCENARIO_LIST if s.kind not in simulate_methods.KINDS]
# Long enough for outcomes to mature (aa-delayed: a 120 s window at 50 requests a second) and for the
# covariate's 1,000 baseline outcomes; short enough for the suite (the check costs O(rows) a look).
ROWS = {"aa-delayed": 10_000}


def _run(name: str, seed: int, path: str, **kw):
    return run_once(SCENARIOS[name], np.random.default_rng([2026, seed]), max_requests=ROWS.get(name, 6_000),
                    path=path, **kw)


@pytest.mark.parametrize("name", RUN_ONCE_SCENARIOS)
def test_every_scenario_decides_alike_through_the_controllers_own_look(name):
    """Two runs each, adjusted (the default policy) and unadjusted (the covariate off): ``checked`` raises
    at the first look where the two paths differ, and its run ends as the fast path's does."""
    for seed in (0, 1):
        for covariate in (True, False):
            checked = _run(name, seed, "checked", covariate=covariate)
            assert checked == _run(name, seed, "incremental", covariate=covariate)


def _keep_failed_rows(policy, rows, *args, **kw):
    return ORIGINAL_BUILD(policy, dataclasses.replace(rows, failed=np.zeros_like(rows.failed)), *args, **kw)


ORIGINAL_BUILD = controller.build_look_data


def test_a_controller_that_reads_the_failure_flags_differently_is_caught(monkeypatch):
    """Failed rows then count as successes for the error guardrail, and carry outcomes into the test."""
    monkeypatch.setattr(controller, "build_look_data", _keep_failed_rows)
    with pytest.raises(ControllerPathMismatch, match="p_errors: controller"):
        _run("aa-errors", 0, "checked")


def test_a_controller_that_loses_the_covariate_record_on_restart_is_caught(monkeypatch):
    """The state goes through JSON between looks, as in the decisions table: a field that does not come
    back (here the fixed θ) changes the next look."""
    original = SequentialState.from_dict

    def forgetful(data):
        return dataclasses.replace(original(data), covariate=None)

    monkeypatch.setattr(SequentialState, "from_dict", staticmethod(forgetful))
    with pytest.raises(ControllerPathMismatch):
        _run("aa", 0, "checked")


def test_the_block_standin_rule_gave_the_two_paths_different_stand_ins():
    """The finding behind covariate_standin "trailing": under the block rule a missing x's stand-in
    depended on how rows were grouped into calls, so the controller (every row at each look) and the
    simulator (each look's new rows) computed different statistics for the same rows."""
    sc = dataclasses.replace(SCENARIOS["aa-step-covariate-gaps"], policy={"covariate_standin": "block"})
    with pytest.raises(ControllerPathMismatch, match="p_value"):
        run_once(sc, np.random.default_rng(0), path="checked")


def test_late_outcomes_without_a_declared_window_take_the_controllers_path():
    """The incremental feed takes an outcome once; the controller counts what has arrived by each look.
    So such a scenario runs the controller's look whatever path is asked, and the runs agree."""
    sc = SCENARIOS["aa-late-undeclared"]
    fast = run_once(sc, np.random.default_rng(3), max_requests=6_000)
    slow = run_once(sc, np.random.default_rng(3), max_requests=6_000, path="controller")
    assert fast == slow
    with pytest.raises(ValueError, match="path must be one of"):
        run_once(sc, np.random.default_rng(3), path="fast")


def test_late_outcomes_aa_and_a_canary_whose_outcomes_arrive_later_are_not_rolled_back():
    """20 runs each over 12,000 requests (the controller's look costs O(rows), so the suite stops at four
    minutes of traffic; the full counts are in docs/statistics.md and `make acceptance`). A canary whose
    outcomes arrive three times later looks worse on what has arrived (failures arrive first); the
    outcome-coverage check holds it instead of letting the primary test roll it back."""
    undeclared = simulate("aa-late-undeclared", 20, seed=2026, max_requests=12_000)
    assert undeclared["path"] == "controller", undeclared  # the report says which path decided
    assert undeclared["rollback"]["rate"] <= 0.10 and undeclared["promotion"]["rate"] <= 0.10, undeclared
    late = simulate("aa-canary-late", 20, seed=2026, max_requests=12_000)
    assert late["rollback"]["rate"] == 0.0 and late["promotion"]["rate"] == 0.0, late
    assert late["held_by_srm"]["rate"] >= 0.9, late


def test_cli_reports_the_path_and_the_policy_and_exits_2_on_a_disagreement(capsys, monkeypatch):
    assert main(["--scenario", "fail", "--runs", "3", "--path", "checked", "--no-covariate"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == "checked" and out["covariate"] is False and all(out["checks"].values())
    monkeypatch.setattr(controller, "build_look_data", _keep_failed_rows)
    args = ["--scenario", "aa-errors", "--runs", "1", "--max-requests", "3000", "--path", "checked"]
    assert main(args) == 2
    assert "disagree" in capsys.readouterr().err
