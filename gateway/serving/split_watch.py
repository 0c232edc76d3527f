"""Keeps the catalog in step with the registry: a split change reaches this gateway within a
second without restart. PostgreSQL pushes changes with LISTEN/NOTIFY (a safety poll still runs);
SQLite is polled, which is one tiny query per interval."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import select
import threading
import time
from collections import Counter

from gateway.metrics import Metrics
from gateway.serving.catalog import Catalog, ModelEntry
from gateway.serving.replica_pool import ReplicaPool
from gateway.serving.router import Router
from registry.repository import SPLIT_CHANNEL

log = logging.getLogger(__name__)
Retry = tuple[tuple[int, int], float, float]  # (split revision, newest version), not before, delay


def failure_reason(exc: BaseException) -> str:
    """Why a version or model could not start, as callers and logs are told it (bounded)."""
    return f"{type(exc).__name__}: {exc}"[:500]


class SplitWatcher:
    def __init__(self, catalog: Catalog, pool: ReplicaPool, metrics: Metrics | None = None, *,
                 poll_interval_s: float = 0.25, listen_poll_interval_s: float = 2.0) -> None:
        self.catalog = catalog
        self.pool = pool
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self.listen_poll_interval_s = listen_poll_interval_s
        self._changed = asyncio.Event()
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener: threading.Thread | None = None
        self.last_error: str | None = None
        # A model whose split cannot be applied (e.g. no version can start) is retried with a doubling
        # delay (RETRY_MIN_S .. RETRY_MAX_S) instead of at every poll: each try may deploy to Ray.
        self.attempts: Counter[str] = Counter()
        self._retry: dict[str, Retry] = {}  # model -> (revision, not before, delay)
        self._syncing: dict[str, asyncio.Task[None]] = {}  # model -> its try in flight (check)
        # Models not served because no version could start (model -> why), read by the servicers' error
        # path and the chimera_models_failed_to_start gauge. The retries above go on for them, so the
        # cause may be transient (Serve's proxy restarting, an artifact repaired); a model leaves this
        # map the moment one of them installs it.
        self.failed: dict[str, str] = {}

    RETRY_MIN_S = 1.0
    RETRY_MAX_S = 60.0

    def trying(self, model: str) -> bool:
        """Whether a try at `model`'s split (a deploy, perhaps) is running now."""
        return model in self._syncing

    def retry_delay(self, model: str) -> float:
        """Seconds this watcher waits before trying `model`'s current split again (0: no failure)."""
        retry = self._retry.get(model)
        return retry[2] if retry is not None else 0.0

    async def sync_model(self, model: str) -> ModelEntry:
        """Deploy replicas for every weighted version (and the shadow) first, all at once (each is its own
        Serve application: a canary's start no longer waits for the baseline's), then swap the routing
        table, so a version never gets traffic before it can answer."""
        entry = await asyncio.to_thread(self.catalog.load, model)
        versions = list(entry.router.versions)
        shadow = [entry.shadow] if entry.shadow is not None else []
        results = await asyncio.gather(*(self.pool.ensure(model, v) for v in versions + shadow),
                                       return_exceptions=True)
        for r in results:  # cancelled, or the process is stopping: not a version's failure
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r
        failed = {v: failure_reason(r)
                  for v, r in zip(versions, results[:len(versions)], strict=True)
                  if isinstance(r, Exception)}  # e.g. tampered artifact: the replica refuses to load it
        if failed:
            entry = await self._drop_failed(entry, failed)
        if shadow and isinstance(results[-1], Exception):  # a broken mirror must never affect served traffic
            log.error("model %s: shadow v%d cannot start; not mirroring", model, shadow[0],
                      exc_info=results[-1])
            entry = dataclasses.replace(entry, shadow=None)
        self.catalog.install(entry)
        if self.metrics is not None:
            self.metrics.split_revision.labels(model).set(entry.revision)
            weights = entry.router.weights
            for version in entry.schemas:
                self.metrics.split_weight.labels(model, str(version)).set(weights.get(version, 0))
        log.info("model %s: split revision %d %s", model, entry.revision, dict(entry.router.weights))
        return entry

    async def _drop_failed(self, entry: ModelEntry, failed: dict[int, str]) -> ModelEntry:
        """Versions whose replicas cannot start are marked failed and their weight goes to the
        heaviest healthy version, in the registry (so every gateway agrees and the audit log says
        why) and in this gateway's routing table."""
        model = entry.name
        weights = dict(entry.router.weights)
        healthy = {v: w for v, w in weights.items() if v not in failed}
        if not healthy:
            raise RuntimeError(f"no version of {model!r} can start: {failed}")
        heir = max(healthy, key=lambda v: (healthy[v], -v))
        new = {**{v: 0 for v in weights}, **healthy, heir: healthy[heir] + sum(weights[v] for v in failed)}
        reason = "; ".join(f"v{v} failed to start: {why}" for v, why in failed.items())
        log.error("model %s: %s; its traffic goes to v%d", model, reason, heir)
        from registry import ConflictError
        from replicas.deployment import undeploy_version

        for version in failed:
            if not self.pool.is_declared(model, version):  # a declared application is the cluster's
                await asyncio.to_thread(undeploy_version, model, version, blocking=False)
        try:
            split = await asyncio.to_thread(
                self.catalog.registry.set_split, model, new, expected_revision=entry.revision,
                actor="gateway", reason=reason, status_changes={v: "failed" for v in failed})
            revision = split.revision
        except ConflictError:  # another gateway got there first; route safely meanwhile
            revision = entry.revision
        live = {v: w for v, w in new.items() if w > 0}
        return dataclasses.replace(entry, revision=revision, router=Router(live))

    async def sync_all(self) -> None:
        for model in await asyncio.to_thread(self.catalog.all_model_names):
            await self.sync_model(model)

    async def start_all(self) -> None:
        """Deploy every model, all at once (start-up: the port opens when all are ready or failed). One
        with no startable version (e.g. a corrupted artifact, or Ray failing under it) is marked in
        `failed` by `_try`, as any later failure is, and `check` retries it after the same backoff; the
        others serve regardless."""
        revisions = await asyncio.to_thread(self.catalog.registry.split_revisions)
        await asyncio.gather(*(self._try(model, revision, None) for model, revision in revisions.items()))

    async def check(self) -> None:
        """Start a sync for every model whose split or versions changed, each in its own task and at
        most one per model: a model whose try deploys for seconds (a new canary, or one that cannot
        start and is retried) never holds back another model's split change, such as the controller's
        rollback. Measured before: a rollback waited 8.5 s behind a retry of a broken model
        (test_door.py's start-up isolation test checks it now takes under 2 s)."""
        revisions = await asyncio.to_thread(self.catalog.registry.split_revisions)
        known = self.catalog.revisions()
        now = time.monotonic()
        for model, revision in revisions.items():
            if known.get(model) == revision or model in self._syncing:
                continue  # in step, or a try is running (a newer revision is picked up after it)
            retry = self._retry.get(model)
            if retry is not None and retry[0] == revision and now < retry[1]:
                continue  # failed at this revision a moment ago: wait out the backoff
            task = asyncio.get_running_loop().create_task(self._try(model, revision, retry))
            self._syncing[model] = task
            task.add_done_callback(lambda _t, m=model: self._synced(m))
        for model in set(known) - set(revisions):
            self.catalog.remove(model)

    def _synced(self, model: str) -> None:
        self._syncing.pop(model, None)
        self._changed.set()  # look again at once: the split may have moved during the try

    async def _try(self, model: str, revision: tuple[int, int], retry: Retry | None) -> None:
        """One try at `model`'s current split (at start-up or after a change); on failure the old split
        keeps serving (or, for a model not served at all, `failed` says why) and the next try waits a
        doubling delay. The one place that keeps this bookkeeping."""
        self.attempts[model] += 1
        try:
            await self.sync_model(model)
            self.last_error = None
            self._retry.pop(model, None)
            if self.failed.pop(model, None) is not None:
                log.warning("model %s: served again after %d tries", model, self.attempts[model])
        except Exception as exc:  # keep serving the old split; try again after a backoff
            why = failure_reason(exc)
            self.last_error = f"{model}: {why}"
            delay = self.RETRY_MIN_S if retry is None or retry[0] != revision else min(
                2 * retry[2], self.RETRY_MAX_S)
            self._retry[model] = (revision, time.monotonic() + delay, delay)
            if self.catalog.knows(model):
                log.exception("could not apply split change of %s; its last split keeps serving (next try "
                              "in %.0f s)", model, delay)
            else:  # nothing of it is served: say why to its callers
                self.failed[model] = why
                log.error("model %s: not served, no version could start (next try in %.0f s): %s",
                          model, delay, why, exc_info=exc)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.catalog.registry.is_postgres:
            self._listener = threading.Thread(target=self._listen, args=(loop,), name="chimera-split-listen",
                                              daemon=True)
            self._listener.start()
        self._task = loop.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        tasks = [t for t in (self._task, *self._syncing.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    async def _run(self) -> None:
        interval = self.listen_poll_interval_s if self._listener else self.poll_interval_s
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._changed.wait(), interval)
            except TimeoutError:
                pass
            self._changed.clear()
            try:
                await self.check()
            except Exception as exc:  # database unreachable: serve from the cached split
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("split check failed: %s", self.last_error)

    def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """Blocking LISTEN loop in its own thread and connection; reconnects after outages."""
        while not self._stop.is_set():
            conn = None
            try:
                engine = self.catalog.registry.engine
                cargs, cparams = engine.dialect.create_connect_args(engine.url)
                from registry.repository import POSTGRES_CONNECT_ARGS

                conn = engine.dialect.loaded_dbapi.connect(*cargs, **{**POSTGRES_CONNECT_ARGS, **cparams})
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute("LISTEN chimera_split")  # == SPLIT_CHANNEL; no SQL built from strings
                loop.call_soon_threadsafe(self._changed.set)  # catch up on anything missed
                log.info("listening for split changes on PostgreSQL channel %s", SPLIT_CHANNEL)
                while not self._stop.is_set():
                    if select.select([conn], [], [], 0.5) == ([], [], []):
                        continue
                    conn.poll()
                    if conn.notifies:
                        log.debug("split change notified: %s", [n.payload for n in conn.notifies])
                        conn.notifies.clear()
                        loop.call_soon_threadsafe(self._changed.set)
            except Exception as exc:
                log.warning("split LISTEN connection lost (%s); retrying", type(exc).__name__)
                self._stop.wait(1.0)
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
