"""A gateway in a background thread with its own event loop, for in-process callers (the demo, the
benchmark, tests). Ray Serve handles must be awaited in the loop that fetched them, so the gateway
owns its loop and callers talk to it over loopback gRPC like any client."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

from gateway.server import Gateway, GatewayConfig


class BackgroundGateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.gateway = Gateway(config)
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, name="chimera-gateway", daemon=True)

    def start(self, timeout: float = 300) -> BackgroundGateway:
        self._thread.start()
        self.port = self.run(self.gateway.start(), timeout=timeout)
        return self

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.port}"

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 2.0, undeploy: bool = True) -> None:
        apps = self.gateway.pool.owned_versions()  # applications declared by a Serve config stay
        try:
            self.run(self.gateway.stop(grace=grace), timeout=grace + 60)
        finally:
            if undeploy and apps:
                from replicas.deployment import undeploy_versions

                undeploy_versions(list(apps))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
