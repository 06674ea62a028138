"""Measure MQTT brokers that install from PyPI under edgeloop's own traffic pattern.

Why: `edgeloop demo` needs a broker on a machine without Mosquitto, and the aggregator's ingest
pattern (publishers with a bounded in-flight window, one persistent subscriber that acknowledges
only after a batch write) is exactly where small brokers lose messages or stall. This script
measures each candidate under that pattern and checks the features edgeloop relies on:

- flow: N messages (~3 KB) from a few paho QoS 1 publishers, each keeping at most ``--window``
  messages unacknowledged, into one ``manual_ack`` subscriber with a persistent session that
  acknowledges in batches of 100 or after 20 ms; msg/s, delivered/sent, duplicates, stalls;
- MQTT 3.1.1 / 5 accepted, the broker's Receive Maximum (CONNACK), how many QoS 1 messages it
  sends a subscriber that never acknowledges (its outbound in-flight cap);
- ``$share/`` groups (two members must split 10 messages between them), retained message, last
  will on an abrupt disconnect, a persistent session that gets what was published while it was
  offline, unacknowledged messages redelivered after a subscriber crash, whether acknowledging
  out of order is tolerated, and the largest payload delivered (20 KB, 64 KB, 256 KB, 1 MB);
- the broker process's CPU seconds during the flow (the paho clients in this one process are
  what limits msg/s on 2 cores; the broker's CPU shows its own headroom).

Every broker runs in a child process this script owns and stops (Mosquitto too, as the
reference). Candidates that cannot be imported are reported as such. The project's venv has
amqtt and iotcore; to try the others without touching it::

    pip install --target /tmp/brokers moat-lib-mqtt moat-mqtt mqttools
    PYTHONPATH=/tmp/brokers python bench/embedded_broker_probe.py -r 3      # all candidates
    python bench/embedded_broker_probe.py -c iotcore-default,amqtt -n 50000 --json out.json

The Python brokers live in their own process here, their best case: inside the aggregator's
process they would share its GIL.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

HOST = "127.0.0.1"
PAYLOAD_SIZES = (20_000, 65_536, 262_144, 1_048_576)


class ProbeError(Exception):
    """A check could not run (no CONNACK, refused connection, ...)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise ProbeError(f"nothing listens on {port} after {timeout}s")


# --- brokers -------------------------------------------------------------------------------------


def _serve(name: str, port: int) -> None:
    """Child-process entry: run one Python broker on ``port`` until stdin closes or SIGTERM."""
    threading.Thread(target=lambda: (sys.stdin.buffer.read(), os._exit(0)), daemon=True).start()
    import logging

    logging.basicConfig(level=logging.CRITICAL)
    if name == "amqtt":
        import asyncio

        from amqtt.broker import Broker

        async def main() -> None:
            cfg = {
                "listeners": {"default": {"type": "tcp", "bind": f"{HOST}:{port}"}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            }
            await Broker(cfg).start()
            await asyncio.Event().wait()

        asyncio.run(main())
    elif name == "moat-mqtt":
        import anyio
        from moat.mqtt.broker import create_broker

        async def main() -> None:
            cfg = {"listeners": {"default": {"type": "tcp", "bind": f"{HOST}:{port}"}},
                   "auth": {"allow-anonymous": True, "password-file": None}}
            async with create_broker(config=cfg):
                await anyio.sleep_forever()

        anyio.run(main)
    elif name == "moat-lib-mqtt":
        import anyio
        from moat.lib.mqtt.async_broker import AsyncMQTTBroker

        anyio.run(AsyncMQTTBroker(bind_address=(HOST, port)).serve)
    elif name == "mqttools":
        import asyncio

        import mqttools

        asyncio.run(mqttools.Broker((HOST, port)).serve_forever())
    else:
        raise SystemExit(f"unknown broker {name}")


@dataclass
class Running:
    """A started broker: one port per MQTT version it is tried with, and how to stop it."""

    ports: dict[int, int]  # protocol (4 = 3.1.1, 5) -> port
    stop: Callable[[], None]
    child_pids: list[int] = field(default_factory=list)


def _child(args: list[str], ports: list[int], workdir: Path) -> Running:
    with open(workdir / "stderr.log", "wb") as err:
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                                cwd=workdir)

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdin:
            proc.stdin.close()

    try:
        for p in ports:
            wait_port(p)
    except ProbeError:
        stop()
        raise ProbeError((workdir / "stderr.log").read_text()[-500:] or "did not start")
    return Running({}, stop, [proc.pid])


def start_python_broker(name: str, module: str) -> Callable[[Path], Running]:
    def start(workdir: Path) -> Running:
        __import__(module)  # ImportError -> "unavailable"
        port = free_port()
        run = _child([sys.executable, os.path.abspath(__file__), "--serve", name, str(port)], [port], workdir)
        run.ports = {4: port, 5: port}
        return run

    return start


def start_mosquitto(workdir: Path) -> Running:
    if not Path("/usr/sbin/mosquitto").exists():
        raise ImportError("/usr/sbin/mosquitto not installed")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} {HOST}\nallow_anonymous true\npersistence false\n"
        "max_inflight_messages 1000\nmax_queued_messages 1000000\nmax_queued_bytes 536870912\n"
        "max_packet_size 1114112\nset_tcp_nodelay true\n"
        "log_dest stderr\nlog_type error\n"
    )
    run = _child(["/usr/sbin/mosquitto", "-c", str(conf)], [port], workdir)
    run.ports = {4: port, 5: port}
    return run


def start_iotcore_default(workdir: Path) -> Running:
    """iotcore's own defaults (one MQTT 3.1.1 listener, 20 KB payloads): the DESIGN.md baseline."""
    from iotcore import Broker

    port = free_port()
    broker = Broker(port=port, listen=HOST)
    broker.start()
    pid = broker._process.pid if broker._process else 0
    return Running({4: port, 5: port}, broker.stop, [pid])


def start_edgeloop_embedded(workdir: Path) -> Running:
    """rumqttd (iotcore) configured exactly as aggregator.embedded_broker ships it."""
    import iotcore  # noqa: F401 - ImportError -> "unavailable"
    from aggregator.embedded_broker import EmbeddedBroker

    broker = EmbeddedBroker(data_dir=workdir).start()
    return Running({4: broker.port_v311, 5: broker.port}, broker.stop, [broker.pid or 0])


CANDIDATES: dict[str, Callable[[Path], Running]] = {
    "mosquitto (reference)": start_mosquitto,
    "iotcore-default": start_iotcore_default,
    "edgeloop-embedded (iotcore)": start_edgeloop_embedded,
    "amqtt": start_python_broker("amqtt", "amqtt.broker"),
    "moat-mqtt": start_python_broker("moat-mqtt", "moat.mqtt.broker"),
    "moat-lib-mqtt": start_python_broker("moat-lib-mqtt", "moat.lib.mqtt.async_broker"),
    "mqttools": start_python_broker("mqttools", "mqttools"),
}


# --- a paho client for the checks ------------------------------------------------------------------


class Link:
    """One paho 2.2 client with its network thread, connected and waited for."""

    def __init__(self, port: int, proto: int, client_id: str, *, manual_ack: bool = False,
                 persistent: bool = False, on_message: Callable | None = None) -> None:
        self.port, self.proto, self.persistent = port, proto, persistent
        v5 = proto == 5
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                             clean_session=None if v5 else not persistent, manual_ack=manual_ack)
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.reason = None
        self.connack_props: Properties | None = None
        self.session_present = False
        self.subacks: dict[int, list] = {}
        self.suback_evt = threading.Event()
        self.messages: list[mqtt.MQTTMessage] = []
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda *a: self.disconnected.set()
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = on_message or (lambda c, u, m: self.messages.append(m))

    def _on_connect(self, c, u, flags, reason, props) -> None:
        self.reason, self.connack_props = reason, props
        self.session_present = flags.session_present
        self.connected.set()

    def _on_subscribe(self, c, u, mid, codes, props) -> None:
        self.subacks[mid] = codes
        self.suback_evt.set()

    def connect(self, timeout: float = 5.0, will: tuple[str, bytes] | None = None) -> Link:
        if will:
            self.c.will_set(will[0], will[1], qos=1, retain=True)
        props = None
        kwargs = {}
        if self.proto == 5:
            props = Properties(PacketTypes.CONNECT)
            if self.persistent:
                props.SessionExpiryInterval = 3600
            kwargs["clean_start"] = not self.persistent
        try:
            self.c.connect(HOST, self.port, keepalive=30, properties=props, **kwargs)
        except OSError as exc:
            raise ProbeError(f"connect: {exc}") from exc
        self.c.loop_start()
        if not self.connected.wait(timeout):
            self.close()
            raise ProbeError("no CONNACK")
        if self.reason.is_failure:
            self.close()
            raise ProbeError(f"CONNACK {self.reason}")
        return self

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> list:
        self.suback_evt.clear()
        _, mid = self.c.subscribe(topic, qos)
        deadline = time.monotonic() + timeout
        while mid not in self.subacks and time.monotonic() < deadline:
            self.suback_evt.wait(0.05)
        if mid not in self.subacks:
            raise ProbeError(f"no SUBACK for {topic}")
        return self.subacks[mid]

    def close(self, clean: bool = True) -> None:
        if clean:
            self.c.disconnect()
        self.c.loop_stop()
        if not clean:
            sock = self.c.socket()
            if sock is not None:
                sock.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the broker process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_published(infos: list[mqtt.MQTTMessageInfo], timeout: float = 5.0) -> bool:
    """Wait, within one deadline for all, until every publish got its PUBACK."""
    return wait_for(lambda: all(i.is_published() for i in infos), timeout)


def wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


# --- the flow test --------------------------------------------------------------------------------


class BatchAckSubscriber:
    """The aggregator's pattern: count deliveries, acknowledge per 100 or after 20 ms."""

    def __init__(self, link: Link, batch: int = 100, max_delay: float = 0.02) -> None:
        self.link, self.batch, self.max_delay = link, batch, max_delay
        self.seen: set[bytes] = set()
        self.received = 0
        self.dups = 0
        self.last_rx = time.monotonic()
        self._pending: list[int] = []
        self._first = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        link.c.on_message = self._on_message
        self._flusher = threading.Thread(target=self._flush_loop, daemon=True)
        self._flusher.start()

    def _on_message(self, c, u, m) -> None:
        key = m.payload[:24].split(b"|", 1)[0]
        with self._lock:
            self.received += 1
            self.last_rx = time.monotonic()
            if key in self.seen:
                self.dups += 1
            self.seen.add(key)
            if m.qos:
                if not self._pending:
                    self._first = time.monotonic()
                self._pending.append(m.mid)
                if len(self._pending) >= self.batch:
                    self._flush_locked()

    def _flush_locked(self) -> None:
        for mid in self._pending:
            self.link.c.ack(mid, 1)
        self._pending.clear()

    def _flush_loop(self) -> None:
        while not self._stop.wait(0.005):
            with self._lock:
                if self._pending and time.monotonic() - self._first >= self.max_delay:
                    self._flush_locked()

    def stop(self) -> None:
        self._stop.set()
        self._flusher.join()


def flow(port: int, proto: int, n: int, publishers: int, window: int, size: int,
         stall: float = 15.0, budget: float = 180.0) -> dict:
    """N messages from ``publishers`` windowed QoS 1 publishers into one batch-acking subscriber."""
    tag = f"{proto}{time.monotonic_ns() % 10**9}"
    sub_link = Link(port, proto, f"agg-{tag}", manual_ack=True, persistent=True).connect()
    codes = sub_link.subscribe(f"probe/flow/{tag}/#", 1)
    sub = BatchAckSubscriber(sub_link)
    per_pub = n // publishers
    sent = [0] * publishers
    acked = [0] * publishers
    stalled = [False] * publishers
    links: list[Link] = []
    t0 = time.monotonic()

    def publish(i: int) -> None:
        sem = threading.BoundedSemaphore(window)
        link = Link(port, proto, f"dev-{tag}-{i}")

        def on_pub(*a) -> None:
            acked[i] += 1
            sem.release()

        link.c.on_publish = on_pub
        link.c.max_inflight_messages_set(window)
        link.connect()
        links.append(link)
        pad = b"x" * size
        for seq in range(per_pub):
            if not sem.acquire(timeout=stall) or time.monotonic() - t0 > budget:
                stalled[i] = True
                return
            head = f"{i}:{seq}|".encode()
            link.c.publish(f"probe/flow/{tag}/{i}", head + pad[len(head):], qos=1)
            sent[i] += 1

    threads = [threading.Thread(target=publish, args=(i,), daemon=True) for i in range(publishers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(budget + stall + 5)
    total = per_pub * publishers
    wait_for(lambda: len(sub.seen) >= total or time.monotonic() - sub.last_rx > stall, budget)
    elapsed = max(sub.last_rx, t0) - t0
    sub.stop()
    for link in links:
        link.close()
    sub_link.close()
    delivered = len(sub.seen)
    return {
        "suback": str(codes[0]),
        "sent": sum(sent), "pubacked": sum(acked), "delivered": delivered,
        "duplicates": sub.dups, "publisher_stalled": any(stalled),
        "seconds": round(elapsed, 2), "msg_per_s": round(delivered / elapsed) if elapsed > 0 else 0,
        "lossless": delivered == total,
    }


# --- feature checks ---------------------------------------------------------------------------------


def check_inflight_cap(port: int, proto: int, n: int = 1500) -> str:
    """How many QoS 1 messages the broker sends a subscriber that never acknowledges."""
    sub = Link(port, proto, f"noack-{proto}", manual_ack=True).connect()
    sub.subscribe(f"probe/cap{proto}/#", 1)
    pub = Link(port, proto, f"cappub-{proto}")
    pub.c.max_inflight_messages_set(200)
    pub.connect()
    for i in range(n):
        pub.c.publish(f"probe/cap{proto}/x", b"%d" % i, qos=1)
    wait_for(lambda: len(sub.messages) >= n, 3.0)
    time.sleep(0.5)
    got = len(sub.messages)
    pub.close()
    sub.close()
    return f"{got}" if got < n else f"all {n} (no cap)"


def check_share(port: int, proto: int) -> dict:
    """Two members of one ``$share`` group must split 10 messages between them, no copies."""
    a = Link(port, proto, f"shA-{proto}").connect()
    b = Link(port, proto, f"shB-{proto}").connect()
    try:
        codes = [str(a.subscribe(f"$share/g/probe/sh{proto}/#", 1)[0]),
                 str(b.subscribe(f"$share/g/probe/sh{proto}/#", 1)[0])]
    except ProbeError as exc:
        a.close(), b.close()
        return {"ok": False, "detail": str(exc)}
    pub = Link(port, proto, f"shpub-{proto}").connect()
    for i in range(10):
        pub.c.publish(f"probe/sh{proto}/t", b"%d" % i, qos=1)
    wait_for(lambda: len(a.messages) + len(b.messages) >= 10, 3.0)
    time.sleep(0.3)
    got = (len(a.messages), len(b.messages))
    for link in (pub, a, b):
        link.close()
    return {"ok": sum(got) == 10, "detail": f"suback {codes}, members got {got[0]}+{got[1]} of 10"}


def check_retained(port: int, proto: int) -> bool:
    pub = Link(port, proto, f"retpub-{proto}").connect()
    wait_published([pub.c.publish(f"probe/ret{proto}/status", b"online", qos=1, retain=True)])
    pub.close()
    sub = Link(port, proto, f"retsub-{proto}").connect()
    sub.subscribe(f"probe/ret{proto}/#", 1)
    ok = wait_for(lambda: any(m.retain and m.payload == b"online" for m in sub.messages), 3.0)
    sub.close()
    return ok


def check_will(port: int, proto: int) -> bool:
    sub = Link(port, proto, f"willsub-{proto}").connect()
    sub.subscribe(f"probe/will{proto}/#", 1)
    dev = Link(port, proto, f"willdev-{proto}").connect(will=(f"probe/will{proto}/status", b"offline"))
    time.sleep(0.2)
    dev.close(clean=False)  # socket closed without DISCONNECT: the broker must send the will
    ok = wait_for(lambda: any(m.payload == b"offline" for m in sub.messages), 5.0)
    sub.close()
    return ok


def check_session(port: int, proto: int) -> str:
    """A persistent subscriber gets what was published while it was away."""
    cid = f"sess-{proto}-{time.monotonic_ns() % 10**6}"
    sub = Link(port, proto, cid, persistent=True).connect()
    sub.subscribe(f"probe/sess{proto}/#", 1)
    sub.close()
    pub = Link(port, proto, f"sesspub-{proto}").connect()
    wait_published([pub.c.publish(f"probe/sess{proto}/t", b"%d" % i, qos=1) for i in range(20)])
    pub.close()
    sub = Link(port, proto, cid, persistent=True).connect()
    wait_for(lambda: len(sub.messages) >= 20, 3.0)
    got, present = len(sub.messages), sub.session_present
    sub.close()
    return f"{got}/20 (session_present={present})"


def check_redelivery(port: int, proto: int) -> str:
    """Unacknowledged messages come again when a persistent subscriber dies and reconnects."""
    cid = f"redo-{proto}-{time.monotonic_ns() % 10**6}"
    sub = Link(port, proto, cid, manual_ack=True, persistent=True).connect()
    sub.subscribe(f"probe/redo{proto}/#", 1)
    pub = Link(port, proto, f"redopub-{proto}").connect()
    wait_published([pub.c.publish(f"probe/redo{proto}/t", b"%d" % i, qos=1) for i in range(10)])
    pub.close()
    wait_for(lambda: len(sub.messages) >= 10, 3.0)
    first = len(sub.messages)
    sub.close(clean=False)  # dies holding 10 unacknowledged messages
    sub = Link(port, proto, cid, manual_ack=True, persistent=True).connect()
    wait_for(lambda: len(sub.messages) >= 10, 3.0)
    time.sleep(0.2)
    again = len(sub.messages)
    for m in sub.messages:
        sub.c.ack(m.mid, 1)
    sub.close()
    return f"{again}/{first}"


def check_out_of_order_ack(port: int, proto: int) -> str:
    """Acknowledge 20 messages newest first, then see whether the next 20 still arrive."""
    sub = Link(port, proto, f"ooo-{proto}", manual_ack=True).connect()
    sub.subscribe(f"probe/ooo{proto}/#", 1)
    pub = Link(port, proto, f"ooopub-{proto}").connect()
    for i in range(20):
        pub.c.publish(f"probe/ooo{proto}/t", b"%d" % i, qos=1)
    wait_for(lambda: len(sub.messages) >= 20, 3.0)
    for m in reversed(sub.messages[:20]):
        sub.c.ack(m.mid, 1)
    time.sleep(0.3)
    for i in range(20, 220):
        pub.c.publish(f"probe/ooo{proto}/t", b"%d" % i, qos=1)
    wait_for(lambda: len(sub.messages) >= 220, 3.0)
    got = len(sub.messages)
    for m in sub.messages[20:]:
        sub.c.ack(m.mid, 1)
    dropped = sub.disconnected.is_set()
    pub.close()
    sub.close()
    return ("ok" if got >= 220 else f"{got}/220 delivered") + (", subscriber disconnected" if dropped else "")


def check_payloads(port: int, proto: int) -> tuple[int, str]:
    """Largest payload (of PAYLOAD_SIZES) delivered, and what happened to the first one that was not."""
    sub = Link(port, proto, f"bigsub-{proto}").connect()
    sub.subscribe(f"probe/big{proto}/#", 1)
    best, note = 0, ""
    for size in PAYLOAD_SIZES:
        pub = Link(port, proto, f"bigpub-{proto}-{size}")
        try:
            pub.connect()
            pub.c.publish(f"probe/big{proto}/t", b"b" * size, qos=1)
            if wait_for(lambda: any(len(m.payload) == size for m in sub.messages), 5.0):
                best = size
            else:
                note = f"{size} B not delivered" + (" (publisher disconnected)" if pub.disconnected.is_set() else "")
        except ProbeError as exc:
            note = f"{size} B: {exc}"
        finally:
            pub.close()
        if note:
            break
    sub.close()
    return best, note


def probe(name: str, start: Callable[[Path], Running], args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ebp-") as tmp:
        t = time.monotonic()
        try:
            run = start(Path(tmp))
        except ImportError as exc:
            return [{"broker": name, "error": f"unavailable: {exc}"}]
        except ProbeError as exc:
            return [{"broker": name, "error": f"did not start: {exc}"}]
        started = round(time.monotonic() - t, 2)
        try:
            for proto in (4, 5):
                row: dict = {"broker": name, "mqtt": "5" if proto == 5 else "3.1.1", "start_s": started}
                rows.append(row)
                port = run.ports[proto]
                try:
                    link = Link(port, proto, f"hello-{proto}").connect()
                except ProbeError as exc:
                    row["error"] = f"connect refused: {exc}"
                    continue
                rm = getattr(link.connack_props, "ReceiveMaximum", None) if proto == 5 else None
                row["receive_maximum"] = rm if rm is not None else (65535 if proto == 5 else "n/a")
                link.close()
                pid = run.child_pids[0] if run.child_pids else 0

                def measured_flow() -> dict:
                    runs = []
                    for _ in range(args.repeat):
                        cpu = cpu_seconds(pid)
                        result = flow(port, proto, args.messages, args.publishers, args.window, args.payload)
                        result["broker_cpu_s"] = round(cpu_seconds(pid) - cpu, 2)
                        runs.append(result)
                    runs.sort(key=lambda r: r["msg_per_s"])
                    median = runs[len(runs) // 2]
                    median["msg_per_s_runs"] = [r["msg_per_s"] for r in runs]
                    median["lossless"] = all(r["lossless"] for r in runs)
                    return median

                for key, fn in (("flow", measured_flow),
                                ("inflight_to_subscriber", lambda: check_inflight_cap(port, proto)),
                                ("share", lambda: check_share(port, proto)),
                                ("retained", lambda: check_retained(port, proto)),
                                ("will", lambda: check_will(port, proto)),
                                ("session", lambda: check_session(port, proto)),
                                ("redelivery", lambda: check_redelivery(port, proto)),
                                ("out_of_order_ack", lambda: check_out_of_order_ack(port, proto)),
                                ("max_payload", lambda: check_payloads(port, proto))):
                    try:
                        row[key] = fn()
                    except Exception as exc:  # noqa: BLE001 - a failing check is a finding, go on
                        row[key] = f"error: {exc}"
                    print(f"  {name} mqtt{proto} {key}: {row[key]}", flush=True)
        finally:
            run.stop()
            for pid in run.child_pids:
                alive = Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
                if alive:
                    rows[-1 if rows else 0].setdefault("warning", f"pid {pid} still alive after stop")
    return rows


def table(rows: list[dict]) -> str:
    """The results as one Markdown table."""
    cols = ("broker", "MQTT", "granted QoS", "msg/s", "broker CPU s", "delivered/sent", "dups",
            "publisher stalled", "$share (2 members, 10 msgs)", "retained", "will", "offline session",
            "unacked redelivered", "out-of-order ack", "max payload", "in-flight to subscriber",
            "CONNACK Receive Max")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['broker']} | {r.get('mqtt', '')} | {r['error']} |")
            continue
        f = r.get("flow", {})
        if isinstance(f, str):
            f = {"msg_per_s": f}
        rates = f.get("msg_per_s_runs", [])
        rate = f"{f.get('msg_per_s', '')}" + (f" ({min(rates)}-{max(rates)})" if len(rates) > 1 else "")
        share = r.get("share", "")
        if isinstance(share, dict):
            got = share["detail"].rsplit("members got ", 1)[-1].replace(" of 10", "")
            share = ("yes, " if share["ok"] else "no, ") + got
        mp = r.get("max_payload", "")
        if not isinstance(mp, str):
            mp = f"{mp[0] // 1024} KiB" + (f" ({mp[1]})" if mp[1] else "")
        cells = (r["broker"], r["mqtt"], str(f.get("suback", "")).replace("Granted ", ""), rate,
                 f.get("broker_cpu_s", ""), f"{f.get('delivered', '')}/{f.get('sent', '')}",
                 f.get("duplicates", ""), f.get("publisher_stalled", ""), share, r.get("retained", ""),
                 r.get("will", ""), r.get("session", ""), r.get("redelivery", ""),
                 r.get("out_of_order_ack", ""), mp, r.get("inflight_to_subscriber", ""),
                 r.get("receive_maximum", ""))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", nargs=2, metavar=("NAME", "PORT"), help=argparse.SUPPRESS)
    ap.add_argument("-c", "--candidates", default=",".join(CANDIDATES),
                    help="comma-separated names (default: all): " + ", ".join(CANDIDATES))
    ap.add_argument("-n", "--messages", type=int, default=20_000)
    ap.add_argument("-p", "--publishers", type=int, default=4)
    ap.add_argument("-w", "--window", type=int, default=200, help="in-flight QoS 1 messages per publisher")
    ap.add_argument("-s", "--payload", type=int, default=3000, help="payload bytes")
    ap.add_argument("-r", "--repeat", type=int, default=1, help="flow runs per broker; the median is shown")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args(argv)
    if args.serve:
        _serve(args.serve[0], int(args.serve[1]))
        return 0
    rows: list[dict] = []
    for name in args.candidates.split(","):
        name = name.strip()
        if name not in CANDIDATES:
            ap.error(f"unknown candidate {name!r}")
        print(f"== {name}", flush=True)
        rows += probe(name, CANDIDATES[name], args)
    print()
    print(f"{args.messages} messages of {args.payload} B, {args.publishers} publishers x window {args.window}, "
          "one manual-ack subscriber (ack per 100 or 20 ms)\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
