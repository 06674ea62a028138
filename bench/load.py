"""Device-side load: publisher processes that send pre-encoded Telemetry at QoS 1 with a window.

Each publisher is its own process (``multiprocessing`` spawn), so publishers never share the
aggregator's GIL. It plays ``devices`` devices of the wire contract: every message is a real
:class:`edgeloop.wire.Telemetry` encoded by :func:`edgeloop.wire.encode`, published at QoS 1 over
MQTT 3.1.1 with at most ``window`` unacknowledged messages (the device protocol's flow control;
no outbox, so nothing is re-sent). The MQTT client is a few lines over a raw socket, not paho:
measured here, paho costs ~120 us of CPU per publish, so two paho publishers used a whole core
of a 2-core machine and could not offer 10,000 msg/s; the load generator must not be what is
measured. Payloads are built before the clock
starts, so a figure measures transport and ingest, not JSON encoding on the device.

Reading times are unique per device (1 ms apart), so every (device, seq, idx) is one InfluxDB
point and counting points per device proves that nothing was lost or doubled.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import select
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["LoadSpec", "LoadResult", "run_publishers", "build_payloads", "CHANNELS"]

CHANNELS = ["vib_x", "vib_y", "temp", "current"]
_BASE_TS = float(int(time.time() // 3600 * 3600) - 2 * 3600)  # recent: one InfluxDB shard


@dataclass(frozen=True)
class LoadSpec:
    broker_url: str
    publishers: int
    readings_per_message: int
    duration_s: float
    #: Upper bound on the whole load's rate, which sizes the pre-encoded pool (messages/s).
    max_msg_per_s: int
    devices_per_publisher: int = 10
    window: int = 200
    prefix: str = "bench"


@dataclass
class LoadResult:
    messages: int = 0
    readings: int = 0
    #: device id -> messages sent (its seqs are 0..n-1)
    per_device: dict[str, int] = field(default_factory=dict)
    publish_s: float = 0.0  # slowest publisher: go -> last PUBACK
    cpu_s: float = 0.0  # all publishers' CPU seconds
    unacked: int = 0  # messages still without PUBACK when a publisher gave up waiting
    pool_exhausted: bool = False

    @property
    def msg_per_s(self) -> float:
        return self.messages / self.publish_s if self.publish_s else 0.0


def build_payloads(device: str, first_seq: int, count: int, readings: int, seed: int) -> list[bytes]:
    """``count`` encoded Telemetry messages of ``device`` with ``readings`` readings each."""
    from edgeloop import wire

    rng = random.Random(seed)
    pool = [[round(rng.uniform(-5, 50), 4) for _ in CHANNELS] for _ in range(64)]
    out = []
    for seq in range(first_seq, first_seq + count):
        t0 = _BASE_TS + seq * readings * 0.001
        rows = [wire.Reading(round(t0 + i * 0.001, 3), pool[(seq + i) & 63], 0) for i in range(readings)]
        msg = wire.Telemetry(v=wire.SCHEMA_VERSION, device=device, seq=seq, ts=t0, profile="bench",
                             channels=CHANNELS, readings=rows)
        out.append(wire.encode(msg))
    return out


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _publish_prefix(topic: str, payload_len: int) -> bytes:
    """PUBLISH (QoS 1) fixed header and topic; the 2-byte packet id and the payload follow."""
    t = topic.encode()
    return b"\x32" + _remaining_length(2 + len(t) + 2 + payload_len) + len(t).to_bytes(2, "big") + t


def _connect(host: str, port: int, client_id: str) -> socket.socket:
    """An MQTT 3.1.1 connection, clean session, no keep-alive (the load is short)."""
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x00" + len(cid).to_bytes(2, "big") + cid
    sock.sendall(b"\x10" + _remaining_length(len(body)) + body)
    connack = b""
    while len(connack) < 4:
        chunk = sock.recv(4 - len(connack))
        if not chunk:
            raise ConnectionError("broker closed the connection before CONNACK")
        connack += chunk
    if connack[0] != 0x20 or connack[3] != 0:
        raise ConnectionError(f"broker refused the benchmark publisher: CONNACK {connack.hex()}")
    return sock


def _publisher(spec: LoadSpec, index: int, go, ready, results) -> None:
    """One publisher process: build its payloads, connect, wait for ``go``, publish, report."""
    from edgeloop import wire

    per_pub = spec.max_msg_per_s * spec.duration_s / spec.publishers
    per_device = max(1, int(per_pub / spec.devices_per_publisher) + 1)
    devices = [f"{spec.prefix}-p{index}-d{k}" for k in range(spec.devices_per_publisher)]
    payloads = {d: build_payloads(d, 0, per_device, spec.readings_per_message, index * 1000 + k)
                for k, d in enumerate(devices)}
    # Round-robin over devices, as a fleet interleaves; each entry is (prefix, payload).
    order = []
    for s in range(per_device):
        for d in devices:
            order.append((_publish_prefix(wire.topic(d, "telemetry"), len(payloads[d][s])), payloads[d][s]))
    del payloads
    host, port = urlsplit(spec.broker_url).hostname, urlsplit(spec.broker_url).port
    sock = _connect(host, port, f"{spec.prefix}-pub-{index}-{os.getpid()}")
    ready.put(index)
    go.wait()
    cpu0, began = time.process_time(), time.perf_counter()
    deadline = began + spec.duration_s
    n, sent, acked, pid, pending = len(order), 0, 0, 0, b""
    pids = [k.to_bytes(2, "big") for k in range(65536)]
    stop_at = n
    while acked < sent or sent < stop_at:
        free = min(spec.window - (sent - acked), stop_at - sent, 64)
        if free > 0:
            parts = []
            for prefix, payload in order[sent : sent + free]:
                pid = pid % 65535 + 1
                parts += (prefix, pids[pid], payload)
            sock.sendall(b"".join(parts))
            sent += free
            if time.perf_counter() >= deadline:
                stop_at = sent
        # Block for PUBACKs only when the window is full or everything is sent.
        waiting = sent - acked >= spec.window or sent >= stop_at
        if waiting or select.select([sock], [], [], 0)[0]:
            sock.settimeout(30)
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError("broker closed the benchmark publisher's connection")
            pending += data
            k = len(pending) // 4
            if pending[0 : 4 * k : 4].count(0x40) != k:
                raise ConnectionError(f"expected only PUBACKs from the broker, got {pending[:16].hex()}")
            acked, pending = acked + k, pending[4 * k :]
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu0
    sock.sendall(b"\xe0\x00")
    sock.close()
    counts: dict[str, int] = {d: 0 for d in devices}
    for k in range(sent):
        counts[devices[k % len(devices)]] += 1
    results.put((index, sent, counts, elapsed, cpu, sent - acked, sent == n))


def _wait_ready(procs, ready, timeout: float = 120.0) -> None:
    """Wait for every publisher to report ready; fail fast if one of them died."""
    import queue

    deadline, waiting = time.monotonic() + timeout, len(procs)
    while waiting:
        try:
            ready.get(timeout=0.2)
            waiting -= 1
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"publishers did not start (exit codes {dead or 'none yet'})") from None


def run_publishers(spec: LoadSpec, on_go=None) -> LoadResult:
    """Start the publishers, wait until all are connected with payloads built, release them
    together (calling ``on_go`` right then), and collect what they sent."""
    ctx = mp.get_context("spawn")
    go, ready, results = ctx.Event(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_publisher, args=(spec, k, go, ready, results), daemon=True)
             for k in range(spec.publishers)]
    for p in procs:
        p.start()
    try:
        _wait_ready(procs, ready)
        if on_go is not None:
            on_go()
        go.set()
        result = LoadResult()
        for _ in procs:
            _, sent, counts, elapsed, cpu, unacked, exhausted = results.get(timeout=spec.duration_s + 90)
            result.messages += sent
            result.readings += sent * spec.readings_per_message
            result.per_device.update(counts)
            result.publish_s = max(result.publish_s, elapsed)
            result.cpu_s += cpu
            result.unacked += unacked
            result.pool_exhausted |= exhausted
        return result
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
