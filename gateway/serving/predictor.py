"""The one owner of a prediction, as plain domain calls (no protobuf): route -> project -> enqueue ->
fail over -> log. `Predictor.submit` scores one row, `submit_many` a batch, `submit_nowait` one row of a
stream (no task per row: the caller hears the end through a callback).

Nothing here touches the database or Ray per request except through the micro-batcher; the
prediction row is queued for the log writer and never awaited. The per-request Python cost is kept
small on purpose (it bounds the gateway's throughput on a small machine): routing decisions are
cached by the Router of the split revision (gateway.serving.router), generated request ids are a
per-process random prefix plus a counter (gateway.serving.rows), and batches are projected,
validated and logged as whole matrices.

Replica faults (gateway.serving.failover): rows routed to a version that is down, or whose scoring call
failed, are scored by the version's fallback (the baseline, for a canary) and counted against the
failed version; a version with no fallback, or pinned by the caller, answers UNAVAILABLE at once.
The check costs one truth test of an (almost always empty) dict per request. Scoring on the fallback
after a failed call is `_rescue`, the one place for it (single rows, streams and batches).

Tracing: with a tracer (tracing on), routing runs inside a `chimera.route` span; without one (None,
tracing off) the only cost is that None check.

Rollout rows: each logged row carries its split revision, whether it was pinned, the version it failed
over from and its own latency (a batch's groups each when their version answered); a request that no
version could answer is logged as a request error of the version that failed it.

Over 400 lines because it is the one owner of a prediction (issue 13): single rows, streams and batches
share their routing, failover and logging here, and splitting the batch path off would part the
failover bookkeeping from the rows it describes."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from operator import attrgetter
from typing import Any

import numpy as np
from opentelemetry.trace import Tracer

from gateway.records.prediction_log import PredictionLog
from gateway.serving.batcher import MicroBatcher
from gateway.serving.catalog import Catalog, ModelEntry
from gateway.serving.errors import PreconditionError, UnavailableError
from gateway.serving.features import FeatureError, PackedRows, Schema
from gateway.serving.flight import Flight, OnDone
from gateway.serving.replica_pool import ReplicaPool
from gateway.serving.rows import (
    RequestIds,
    RequestLike,
    Scored,
    ScoredBatch,
    check_ids,
    check_many_ids,
    groups,
    project_groups,
    sample_mask,
)
from gateway.serving.shadow import ShadowMirror
from registry import NotFoundError

_routing_key = attrgetter("routing_key")
_request_id = attrgetter("request_id")


class Predictor:
    def __init__(self, catalog: Catalog, pool: ReplicaPool, log: PredictionLog, *,
                 log_features_sample: float = 1.0, shadow: ShadowMirror | None = None,
                 tracer: Tracer | None = None) -> None:
        if not 0.0 <= log_features_sample <= 1.0:
            raise ValueError("log_features_sample must be within [0, 1]")
        self.catalog = catalog
        self.pool = pool
        self.log = log
        self.log_features_sample = log_features_sample
        self.shadow = shadow
        self.health = pool.health
        self.new_id = RequestIds()
        self.tracer = tracer  # None: tracing is off

    # ------------------------------------------------------------------ one row
    async def submit(self, model: str, routing_key: str, request_id: str, named: Mapping[str, float],
                     dense: Sequence[float], pinned: int = 0, timeout: float | None = None,
                     started: float | None = None) -> Scored:
        """Score one row. `timeout`: seconds the caller has left (None: no deadline); `started`: when
        the call began (perf_counter; the logged latency counts from there)."""
        if started is None:
            started = time.perf_counter()
        fut, version, x, request_id, revision, failed = self._begin(model, routing_key, request_id, named,
                                                                    dense, pinned, timeout, started)
        try:
            try:
                score = await fut
            except UnavailableError as exc:  # the version failed the row: its fallback scores it
                failed = failed or version
                version, x, score = await self._rescue(model, None, version, pinned, timeout, started, exc,
                                                       lambda schema: schema.project_one(named, dense))
        except Exception as exc:
            self.log_error(model, failed or version, request_id, routing_key, revision, pinned, started, exc)
            raise
        return self._finish(model, version, x, request_id, routing_key, score, started, revision, pinned,
                            failed)

    def submit_nowait(self, model: str, routing_key: str, request_id: str, named: Mapping[str, float],
                      dense: Sequence[float], pinned: int, timeout: float | None, started: float,
                      on_done: OnDone, tag: Any = None) -> Flight:
        """`submit` without awaiting (streams: no task per row). Raising here means the row is bad
        and no work was queued; otherwise `on_done` hears how it ended."""
        fut, version, x, request_id, revision, failed = self._begin(model, routing_key, request_id, named,
                                                                    dense, pinned, timeout, started)
        future = fut if isinstance(fut, asyncio.Future) else asyncio.ensure_future(fut)
        flight = Flight(self, model, routing_key, (named, dense, pinned, timeout), started, on_done, tag,
                        version, x, request_id, future, revision, failed)
        future.add_done_callback(flight._scored)
        return flight

    def _begin(self, model: str, routing_key: str, request_id: str, named: Mapping[str, float],
               dense: Sequence[float], pinned: int, timeout: float | None, started: float,
               ) -> tuple[Awaitable[Any], int, np.ndarray, str, int, int | None]:
        """Validate, route, project and enqueue one row without awaiting anything. Returns (awaitable
        score, version, row, request id, split revision routed under, the down version it failed over
        from or None). A row that no version can take is logged as a request error of its version."""
        check_ids(routing_key, request_id)
        self.log.check_accepting()  # RESOURCE_EXHAUSTED when the log can keep no more rows
        entry = self.catalog.get(model)
        if self.tracer is None:
            version = self._version_for(entry, routing_key, pinned)
        else:
            version = self._traced_version_for(entry, routing_key, pinned)
        request_id = request_id or self.new_id()
        health = self.health
        failed: int | None = None
        try:
            if health.down and health.is_down(model, version):
                failed, version = version, self._fallback(entry, version, pinned, 1)
                try:
                    x = entry.schemas[version].project_one(named, dense)
                except FeatureError:  # fits the down version only: tell the caller why it cannot be scored
                    entry.schemas[failed].project_one(named, dense)  # a bad row raises its own error
                    raise health.unavailable(model, failed) from None
            else:
                schema = entry.schemas.get(version)
                if schema is None:
                    raise NotFoundError(f"version: model {model!r} has no version {version}")
                x = schema.project_one(named, dense)
            batcher = self._batcher_now(model, version, pinned)
        except UnavailableError as exc:
            self.log_error(model, failed or version, request_id, routing_key, entry.revision, pinned, started,
                           exc)
            raise
        if batcher is None:
            fut: Awaitable[Any] = self._deploy_then_score(model, version, x, timeout)
        else:
            fut = batcher.enqueue(x, one=True, expires_in=timeout)
        if self.shadow is not None and not pinned:
            if entry.shadow is not None:
                self.shadow.mirror_one(entry, version, x, named, dense, request_id)
            if entry.covariate_from is not None:  # the canary row's covariate (rollout.covariate)
                self.shadow.covariate_one(entry, version, x, named, dense, request_id)
        return fut, version, x, request_id, entry.revision, failed

    async def _deploy_then_score(self, model: str, version: int, x: np.ndarray,
                                 timeout: float | None) -> float:
        batcher = await self.pool.ensure(model, version)
        return await batcher.enqueue(x, one=True, expires_in=timeout)  # type: ignore[no-any-return]

    def _finish(self, model: str, version: int, x: np.ndarray, request_id: str, routing_key: str,
                score: float, started: float, revision: int | None = None, pinned: int = 0,
                failed: int | None = None) -> Scored:
        """Queue the log record (never blocks) and build the result. The row carries its own latency
        (from its arrival to its answer), the split revision it was routed under, whether the caller
        pinned the version, and the version that failed it over (None: none did)."""
        latency_ms = (time.perf_counter() - started) * 1e3
        f = self.log_features_sample
        sampled = f >= 1.0 or (f > 0.0 and random.random() < f)
        self.log.log_one(request_id, model, version, routing_key, score, latency_ms,
                         x[0] if sampled else None, revision, bool(pinned), failed)
        return Scored(request_id, model, version, score)

    def log_error(self, model: str, version: int, request_id: str, routing_key: str, revision: int | None,
                  pinned: int, started: float, exc: BaseException) -> None:
        """A request that failed entirely on `version`: a request_errors row (the rollout's error
        guardrail counts it against that version, from the database, across gateways)."""
        latency_ms = (time.perf_counter() - started) * 1e3
        self.log.log_error(request_id, model, version, routing_key, latency_ms,
                           f"{type(exc).__name__}: {exc}", revision, bool(pinned))

    # ------------------------------------------------------------------ routing
    def _version_for(self, entry: ModelEntry, routing_key: str, pinned: int) -> int:
        if pinned:
            if pinned not in entry.schemas:
                raise NotFoundError(f"version: model {entry.name!r} has no version {pinned}")
            return pinned
        try:
            return entry.router.route(routing_key)
        except LookupError:
            raise _no_split(entry.name) from None

    def _traced_version_for(self, entry: ModelEntry, routing_key: str, pinned: int) -> int:
        assert self.tracer is not None
        attributes = {"chimera.model": entry.name}
        with self.tracer.start_as_current_span("chimera.route", attributes=attributes) as span:
            version = self._version_for(entry, routing_key, pinned)
            span.set_attributes({"chimera.version": version, "chimera.pinned": bool(pinned)})
            return version

    def _route_many(self, entry: ModelEntry, keys: list[str], pinned: int) -> list[int]:
        """The version of each row (a new list the caller may change)."""
        if pinned:
            return [self._version_for(entry, "", pinned)] * len(keys)
        try:
            return entry.router.route_many(keys)
        except LookupError:
            raise _no_split(entry.name) from None

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

    async def _rescue(self, model: str, entry: ModelEntry | None, version: int, pinned: int,
                      timeout: float | None, started: float, cause: BaseException,
                      project: Callable[[Schema], np.ndarray], n: int = 1) -> tuple[int, np.ndarray, Any]:
        """Score what `version` failed on its fallback while the deadline allows: (fallback version, the
        rows in its schema, score or scores). `entry` None: one row (a float score), on the model's
        current entry (the row may have waited through a split change); else a group of `n` rows of
        a batch, on the entry the batch was routed with."""
        one = entry is None
        noun, was, does = ("request", "was", "does") if one else ("rows", "were", "do")
        if timeout is not None:
            timeout -= time.perf_counter() - started
            if timeout <= 0:
                raise TimeoutError(f"deadline exceeded before the {noun} {was} scored") from cause
        if entry is None:
            entry = self.catalog.get(model)
        target = self._fallback(entry, version, pinned, n, cause)
        try:
            x = project(entry.schemas[target])
        except FeatureError as exc:  # the rows fit the failed version's features only
            raise UnavailableError(f"version {version} of {model!r} failed ({cause}) and the {noun} {does} "
                                   f"not fit fallback version {target}: {exc}") from cause
        score = await self.pool.get(model, target).enqueue(x, one=one, expires_in=timeout)
        return target, x, score

    # ------------------------------------------------------------------ many rows
    async def submit_many(self, model: str, rows: Sequence[RequestLike], pinned: int = 0,
                          timeout: float | None = None,
                          columns: tuple[list[str], list[str]] | None = None) -> ScoredBatch:
        """Score a batch. Rows are routed one by one (on their own routing keys), grouped per version,
        and each group is one batcher item. `rows` may be chimera.v1.PredictRequest messages as they
        came, or a PackedRows matrix. Projection, validation, scoring and logging work on whole
        matrices. `columns`: the rows' (routing keys, request ids) when the caller has read them
        already (gateway.api.validate.check_rows does), so protobuf is not read twice."""
        started = time.perf_counter()
        entry = self.catalog.get(model)
        if isinstance(rows, PackedRows):
            keys, ids = rows.routing_keys, rows.request_ids
        elif columns is not None:
            keys, ids = columns
        else:
            keys = list(map(_routing_key, rows))
            ids = list(map(_request_id, rows))
        check_many_ids(rows, keys, ids)
        self.log.check_accepting()  # RESOURCE_EXHAUSTED when the log can keep no more rows
        if not any(ids):
            ids = self.new_id.many(len(ids))
        elif not all(ids):
            new_id = self.new_id
            ids = [rid or new_id() for rid in ids]
        if self.tracer is None:
            versions = self._route_many(entry, keys, pinned)
        else:
            versions = self._traced_route_many(entry, keys, pinned)
        failed_rows: list[int | None] | None = None  # per row: the down version it failed over from
        if self.health.down:
            routed = versions
            try:
                versions = self._avoid_down(entry, versions, pinned)
            except UnavailableError as exc:
                for i, v in enumerate(routed):
                    if self.health.is_down(model, v):
                        self.log_error(model, v, ids[i], keys[i], entry.revision, pinned, started, exc)
                raise
            if versions is not routed:
                failed_rows = [r if r != v else None for r, v in zip(routed, versions, strict=True)]
        by_version = groups(versions)
        matrices = project_groups(entry, rows, by_version)
        if self.shadow is not None and not pinned:
            if entry.shadow is not None:
                self.shadow.mirror_many(entry, rows, ids, by_version, matrices)
            if entry.covariate_from is not None:  # the canary rows' covariate (rollout.covariate)
                self.shadow.covariate_many(entry, rows, ids, by_version, matrices)
        results, moved, answered = await self._score_groups(
            entry, rows, by_version, matrices, pinned, timeout, started, ids, keys, failed_rows)
        scored_by = dict.fromkeys(by_version, 0)
        failed: dict[int, int | None | list[int | None]] = {}
        for version, idx in by_version.items():
            failed[version] = None if failed_rows is None else [failed_rows[i] for i in idx.tolist()]
        if moved:  # groups whose version failed them were scored by a fallback: log and answer that
            for version, (target, m) in moved.items():
                matrices[version] = m
                scored_by[version] = target
                pos = by_version[version].tolist()
                for i in pos:
                    versions[i] = target
                failed[version] = version if failed_rows is None else [failed_rows[i] or version for i in pos]
        log = self.log
        f = self.log_features_sample
        revision, pin = entry.revision, bool(pinned)
        if len(results) == 1:
            ((version, part),) = results.items()
            score_list = part.tolist()
            log.log_many(ids, model, scored_by[version] or version, keys, score_list,
                         (answered[version] - started) * 1e3, matrices[version], sample_mask(f, len(ids)),
                         revision, pin, failed[version])
            return ScoredBatch(model, ids, versions, score_list)
        scores = np.empty(len(rows))
        for version, part in results.items():
            scores[by_version[version]] = part
        score_list = scores.tolist()
        for version, idx in by_version.items():
            # Each group's own latency: its rows were answered when their version answered, so a slow
            # canary's rows do not stamp their time on the baseline's rows of the same batch.
            pos = idx.tolist()
            log.log_many([ids[i] for i in pos], model, scored_by[version] or version, [keys[i] for i in pos],
                         [score_list[i] for i in pos], (answered[version] - started) * 1e3, matrices[version],
                         sample_mask(f, len(pos)), revision, pin, failed[version])
        return ScoredBatch(model, ids, versions, score_list)

    async def _score_groups(self, entry: ModelEntry, rows: Sequence[RequestLike],
                            by_version: dict[int, np.ndarray], matrices: dict[int, np.ndarray], pinned: int,
                            timeout: float | None, started: float, ids: list[str], keys: list[str],
                            failed_rows: list[int | None] | None,
                            ) -> tuple[dict[int, np.ndarray], dict[int, tuple[int, np.ndarray]] | None,
                                       dict[int, float]]:
        """Scores per version group, the groups a fallback scored because their version failed
        them: {failed version: (fallback version, the group's rows in the fallback's schema)}, and when
        each group was answered (perf_counter). The rows of a group that no version could score are
        logged as request errors of the version that failed them before the error is raised."""
        model = entry.name
        futures: dict[int, Awaitable[Any]] = {}
        answered: dict[int, float] = {}
        try:
            for version in by_version:
                batcher = self._batcher_now(model, version, pinned)
                if batcher is None:
                    batcher = await self.pool.ensure(model, version)
                futures[version] = batcher.enqueue(matrices[version], expires_in=timeout)
        except UnavailableError as exc:
            self._log_group_errors(entry, by_version[version], version, pinned, started, ids, keys,
                                   failed_rows, exc)
            raise
        if len(futures) == 1:
            ((version, fut),) = futures.items()
            try:
                try:
                    part = await fut
                    answered[version] = time.perf_counter()
                    return {version: part}, None, answered
                except UnavailableError as exc:
                    target, m, part = await self._rescue_group(entry, rows, by_version[version], version,
                                                               pinned, timeout, started, exc)
                    answered[version] = time.perf_counter()
                    return {version: part}, {version: (target, m)}, answered
            except Exception as exc:
                self._log_group_errors(entry, by_version[version], version, pinned, started, ids, keys,
                                       failed_rows, exc)
                raise
        for version, fut in futures.items():  # stamp each group's answer time as it lands
            f = fut if isinstance(fut, asyncio.Future) else asyncio.ensure_future(fut)
            futures[version] = f
            f.add_done_callback(lambda _f, v=version: answered.__setitem__(v, time.perf_counter()))
        done = await asyncio.gather(*futures.values(), return_exceptions=True)
        results: dict[int, np.ndarray] = {}
        moved: dict[int, tuple[int, np.ndarray]] = {}
        for version, part in zip(futures, done, strict=True):
            try:
                if isinstance(part, UnavailableError):
                    target, m, part = await self._rescue_group(entry, rows, by_version[version], version,
                                                               pinned, timeout, started, part)
                    answered[version] = time.perf_counter()
                    moved[version] = (target, m)
                elif isinstance(part, BaseException):
                    raise part
            except Exception as exc:
                self._log_group_errors(entry, by_version[version], version, pinned, started, ids, keys,
                                       failed_rows, exc)
                raise
            results[version] = part
        return results, moved or None, answered

    def _log_group_errors(self, entry: ModelEntry, idx: np.ndarray, version: int, pinned: int, started: float,
                          ids: list[str], keys: list[str], failed_rows: list[int | None] | None,
                          exc: BaseException) -> None:
        for i in idx.tolist():
            failed = failed_rows[i] if failed_rows is not None else None
            self.log_error(entry.name, failed or version, ids[i], keys[i], entry.revision, pinned, started,
                           exc)

    def _rescue_group(self, entry: ModelEntry, rows: Sequence[RequestLike], idx: np.ndarray, version: int,
                      pinned: int, timeout: float | None, started: float,
                      cause: UnavailableError) -> Awaitable[tuple[int, np.ndarray, Any]]:
        pos = idx.tolist()
        return self._rescue(entry.name, entry, version, pinned, timeout, started, cause,
                            lambda schema: schema.project_rows([rows[i] for i in pos], pos), len(pos))


def _no_split(model: str) -> PreconditionError:
    return PreconditionError(f"model: {model!r} has no traffic split yet; set one with `chimera canary set`")


__all__ = ["Flight", "Predictor", "RequestIds", "Scored", "ScoredBatch"]
