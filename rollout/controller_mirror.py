"""The controller's own look, run beside a simulated rollout on the same rows: ``chimera simulate --path
checked`` (and ``--path controller``, where it alone decides).

The simulator feeds its builder incrementally (a look costs what is new since the last one), because a
thousand runs of four hundred looks would not finish otherwise. The live controller does not: at every
look it reads every row since the canary started (``registry.rollouts.look_rows``), rebuilds the look
data from them (``rollout.controller.build_look_data``: its maturity and arrival cut-offs, its rule for
failed rows, its choice of builder), restores the sequential state and the pinned policy from the
previous decision row as the registry stored it (JSON, NaN as null), and skips a look when nothing
counted changed (``rollout.controller.decide``). Any of those steps could disagree with the simulator's
feed, and then the simulated guarantees would be about some other code.

``ControllerMirror`` keeps the simulated rows as the database would hold them (``LookRows`` columns:
the version routed to, the split revision, times, failures, latencies, the outcome with its arrival
time) and at each look runs ``decide`` on all rows logged so far, with the previous decision passed
through JSON. Given the simulator's own decision, ``compare`` raises ``ControllerPathMismatch`` when
the controller's verdict differs from it: the action, the next weight, the guardrail, the counts per
arm, SRM, or a p-value by more than float rounding. What it does not cover is the SQL that selects the
rows (tests/integration/test_controller.py and test_rollout_rows.py check that on both backends).

It costs O(rows) a look, as the controller's look does (3-5 s for a 20,000-request run here, against
~0.3 s incremental), so the 1,000-run tables use the incremental feed, which the suite checks against it
(tests/unit/test_controller_path.py). Only the scenarios the incremental feed cannot express (outcomes
that arrive late with no window declared) are decided by this path alone.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from chimera.jsonsafe import nan_to_none
from registry.rollouts import LookRows
from rollout.controller import decide
from rollout.decision import Decision
from rollout.policy import RolloutPolicy

# p-values agree to this relative tolerance: the two paths sum the same rows in a different grouping.
P_RTOL = 1e-6


class ControllerPathMismatch(AssertionError):
    """The controller's look and the simulator's disagreed on the same rows (message: where and how)."""


class ControllerMirror:
    """Rows of one simulated rollout as the registry would return them, and the controller's looks on
    them (module docstring). The caller writes each request's columns once, when it is routed
    (``log``), and calls ``look`` at every simulated look with the simulator's own decision."""

    def __init__(self, policy: RolloutPolicy, n: int, baseline: int, canary: int) -> None:
        self.policy = policy
        self.baseline, self.canary = baseline, canary
        self.routed = np.zeros(n, dtype=np.int64)
        self.revision = np.zeros(n, dtype=np.int64)
        self.unit = np.zeros(n, dtype=np.int64)
        self.created = np.zeros(n)
        self.latency_ms = np.full(n, np.nan)
        self.failed = np.zeros(n, dtype=bool)
        self.score = np.full(n, np.nan)
        self.value = np.full(n, np.nan)
        self.outcome_at = np.full(n, np.nan)
        self.covariate = np.full(n, np.nan)
        self.periods: list[tuple[int, dict[int, int], float]] = []
        self.previous: dict[str, Any] | None = None
        self.looks = 0

    def split(self, revision: int, weights: dict[int, int], at: float) -> None:
        """A split revision took effect at ``at`` (``registry.rollouts.split_periods``' rows)."""
        self.periods.append((revision, dict(weights), at))

    def log(self, sl: slice, *, arm: np.ndarray, revision: int, unit: np.ndarray, created: np.ndarray,
            failed: np.ndarray, latency_ms: np.ndarray, value: np.ndarray, outcome_at: np.ndarray,
            covariate: np.ndarray | None = None) -> None:
        """Requests ``sl`` as logged: ``value`` is the outcome that will arrive at ``outcome_at`` (NaN:
        never); a failed request's outcome is stored too (the controller must leave it out)."""
        self.routed[sl] = np.where(arm == 1, self.canary, self.baseline)
        self.revision[sl] = revision
        self.unit[sl], self.created[sl] = unit, created
        self.failed[sl], self.latency_ms[sl] = failed, latency_ms
        self.value[sl], self.outcome_at[sl] = value, outcome_at
        if covariate is not None:
            self.covariate[sl] = covariate
            # The served score: the production score for baseline rows, as live; for canary rows only a
            # stand-in, which the business metrics the simulator runs never read (Brier and log-loss do).
            self.score[sl] = covariate

    def look(self, upto: int, until: float, current_weight: int, revision: int,
             sim: Decision | None = None) -> Decision:
        """The controller's decision at ``until`` over the first ``upto`` requests; compared with the
        simulator's ``sim`` when one is given."""
        stored = self.outcome_at[:upto] <= until  # look_rows: NaN without an outcome stored by then
        rows = LookRows(
            routed=self.routed[:upto], revision=self.revision[:upto], unit=list(self.unit[:upto]),
            created=self.created[:upto], latency_ms=self.latency_ms[:upto], failed=self.failed[:upto],
            score=self.score[:upto], value=np.where(stored, self.value[:upto], np.nan),
            outcome_at=np.where(stored, self.outcome_at[:upto], np.nan), covariate=self.covariate[:upto])
        self.looks += 1
        verdict = decide(self.policy, self.previous, rows, self.periods, self.baseline, self.canary, until,
                         current_weight, revision)
        if verdict is None:  # new requests arrive before every simulated look, so this is a fault
            raise ControllerPathMismatch(f"look {self.looks} (t={until:.2f} s): the controller saw nothing "
                                         "new")
        decision, details = verdict
        if sim is not None:
            compare(decision, sim, self.looks, until)
        # What the next look reads back: the decision row's details as the registry stores them.
        self.previous = {"action": decision.action,
                         "details": json.loads(json.dumps(nan_to_none({**decision.to_dict(), **details})))}
        return decision


def compare(controller: Decision, sim: Decision, look_no: int, until: float) -> None:
    """Raise ``ControllerPathMismatch`` naming every field where the two verdicts differ."""
    diffs = [f"{name}: controller {a!r}, simulator {b!r}" for name, a, b in (
        ("action", controller.action, sim.action), ("next_weight", controller.next_weight, sim.next_weight),
        ("guardrail", controller.guardrail, sim.guardrail), ("n_baseline", controller.n_baseline,
                                                             sim.n_baseline),
        ("n_canary", controller.n_canary, sim.n_canary), ("srm", controller.srm, sim.srm)) if a != b]
    for name in ("p_value_worse", "p_value_better", "p_value", "p_errors", "p_latency", "p_srm"):
        a, b = float(getattr(controller, name)), float(getattr(sim, name))
        if not (math.isclose(a, b, rel_tol=P_RTOL, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))):
            diffs.append(f"{name}: controller {a!r}, simulator {b!r}")
    if diffs:
        raise ControllerPathMismatch(f"look {look_no} (t={until:.2f} s): " + "; ".join(diffs))
