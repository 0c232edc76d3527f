"""The last step of a graceful stop: refuse new calls ourselves, let in-flight calls finish, and only
then hand the server to grpc's own shutdown.

Why not just `server.stop(grace)`: grpc core answers a call that has reached the server but has not
yet been handed to the application (it waits for the event loop to ask for the next call) with
CANCELLED when shutdown starts (grpc/grpc#41785, measured on grpcio 1.85: 1 run in 3 under load).
CANCELLED tells a Go client "you cancelled this", so it is not retried, although the call was never
processed. Calls the application refuses get UNAVAILABLE ("go elsewhere, safe to retry"), so the gateway
refuses new calls itself, waits until nothing is in flight and no call has arrived for a short quiet
gap (so no call can be queued inside grpc), and calls `server.stop` only then.

A client that retries at once would leave no quiet gap, so for that last phase refused calls are held
(at most QUIET_WAIT_MAX_S and never past their deadline) and answered only once grpc's shutdown has
begun: a client waiting for its answer sends nothing new, and what it sends after the answer grpc
rejects cleanly. The wait for the gap is bounded; an open-loop flood that never pauses can still meet
the final instant (measured: about 5 CANCELLED calls per stop under a 2 ms-retry flood without any
of this, none with it)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

import grpc

QUIET_S = 0.003  # no arrival for this long: grpc has handed every arrived call to the application
QUIET_WAIT_MAX_S = 0.5  # how long to look for that gap once in-flight calls are done
POLL_S = 0.001
DEADLINE_MARGIN_S = 0.005  # a held call is answered this long before its deadline at the latest
REFUSAL = "gateway is shutting down; retry on another instance"


class Admission:
    """Whether the gateway takes new calls. Checked once per call by gateway.wire (one attribute
    read); the refusal time is only written once the gateway is closing."""

    __slots__ = ("_release", "closed", "last_refused", "refused")

    def __init__(self) -> None:
        self.closed = False
        self.last_refused = 0.0
        self.refused = 0
        self._release: asyncio.Event | None = None

    def close(self) -> None:
        self.closed = True

    def hold(self) -> None:
        """From now on refused calls wait for `release` (bounded) before they are answered."""
        self._release = asyncio.Event()

    def release(self) -> None:
        if self._release is not None:
            self._release.set()

    async def refuse(self, context: grpc.aio.ServicerContext) -> None:
        self.last_refused = time.monotonic()
        self.refused += 1
        release = self._release
        if release is not None and not release.is_set():
            remaining = context.time_remaining()
            wait = QUIET_WAIT_MAX_S if remaining is None else min(QUIET_WAIT_MAX_S,
                                                                  remaining - DEADLINE_MARGIN_S)
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(release.wait(), wait)
        await context.abort(grpc.StatusCode.UNAVAILABLE, REFUSAL)


async def close_and_stop(server: grpc.aio.Server, admission: Admission, inflight: Mapping[str, int],
                         deadline: float) -> None:
    """Refuse new calls, wait (until `deadline`, a time.monotonic() value) for in-flight calls to
    finish and for a quiet gap, then stop the server with whatever grace is left."""
    admission.close()
    while sum(inflight.values()) > 0 and time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)
    admission.hold()
    give_up = min(deadline, time.monotonic() + QUIET_WAIT_MAX_S)
    while time.monotonic() < give_up and (
            time.monotonic() - admission.last_refused < QUIET_S or sum(inflight.values()) > 0):
        await asyncio.sleep(POLL_S)
    # server.stop begins grpc's shutdown in its first step; the held calls are answered after that.
    stopping = asyncio.ensure_future(server.stop(max(0.0, deadline - time.monotonic())))
    await asyncio.sleep(0)
    admission.release()
    await stopping
