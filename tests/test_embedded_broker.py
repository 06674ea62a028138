"""The embedded broker (rumqttd via iotcore): lifecycle, delivery, and capabilities that hold.

Every test talks to a real broker process through paho-mqtt 2.2, as edgeloop's clients do. The
capability tests check each field of EMBEDDED_CAPABILITIES against what the broker really does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from aggregator.embedded_broker import (
    EMBEDDED_CAPABILITIES,
    MOSQUITTO_CAPABILITIES,
    BrokerCapabilities,
    EmbeddedBroker,
    EmbeddedBrokerError,
)

pytest.importorskip("iotcore")
pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


class Client:
    """A paho client on one of the broker's listeners, with its messages collected."""

    def __init__(self, broker: EmbeddedBroker, client_id: str | None = None, *, v5: bool = True,
                 manual_ack: bool = False, persistent: bool = False, port: int | None = None) -> None:
        self.port = port or (broker.port if v5 else broker.port_v311)
        self.v5, self.persistent = v5, persistent
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or uuid.uuid4().hex,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                             clean_session=None if v5 else not persistent, manual_ack=manual_ack)
        self.messages: list[mqtt.MQTTMessage] = []
        self.cond = threading.Condition()
        self.connack: tuple | None = None
        self.subacks: dict[int, list] = {}
        self.disconnected = threading.Event()
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_disconnect = lambda *a: self.disconnected.set()

    def _on_connect(self, c, u, flags, reason, props) -> None:
        with self.cond:
            self.connack = (flags, reason, props)
            self.cond.notify_all()

    def _on_subscribe(self, c, u, mid, codes, props) -> None:
        with self.cond:
            self.subacks[mid] = codes
            self.cond.notify_all()

    def _on_message(self, c, u, m) -> None:
        with self.cond:
            self.messages.append(m)
            self.cond.notify_all()

    def connect(self, will: tuple[str, bytes] | None = None, timeout: float = 5.0) -> Client:
        if will:
            self.c.will_set(will[0], will[1], qos=1, retain=True)
        kwargs: dict = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            if self.persistent:
                props.SessionExpiryInterval = 600
            kwargs = {"clean_start": not self.persistent, "properties": props}
        self.c.connect("127.0.0.1", self.port, keepalive=30, **kwargs)
        self.c.loop_start()
        with self.cond:
            assert self.cond.wait_for(lambda: self.connack is not None, timeout), "no CONNACK"
        assert not self.connack[1].is_failure, self.connack[1]
        return self

    def subscribe(self, topic: str) -> None:
        result, mid = self.c.subscribe(topic, 1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        with self.cond:
            assert self.cond.wait_for(lambda: mid in self.subacks, 5), "no SUBACK"
        assert [str(code) for code in self.subacks[mid]] == ["Granted QoS 1"]

    def wait(self, n: int, timeout: float = 5.0) -> list[mqtt.MQTTMessage]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.messages) >= n, timeout)
            return list(self.messages)

    def close(self, clean: bool = True) -> None:
        if clean:
            self.c.disconnect()
        self.c.loop_stop()
        if not clean and self.c.socket() is not None:
            self.c.socket().close()  # gone without DISCONNECT, like a crash


def publish_all(pub: Client, topic: str, payloads: list[bytes]) -> None:
    """Publish at QoS 1 keeping at most receive_maximum in flight, as edgeloop's publishers do."""
    window = threading.Semaphore(EMBEDDED_CAPABILITIES.receive_maximum)
    pub.c.on_publish = lambda *a: window.release()
    for p in payloads:
        assert window.acquire(timeout=10), "PUBACKs stopped coming"
        pub.c.publish(topic, p, qos=1)


def wait_until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.02)
    return pred()


def topic() -> str:
    return f"t/{uuid.uuid4().hex[:12]}"


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with EmbeddedBroker(data_dir=tmp_path_factory.mktemp("broker")) as b:
        yield b


# --- lifecycle ----------------------------------------------------------------------------------


def test_start_stop_leaves_no_process_thread_port_or_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads_before = set(threading.enumerate())
    b = EmbeddedBroker()
    b.start()
    pid, port, port_v311, data_dir = b.pid, b.port, b.port_v311, b.data_dir
    assert b.url == f"mqtt://127.0.0.1:{port}" and b.url_v311 == f"mqtt://127.0.0.1:{port_v311}"
    assert b.running and alive(pid)
    Client(b).connect().close()
    b.stop()
    assert not b.running and b.pid is None
    assert not alive(pid)
    assert not accepts(port) and not accepts(port_v311)
    assert not data_dir.exists(), "the temporary data dir is removed"
    assert list(tmp_path.iterdir()) == [], "nothing written to the working directory"
    assert set(threading.enumerate()) == threads_before
    b.stop()  # twice is fine
    with pytest.raises(EmbeddedBrokerError):
        b.url


def test_context_manager_keeps_given_data_dir_and_restarts_on_same_ports(tmp_path):
    data = tmp_path / "broker"
    b = EmbeddedBroker(data_dir=data)
    with b:
        ports = (b.port, b.port_v311)
        Client(b, v5=False).connect().close()
    assert not b.running
    assert sorted(p.name for p in data.iterdir()) == ["broker.log", "rumqttd.toml"]
    with b:  # start() after stop(): same ports, so clients reconnect to the same URL
        assert (b.port, b.port_v311) == ports
        Client(b).connect().close()
    assert not b.running


def test_taken_port_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        b = EmbeddedBroker(port=taken, data_dir=tmp_path)
        with pytest.raises(EmbeddedBrokerError, match=str(taken)):
            b.start()
        assert b.pid is None and not b.running


def test_broker_process_dies_with_its_parent(tmp_path):
    script = ("import sys, time\nfrom aggregator.embedded_broker import EmbeddedBroker\n"
              f"b = EmbeddedBroker(data_dir={str(tmp_path)!r}).start()\n"
              "print(b.pid, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert alive(pid)
        os.kill(parent.pid, signal.SIGKILL)  # no atexit, no stop(): only the stdin pipe closes
        parent.wait(5)
        deadline = time.monotonic() + 5
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), "the broker outlived the process that started it"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_broker_chatter_stays_out_of_logs(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with EmbeddedBroker(data_dir=tmp_path) as b:
        sub = Client(b, manual_ack=True).connect()
        t = topic()
        sub.subscribe(t)
        pub = Client(b).connect()
        publish_all(pub, t, [b"x"] * 50)
        assert len(sub.wait(50)) == 50
        for m in sub.messages:
            sub.c.ack(m.mid, 1)
        pub.close(), sub.close()
    ours = [r for r in caplog.records if r.name.startswith("aggregator.embedded_broker")]
    assert [r for r in caplog.records if r.levelno >= logging.INFO and r not in ours] == []
    assert len([r for r in ours if r.levelno >= logging.INFO]) == 2  # started at ..., stopped
    assert (tmp_path / "broker.log").read_text() == ""


# --- delivery -----------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
def test_qos1_round_trip_with_manual_ack_and_redelivery(broker, v5):
    t, cid = topic(), f"agg-{uuid.uuid4().hex[:8]}"
    sub = Client(broker, cid, v5=v5, manual_ack=True, persistent=True).connect()
    sub.subscribe(t + "/#")
    pub = Client(broker, v5=v5).connect()
    payloads = [b"%d|" % i + b"r" * 3000 for i in range(500)]
    acked = 0

    def ack_batches() -> None:  # the aggregator: acknowledge in arrival order, in batches of 50
        nonlocal acked
        while acked < len(payloads):
            with sub.cond:
                sub.cond.wait_for(lambda: len(sub.messages) >= min(acked + 50, len(payloads)), 5)
                batch = sub.messages[acked:acked + 50]
            if not batch:
                return
            for m in batch:
                sub.c.ack(m.mid, 1)
            acked += len(batch)

    acker = threading.Thread(target=ack_batches)
    acker.start()
    publish_all(pub, t + "/dev", payloads)
    acker.join(30)
    assert [m.payload for m in sub.messages] == payloads, "all delivered once, in order"

    # Ten more, never acknowledged: after a crash the persistent session gets them again.
    publish_all(pub, t + "/dev", [b"again-%d" % i for i in range(10)])
    assert len(sub.wait(510)) == 510
    sub.close(clean=False)
    sub = Client(broker, cid, v5=v5, manual_ack=True, persistent=True).connect()
    redelivered = sub.wait(10)
    assert [m.payload for m in redelivered] == [b"again-%d" % i for i in range(10)]
    for m in redelivered:
        sub.c.ack(m.mid, 1)
    time.sleep(0.2)
    sub.close()
    sub = Client(broker, cid, v5=v5, manual_ack=True, persistent=True).connect()
    assert sub.wait(1, timeout=1.0) == [], "acknowledged messages do not come back"
    sub.close(), pub.close()


def test_retained_status_and_last_will(broker):
    status = topic() + "/status"
    dev = Client(broker, "dev-1").connect(will=(status, b"offline"))
    dev.c.publish(status, b"online", qos=1, retain=True).wait_for_publish(5)
    watcher = Client(broker).connect()
    watcher.subscribe(status)
    first = watcher.wait(1)
    assert (first[0].payload, first[0].retain) == (b"online", True)
    dev.close(clean=False)
    assert [m.payload for m in watcher.wait(2)] == [b"online", b"offline"]
    late = Client(broker).connect()
    late.subscribe(status)
    last = late.wait(1)
    assert (last[0].payload, last[0].retain) == (b"offline", True), "the will was kept as retained"
    watcher.close(), late.close()


def test_200_kb_payload_delivered(broker):
    t = topic()
    sub = Client(broker).connect()
    sub.subscribe(t)
    pub = Client(broker, v5=False).connect()
    payload = os.urandom(200 * 1024)
    pub.c.publish(t, payload, qos=1).wait_for_publish(5)
    assert [m.payload for m in sub.wait(1)] == [payload]
    sub.close(), pub.close()


# --- the capabilities are what the broker does ----------------------------------------------------


def test_mqtt5_on_url_and_311_on_url_v311_share_one_broker(broker):
    assert EMBEDDED_CAPABILITIES.mqtt5 and broker.capabilities is EMBEDDED_CAPABILITIES
    t = topic()
    sub5 = Client(broker, v5=True).connect()
    sub5.subscribe(t)
    pub5 = Client(broker, v5=True).connect()
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("schema", "1")  # an MQTT 5 feature end to end
    pub5.c.publish(t, b"five", qos=1, properties=props).wait_for_publish(5)
    pub311 = Client(broker, v5=False).connect()
    pub311.c.publish(t, b"three", qos=1).wait_for_publish(5)
    got = sub5.wait(2)
    assert [m.payload for m in got] == [b"five", b"three"], "both listeners reach one broker"
    assert got[0].properties.UserProperty == [("schema", "1")]
    wrong = Client(broker, v5=False, port=broker.port)  # each listener speaks only its version
    with pytest.raises(AssertionError, match="no CONNACK"):
        wrong.connect(timeout=2)
    wrong.close(), sub5.close(), pub5.close(), pub311.close()


def test_max_payload_is_delivered_and_more_is_refused(broker):
    limit = EMBEDDED_CAPABILITIES.max_payload
    assert limit >= 1024 * 1024
    t = topic()
    sub = Client(broker).connect()
    sub.subscribe(t)
    pub = Client(broker).connect()
    pub.c.publish(t, b"m" * limit, qos=1).wait_for_publish(5)
    assert len(sub.wait(1)[0].payload) == limit
    big = Client(broker).connect()
    big.c.publish(t, b"m" * (limit + 256 * 1024), qos=1)
    assert big.disconnected.wait(5), "an oversized publish costs the publisher its connection"
    assert len(sub.wait(2, timeout=1.0)) == 1, "and is not delivered"
    big.close(), sub.close(), pub.close()


def test_shared_subscription_splits_messages_between_members(broker):
    assert EMBEDDED_CAPABILITIES.shared_subscriptions
    t = topic()
    members = [Client(broker).connect() for _ in range(2)]
    for m in members:
        m.subscribe(f"$share/agg/{t}/#")
    pub = Client(broker).connect()
    publish_all(pub, t + "/d", [b"%d" % i for i in range(20)])
    assert wait_until(lambda: sum(len(m.messages) for m in members) >= 20)
    time.sleep(0.3)  # would a copy still come?
    got = [[m.payload for m in member.messages] for member in members]
    assert sorted(got[0] + got[1], key=int) == [b"%d" % i for i in range(20)], "each exactly once"
    assert got[0] and got[1], "both members take a share"
    pub.close(), [m.close() for m in members]


def test_receive_maximum_is_what_a_subscriber_may_hold_unacknowledged(broker):
    cap = EMBEDDED_CAPABILITIES.receive_maximum
    t = topic()
    sub = Client(broker, manual_ack=True).connect()
    sub.subscribe(t)
    pub = Client(broker).connect()
    publish_all(pub, t, [b"%d" % i for i in range(cap + 50)])
    held = sub.wait(cap, timeout=10)
    assert len(held) == cap
    assert len(sub.wait(cap + 1, timeout=1.0)) == cap, "then it waits for acknowledgements"
    for m in held:
        sub.c.ack(m.mid, 1)
    assert len(sub.wait(cap + 50)) == cap + 50
    sub.close(), pub.close()


def test_ordered_acks_are_required(broker):
    assert EMBEDDED_CAPABILITIES.ordered_acks
    t = topic()
    sub = Client(broker, manual_ack=True).connect()
    sub.subscribe(t)
    pub = Client(broker).connect()
    publish_all(pub, t, [b"%d" % i for i in range(5)])
    msgs = sub.wait(5)
    for m in reversed(msgs):
        sub.c.ack(m.mid, 1)
    assert sub.disconnected.wait(5), "rumqttd drops a client that acknowledges out of order"
    sub.close(), pub.close()


def test_mosquitto_capabilities_match_the_deploy_profile():
    conf = (ROOT / "deploy" / "mosquitto" / "edgeloop.conf").read_text()

    def setting(name: str) -> int | None:
        found = re.search(rf"^{name}\s+(\d+)", conf, re.M)
        return int(found.group(1)) if found else None

    assert MOSQUITTO_CAPABILITIES == BrokerCapabilities(
        mqtt5=True, shared_subscriptions=True, max_payload=1024 * 1024, receive_maximum=1000)
    assert MOSQUITTO_CAPABILITIES.receive_maximum == setting("max_inflight_messages")
    # A max_payload publish (with its topic and headers) must fit every size limit the profile sets.
    assert setting("max_packet_size") is not None
    assert MOSQUITTO_CAPABILITIES.max_payload + 1024 <= setting("max_packet_size")
    assert MOSQUITTO_CAPABILITIES.max_payload <= (setting("message_size_limit") or 2**31)
    assert not MOSQUITTO_CAPABILITIES.ordered_acks
    with pytest.raises(dataclasses.FrozenInstanceError):
        MOSQUITTO_CAPABILITIES.max_payload = 1  # type: ignore[misc]
