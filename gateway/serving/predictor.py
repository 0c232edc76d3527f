"""The prediction path as plain domain calls (no protobuf): route, project, batch, log.

Nothing here touches the database or Ray per request except through the micro-batcher; the
prediction row is queued for the log writer and never awaited. The per-request Python cost is kept
small on purpose (it bounds the gateway's throughput on a small machine): routing decisions are
cached per split revision, generated request ids are a per-process random prefix plus a counter
(not uuid4), and PredictBatch projects, validates and logs whole matrices at once.

Replica faults (gateway.serving.failover): rows routed to a version that is down, or whose scoring call
failed, are scored by the version's fallback (the baseline, for a canary) and counted against the
failed version; a version with no fallback, or pinned by the caller, answers UNAVAILABLE at once.
The check costs one truth test of an (almost always empty) dict per request.

Outcomes the database cannot take now (it is down, or their prediction is still in the prediction
spill file) are accepted into the outcome spill (gateway.records.outcome_log) instead of failing.

Tracing: with a tracer (tracing on), routing runs inside a `chimera.route` span; without one (None,
tracing off) the only cost is that None check."""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Protocol

import numpy as np
from opentelemetry.trace import Tracer

from gateway.records.outcome_log import OutcomeLog, database_unavailable
from gateway.records.prediction_log import PredictionLog
from gateway.serving.batcher import MicroBatcher
from gateway.serving.catalog import Catalog, ModelEntry
from gateway.serving.errors import PreconditionError, UnavailableError
from gateway.serving.features import FeatureError, PackedRows, RowLike, Schema
from gateway.serving.replica_pool import ReplicaPool
from gateway.serving.router import Router
from gateway.serving.shadow import ShadowMirror
from registry import NotFoundError

MAX_ROUTING_KEY = 256
MAX_REQUEST_ID = 128
ROUTE_CACHE_MAX = 200_000  # routing keys remembered per model and split revision
_routing_key = attrgetter("routing_key")
_request_id = attrgetter("request_id")


@dataclass(frozen=True, slots=True)
class RowInput:
    """One row to score. Field names match chimera.v1.PredictRequest, so protobuf requests can be
    passed wherever a RowInput is expected (no per-row conversion on the batch path)."""

    routing_key: str
    request_id: str
    features: Mapping[str, float]
    dense: Sequence[float]


class RequestLike(RowLike, Protocol):
    """A row plus its ids: RowInput or chimera.v1.PredictRequest."""

    @property
    def routing_key(self) -> str: ...

    @property
    def request_id(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Scored:
    request_id: str
    model: str
    version: int
    score: float


@dataclass(frozen=True, slots=True)
class ScoredBatch:
    """Results of predict_many as columns, in request order."""

    model: str
    request_ids: list[str]
    versions: list[int]
    scores: list[float]

    def __iter__(self) -> Iterator[Scored]:
        for rid, v, s in zip(self.request_ids, self.versions, self.scores, strict=True):
            yield Scored(rid, self.model, v, s)


class RequestIds:
    """Unique ids for requests that came without one: 16 random hex digits per process, then a
    counter (28 characters). As unique as uuid4 across gateways for all practical purposes, and ~20x
    cheaper to make, which matters at thousands of requests per second. Used from the event loop
    thread only."""

    def __init__(self) -> None:
        self.prefix = os.urandom(8).hex()
        self._n = 0

    def __call__(self) -> str:
        self._n += 1
        return f"{self.prefix}{self._n:012x}"

    def many(self, n: int) -> list[str]:
        """n fresh ids in one go."""
        start = self._n + 1
        self._n += n
        prefix = self.prefix
        return [f"{prefix}{i:012x}" for i in range(start, start + n)]


class _Routes:
    """Routing decisions of one model's current Router, by routing key. Rendezvous hashing costs a
    blake2b per version per request; real traffic repeats its keys (users, instruments), so the
    decision is remembered until the split changes (a new Router object) or the cache is full."""

    __slots__ = ("router", "cache")

    def __init__(self, router: Router) -> None:
        self.router = router
        self.cache: dict[str, int] = {}


def _check_ids(routing_key: str, request_id: str, prefix: str = "") -> None:
    if len(routing_key) > MAX_ROUTING_KEY:
        raise FeatureError(f"{prefix}routing_key: longer than {MAX_ROUTING_KEY} characters")
    if len(request_id) > MAX_REQUEST_ID:
        raise FeatureError(f"{prefix}request_id: longer than {MAX_REQUEST_ID} characters")


class Predictor:
    def __init__(self, catalog: Catalog, pool: ReplicaPool, log: PredictionLog, *,
                 log_features_sample: float = 1.0, outcomes: OutcomeLog | None = None,
                 shadow: ShadowMirror | None = None, tracer: Tracer | None = None) -> None:
        if not 0.0 <= log_features_sample <= 1.0:
            raise ValueError("log_features_sample must be within [0, 1]")
        self.catalog = catalog
        self.pool = pool
        self.log = log
        self.log_features_sample = log_features_sample
        self.outcomes = outcomes
        self.shadow = shadow
        self.health = pool.health
        self.new_id = RequestIds()
        self._routes: dict[str, _Routes] = {}
        self.tracer = tracer  # None: tracing is off

    # ------------------------------------------------------------------ routing
    def _route(self, entry: ModelEntry, routing_key: str) -> int:
        router = entry.router
        if not routing_key:
            try:
                return router.route("")
            except LookupError:
                raise self._no_split(entry.name) from None
        routes = self._routes.get(entry.name)
        if routes is None or routes.router is not router:
            routes = self._routes[entry.name] = _Routes(router)
        version = routes.cache.get(routing_key)
        if version is None:
            try:
                version = router.route(routing_key)
            except LookupError:
                raise self._no_split(entry.name) from None
            if len(routes.cache) >= ROUTE_CACHE_MAX:
                routes.cache.clear()
            routes.cache[routing_key] = version
        return version

    @staticmethod
    def _no_split(model: str) -> PreconditionError:
        return PreconditionError(f"model: {model!r} has no traffic split yet; set one with "
                                 f"`chimera canary set`")

    def _version_for(self, entry: ModelEntry, routing_key: str, pinned: int) -> int:
        if pinned:
            if pinned not in entry.schemas:
                raise NotFoundError(f"version: model {entry.name!r} has no version {pinned}")
            return pinned
        return self._route(entry, routing_key)

    def _traced_version_for(self, entry: ModelEntry, routing_key: str, pinned: int) -> int:
        assert self.tracer is not None
        attributes = {"chimera.model": entry.name}
        with self.tracer.start_as_current_span("chimera.route", attributes=attributes) as span:
            version = self._version_for(entry, routing_key, pinned)
            span.set_attributes({"chimera.version": version, "chimera.pinned": bool(pinned)})
            return version

    def _batcher_now(self, model: str, version: int, pinned: int) -> MicroBatcher | None:
        """The version's batcher if its replicas are up. A routed version is deployed before it gets
        weight, so None only happens for a pinned version (load tests of a candidate before it takes
        traffic), which is then deployed on first use."""
        batcher = self.pool.batcher_or_none(model, version)
        if batcher is None and not pinned:
            return self.pool.get(model, version)  # raises UnavailableError
        return batcher

    # ------------------------------------------------------------------ replica faults
    def _fallback(self, entry: ModelEntry, version: int, pinned: int, n: int,
                  cause: BaseException | None = None) -> int:
        """The version that scores `n` rows of `version`, which is down or just failed them: counted
        as failures and failovers of `version`. Raises UnavailableError when there is none."""
        health = self.health
        target = None if pinned else health.fallback(entry.name, version, entry.router.weights)
        if target is None or self.pool.batcher_or_none(entry.name, target) is None:
            health.failed(entry.name, version, n)
            raise health.unavailable(entry.name, version, cause)
        health.failed_over(entry.name, version, n)
        return target

    def _avoid_down(self, entry: ModelEntry, versions: list[int], pinned: int) -> list[int]:
        """Routed versions with the down ones replaced by their fallbacks."""
        health = self.health
        for version in set(versions):
            if health.is_down(entry.name, version):
                target = self._fallback(entry, version, pinned, versions.count(version))
                versions = [target if v == version else v for v in versions]
        return versions

    async def failover(self, model: str, version: int, named: Mapping[str, float], dense: Sequence[float],
                       pinned: int, timeout: float | None, cause: BaseException,
                       ) -> tuple[int, np.ndarray, float]:
        """Score one row on `version`'s fallback after `version` failed it: (version, row, score)."""
        entry = self.catalog.get(model)
        target = self._fallback(entry, version, pinned, 1, cause)
        try:
            x = entry.schemas[target].project_one(named, dense)
        except FeatureError as exc:  # the request fits the failed version's features only
            raise UnavailableError(f"version {version} of {model!r} failed ({cause}) and the request does "
                                   f"not fit fallback version {target}: {exc}") from cause
        score = await self.pool.get(model, target).enqueue(x, one=True, expires_in=timeout)
        return target, x, score

    def _sample(self) -> bool:
        f = self.log_features_sample
        return f >= 1.0 or (f > 0.0 and random.random() < f)

    # ------------------------------------------------------------------ one row
    def start(self, model: str, routing_key: str, request_id: str, named: Mapping[str, float],
              dense: Sequence[float], pinned: int = 0, timeout: float | None = None,
              ) -> tuple[Awaitable[Any], int, np.ndarray, str]:
        """Validate, route, project and enqueue one row without awaiting anything. Returns (awaitable
        score, version, row, request id). Raising here means the request is bad (no work queued)."""
        _check_ids(routing_key, request_id)
        entry = self.catalog.get(model)
        if self.tracer is None:
            version = self._version_for(entry, routing_key, pinned)
        else:
            version = self._traced_version_for(entry, routing_key, pinned)
        health = self.health
        if health.down and health.is_down(model, version):
            failed, version = version, self._fallback(entry, version, pinned, 1)
            try:
                x = entry.schemas[version].project_one(named, dense)
            except FeatureError:  # fits the down version only: tell the caller why it cannot be scored
                entry.schemas[failed].project_one(named, dense)  # a genuinely bad row raises its own error
                raise health.unavailable(model, failed) from None
        else:
            schema = entry.schemas.get(version)
            if schema is None:
                raise NotFoundError(f"version: model {model!r} has no version {version}")
            x = schema.project_one(named, dense)
        batcher = self._batcher_now(model, version, pinned)
        if batcher is None:
            fut: Awaitable[Any] = self._deploy_then_score(model, version, x, timeout)
        else:
            fut = batcher.enqueue(x, one=True, expires_in=timeout)
        request_id = request_id or self.new_id()
        if entry.shadow is not None and self.shadow is not None and not pinned:
            self.shadow.mirror_one(entry, version, x, named, dense, request_id)
        return fut, version, x, request_id

    async def _deploy_then_score(self, model: str, version: int, x: np.ndarray,
                                 timeout: float | None) -> float:
        batcher = await self.pool.ensure(model, version)
        return await batcher.enqueue(x, one=True, expires_in=timeout)  # type: ignore[no-any-return]

    def finish(self, model: str, version: int, x: np.ndarray, request_id: str, routing_key: str,
               score: float, started: float) -> Scored:
        """Queue the log record (never blocks) and build the result."""
        latency_ms = (time.perf_counter() - started) * 1e3
        self.log.log_one(request_id, model, version, routing_key, score, latency_ms,
                         x[0] if self._sample() else None)
        return Scored(request_id, model, version, score)

    async def predict(self, model: str, row: RowInput, pinned_version: int = 0,
                      timeout: float | None = None) -> Scored:
        started = time.perf_counter()
        fut, version, x, request_id = self.start(model, row.routing_key, row.request_id, row.features,
                                                 row.dense, pinned_version, timeout)
        try:
            score = await fut
        except UnavailableError as exc:
            if timeout is not None:
                timeout -= time.perf_counter() - started
                if timeout <= 0:
                    raise TimeoutError("deadline exceeded before the request was scored") from exc
            version, x, score = await self.failover(model, version, row.features, row.dense, pinned_version,
                                                    timeout, exc)
        return self.finish(model, version, x, request_id, row.routing_key, score, started)

    # ------------------------------------------------------------------ many rows
    async def predict_many(self, model: str, rows: Sequence[RequestLike], pinned_version: int = 0,
                           timeout: float | None = None) -> ScoredBatch:
        """Rows are routed one by one (on their own routing keys), grouped per version, and each
        group is one batcher item. `rows` may be RowInputs, chimera.v1.PredictRequest messages as
        they came, or a PackedRows matrix. Projection, validation, scoring and logging work on whole
        matrices."""
        started = time.perf_counter()
        entry = self.catalog.get(model)
        if isinstance(rows, PackedRows):
            keys, ids = rows.routing_keys, rows.request_ids
        else:
            keys = list(map(_routing_key, rows))
            ids = list(map(_request_id, rows))
        if max(map(len, keys), default=0) > MAX_ROUTING_KEY or max(map(len, ids), default=0) > MAX_REQUEST_ID:
            for i, r in enumerate(rows):
                _check_ids(r.routing_key, r.request_id, f"rows[{i}].")
        if not any(ids):
            ids = self.new_id.many(len(ids))
        elif not all(ids):
            new_id = self.new_id
            ids = [rid or new_id() for rid in ids]
        if self.tracer is None:
            versions = self._route_many(entry, keys, pinned_version)
        else:
            versions = self._traced_route_many(entry, keys, pinned_version)
        if self.health.down:
            versions = self._avoid_down(entry, versions, pinned_version)
        groups = self._groups(versions)
        matrices = self._project_groups(entry, rows, groups)
        if entry.shadow is not None and self.shadow is not None and not pinned_version:
            self.shadow.mirror_many(entry, rows, ids, groups, matrices)
        results, moved = await self._score_groups(entry, rows, groups, matrices, pinned_version, timeout,
                                                  started)
        scored_by = dict.fromkeys(groups, 0)
        if moved:  # groups whose version failed them were scored by a fallback: log and answer that
            for version, (target, m) in moved.items():
                matrices[version] = m
                scored_by[version] = target
                for i in groups[version].tolist():
                    versions[i] = target
        latency_ms = (time.perf_counter() - started) * 1e3
        log = self.log
        if len(results) == 1:
            ((version, part),) = results.items()
            score_list = part.tolist()
            log.log_many(ids, model, scored_by[version] or version, keys, score_list, latency_ms,
                         matrices[version], self._sample_mask(len(ids)))
            return ScoredBatch(model, ids, versions, score_list)
        scores = np.empty(len(rows))
        for version, part in results.items():
            scores[groups[version]] = part
        score_list = scores.tolist()
        for version, idx in groups.items():
            pos = idx.tolist()
            log.log_many([ids[i] for i in pos], model, scored_by[version] or version, [keys[i] for i in pos],
                         [score_list[i] for i in pos], latency_ms, matrices[version],
                         self._sample_mask(len(pos)))
        return ScoredBatch(model, ids, versions, score_list)

    def _route_many(self, entry: ModelEntry, keys: list[str], pinned: int) -> list[int]:
        """The version of each row (a new list the caller may change)."""
        if pinned:
            return [self._version_for(entry, "", pinned)] * len(keys)
        weights = entry.router.weights
        if len(weights) == 1:
            return [next(iter(weights))] * len(keys)
        routes = self._routes.get(entry.name)
        if routes is not None and routes.router is entry.router:
            versions = list(map(routes.cache.get, keys))  # known keys: one C-level pass
            if None not in versions:
                return versions  # type: ignore[return-value]
        route = self._route
        return [route(entry, k) for k in keys]

    def _traced_route_many(self, entry: ModelEntry, keys: list[str], pinned: int) -> list[int]:
        assert self.tracer is not None
        with self.tracer.start_as_current_span(
                "chimera.route", attributes={"chimera.model": entry.name, "chimera.rows": len(keys)}) as span:
            versions = self._route_many(entry, keys, pinned)
            distinct = sorted(set(versions))
            span.set_attribute("chimera.versions", distinct)
            if len(distinct) == 1:
                span.set_attribute("chimera.version", distinct[0])
            span.set_attribute("chimera.pinned", bool(pinned))
            return versions

    @staticmethod
    def _groups(versions: list[int]) -> dict[int, np.ndarray]:
        """Row positions per version (numpy index arrays, in request order)."""
        first = versions[0]
        if versions.count(first) == len(versions):
            return {first: np.arange(len(versions))}
        v = np.asarray(versions)
        return {int(u): np.flatnonzero(v == u) for u in np.unique(v)}

    def _project_groups(self, entry: ModelEntry, rows: Sequence[RequestLike],
                        groups: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """One matrix per version. Versions that share a feature schema (the usual canary) share one
        projection of all rows, split by index."""
        schemas: dict[int, Schema] = {}
        for version in groups:
            schema = entry.schemas.get(version)
            if schema is None:
                raise NotFoundError(f"version: model {entry.name!r} has no version {version}")
            schemas[version] = schema
        first = next(iter(schemas.values()))
        if len(groups) == 1:
            ((version, _),) = groups.items()
            return {version: first.project_rows(rows)}
        if all(s.names == first.names for s in schemas.values()):
            m = first.project_rows(rows)
            return {version: m[idx] for version, idx in groups.items()}
        return {version: schemas[version].project_rows([rows[i] for i in idx.tolist()], idx.tolist())
                for version, idx in groups.items()}

    def _sample_mask(self, n: int) -> np.ndarray | bool:
        f = self.log_features_sample
        if f >= 1.0:
            return True
        if f <= 0.0:
            return False
        return np.random.random(n) < f

    async def _score_groups(self, entry: ModelEntry, rows: Sequence[RequestLike],
                            groups: dict[int, np.ndarray], matrices: dict[int, np.ndarray], pinned: int,
                            timeout: float | None, started: float,
                            ) -> tuple[dict[int, np.ndarray], dict[int, tuple[int, np.ndarray]] | None]:
        """Scores per version group, and the groups a fallback scored because their version failed
        them: {failed version: (fallback version, the group's rows in the fallback's schema)}."""
        model = entry.name
        futures: dict[int, Awaitable[Any]] = {}
        for version in groups:
            batcher = self._batcher_now(model, version, pinned)
            if batcher is None:
                batcher = await self.pool.ensure(model, version)
            futures[version] = batcher.enqueue(matrices[version], expires_in=timeout)
        if len(futures) == 1:
            ((version, fut),) = futures.items()
            try:
                return {version: await fut}, None
            except UnavailableError as exc:
                target, m, part = await self._failover_group(entry, rows, groups[version], version, pinned,
                                                             timeout, started, exc)
                return {version: part}, {version: (target, m)}
        done = await asyncio.gather(*futures.values(), return_exceptions=True)
        results: dict[int, np.ndarray] = {}
        moved: dict[int, tuple[int, np.ndarray]] = {}
        for version, part in zip(futures, done, strict=True):
            if isinstance(part, UnavailableError):
                target, m, part = await self._failover_group(entry, rows, groups[version], version, pinned,
                                                             timeout, started, part)
                moved[version] = (target, m)
            elif isinstance(part, BaseException):
                raise part
            results[version] = part
        return results, moved or None

    async def _failover_group(self, entry: ModelEntry, rows: Sequence[RequestLike], idx: np.ndarray,
                              version: int, pinned: int, timeout: float | None, started: float,
                              cause: UnavailableError) -> tuple[int, np.ndarray, np.ndarray]:
        """Score the rows `version` failed on its fallback: (fallback, its matrix, scores)."""
        if timeout is not None:
            timeout -= time.perf_counter() - started
            if timeout <= 0:
                raise TimeoutError("deadline exceeded before the rows were scored") from cause
        pos = idx.tolist()
        target = self._fallback(entry, version, pinned, len(pos), cause)
        try:
            m = entry.schemas[target].project_rows([rows[i] for i in pos], pos)
        except FeatureError as exc:
            raise UnavailableError(f"version {version} of {entry.name!r} failed ({cause}) and the rows do "
                                   f"not fit fallback version {target}: {exc}") from cause
        part = await self.pool.get(entry.name, target).enqueue(m, expires_in=timeout)
        return target, m, part

    # ------------------------------------------------------------------ outcomes
    async def record_outcome(self, request_id: str, value: float) -> bool:
        """Store an outcome; a prediction still queued for the log is flushed first, so a caller who
        reports an outcome right after its Predict is not told NOT_FOUND."""
        if not request_id:
            raise FeatureError("request_id: required")
        if len(request_id) > MAX_REQUEST_ID:
            raise FeatureError(f"request_id: longer than {MAX_REQUEST_ID} characters")
        if not math.isfinite(value):
            raise FeatureError(f"value: must be finite, got {value}")
        record = self.catalog.registry.record_outcome
        try:
            try:
                return await asyncio.to_thread(record, request_id, value)
            except NotFoundError:
                if self.outcomes is not None and self.log.has_spill:
                    return await self._defer_outcome(request_id, value)  # its prediction may be spilled
                await asyncio.to_thread(self.log.flush)
                try:
                    return await asyncio.to_thread(record, request_id, value)
                except NotFoundError:
                    if self.outcomes is not None and self.log.has_spill:  # the flush found the database gone
                        return await self._defer_outcome(request_id, value)
                    raise
        except Exception as exc:
            if self.outcomes is None or not database_unavailable(exc):
                raise
            return await self._defer_outcome(request_id, value)

    async def _defer_outcome(self, request_id: str, value: float) -> bool:
        """Accept into the outcome spill (fsynced); checked against the predictions at replay."""
        assert self.outcomes is not None
        await asyncio.to_thread(self.outcomes.accept, request_id, value)
        return True


__all__ = ["Predictor", "RequestIds", "RowInput", "Schema", "Scored", "ScoredBatch"]
