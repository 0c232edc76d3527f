"""gateway.server.check_port_free: a gateway refuses to start on a gRPC port another process listens on,
but not on one that a gateway which just stopped left with connections in TIME_WAIT (a restart on the
same port must work at once, as grpc's own bind with SO_REUSEADDR does)."""

from __future__ import annotations

import socket

import pytest

from gateway.server import check_port_free
from loadtest.ports import free_port


def test_a_listened_port_is_refused_naming_it() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"^port: cannot listen on 127.0.0.1:{port} for gRPC"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # closed: free again


def test_a_port_left_in_time_wait_by_a_stopped_server_is_free() -> None:
    port = free_port()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen()
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first: its end of the connection stays in TIME_WAIT
    listener.close()
    client.close()
    with socket.socket() as plain:  # without SO_REUSEADDR the port is still refused: the case is real
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    check_port_free("127.0.0.1", port)


def test_port_zero_and_unresolvable_hosts_are_left_to_grpc() -> None:
    check_port_free("127.0.0.1", 0)
    check_port_free("no-such-host.invalid", 50051)
