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
the final instant.

A held call is held until the release (or until shortly before its own deadline), never for a fixed
time of its own: held for QUIET_WAIT_MAX_S from its arrival, a call held as the hold began was answered
at the very moment the search for a quiet gap gave up, and its client's retry reached the server as the
shutdown began (tests/integration/test_multi_node.py, fresh-clone make test: 1 CANCELLED call of 1,306
while a gateway drained, twice). The quiet gap is counted in time the event loop ran: a poll that came
back more than STALL_S late means the loop did not run (CPU starvation, a blocking call), calls that
arrived meanwhile may still sit inside grpc where `refuse` cannot see them, and judged by the clock
alone that stall looked like a quiet gap (reproduced with a 150 ms stall early in the drain, two gateways
behind round-robin clients that retry: CANCELLED calls in 3 of 6 batches of 15-30 stops; none in 145 stops
with the stall-aware gap; tests/integration/test_drain.py). So a stall restarts the gap and gives the
search its lost time back, within the deadline. Each phase is logged with its counts, so a drain that
found no quiet gap says so."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Mapping

import grpc

QUIET_S = 0.1  # no arrival for this long: every client that retries within it is held
QUIET_WAIT_MAX_S = 0.5  # how long to look for that gap once in-flight calls are done
SETTLE_S = 0.05  # after the shutdown began, before held calls are answered: time for GOAWAY to arrive
POLL_S = 0.001
DEADLINE_MARGIN_S = 0.005  # a held call is answered this long before its deadline at the latest
STALL_S = 0.02  # a poll that took longer than this: the event loop did not run (see close_and_stop)
SEARCH_MAX_S = 2.0  # stalls extend the search for a quiet gap, never past this much wall time
HOLD_BACKSTOP_S = 0.5  # a held call waits at most this long past the planned release
REFUSAL = "gateway is shutting down; retry on another instance"
log = logging.getLogger(__name__)


class Admission:
    """Whether the gateway takes new calls. Checked once per call by gateway.api.wire (one attribute
    read); the refusal time is only written once the gateway is closing."""

    __slots__ = ("_hold_until", "_release", "active", "closed", "held", "last_refused", "max_active",
                 "refused", "shed")

    def __init__(self, max_active: int | None = None) -> None:
        self.closed = False
        self.last_refused = 0.0
        self.refused = 0
        self._release: asyncio.Event | None = None
        self._hold_until = 0.0
        self.held = 0
        # Load shedding (gateway.api.wire): calls being handled, the cap (None: none), calls refused
        # RESOURCE_EXHAUSTED because of it.
        self.active = 0
        self.max_active = max_active
        self.shed = 0

    def close(self) -> None:
        self.closed = True

    def hold(self, until: float) -> None:
        """From now on refused calls wait for `release` before they are answered, at the latest until
        `until` (a time.monotonic() value past the planned release: a backstop, not a schedule).
        Called again, it moves `until` for the calls already waiting too."""
        self._hold_until = until
        if self._release is None:  # called again to extend the hold: the same release
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
            latest = math.inf if remaining is None else time.monotonic() + remaining - DEADLINE_MARGIN_S
            counted = False
            while not release.is_set():  # the hold may be extended while this call waits
                wait = min(self._hold_until, latest) - time.monotonic()
                if wait <= 0:
                    break
                if not counted:
                    self.held += 1
                    counted = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(release.wait(), wait)
        await context.abort(grpc.StatusCode.UNAVAILABLE, REFUSAL)


async def close_and_stop(server: grpc.aio.Server, admission: Admission, inflight: Mapping[str, int],
                         deadline: float) -> None:
    """Refuse new calls, wait (until `deadline`, a time.monotonic() value) for in-flight calls to
    finish and for a quiet gap, then stop the server with whatever grace is left."""
    t0 = time.monotonic()
    admission.close()
    while sum(inflight.values()) > 0 and time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)
    t_idle = time.monotonic()
    give_up = min(deadline, t_idle + QUIET_WAIT_MAX_S)
    admission.hold(min(deadline, give_up + SETTLE_S) + HOLD_BACKSTOP_S)
    stalled_at, stalls, quiet = t_idle, 0, False
    try:
        last = t_idle
        while True:
            now = time.monotonic()
            if now - last > STALL_S:
                # The loop did not run (CPU starvation, a blocking call): calls that arrived meanwhile
                # may still sit inside grpc, unseen by `refuse`, so the quiet gap starts again, and the
                # search (and the hold) get the lost time back, within the deadline.
                stalls += 1
                stalled_at = now
                give_up = min(deadline, t_idle + SEARCH_MAX_S, give_up + (now - last))
                admission.hold(min(deadline, give_up + SETTLE_S) + HOLD_BACKSTOP_S)
            last = now
            quiet = (now - max(admission.last_refused, stalled_at) >= QUIET_S
                     and sum(inflight.values()) == 0)
            if quiet or now >= give_up:
                break
            await asyncio.sleep(POLL_S)
        t_stop = time.monotonic()
        # server.stop begins grpc's shutdown (and sends GOAWAY) in its first step; the held calls are
        # answered once that has reached their clients.
        stopping = asyncio.ensure_future(server.stop(max(0.0, deadline - time.monotonic())))
        await asyncio.sleep(min(SETTLE_S, max(0.0, deadline - time.monotonic())))
    finally:
        admission.release()
    log.info("drain: in-flight calls done in %.3f s, %s after %.3f s more (%d loop stalls; %d calls held, "
             "%d refused in all); stopping the server", t_idle - t0,
             "quiet gap found" if quiet else "NO quiet gap (calls kept arriving or the loop kept stalling)",
             t_stop - t_idle, stalls, admission.held, admission.refused)
    await stopping
