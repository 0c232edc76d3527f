"""The prediction path as plain domain calls (no protobuf): route, project, batch, log.

Nothing here touches the database or Ray per request except through the micro-batcher; the
prediction row is queued for the log writer and never awaited."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gateway.batcher import MicroBatcher
from gateway.catalog import Catalog
from gateway.errors import PreconditionError
from gateway.features import FeatureError
from gateway.logwriter import PredictionLog
from gateway.replica_pool import ReplicaPool
from registry import NotFoundError
from registry.repository import PredictionRow

MAX_ROUTING_KEY = 256
MAX_REQUEST_ID = 128


@dataclass(frozen=True, slots=True)
class RowInput:
    routing_key: str
    request_id: str
    named: Mapping[str, float]
    dense: Sequence[float]


@dataclass(frozen=True, slots=True)
class Scored:
    request_id: str
    model: str
    version: int
    score: float


def _check_ids(row: RowInput, prefix: str = "") -> str:
    if len(row.routing_key) > MAX_ROUTING_KEY:
        raise FeatureError(f"{prefix}routing_key: longer than {MAX_ROUTING_KEY} characters")
    if len(row.request_id) > MAX_REQUEST_ID:
        raise FeatureError(f"{prefix}request_id: longer than {MAX_REQUEST_ID} characters")
    return row.request_id or uuid.uuid4().hex


class Predictor:
    def __init__(self, catalog: Catalog, pool: ReplicaPool, log: PredictionLog) -> None:
        self.catalog = catalog
        self.pool = pool
        self.log = log

    def _version_for(self, model: str, routing_key: str, pinned: int) -> int:
        entry = self.catalog.get(model)
        if pinned:
            if pinned not in entry.schemas:
                raise NotFoundError(f"version: model {model!r} has no version {pinned}")
            return pinned
        try:
            return entry.router.route(routing_key)
        except LookupError:
            raise PreconditionError(f"model: {model!r} has no traffic split yet; set one with "
                                    f"`chimera canary set`") from None

    async def _batcher(self, model: str, version: int, pinned: int) -> MicroBatcher:
        """Routed versions are deployed before they get weight; a pinned one (load tests of a candidate
        before it takes traffic) is deployed on first use."""
        return (await self.pool.ensure(model, version)) if pinned else self.pool.get(model, version)

    async def predict(self, model: str, row: RowInput, pinned_version: int = 0) -> Scored:
        started = time.perf_counter()
        request_id = _check_ids(row)
        version = self._version_for(model, row.routing_key, pinned_version)
        x = self.catalog.schema(model, version).project(row.named, row.dense)
        batcher = await self._batcher(model, version, pinned_version)
        score = float((await batcher.submit(x))[0])
        self.log.submit(PredictionRow(request_id=request_id, model=model, version=version, score=score,
                                      latency_ms=(time.perf_counter() - started) * 1e3,
                                      routing_key=row.routing_key))
        return Scored(request_id, model, version, score)

    async def predict_many(self, model: str, rows: Sequence[RowInput],
                           pinned_version: int = 0) -> list[Scored]:
        """Rows are routed one by one, grouped per version, and each group is one batcher item."""
        started = time.perf_counter()
        ids = [_check_ids(r, f"rows[{i}].") for i, r in enumerate(rows)]
        versions = [self._version_for(model, r.routing_key, pinned_version) for r in rows]
        groups: dict[int, list[int]] = {}
        for i, v in enumerate(versions):
            groups.setdefault(v, []).append(i)
        matrices: dict[int, np.ndarray] = {}
        for version, idx in groups.items():
            schema = self.catalog.schema(model, version)
            m = np.empty((len(idx), schema.width), dtype=np.float32)
            for j, i in enumerate(idx):
                schema.project(rows[i].named, rows[i].dense, prefix=f"rows[{i}].", out=m[j])
            matrices[version] = m
        batchers = {v: await self._batcher(model, v, pinned_version) for v in groups}
        results = await asyncio.gather(*(batchers[v].submit(matrices[v]) for v in groups))
        scores = np.empty(len(rows))
        for version, part in zip(groups, results, strict=True):
            scores[groups[version]] = part
        latency_ms = (time.perf_counter() - started) * 1e3
        out = []
        for i, r in enumerate(rows):
            s = float(scores[i])
            self.log.submit(PredictionRow(request_id=ids[i], model=model, version=versions[i], score=s,
                                          latency_ms=latency_ms, routing_key=r.routing_key))
            out.append(Scored(ids[i], model, versions[i], s))
        return out

    async def record_outcome(self, request_id: str, value: float) -> bool:
        """Store an outcome; a prediction still queued for the log is flushed first, so a caller who
        reports an outcome right after its Predict is not told NOT_FOUND."""
        if not request_id:
            raise FeatureError("request_id: required")
        if not math.isfinite(value):
            raise FeatureError(f"value: must be finite, got {value}")
        try:
            return await asyncio.to_thread(self.catalog.registry.record_outcome, request_id, value)
        except NotFoundError:
            await asyncio.to_thread(self.log.flush)
            return await asyncio.to_thread(self.catalog.registry.record_outcome, request_id, value)
