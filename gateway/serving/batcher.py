"""Micro-batcher: many concurrent requests for one version become one Ray Serve call.

A Ray Serve call costs milliseconds of latency and about a millisecond of this process's CPU
whatever its size, so throughput comes from rows per call. The policy adapts to load and has no
timer on the idle path:

- idle (no call in flight): the rows that arrived in the same event-loop turn leave together, at
  once. A lone request never waits.
- busy (calls in flight): arriving rows queue. When a call returns, everything queued leaves in the
  next call (up to `max_batch` rows), so a batch holds what arrived during one round trip and the
  call rate stays near one per round trip however high the load.
- a full batch (`max_batch` rows) leaves at once on a free slot; so does a partial batch whose oldest
  row has waited longer than twice the recent call latency (capped by `max_wait_us`): a slow call
  does not hold the rows behind it hostage. Up to `max_inflight` calls are in flight per version.

Everything runs as event-loop callbacks (no background task, no `asyncio.wait_for` per wakeup, at
most one timer per batcher). A caller's deadline is checked when its batch is formed, not with a
timer per request: gRPC cancels a caller whose deadline passes, and a cancelled caller's rows are
dropped.

Failure semantics: an exception from the scoring call reaches every caller of that batch and no other;
a cancelled or expired caller is dropped from the queue (or, if already in flight, its score is thrown
away) and never affects the others. A NaN or infinite score is never an answer: the caller whose rows
got one fails with UnavailableError (the replica's fault, so the predictor fails it over like any
replica error), the other callers of the batch get their scores, and `stats.nonfinite` counts it.

Tracing (chimera.tracing): with a tracer, each caller's current span context is kept with its rows
and every call runs inside a `chimera.batch` span: a child of the first caller's span, linked to the
other callers' spans (a batch serves many traces; OpenTelemetry expresses that with links). The score
function runs with that span current, so its own spans are the batch's children. Without a tracer
(tracing off) nothing of this runs: one None check per enqueue and per call."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from opentelemetry.trace import SpanContext, Tracer

from chimera.tracing import batch_parent, current_span_context
from gateway.serving.errors import UnavailableError

ScoreFn = Callable[[np.ndarray], Awaitable[np.ndarray]]


class _Item:
    """One caller's rows. `one`: a single-row caller gets a float, not an array slice."""

    __slots__ = ("rows", "future", "enqueued", "one", "deadline", "timer", "span")

    def __init__(self, rows: np.ndarray, future: asyncio.Future[Any], enqueued: float, one: bool,
                 deadline: float | None) -> None:
        self.rows = rows
        self.future = future
        self.enqueued = enqueued
        self.one = one
        self.deadline = deadline
        self.timer: asyncio.TimerHandle | None = None
        self.span: SpanContext | None = None  # the caller's span, when tracing is on


class NonFiniteScore(UnavailableError):
    """The replica scored a caller's row as NaN or infinite: no answer to give (gRPC UNAVAILABLE)."""


@dataclass
class BatchStats:
    """Counters the metrics module reads; plain ints so the hot path pays nothing for them."""

    batches: int = 0
    rows: int = 0
    errors: int = 0
    expired: int = 0
    nonfinite: int = 0  # callers failed because the replica returned a NaN/inf score for their rows


class BatchObserver:
    """Hook for metrics: called once per dispatched batch, off the per-request path."""

    def on_batch(self, size: int, queue_wait_s: float, call_s: float, ok: bool) -> None:
        """Default: nothing."""

    def on_call_path(self, path: str) -> None:
        """How a scoring call reached the replicas: `local` (a replica's local channel), `serve` (a Ray
        Serve call) or `local_broken` (the local channel broke; the call then went through Serve).
        Default: nothing."""


class DeadlineExceeded(TimeoutError):
    """The caller's deadline passed before its rows were scored (gRPC DEADLINE_EXCEEDED)."""


class MicroBatcher:
    def __init__(
        self,
        score: ScoreFn,
        *,
        max_batch: int = 256,
        max_wait_us: int = 20_000,
        max_inflight: int = 4,
        observer: BatchObserver | None = None,
        tracer: Tracer | None = None,
        span_attributes: dict[str, Any] | None = None,
    ) -> None:
        if max_batch < 1 or max_inflight < 1 or max_wait_us < 0:
            raise ValueError("max_batch and max_inflight must be >= 1, max_wait_us >= 0")
        self._score = score
        self.max_batch = max_batch
        self.max_wait_s = max_wait_us / 1e6
        self.max_inflight = max_inflight
        self.call_latency_s = self.max_wait_s / 2  # moving average of the scoring call's latency
        self._pending: deque[_Item] = deque()
        self._pending_rows = 0
        self._inflight = 0
        self._scheduled = False  # a call_soon(_pump) is pending
        self._timer: asyncio.TimerHandle | None = None  # the partial-batch wait timer
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = BatchStats()
        self.observer = observer or BatchObserver()
        self._tracer = tracer  # None: tracing off
        self._span_attributes = span_attributes or {}

    @property
    def queued_rows(self) -> int:
        return self._pending_rows

    @property
    def inflight(self) -> int:
        return self._inflight

    # ------------------------------------------------------------------ callers
    def enqueue(self, rows: np.ndarray, *, one: bool = False, expires_in: float | None = None,
                timeout: float | None = None) -> asyncio.Future[Any]:
        """Queue `rows` ([k, n]) and return a future for their scores: an array of k floats, or one
        float when `one` (k must then be 1). Synchronous, so a stream can enqueue without a task per
        row. `expires_in` (seconds): rows still queued by then are dropped and the future fails with
        DeadlineExceeded, checked when batches are formed (free: meant for gRPC callers, whom gRPC
        cancels at their deadline anyway). `timeout` (seconds): the same failure at that time even
        while the call is in flight (one timer per caller)."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        now = loop.time()
        deadline = None if expires_in is None else now + expires_in
        if timeout is not None:
            deadline = now + timeout if deadline is None else min(deadline, now + timeout)
        item = _Item(rows, fut, now, one, deadline)
        if self._tracer is not None:
            item.span = current_span_context()
        if timeout is not None:
            item.timer = loop.call_at(deadline, self._expire, fut)  # type: ignore[arg-type]
        self._pending.append(item)
        self._pending_rows += len(rows)
        if not self._scheduled:
            # Let every request that arrives in this loop turn join the batch, then decide.
            self._scheduled = True
            loop.call_soon(self._pump)
        return fut

    async def submit(self, rows: np.ndarray, *, timeout: float | None = None) -> np.ndarray:
        """Scores for `rows` ([k, n] or [n]), in order. Cancelling the caller only drops its rows."""
        if rows.ndim == 1:
            rows = rows.reshape(1, -1)
        return await self.enqueue(rows, timeout=timeout)  # type: ignore[no-any-return]

    async def submit_one(self, row: np.ndarray, *, timeout: float | None = None) -> float:
        """The score of one row ([1, n])."""
        return await self.enqueue(row, one=True, timeout=timeout)  # type: ignore[no-any-return]

    def _expire(self, fut: asyncio.Future[Any]) -> None:
        if not fut.done():
            self.stats.expired += 1
            fut.set_exception(DeadlineExceeded("deadline exceeded while waiting for a score"))

    # ------------------------------------------------------------------ policy
    def _pump(self, patient: bool = True) -> None:
        """Dispatch as many batches as the policy allows now; otherwise arm the wait timer.
        `patient=False` (the timer fired, or a call just returned) sends partial batches too."""
        self._scheduled = False
        loop = self._loop
        assert loop is not None
        while self._pending and self._inflight < self.max_inflight and not self._closed:
            if patient and self._inflight > 0 and self._pending_rows < self.max_batch:
                # Busy and the batch is not full: it leaves when a call returns, or when its oldest
                # row has waited twice the usual call latency (a slow call must not hold it).
                due = self._pending[0].enqueued + min(self.max_wait_s, 2 * self.call_latency_s)
                if loop.time() < due:
                    if self._timer is None:
                        self._timer = loop.call_at(due, self._on_timer)
                    return
            batch, n = self._take(loop.time())
            if not batch:
                continue
            self._inflight += 1
            task = loop.create_task(self._dispatch(batch, n))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._timer is not None and (not self._pending or self._inflight >= self.max_inflight):
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        self._pump(patient=False)

    def _take(self, now: float) -> tuple[list[_Item], int]:
        batch: list[_Item] = []
        n = 0
        pending = self._pending
        while pending:
            item = pending[0]
            k = len(item.rows)
            fut = item.future
            if fut.done() or (item.deadline is not None and item.deadline <= now):
                pending.popleft()  # cancelled, timed out, or past its deadline: never sent
                self._pending_rows -= k
                if not fut.done():
                    self.stats.expired += 1
                    fut.set_exception(DeadlineExceeded("deadline exceeded before the row was sent"))
                if item.timer is not None:
                    item.timer.cancel()
                continue
            if batch and n + k > self.max_batch:
                break
            pending.popleft()
            self._pending_rows -= k
            batch.append(item)
            n += k
        return batch, n

    # ------------------------------------------------------------------ one call
    async def _dispatch(self, batch: list[_Item], size: int) -> None:
        loop = self._loop
        assert loop is not None
        started = loop.time()
        wait = started - batch[0].enqueued
        ok = True
        try:
            rows = batch[0].rows if len(batch) == 1 else np.concatenate([i.rows for i in batch])
            if self._tracer is None:
                scores = await self._score(rows)
            else:
                scores = await self._traced_score(rows, batch, size, wait)
            if len(scores) != size:
                raise RuntimeError(f"replica returned {len(scores)} scores for {size} rows")
            values = scores.tolist() if any(i.one for i in batch) else None
            finite = np.isfinite(scores)
            bad = None if finite.all() else finite
            offset = 0
            for item in batch:
                k = len(item.rows)
                fut = item.future
                if bad is not None and not bad[offset:offset + k].all():
                    self.stats.nonfinite += 1
                    if not fut.done():
                        fut.set_exception(NonFiniteScore("the replica returned a non-finite score"))
                elif not fut.done():
                    fut.set_result(values[offset] if item.one else scores[offset:offset + k])  # type: ignore[index]
                if item.timer is not None:
                    item.timer.cancel()
                offset += k
        except BaseException as exc:  # every caller in the batch must hear about the failure
            ok = False
            self.stats.errors += 1
            err = exc if isinstance(exc, Exception) else RuntimeError(f"scoring call interrupted: {exc!r}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
                if item.timer is not None:
                    item.timer.cancel()
            if not isinstance(exc, Exception):
                raise
        finally:
            elapsed = loop.time() - started
            self.call_latency_s += 0.2 * (elapsed - self.call_latency_s)
            self._inflight -= 1
            self.stats.batches += 1
            self.stats.rows += size
            self.observer.on_batch(size, wait, elapsed, ok)
            if self._pending and not self._closed:
                # A slot just freed: what queued during the call leaves now.
                self._pump(patient=False)

    async def _traced_score(self, rows: np.ndarray, batch: list[_Item], size: int, wait: float) -> np.ndarray:
        """The scoring call inside a `chimera.batch` span (child of the first caller, links to the rest)."""
        assert self._tracer is not None
        parent, links = batch_parent(item.span for item in batch)
        attributes = {**self._span_attributes, "chimera.batch.rows": size,
                      "chimera.batch.callers": len(batch), "chimera.batch.queue_wait_ms": wait * 1e3}
        with self._tracer.start_as_current_span("chimera.batch", context=parent, links=links,
                                                attributes=attributes):
            return await self._score(rows)

    async def close(self) -> None:
        """Stop taking work; calls already in flight finish and answer their callers."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(RuntimeError("batcher closed"))
            if item.timer is not None:
                item.timer.cancel()
        self._pending_rows = 0
