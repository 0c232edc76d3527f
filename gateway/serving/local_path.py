"""The cheap way to one version's replicas from this gateway: a replica's local channel
(replicas.local_channel) when a replica of the version runs on this gateway's Ray node.

Policy, and why:
- At most one call in flight per version on the channel (`take` returns None while it is busy), so
  the calls that reach Ray Serve's autoscaler and its `max_ongoing_requests` backpressure are all but
  one of this gateway's: an idle gateway (one request at a time) scores every call here, in ~0.15 ms
  instead of a ~1.7 ms Serve call; a busy one sends its other calls through Serve as before.
- Only a replica on this node: the channel binds loopback, so `discover` (the Serve handle's
  `local_endpoint`, answered by whichever replica Serve picks) must return this node's id; otherwise
  every call goes through Serve and the check is repeated every REMOTE_RECHECK_S.
- A channel that breaks is closed and found again in the background (backoff to MAX_BACKOFF_S):
  meanwhile every call goes through Serve, which owns replica failure (restarts, health checks).

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


def this_node_id() -> str | None:
    """This process's Ray node id (the gateway is a Ray driver), None when Ray cannot say."""
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # not connected: no local channel, every call through Serve
        return None


class LocalPath:
    def __init__(self, discover: Callable[[], Awaitable[Mapping[str, Any]]], node_id: str | None,
                 label: str) -> None:
        self._discover = discover
        self._node_id = node_id
        self._label = label
        self._channel: LocalChannel | None = None
        self._busy = False
        self._broken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.status = "starting"  # connected | remote | retrying: for logs, tests and the operator

    def start(self) -> None:
        if self._task is None and self._node_id is not None:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._keep(), name=f"local-path {self._label}")

    async def _keep(self) -> None:
        """Find the replica's channel, connect, and again whenever it breaks."""
        backoff = 1.0
        while True:
            if self._channel is None:
                try:
                    where = await asyncio.wait_for(self._discover(), DISCOVER_TIMEOUT_S)
                    if where.get("node_id") != self._node_id:
                        self.status = "remote"
                        await asyncio.sleep(REMOTE_RECHECK_S)
                        continue
                    self._channel = await LocalChannel.connect(int(where["port"]), bytes(where["key"]))
                    self.status = "connected"
                    log.info("%s: local channel to a replica on this node (port %s)", self._label,
                             where["port"])
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
            self._broken.clear()
            await self._broken.wait()

    def take(self) -> LocalChannel | None:
        """The channel for one call, or None (not connected, or its one call is in flight): then
        call through Serve. Every channel taken goes back through `give_back`."""
        if self._busy or self._channel is None:
            return None
        self._busy = True
        return self._channel

    def give_back(self, channel: LocalChannel, *, healthy: bool) -> None:
        """`healthy=False`: the call broke, timed out or was cancelled mid-answer, so the connection
        may hold half an answer: close it and find the channel again."""
        self._busy = False
        if not healthy:
            channel.close()
            if self._channel is channel:
                self._channel = None
                self.status = "retrying"
                self._broken.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
