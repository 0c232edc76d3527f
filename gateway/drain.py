"""The last step of a graceful stop: refuse new calls ourselves, let in-flight calls finish, and only
then hand the server to grpc's own shutdown.

Why not just `server.stop(grace)`: grpc core answers a call that has reached the server but has not
yet been handed to the application (it waits for the event loop to ask for the next call) with
CANCELLED when shutdown starts (grpc/grpc#41785, measured on grpcio 1.85: 1 run in 3 under load).
CANCELLED tells a Go client "you cancelled this", so it is not retried, although the call was never
processed. Calls the application refuses get UNAVAILABLE ("go elsewhere, safe to retry"), so the gateway
refuses new calls itself, waits until nothing is in flight and no call has arrived for a short quiet
gap (so no call can be queued inside grpc), and calls `server.stop` only then.

Once grpc's shutdown has begun, a call that still reaches the server is answered CANCELLED too (seen in
tests/integration/test_drain.py: clients that were asleep between retries when the stop began); a client stops
sending on the connection once it has read the GOAWAY frame the shutdown sends. So the last phase makes
sure no client sends in that instant. Refused calls are now held (at most QUIET_WAIT_MAX_S and never
past their deadline): a client waiting for an answer sends nothing new. The shutdown begins after a
quiet gap of QUIET_S with nothing in flight and no call arriving; QUIET_S is longer than a client's
usual pause before it retries (a backoff of tens of milliseconds), so such a client is held by then, not
asleep and about to send. The held calls are answered SETTLE_S after the shutdown began, when the GOAWAY
has reached their clients: their retries go to a new connection, which the closed port refuses
(UNAVAILABLE on the client side).

Measured with tests/integration/test_drain.py (12 clients, 8-12 stops a run): plain `server.stop` gave 56-84
CANCELLED calls with clients retrying at once; a 3 ms gap without the settle time still gave 1-3 per
run (mostly with clients pausing 20 ms between retries); this drain, none in 8 runs. The wait for the gap is
bounded, so a client whose pause is longer than QUIET_S, or a flood that never pauses, can still meet
the final instant."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

import grpc

QUIET_S = 0.1  # no arrival for this long: every client that retries within it is held
QUIET_WAIT_MAX_S = 0.5  # how long to look for that gap once in-flight calls are done
SETTLE_S = 0.05  # after the shutdown began, before held calls are answered: time for GOAWAY to arrive
POLL_S = 0.001
DEADLINE_MARGIN_S = 0.005  # a held call is answered this long before its deadline at the latest
REFUSAL = "gateway is shutting down; retry on another instance"


class Admission:
    """Whether the gateway takes new calls. Checked once per call by gateway.api.wire (one attribute
    read); the refusal time is only written once the gateway is closing."""

    __slots__ = ("_release", "active", "closed", "last_refused", "max_active", "refused", "shed")

    def __init__(self, max_active: int | None = None) -> None:
        self.closed = False
        self.last_refused = 0.0
        self.refused = 0
        self._release: asyncio.Event | None = None
        # Load shedding (gateway.api.wire): calls being handled, the cap (None: none), calls refused
        # RESOURCE_EXHAUSTED because of it.
        self.active = 0
        self.max_active = max_active
        self.shed = 0

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
    # server.stop begins grpc's shutdown (and sends GOAWAY) in its first step; the held calls are
    # answered once that has reached their clients.
    stopping = asyncio.ensure_future(server.stop(max(0.0, deadline - time.monotonic())))
    await asyncio.sleep(min(SETTLE_S, max(0.0, deadline - time.monotonic())))
    admission.release()
    await stopping
