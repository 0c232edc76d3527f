"""The error guardrail over time windows (RolloutPolicy.error_windows, rollout.lookdata): a replica down
for a few seconds fails every request of its arm in a few windows, which is one shock, not hundreds of
independent failures; a canary that fails steadily is still rolled back as fast as before. The
simulations (aa-error-bursts, errors-worse, fail in tests/unit/test_simulate.py) show the rates."""

from __future__ import annotations

import numpy as np

from rollout.decision import look
from rollout.lookdata import BASELINE, CANARY, LookBuilder
from rollout.policy import RolloutPolicy
from rollout.splits import policy_from_dict, stored_policy

WINDOW = 50  # baseline requests per window (the policy's latency_window)


def _requests(down: range, windows: int = 30, canary_per_window: int = 5) -> LookBuilder:
    """`windows` windows of 50 baseline and 5 canary requests in log order (a 10 % canary); every
    canary request in the windows of `down` fails (its replica is down), nothing else fails."""
    b = LookBuilder("success_rate", latency_window=WINDOW)
    for w in range(windows):
        half = [BASELINE] * (WINDOW // 2)
        arm = np.array(half + [CANARY] * canary_per_window + half)  # canary rows amid the window's
        failed = (arm == CANARY) & (w in down)
        units = np.arange(arm.size) + w * arm.size
        b.add_requests(1, 10, arm, units, failed, np.full(arm.size, 5.0))
    return b


def test_a_canary_replica_down_for_five_windows_is_one_shock_not_25_failures() -> None:
    """25 of the canary's 150 requests fail, all in windows 2-6 (a replica restarting), none after. On
    the per-request variance that is 16.7 % against 0 %, a rollback; over the windows it is not."""
    data = _requests(down=range(2, 7)).data(10)
    windowed, _ = look(RolloutPolicy(), data)
    per_request, _ = look(RolloutPolicy(error_windows=False), data)
    assert per_request.action == "rollback" and per_request.guardrail == "error_rate", per_request.reason
    assert windowed.guardrail != "error_rate", windowed.reason
    (period,) = data.periods
    assert period.errors == (0, 25) and period.error_windows == 30
    assert period.error_window_var > 3 * (25 / 150) * (125 / 150) / 150  # well above the per-request one


def test_a_canary_failing_every_request_is_rolled_back_at_once_either_way() -> None:
    """Every window the same (all the canary's requests fail): the windows add no variance, so the
    rollback comes at the same look as on the per-request variance."""
    for windows in (2, 4, 10):
        data = _requests(down=range(0, windows), windows=windows).data(10)
        windowed, _ = look(RolloutPolicy(), data)
        per_request, _ = look(RolloutPolicy(error_windows=False), data)
        assert (windowed.action, windowed.guardrail) == (per_request.action, per_request.guardrail), windows
    assert (windowed.action, windowed.guardrail) == ("rollback", "error_rate")


def test_decisions_stored_before_the_windows_recompute_with_the_per_request_rule() -> None:
    assert RolloutPolicy().error_windows is True and policy_from_dict({}).error_windows is True
    assert stored_policy({"latency_window": 50}).error_windows is False
    assert stored_policy({"latency_window": 50, "error_windows": True}).error_windows is True
