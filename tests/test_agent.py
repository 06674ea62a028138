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


def _wait(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


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
