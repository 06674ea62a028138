"""edge_agent.updates.ModelUpdates, driven through its loop-thread entry point ``handle``.

Real parts without a broker: a real Agent (its outbox records every ``deployment`` report), a
real :class:`edge_agent.ota.ModelReceiver` on disk and real ONNX models of a tiny isolation
forest. The MQTT side (chunks, chunk requests, unsubscribing after a download) runs end to end
in tests/test_ota.py and tests/test_rollout_e2e.py; MqttLink.unsubscribe is checked here against
the session Mosquitto.
"""

from __future__ import annotations

import hashlib
import time

import msgspec
import pytest

from edgeloop import wire, wire_models

PROFILE = "machine"


@pytest.fixture(scope="module")
def forest():
    """A tiny isolation forest on the simulated machine's features (ONNX bytes, manifest)."""
    from models import training

    X, names = training.simulated_training_set("machine", seed=4, windows=200, window_len=50)
    return training.train_isolation_forest(X, names, version="0", profile=PROFILE, seed=4, n_estimators=5)


def _offer(onnx: bytes, manifest_json: str, version: str, chunk_size: int = 1 << 20) -> wire_models.ModelOffer:
    chunks = [onnx[i:i + chunk_size] for i in range(0, len(onnx), chunk_size)]
    return wire_models.ModelOffer(
        v=wire.SCHEMA_VERSION, profile=PROFILE, version=version, manifest=manifest_json, size=len(onnx),
        sha256=hashlib.sha256(onnx).hexdigest(), chunk_size=chunk_size,
        chunk_sha256=[hashlib.sha256(c).hexdigest() for c in chunks], ts=time.time())


def _manifest_json(forest, version: str) -> str:
    onnx, manifest = forest
    return msgspec.json.encode(msgspec.structs.replace(manifest, version=version, profile=PROFILE)).decode()


@pytest.fixture
def make_agent(tmp_path):
    """An Agent with a profile (so it has ModelUpdates) and an open outbox; no broker needed."""
    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig, ModelSettings, MqttSettings, SamplingSettings
    from tests.services import free_port

    agents = []

    def make(allow_unsigned: bool = True, device: str = "upd-0", model_dir=None):
        accepted: list = []
        cfg = AgentConfig(device_id=device, profile=PROFILE, data_dir=str(tmp_path / "dev"), model_dir=model_dir,
                          mqtt=MqttSettings(url=f"mqtt://127.0.0.1:{free_port()}", protocol="5"),
                          sampling=SamplingSettings(rate_hz=10.0, batch_s=1.0, window_s=5.0),
                          models=ModelSettings(allow_unsigned=allow_unsigned))
        agent = Agent(cfg, on_accept=accepted.append)
        agent.open(connect_timeout=0.1)  # nothing listens there: the outbox works, the link retries
        agents.append(agent)
        return agent, accepted

    def close(agent) -> None:  # a restart within a test
        agents.remove(agent)
        agent.close(0)

    make.close = close
    yield make
    for agent in agents:
        agent.close(0)


def _desired(agent, revision: int, champion=None, shadow=None) -> None:
    agent.updates.handle("desired", wire_models.DesiredModels(
        v=wire.SCHEMA_VERSION, device=agent.device, revision=revision, champion=champion, shadow=shadow,
        ts=time.time()))


def _reports(accepted, version: str) -> list[tuple[str, str]]:
    return [(m.state, m.reason) for m in accepted if isinstance(m, wire.Deployment) and m.model_version == version]


def test_final_reasons_are_the_refusal_codes_that_cannot_change_later():
    from edge_agent.ota import REASONS
    from edge_agent.updates import FINAL_REASONS

    assert FINAL_REASONS <= set(REASONS)
    assert set(REASONS) - FINAL_REASONS == {"no-key", "too-large", "denied"}


def test_a_refusal_for_a_missing_key_is_not_final_a_bad_manifest_is(forest, make_agent):
    agent, accepted = make_agent(allow_unsigned=False)  # no key held: every signed model is refused
    onnx, _ = forest
    _desired(agent, 1, champion="2.0.0")
    assert "2.0.0" in agent.updates.wanted
    agent.updates.handle("offer", _offer(onnx, _manifest_json(forest, "2.0.0"), "2.0.0"))
    [(state, reason)] = _reports(accepted, "2.0.0")
    assert state == "rejected" and reason.startswith("no-key: ")
    assert agent.updates.receiver.denied("2.0.0") is None  # a rotated-in key may accept it later
    assert "2.0.0" not in agent.updates.wanted  # no more fetching until the cloud asks again
    _desired(agent, 2, champion="2.0.0")
    assert "2.0.0" in agent.updates.wanted  # ... which it may

    _desired(agent, 3, champion="3.0.0")
    agent.updates.handle("offer", _offer(onnx, '{"version": "3.0.0"}', "3.0.0"))
    [(state, reason)] = _reports(accepted, "3.0.0")
    assert state == "rejected" and reason.startswith("bad-manifest: ")
    assert agent.updates.receiver.denied("3.0.0") == reason  # final: never fetched again
    _desired(agent, 4, champion="3.0.0")
    assert "3.0.0" not in agent.updates.wanted
    assert _reports(accepted, "3.0.0")[-1] == ("rejected", f"denied: {reason}")


def test_a_disk_too_small_is_not_final(forest, make_agent):
    agent, accepted = make_agent()
    onnx, _ = forest
    agent.updates.receiver.max_model_bytes = len(onnx) - 1
    _desired(agent, 1, champion="2.0.0")
    agent.updates.handle("offer", _offer(onnx, _manifest_json(forest, "2.0.0"), "2.0.0"))
    [(state, reason)] = _reports(accepted, "2.0.0")
    assert state == "rejected" and reason.startswith("too-large: ")
    assert agent.updates.receiver.denied("2.0.0") is None


def _install(agent, forest, version: str) -> None:
    onnx, _ = forest
    offer = _offer(onnx, _manifest_json(forest, version), version, chunk_size=4096)
    rx = agent.updates.receiver
    rx.on_offer(offer)
    for i in range(offer.chunks):
        assert rx.on_chunk(version, i, onnx[i * 4096:(i + 1) * 4096])
    rx.install(version, current=None)


def test_switching_to_an_installed_version_applies_the_version_policy(forest, make_agent):
    agent, accepted = make_agent()
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        _install(agent, forest, version)
    _desired(agent, 1, champion="2.0.0")
    assert agent.model.version == "2.0.0" and _reports(accepted, "2.0.0")[-1] == ("active", "")
    _desired(agent, 2, champion="1.0.0")  # older, and not a signed rollback of 2.0.0: refused
    assert agent.model.version == "2.0.0"
    state, reason = _reports(accepted, "1.0.0")[-1]
    assert state == "rejected" and reason.startswith("older-version: ")
    _desired(agent, 3, champion="3.0.0")  # newer: serves
    assert agent.model.version == "3.0.0" and _reports(accepted, "3.0.0")[-1] == ("active", "")


def test_restore_serves_again_what_was_served_without_the_version_policy(forest, make_agent, tmp_path):
    from models.training import write_model

    onnx, manifest = forest
    built_in = write_model(tmp_path / "built-in", onnx, msgspec.structs.replace(manifest, version="5.0.0"))
    agent, _ = make_agent(model_dir=str(built_in))
    _install(agent, forest, "2.0.0")
    agent.updates._serve("champion", agent.updates.receiver.load_installed("2.0.0"))  # as a signed rollback would
    make_agent.close(agent)
    again, _ = make_agent(model_dir=str(built_in))  # the same device restarts with its 5.0.0 built in
    assert again.model.version == "2.0.0"  # older than 5.0.0, served again all the same


@pytest.mark.mosquitto
def test_mqtt_link_unsubscribe(mosquitto):
    import queue
    import uuid

    from edgeloop.mqtt import MqttError, MqttLink, parse_mqtt_url

    got: queue.Queue = queue.Queue()
    link = MqttLink(parse_mqtt_url(mosquitto.url), client_id=f"unsub-{uuid.uuid4().hex[:8]}",
                    on_message=lambda msg: got.put(msg.payload), on_connect=lambda: None)
    with pytest.raises(MqttError, match="unsubscribe before start"):
        link.unsubscribe("x/#")
    topic = f"test/unsub/{uuid.uuid4().hex}"
    link.start(timeout=15)
    try:
        link.subscribe(topic, qos=1)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # until the subscription is in place
            link.publish(topic, b"one", qos=1)
            try:
                assert got.get(timeout=0.5) == b"one"
                break
            except queue.Empty:
                continue
        else:
            pytest.fail("the subscription never delivered")
        link.unsubscribe(topic)
        marker = f"{topic}-marker"
        link.subscribe(marker, qos=1)  # the broker handles one client's packets in order: once
        deadline = time.monotonic() + 15  # the marker arrives, "two" had its chance to arrive too
        seen: list[bytes] = []
        while b"marker" not in seen and time.monotonic() < deadline:
            link.publish(topic, b"two", qos=1)
            link.publish(marker, b"marker", qos=1)
            try:
                seen.append(got.get(timeout=0.5))
            except queue.Empty:
                pass
        assert b"marker" in seen, "the marker subscription never delivered"
        while not got.empty():
            seen.append(got.get_nowait())
        assert b"two" not in seen  # every "two" was published after the unsubscribe
    finally:
        link.stop()


def test_a_retained_offer_asks_for_its_chunks_at_once_a_live_one_waits(forest, mosquitto, tmp_path):
    """A retained offer reached us on our subscription, after its broadcast: no chunk will come
    unasked, so the chunk request goes out at once (it used to wait ``rerequest_after_s``, which
    cost every wave of a promotion that second). A live offer's chunks follow it: no request."""
    import uuid

    from paho.mqtt.client import MQTTMessage

    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig, ModelSettings, MqttSettings, SamplingSettings
    from tests.waiting import wait_until

    onnx, _ = forest
    cfg = AgentConfig(device_id=f"upd-{uuid.uuid4().hex[:6]}", profile=PROFILE, data_dir=str(tmp_path / "dev"),
                      mqtt=MqttSettings(url=mosquitto.url, protocol="5"),
                      sampling=SamplingSettings(rate_hz=10.0, batch_s=1.0, window_s=5.0),
                      models=ModelSettings(allow_unsigned=True, rerequest_after_s=60.0))
    agent = Agent(cfg, on_accept=lambda m: None)
    agent.open(connect_timeout=15)
    try:
        wait_until(lambda: agent._link is not None and agent._link.connected, timeout=30, what="agent connected")
        u = agent.updates
        for version, retain in (("2.0.0", False), ("3.0.0", True)):
            offer = _offer(onnx, _manifest_json(forest, version), version, chunk_size=1024)
            msg = MQTTMessage(topic=wire_models.offer_topic(PROFILE, version).encode())
            msg.payload, msg.retain = wire.encode(offer), retain
            event, decoded = u.classify(msg)
            assert event == ("retained-offer" if retain else "offer") and decoded.version == version
            _desired(agent, u.revision + 1, champion=version)
            u.handle(event, decoded)
            u.tick(time.monotonic())  # within rerequest_after_s of the offer: no re-request yet
            assert (u.wanted[version].requests, u.chunk_requests) == ((1, 1) if retain else (0, 0)), version
    finally:
        agent.close(0)
