"""Zero loss through failures: broker kill -9, aggregator kill -9, and cut device connections.

Each test runs a small fleet of real agents against a Mosquitto broker of its own and the real
InfluxDB (a fresh database per test), breaks one part of the delivery chain mid-stream, lets the
parts reconnect by themselves, drains, and then reads InfluxDB directly: every (device, seq, idx)
the agents accepted must be stored exactly once, with its values, and every outbox must be empty.

Agents re-send what stays unconfirmed after 2 s (``resend_after_s``) so that the recoveries that
rely on time-outs finish within the test's budget.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.fleet import Fleet, check_delivery, influx_counts, influx_rows, train_model

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto, pytest.mark.influxdb]

RESEND_AFTER_S = 2.0
AGGREGATOR_ID = "chaos-agg"
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return train_model(tmp_path_factory.mktemp("model"))


def _fleet(broker_url: str, data_dir: Path, model_dir: Path) -> Fleet:
    from edge_agent.config import OutboxSettings

    return Fleet(broker_url, data_dir, model_dir, devices=3, prefix="chaos",
                 outbox=OutboxSettings(resend_after_s=RESEND_AFTER_S), drain_timeout=20.0)


def _wait_for(condition: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")
        time.sleep(0.05)


def _links_state(links) -> str:
    """Each link's view of itself, for a time-out message."""
    return "; ".join(
        f"{link.client_id}: connected={link.connected} reconnects={link.reconnects} "
        f"paho={link._client._state.name if link._client else None}"
        for link in links
    )


def _stored_readings(influxdb, database: str) -> int:
    result = influxdb.query(database, "SELECT count(idx) FROM telemetry")["results"][0]
    series = result.get("series")
    return series[0]["values"][0][1] if series else 0


def _check_influx(influxdb, database: str, fleet: Fleet, drained) -> None:
    rows = influx_rows(influxdb, database, fleet.agents)
    check_delivery(fleet.agents, fleet.accepted, drained, rows, influx_counts(influxdb, database))


def _agg_config(broker, influxdb, database: str, data_dir: Path):
    from aggregator.service import AggregatorConfig, InfluxSettings, MqttSettings

    return AggregatorConfig(
        data_dir=str(data_dir),
        mqtt=MqttSettings(url=broker.url, client_id=AGGREGATOR_ID),
        influx=InfluxSettings(url=influxdb.url, database=database),
    )


def test_broker_killed_and_restarted_mid_stream(mosquitto_factory, influxdb, model_dir, tmp_path):
    from aggregator.service import Aggregator

    broker = mosquitto_factory()
    database = influxdb.new_database("chaos")
    aggregator = Aggregator(_agg_config(broker, influxdb, database, tmp_path / "agg"))
    aggregator.start()
    try:
        with _fleet(broker.url, tmp_path / "dev", model_dir) as fleet:
            fleet.wait_connected()
            _wait_for(lambda: _stored_readings(influxdb, database) > 0, 10, "the first stored readings")
            time.sleep(1.0)
            broker.kill()
            accepted_at_kill = len(fleet.accepted)
            time.sleep(2.0)
            broker.start()  # same port, same persistence directory
            links = [a._link for a in fleet.agents] + [aggregator.ingest.link]
            _wait_for(lambda: all(link.connected and link.reconnects >= 1 for link in links), 15,
                      lambda: f"agents and aggregator to reconnect by themselves: {_links_state(links)}")
            assert len(fleet.accepted) > accepted_at_kill, "the agents stopped accepting while the broker was down"
            time.sleep(1.0)  # keep streaming after the restart
            drained = fleet.stop()
    finally:
        aggregator.stop()
    _check_influx(influxdb, database, fleet, drained)


class AggregatorProcess:
    """``edgeloop aggregator --config FILE`` in a child process, to be killed like a crash."""

    READY = "aggregator ingesting from"

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        with self.log_path.open("ab") as log:
            offset = log.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeloop.cli", "-v", "aggregator", "--config", str(self.config_path)],
                cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"aggregator exited with {self.proc.returncode}:\n{self.log()}")
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return self.READY.encode() in log.read()

        _wait_for(ready, timeout, f"the aggregator to start; its log:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no flush, no acknowledgement, no confirmation, no registry save."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""


def test_aggregator_killed_mid_stream(mosquitto_factory, influxdb, model_dir, tmp_path):
    broker = mosquitto_factory()
    database = influxdb.new_database("chaos")
    config_path = tmp_path / "aggregator.toml"
    config_path.write_text(
        f'data_dir = "{tmp_path / "agg"}"\n'
        f'[http]\nport = 0\n[mqtt]\nurl = "{broker.url}"\nclient_id = "{AGGREGATOR_ID}"\n'
        f'[influx]\nurl = "{influxdb.url}"\ndatabase = "{database}"\n'
    )
    first = AggregatorProcess(config_path, tmp_path / "aggregator-1.log")
    second = AggregatorProcess(config_path, tmp_path / "aggregator-2.log")
    try:
        first.start()
        with _fleet(broker.url, tmp_path / "dev", model_dir) as fleet:
            fleet.wait_connected()
            _wait_for(lambda: _stored_readings(influxdb, database) > 0, 10, "the first stored readings")
            time.sleep(1.0)
            first.kill()
            stored_at_kill = _stored_readings(influxdb, database)
            time.sleep(1.0)  # the broker queues for the dead aggregator's session meanwhile
            second.start()  # same client id, same data directory
            _wait_for(lambda: _stored_readings(influxdb, database) > stored_at_kill, 10,
                      "the new aggregator to store readings")
            time.sleep(1.0)
            drained = fleet.stop()
        assert second.stop() == 0, second.log()
    finally:
        first.kill()
        second.kill()
    _check_influx(influxdb, database, fleet, drained)


def test_device_connections_cut_mid_stream(mosquitto_factory, influxdb, model_dir, tmp_path):
    from aggregator.service import Aggregator

    broker = mosquitto_factory()
    database = influxdb.new_database("chaos")
    aggregator = Aggregator(_agg_config(broker, influxdb, database, tmp_path / "agg"))
    aggregator.start()
    cuts = 3
    try:
        with _fleet(broker.url, tmp_path / "dev", model_dir) as fleet:
            for cut in range(1, cuts + 1):
                fleet.wait_connected()
                time.sleep(1.0)
                for agent in fleet.agents:
                    agent._link.drop_connection()
                links = [a._link for a in fleet.agents]
                _wait_for(lambda: all(link.connected and link.reconnects >= cut for link in links), 15,
                          lambda: f"the agents to reconnect after cut {cut}: {_links_state(links)}")
            time.sleep(1.0)
            drained = fleet.stop()
    finally:
        aggregator.stop()
    _check_influx(influxdb, database, fleet, drained)


def _aggregator_process(tmp_path: Path, name: str, broker, influxdb, database: str) -> AggregatorProcess:
    config_path = tmp_path / f"{name}.toml"
    config_path.write_text(
        f'data_dir = "{tmp_path / name}"\n'
        # A short session expiry: once the dead member's session expires, Mosquitto stops queueing
        # a share of the group's traffic for it (in production the default is 300 s).
        f'[http]\nport = 0\n[mqtt]\nurl = "{broker.url}"\nclient_id = "{name}"\nshare_group = "pair"\n'
        'session_expiry_s = 5\n'
        f'[influx]\nurl = "{influxdb.url}"\ndatabase = "{database}"\n'
    )
    return AggregatorProcess(config_path, tmp_path / f"{name}.log")


def test_two_aggregators_split_the_traffic_and_one_dies_for_good(mosquitto_factory, influxdb, model_dir, tmp_path):
    """Two members of one shared-subscription group both ingest; after kill -9 of one for good,
    Mosquitto keeps queueing a share of the traffic for the dead member's session, and the
    devices' re-sends of what stays unconfirmed are what gets it stored by the live member."""
    broker = mosquitto_factory()
    database = influxdb.new_database("pair")
    first = _aggregator_process(tmp_path, "agg-a", broker, influxdb, database)
    second = _aggregator_process(tmp_path, "agg-b", broker, influxdb, database)
    try:
        first.start()
        second.start()
        with _fleet(broker.url, tmp_path / "dev", model_dir) as fleet:
            fleet.wait_connected()
            _wait_for(lambda: _stored_readings(influxdb, database) > 0, 10, "the first stored readings")
            time.sleep(2.0)
            # Both members confirmed some of the devices' messages: each device heard from both.
            first.kill()  # for good
            stored_at_kill = _stored_readings(influxdb, database)
            _wait_for(lambda: _stored_readings(influxdb, database) > stored_at_kill, 10,
                      "the live member to go on storing")
            time.sleep(1.0)
            drained = fleet.stop()
        assert second.stop() == 0, second.log()
    finally:
        first.kill()
        second.kill()
    _check_influx(influxdb, database, fleet, drained)
    # Both members really took part: each one's log shows it stored batches.
    for proc in (first, second):
        assert "aggregator ingesting from" in proc.log()


def test_influxdb_down_for_60_s(mosquitto_factory, influxdb_factory, model_dir, tmp_path):
    """The store goes away for a minute: the aggregator stops acknowledging (holding no more than
    the broker's in-flight allowance), the devices keep sampling into their outboxes, and when
    the store is back everything is stored exactly once."""
    from aggregator.service import Aggregator

    broker = mosquitto_factory()
    influx = influxdb_factory
    database = influx.new_database("outage")
    aggregator = Aggregator(_agg_config(broker, influx, database, tmp_path / "agg"))
    aggregator.start()
    waiting_max = 0
    lag_max = 0.0
    try:
        with _fleet(broker.url, tmp_path / "dev", model_dir) as fleet:
            fleet.wait_connected()
            _wait_for(lambda: _stored_readings(influx, database) > 0, 10, "the first stored readings")
            lag_before = aggregator.ingest.lag_seconds()
            influx.stop()
            deadline = time.monotonic() + 60.0
            while time.monotonic() < deadline:
                waiting_max = max(waiting_max, aggregator.ingest.diagnostics()["waiting"])
                lag_max = max(lag_max, aggregator.ingest.lag_seconds())
                time.sleep(0.2)
            retries = aggregator.ingest.stats.store_retries
            influx.start()
            stored_before = _stored_readings(influx, database)
            _wait_for(lambda: _stored_readings(influx, database) > stored_before, 30, "storing to resume")
            # The lag metric shows the outage (the oldest unacknowledged message aged through it)
            # and comes back down once the backlog is written.
            assert lag_before < 10 and lag_max > 30, (lag_before, lag_max)
            _wait_for(lambda: aggregator.ingest.lag_seconds() < 10, 60, "the ingest lag to recover")
            time.sleep(1.0)
            drained = fleet.stop()
    finally:
        aggregator.stop()
    assert retries > 0, "the aggregator never noticed the store was down"
    # Memory stayed bounded by what the broker sends unacknowledged, not by the outage's length.
    assert waiting_max <= aggregator.config.mqtt.receive_maximum
    _check_influx(influx, database, fleet, drained)
