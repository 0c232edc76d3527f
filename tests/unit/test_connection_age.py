"""CHIMERA_MAX_CONNECTION_AGE_S: how it is read, and what the gateway's grpc options do with it on a real
grpc server over loopback. A client's long-lived connection is moved to a new one as it ages (so the
kernel or a load balancer places it afresh: chimera.settings.GatewaySettings says why), without a failed
call, and a stream longer than the age is never cut. tests/integration/test_workers.py shows the same on
`chimera serve --processes 2`: a restarted worker gets calls again from the clients already connected."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from chimera.settings import DEFAULT_MAX_CONNECTION_AGE_S, Settings
from gateway.config import GatewayConfig
from gateway.server import connection_age_options

AGE_S = 0.5


def test_the_age_is_read_from_the_environment_and_bad_values_name_the_variable() -> None:
    assert Settings.from_env({}).gateway.max_connection_age_s == DEFAULT_MAX_CONNECTION_AGE_S == 0.0
    assert GatewayConfig.from_settings(Settings.from_env({"CHIMERA_MAX_CONNECTION_AGE_S": "5"})
                                       ).max_connection_age_s == 5.0
    assert connection_age_options(0.0) == []  # 0: connections are never asked to reconnect
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(ValueError, match="^CHIMERA_MAX_CONNECTION_AGE_S: "):
            Settings.from_env({"CHIMERA_MAX_CONNECTION_AGE_S": bad})


def _server() -> tuple[grpc.Server, int]:
    """A grpc server with the gateway's connection-age options: Peer answers the caller's address (its
    port changes with each new connection); Ticks streams `n` messages 0.1 s apart."""

    def ticks(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request)):
            time.sleep(0.1)
            yield str(i).encode()

    handler = grpc.method_handlers_generic_handler("t.T", {
        "Peer": grpc.unary_unary_rpc_method_handler(lambda request, context: context.peer().encode()),
        "Ticks": grpc.unary_stream_rpc_method_handler(ticks),
    })
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[handler],
                         options=connection_age_options(AGE_S))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_a_long_lived_client_is_moved_to_new_connections_without_a_failed_call() -> None:
    server, port = _server()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            peer = channel.unary_unary("/t.T/Peer")
            peers: set[bytes] = set()
            calls = 0
            end = time.monotonic() + 8 * AGE_S
            while time.monotonic() < end:
                peers.add(peer(b"", timeout=5))  # a failed call raises: the test fails
                calls += 1
                time.sleep(0.005)
        # The age carries grpc's ±10 % jitter: 8 ages give 7 new connections or more; without the
        # options, one connection for the whole run.
        assert len(peers) >= 6, (len(peers), calls)
    finally:
        server.stop(None)


def test_a_stream_longer_than_the_age_runs_to_its_end() -> None:
    server, port = _server()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            ticks = channel.unary_stream("/t.T/Ticks")
            got = list(ticks(b"30", timeout=20))  # 3 s: six ages
        assert got == [str(i).encode() for i in range(30)]
    finally:
        server.stop(None)
