"""The rollout controller's timer: pure asyncio (no gRPC, no gateway import). A gateway starts one;
after each interval it runs the controller once per model that has a canary, in a worker thread (a
look reads the database). The advisory lock inside the controller's run_once lets only one gateway act
at a time, so every gateway may run this loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)


class ControllerLoop:
    """`run_once(model)` after every `interval_s`, for each model `models()` yields at that moment
    (read lazily, between looks: a model whose canary ended meanwhile is not looked at)."""

    def __init__(self, run_once: Callable[[str], object], models: Callable[[], Iterable[str]],
                 interval_s: float) -> None:
        self.run_once = run_once
        self.models = models
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self, interval_s: float | None = None) -> None:
        """Start (or restart, with a new interval if given) the loop on the running event loop."""
        if interval_s is not None:
            self.interval_s = interval_s
        self.cancel()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            for model in self.models():
                try:
                    await asyncio.to_thread(self.run_once, model)
                except Exception:
                    log.exception("rollout controller failed for %s", model)
