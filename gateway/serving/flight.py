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

    __slots__ = ("predictor", "model", "routing_key", "named", "dense", "pinned", "timeout", "started",
                 "version", "x", "request_id", "future", "on_done", "tag")

    def __init__(self, predictor: Predictor, model: str, routing_key: str, named: Mapping[str, float],
                 dense: Sequence[float], pinned: int, timeout: float | None, started: float,
                 on_done: OnDone, tag: Any) -> None:
        self.predictor = predictor
        self.model = model
        self.routing_key = routing_key
        self.named = named
        self.dense = dense
        self.pinned = pinned
        self.timeout = timeout
        self.started = started
        self.on_done = on_done
        self.tag = tag
        self.version = 0
        self.x: np.ndarray | None = None
        self.request_id = ""
        self.future: asyncio.Future[Any] | None = None

    def cancel(self) -> None:
        if self.future is not None:
            self.future.cancel()

    def _scored(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            self.on_done(self, None, None)
            return
        exc = fut.exception()
        if exc is None:
            p = self.predictor
            self.on_done(self, p._finish(self.model, self.version, self.x, self.request_id,  # type: ignore[arg-type]
                                         self.routing_key, fut.result(), self.started), None)
            return
        if isinstance(exc, UnavailableError):  # the version failed the row: its fallback scores it
            self.future = asyncio.ensure_future(self.predictor._rescue(
                self.model, None, self.version, self.pinned, self.timeout, self.started, exc,
                lambda schema: schema.project_one(self.named, self.dense)))
            self.future.add_done_callback(self._rescued)
            return
        self.on_done(self, None, exc)

    def _rescued(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            self.on_done(self, None, None)
            return
        exc = fut.exception()
        if exc is not None:
            self.on_done(self, None, exc)
            return
        self.version, self.x, score = fut.result()
        self.on_done(self, self.predictor._finish(self.model, self.version, self.x, self.request_id,  # type: ignore[arg-type]
                                                  self.routing_key, score, self.started), None)
