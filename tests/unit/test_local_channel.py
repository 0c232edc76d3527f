"""The replicas' local channel (replicas.local_channel) and the gateway's use of it
(gateway.serving.local_path) over real loopback sockets: what it scores, whom it refuses, and that a
broken or hostile connection never stops it serving the next one. With Ray: test_local_channel in
tests/integration."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from gateway.serving.local_path import LocalPath
from replicas import local_channel
from replicas.local_channel import LocalChannel, LocalChannelError, LocalServer, ReplicaError


def weights_score(rows: np.ndarray) -> np.ndarray:
    """A stand-in scorer with a checkable answer; refuses any width but 3, as OnnxScorer does."""
    if rows.shape[1] != 3:
        raise ValueError(f"rows: expected shape [N, 3], got {list(rows.shape)}")
    return 1 / (1 + np.exp(-(rows.astype(np.float64) @ np.array([0.5, -1.0, 2.0]))))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def until(predicate: Any, what: str, timeout_s: float = 5.0) -> None:
    """Await `predicate()` becoming true (the path's background task connecting), or fail naming it."""
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_caller_with_the_key_gets_the_scorers_answers_and_a_refusal_keeps_the_channel() -> None:
    async def go() -> None:
        server = await LocalServer(weights_score).start()
        ch = await LocalChannel.connect(server.port, server.key)
        rows = np.random.default_rng(1).normal(size=(300, 3)).astype(np.float32)
        np.testing.assert_array_equal(await ch.call(rows), weights_score(rows))
        with pytest.raises(ReplicaError, match=r"expected shape \[N, 3\], got \[2, 5\]"):
            await ch.call(np.zeros((2, 5), dtype=np.float32))
        one = rows[:1]
        np.testing.assert_array_equal(await ch.call(one), weights_score(one))  # still in step
        ch.close()
        server.close()

    run(go())


def test_the_server_binds_loopback_only() -> None:
    async def go() -> None:
        server = await LocalServer(weights_score).start()
        assert server._server is not None
        assert {s.getsockname()[0] for s in server._server.sockets} == {"127.0.0.1"}
        server.close()

    run(go())


def test_a_caller_without_the_key_is_refused_and_never_scored() -> None:
    calls: list[int] = []

    def counting(rows: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        return weights_score(rows)

    async def go() -> None:
        server = await LocalServer(counting).start()
        with pytest.raises(LocalChannelError):
            ch = await LocalChannel.connect(server.port, b"x" * 32)
            await ch.call(np.zeros((1, 3), dtype=np.float32))
        # A wrong proof, then a well-formed request: closed, nothing answered.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(local_channel.MAGIC + b"n" * local_channel.NONCE)
        await reader.readexactly(local_channel.NONCE + local_channel.MAC)
        writer.write(b"p" * local_channel.MAC + struct.pack("<II", 1, 3) + np.zeros(3, np.float32).tobytes())
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert calls == []
        server.close()

    run(go())


def test_a_gateway_never_sends_rows_to_a_server_that_does_not_know_the_key() -> None:
    async def go() -> None:
        impostor = await LocalServer(weights_score).start()  # another key: a process that took the port
        with pytest.raises(LocalChannelError, match="not the replica"):
            await LocalChannel.connect(impostor.port, b"k" * 32)
        impostor.close()

    run(go())


@pytest.mark.parametrize("frame", [
    b"GET / HTTP/1.1\r\n\r\n" + b"x" * 40,                      # not the protocol at all
    "after-handshake:" + "0",                                  # zero rows
    "after-handshake:" + "huge",                               # over the byte bound
    "after-handshake:" + "torn",                               # header, then half the body, then gone
])
def test_broken_or_hostile_connections_are_closed_and_the_next_caller_is_served(frame: Any) -> None:
    async def go() -> None:
        server = await LocalServer(weights_score).start()
        if isinstance(frame, bytes):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(frame)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        else:
            ch = await LocalChannel.connect(server.port, server.key)
            w = ch._writer
            kind = frame.split(":")[1]
            if kind == "0":
                w.write(struct.pack("<II", 0, 3))
            elif kind == "huge":
                w.write(struct.pack("<II", 65_536, 65_536))
            else:
                w.write(struct.pack("<II", 100, 3) + b"\0" * 600)
                w.close()
            if kind != "torn":
                assert await asyncio.wait_for(ch._reader.read(), 5) == b""
            ch.close()
        ok = await LocalChannel.connect(server.port, server.key)
        rows = np.ones((4, 3), dtype=np.float32)
        np.testing.assert_array_equal(await ok.call(rows), weights_score(rows))
        ok.close()
        server.close()

    run(go())


def test_a_connection_that_stalls_in_the_handshake_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_channel, "HANDSHAKE_TIMEOUT_S", 0.3)

    async def go() -> None:
        server = await LocalServer(weights_score).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(local_channel.MAGIC[:3])  # and nothing more
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        server.close()

    run(go())


def _serve_in_child(out: Any) -> None:
    async def go() -> None:
        server = await LocalServer(weights_score).start()
        out.put((server.port, server.key))
        await asyncio.sleep(600)

    asyncio.run(go())


def test_a_killed_replica_process_breaks_the_channel_with_the_channel_error() -> None:
    """What the pool falls back to Ray Serve on (a killed replica), not a hang or another error."""
    import multiprocessing as mp
    import os
    import signal

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_serve_in_child, args=(out,), daemon=True)
    child.start()
    try:
        port, key = out.get(timeout=60)

        async def go() -> None:
            ch = await LocalChannel.connect(port, key)
            rows = np.ones((1, 3), dtype=np.float32)
            np.testing.assert_array_equal(await ch.call(rows), weights_score(rows))
            assert child.pid is not None
            os.kill(child.pid, signal.SIGKILL)
            child.join(10)
            with pytest.raises(LocalChannelError):
                await asyncio.wait_for(ch.call(rows), 5)
            with pytest.raises(LocalChannelError):
                await LocalChannel.connect(port, key)

        run(go())
    finally:
        if child.is_alive():
            child.kill()
        child.join(10)


def counted_path(server: LocalServer) -> tuple[LocalPath, list[int]]:
    """A LocalPath on node n1 whose discovery finds `server` on n1, and the list it appends to per call."""
    asked: list[int] = []

    async def discover() -> Mapping[str, Any]:
        asked.append(1)
        return {"node_id": "n1", "port": server.port, "key": server.key}

    return LocalPath(discover, "n1", "m v1"), asked


def test_the_path_uses_one_call_at_a_time_and_finds_the_channel_again_after_a_break() -> None:
    async def go() -> None:
        server = await LocalServer(weights_score).start()
        path, asked = counted_path(server)
        path.start()
        await until(lambda: path.status == "connected", "the channel")
        ch = path.take()
        assert ch is not None and path.take() is None  # its one call is out
        path.give_back(ch, healthy=False)  # broke mid-answer: closed, found again
        await until(lambda: path.status == "connected" and len(asked) == 2, "the channel found again")
        again = path.take()
        assert again is not None and again is not ch
        rows = np.ones((2, 3), dtype=np.float32)
        np.testing.assert_array_equal(await again.call(rows), weights_score(rows))
        path.give_back(again, healthy=True)
        await path.close()
        server.close()

    run(go())


def test_an_idle_path_makes_no_call_until_the_first_one_asks_for_the_channel() -> None:
    """Discovery is a Ray Serve call, which Serve's autoscaler counts as load: made at deploy time it
    scaled an idle version up (local_path's docstring), so it waits for the first real call."""
    async def go() -> None:
        server = await LocalServer(weights_score).start()
        path, asked = counted_path(server)
        await asyncio.sleep(0.3)
        assert asked == [] and path.status == "starting"
        assert path.take() is None  # the first call goes through Serve and starts the search
        await until(lambda: path.status == "connected", "the channel")
        assert asked == [1]
        ch = path.take()
        assert ch is not None
        path.give_back(ch, healthy=True)
        await path.close()
        # Closed for good: a late call goes through Serve and starts no new search.
        assert path.take() is None
        await asyncio.sleep(0.3)
        assert asked == [1]
        server.close()

    run(go())


def test_a_replica_on_another_node_is_never_called_through_the_channel() -> None:
    async def go() -> None:
        server = await LocalServer(weights_score).start()

        async def discover() -> Mapping[str, Any]:
            return {"node_id": "other", "port": server.port, "key": server.key}

        path = LocalPath(discover, "mine", "m v1")
        path.start()
        await until(lambda: path.status == "remote", "the remote verdict")
        assert path.status == "remote" and path.take() is None
        await path.close()
        server.close()

    run(go())


@pytest.mark.parametrize(("value", "on"), [(None, True), ("1", True), ("on", True), ("0", False),
                                           ("off", False), ("false", False)])
def test_chimera_serve_takes_the_channel_switch_from_the_environment(value: str | None, on: bool) -> None:
    from chimera.settings import Settings
    from gateway.config import GatewayConfig

    env = {} if value is None else {"CHIMERA_LOCAL_REPLICA_CHANNEL": value}
    assert GatewayConfig.from_settings(Settings.from_env(env)).batch.local_channel is on


def test_a_bad_channel_switch_is_refused_naming_the_variable() -> None:
    from chimera.settings import Settings

    with pytest.raises(ValueError, match="CHIMERA_LOCAL_REPLICA_CHANNEL: 'maybe' is not on/off"):
        Settings.from_env({"CHIMERA_LOCAL_REPLICA_CHANNEL": "maybe"})


def test_the_path_carries_as_many_calls_as_its_slots_and_follows_a_change_of_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.serving import local_path

    monkeypatch.setattr(local_path, "RECHECK_S", 0.05)

    async def go() -> None:
        server = await LocalServer(weights_score).start()
        slots = [3]

        async def discover() -> Mapping[str, Any]:
            return {"node_id": "n1", "port": server.port, "key": server.key}

        path = LocalPath(discover, "n1", "m v1", lambda: slots[0])
        path.start()
        await until(lambda: len(path._idle) == 3, "three connections")
        taken = [path.take() for _ in range(4)]
        assert all(taken[:3]) and taken[3] is None  # three slots: three calls at once, the fourth via Serve
        rows = np.ones((2, 3), dtype=np.float32)
        answers = await asyncio.gather(*(ch.call(rows) for ch in taken[:3]))  # type: ignore[union-attr]
        for a in answers:
            np.testing.assert_array_equal(a, weights_score(rows))
        for ch in taken[:3]:
            path.give_back(ch, healthy=True)  # type: ignore[arg-type]
        slots[0] = 1  # e.g. the version became autoscaled: one call at a time
        one = path.take()
        assert one is not None and path.take() is None
        path.give_back(one, healthy=True)
        await path.close()
        server.close()

    run(go())
