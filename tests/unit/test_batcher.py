"""MicroBatcher correctness on a real asyncio loop with a local scoring function (no Ray).

What must hold whatever the timing: every caller gets its own rows' scores; a failed call fails
exactly the callers in that batch; a cancelled caller never breaks the others; deadlines end
waits; a lone request is sent at once; several calls can be in flight per version. Nothing here
asserts speed beyond "no added wait when idle" with a generous bound."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from gateway.serving.batcher import DeadlineExceeded, MicroBatcher

W = 4
WEIGHTS = np.array([1.0, 10.0, 100.0, 1000.0], dtype=np.float32)


def expected(rows: np.ndarray) -> np.ndarray:
    return rows.astype(np.float64) @ WEIGHTS.astype(np.float64)


class Scorer:
    """Records every call; optionally blocks on a gate or fails when a row is poisoned (-1 in col 0)."""

    def __init__(self, delay: Callable[[], float] = lambda: 0.0) -> None:
        self.calls: list[np.ndarray] = []
        self.delay = delay
        self.gate: asyncio.Event | None = None
        self.inflight = 0
        self.max_inflight = 0

    async def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.calls.append(rows.copy())
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            d = self.delay()
            await asyncio.sleep(d)
            if (rows[:, 0] == -1).any():
                raise RuntimeError("poisoned batch")
            return expected(rows)
        finally:
            self.inflight -= 1


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


def test_every_caller_gets_its_own_rows_scores_under_concurrency() -> None:
    rng = np.random.default_rng(1)

    async def main() -> None:
        scorer = Scorer(delay=lambda: random.uniform(0, 0.003))
        b = MicroBatcher(scorer, max_batch=64, max_wait_us=2000, max_inflight=3)

        async def caller(i: int) -> None:
            await asyncio.sleep(random.uniform(0, 0.02))
            k = 1 + i % 5
            rows = rng.normal(size=(k, W)).astype(np.float32)
            if k == 1 and i % 2:
                got: Any = await b.submit_one(rows)
                assert got == pytest.approx(float(expected(rows)[0]))
            else:
                got = await b.submit(rows)
                np.testing.assert_allclose(got, expected(rows), rtol=1e-12)

        await asyncio.gather(*(caller(i) for i in range(600)))
        sent = sum(len(c) for c in scorer.calls)
        assert sent == sum(1 + i % 5 for i in range(600))  # every row scored exactly once
        assert b.stats.batches < 600 and max(len(c) for c in scorer.calls) <= 64
        await b.close()

    run(main())


def test_error_reaches_every_caller_in_the_failed_batch_and_only_them() -> None:
    async def main() -> None:
        scorer = Scorer()
        b = MicroBatcher(scorer, max_batch=100, max_inflight=1)
        scorer.gate = asyncio.Event()
        first = asyncio.ensure_future(b.submit_one(np.ones((1, W), np.float32)))
        await until(lambda: scorer.inflight == 1)
        # While the first call is in flight these queue and leave together; one row is poisoned.
        batch_a = [np.full((1, W), float(i), np.float32) for i in range(5)]
        batch_a[3][0, 0] = -1
        futs_a = [asyncio.ensure_future(b.submit(r)) for r in batch_a]
        await asyncio.sleep(0.01)
        scorer.gate.set()
        assert await first == pytest.approx(float(expected(np.ones((1, W)))[0]))
        results = await asyncio.gather(*futs_a, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "poisoned" in str(r) for r in results)
        assert len(scorer.calls) == 2 and len(scorer.calls[1]) == 5
        # The batcher keeps working: later callers are unaffected.
        later = await asyncio.gather(*(b.submit(np.full((2, W), float(i), np.float32)) for i in range(4)))
        for i, got in enumerate(later):
            np.testing.assert_allclose(got, expected(np.full((2, W), float(i))))
        assert b.stats.errors == 1
        await b.close()

    run(main())


def test_cancelled_caller_does_not_poison_the_batch() -> None:
    async def main() -> None:
        scorer = Scorer()
        b = MicroBatcher(scorer, max_batch=100, max_inflight=1)
        scorer.gate = asyncio.Event()
        blocker = asyncio.ensure_future(b.submit_one(np.zeros((1, W), np.float32)))
        await until(lambda: scorer.inflight == 1)
        rows = [np.full((1, W), float(i + 1), np.float32) for i in range(6)]
        tasks = [asyncio.ensure_future(b.submit(r)) for r in rows]
        await asyncio.sleep(0.01)
        tasks[1].cancel()  # cancelled while queued: its row must never be sent
        tasks[4].cancel()
        await asyncio.sleep(0)
        scorer.gate.set()
        await blocker
        done = await asyncio.gather(*tasks, return_exceptions=True)
        for i, r in enumerate(done):
            if i in (1, 4):
                assert isinstance(r, asyncio.CancelledError)
            else:
                np.testing.assert_allclose(r, expected(rows[i]))
        assert sorted(float(x) for x in scorer.calls[1][:, 0]) == [1.0, 3.0, 4.0, 6.0]

        # Cancelled while its call is in flight: the others in that call still get their scores.
        scorer.gate = asyncio.Event()
        tasks = [asyncio.ensure_future(b.submit(r)) for r in rows]
        await until(lambda: scorer.inflight == 1)
        tasks[2].cancel()
        scorer.gate.set()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[2], asyncio.CancelledError)
        for i in (0, 1, 3, 4, 5):
            np.testing.assert_allclose(done[i], expected(rows[i]))
        await b.close()

    run(main())


def test_deadlines_are_honoured() -> None:
    async def main() -> None:
        scorer = Scorer()
        b = MicroBatcher(scorer, max_batch=100, max_inflight=1)
        scorer.gate = asyncio.Event()
        x = np.ones((1, W), np.float32)
        # A caller's own asyncio.wait_for: TimeoutError on time, and the batcher is not disturbed.
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(b.submit_one(x), 0.05)
        assert time.monotonic() - t0 < 2.0
        # The batcher's own timeout fails the caller even while its call is in flight.
        with pytest.raises(DeadlineExceeded):
            await b.submit_one(x, timeout=0.05)
        # expires_in (what the gRPC servicer passes): rows still queued at their deadline are dropped
        # when the next batch is formed, and their caller hears DeadlineExceeded.
        seven = np.full((1, W), 7.0, np.float32)
        pending = asyncio.ensure_future(b.enqueue(seven, one=True, expires_in=0.02))
        fresh = asyncio.ensure_future(b.submit_one(np.full((1, W), 8.0, np.float32)))
        await asyncio.sleep(0.05)
        scorer.gate.set()
        with pytest.raises(DeadlineExceeded):
            await pending
        assert await fresh == pytest.approx(8.0 * 1111)
        assert not any((c[:, 0] == 7.0).any() for c in scorer.calls)
        assert b.stats.expired >= 2
        await b.close()

    run(main())


def test_idle_request_is_sent_at_once() -> None:
    async def main() -> None:
        scorer = Scorer()
        b = MicroBatcher(scorer, max_batch=256, max_wait_us=2_000_000, max_inflight=2)  # 2 s max wait
        for i in range(5):
            t0 = time.monotonic()
            got = await b.submit_one(np.full((1, W), float(i), np.float32))
            assert time.monotonic() - t0 < 0.5, "a lone request waited for company"
            assert got == pytest.approx(i * 1111.0)
        assert b.stats.batches == 5
        await b.close()

    run(main())


def test_several_batches_in_flight_and_batches_grow_with_load() -> None:
    async def main() -> None:
        scorer = Scorer()
        b = MicroBatcher(scorer, max_batch=8, max_wait_us=1_000_000, max_inflight=3)
        scorer.gate = asyncio.Event()
        # Full batches leave at once on free slots: three calls in flight together.
        futs = [asyncio.ensure_future(b.submit(np.full((8, W), float(i), np.float32))) for i in range(5)]
        await until(lambda: scorer.inflight == 3)
        assert b.inflight == 3 and b.queued_rows == 16
        scorer.gate.set()
        for i, f in enumerate(futs):
            np.testing.assert_allclose(await f, expected(np.full((8, W), float(i))))
        assert scorer.max_inflight == 3

        # While a call is in flight, single rows queue and leave together when it returns.
        scorer.gate = asyncio.Event()
        first = asyncio.ensure_future(b.submit_one(np.ones((1, W), np.float32)))
        await until(lambda: scorer.inflight == 1)
        n_calls = len(scorer.calls)
        rest = [asyncio.ensure_future(b.submit_one(np.full((1, W), float(i), np.float32))) for i in range(6)]
        await asyncio.sleep(0.02)
        assert b.queued_rows == 6 and len(scorer.calls) == n_calls  # waiting behind the busy call
        scorer.gate.set()
        await first
        assert [await f for f in rest] == pytest.approx([i * 1111.0 for i in range(6)])
        assert len(scorer.calls[n_calls]) == 6  # one call for all six
        await b.close()

    run(main())


def test_a_slow_call_does_not_hold_the_next_batch_hostage() -> None:
    async def main() -> None:
        scorer = Scorer()
        b = MicroBatcher(scorer, max_batch=100, max_wait_us=30_000, max_inflight=2)
        gate = scorer.gate = asyncio.Event()
        stuck = asyncio.ensure_future(b.submit_one(np.ones((1, W), np.float32)))
        await until(lambda: scorer.inflight == 1)
        scorer.gate = None  # later calls answer at once; the first stays stuck on its gate
        t0 = time.monotonic()
        got = await b.submit_one(np.full((1, W), 2.0, np.float32))
        waited = time.monotonic() - t0
        assert got == pytest.approx(2222.0)
        assert waited < 2.0  # sent on the second slot after at most max_wait, not after the stuck call
        assert not stuck.done()
        gate.set()
        assert await stuck == pytest.approx(1111.0)
        await b.close()

    run(main())


def test_close_fails_queued_callers_and_refuses_new_ones() -> None:
    async def main() -> None:
        scorer = Scorer()
        b = MicroBatcher(scorer, max_batch=4, max_inflight=1)
        scorer.gate = asyncio.Event()
        inflight = asyncio.ensure_future(b.submit(np.ones((4, W), np.float32)))
        await until(lambda: scorer.inflight == 1)
        queued = asyncio.ensure_future(b.submit(np.ones((4, W), np.float32)))
        await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0.01)
        scorer.gate.set()
        await closing
        np.testing.assert_allclose(await inflight, expected(np.ones((4, W))))  # in flight: answered
        with pytest.raises(RuntimeError, match="closed"):
            await queued
        with pytest.raises(RuntimeError, match="closed"):
            await b.submit_one(np.ones((1, W), np.float32))

    run(main())


def test_deadline_errors_map_to_deadline_exceeded() -> None:
    import grpc

    from gateway.api.errors import status_for

    assert status_for(DeadlineExceeded("late")) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_for(TimeoutError()) == grpc.StatusCode.DEADLINE_EXCEEDED
