"""Replica faults seen from the gateway: which versions are down, where their traffic goes meanwhile,
and how many requests each version failed (the rollout controller's error guardrail reads that).

A version is marked down when a scoring call to it fails or stalls (no answer within the pool's stall
timeout: Ray Serve keeps a call to a killed replica queued until a replacement starts, which takes
seconds, so waiting is not an option). While it is down:

- rows routed to it are scored by its fallback instead: the heaviest other version of the model's
  current split that is not down itself (the baseline, for a canary). Each such row counts as a
  failure of the down version and a failover from it;
- if there is no fallback (it is the only version, or the request pinned it), the request fails at once
  with UNAVAILABLE, saying which version is down and why, instead of hanging until its deadline;
- a probe (one zero row, every `probe_interval_s`) runs until the version answers again, then it is
  marked up. Nothing is restarted in the gateway: the Ray Serve handle keeps working once Ray Serve has
  replaced the replica.

Per-version counts are plain ints on the event loop (no locks): `failures[(model, version)]` counts rows
the version failed to score, whether or not another version then scored them, and
`failovers[(model, version)]` the rows retried elsewhere."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from gateway.serving.errors import UnavailableError

log = logging.getLogger(__name__)
Key = tuple[str, int]


class VersionHealth:
    def __init__(self, *, probe_interval_s: float = 0.25, metrics: Any = None) -> None:
        self.probe_interval_s = probe_interval_s
        self.metrics = metrics
        self.down: dict[Key, str] = {}  # (model, version) -> why; empty almost always (checked per request)
        self.down_since: dict[Key, float] = {}
        self.failures: dict[Key, int] = {}
        self.failovers: dict[Key, int] = {}
        self._probes: dict[Key, asyncio.Task[None]] = {}
        self._children: dict[tuple[str, Key], Any] = {}

    # ------------------------------------------------------------------ state
    def is_down(self, model: str, version: int) -> bool:
        return bool(self.down) and (model, version) in self.down

    def mark_down(self, model: str, version: int, why: str,
                  probe: Callable[[], Awaitable[object]] | None = None) -> None:
        """Take the version out of routing until `probe()` succeeds (no probe: until mark_up)."""
        key = (model, version)
        if key not in self.down:
            log.error("version %d of %r is down (%s): its traffic goes to its fallback until it answers "
                      "again", version, model, why)
            self.down_since[key] = time.monotonic()
        self.down[key] = why
        if probe is not None and (key not in self._probes or self._probes[key].done()):
            self._probes[key] = asyncio.get_running_loop().create_task(self._probe(key, probe))

    def mark_up(self, model: str, version: int) -> None:
        key = (model, version)
        if self.down.pop(key, None) is not None:
            since = self.down_since.pop(key, time.monotonic())
            log.warning("version %d of %r answers again after %.1f s down", version, model,
                        time.monotonic() - since)

    async def _probe(self, key: Key, probe: Callable[[], Awaitable[object]]) -> None:
        while key in self.down:
            await asyncio.sleep(self.probe_interval_s)
            try:
                await probe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("probe of %s v%d failed: %s", key[0], key[1], exc)
                continue
            self.mark_up(*key)

    async def close(self) -> None:
        probes, self._probes = list(self._probes.values()), {}
        for task in probes:
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)

    # ------------------------------------------------------------------ counting
    def _count(self, kind: str, model: str, version: int, n: int) -> None:
        key = (model, version)
        table = self.failures if kind == "failures" else self.failovers
        table[key] = table.get(key, 0) + n
        if self.metrics is None:
            return
        child = self._children.get((kind, key))
        if child is None:
            metric = self.metrics.version_failures if kind == "failures" else self.metrics.failovers
            child = self._children[(kind, key)] = metric.labels(model, str(version))
        child.inc(n)

    def failed(self, model: str, version: int, n: int = 1) -> None:
        self._count("failures", model, version, n)

    def failed_over(self, model: str, version: int, n: int = 1) -> None:
        """`n` rows of `version` are retried on another version: a failure and a failover each."""
        self._count("failures", model, version, n)
        self._count("failovers", model, version, n)

    def failure_count(self, model: str, version: int) -> int:
        return self.failures.get((model, version), 0)

    # ------------------------------------------------------------------ routing
    def fallback(self, model: str, version: int, weights: Mapping[int, int]) -> int | None:
        """The version that takes `version`'s rows while it is down: the heaviest other version of the
        split that is up (ties: the older version). None when there is none."""
        best: int | None = None
        for v, w in weights.items():
            if v == version or w <= 0 or self.is_down(model, v):
                continue
            if best is None or (w, -v) > (weights[best], -best):
                best = v
        return best

    def unavailable(self, model: str, version: int, cause: BaseException | None = None) -> UnavailableError:
        """The error for a request that has nowhere else to go."""
        why = self.down.get((model, version)) or (f"{type(cause).__name__}: {cause}" if cause else "down")
        return UnavailableError(
            f"version {version} of {model!r} is unavailable ({why}) and no other version can take its "
            f"requests; Ray Serve is replacing its replica: retry shortly")
