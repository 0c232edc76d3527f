"""One row of a PredictStream in flight, without a task per row: a done-callback on the batcher's
future logs the row (through the Predictor) and tells the stream; only a row whose version failed
gets a task, for its rescue on the fallback (Predictor._rescue, the one place for failover)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.serving.errors import UnavailableError
from gateway.serving.rows import Scored

if TYPE_CHECKING:
    from gateway.serving.predictor import Predictor

OnDone = Callable[["Flight", Scored | None, BaseException | None], None]


class Flight:
    """One row of a stream being scored. `future` is what to cancel (the failover task, once the row
    has failed over); `on_done(flight, scored, error)` is called once, with both None if cancelled.
    `tag` is the caller's own (the stream keeps its request there)."""

    __slots__ = ("predictor", "model", "routing_key", "retry", "started", "version", "x", "request_id",
                 "future", "on_done", "tag", "revision", "failed")

    def __init__(self, predictor: Predictor, model: str, routing_key: str,
                 retry: tuple[Mapping[str, float], Sequence[float], int, float | None], started: float,
                 on_done: OnDone, tag: Any, version: int, x: np.ndarray, request_id: str,
                 future: asyncio.Future[Any], revision: int | None = None, failed: int | None = None) -> None:
        self.predictor = predictor
        self.model = model
        self.routing_key = routing_key
        self.retry = retry  # (named, dense, pinned, timeout): read only if the row fails over
        self.started = started
        self.on_done = on_done
        self.tag = tag
        self.version = version
        self.x = x
        self.request_id = request_id
        self.future = future
        self.revision = revision  # the split revision the row was routed under
        self.failed = failed  # the version the row failed over from (None: none)

    def cancel(self) -> None:
        self.future.cancel()

    def _scored(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            self.on_done(self, None, None)
            return
        exc = fut.exception()
        if exc is None:
            p = self.predictor
            self.on_done(self, p._finish(self.model, self.version, self.x, self.request_id,
                                         self.routing_key, fut.result(), self.started, self.revision,
                                         self.retry[2], self.failed), None)
            return
        if isinstance(exc, UnavailableError):  # the version failed the row: its fallback scores it
            named, dense, pinned, timeout = self.retry
            self.failed = self.failed or self.version
            self.future = asyncio.ensure_future(self.predictor._rescue(
                self.model, None, self.version, pinned, timeout, self.started, exc,
                lambda schema: schema.project_one(named, dense)))
            self.future.add_done_callback(self._rescued)
            return
        self._error(exc)

    def _error(self, exc: BaseException) -> None:
        """The row failed entirely: a request error of the version that failed it, then the caller."""
        self.predictor.log_error(self.model, self.failed or self.version, self.request_id, self.routing_key,
                                 self.revision, self.retry[2], self.started, exc)
        self.on_done(self, None, exc)

    def _rescued(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            self.on_done(self, None, None)
            return
        exc = fut.exception()
        if exc is not None:
            self._error(exc)
            return
        self.version, self.x, score = fut.result()
        self.on_done(self, self.predictor._finish(self.model, self.version, self.x, self.request_id,
                                                  self.routing_key, score, self.started, self.revision,
                                                  self.retry[2], self.failed), None)
