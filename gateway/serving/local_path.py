"""The cheap way to one version's replicas from this gateway: a replica's local channel
(replicas.local_channel) when a replica of the version runs on this gateway's Ray node.

Policy, and why:
- A version that runs exactly one replica, fixed (the default scaling), gets all of this gateway's
  calls over the channel (`slots`: the batcher's calls in flight, one connection each): there is no
  other replica to spread them over and no autoscaler to inform. Any other version (autoscaled, several
  replicas, or declared by the cluster, whose scaling the gateway does not know) gets one call at a
  time, so the calls that reach Ray Serve's autoscaler and its `max_ongoing_requests` backpressure are
  all but one of this gateway's: an idle gateway (one request at a time) scores every call here, in
  ~0.15 ms instead of a ~1.7 ms Serve call; a busy one sends its other calls through Serve as before.
  The slots are read again every RECHECK_S, so an in-place scaling change applies within seconds.
- Only a replica on this node: the channel binds loopback, so `discover` (the Serve handle's
  `local_endpoint`, answered by whichever replica Serve picks) must return this node's id; otherwise
  every call goes through Serve and the check is repeated every REMOTE_RECHECK_S.
- A channel that breaks is closed and found again in the background (backoff to MAX_BACKOFF_S):
  meanwhile every call goes through Serve, which owns replica failure (restarts, health checks).
- Nothing before the first call: the search starts at the first `take`, not when the version is
  deployed. `discover` is a Serve call, and Serve's autoscaler counts it as load like any other: made
  at start-up, while the controller was still busy deploying the next version, it sat queued at the
  handle for a second and an idle version with target_ongoing_requests 0.5 was scaled from 1 to 2
  replicas (Serve controller log, fresh-clone make test 2026-12-05). An idle gateway makes no call.

Write-up with the measurements: docs/performance.md ("A local channel to the replicas")."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from replicas.local_channel import LocalChannel

log = logging.getLogger(__name__)

DISCOVER_TIMEOUT_S = 10.0
MAX_BACKOFF_S = 30.0
REMOTE_RECHECK_S = 60.0
RECHECK_S = 5.0


def this_node_id() -> str | None:
    """This process's Ray node id (the gateway is a Ray driver), None when Ray cannot say."""
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # not connected: no local channel, every call through Serve
        return None


class LocalPath:
    def __init__(self, discover: Callable[[], Awaitable[Mapping[str, Any]]], node_id: str | None,
                 label: str, slots: Callable[[], int] = lambda: 1) -> None:
        self._discover = discover
        self._node_id = node_id
        self._label = label
        self._slots = slots
        self._idle: list[LocalChannel] = []
        self._busy = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.status = "starting"  # connected | remote | retrying: for logs, tests and the operator

    def start(self) -> None:
        """Begin looking for the channel (the first `take` does this; tests call it directly)."""
        if self._task is None and self._node_id is not None:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._keep(), name=f"local-path {self._label}")

    async def _keep(self) -> None:
        """Find the replica's channel and keep `slots()` connections to it, again whenever one breaks."""
        backoff = 1.0
        while True:
            missing = self._slots() - len(self._idle) - self._busy
            if missing > 0:
                try:
                    where = await asyncio.wait_for(self._discover(), DISCOVER_TIMEOUT_S)
                    if where.get("node_id") != self._node_id:
                        self.status = "remote"
                        await asyncio.sleep(REMOTE_RECHECK_S)
                        continue
                    for _ in range(missing):
                        self._idle.append(await LocalChannel.connect(int(where["port"]), bytes(where["key"])))
                    if self.status != "connected":
                        log.info("%s: local channel to a replica on this node (port %s)", self._label,
                                 where["port"])
                    self.status = "connected"
                    backoff = 1.0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.status = "retrying"
                    log.info("%s: no local channel (%s: %s); calls go through Ray Serve, retry in %g s",
                             self._label, type(exc).__name__, str(exc)[:200], backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(MAX_BACKOFF_S, backoff * 2)
                    continue
            self._wake.clear()
            try:  # woken by a break; every RECHECK_S the slots are read again (a scaling change)
                await asyncio.wait_for(self._wake.wait(), RECHECK_S)
            except TimeoutError:
                pass

    def take(self) -> LocalChannel | None:
        """A channel for one call, or None (not connected, or its `slots()` calls are in flight): then
        call through Serve. Every channel taken goes back through `give_back`. The first call starts the
        search for the channel (module docstring: nothing before the first call)."""
        if self._task is None:
            self.start()
        if not self._idle or self._busy >= self._slots():
            return None
        self._busy += 1
        return self._idle.pop()

    def give_back(self, channel: LocalChannel, *, healthy: bool) -> None:
        """`healthy=False`: the call broke, timed out or was cancelled mid-answer, so the connection
        may hold half an answer: close it and the idle ones (the same replica, likely gone), and find
        the channel again."""
        self._busy -= 1
        if healthy:
            self._idle.append(channel)
            return
        channel.close()
        self._close_idle()
        self.status = "retrying"
        self._wake.set()

    def _close_idle(self) -> None:
        for idle in self._idle:
            idle.close()
        self._idle.clear()

    async def close(self) -> None:
        """Stop keeping the channel and close it; for good: a `take` after this never searches again
        (no node to look on, as for a gateway outside the Ray cluster)."""
        self._node_id = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._close_idle()
