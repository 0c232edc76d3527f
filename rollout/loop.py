"""The rollout controller's timer: pure asyncio (no gRPC, no gateway import). A gateway starts one;
after each interval it runs the controller once per model that has a canary, in a worker thread (a
look reads the database). The advisory lock inside the controller's run_once lets only one gateway act
at a time, so every gateway may run this loop.

A look reads every routed request since the canary started (registry.rollouts.look_rows), so its cost
grows with the rollout: on PostgreSQL at ~1,400 req/s, half an hour into a rollout, one look took ~50 s
(the bench's PostgreSQL soak, docs/performance.md). On PostgreSQL the looks run in a child process
(rollout.lookprocess), on SQLite in a thread of the serving process, whose event loop shares the GIL
with it; either way they share the machine's cores with serving, so the loop keeps the controller's
share of the time at most `max_duty` (10 %): after a round of looks that took T seconds, T over
`min_stretch_s` (1 s), it waits max(interval, T * (1 - max_duty) / max_duty) before the next. A round
under a second keeps the operator's interval (a young rollout, or a small one, looks as often as asked:
a failing canary is still rolled back within seconds). Fewer looks change no guarantee (the tests are
always-valid, whatever the look schedule: docs/statistics.md); they only make a long rollout's
decisions later."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)
MAX_DUTY = 0.1  # share of the time the controller may spend looking (module docstring)
MIN_STRETCH_S = 1.0  # rounds of looks shorter than this keep the interval


class ControllerLoop:
    """`run_once(model)` after every `interval_s`, for each model `models()` yields at that moment
    (read lazily, between looks: a model whose canary ended meanwhile is not looked at)."""

    def __init__(self, run_once: Callable[[str], object], models: Callable[[], Iterable[str]],
                 interval_s: float, max_duty: float = MAX_DUTY, min_stretch_s: float = MIN_STRETCH_S) -> None:
        if not 0 < max_duty <= 1:
            raise ValueError(f"max_duty: {max_duty} is not in (0, 1]")
        self.run_once = run_once
        self.models = models
        self.interval_s = interval_s
        self.max_duty = max_duty
        self.min_stretch_s = min_stretch_s
        self.last_round_s = 0.0  # how long the last round of looks took (chimera_rollout_round_seconds)
        self.wait_s = interval_s  # the wait before the next round (chimera_rollout_wait_seconds)
        self._task: asyncio.Task[None] | None = None

    def start(self, interval_s: float | None = None) -> None:
        """Start (or restart, with a new interval if given) the loop on the running event loop."""
        if interval_s is not None:
            self.interval_s = interval_s
        self.wait_s = self.interval_s
        self.cancel()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def next_wait(self, round_s: float) -> float:
        """The wait after a round of looks that took `round_s`: the interval, or longer so that looking
        takes at most `max_duty` of the time. Logs when the stretch starts and ends."""
        stretched = round_s * (1.0 - self.max_duty) / self.max_duty if round_s > self.min_stretch_s else 0.0
        wait = max(self.interval_s, stretched)
        if wait > self.interval_s and self.wait_s <= self.interval_s:
            log.warning("rollout controller: a round of looks took %.1f s; waiting %.1f s between rounds "
                        "instead of %.1f s so that looking takes at most %.0f %% of the time", round_s, wait,
                        self.interval_s, self.max_duty * 100)
        elif wait <= self.interval_s < self.wait_s:
            log.info("rollout controller: a round took %.2f s; back to waiting %.1f s", round_s, wait)
        self.last_round_s, self.wait_s = round_s, wait
        return wait

    async def _run(self) -> None:
        wait = self.interval_s
        while True:
            await asyncio.sleep(wait)
            started = time.monotonic()
            for model in self.models():
                try:
                    await asyncio.to_thread(self.run_once, model)
                except Exception:
                    log.exception("rollout controller failed for %s", model)
            wait = self.next_wait(time.monotonic() - started)
