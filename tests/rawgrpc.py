"""gRPC calls below the protobuf layer, for hostile-input tests: hand-made wire bytes, and (over a raw
HTTP/2 connection, with the h2 package) header values no grpc client library will send."""

from __future__ import annotations

import socket
import struct
import time

import grpc


def raw_unary(channel: grpc.Channel, method: str):
    """A unary callable that sends bytes as they are and returns the response bytes."""
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(number: int, wire_type: int, payload: bytes) -> bytes:
    """One protobuf field: tag, then the payload (already encoded for the wire type, except that a
    length-delimited payload gets its length prefix here)."""
    tag = varint((number << 3) | wire_type)
    if wire_type == 2:
        return tag + varint(len(payload)) + payload
    return tag + payload


def string_field(number: int, value: bytes) -> bytes:
    return field(number, 2, value)


def map_entry(number: int, key: bytes, value: float) -> bytes:
    """One entry of a map<string, double> field."""
    return field(number, 2, field(1, 2, key) + field(2, 1, struct.pack("<d", value)))


def raw_h2_call(port: int, path: str, message: bytes, headers: list[tuple[bytes, bytes]],
                timeout: float = 10.0, body_delay_s: float = 0.0) -> dict[bytes, bytes]:
    """One unary gRPC call over plaintext HTTP/2 with arbitrary header bytes. Returns the response
    headers and trailers (grpc-status, grpc-message), or {b"_reset": ...} when the stream was reset.
    `body_delay_s`: send the headers, wait this long, then the message (a deadline that runs out
    between the two has surely passed when the server reads the message)."""
    import h2.config
    import h2.connection
    import h2.events

    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    cfg = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False,
                                    normalize_outbound_headers=False, validate_inbound_headers=False)
    conn = h2.connection.H2Connection(config=cfg)
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
                            (b":authority", f"127.0.0.1:{port}".encode()),
                            (b"content-type", b"application/grpc"), (b"te", b"trailers"), *headers])
    if body_delay_s:
        sock.sendall(conn.data_to_send())
        time.sleep(body_delay_s)
    conn.send_data(sid, b"\x00" + struct.pack(">I", len(message)) + message, end_stream=True)
    sock.sendall(conn.data_to_send())
    out: dict[bytes, bytes] = {}
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return out
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    out.update(dict(ev.headers))
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamReset | h2.events.ConnectionTerminated):
                    out[b"_reset"] = repr(ev).encode()
                    return out
                if isinstance(ev, h2.events.StreamEnded):
                    return out
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
