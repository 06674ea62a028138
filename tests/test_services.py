"""The test harness works, and the broker profile does what its comments claim.

Real Mosquitto and InfluxDB only: a QoS 1 round trip, a persistent session and its queue
surviving a graceful restart and a kill -9 after one autosave interval, the profile's in-flight
window and queue size (where Mosquitto's defaults drop messages), InfluxDB writes surviving
stop and kill, and the harness's own failure paths (bad config, taken port).
"""

from __future__ import annotations

import socket
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.services import InfluxServer, MosquittoServer, ServiceError


class _Client:
    """A paho MQTT 5 client that records what it receives; just enough for these tests."""

    def __init__(self, server: MosquittoServer, client_id: str | None = None, *,
                 persistent: bool = False, manual_ack: bool = False) -> None:
        self.received: list[bytes] = []
        self.session_present: bool | None = None
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or _unique("c"),
                                 protocol=mqtt.MQTTv5, manual_ack=manual_ack)
        self._paho.on_connect = self._on_connect
        self._paho.on_message = self._on_message
        properties = None
        if persistent:  # the session outlives the connection: clean_start=False plus an expiry
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 3600
        self._paho.connect(server.host, server.port, keepalive=30,
                           clean_start=not persistent, properties=properties)
        self._paho.loop_start()
        assert self._connected.wait(5), f"no CONNACK from {server!r}"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.session_present = flags.session_present
        self._connected.set()

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.received.append(message.payload)

    def subscribe(self, topic: str) -> None:
        result, mid = self._paho.subscribe(topic, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        time.sleep(0.1)  # SUBACK round trip on loopback

    def publish_all(self, topic: str, payloads: list[bytes]) -> None:
        """Publish at QoS 1 and return once the broker acknowledged every message."""
        infos = [self._paho.publish(topic, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self._paho.disconnect()
        self._paho.loop_stop()


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# -- Mosquitto --------------------------------------------------------------------------------------


def test_qos1_roundtrip_through_session_broker(mosquitto):
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    topic = _unique("t") + "/roundtrip"
    sub, pub = _Client(mosquitto), _Client(mosquitto)
    try:
        sub.subscribe(topic)
        pub.publish_all(topic, [b"one", b"two", b"three"])
        assert sub.wait_for(3) == [b"one", b"two", b"three"]
    finally:
        sub.close()
        pub.close()


@pytest.mark.parametrize("outage", ["restart", "kill_after_autosave"])
def test_persistent_session_and_queue_survive_broker_outage(mosquitto_factory, outage):
    """Messages queued for an offline persistent subscriber are delivered after the outage.

    ``kill_after_autosave`` waits past the profile's 1 s autosave_interval and then SIGKILLs the
    broker, so only the periodic save can have kept the session.
    """
    broker = mosquitto_factory()
    topic, sub_id = _unique("t") + "/queued", _unique("sub")
    sub = _Client(broker, sub_id, persistent=True)
    sub.subscribe(topic)
    sub.close()

    pub = _Client(broker)
    pub.publish_all(topic, [b"a", b"b", b"c"])
    pub.close()

    if outage == "restart":
        broker.restart()
    else:
        time.sleep(2.0)  # > autosave_interval 1 s
        broker.kill()
        broker.start()

    sub = _Client(broker, sub_id, persistent=True)
    try:
        assert sub.session_present is True, "the broker forgot the persistent session"
        assert sorted(sub.wait_for(3)) == [b"a", b"b", b"c"]
    finally:
        sub.close()


@pytest.mark.parametrize(("overrides", "keeps_all"), [({}, True), ({"max_queued_messages": 1000}, False)])
def test_offline_subscriber_queue_holds_more_than_mosquitto_default(mosquitto_factory, overrides, keeps_all):
    """The profile queues all 2500 messages; Mosquitto's default max_queued_messages drops some.

    The second case is the control: it shows the test can tell the two apart.
    """
    broker = mosquitto_factory(**overrides)
    topic, sub_id, count = _unique("t") + "/backlog", _unique("sub"), 2500
    sub = _Client(broker, sub_id, persistent=True)
    sub.subscribe(topic)
    sub.close()

    pub = _Client(broker)
    pub.publish_all(topic, [str(i).encode() for i in range(count)])
    pub.close()

    sub = _Client(broker, sub_id, persistent=True)
    try:
        received = sub.wait_for(count, timeout=10.0 if keeps_all else 1.0)
        assert (len(set(received)) == count) is keeps_all, f"{len(set(received))} of {count} delivered"
    finally:
        sub.close()


@pytest.mark.parametrize(("overrides", "window"), [({}, 1000), ({"max_inflight_messages": 20}, 20)])
def test_inflight_window_for_a_subscriber_that_acknowledges_late(mosquitto_factory, overrides, window):
    """A subscriber that has not acknowledged yet gets the profile's 1000 messages, not 20.

    The second case proves that overrides replace profile settings.
    """
    broker = mosquitto_factory(**overrides)
    topic = _unique("t") + "/inflight"
    sub = _Client(broker, manual_ack=True)  # never acknowledges
    pub = _Client(broker)
    try:
        sub.subscribe(topic)
        pub.publish_all(topic, [str(i).encode() for i in range(window + 200)])
        sub.wait_for(window)
        time.sleep(0.5)  # anything beyond the window would arrive now
        assert len(sub.received) == window
    finally:
        sub.close()
        pub.close()


def test_generated_config_comes_from_the_profile(mosquitto_factory):
    broker = mosquitto_factory(max_queued_messages=5)
    config = broker.config_path.read_text()
    assert f"listener {broker.port} 127.0.0.1" in config
    assert f"persistence_location {broker.data_dir}/" in config
    assert "\nmax_queued_messages 5\n" in config
    assert "\nmax_queued_messages 1000000\n" not in config
    assert "\nautosave_interval 1\n" in config  # untouched profile setting


def test_failed_start_raises_with_the_broker_log(mosquitto_factory):
    with pytest.raises(ServiceError, match="Unknown configuration variable"):
        mosquitto_factory(no_such_option=1)


def test_taken_port_moves_to_another_unless_fixed(tmp_path, mosquitto_factory):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]

        with pytest.raises(ServiceError, match=f"port {taken} is in use"):
            mosquitto_factory(port=taken)

        server = MosquittoServer(workdir=tmp_path / "moved")
        server.port = taken  # as if another process grabbed our port between choice and bind
        try:
            server.start()
            assert server.port != taken and server.running
        finally:
            server.stop()


# -- InfluxDB ---------------------------------------------------------------------------------------


def test_influx_write_and_query_back(influxdb):
    assert influxdb.url == f"http://127.0.0.1:{influxdb.port}"
    db = influxdb.new_database("harness")
    influxdb.create_database(db)
    influxdb.write(db, ["cpu,host=a value=1.5 1000000000", "cpu,host=a value=2.5 2000000000"])
    result = influxdb.query(db, "SELECT value FROM cpu ORDER BY time", epoch="s")
    assert result["results"][0]["series"][0]["values"] == [[1, 1.5], [2, 2.5]]
    assert influxdb.version and influxdb.version.startswith("1.")


@pytest.mark.parametrize("outage", ["stop", "kill"])
def test_influx_data_survives_stop_and_kill(influxdb_factory, outage):
    server = influxdb_factory
    db = server.new_database()
    server.create_database(db)
    server.write(db, "m,dev=d1 v=42i 1700000000000000000")
    port = server.port
    getattr(server, outage)()
    assert not server.running
    server.start()
    assert server.port == port
    result = server.query(db, "SELECT v FROM m")
    assert result["results"][0]["series"][0]["values"][0][1] == 42


def test_influxdb_factory_starts_more_servers(influxdb_factory):
    other = influxdb_factory()
    assert isinstance(other, InfluxServer) and other.running
    assert other.port != influxdb_factory.port
