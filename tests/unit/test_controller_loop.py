"""rollout.loop.ControllerLoop: the controller looks every interval, but never spends more than
`max_duty` of the time looking (a look's cost grows with the rollout and runs in the serving process)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from rollout.loop import ControllerLoop


def test_rounds_under_a_second_keep_the_interval() -> None:
    """A young or small rollout looks as often as the operator asked (a failing canary must still be
    rolled back within seconds), even when that is more than 10 % of the time."""
    loop = ControllerLoop(lambda m: None, lambda: [], interval_s=0.5)
    assert loop.next_wait(0.05) == 0.5
    assert loop.next_wait(0.9) == 0.5
    assert loop.next_wait(1.5) == pytest.approx(13.5)  # over a second: capped at 10 %


def test_slow_looks_stretch_the_wait_to_the_duty_cap_and_come_back(caplog: pytest.LogCaptureFixture) -> None:
    loop = ControllerLoop(lambda m: None, lambda: [], interval_s=2.0)
    with caplog.at_level(logging.INFO, logger="rollout.loop"):
        assert loop.next_wait(20.0) == pytest.approx(180.0)  # 20 s of 200 s: 10 %
        assert loop.next_wait(30.0) == pytest.approx(270.0)
        assert loop.next_wait(0.1) == 2.0
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2  # one when the stretch starts, one when it ends; none in between
    assert "took 20.0 s" in messages[0] and "waiting 180.0 s" in messages[0]
    assert "back to waiting 2.0 s" in messages[1]
    assert (loop.last_round_s, loop.wait_s) == (0.1, 2.0)


def test_max_duty_must_be_a_share() -> None:
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="max_duty"):
            ControllerLoop(lambda m: None, lambda: [], interval_s=1.0, max_duty=bad)


def test_running_loop_spaces_slow_looks() -> None:
    """On a real event loop: looks that take 0.1 s with a 0.01 s interval and a 50 % cap start at least
    0.2 s apart (0.1 s looking, 0.1 s waiting), and a model whose look fails does not stop the loop."""
    starts: list[float] = []

    def run_once(model: str) -> None:
        if model == "broken":
            raise RuntimeError("look failed")
        starts.append(time.monotonic())
        time.sleep(0.1)

    async def main() -> None:
        loop = ControllerLoop(run_once, lambda: ["m", "broken"], interval_s=0.01, max_duty=0.5,
                              min_stretch_s=0.0)
        loop.start()
        await asyncio.sleep(1.0)
        loop.cancel()

    asyncio.run(main())
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert len(starts) >= 3
    assert min(gaps) >= 0.19, gaps
