"""Model distribution end to end (issue 5): train -> sign -> registry -> offer -> devices.

All real: the session Mosquitto, an in-process aggregator (embedded SQLite store) with its
:class:`aggregator.ota.ModelDistributor`, and real agents with their ``ModelReceiver``. Each test
uses a profile and device ids of its own, because retained offers and desired models outlive a
test on the session broker.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from pathlib import Path

import pytest

from edgeloop import wire, wire_models
from tests.waiting import wait_until

pytestmark = pytest.mark.mosquitto

CHUNK = 4096  # small chunks, so that a tiny model still spans many


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from models.signing import generate_keypair

    good = generate_keypair(tmp_path_factory.mktemp("good-key"))
    wrong = generate_keypair(tmp_path_factory.mktemp("wrong-key"))
    return {"private": good[0], "public": good[1], "wrong": wrong[0]}


@pytest.fixture(scope="module")
def forest():
    """A tiny isolation forest (fast to train), as ONNX bytes and an unsigned manifest."""
    from models import training

    X, names = training.simulated_training_set("machine", seed=3, windows=300, window_len=50)
    return training.train_isolation_forest(X, names, version="0", profile="p", seed=3, n_estimators=15)


def _signed(forest, profile: str, version: str, key):
    import msgspec

    from models.signing import sign

    onnx_bytes, manifest = forest
    return onnx_bytes, sign(msgspec.structs.replace(manifest, version=version, profile=profile), onnx_bytes, key)


class Rig:
    """An aggregator on the session broker plus agents in threads, all stopped by :meth:`close`."""

    def __init__(self, mosquitto, tmp: Path, keys, forest) -> None:
        from aggregator.service import Aggregator, AggregatorConfig, ModelsSettings, MqttSettings
        from models.training import write_model

        self.name = uuid.uuid4().hex[:10]
        self.profile = f"ota{self.name}"
        self.tmp, self.keys, self.forest, self.url = tmp, keys, forest, mosquitto.url
        cfg = AggregatorConfig(
            data_dir=str(tmp / "agg"),
            mqtt=MqttSettings(url=mosquitto.url, client_id=f"agg-{self.name}", share_group=f"g-{self.name}"),
            models=ModelsSettings(chunk_size=CHUNK),
        )
        self.agg = Aggregator(cfg)
        self.agg.ota.coalesce_s = 0.5
        self.base_dir = write_model(tmp / "base", *_signed(forest, self.profile, "1.0.0", keys["private"]))
        self.accepted: list = []
        self.threads: dict[str, tuple[threading.Thread, threading.Event, object]] = {}
        self.agg.start()

    def add_model(self, version: str, key=None) -> None:
        self.agg.models.add(*_signed(self.forest, self.profile, version, key or self.keys["private"]))

    def agent(self, k: int):
        from edge_agent.agent import Agent
        from edge_agent.config import AgentConfig, ModelSettings, MqttSettings, SamplingSettings, SourceSettings

        cfg = AgentConfig(
            device_id=f"{self.name}-{k}", profile=self.profile, data_dir=str(self.tmp / "dev"),
            model_dir=str(self.base_dir), mqtt=MqttSettings(url=self.url),
            sampling=SamplingSettings(rate_hz=10.0, batch_s=1.0, window_s=5.0, speed=20.0),
            source=SourceSettings(name="simulated", options={"profile": "machine", "seed": k, "rate_hz": 10.0}),
            models=ModelSettings(public_key_file=str(self.keys["public"]), rerequest_after_s=1.0),
        )
        return Agent(cfg, on_accept=self.accepted.append)

    def start(self, agent) -> None:
        stop = threading.Event()
        thread = threading.Thread(target=agent.run, args=(stop,), kwargs={"drain_timeout": 20.0}, daemon=True)
        self.threads[agent.device] = (thread, stop, agent)
        thread.start()
        wait_until(lambda: agent._link is not None and agent._link.connected, 15, f"{agent.device} connected")

    def stop(self, device: str) -> None:
        thread, stop, _ = self.threads.pop(device)
        stop.set()
        thread.join(60)
        assert not thread.is_alive(), f"agent {device} did not stop"

    def state(self, device: str, version: str):
        record = self.agg.registry.get(device)
        return record.deployments.get(version) if record is not None else None

    def wait_state(self, devices, version: str, state: str, timeout: float = 30.0) -> None:
        for d in devices:
            wait_until(lambda: getattr(self.state(d, version), "state", None) == state, timeout,
                       f"{d} to report {version} {state} (now {self.state(d, version)})")

    def close(self) -> None:
        for device in list(self.threads):
            self.stop(device)
        for offer in self.agg.ota.offers():  # the session broker keeps retained offers otherwise
            self.agg.ota.retire(offer.profile, offer.version)
        self.agg.ota.flush(10)
        self.agg.stop(forget_session=True)


@pytest.fixture
def rig(mosquitto, tmp_path, keys, forest):
    r = Rig(mosquitto, tmp_path, keys, forest)
    try:
        yield r
    finally:
        r.close()


def _stored_seqs(rig) -> set[tuple[str, int]]:
    with sqlite3.connect(rig.tmp / "agg" / "aggregator" / "store.sqlite") as db:
        return {
            (device, seq)
            for table in ("telemetry", "features", "inference", "alerts", "deployments")
            for device, seq in db.execute(f"SELECT DISTINCT device, seq FROM {table}")
        }


def test_shadow_then_champion_offline_device_refused_model_and_no_data_lost(rig):
    rig.add_model("1.1.0")
    agents = [rig.agent(k) for k in range(3)]
    for a in agents:
        rig.start(a)
    devices = [a.device for a in agents]
    assert all(a.model.version == "1.0.0" for a in agents)

    for d in devices:  # devices subscribe to the version's topics, then it is broadcast once
        rig.agg.ota.set_desired(d, champion=None, shadow="1.1.0")
    offer = rig.agg.ota.offer(rig.profile, "1.1.0")
    assert offer.chunks > 3 and offer.manifest == (rig.agg.models.get(rig.profile, "1.1.0").path / "manifest.json").read_text()
    rig.wait_state(devices, "1.1.0", "shadow")
    assert all(a.shadow.version == "1.1.0" and a.model.version == "1.0.0" for a in agents)
    wait_until(lambda: all(a.stats.shadow_inferences > 0 for a in agents), 20, "shadow scores")
    assert rig.agg.ota.counts(rig.profile, "1.1.0")[0] >= offer.chunks

    for d in devices:
        rig.agg.ota.set_desired(d, champion="1.1.0", shadow=None)
    rig.wait_state(devices, "1.1.0", "active")
    assert all(a.model.version == "1.1.0" and a.shadow is None for a in agents)
    wait_until(lambda: all(rig.agg.registry.get(d).model_version == "1.1.0" for d in devices), 20,
               "status model_version 1.1.0")

    # A device that was offline during the broadcast: the retained desired models and offer wait
    # for it, and it asks for every chunk.
    late = rig.agent(3)
    _, resent_before = rig.agg.ota.counts(rig.profile, "1.1.0")
    rig.agg.ota.set_desired(late.device, champion="1.1.0", shadow=None)
    rig.start(late)
    rig.wait_state([late.device], "1.1.0", "active")
    assert late.model.version == "1.1.0"
    resent = rig.agg.ota.counts(rig.profile, "1.1.0")[1] - resent_before
    assert 1 <= resent <= offer.chunks + 1, resent

    # A model signed by another key is refused, said so with its reason, and never serves.
    rig.add_model("1.2.0", key=rig.keys["wrong"])
    rig.agg.ota.offer(rig.profile, "1.2.0")
    rig.agg.ota.set_desired(devices[0], champion="1.2.0", shadow=None)
    rig.wait_state(devices[:1], "1.2.0", "rejected")
    assert rig.state(devices[0], "1.2.0").reason.startswith("bad-signature: ")
    scored = agents[0].stats.inferences
    wait_until(lambda: agents[0].stats.inferences > scored + 2, 20, "the old champion to keep scoring")
    assert agents[0].model.version == "1.1.0"

    # Nothing of the data stream was lost meanwhile: every accepted message is stored.
    for d in list(rig.threads):
        rig.stop(d)
    accepted = {(m.device, m.seq) for m in rig.accepted if type(m) is not wire.Status}
    assert any(type(m) is wire.Deployment for m in rig.accepted)
    wait_until(lambda: accepted <= _stored_seqs(rig), 20, "every accepted message stored")
    assert not accepted - _stored_seqs(rig)


def test_interrupted_download_fetches_only_the_missing_chunks_and_restart_keeps_the_model(rig):
    from edge_agent.ota import ModelReceiver
    from models import features

    rig.add_model("1.1.0")
    offer = rig.agg.ota.offer(rig.profile, "1.1.0")  # broadcast to nobody yet
    assert rig.agg.ota.flush(20)
    agent = rig.agent(0)
    # Half of the chunks are on disk already, as after a download cut half-way.
    data = rig.agg.models.get(rig.profile, "1.1.0").onnx_bytes()
    receiver = ModelReceiver(agent.state_dir / "ota", profile=rig.profile, public_key=Path(rig.keys["public"]).read_bytes(),
                             feature_set=features.FEATURE_SET, feature_names=features.feature_names(agent.channels))
    receiver.on_offer(offer)
    half = offer.chunks // 2
    for i in range(half):
        assert receiver.on_chunk("1.1.0", i, data[i * CHUNK : (i + 1) * CHUNK])
    receiver.flush()
    del receiver
    agent = rig.agent(0)  # a fresh agent (the first one's receiver read the disk before the chunks were there)

    sent_before, resent_before = rig.agg.ota.counts(rig.profile, "1.1.0")
    rig.agg.ota.set_desired(agent.device, champion="1.1.0", shadow=None)
    rig.start(agent)
    rig.wait_state([agent.device], "1.1.0", "active")
    resent = rig.agg.ota.counts(rig.profile, "1.1.0")[1] - resent_before
    assert offer.chunks - half <= resent <= offer.chunks - half + 1, (resent, offer.chunks, half)

    # A restart serves the downloaded champion again, before any message arrives.
    rig.stop(agent.device)
    again = rig.agent(0)
    assert again.model.version == "1.1.0"


def test_chunk_requests_coalesce_and_malformed_ones_are_quarantined(rig):
    import time

    from edgeloop.mqtt import MqttLink

    rig.add_model("1.1.0")
    offer = rig.agg.ota.offer(rig.profile, "1.1.0")
    assert rig.agg.ota.flush(20)
    req = wire_models.ChunkRequest(v=1, device=f"{rig.name}-x", profile=rig.profile, version="1.1.0",
                                   missing=[(0, 1)], ts=time.time())
    time.sleep(rig.agg.ota.coalesce_s)  # the broadcast itself must not coalesce these
    assert rig.agg.ota.handle_chunk_request(req) == 2
    assert rig.agg.ota.handle_chunk_request(req) == 0  # queued or just sent: merged
    assert rig.agg.ota.requests_unknown == 0
    assert rig.agg.ota.flush(20)
    assert rig.agg.ota.counts(rig.profile, "1.1.0") == (offer.chunks + 2, 2)

    link = MqttLink(rig.url, f"probe-{rig.name}")
    link.start()
    try:
        quarantined = rig.agg.quarantine.total()
        assert link.publish(wire_models.chunkreq_topic(f"{rig.name}-x"), b'{"type": "chunkreq"', qos=1)
        assert link.publish(wire_models.chunkreq_topic(f"{rig.name}-x"), wire.encode(req), qos=1)
        wait_until(lambda: rig.agg.quarantine.total() == quarantined + 1, 20, "the malformed request quarantined")
        wait_until(lambda: rig.agg.ingest.stats.chunk_requests >= 1, 20, "the valid request handed on")
        assert rig.agg.quarantine.recent(1)[0]["reason"] == "malformed"
    finally:
        link.stop()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("influxdb", marks=pytest.mark.influxdb)])
def test_deployments_are_stored_by_both_stores(backend, request, tmp_path):
    """Two states reported within one microsecond both stay (InfluxDB would overwrite one point)."""
    import time

    from aggregator.stores import InfluxStore, SQLiteStore

    if backend == "sqlite":
        store = SQLiteStore(str(tmp_path / "s.sqlite"))
    else:
        server = request.getfixturevalue("influxdb")
        store = InfluxStore(server.url, server.new_database("ota"))
    store.open()
    try:
        head = dict(v=1, device="dep-1", ts=round(time.time()) + 0.0000001, profile="p", model_version="1.1.0")
        outcome = store.write([wire.Deployment(**head, seq=1, state="verified", chunks_have=9, chunks_total=9),
                               wire.Deployment(**head, seq=2, state="active")])
        assert not outcome.rejected
        assert store.count("deployment") == 2 and store.count("deployment", "dep-1") == 2
    finally:
        store.close()


def test_key_rotation_signed_by_the_current_key_lets_models_signed_by_the_new_key_in(rig, keys, tmp_path):
    """The aggregator rotates the signing key through a message signed by the key devices hold;
    a rotation signed by any other key is refused and the device keeps trusting its key."""
    from models.signing import generate_keypair

    agent = rig.agent(0)
    rig.start(agent)
    held = agent.updates.receiver.public_key
    new_private, new_public = generate_keypair(tmp_path / "next-key")

    # Signed by a key the device does not hold: refused, nothing changes.
    rig.agg.ota.rotate_key(rig.profile, Path(new_public).read_bytes(), "k-forged", keys["wrong"])
    assert rig.agg.ota.flush(20)
    rig.add_model("1.1.0", key=new_private)
    rig.agg.ota.offer(rig.profile, "1.1.0")
    rig.agg.ota.set_desired(agent.device, champion="1.1.0", shadow=None)
    rig.wait_state([agent.device], "1.1.0", "rejected")
    assert rig.state(agent.device, "1.1.0").reason.startswith("bad-signature: ")
    assert agent.updates.receiver.public_key == held and agent.model.version == "1.0.0"

    # Signed by the current key: the device trusts the new one, and a model it signed serves.
    rig.agg.ota.rotate_key(rig.profile, Path(new_public).read_bytes(), "k2", keys["private"])
    wait_until(lambda: agent.updates.receiver.public_key == Path(new_public).read_bytes(), 20, "the key rotated")
    rig.add_model("1.2.0", key=new_private)
    rig.agg.ota.offer(rig.profile, "1.2.0")
    rig.agg.ota.set_desired(agent.device, champion="1.2.0", shadow=None)
    rig.wait_state([agent.device], "1.2.0", "active")
    assert agent.model.version == "1.2.0"
    # Leave no retained key behind on the session broker (the profile is this test's own anyway).
    assert rig.agg.ingest.link.publish(wire_models.key_topic(rig.profile), b"", qos=1, retain=True)


def test_a_version_with_a_build_suffix_travels_although_plus_is_an_mqtt_wildcard(rig):
    """Rollback entries are named ``<version>+rollback.<n>``; ``+`` may not appear in a topic name,
    so versions travel as ``~`` in topics and the device still gets and serves the model."""
    version = "1.1.0+rollback.1"
    assert "+" not in wire_models.version_filter(rig.profile, version).replace("/#", "")
    rig.add_model(version)
    agent = rig.agent(0)
    rig.start(agent)
    rig.agg.ota.set_desired(agent.device, champion=version, shadow=None)
    rig.agg.ota.offer(rig.profile, version)
    rig.wait_state([agent.device], version, "active")
    assert agent.model.version == version
