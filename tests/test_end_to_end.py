"""The first loop, all real: simulated source -> agent features + ONNX scores -> outbox -> MQTT
-> aggregator -> store -> delivery confirmation -> outbox drained.

Afterwards the store is read back directly and every (device, sequence, index) and value is
compared with what the agents recorded as accepted: none missing, none doubled, none altered.
The same test runs through real Mosquitto + InfluxDB 1.6.7 and through the embedded broker +
embedded SQLite store.
"""

from __future__ import annotations

import time

import pytest

from tests.fleet import Fleet, check_delivery, influx_counts, influx_rows, train_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return train_model(tmp_path_factory.mktemp("model"))


def _run_fleet(mqtt_url, protocol, agg_cfg, model_dir, data_dir, devices=3, seconds=4.0):
    """Run an in-process aggregator and ``devices`` agents for ``seconds``, then drain both."""
    from aggregator.service import Aggregator

    aggregator = Aggregator(agg_cfg)
    aggregator.start()
    try:
        with Fleet(mqtt_url, data_dir, model_dir, devices=devices, protocol=protocol) as fleet:
            time.sleep(seconds)
            drained = fleet.stop()
    finally:
        # Leave the shared group for good: the session-wide broker outlives this test.
        aggregator.stop(forget_session=True)
    return fleet.agents, fleet.accepted, drained


@pytest.mark.mosquitto
@pytest.mark.influxdb
def test_loop_through_mosquitto_and_influxdb(mosquitto, influxdb, model_dir, tmp_path):
    from aggregator.service import AggregatorConfig, InfluxSettings, MqttSettings

    database = influxdb.new_database("e2e")
    cfg = AggregatorConfig(
        data_dir=str(tmp_path / "agg"),
        # A share group of its own: other tests' aggregator sessions may linger on this broker, and
        # Mosquitto would queue a share of the traffic for each of them (see DESIGN.md).
        mqtt=MqttSettings(url=mosquitto.url, client_id="e2e-agg", share_group=f"e2e-{tmp_path.name}"[:60]),
        influx=InfluxSettings(url=influxdb.url, database=database),
    )
    agents, accepted, drained = _run_fleet(mosquitto.url, "auto", cfg, model_dir, tmp_path / "dev")

    # Read the readings back with a plain InfluxQL query, not through our store.
    rows = influx_rows(influxdb, database, agents)
    check_delivery(agents, accepted, drained, rows, influx_counts(influxdb, database))


def test_loop_through_embedded_broker_and_sqlite(model_dir, tmp_path):
    from aggregator.embedded_broker import EmbeddedBroker
    from aggregator.service import AggregatorConfig, MqttSettings
    from aggregator.stores import make_store

    with EmbeddedBroker(data_dir=str(tmp_path / "broker")) as broker:
        caps = broker.capabilities
        protocol = "5" if caps.mqtt5 else "3.1.1"
        cfg = AggregatorConfig(
            data_dir=str(tmp_path / "agg"),
            mqtt=MqttSettings(url=broker.url, protocol=protocol, client_id="e2e-agg",
                              share_group="edgeloop" if caps.shared_subscriptions else None,
                              receive_maximum=caps.receive_maximum),
        )
        agents, accepted, drained = _run_fleet(broker.url, protocol, cfg, model_dir, tmp_path / "dev")

    with make_store(sqlite_path=str(tmp_path / "agg" / "aggregator" / "store.sqlite")) as store:
        rows = [r for a in agents for r in store.telemetry(a.device)]
        counts = {kind: store.count(kind) for kind in ("features", "inference")}
    check_delivery(agents, accepted, drained, rows, counts)
