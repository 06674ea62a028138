"""edgeloop.bufsock: paho's reads through one buffer, byte-exact, with fewer system calls.

The wrapper is checked on a real socket pair (what it hands out is exactly the stream, in any
read sizes; an empty non-blocking socket still raises; the end of the stream is ``b""``), and
end to end: MQTT messages of sizes from a byte to several reads' worth travel through real
Mosquitto to a link on a :class:`~edgeloop.netloop.NetworkLoop`, whose socket is the wrapper,
and arrive intact with fewer kernel reads than packets.
"""

from __future__ import annotations

import os
import random
import secrets
import socket

import pytest

from edgeloop import bufsock
from tests.waiting import poll, wait_until


def _pair():
    a, b = socket.socketpair()
    b.setblocking(False)
    return a, bufsock.wrap(b)


def test_small_reads_are_served_from_one_kernel_read_and_the_stream_is_exact():
    a, b = _pair()
    try:
        data = os.urandom(100_000)
        a.sendall(data)
        got, rng = bytearray(), random.Random(1)
        wait_until(lambda: b.pending() or b.sock.recv(1, socket.MSG_PEEK), timeout=5)
        while len(got) < len(data):
            try:
                got += b.recv(rng.choice((1, 1, 2, 7, 4096, 70_000)))
            except BlockingIOError:
                continue
        assert bytes(got) == data
        assert b.reads < 20  # 1-byte reads did not each cost a recv()
        assert b.pending() == 0
        with pytest.raises(BlockingIOError):  # nothing buffered, nothing in the kernel
            b.recv(1)
    finally:
        a.close()
        b.close()


def test_pending_counts_what_was_read_ahead_and_eof_reads_empty():
    a, b = _pair()
    try:
        a.sendall(b"abcdef")
        wait_until(lambda: b.sock.recv(1, socket.MSG_PEEK), timeout=5)
        assert b.recv(2) == b"ab"
        assert b.pending() == 4  # read ahead: invisible to select(), so the loop must ask
        assert b.recv(10) == b"cdef"  # a larger read takes only what the buffer holds
        a.close()
        wait_until(lambda: _eof(b), timeout=5)
    finally:
        b.close()


def _eof(sock) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False


def _length_bytes(remaining: int) -> int:
    """Bytes of MQTT's variable-length "remaining length" field for ``remaining``."""
    return 1 if remaining < 128 else 2 if remaining < 16_384 else 3 if remaining < 2_097_152 else 4


def test_wrap_leaves_anything_but_a_plain_socket_alone():
    class NotASocket:
        pass

    odd = NotASocket()
    assert bufsock.wrap(odd) is odd
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert bufsock.wrap(udp) is udp  # datagrams must not be merged
    finally:
        udp.close()


@pytest.mark.mosquitto
def test_a_looped_link_reads_mqtt_packets_of_every_size_intact_through_the_buffer(mosquitto):
    from edgeloop.mqtt import MqttLink
    from edgeloop.netloop import NetworkLoop

    tag = secrets.token_hex(3)
    rng = random.Random(7)
    sizes = [1, 2, 127, 128, 16_383, 16_384, 65_536, 200_000] + [rng.randint(1, 150_000) for _ in range(40)]
    payloads = [bytes([k % 251]) * 2 + os.urandom(n) for k, n in enumerate(sizes)]
    received: dict[bytes, bytes] = {}
    with NetworkLoop() as net:
        sub = MqttLink(mosquitto.url, f"bs-sub-{tag}", network_loop=net, protocol="5",
                       on_message=lambda m: received.__setitem__(m.payload[:2], m.payload))
        pub = MqttLink(mosquitto.url, f"bs-pub-{tag}", network_loop=net, protocol="5")
        try:
            assert sub.start(timeout=10) and pub.start(timeout=10)
            sock = sub._client.socket()
            assert isinstance(sock, bufsock.BufferedSocket)
            sub.subscribe(f"bs-{tag}/#", qos=1)

            def probe_returned() -> bool:
                pub.publish(f"bs-{tag}/probe", b"\xff\xffprobe", qos=0)
                return poll(lambda: b"\xff\xff" in received, timeout=0.3)

            wait_until(probe_returned, timeout=10)
            reads_before = sock.reads
            for p in payloads:
                wait_until(lambda: pub.publish(f"bs-{tag}/x", p, qos=1), timeout=10)
            wait_until(lambda: len(received) >= len(payloads) + 1, timeout=30)
            for p in payloads:
                assert received[p[:2]] == p
            # Unbuffered, paho makes at least 1 + (1 to 3) + 1 recv() calls per packet: its type,
            # its remaining length byte by byte, its body. Buffered, the small ones cost none.
            unbuffered_floor = sum(2 + _length_bytes(len(p) + len(f"bs-{tag}/x") + 8) for p in payloads)
            assert sock.reads - reads_before < unbuffered_floor

        finally:
            pub.stop()
            sub.stop()
