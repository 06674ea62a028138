"""The first loop, all real: simulated source -> agent features + ONNX scores -> outbox -> MQTT
-> aggregator -> store -> delivery confirmation -> outbox drained.

Afterwards the store is read back directly and every (device, sequence, index) and value is
compared with what the agents recorded as accepted: none missing, none doubled, none altered.
The same test runs through real Mosquitto + InfluxDB 1.6.7 and through the embedded broker +
embedded SQLite store.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from edgeloop import wire

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from models import training

    X, names = training.simulated_training_set("machine", seed=7, windows=600, window_len=50, rate_hz=10.0)
    onnx_bytes, manifest = training.train_isolation_forest(X, names, version="0.1.0", profile="machine", seed=7,
                                                           n_estimators=50)
    return training.write_model(tmp_path_factory.mktemp("model"), onnx_bytes, manifest)


def _run_fleet(mqtt_url, protocol, agg_cfg, model_dir, data_dir, devices=3, seconds=4.0):
    from aggregator.service import Aggregator
    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig, MqttSettings, SamplingSettings, SourceSettings
    from edge_agent.inference import Model

    aggregator = Aggregator(agg_cfg)
    aggregator.start()
    accepted: list[wire.Struct] = []
    lock = threading.Lock()

    def record(msg):
        with lock:
            accepted.append(msg)

    agents = []
    for k in range(devices):
        cfg = AgentConfig(
            device_id=f"e2e-{k}",
            data_dir=str(data_dir),
            mqtt=MqttSettings(url=mqtt_url, protocol=protocol),
            # 10 Hz device clock run 20x faster: 200 readings per second per device.
            sampling=SamplingSettings(rate_hz=10.0, batch_s=1.0, window_s=5.0, speed=20.0),
            source=SourceSettings(name="simulated", options={"profile": "machine", "seed": k, "rate_hz": 10.0}),
        )
        agents.append(Agent(cfg, model=Model.load(model_dir), on_accept=record))
    stop = threading.Event()
    drained = {}

    def run(agent):
        try:
            drained[agent.device] = agent.run(stop, drain_timeout=30)
        except BaseException as exc:  # shown in the assertion, not lost in a thread
            drained[agent.device] = exc

    threads = [threading.Thread(target=run, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    aggregator.stop()
    return agents, accepted, drained, aggregator


def _expected_readings(accepted):
    expected = {}
    for msg in accepted:
        if isinstance(msg, wire.Telemetry):
            for idx, r in enumerate(msg.readings):
                values = {c: v for c, v in zip(msg.channels, r.values) if v is not None}
                expected[(msg.device, msg.seq, idx)] = (round(r.t * 1e6), values)
    return expected


def _check(agents, accepted, drained, stored_rows, stored_counts):
    assert all(v is True for v in drained.values()) and len(drained) == len(agents), f"not drained: {drained}"
    assert all(a.outbox_depth == 0 for a in agents)
    expected = _expected_readings(accepted)
    assert len(expected) > 1000
    keys = Counter((r.device, r.seq, r.idx) for r in stored_rows)
    doubled = [k for k, n in keys.items() if n > 1]
    assert not doubled, f"doubled readings: {doubled[:5]}"
    missing = set(expected) - set(keys)
    extra = set(keys) - set(expected)
    assert not missing, f"{len(missing)} readings missing, e.g. {sorted(missing)[:5]}"
    assert not extra, f"{len(extra)} readings nobody sent, e.g. {sorted(extra)[:5]}"
    altered = [
        (r.device, r.seq, r.idx)
        for r in stored_rows
        if (round(r.t * 1e6), {k: v for k, v in r.values.items() if v is not None})
        != expected[(r.device, r.seq, r.idx)]
    ]
    assert not altered, f"{len(altered)} readings altered, e.g. {altered[:5]}"
    # Features and inferences arrived exactly once too.
    for kind in ("features", "inference"):
        sent = sum(1 for m in accepted if type(m).__name__.lower() == kind)
        assert sent > 0
        assert stored_counts[kind] == sent, kind


@pytest.mark.mosquitto
@pytest.mark.influxdb
def test_loop_through_mosquitto_and_influxdb(mosquitto, influxdb, model_dir, tmp_path):
    from aggregator.service import AggregatorConfig, InfluxSettings, MqttSettings
    from aggregator.stores import make_store

    database = influxdb.new_database("e2e")
    cfg = AggregatorConfig(
        data_dir=str(tmp_path / "agg"),
        mqtt=MqttSettings(url=mosquitto.url, client_id="e2e-agg"),
        influx=InfluxSettings(url=influxdb.url, database=database),
    )
    agents, accepted, drained, _ = _run_fleet(mosquitto.url, "auto", cfg, model_dir, tmp_path / "dev")

    # Read the readings back with a plain InfluxQL query, not through our store.
    rows = []
    for a in agents:
        result = influxdb.query(database, f"SELECT * FROM telemetry WHERE device = '{a.device}'", epoch="u")
        series = result["results"][0].get("series", [])
        for s in series:
            cols = s["columns"]
            for values in s["values"]:
                row = dict(zip(cols, values))
                rows.append(_Row.from_influx(row, a.source.channels))
    counts = {}
    for kind, measurement in (("features", "features"), ("inference", "inference")):
        res = influxdb.query(database, f"SELECT count(seq) FROM {measurement}")
        counts[kind] = res["results"][0]["series"][0]["values"][0][1]
    _check(agents, accepted, drained, rows, counts)


def test_loop_through_embedded_broker_and_sqlite(model_dir, tmp_path):
    from aggregator.embedded_broker import EmbeddedBroker
    from aggregator.service import AggregatorConfig, MqttSettings

    with EmbeddedBroker(data_dir=str(tmp_path / "broker")) as broker:
        caps = broker.capabilities
        protocol = "5" if caps.mqtt5 else "3.1.1"
        cfg = AggregatorConfig(
            data_dir=str(tmp_path / "agg"),
            mqtt=MqttSettings(url=broker.url, protocol=protocol, client_id="e2e-agg",
                              share_group="edgeloop" if caps.shared_subscriptions else None,
                              receive_maximum=caps.receive_maximum),
        )
        agents, accepted, drained, aggregator = _run_fleet(broker.url, protocol, cfg, model_dir, tmp_path / "dev")
    from aggregator.stores import make_store

    with make_store(sqlite_path=str(tmp_path / "agg" / "aggregator" / "store.sqlite")) as store:
        rows = [r for a in agents for r in store.telemetry(a.device)]
        counts = {kind: store.count(kind) for kind in ("features", "inference")}
    _check(agents, accepted, drained, rows, counts)


class _Row:
    __slots__ = ("device", "seq", "idx", "t", "values")

    @classmethod
    def from_influx(cls, row, channels):
        self = cls()
        self.device = row["device"]
        self.seq = row["seq"]
        self.idx = row["idx"]
        self.t = row["time"] / 1e6
        self.values = {c: row.get(c) for c in channels}
        return self
