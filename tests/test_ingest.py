"""Ingest through a real Mosquitto: bad input is quarantined with its reason and never stops the
loop or reaches the store; good input is stored, acknowledged and confirmed to its device."""

from __future__ import annotations

import threading
import time

import pytest

from edgeloop import wire
from edgeloop.mqtt import MqttLink
from tests.waiting import poll as _wait

T0 = 1_767_225_600.0


def _telemetry(device: str, seq: int, n: int = 3) -> bytes:
    readings = [wire.Reading(T0 + seq + i / 10, [float(seq), float(i)], 0) for i in range(n)]
    return wire.encode(wire.Telemetry(v=1, device=device, seq=seq, ts=T0 + seq, channels=["a", "b"], readings=readings))


@pytest.fixture
def aggregator(mosquitto, tmp_path):
    from aggregator.service import Aggregator, AggregatorConfig, MqttSettings

    # A share group of its own: the session-wide broker may hold other tests' aggregator sessions.
    cfg = AggregatorConfig(data_dir=str(tmp_path), mqtt=MqttSettings(
        url=mosquitto.url, client_id=f"ingest-{tmp_path.name}", share_group=f"g-{tmp_path.name}"[:60]))
    agg = Aggregator(cfg)
    agg.start()
    yield agg
    agg.stop(forget_session=True)


def test_hostile_input_is_quarantined_and_good_input_still_flows(mosquitto, aggregator):
    confirms: list[wire.Confirm] = []
    got = threading.Event()

    def on_message(msg):
        confirms.append(wire.decode_confirm(msg.payload, msg.topic))
        got.set()

    device = MqttLink(mosquitto.url, "ingest-test-device", on_message=on_message)
    device.start()
    device.subscribe(wire.confirm_topic("dev-1"))
    time.sleep(0.3)
    hostile = [
        (wire.topic("dev-1", "telemetry"), b"{not json", "malformed"),
        (wire.topic("dev-1", "telemetry"), _telemetry("dev-2", 7), "device-mismatch"),
        (wire.topic("dev-1", "telemetry"), _telemetry("dev-1", 8).replace(b'"a"', b'"a,device=x b"'), "invalid"),
        (wire.topic("dev-1", "telemetry"), _telemetry("dev-1", 9).replace(b'"v":1', b'"v":99'), "unsupported-version"),
        (wire.topic("dev-1", "telemetry"), b"x" * (wire.MAX_PAYLOAD_BYTES + 1), "oversize"),
        ("edgeloop/v1/dev/dev-1/nonsense", _telemetry("dev-1", 10), "bad-topic"),
    ]
    for seq in range(3):
        assert device.publish(wire.topic("dev-1", "telemetry"), _telemetry("dev-1", seq))
    for topic, payload, _ in hostile:
        assert device.publish(topic, payload)
    for seq in range(3, 6):
        assert device.publish(wire.topic("dev-1", "telemetry"), _telemetry("dev-1", seq))

    store = aggregator.store
    assert _wait(lambda: store.count("telemetry", "dev-1") == 18), store.count("telemetry", "dev-1")
    assert _wait(lambda: aggregator.quarantine.total() == len(hostile))
    assert dict(aggregator.quarantine.counts) == {reason: 1 for _, _, reason in hostile}
    # Nothing hostile reached the series: only the six good messages' readings, none of dev-2.
    rows = store.telemetry("dev-1")
    assert sorted({r.seq for r in rows}) == [0, 1, 2, 3, 4, 5]
    assert store.count("telemetry", "dev-2") == 0
    # The device hears about exactly its six stored messages.
    assert _wait(lambda: wire.merge_ranges(r for c in confirms for r in c.ranges) == [(0, 5)])
    stored = {(r["topic"], r["reason"]) for r in aggregator.quarantine.recent()}
    assert ("edgeloop/v1/dev/dev-1/nonsense", "bad-topic") in stored
    device.stop()


def test_repeats_are_stored_once_and_confirmed_again(mosquitto, aggregator):
    confirms: list[wire.Confirm] = []
    device = MqttLink(mosquitto.url, "ingest-test-repeat",
                      on_message=lambda m: confirms.append(wire.decode_confirm(m.payload, m.topic)))
    device.start()
    device.subscribe(wire.confirm_topic("dev-r"))
    time.sleep(0.3)
    for _ in range(3):  # the same message three times: redelivery, device re-send, another re-send
        assert device.publish(wire.topic("dev-r", "telemetry"), _telemetry("dev-r", 0, n=5))
        time.sleep(1.2)  # one confirmation round each
    assert _wait(lambda: len(confirms) >= 3)
    assert all(c.ranges == [(0, 0)] for c in confirms)
    assert aggregator.store.count("telemetry", "dev-r") == 5
    device.stop()
