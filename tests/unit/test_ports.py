"""loadtest.ports: the ports the bench and the tests give the servers they start come from outside the
range the OS hands to everyone else (so a Ray process binding port 0 cannot take one before its server
binds it: the CI failure of test_multi_node), are free, and are never handed out twice."""

from __future__ import annotations

import socket

from loadtest.ports import RAY_WORKER_PORTS, _ephemeral_low, free_port, free_ports


def test_ports_are_free_distinct_and_outside_the_ranges_others_are_handed() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        assert port not in RAY_WORKER_PORTS and port < _ephemeral_low(), port
    with socket.socket() as s:  # free: our server can bind it
        s.bind(("127.0.0.1", ports[-1]))


def test_consecutive_ports_for_a_worker_each_are_all_free_and_not_handed_out_again() -> None:
    base = free_ports(4)
    held = []
    try:
        for port in range(base, base + 4):
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", port))
        assert all(not (base <= free_port() < base + 4) for _ in range(300))
    finally:
        for s in held:
            s.close()


def test_a_port_another_process_holds_is_never_handed_out() -> None:
    """800 ports of the range held by sockets that did not come from free_port (as another process's
    would be): 300 picks land on ~19 of them by chance, and each must be skipped."""
    taken: list[socket.socket] = []
    try:
        for port in range(RAY_WORKER_PORTS.stop, _ephemeral_low(), 16):
            if len(taken) == 800:
                break
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            taken.append(s)
        held = {s.getsockname()[1] for s in taken}
        assert held.isdisjoint(free_port() for _ in range(300))
    finally:
        for s in taken:
            s.close()
