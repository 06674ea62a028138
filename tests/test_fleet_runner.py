"""A fleet of real agents in one process: one scheduler thread, one network thread, real Mosquitto.

What is checked, all against the session's real Mosquitto and a real in-process aggregator with
its SQLite store: the shared :class:`~edgeloop.netloop.NetworkLoop` carries many MQTT links on
one thread and reconnects each after a cut; a :class:`~simulators.fleet.FleetRunner` of 60
devices delivers every message exactly once (by device, sequence and reading index, read back
from the store) while the thread count stays fixed; a fleet-wide network cut loses nothing; a
clock step moves the devices' reading times.
"""

from __future__ import annotations

import secrets
import threading
import time

import pytest

from edgeloop import wire
from tests.fleet import check_delivery, train_model
from tests.waiting import wait_until

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return train_model(tmp_path_factory.mktemp("fleet-model"))


def _configs(url: str, data_dir, n: int, prefix: str, rate_hz: float = 10.0):
    from edge_agent.config import AgentConfig, MqttSettings, SamplingSettings, SourceSettings

    return [
        AgentConfig(
            device_id=f"{prefix}-{k}",
            data_dir=str(data_dir),
            status_interval_s=5.0,
            mqtt=MqttSettings(url=url, protocol="5"),
            sampling=SamplingSettings(rate_hz=rate_hz, batch_s=1.0, window_s=5.0),
            source=SourceSettings(name="simulated", options={"profile": "machine", "seed": k, "rate_hz": rate_hz}),
        )
        for k in range(n)
    ]


class _Aggregator:
    """A real aggregator with a SQLite store and a share group and client id of its own."""

    def __init__(self, url: str, tmp_path) -> None:
        from aggregator.service import Aggregator, AggregatorConfig, MqttSettings

        tag = secrets.token_hex(3)
        self.dir = tmp_path / "agg"
        self.service = Aggregator(AggregatorConfig(
            data_dir=str(self.dir),
            mqtt=MqttSettings(url=url, client_id=f"fleet-agg-{tag}", share_group=f"fleet-{tag}"),
        ))

    def __enter__(self):
        self.service.start()
        return self

    def __exit__(self, *exc) -> None:
        self.service.stop(forget_session=True)

    def stored(self, agents):
        from aggregator.stores import make_store

        with make_store(sqlite_path=str(self.dir / "aggregator" / "store.sqlite")) as store:
            rows = [r for a in agents for r in store.telemetry(a.device)]
            counts = {kind: store.count(kind) for kind in ("features", "inference")}
        return rows, counts


class _Recorder:
    def __init__(self) -> None:
        self.accepted: list = []
        self._lock = threading.Lock()

    def __call__(self, msg) -> None:
        with self._lock:
            self.accepted.append(msg)


def test_network_loop_carries_many_links_on_one_thread_and_reconnects_each(mosquitto):
    from edgeloop.mqtt import MqttLink
    from edgeloop.netloop import NetworkLoop

    tag = secrets.token_hex(3)
    received: list[bytes] = []
    before = threading.active_count()
    with NetworkLoop() as net:
        sub = MqttLink(mosquitto.url, f"nl-sub-{tag}", network_loop=net,
                       on_message=lambda m: received.append(m.payload))
        assert sub.start(timeout=10)
        assert sub.subscriptions_pending == 0
        sub.subscribe(f"nl-{tag}/#", qos=1)
        sub.subscribe(f"nl-{tag}-other/#", qos=1)
        wait_until(lambda: sub._subscribes_acked == 2, timeout=10)  # both SUBACKs came back, counted
        assert sub._subscribes_sent == 2 and sub.subscriptions_pending == 0
        sub.publish(f"nl-{tag}/probe", b"-2", qos=1)  # acknowledged: the first publish arrives
        wait_until(lambda: b"-2" in received, timeout=10)
        links = [MqttLink(mosquitto.url, f"nl-{tag}-{k}", network_loop=net, protocol="5") for k in range(30)]
        for link in links:
            assert link.start(timeout=10)
        assert threading.active_count() == before + 1  # the loop's thread, not one per link
        def probe_returned() -> bool:  # the subscription is active once a probe comes back
            sub.publish(f"nl-{tag}/probe", b"-1", qos=0)
            time.sleep(0.05)
            return b"-1" in received

        wait_until(probe_returned, timeout=10)
        wait_until(lambda: sub.inflight == 0, timeout=10)
        received.clear()
        sent = 0
        while sent < 3000:
            for link in links:
                if link.publish(f"nl-{tag}/x", b"%d" % sent, qos=1):
                    sent += 1
        wait_until(lambda: len(received) >= 3000, timeout=30)
        assert sorted(int(p) for p in received) == list(range(3000))

        cut, kept = links[:3], links[3:]
        for link in cut:
            link.cut(1.5)
        wait_until(lambda: not any(link.connected for link in cut), timeout=10)
        assert all(link.connected for link in kept)
        assert not cut[0].publish(f"nl-{tag}/x", b"lost", qos=1)  # down: the caller keeps it
        wait_until(lambda: all(link.connected for link in cut), timeout=30)  # backoff 1 s, 2 s, ...
        assert all(link.reconnects == 1 for link in cut) and all(link.reconnects == 0 for link in kept)
        assert net.connect_failures >= 3  # at least one refused attempt each while the cut lasted
        for link in [*links, sub]:
            link.stop()
        assert net.links == 0
    assert threading.active_count() == before


def test_fleet_delivers_every_message_once_with_a_fixed_thread_count(mosquitto, model_dir, tmp_path):
    from edge_agent.inference import Model
    from simulators.fleet import FleetRunner

    record = _Recorder()
    with _Aggregator(mosquitto.url, tmp_path) as agg:
        before = set(threading.enumerate())
        fleet = FleetRunner(_configs(mosquitto.url, tmp_path / "dev", 60, f"fl-{secrets.token_hex(2)}"),
                            speed=5.0, model=Model.load(model_dir), on_accept=record, drain_timeout=60)
        with fleet:
            fleet.wait_connected(timeout=30)
            wait_until(lambda: fleet.elapsed_s > 4.0, timeout=30)
            # The aggregator starts its store writers lazily ("ingest-store_N"): not the fleet's.
            added = sorted(t.name for t in set(threading.enumerate()) - before
                           if not t.name.startswith("ingest-store"))
        results = fleet.results
        rows, counts = agg.stored(fleet.agents)
    # One scheduler thread and one network thread for 60 devices, not one or two per device.
    assert added == ["fleet-network", "fleet-scheduler"]
    check_delivery(fleet.agents, record.accepted, results, rows, counts, min_readings=5000)


def test_fleet_wide_cut_and_recovery_loses_nothing(mosquitto, model_dir, tmp_path):
    from edge_agent.inference import Model
    from simulators.fleet import FleetRunner

    record = _Recorder()
    with _Aggregator(mosquitto.url, tmp_path) as agg:
        fleet = FleetRunner(_configs(mosquitto.url, tmp_path / "dev", 40, f"cut-{secrets.token_hex(2)}"),
                            speed=5.0, model=Model.load(model_dir), on_accept=record, drain_timeout=60)
        with fleet:
            fleet.wait_connected(timeout=30)
            wait_until(lambda: fleet.elapsed_s > 1.5, timeout=30)
            fleet.cut(2.0)
            wait_until(lambda: not any(a._link.connected for a in fleet.agents), timeout=10)
            accepted_at_cut = len(record.accepted)
            wait_until(lambda: len(record.accepted) > accepted_at_cut + 200, timeout=30)  # still sampling
            fleet.wait_connected(timeout=40)
            wait_until(lambda: fleet.elapsed_s > 7.0, timeout=30)
        results = fleet.results
        rows, counts = agg.stored(fleet.agents)
    assert all(a.diagnostics()["reconnects"] >= 1 for a in fleet.agents)
    check_delivery(fleet.agents, record.accepted, results, rows, counts, min_readings=3000)


def test_clock_step_moves_reading_times_of_the_chosen_devices(mosquitto, tmp_path):
    from edge_agent.quality import CLOCK_STEP
    from simulators.fleet import FleetRunner

    record = _Recorder()
    prefix = f"clk-{secrets.token_hex(2)}"
    fleet = FleetRunner(_configs(mosquitto.url, tmp_path / "dev", 3, prefix), speed=10.0, on_accept=record,
                        drain_timeout=0)
    with fleet:
        wait_until(lambda: fleet.agents[0].stats.samples >= 30, timeout=30)
        fleet.clock_step(3600.0, devices=[f"{prefix}-0"])
        n0 = fleet.agents[0].stats.samples
        wait_until(lambda: fleet.agents[0].stats.samples >= n0 + 30, timeout=30)

    def readings(device):
        return [r for m in record.accepted if isinstance(m, wire.Telemetry) and m.device == device
                for r in m.readings]

    stepped, steady = [r.t for r in readings(f"{prefix}-0")], [r.t for r in readings(f"{prefix}-1")]
    gaps = [b - a for a, b in zip(stepped, stepped[1:])]
    assert sum(1 for g in gaps if g > 3000) == 1 and all(g > 0 for g in gaps)  # one jump, still ordered
    assert max(b - a for a, b in zip(steady, steady[1:])) < 1.0  # 0.1 s apart on the device clock
    # The step is flagged on the first reading after it, and running at speed 10 is no step.
    flagged = [i for i, r in enumerate(readings(f"{prefix}-0")) if r.flags & CLOCK_STEP]
    assert len(flagged) == 1 and gaps[flagged[0] - 1] > 3000
    assert not any(r.flags & CLOCK_STEP for d in (1, 2) for r in readings(f"{prefix}-{d}"))
    assert [a._clock.steps for a in fleet.agents] == [1, 0, 0]


def test_fleet_refuses_mismatched_sources_and_repeated_ids(tmp_path):
    from simulators.fleet import FleetRunner

    configs = _configs("mqtt://127.0.0.1:1", tmp_path, 2, "bad")
    with pytest.raises(ValueError, match="2 configs but 1 sources"):
        FleetRunner(configs, [None])
    with pytest.raises(ValueError, match="repeated: \\['bad-0'\\]"):
        FleetRunner([configs[0], configs[0]])
    fleet = FleetRunner(configs)
    with pytest.raises(ValueError, match="no device 'nope'"):
        fleet.cut(1.0, devices=["nope"])
