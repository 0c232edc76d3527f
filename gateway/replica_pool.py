"""Ray Serve applications per version, seen from the gateway: deploy before traffic, one
micro-batcher per version in front of its handle.

Handles are fetched inside the gateway's event loop: a handle obtained in one loop and awaited from
another hangs (measured on Ray Serve 2.60)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gateway.batcher import BatchObserver, MicroBatcher
from gateway.errors import UnavailableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 256
    max_wait_us: int = 300
    max_inflight: int = 4


class ReplicaPool:
    def __init__(self, registry_url: str, *, replica_cpus: float = 0.25, batch: BatchConfig | None = None,
                 observer_factory: Callable[[str, int], BatchObserver] | None = None) -> None:
        self.registry_url = registry_url
        self.replica_cpus = replica_cpus
        self.batch = batch or BatchConfig()
        self._batchers: dict[tuple[str, int], MicroBatcher] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._observer_factory = observer_factory

    def is_ready(self, model: str, version: int) -> bool:
        return (model, version) in self._batchers

    def ready_versions(self) -> list[tuple[str, int]]:
        return sorted(self._batchers)

    async def ensure(self, model: str, version: int) -> MicroBatcher:
        """Deploy the version's replicas if needed and wait until they answer."""
        key = (model, version)
        batcher = self._batchers.get(key)
        if batcher is not None:
            return batcher
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            batcher = self._batchers.get(key)
            if batcher is not None:
                return batcher
            from ray import serve

            from replicas.deployment import app_name, deploy_version

            log.info("deploying replicas for %s v%d", model, version)
            await asyncio.to_thread(deploy_version, self.registry_url, model, version,
                                    num_cpus=self.replica_cpus)
            handle = serve.get_app_handle(app_name(model, version))

            async def score(rows: np.ndarray) -> np.ndarray:
                try:
                    return await handle.score.remote(rows)
                except Exception as exc:
                    raise UnavailableError(f"version {version} of {model!r} could not score: "
                                           f"{type(exc).__name__}: {exc}") from exc

            observer = self._observer_factory(model, version) if self._observer_factory else None
            batcher = MicroBatcher(score, max_batch=self.batch.max_batch, max_wait_us=self.batch.max_wait_us,
                                   max_inflight=self.batch.max_inflight, observer=observer)
            self._batchers[key] = batcher
            return batcher

    def get(self, model: str, version: int) -> MicroBatcher:
        batcher = self._batchers.get((model, version))
        if batcher is None:
            raise UnavailableError(f"version {version} of {model!r} has no replicas deployed yet")
        return batcher

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for b in self._batchers.values()), return_exceptions=True)
        self._batchers.clear()
