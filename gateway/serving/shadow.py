"""Shadow (mirror) scoring: a model's shadow version scores a copy of live traffic so its scores can be
compared offline with what was served (same request ids, table shadow_predictions), before it takes
any traffic.

The caller must never notice it, so:
- on the request path mirroring appends the row to the version's mirror lane (a list); nothing is
  awaited, nothing raises. A lane is sent as one matrix, one enqueue into the version's micro-batcher
  (its own Ray Serve application and replicas) with one done-callback, when it holds `lane_rows` rows
  or `lane_wait_s` after its first row. Mirror scores are read seconds later by the shadow stage and the
  controller, so waiting 0.1 s costs nothing, while sending rows one by one cost a future, a callback
  and a deadline timer per row and, at low load, a Ray call per row (at c=1 the covariate mirror of a
  10 % canary added a tenth more Ray calls).
- it is bounded: at most `max_pending_rows` mirrored rows are waiting in a lane or being scored at any
  time; beyond that rows are not mirrored (counted as dropped), so a slow or dead shadow cannot pile up
  work or memory.
  A shadow version that is down (gateway.serving.failover) is skipped until its probe sees it answer again.
- rows that do not fit the shadow version's features are skipped, never an error for the caller.
- scores are written by a background task in bulk. Shadow rows are diagnostic data, not something a
  client handed us: if the database refuses them they are counted (`unwritten`) and dropped, never
  spilled or retried in front of the prediction log.

The same mirror scores the canary's rows on the production (baseline) version too, when the canary's
business metric is adjusted by production's score (rollout.covariate, ``ModelEntry.covariate_from``):
the canary's rows need the score production would have given them, under the same rules (one enqueue
into the baseline's batcher, bounded, counted, dropped rather than queued) and into the same table,
under the baseline's version number. A dropped or failed covariate row only costs that canary row its
own covariate (the analysis gives it the recent baseline mean: rollout.covariate.TrailingMean): the drop
rule depends on load and on the baseline's health, never on the row's content (docs/statistics.md).
shadow_predictions holds one row per (request id, version) (and day, on PostgreSQL: migration 0011), so
a canary row can have both: the shadow version's score and production's. A score pairs with its row only
on the row's own UTC day (registry.models.mirrored_with), so one mirrored across midnight is left
unpaired, like a dropped one.

Exposed as chimera_shadow_rows_total{model, version, result} with result in scored | dropped |
failed | skipped | unwritten; covariate rows count under the baseline's version."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from itertools import repeat
from typing import Any

import numpy as np

from gateway.records.inserter import Inserter, ShadowRow
from gateway.serving.catalog import ModelEntry
from gateway.serving.features import FeatureError, RowLike
from gateway.serving.replica_pool import ReplicaPool
from registry import Registry

log = logging.getLogger(__name__)

RESULTS = ("scored", "dropped", "failed", "skipped", "unwritten")


class ShadowMirror:
    def __init__(self, pool: ReplicaPool, registry: Registry, *, max_pending_rows: int = 8192,
                 timeout_s: float = 5.0, flush_interval_s: float = 0.5, max_buffer_rows: int = 100_000,
                 lane_rows: int = 512, lane_wait_s: float = 0.1, counter: Any = None) -> None:
        self.pool = pool
        self.registry = registry
        self.max_pending_rows = max_pending_rows
        self.timeout_s = timeout_s
        self.lane_rows = lane_rows
        self.lane_wait_s = lane_wait_s
        # Rows waiting to be sent, per (model, version): their matrices and request ids, and the timer
        # that sends a lane lane_wait_s after its first row.
        self._lanes: dict[tuple[str, int], tuple[list[np.ndarray], list[str]]] = {}
        self._lane_timers: dict[tuple[str, int], asyncio.TimerHandle] = {}
        self.flush_interval_s = flush_interval_s
        self.max_buffer_rows = max_buffer_rows
        self.counts: dict[tuple[str, int, str], int] = {}
        self._counter = counter  # prometheus Counter with labels (model, version, result), or None
        self.pending_rows = 0
        self._buffer: deque[ShadowRow] = deque()  # scored, not yet written (plain tuples: cheap to build)
        self._inserter = Inserter(registry)
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ request path
    def mirror_one(self, entry: ModelEntry, served: int, x: np.ndarray, named: Mapping[str, float],
                   dense: Sequence[float], request_id: str) -> None:
        """Mirror one accepted row (x: its projection for the version that serves it)."""
        self._one(entry, entry.shadow, served, x, named, dense, request_id)

    def covariate_one(self, entry: ModelEntry, served: int, x: np.ndarray, named: Mapping[str, float],
                      dense: Sequence[float], request_id: str) -> None:
        """Score one canary row on the baseline for its covariate (module docstring); a row the baseline
        served itself already has its score."""
        self._one(entry, entry.covariate_from, served, x, named, dense, request_id)

    def covariate_many(self, entry: ModelEntry, rows: Sequence[RowLike], ids: list[str],
                       groups: Mapping[int, np.ndarray], matrices: Mapping[int, np.ndarray]) -> None:
        """``covariate_one`` for a batch: the rows of every version group but the baseline's, one call."""
        self._many(entry, entry.covariate_from, rows, ids, groups, matrices)

    def _one(self, entry: ModelEntry, target: int | None, served: int, x: np.ndarray,
             named: Mapping[str, float], dense: Sequence[float], request_id: str) -> None:
        if target is None or target == served:
            return
        schema = entry.schemas.get(target)
        if schema is None:
            return
        if schema.names != entry.schemas[served].names:
            try:
                x = schema.project_one(named, dense)
            except FeatureError:
                self._count(entry.name, target, "skipped", 1)
                return
        self._send(entry.name, target, x, [request_id])

    def mirror_many(self, entry: ModelEntry, rows: Sequence[RowLike], ids: list[str],
                    groups: Mapping[int, np.ndarray], matrices: Mapping[int, np.ndarray]) -> None:
        """Mirror a batch: the rows of every version group but the shadow's own, as one call."""
        self._many(entry, entry.shadow, rows, ids, groups, matrices)

    def _many(self, entry: ModelEntry, target: int | None, rows: Sequence[RowLike], ids: list[str],
              groups: Mapping[int, np.ndarray], matrices: Mapping[int, np.ndarray]) -> None:
        if target is None:
            return
        schema = entry.schemas.get(target)
        if schema is None:
            return
        parts: list[np.ndarray] = []
        part_ids: list[str] = []
        for version, idx in groups.items():
            if version == target:
                continue
            pos = idx.tolist()
            if schema.names == entry.schemas[version].names:
                parts.append(matrices[version])
            else:
                try:
                    parts.append(schema.project_rows([rows[i] for i in pos]))
                except FeatureError:
                    self._count(entry.name, target, "skipped", len(pos))
                    continue
            part_ids.extend(ids[i] for i in pos)
        if part_ids:
            self._send(entry.name, target, parts[0] if len(parts) == 1 else np.concatenate(parts), part_ids)

    def _send(self, model: str, version: int, x: np.ndarray, ids: list[str]) -> None:
        """Add rows to the version's lane (module docstring); send the lane once it is full."""
        n = len(ids)
        if self.pool.batcher_or_none(model, version) is None or self.pool.health.is_down(model, version):
            self._count(model, version, "failed", n)
            return
        if self.pending_rows + n > self.max_pending_rows:
            self._count(model, version, "dropped", n)
            return
        self.pending_rows += n
        key = (model, version)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = ([], [])
            loop = asyncio.get_running_loop()
            self._lane_timers[key] = loop.call_later(self.lane_wait_s, self._send_lane, key)
        lane[0].append(x)
        lane[1].extend(ids)
        if len(lane[1]) >= self.lane_rows:
            self._send_lane(key)

    def _send_lane(self, key: tuple[str, int]) -> None:
        """One enqueue for the lane's rows: one future, one callback, one deadline for all of them."""
        timer = self._lane_timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        lane = self._lanes.pop(key, None)
        if lane is None:
            return
        parts, ids = lane
        model, version = key
        n = len(ids)
        batcher = self.pool.batcher_or_none(model, version)
        if batcher is None or self.pool.health.is_down(model, version):
            self.pending_rows -= n
            self._count(model, version, "failed", n)
            return
        x = parts[0] if len(parts) == 1 else np.concatenate(parts)
        try:
            fut = batcher.enqueue(x, timeout=self.timeout_s)
        except RuntimeError:  # the batcher is closing (gateway shutdown)
            self.pending_rows -= n
            self._count(model, version, "dropped", n)
            return
        started = time.perf_counter()
        fut.add_done_callback(lambda f: self._done(f, model, version, ids, started))

    def _done(self, fut: asyncio.Future[Any], model: str, version: int, ids: list[str],
              started: float) -> None:
        n = len(ids)
        self.pending_rows -= n
        if fut.cancelled() or fut.exception() is not None:
            self._count(model, version, "failed", n)
            return
        latency_ms = (time.perf_counter() - started) * 1e3
        if len(self._buffer) + n > self.max_buffer_rows:  # the writer is far behind: keep memory bounded
            self._count(model, version, "unwritten", n)
            return
        self._buffer.extend(zip(ids, repeat(model), repeat(version), fut.result().tolist(),
                                repeat(latency_ms), repeat(time.time())))
        self._count(model, version, "scored", n)

    def _count(self, model: str, version: int, result: str, n: int) -> None:
        key = (model, version, result)
        self.counts[key] = self.counts.get(key, 0) + n
        if self._counter is not None:
            self._counter.labels(model, str(version), result).inc(n)

    # ------------------------------------------------------------------ writer
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="shadow-writer")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            await self.flush()

    async def flush(self) -> int:
        """Write what has been scored so far; returns the rows written."""
        if not self._buffer:
            return 0
        rows = list(self._buffer)
        self._buffer.clear()
        try:
            await asyncio.to_thread(self._inserter.insert_shadow, rows)
        except Exception:
            log.warning("could not write %d shadow predictions; dropped", len(rows), exc_info=True)
            lost: dict[tuple[str, int], int] = {}
            for row in rows:
                lost[row[1], row[2]] = lost.get((row[1], row[2]), 0) + 1
            for (model, version), n in lost.items():
                self._count(model, version, "unwritten", n)
            return 0
        return len(rows)

    async def close(self) -> None:
        """Rows still in a lane are not sent (the batchers are closing); what was scored is written."""
        for key in list(self._lanes):
            timer = self._lane_timers.pop(key, None)
            if timer is not None:
                timer.cancel()
            ids = self._lanes.pop(key)[1]
            self.pending_rows -= len(ids)
            self._count(key[0], key[1], "dropped", len(ids))
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()
