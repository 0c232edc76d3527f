"""Micro-batcher: many concurrent requests for one version become one Ray Serve call.

A Ray Serve handle call costs milliseconds here, whatever its size, so throughput comes from rows
per call. The policy adapts to load without a timer on the idle path: when nothing is in flight a
request is sent at once; while calls are in flight, arriving rows wait for a free slot (or at most
`max_wait_us` when a slot is free but the batch is small) and leave together."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

ScoreFn = Callable[[np.ndarray], Awaitable[np.ndarray]]


@dataclass(slots=True)
class _Item:
    rows: np.ndarray  # [k, n_features] float32
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """Counters the metrics module reads; plain ints so the hot path pays nothing for them."""

    batches: int = 0
    rows: int = 0
    errors: int = 0
    last_batch_size: int = 0


class BatchObserver:
    """Hook for metrics: called once per dispatched batch, off the per-request path."""

    def on_batch(self, size: int, queue_wait_s: float, call_s: float, ok: bool) -> None:
        """Default: nothing."""


class MicroBatcher:
    def __init__(
        self,
        score: ScoreFn,
        *,
        max_batch: int = 256,
        max_wait_us: int = 500,
        max_inflight: int = 4,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch < 1 or max_inflight < 1 or max_wait_us < 0:
            raise ValueError("max_batch and max_inflight must be >= 1, max_wait_us >= 0")
        self._score = score
        self.max_batch = max_batch
        self.max_wait_s = max_wait_us / 1e6
        self.max_inflight = max_inflight
        self._pending: deque[_Item] = deque()
        self._pending_rows = 0
        self._inflight = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = BatchStats()
        self.observer = observer or BatchObserver()

    @property
    def queued_rows(self) -> int:
        return self._pending_rows

    @property
    def inflight(self) -> int:
        return self._inflight

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        """Scores for `rows` ([k, n] or [n]), in order. Cancelling the caller only drops its rows."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        if rows.ndim == 1:
            rows = rows.reshape(1, -1)
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending.append(_Item(rows, fut))
        self._pending_rows += len(rows)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wakeup.set()
        return await fut

    async def _run(self) -> None:
        while not self._closed:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._inflight >= self.max_inflight:
                self._wakeup.clear()
                await self._wakeup.wait()  # a finishing call sets it
                continue
            if self._inflight > 0 and self._pending_rows < self.max_batch and self.max_wait_s > 0:
                # Busy but a slot is free: give concurrent callers until the oldest row has waited
                # max_wait to join this batch, or until it is full.
                deadline = self._pending[0].enqueued + self.max_wait_s
                while self._pending_rows < self.max_batch and not self._closed:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        break
            else:
                # Idle: let requests that arrived in the same loop turn join, then go now.
                await asyncio.sleep(0)
            batch = self._take()
            if batch:
                self._inflight += 1
                task = asyncio.get_running_loop().create_task(self._dispatch(batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        n = 0
        while self._pending:
            item = self._pending[0]
            if item.future.done():  # caller cancelled or timed out before dispatch
                self._pending.popleft()
                self._pending_rows -= len(item.rows)
                continue
            if batch and n + len(item.rows) > self.max_batch:
                break
            self._pending.popleft()
            self._pending_rows -= len(item.rows)
            batch.append(item)
            n += len(item.rows)
        return batch

    async def _dispatch(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        wait = started - min(i.enqueued for i in batch)
        size = sum(len(i.rows) for i in batch)
        ok = True
        try:
            rows = batch[0].rows if len(batch) == 1 else np.concatenate([i.rows for i in batch])
            scores = await self._score(rows)
            if len(scores) != size:
                raise RuntimeError(f"replica returned {len(scores)} scores for {size} rows")
            offset = 0
            for item in batch:
                k = len(item.rows)
                if not item.future.done():
                    item.future.set_result(scores[offset:offset + k])
                offset += k
        except BaseException as exc:  # every caller in the batch must hear about the failure
            ok = False
            self.stats.errors += 1
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._inflight -= 1
            self.stats.batches += 1
            self.stats.rows += size
            self.stats.last_batch_size = size
            self.observer.on_batch(size, wait, time.perf_counter() - started, ok)
            self._wakeup.set()

    async def close(self) -> None:
        """Stop taking work; calls already in flight finish and answer their callers."""
        self._closed = True
        self._wakeup.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(RuntimeError("batcher closed"))
