"""A read-buffered socket for paho clients: under :class:`edgeloop.netloop.NetworkLoop` and on paho's own thread.

paho reads an MQTT packet with several ``recv`` calls: one byte for the packet type, then the
remaining length one byte at a time (three calls for a 64 KiB chunk), then the body, often in
pieces. Each call is a system call, and in a process whose threads share one interpreter lock
each one also lets the lock go and waits to take it back. A fleet of a thousand devices
receiving a 1 MB model in 64 KiB chunks reads 16,000 such packets on one network thread.

:class:`BufferedSocket` wraps paho's plain TCP socket: a ``recv`` that finds its buffer empty
asks the kernel for up to :data:`READ_SIZE` bytes at once and serves paho's small reads from
them. Everything else (send, close, fileno, shutdown, setblocking, ...) goes to the socket
itself. Bytes waiting in the buffer are invisible to ``select()``, exactly like the records an
SSL socket has decrypted already, so the wrapper answers :meth:`~BufferedSocket.pending` as
an SSL socket does and the loop reads on while it is non-zero. Memory stays bounded: the loop
empties the buffer before it selects again (paho takes a partial packet into its own buffer), so
no socket keeps more than one read of at most ``READ_SIZE`` bytes, and only while it is read.
paho's own network thread (every :class:`edgeloop.mqtt.MqttLink` without a network loop) asks
``pending()`` in the same way before it selects. Measured on the aggregator with single-reading
messages (bench/cases.py): its CPU per message fell by about a fifth.

Writes go to the socket unchanged, one ``send`` per packet. Holding the PUBACKs of one read
pass and sending them together was tried and measured worse on the same push (the network
thread's CPU 3.1 -> 6.3 s and devices re-requesting chunks, in two runs; the cause was not
found in the time there was), so writes are not buffered.
"""

from __future__ import annotations

import socket

__all__ = ["READ_SIZE", "BufferedSocket", "adopt", "wrap"]

#: Bytes asked of the kernel per ``recv`` when the buffer is empty: two 64 KiB model chunks with
#: their headers, or hundreds of small messages (readings' confirmations, PUBACKs).
READ_SIZE = 128 * 1024


class BufferedSocket:
    """A plain socket whose small reads come from one larger read (see the module docstring)."""

    __slots__ = ("sock", "_buf", "_pos", "reads")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self._pos = 0
        self.reads = 0  # recv system calls made (for tests and diagnostics)

    def recv(self, bufsize: int) -> bytes:
        """Up to ``bufsize`` bytes: from the buffer if it holds any, else from one kernel read of up
        to ``max(bufsize, READ_SIZE)`` bytes. Raises what the socket raises (``BlockingIOError``
        when nothing is there); ``b""`` at the end of the stream, as a socket does."""
        buf, pos = self._buf, self._pos
        if pos < len(buf):
            end = pos + bufsize
            if end >= len(buf):
                self._buf, self._pos = b"", 0
                return buf[pos:] if pos else buf
            self._pos = end
            return buf[pos:end]
        self.reads += 1
        data = self.sock.recv(max(bufsize, READ_SIZE))
        if len(data) <= bufsize:
            return data
        self._buf, self._pos = data, bufsize
        return data[:bufsize]

    def pending(self) -> int:
        """Bytes read from the kernel and not yet given to paho (plus what an SSL layer holds)."""
        inner = getattr(self.sock, "pending", None)
        return len(self._buf) - self._pos + (inner() if inner is not None else 0)

    def send(self, data) -> int:
        return self.sock.send(data)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self._buf, self._pos = b"", 0
        self.sock.close()

    def __getattr__(self, name: str):
        return getattr(self.sock, name)

    def __repr__(self) -> str:
        return f"BufferedSocket({self.sock!r}, buffered={len(self._buf) - self._pos})"


def wrap(sock):
    """``sock`` wrapped for buffered reads if it is a plain TCP socket; anything else (an SSL
    socket, which reads whole records already, or a test double) is returned as it is."""
    if type(sock) is socket.socket and sock.type == socket.SOCK_STREAM:
        return BufferedSocket(sock)
    return sock


def adopt(client, sock):
    """Make paho ``client`` read ``sock`` through a buffer from now on; returns what it reads.

    For paho's ``on_socket_open``, under a network loop or on paho's own thread: paho's
    ``reconnect()`` calls it and uses ``client._sock`` right after, and every later read, write and
    close goes through the wrapper (paho's loop asks :meth:`BufferedSocket.pending`, as for TLS)."""
    client._sock = wrap(sock)
    return client._sock
