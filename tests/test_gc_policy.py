"""The ingest path leaves no work for the cyclic garbage collector, and the aggregator process's
collector policy (aggregator/gc_policy.py) does what it says."""

from __future__ import annotations

import gc
import secrets
import subprocess
import sys

import pytest

from edgeloop import wire
from tests.waiting import poll, wait_until


def test_decoded_readings_are_not_tracked_by_the_collector():
    m = wire.Telemetry(v=1, device="d1", seq=1, ts=1.0, channels=["a", "b"],
                       readings=[wire.Reading(1.0 + i, [float(i), None]) for i in range(5)])
    decoded = wire.decode(wire.topic("d1", "telemetry"), wire.encode(m))
    assert decoded == m
    assert not any(gc.is_tracked(r) for r in decoded.readings)


@pytest.mark.mosquitto
def test_receiving_through_a_link_makes_no_reference_cycles(mosquitto):
    """paho 2.x builds a self-referencing closure per received message unless the link swaps its
    topic matcher (edgeloop.mqtt._EmptyFastMatcher); 300 messages would leave over 1,800
    objects in cycles."""
    from edgeloop.mqtt import MqttLink

    tag = secrets.token_hex(3)
    got: list[bytes] = []
    sub = MqttLink(mosquitto.url, f"gc-sub-{tag}", protocol="5", on_message=lambda m: got.append(m.payload))
    pub = MqttLink(mosquitto.url, f"gc-pub-{tag}", protocol="5")
    assert sub.start(timeout=10) and pub.start(timeout=10)
    was_enabled = gc.isenabled()
    try:
        sub.subscribe(f"gc-{tag}/#", qos=1)

        def probe_arrived() -> bool:  # the subscription is in place once a probe comes back
            pub.publish(f"gc-{tag}/probe", b"p", qos=1)
            return poll(lambda: bool(got), timeout=0.3)

        wait_until(probe_arrived, timeout=10)
        gc.collect()
        gc.disable()
        before = len(got)
        for k in range(300):
            wait_until(lambda: pub.publish(f"gc-{tag}/x", b"%d" % k, qos=1), timeout=10)
        wait_until(lambda: len(got) >= before + 300, timeout=30)
        found = gc.collect()
    finally:
        if was_enabled:
            gc.enable()
        pub.stop()
        sub.stop()
    assert found < 300, f"{found} objects in reference cycles after 300 messages"


def test_settle_freezes_what_exists_and_raises_the_young_threshold():
    code = (
        "import gc; from aggregator import gc_policy\n"
        "older = gc.get_threshold()[1:]\n"
        "gc_policy.settle()\n"
        "print(gc.get_freeze_count(), gc.get_threshold()[0], gc.get_threshold()[1:] == older)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    frozen, young, older_kept = out.stdout.split()
    from aggregator.gc_policy import YOUNG_THRESHOLD

    assert int(frozen) > 1000  # the interpreter's and the imported modules' objects
    assert int(young) == YOUNG_THRESHOLD and older_kept == "True"
