"""The agent through what devices live through: kill -9 at random points, the broker gone for 30 s,
the disk cap reached while offline. Counted by (device, seq, idx), never hoped.

An observer subscribed to the device's uplink sees every payload the broker delivers, so a sequence
number reused for different content shows up as two different payloads under one number.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from edgeloop import wire
from edgeloop.mqtt import MqttLink
from tests.fleet import Fleet, train_model
from tests.waiting import wait_until as _wait

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]


class Observer:
    """Every uplink payload of some devices, by (device, seq), as the broker delivered them."""

    def __init__(self, url: str, name: str) -> None:
        self.payloads: dict[tuple[str, int], set[bytes]] = defaultdict(set)
        self.statuses: list[wire.Status] = []
        self._lock = threading.Lock()
        self.link = MqttLink(url, f"observer-{name}"[:60], on_message=self._on_message)
        self.link.start()
        self.link.subscribe(wire.uplink_filter())

    def _on_message(self, msg) -> None:
        if not msg.payload:
            return
        decoded = wire.decode(msg.topic, msg.payload)
        with self._lock:
            if isinstance(decoded, wire.Status):
                self.statuses.append(decoded)
            else:
                self.payloads[(decoded.device, decoded.seq)].add(bytes(msg.payload))

    def seqs(self, device: str) -> set[int]:
        with self._lock:
            return {seq for d, seq in self.payloads if d == device}

    def messages(self, device: str) -> list[wire.DeviceMessage]:
        with self._lock:
            return [wire.decode(wire.topic(device, _kind(p)), p) for (d, _), ps in self.payloads.items()
                    if d == device for p in ps]

    def stop(self) -> None:
        self.link.stop()


def _kind(payload: bytes) -> str:
    import json

    return json.loads(payload)["type"]


def _aggregator(url: str, data_dir: Path, name: str):
    from aggregator.service import Aggregator, AggregatorConfig, MqttSettings

    cfg = AggregatorConfig(data_dir=str(data_dir), mqtt=MqttSettings(
        url=url, client_id=f"agg-{name}"[:60], share_group=f"g-{name}"[:60]))
    agg = Aggregator(cfg)
    agg.start()
    return agg


def _stored_seqs(store, device: str) -> set[int]:
    return {r.seq for r in store.telemetry(device)}


def test_agent_killed_20_times_never_gaps_or_reuses_a_sequence_number(mosquitto, tmp_path):
    device = "kill9-dev"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "{device}"\ndata_dir = "{tmp_path / "state"}"\n'
        f'[mqtt]\nurl = "{mosquitto.url}"\n'
        "[sampling]\nrate_hz = 10.0\nbatch_s = 0.5\nwindow_s = 2.0\nspeed = 20.0\n"
        "[outbox]\nresend_after_s = 2.0\n"
    )
    observer = Observer(mosquitto.url, tmp_path.name)
    aggregator = _aggregator(mosquitto.url, tmp_path / "agg", tmp_path.name)
    rng = random.Random(20)

    def agent() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "edgeloop.cli", "agent", "--config", str(config)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    try:
        for _ in range(20):
            proc = agent()
            time.sleep(rng.uniform(0.4, 1.6))
            proc.kill()
            proc.wait(10)
        proc = agent()
        time.sleep(3.0)
        proc.send_signal(signal.SIGTERM)  # a clean stop drains the outbox for up to 5 s
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # the CLI dumps every thread's stack on SIGUSR1
            time.sleep(2)
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"the agent did not stop on SIGTERM; its stacks:\n{err.decode()[-6000:]}")
        assert proc.returncode in (0, -signal.SIGTERM), err.decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    from edge_agent.outbox import Outbox

    outbox = Outbox(tmp_path / "state" / "agent" / device / "outbox.sqlite")
    last = outbox.last_seq
    depth = outbox.depth
    outbox.close()
    try:
        assert last > 50, "the runs produced too little to prove anything"
        assert depth == 0, "the final run did not deliver everything"
        _wait(lambda: observer.seqs(device) == set(range(last + 1)), 10, "every sequence number to arrive")
        reused = {k: v for k, v in observer.payloads.items() if len(v) > 1}
        assert not reused, f"sequence numbers reused for different content: {sorted(reused)[:5]}"
        # What the broker delivered is exactly what is stored, reading by reading.
        msgs = observer.messages(device)
        expected = {(m.seq, i) for m in msgs if isinstance(m, wire.Telemetry) for i in range(len(m.readings))}
        _wait(lambda: aggregator.store.count("telemetry", device) == len(expected), 10, "the store to catch up")
        assert {(r.seq, r.idx) for r in aggregator.store.telemetry(device)} == expected
        assert aggregator.store.count("features", device) == sum(isinstance(m, wire.Features) for m in msgs)
    finally:
        aggregator.stop(forget_session=True)
        observer.stop()


def test_broker_down_30_s_then_back_loses_nothing_and_keeps_order(mosquitto_factory, tmp_path):
    from edge_agent.config import OutboxSettings

    broker = mosquitto_factory()
    aggregator = _aggregator(broker.url, tmp_path / "agg", tmp_path.name)
    model_dir = train_model(tmp_path / "model")
    try:
        with Fleet(broker.url, tmp_path / "dev", model_dir, devices=2, prefix="down30",
                   outbox=OutboxSettings(resend_after_s=2.0)) as fleet:
            fleet.wait_connected()
            time.sleep(1.0)
            broker.stop()
            accepted = len(fleet.accepted)
            time.sleep(30.0)
            assert len(fleet.accepted) > accepted + 100, "sampling must go on while the broker is away"
            broker.start()
            _wait(lambda: all(a._link.connected for a in fleet.agents) and aggregator.ingest.link.connected,
                  40, "reconnects")
            time.sleep(1.0)
            drained = fleet.stop()
    finally:
        aggregator.stop(forget_session=True)
    assert all(v is True for v in drained.values()), drained
    from aggregator.stores import make_store

    store = make_store(sqlite_path=str(tmp_path / "agg" / "aggregator" / "store.sqlite"))
    store.open()
    for agent in fleet.agents:
        sent = [(m.seq, i, r.t) for m in fleet.accepted if isinstance(m, wire.Telemetry) and m.device == agent.device
                for i, r in enumerate(m.readings)]
        rows = store.telemetry(agent.device)
        keys = [(r.seq, r.idx) for r in rows]
        assert len(keys) == len(set(keys)), "a reading stored twice"
        assert set(keys) == {(s, i) for s, i, _ in sent}, "readings missing or unknown"
        # In order: by sequence, the readings' times never go backwards.
        by_seq = sorted(rows, key=lambda r: (r.seq, r.idx))
        assert all(a.t <= b.t for a, b in zip(by_seq, by_seq[1:]))
    store.close()


def test_disk_cap_while_offline_drops_by_policy_and_reports_ranges(mosquitto_factory, tmp_path):
    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig, MqttSettings, OutboxSettings, SamplingSettings
    from tests.services import free_port

    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    device = "diskcap-dev"
    accepted: list = []
    cfg = AgentConfig(device_id=device, data_dir=str(tmp_path), mqtt=MqttSettings(url=url, protocol="5"),
                      sampling=SamplingSettings(rate_hz=50.0, batch_s=1.0, window_s=10.0, speed=20.0),
                      outbox=OutboxSettings(max_bytes=64 * 1024, resend_after_s=2.0))
    agent = Agent(cfg, on_accept=accepted.append)
    stop = threading.Event()
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("drained", agent.run(stop, drain_timeout=30)))
    thread.start()  # no broker at that port yet: the agent samples into its outbox
    try:
        _wait(lambda: len(agent.dropped_ranges) > 0 and sum(h - l + 1 for l, h in agent.dropped_ranges) > 20, 30,
              "the cap to be reached")
        broker = mosquitto_factory(port=port)
        observer = Observer(broker.url, tmp_path.name)
        aggregator = _aggregator(broker.url, tmp_path / "agg", tmp_path.name)
        _wait(lambda: agent._link.connected, 30, "the agent to connect")
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(60)
    try:
        assert result.get("drained") is True
        last = max(m.seq for m in accepted)
        dropped = set()
        for lo, hi in agent.dropped_ranges:
            dropped.update(range(lo, hi + 1))
        assert dropped and max(dropped) < last
        # The last status tells the cloud exactly what the policy dropped.
        reported = {s for st in observer.statuses for lo, hi in st.dropped for s in range(lo, hi + 1)}
        assert reported == dropped
        # Telemetry went first: every dropped number was a telemetry message.
        kinds = {m.seq: type(m).__name__ for m in accepted}
        assert {kinds[s] for s in dropped} == {"Telemetry"}
        # Stored + dropped covers every accepted number: nothing is unaccounted for. A message sent
        # before the policy dropped it may have been stored anyway (dropped means "given up on").
        stored = _stored_seqs(aggregator.store, device)
        features = {m.seq for m in accepted if isinstance(m, wire.Features)}
        assert stored | dropped | features == set(range(last + 1))
        assert dropped - stored, "the cap dropped nothing that had not already arrived"
    finally:
        aggregator.stop(forget_session=True)
        observer.stop()
