"""Simulator profiles: determinism, plausible values, faults, sensor faults, drift, and that each
profile's faults are caught by an isolation forest trained on its normal data (offline, no MQTT)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from models import training
from simulators import base, profiles, scoring
from simulators.cold_chain import ColdChainSimulator
from simulators.wearable import WearableSimulator

NAMES = profiles.names()


def test_registry_names_the_three_profiles_and_matches_the_modules():
    assert NAMES == ["machine", "cold-chain", "wearable"]
    assert profiles.SENSOR_FAULTS == base.SENSOR_FAULTS and profiles.DRIFT_KINDS == base.DRIFT_KINDS
    from edge_agent.sources.simulated import PROFILES as SOURCE_PROFILES

    assert SOURCE_PROFILES == {p.name: p.module for p in profiles.PROFILES.values()}
    for p in profiles.PROFILES.values():
        module = importlib.import_module(p.module)
        assert tuple(module.CHANNELS) == p.channels
        assert tuple(module.FAULT_KINDS) == p.fault_kinds
        assert set(module.Fault.GRADUAL) == {f.name for f in p.faults if f.gradual}
    with pytest.raises(ValueError, match="unknown simulator profile 'pump'.*cold-chain"):
        profiles.get("pump")


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_data_other_seed_other_data(name):
    faults = [{"kind": f.name, "start_s": 100.0 + 200 * k, "duration_s": 150.0}
              for k, f in enumerate(profiles.get(name).faults)]
    faults.append({"kind": "dropout", "channel": profiles.get(name).channels[1], "start_s": 50.0, "duration_s": 20.0})
    drift = [{"kind": "ambient", "start_s": 300.0, "size": 3.0}, {"kind": "regime", "start_s": 400.0}]
    a = profiles.create(name, seed=7, faults=faults, drift=drift).block(0, 6000)
    b = profiles.create(name, seed=7, faults=faults, drift=drift).block(0, 6000)
    c = profiles.create(name, seed=8, faults=faults, drift=drift).block(0, 6000)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(np.nan_to_num(a), np.nan_to_num(c))
    # Any order of reads gives the same samples (counter-based noise, closed-form physics).
    sim = profiles.create(name, seed=7, faults=faults, drift=drift)
    for i in (5999, 17, 3000, 1024, 1023):
        assert sim.sample(i) == [None if v != v else v for v in a[i].tolist()]


def test_cold_chain_is_plausible():
    data = ColdChainSimulator(seed=1).block(0, 36_000)  # an hour at 10 Hz
    cabinet, ambient, current, door = data.T
    assert 2.5 < cabinet.min() and cabinet.max() < 8.0
    assert 3.5 < cabinet.mean() < 4.8
    assert 17 < ambient.min() and ambient.max() < 25
    running = current > 1.0
    assert 0.2 < running.mean() < 0.6  # compressor duty
    assert set(np.unique(door)) == {0.0, 1.0} and door.mean() < 0.1  # a few short openings
    # The cabinet cools while the compressor runs.
    assert np.mean(np.diff(cabinet)[running[1:]]) < 0 < np.mean(np.diff(cabinet)[~running[1:]])


def test_wearable_is_plausible():
    data = WearableSimulator(seed=1).block(0, 36_000)
    hr, spo2, skin, motion = data.T
    assert 45 < hr.min() and hr.max() < 130
    assert 94 < spo2.min() and spo2.max() <= 100
    assert 32 < skin.min() and skin.max() < 35
    assert motion.min() >= 0.05 and motion.max() < 2
    assert np.corrcoef(motion, hr)[0, 1] > 0.5  # activity raises the heart rate


@pytest.mark.parametrize(
    "name, kind, channel, delta",
    [
        ("cold-chain", "door_left_open", "door_open", 1.0),
        ("cold-chain", "compressor_failure", "cabinet_temp", 2.0),
        ("wearable", "arrhythmia", "heart_rate", 30.0),
        ("wearable", "desaturation", "spo2", -7.0),
    ],
)
def test_faults_move_their_channels_by_their_stated_size(name, kind, channel, delta):
    sim = profiles.create(name, seed=3, faults=[{"kind": kind, "start_s": 600.0, "duration_s": 1200.0}])
    ok = profiles.create(name, seed=3)
    j = profiles.get(name).channels.index(channel)
    before, plateau = slice(0, 6000), slice(15_000, 18_000)
    a, b = sim.block(0, 18_000), ok.block(0, 18_000)
    np.testing.assert_array_equal(a[before], b[before])
    change = a[plateau, j].mean() - b[plateau, j].mean()
    assert change >= delta if delta > 0 else change <= delta


def test_sensor_faults_stuck_spike_dropout():
    faults = [{"kind": "stuck", "channel": "heart_rate", "start_s": 10.0, "duration_s": 10.0},
              {"kind": "spike", "channel": "spo2", "start_s": 30.0, "duration_s": 100.0, "size": 1.0},
              {"kind": "dropout", "channel": "motion", "start_s": 200.0, "duration_s": 10.0}]
    sim = WearableSimulator(seed=2, faults=faults)
    ok = WearableSimulator(seed=2).block(0, 3000)
    x = sim.block(0, 3000)
    assert np.all(x[100:200, 0] == ok[100, 0]) and x[200, 0] != ok[100, 0]  # held at its start value
    jumps = np.abs(x[300:1300, 1] - ok[300:1300, 1])
    assert 0.02 < np.mean(jumps > 5) < 0.09 and np.all(x[:300, 1] == ok[:300, 1])  # ~5 % spikes of 10 %
    assert np.isnan(x[2000:2100, 3]).all() and not np.isnan(x[:2000]).any()
    assert sim.sample(2050)[3] is None
    assert [f["category"] for f in sim.ground_truth()["faults"]] == ["sensor"] * 3
    with pytest.raises(ValueError, match="needs a 'channel'"):
        WearableSimulator(seed=0, faults=[{"kind": "stuck", "start_s": 0, "duration_s": 1}])
    with pytest.raises(ValueError, match="channel 'rpm'.*heart_rate"):
        WearableSimulator(seed=0, faults=[{"kind": "stuck", "channel": "rpm", "start_s": 0, "duration_s": 1}])


@pytest.mark.parametrize("name", NAMES)
def test_drift_moves_normal_data(name):
    ok = profiles.create(name, seed=4).block(0, 12_000)
    ch = profiles.get(name).channels[1]
    j = profiles.get(name).channels.index(ch)
    recal = profiles.create(name, seed=4, drift=[{"kind": "recalibration", "channel": ch, "start_s": 600.0,
                                                  "size": 0.5}]).block(0, 12_000)
    np.testing.assert_allclose(recal[6000:, j] - ok[6000:, j], 0.5)
    np.testing.assert_array_equal(recal[:6000], ok[:6000])
    for kind, size in (("ambient", 6.0), ("regime", 1.0)):
        moved = profiles.create(name, seed=4, drift=[{"kind": kind, "start_s": 0.0, "size": size}]).block(0, 12_000)
        assert not np.allclose(moved, ok), kind
    assert profiles.create(name, seed=4, drift=[{"kind": "regime", "start_s": 5.0}]).labels(0, 100).sum() == 0
    with pytest.raises(ValueError, match="unknown drift kind"):
        profiles.create(name, seed=0, drift=[{"kind": "winter", "start_s": 0}])


def test_ground_truth_lists_faults_and_drift():
    sim = profiles.create("cold-chain", seed=0, faults=[{"kind": "door_left_open", "start_s": 5.0, "duration_s": 2.0}],
                          drift=[{"kind": "ambient", "start_s": 9.0, "size": 4.0}])
    truth = sim.ground_truth()
    assert truth["faults"] == [{"kind": "door_left_open", "category": "process", "start_s": 5.0, "end_s": 7.0,
                                "size": 1.0, "channel": None}]
    assert truth["drift"][0]["kind"] == "ambient" and truth["drift"][0]["end_s"] is None
    assert sim.labels(0, 100).nonzero()[0].tolist() == list(range(50, 70))


# -- each profile's faults are caught by a model trained on normal data from other seeds ----------

WINDOW = 50  # 5 s at 10 Hz, the agent's default window
HOURS = 2.0


def _detect(name: str):
    X, _ = training.simulated_training_set(name, seed=1000, windows=4000, window_len=WINDOW, machines=8)
    model = training.fit_isolation_forest(X, seed=0)
    threshold = np.quantile(-model.decision_function(X.astype(np.float32)), 0.999)
    rows, faults = [], []
    for seed in range(1, 9):  # not the training seeds (1000-1007)
        rng = np.random.default_rng(seed)
        injected = [{"kind": f.name, "start_s": float(600 + 3000 * k + rng.uniform(0, 1200)), "duration_s": 900.0,
                     "size": 1.0} for k, f in enumerate(profiles.get(name).faults)]
        sim = training.make_simulator(name, seed=seed, faults=injected)
        n = int(HOURS * 3600 * sim.rate_hz) // WINDOW
        Xs, _ = training.simulated_windows(sim, windows=n, window_len=WINDOW)
        anomalous = -model.decision_function(Xs.astype(np.float32)) > threshold
        ends = (np.arange(n) * WINDOW + WINDOW - 1) / sim.rate_hz
        device = f"{name}-{seed}"
        rows += [(device, t, a) for t, a in zip(ends, anomalous)]
        faults += [scoring.FaultWindow(device, f["kind"], f["start_s"], f["start_s"] + f["duration_s"])
                   for f in injected]
    # An alarm: two anomalous windows in a row (what a rule with a short debounce raises).
    alarms = scoring.alarm_episodes(rows, merge_gap_s=2.5 * WINDOW / 10, min_consecutive=2)
    return scoring.score(faults, alarms, device_hours=8 * HOURS)


@pytest.mark.parametrize("name", NAMES)
def test_each_profile_faults_are_caught_on_unseen_seeds(name):
    result = _detect(name)
    assert result.faults == 16
    assert result.f1 >= 0.8, result.to_dict()
    assert result.false_alarms_per_device_hour < 1.0, result.to_dict()
