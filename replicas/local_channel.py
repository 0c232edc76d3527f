"""A replica's local channel: scoring calls from a gateway on the same Ray node over one loopback TCP
connection, without Ray Serve's per-call machinery.

Why it exists: one Ray Serve handle call costs ~1.7 ms here (router, request metadata, cloudpickle,
Serve's replica wrapper), more than the whole 1.0 ms a request may add over a do-nothing gRPC server
(issue 17, docs/performance.md "The c=1 target and one Ray Serve call"). A grpc.aio call between two
Python processes costs ~0.55 ms at p50 on the 2-core machine, an asyncio stream round trip ~0.14 ms
(docs/performance.md, "A local channel to the replicas"). So this is a small protocol of our own over asyncio
streams; no library offers a cheaper authenticated request/response between two asyncio processes.

What Ray Serve still owns: which replicas run, their health checks and restarts, autoscaling, and every
call the gateway does not send here. The gateway (gateway.serving.local_path) sends at most one call
at a time per version over this channel, to a replica on its own node, and falls back to the Serve
handle when the channel is not there or breaks.

Nothing is open beyond loopback: the server binds 127.0.0.1 only, and a connection must prove it knows
the replica's random 32-byte key (returned only through the Serve handle, i.e. to Ray-authenticated
callers) before any row is read; the server proves it too, so a gateway never sends rows to another
process that took the port. Handshake, with HMAC-SHA256 under the key K:

    client -> server  MAGIC, nonce_c (16 bytes)
    server -> client  nonce_s (16), HMAC(K, "server" | nonce_c | nonce_s)
    client -> server  HMAC(K, "client" | nonce_s | nonce_c)

Then requests, one at a time: `<II` rows, columns, then rows x columns float32 (row-major); answers:
`<BI` status, n, then n float64 scores (status 0) or n bytes of UTF-8 error text (status 1). A frame
over the bounds, a bad handshake or a handshake slower than HANDSHAKE_TIMEOUT_S closes the connection;
nothing is ever unpickled from the socket."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import struct
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"CHMLC1\0\0"
NONCE = 16
MAC = 32
HANDSHAKE_TIMEOUT_S = 5.0
MAX_ROWS = 65_536
MAX_COLUMNS = 65_536
MAX_REQUEST_BYTES = 64 << 20
MAX_CONNECTIONS = 64
_REQUEST = struct.Struct("<II")
_ANSWER = struct.Struct("<BI")


class LocalChannelError(ConnectionError):
    """The channel broke or never formed (handshake, protocol, closed socket): the call may be sent
    through Ray Serve instead; nothing was scored for it, or its answer was lost."""


class ReplicaError(RuntimeError):
    """The replica received the rows and refused them (its scorer raised): its message."""


def _mac(key: bytes, label: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(key, label + a + b, hashlib.sha256).digest()


class LocalServer:
    """The replica's side: an asyncio server on 127.0.0.1 in the replica's own event loop, answering
    with `score` (a replica's OnnxScorer.score: synchronous, tens to hundreds of microseconds)."""

    def __init__(self, score: Callable[[np.ndarray], np.ndarray]) -> None:
        self._score = score
        self.key = os.urandom(32)
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._connections = 0

    async def start(self) -> LocalServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        try:
            if self._connections > MAX_CONNECTIONS:
                return
            try:
                await asyncio.wait_for(self._handshake(reader, writer), HANDSHAKE_TIMEOUT_S)
            except (TimeoutError, LocalChannelError, asyncio.IncompleteReadError, OSError):
                return
            while True:
                try:
                    head = await reader.readexactly(_REQUEST.size)
                except (asyncio.IncompleteReadError, OSError):
                    return  # the gateway closed the channel
                rows, cols = _REQUEST.unpack(head)
                if not (1 <= rows <= MAX_ROWS and 1 <= cols <= MAX_COLUMNS
                        and rows * cols * 4 <= MAX_REQUEST_BYTES):
                    return  # over the bounds: a broken or hostile caller
                body = await reader.readexactly(rows * cols * 4)
                matrix = np.frombuffer(body, dtype=np.float32).reshape(rows, cols)
                try:
                    scores = np.ascontiguousarray(self._score(matrix), dtype=np.float64)
                    writer.write(_ANSWER.pack(0, len(scores)) + scores.tobytes())
                except Exception as exc:  # the scorer's refusal goes back to the caller, like Serve's
                    text = f"{type(exc).__name__}: {exc}"[:2000].encode()
                    writer.write(_ANSWER.pack(1, len(text)) + text)
                await writer.drain()
        except (asyncio.IncompleteReadError, OSError):
            return
        finally:
            self._connections -= 1
            writer.close()

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await reader.readexactly(len(MAGIC) + NONCE)
        if hello[:len(MAGIC)] != MAGIC:
            raise LocalChannelError("not a Chimera local channel")
        nonce_c = hello[len(MAGIC):]
        nonce_s = os.urandom(NONCE)
        writer.write(nonce_s + _mac(self.key, b"server", nonce_c, nonce_s))
        await writer.drain()
        proof = await reader.readexactly(MAC)
        if not hmac.compare_digest(proof, _mac(self.key, b"client", nonce_s, nonce_c)):
            raise LocalChannelError("the caller does not know the key")


class LocalChannel:
    """The gateway's side: one connection, one call at a time (the caller guarantees it)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, port: int, key: bytes, *, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> LocalChannel:
        """Connect to 127.0.0.1:`port` and check that the server knows `key`; LocalChannelError if not."""
        async def open_() -> LocalChannel:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                nonce_c = os.urandom(NONCE)
                writer.write(MAGIC + nonce_c)
                answer = await reader.readexactly(NONCE + MAC)
                nonce_s, proof = answer[:NONCE], answer[NONCE:]
                if not hmac.compare_digest(proof, _mac(key, b"server", nonce_c, nonce_s)):
                    raise LocalChannelError(f"127.0.0.1:{port} is not the replica (wrong key)")
                writer.write(_mac(key, b"client", nonce_s, nonce_c))
                await writer.drain()
            except BaseException:
                writer.close()
                raise
            return cls(reader, writer)

        try:
            return await asyncio.wait_for(open_(), timeout_s)
        except LocalChannelError:
            raise
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            raise LocalChannelError(f"127.0.0.1:{port}: {type(exc).__name__}: {exc}") from exc

    async def call(self, rows: np.ndarray) -> np.ndarray:
        """P(label = 1) for each row of `rows` ([N, n] float32). LocalChannelError if the channel broke
        (close it: a half-read answer leaves it unusable), ReplicaError if the replica refused the rows."""
        x = np.ascontiguousarray(rows, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"rows: expected a matrix, got shape {list(x.shape)}")
        try:
            self._writer.write(_REQUEST.pack(x.shape[0], x.shape[1]) + x.tobytes())
            status, n = _ANSWER.unpack(await self._reader.readexactly(_ANSWER.size))
            if status == 0 and n == x.shape[0]:
                return np.frombuffer(await self._reader.readexactly(8 * n), dtype=np.float64)
            if status != 1 or n > 4096:
                raise LocalChannelError(f"local channel: unexpected answer (status {status}, {n})")
            text = await self._reader.readexactly(n)
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise LocalChannelError(f"local channel broke: {type(exc).__name__}: {exc}") from exc
        raise ReplicaError(text.decode(errors="replace"))

    def close(self) -> None:
        self._writer.close()
