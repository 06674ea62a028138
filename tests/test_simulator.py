"""The machine simulator, the simulated source and the source registry."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from edge_agent.sources import Source, create_source, known_sources, source_class
from edge_agent.sources.simulated import SimulatedSource
from edgeloop.wire import NAME_PATTERN
from simulators.machine import BLOCK, CHANNELS, Fault, MachineSimulator


def test_same_seed_same_data_other_seed_other_data():
    a = MachineSimulator(seed=7).block(0, 3000)
    b = MachineSimulator(seed=7).block(0, 3000)
    c = MachineSimulator(seed=8).block(0, 3000)
    assert a.shape == (3000, len(CHANNELS))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_samples_do_not_depend_on_call_order():
    sim = MachineSimulator(seed=3)
    reference = sim.block(0, 5 * BLOCK)
    rng = np.random.default_rng(0)
    order = rng.permutation(5 * BLOCK)[:500]
    fresh = MachineSimulator(seed=3)
    for i in order:
        assert fresh.sample(int(i)) == reference[i].tolist()
    # Blocks straddling noise-block boundaries, in any order, agree with the whole.
    for i0, n in [(BLOCK - 3, 7), (2 * BLOCK + 5, 2 * BLOCK), (0, 1), (4 * BLOCK, BLOCK)]:
        np.testing.assert_array_equal(MachineSimulator(seed=3).block(i0, n), reference[i0 : i0 + n])


def test_values_are_plausible():
    data = MachineSimulator(seed=1).block(0, 36_000)  # an hour at 10 Hz
    vib, temp, current, rpm = data.T
    assert abs(vib.mean()) < 0.05 and 0.4 < vib.std() < 1.2  # m/s², centred
    assert 30 < temp.min() and temp.max() < 60  # °C
    assert 5 < current.min() and current.max() < 15  # A
    assert 1440 < rpm.min() and rpm.max() < 1500  # rpm, below synchronous speed
    # The load drives current up and speed down together.
    assert np.corrcoef(current, rpm)[0, 1] < -0.8


def test_vibration_spectrum_has_the_rotation_harmonic():
    sim = MachineSimulator(seed=2)
    vib = sim.block(0, 4096)[:, 0]
    spectrum = np.abs(np.fft.rfft(vib - vib.mean()))
    freqs = np.fft.rfftfreq(4096, d=1 / sim.rate_hz)
    peak = freqs[np.argmax(spectrum)]
    assert 1.1 < peak < 1.3  # ~1465 rpm / 60 / 20 (gearbox)


def test_fault_labels_follow_start_and_duration():
    faults = [Fault("bearing_wear", start_s=100.0, duration_s=50.0, size=1.0), Fault("sudden", 300.0, 10.0)]
    sim = MachineSimulator(seed=0, rate_hz=10.0, faults=faults)
    expect = lambda i: 100.0 <= i / 10 < 150.0 or 300.0 <= i / 10 < 310.0  # noqa: E731
    labels = sim.labels(0, 4000)
    for i in [0, 999, 1000, 1499, 1500, 2999, 3000, 3099, 3100, 3999]:
        assert sim.label(i) is expect(i), i
        assert labels[i] == expect(i), i
    assert labels.sum() == 500 + 100
    assert not MachineSimulator(seed=0).labels(0, 4000).any()


def test_bearing_wear_grows_vibration_and_temperature():
    wear = Fault("bearing_wear", start_s=600.0, duration_s=1200.0, size=1.0)  # ramp: 300 s
    sim = MachineSimulator(seed=4, faults=[wear])
    healthy = MachineSimulator(seed=4)
    at_plateau = slice(10_000, 12_000)  # 1000-1200 s: full size
    before = slice(4_000, 6_000)
    worn, ok = sim.block(0, 12_000), healthy.block(0, 12_000)
    np.testing.assert_array_equal(worn[before], ok[before])  # nothing changes before the fault
    assert worn[at_plateau, 0].std() > 1.3 * ok[at_plateau, 0].std()
    assert worn[at_plateau, 1].mean() == pytest.approx(ok[at_plateau, 1].mean() + 10.0, abs=0.2)
    # Gradual: half-way up the ramp (750 s) the temperature rise is about half.
    mid = slice(7_450, 7_550)
    assert worn[mid, 1].mean() - ok[mid, 1].mean() == pytest.approx(5.0, abs=0.3)


def test_sudden_fault_is_a_step():
    sim = MachineSimulator(seed=5, faults=[Fault("sudden", start_s=100.0, duration_s=100.0, size=1.0)])
    healthy = MachineSimulator(seed=5)
    d = sim.block(0, 3000)[:, 2] - healthy.block(0, 3000)[:, 2]  # motor current
    assert np.all(d[:1000] == 0)
    assert np.allclose(d[1000:2000], 2.0)  # +2 A from the first faulty sample
    assert np.all(d[2000:] == 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="melt", start_s=0, duration_s=1), "unknown fault kind"),
        (dict(kind="sudden", start_s=0, duration_s=0), "duration_s"),
        (dict(kind="sudden", start_s=-1, duration_s=1), "start_s"),
        (dict(kind="sudden", start_s=0, duration_s=1, size=-1), "size"),
    ],
)
def test_bad_faults_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Fault(**kwargs)


def test_bad_simulator_arguments():
    with pytest.raises(ValueError, match="seed"):
        MachineSimulator(seed=-1)
    with pytest.raises(ValueError, match="rate_hz"):
        MachineSimulator(seed=0, rate_hz=0)
    with pytest.raises(ValueError, match="index"):
        MachineSimulator(seed=0).sample(-1)


def test_block_is_fast():
    sim = MachineSimulator(seed=0, faults=[Fault("bearing_wear", 10.0, 1e4)])
    sim.block(0, 1000)  # warm up
    started = time.perf_counter()
    sim.block(0, 200_000)
    rate = 200_000 / (time.perf_counter() - started)
    assert rate > 50_000, f"{rate:.0f} samples/s"


# -- the source registry and the simulated source -----------------------------------------------


@pytest.mark.parametrize("name", ["simulated"])  # every source, with sample options: tests/test_sources.py
def test_every_registered_source_conforms(name):
    """Conformance of the simulated source built from its defaults."""
    cls = source_class(name)
    assert cls.name == name  # the registered name is the one the class declares
    source = create_source(name, {})
    try:
        assert isinstance(source, Source)
        assert source.channels and len(set(source.channels)) == len(source.channels)
        assert all(re.match(NAME_PATTERN, ch) for ch in source.channels)
        for index in range(3):
            values = source.read(index, time.time())
            assert len(values) == len(source.channels)
            assert all(v is None or isinstance(v, float) for v in values)
    finally:
        source.close()
        source.close()  # idempotent


def test_unknown_source_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown source 'gpio'.*simulated"):
        create_source("gpio", {})
    assert "simulated" in known_sources()


def test_bad_options_are_named():
    with pytest.raises(ValueError, match=r"no option 'sead'.*seed"):
        create_source("simulated", {"sead": 1})
    with pytest.raises(ValueError, match="unknown simulator profile 'pump'"):
        create_source("simulated", {"profile": "pump"})
    with pytest.raises(ValueError, match="missing"):
        create_source("simulated", {"missing": 1.5})
    with pytest.raises(ValueError, match="unknown fault kind"):
        create_source("simulated", {"faults": [{"kind": "x", "start_s": 0, "duration_s": 1}]})


def test_simulated_source_reads_the_simulator_and_its_labels():
    faults = [{"kind": "sudden", "start_s": 1.0, "duration_s": 1.0}]
    source = create_source("simulated", {"seed": 9, "rate_hz": 10.0, "faults": faults})
    assert isinstance(source, SimulatedSource)
    sim = MachineSimulator(seed=9, rate_hz=10.0, faults=[Fault("sudden", 1.0, 1.0)])
    for i in range(30):
        assert source.read(i, 0.0) == sim.sample(i)
        assert source.label(i) is (10 <= i < 20)


def test_missing_readings_are_none_at_the_asked_rate_and_deterministic():
    a = SimulatedSource(seed=1, missing=0.2)
    b = SimulatedSource(seed=1, missing=0.2)
    rows = [a.read(i, 0.0) for i in range(5000)]
    assert rows == [b.read(i, 0.0) for i in range(5000)]
    share = sum(v is None for row in rows for v in row) / (5000 * 4)
    assert 0.18 < share < 0.22


def test_simulated_source_plays_every_profile_with_drift():
    for profile in ("machine", "cold-chain", "wearable"):
        source = create_source("simulated", {"profile": profile, "seed": 2,
                                             "drift": [{"kind": "regime", "start_s": 0.0}]})
        assert len(source.read(0, 0.0)) == len(source.channels) == 4
    with pytest.raises(ValueError, match="unknown drift kind"):
        create_source("simulated", {"drift": [{"kind": "winter", "start_s": 0.0}]})


def test_simulated_source_observes_ground_truth_in_device_time():
    faults = [{"kind": "sudden", "start_s": 1.0, "duration_s": 1.0}, {"kind": "bearing_wear", "start_s": 5.0,
                                                                       "duration_s": 100.0}]
    source = SimulatedSource(seed=1, rate_hz=10.0, faults=faults)
    assert source.observed_faults()["faults"] == []
    t = 1_000_000.0
    for i in range(60):
        if i == 15:
            t += 7.0  # a clock step: ground truth follows the device's own clock
        source.read(i, t)
        t += 0.1
    seen = source.observed_faults()
    assert seen["start"] == 1_000_000.0 and seen["end"] == pytest.approx(1_000_000.0 + 6.0 + 7.0)
    (sudden, wear) = seen["faults"]
    assert sudden["kind"] == "sudden" and sudden["start"] == pytest.approx(1_000_001.0)
    assert sudden["end"] == pytest.approx(1_000_002.0 + 7.0)
    assert wear["start"] == pytest.approx(1_000_005.0 + 7.0) and wear["end"] == seen["end"]  # still active
