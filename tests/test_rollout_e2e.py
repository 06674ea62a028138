"""Rollouts end to end: real Mosquitto, the real aggregator (ingest, fleet registry, model
registry, distributor) and three real agents scoring simulated windows.

A trained and signed challenger runs in shadow on a canary, passes the gate, is promoted in waves
and every agent ends up serving it; a worse challenger (it flags every window) is stopped at the
gate and no agent serves it. The gate and state machine are tested case by case, fast, in
tests/test_rollout.py.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import msgspec
import pytest

from tests.waiting import poll, wait_until

pytestmark = pytest.mark.mosquitto

CHUNK = 4096


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from models.signing import generate_keypair

    private, public = generate_keypair(tmp_path_factory.mktemp("rollout-key"))
    return {"private": private, "public": public}


@pytest.fixture(scope="module")
def forest():
    """A small isolation forest trained on simulated normal windows (ONNX bytes, unsigned manifest)."""
    from models import training

    X, names = training.simulated_training_set("machine", seed=5, windows=300, window_len=50)
    return training.train_isolation_forest(X, names, version="0", profile="p", seed=5, n_estimators=15)


class Rig:
    """Aggregator + rollout manager on the session broker, three agents in threads; :meth:`close` stops all."""

    def __init__(self, mosquitto, tmp: Path, keys, forest) -> None:
        from aggregator.rollout import RolloutManager
        from aggregator.rollout_gate import RolloutPolicy
        from aggregator.service import Aggregator, AggregatorConfig, ModelsSettings, MqttSettings
        from models.training import write_model

        self.name = uuid.uuid4().hex[:10]
        self.profile = f"ro{self.name}"
        self.tmp, self.keys, self.forest, self.url = tmp, keys, forest, mosquitto.url
        cfg = AggregatorConfig(
            data_dir=str(tmp / "agg"),
            mqtt=MqttSettings(url=mosquitto.url, client_id=f"agg-{self.name}", share_group=f"g-{self.name}"),
            models=ModelsSettings(chunk_size=CHUNK),
        )
        self.agg = Aggregator(cfg)
        self.agg.ota.coalesce_s = 0.5
        onnx_bytes, manifest = self.signed("1.0.0")
        self.agg.models.add(onnx_bytes, manifest)
        self.agg.models.promote(self.profile, "1.0.0")
        self.base_dir = write_model(tmp / "base", onnx_bytes, manifest)
        # Generous latency bounds: agents share two loaded cores with the rest of the suite.
        policy = RolloutPolicy(gate_windows=8, watch_windows=12, waves=[0.5, 1.0], latency_factor=5.0,
                               latency_slack_us=20_000.0, wave_timeout_s=120.0)
        self.rollouts = RolloutManager(self.agg.ota, self.agg.models, self.agg.registry, state_dir=tmp / "agg",
                                       policy=policy, signing_key=keys["private"])
        self.agg.ingest.observers.append(self.rollouts.observe)
        self.threads: dict[str, tuple[threading.Thread, threading.Event, object]] = {}
        self.agg.start()
        self.rollouts.serve(0.2)

    def signed(self, version: str, **changes):
        from models.signing import sign

        onnx_bytes, manifest = self.forest
        manifest = msgspec.structs.replace(manifest, version=version, profile=self.profile, **changes)
        return onnx_bytes, sign(manifest, onnx_bytes, self.keys["private"])

    def start_agent(self, k: int):
        from edge_agent.agent import Agent
        from edge_agent.config import AgentConfig, ModelSettings, MqttSettings, SamplingSettings, SourceSettings

        cfg = AgentConfig(
            device_id=f"{self.name}-{k}", profile=self.profile, data_dir=str(self.tmp / "dev"),
            model_dir=str(self.base_dir), mqtt=MqttSettings(url=self.url),
            sampling=SamplingSettings(rate_hz=10.0, batch_s=1.0, window_s=5.0, speed=20.0),
            source=SourceSettings(name="simulated", options={"profile": "machine", "seed": k, "rate_hz": 10.0}),
            models=ModelSettings(public_key_file=str(self.keys["public"]), rerequest_after_s=1.0),
        )
        agent = Agent(cfg)
        stop = threading.Event()
        thread = threading.Thread(target=agent.run, args=(stop,), kwargs={"drain_timeout": 20.0}, daemon=True)
        self.threads[agent.device] = (thread, stop, agent)
        thread.start()
        return agent

    def wait_state(self, state: str, timeout: float = 120.0, interval: float = 0.05) -> dict:
        if not poll(lambda: (self.rollouts.status(self.profile) or {}).get("state") == state, timeout, interval):
            raise AssertionError(f"timed out after {timeout} s waiting for the rollout to reach {state}; "
                                 f"it is {self.rollouts.status(self.profile)}")
        return self.rollouts.status(self.profile)

    def close(self) -> None:
        self.rollouts.close()
        for device, (thread, stop, _) in list(self.threads.items()):
            stop.set()
            thread.join(60)
            assert not thread.is_alive(), f"agent {device} did not stop"
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


def test_trained_challenger_goes_through_shadow_gate_and_waves_and_a_worse_one_is_stopped(rig):
    agents = [rig.start_agent(k) for k in range(3)]
    devices = sorted(a.device for a in agents)
    wait_until(lambda: {r.device for r in rig.agg.registry.devices() if r.profile == rig.profile
                        and r.state == "online"} == set(devices), 30, "three agents online")

    rig.agg.models.add(*rig.signed("1.1.0", parent_version="1.0.0"))
    status = rig.rollouts.start(rig.profile, "1.1.0", canary=1)
    assert status["canaries"] == devices[:1]
    wait_until(lambda: agents_by(agents, devices[0]).shadow is not None, 60, "the canary to run 1.1.0 in shadow")
    status = rig.wait_state("done")
    assert status["gate"]["passed"], status
    assert status["gate"]["stats"]["all"]["windows"] == 8 and status["gate"]["stats"]["all"]["agreement"] == 1.0
    assert status["waves"] == [devices[:1], devices[1:2], devices[2:]]
    assert rig.agg.models.champion(rig.profile) == "1.1.0"
    assert all(a.model.version == "1.1.0" and a.shadow is None for a in agents)
    assert all(rig.agg.registry.get(d).deployments["1.1.0"].state == "active" for d in devices)

    # A challenger that flags every window: stopped at the gate, never served.
    rig.agg.models.add(*rig.signed("1.2.0", parent_version="1.1.0", threshold=-1e9))
    rig.rollouts.start(rig.profile, "1.2.0", canary=1)
    status = rig.wait_state("rejected")
    assert any("above the cap" in r for r in status["reasons"]), status["reasons"]
    canary = agents_by(agents, status["canaries"][0])
    wait_until(lambda: canary.shadow is None, 30, "the canary to drop the rejected shadow")
    assert rig.agg.models.champion(rig.profile) == "1.1.0"
    assert all(a.model.version == "1.1.0" for a in agents)


def agents_by(agents, device):
    return next(a for a in agents if a.device == device)


def test_a_champion_whose_health_drops_after_promotion_is_rolled_back_by_a_signed_rollback(rig):
    """The challenger passes the gate and the waves; then, watched after promotion, its verdicts go
    bad (here a retained remote config lowers the devices' anomaly threshold, as a model meeting data
    it was not trained for would flag everything). Within ``watch_windows`` windows the watch sees the
    anomaly rate jump over the old champion's baseline and rolls back: a signed rollback entry of the
    previous model becomes the champion, every device serves it and reports the new one rolled_back."""
    from edgeloop import wire

    rig.rollouts.policy = msgspec.structs.replace(rig.rollouts.policy, watch_windows=150)
    agents = [rig.start_agent(k) for k in range(3)]
    devices = sorted(a.device for a in agents)
    wait_until(lambda: {r.device for r in rig.agg.registry.devices() if r.profile == rig.profile
                        and r.state == "online"} == set(devices), 30, "three agents online")

    rig.agg.models.add(*rig.signed("1.1.0", parent_version="1.0.0"))
    rig.rollouts.start(rig.profile, "1.1.0", canary=1)
    rig.wait_state("watching", timeout=120, interval=0.01)
    link = rig.agg.ingest.link
    for d in devices:
        config = wire.DesiredConfig(v=1, device=d, revision=1, ts=1.0, settings={"threshold": -1e5})
        assert link.publish(wire.config_topic(d), wire.encode(config), qos=1, retain=True)
    try:
        status = rig.wait_state("rolled_back", timeout=120)
    finally:
        for d in devices:  # leave no retained config behind on the session broker
            link.publish(wire.config_topic(d), b"", qos=1, retain=True)
    assert status["gate"]["passed"], status
    watch = status["watch_verdict"]
    assert not watch["passed"] and watch["stats"]["watch"]["windows"] == 150, watch
    assert any("anomaly rate" in r for r in watch["reasons"]), watch["reasons"]

    champion = rig.agg.models.champion(rig.profile)
    entry = rig.agg.models.get(rig.profile, champion)
    assert champion != "1.0.0" and champion.startswith("1.0.0") and entry.manifest.rollback_of == "1.1.0"
    assert entry.onnx_bytes() == rig.agg.models.get(rig.profile, "1.0.0").onnx_bytes()
    wait_until(lambda: all(a.model.version == champion for a in agents), 90,
               f"every agent to serve the rollback {champion}")
    wait_until(lambda: all(getattr(rig.agg.registry.get(d).deployments.get("1.1.0"), "state", None) == "rolled_back"
                           for d in devices), 60, "every device to report 1.1.0 rolled back")
