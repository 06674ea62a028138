"""The agent at run time: remote config applied key by key, privacy mode, the retained status."""

from __future__ import annotations

import threading
import time

import msgspec
import pytest

from edge_agent.config import AgentConfig, MqttSettings, SamplingSettings
from edge_agent.remote_config import apply_settings
from edgeloop import wire
from edgeloop.mqtt import MqttLink
from tests.waiting import poll as _wait


def test_settings_apply_key_by_key():
    cfg = AgentConfig(device_id="d1")
    new, applied, rejected = apply_settings(
        cfg, {"rate_hz": 20.0, "privacy": True, "window_s": -3, "bogus": 1, "threshold": 0.2})
    assert applied == {"rate_hz": 20.0, "privacy": True, "threshold": 0.2}
    assert set(rejected) == {"window_s", "bogus"}
    assert "unknown setting" in rejected["bogus"]
    assert ">" in rejected["window_s"]  # the constraint that was broken
    assert new.sampling.rate_hz == 20.0 and new.privacy and new.threshold == 0.2
    assert new.sampling.window_s == cfg.sampling.window_s  # the refused value did not apply
    assert cfg.sampling.rate_hz == 10.0  # the original is untouched


@pytest.mark.mosquitto
def test_remote_config_privacy_and_status(mosquitto, tmp_path):
    from edge_agent.agent import Agent

    device = f"cfg-{tmp_path.name}"[:60]
    statuses: list[wire.Status] = []
    watcher = MqttLink(mosquitto.url, f"watch-{device}"[:60],
                       on_message=lambda m: m.payload and statuses.append(wire.decode(m.topic, m.payload)))
    watcher.start()
    watcher.subscribe(wire.topic(device, "status"))
    cfg = AgentConfig(device_id=device, data_dir=str(tmp_path), status_interval_s=1.0,
                      mqtt=MqttSettings(url=mosquitto.url),
                      sampling=SamplingSettings(rate_hz=10.0, batch_s=1.0, window_s=5.0, speed=10.0))
    agent = Agent(cfg)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), kwargs={"drain_timeout": 0})
    thread.start()
    try:
        assert _wait(lambda: any(s.state == "online" for s in statuses)), "no birth"
        assert _wait(lambda: agent.stats.readings_accepted > 0)
        desired = wire.DesiredConfig(v=1, device=device, revision=1, ts=time.time(),
                                     settings={"rate_hz": 20.0, "privacy": True, "window_s": -3.0, "bogus": 1})
        watcher.publish(wire.config_topic(device), wire.encode(desired), qos=1, retain=True)
        assert _wait(lambda: any(s.config_revision == 1 for s in statuses)), "config not reported"
        report = [s for s in statuses if s.config_revision == 1][-1]
        assert set(report.config_rejected) == {"window_s", "bogus"}
        assert agent.config.sampling.rate_hz == 20.0 and agent.config.privacy
        # Privacy: raw readings now stay on the device; features keep flowing.
        sent_before = agent.stats.readings_accepted
        windows_before = agent.stats.windows
        assert _wait(lambda: agent.stats.readings_kept_local >= 40 and agent.stats.windows > windows_before)
        assert agent.stats.readings_accepted == sent_before
        # The retained status is refreshed periodically, not only at connect.
        count = len(statuses)
        assert _wait(lambda: len(statuses) >= count + 2, timeout=5)
    finally:
        stop.set()
        thread.join(30)
        watcher.publish(wire.config_topic(device), b"", qos=1, retain=True)
        watcher.publish(wire.topic(device, "status"), b"", qos=1, retain=True)
        time.sleep(0.2)
        watcher.stop()
    assert statuses[-1].state == "offline"  # a deliberate stop says so itself (no will on clean disconnect)
    from edge_agent.localstore import LocalReadings

    local = LocalReadings(tmp_path / "agent" / device / "readings.sqlite")
    assert local.count() == agent.stats.readings_kept_local
    local.close()


def test_example_status_fields_round_trip():
    s = wire.Status(v=1, device="d1", seq=3, ts=1.0, state="online", config_revision=2,
                    config_rejected={"bogus": "unknown setting"})
    assert msgspec.json.decode(wire.encode(s))["config_rejected"] == {"bogus": "unknown setting"}


def _small_model(directory, version, seed):
    from edge_agent.inference import Model
    from models import training

    X, names = training.simulated_training_set("machine", seed=seed, windows=300, window_len=20, rate_hz=10.0)
    onnx_bytes, manifest = training.train_isolation_forest(X, names, version=version, profile="machine",
                                                           seed=seed, n_estimators=20, max_samples=256)
    return Model.load(training.write_model(directory, onnx_bytes, manifest))


def test_shadow_scores_the_same_windows_and_promotion_swaps_without_losing_one(tmp_path):
    """No broker needed: the agent samples into its outbox while the link keeps trying."""
    from edge_agent.agent import Agent
    from tests.services import free_port

    champion = _small_model(tmp_path / "a", "1.0.0", 1)
    challenger = _small_model(tmp_path / "b", "2.0.0", 2)
    accepted = []
    cfg = AgentConfig(device_id="shadow-1", data_dir=str(tmp_path),
                      mqtt=MqttSettings(url=f"mqtt://127.0.0.1:{free_port()}", protocol="5"),
                      sampling=SamplingSettings(rate_hz=10.0, batch_s=1.0, window_s=2.0, speed=50.0))
    agent = Agent(cfg, model=champion, on_accept=accepted.append)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), kwargs={"connect_timeout": 0.2})
    thread.start()
    try:
        assert _wait(lambda: agent.stats.windows >= 5)
        agent.swap_model(challenger, role="shadow")
        assert _wait(lambda: agent.stats.shadow_inferences >= 5)
        agent.promote_shadow()
        assert _wait(lambda: agent.model is challenger and agent.stats.windows >= agent.stats.inferences > 0)
        windows_at_promotion = agent.stats.windows
        assert _wait(lambda: agent.stats.windows >= windows_at_promotion + 5)
    finally:
        stop.set()
        thread.join(30)
    features = [m for m in accepted if isinstance(m, wire.Features)]
    inferences = [m for m in accepted if isinstance(m, wire.Inference)]
    champ = [m for m in inferences if m.role == "champion"]
    shadow = [m for m in inferences if m.role == "shadow"]
    # Every window was scored by exactly one champion, before, during and after the swaps.
    assert sorted(m.window_end for m in champ) == sorted(m.window_end for m in features)
    # The shadow scored the very windows the champion scored while it ran beside it.
    shadow_windows = {m.window_end for m in shadow}
    assert shadow_windows and shadow_windows <= {m.window_end for m in champ if m.model_version == "1.0.0"}
    assert all(m.model_version == "2.0.0" for m in shadow)
    versions = [m.model_version for m in sorted(champ, key=lambda m: m.window_end)]
    assert versions[0] == "1.0.0" and versions[-1] == "2.0.0"
    assert versions == sorted(versions)  # one switch, never back


class _SteppingClock:
    """``time`` for the agent module with a wall clock we can step (the monotonic one is real)."""

    def __init__(self):
        self.offset = 0.0

    def time(self):
        return time.time() + self.offset

    def __getattr__(self, name):
        return getattr(time, name)


def test_clock_step_is_flagged_and_rules_alert_with_hysteresis(tmp_path, monkeypatch):
    import edge_agent.agent as agent_module
    from edge_agent.agent import Agent
    from edge_agent.quality import CLOCK_STEP
    from edge_agent.rules import RulesSettings, ThresholdRule
    from tests.services import free_port

    clock = _SteppingClock()
    monkeypatch.setattr(agent_module, "time", clock)
    accepted = []
    # rpm sits near 1470 on the simulated machine: a rule at 1000 fires at once and never clears.
    rules = RulesSettings(rules=[ThresholdRule(name="rpm_high", input="rpm", on=1000.0, off=900.0, cooldown_s=0)])
    cfg = AgentConfig(device_id="clock-1", data_dir=str(tmp_path), rules=rules,
                      mqtt=MqttSettings(url=f"mqtt://127.0.0.1:{free_port()}", protocol="5"),
                      sampling=SamplingSettings(rate_hz=20.0, batch_s=0.5, window_s=0.5))
    agent = Agent(cfg, on_accept=accepted.append)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), kwargs={"connect_timeout": 0.2})
    thread.start()
    try:
        assert _wait(lambda: agent.stats.samples > 20)
        clock.offset = -30.0  # NTP steps the clock back half a minute
        assert _wait(lambda: agent._clock.steps == 1)
        assert _wait(lambda: agent.stats.windows >= 4)
    finally:
        stop.set()
        thread.join(30)
    readings = [r for m in accepted if isinstance(m, wire.Telemetry) for r in m.readings]
    stepped = [r for r in readings if r.flags & CLOCK_STEP]
    assert len(stepped) == 1  # the first reading after the jump, and only that one
    assert agent._clock.last.step_s == pytest.approx(-30.0, abs=0.5)
    alerts = [m for m in accepted if isinstance(m, wire.Alert)]
    assert len(alerts) == 1 and alerts[0].state == "fired" and alerts[0].rule == "rpm_high"
