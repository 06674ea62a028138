"""Edge data-quality checks: bits, quiet on normal machine data, and each injected fault caught."""

from __future__ import annotations

import math

import msgspec
import pytest

from edge_agent import quality
from edge_agent.quality import (
    CLOCK_STEP, DEVICE_MASK, FLAGS, GAP, MISSING, OUT_OF_RANGE, SPIKE, STUCK, TIME_ADJUSTED,
    QualityChecker, QualitySettings, combine, describe,
)
from edgeloop import wire
from edgeloop.config import ConfigError, convert
from simulators.machine import CHANNELS, Fault, MachineSimulator

PERIOD = 0.1  # the simulator's default 10 Hz
MACHINE_RANGES = {"vibration": (-50.0, 50.0), "bearing_temp": (-20.0, 120.0),
                  "motor_current": (0.0, 60.0), "rpm": (0.0, 3000.0)}
COL = {c: i for i, c in enumerate(CHANNELS)}


def machine_rows(seed: int = 1, n: int = 20_000, faults=()) -> list[list[float | None]]:
    return MachineSimulator(seed=seed, faults=faults).block(0, n).tolist()


def run(rows, settings: QualitySettings | None = None, times=None):
    settings = settings or QualitySettings(ranges=MACHINE_RANGES)
    checker = QualityChecker(CHANNELS, settings, period_s=PERIOD)
    times = times if times is not None else [1.7e9 + i * PERIOD for i in range(len(rows))]
    return checker, [checker.check(t, row) for t, row in zip(times, rows)]


# -- bits ---------------------------------------------------------------------------------------

def test_bits_are_distinct_powers_of_two_and_device_bits_stay_below_256():
    bits = list(FLAGS.values())
    assert all(b > 0 and b & (b - 1) == 0 for b in bits)
    assert len(set(bits)) == len(bits)
    for name, bit in FLAGS.items():
        assert (bit <= DEVICE_MASK) == (name != "time_adjusted"), name
    assert TIME_ADJUSTED == 1 << 8
    assert sum(FLAGS.values()) <= 2**31 - 1  # fits the wire's flags field


def test_describe_names_bits_in_order_and_unknown_bits():
    assert describe(0) == []
    assert describe(OUT_OF_RANGE | SPIKE) == ["out_of_range", "spike"]
    assert describe(GAP | CLOCK_STEP | TIME_ADJUSTED) == ["gap", "clock_step", "time_adjusted"]
    assert describe(STUCK | (1 << 12)) == ["stuck", "bit12"]
    with pytest.raises(ValueError, match="flags must be >= 0"):
        describe(-1)


def test_window_flags_are_the_or_of_its_readings_and_travel_in_features():
    assert combine([]) == 0
    assert combine([0, SPIKE, 0, MISSING | SPIKE]) == SPIKE | MISSING
    msg = wire.Features(v=1, device="d1", seq=1, ts=1.7e9, feature_set="fs1", window_start=1.7e9,
                        window_end=1.7e9 + 5, names=["a"], values=[1.0], flags=combine([STUCK, GAP]))
    assert describe(wire.decode(wire.topic("d1", "features"), wire.encode(msg)).flags) == ["stuck", "gap"]


# -- normal data ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_defaults_leave_normal_machine_data_almost_unflagged(seed):
    checker, flags = run(machine_rows(seed))
    assert checker.readings == 20_000
    assert sum(1 for f in flags if f) < 0.005 * 20_000, checker.summary()
    assert checker.flagged == sum(1 for f in flags if f)


# -- injected faults ------------------------------------------------------------------------------

def test_out_of_range_and_infinity_are_flagged_per_channel():
    rows = machine_rows(n=300)
    rows[100][COL["bearing_temp"]] = 130.0
    rows[200][COL["rpm"]] = -5.0
    rows[250][COL["motor_current"]] = math.inf
    checker, flags = run(rows)
    assert [i for i, f in enumerate(flags) if f & OUT_OF_RANGE] == [100, 200, 250]
    counts = checker.counts()
    assert counts["bearing_temp"]["out_of_range"] == 1
    assert counts["rpm"]["out_of_range"] == 1
    assert counts["motor_current"]["out_of_range"] == 1
    assert counts["vibration"] == {"out_of_range": 0, "stuck": 0, "spike": 0, "missing": 0}


def test_a_channel_without_a_range_is_not_range_checked():
    rows = machine_rows(n=200)
    rows[150][COL["rpm"]] = 1e6
    checker, flags = run(rows, QualitySettings(ranges={"vibration": (-50.0, 50.0)}))
    assert not flags[150] & OUT_OF_RANGE
    assert flags[150] & SPIKE  # the spike check still sees it


def test_stuck_sensor_is_flagged_after_stuck_n_readings_until_it_moves_again():
    rows = machine_rows()
    frozen = rows[5000][COL["bearing_temp"]]
    for i in range(5000, 5300):
        rows[i][COL["bearing_temp"]] = frozen
    settings = QualitySettings(ranges=MACHINE_RANGES, stuck_n=50)
    checker, flags = run(rows, settings)
    stuck = [i for i, f in enumerate(flags) if f & STUCK]
    assert stuck == list(range(5049, 5300))
    assert checker.counts()["bearing_temp"]["stuck"] == 251
    assert sum(c["stuck"] for c in checker.counts().values()) == 251


def test_stuck_tolerance_and_per_channel_count():
    rows = machine_rows(n=400)
    for i in range(100, 160):  # a frozen sensor that still wiggles in its last digit
        rows[i][COL["rpm"]] = 1480.0 + (0.01 if i % 2 else 0.0)
    exact = run(rows, QualitySettings(stuck_n=20))[0].counts()["rpm"]["stuck"]
    loose = run(rows, QualitySettings(stuck_n=20, stuck_tolerance=0.05))[0].counts()["rpm"]["stuck"]
    longer = run(rows, QualitySettings(stuck_n=20, stuck_tolerance=0.05,
                                       stuck_n_by_channel={"rpm": 40}))[0].counts()["rpm"]["stuck"]
    assert exact == 0
    assert loose == 60 - 19
    assert longer == 60 - 39


def test_spikes_are_flagged_on_the_reading_and_do_not_blind_the_check():
    rows = machine_rows()
    injected = {
        3000: ("vibration", 8.0), 3020: ("vibration", -8.0),  # two knocks 2 s apart
        7000: ("rpm", 25.0), 9000: ("motor_current", 3.0), 12000: ("bearing_temp", 2.0),
    }
    for i, (channel, delta) in injected.items():
        rows[i][COL[channel]] += delta
    checker, flags = run(rows)
    assert [i for i, f in enumerate(flags) if f & SPIKE] == sorted(injected)
    counts = checker.counts()
    for channel in CHANNELS:
        assert counts[channel]["spike"] == sum(1 for c, _ in injected.values() if c == channel)


def test_no_spike_is_flagged_during_warm_up():
    rows = machine_rows(n=200)
    rows[10][COL["rpm"]] += 500.0
    rows[150][COL["rpm"]] += 500.0
    _, flags = run(rows, QualitySettings(spike_warmup=50))
    assert not flags[10] & SPIKE
    assert flags[150] & SPIKE


def test_a_step_change_is_flagged_for_at_most_half_the_median_window():
    """A real process step (the simulator's 'sudden' fault) looks like a spike only briefly."""
    rows = machine_rows(faults=[Fault("sudden", start_s=600.0, duration_s=300.0)])
    settings = QualitySettings(ranges=MACHINE_RANGES, spike_window=9)
    _, flags = run(rows, settings)
    spiky = [i for i, f in enumerate(flags) if f & SPIKE]
    start, end = 6000, 9000
    assert spiky, "the step went unnoticed"
    assert all(start <= i <= start + 5 or end <= i <= end + 5 for i in spiky), spiky


def test_dropouts_missing_values_and_time_gaps():
    rows = machine_rows(n=600)
    times = [1.7e9 + i * PERIOD for i in range(600)]
    for i in range(300, 310):
        rows[i][COL["vibration"]] = None
    rows[320][COL["rpm"]] = math.nan
    for i in range(400, 600):  # the source went silent for 2 s
        times[i] += 2.0
    times[500:] = [t + 0.04 for t in times[500:]]  # a late sample, 1.4 periods: no gap
    checker, flags = run(rows, times=times)
    assert [i for i, f in enumerate(flags) if f & MISSING] == list(range(300, 310)) + [320]
    assert [i for i, f in enumerate(flags) if f & GAP] == [400]
    assert checker.gaps == 1
    assert checker.counts()["vibration"]["missing"] == 10
    assert checker.counts()["rpm"]["missing"] == 1
    # a missing value neither breaks the spike check nor counts as a spike on return
    assert not any(f & SPIKE for f in flags[300:330])


def test_a_backward_time_step_is_not_a_gap():
    rows = machine_rows(n=100)
    times = [1.7e9 + i * PERIOD for i in range(50)] + [1.7e9 - 3600 + i * PERIOD for i in range(50)]
    _, flags = run(rows, times=times)
    assert not any(f & GAP for f in flags)


def test_disabled_checks_and_disabled_quality():
    rows = machine_rows(n=400)
    rows[300][COL["rpm"]] += 500
    for i in range(100, 200):
        rows[i][COL["rpm"]] = 1480.0
    _, flags = run(rows, QualitySettings(stuck_n=0, spike_k=0, gap_factor=0))
    assert not any(flags)
    checker, flags = run(rows, QualitySettings(enabled=False))
    assert not any(flags) and checker.readings == 0


def test_wrong_value_count_is_refused():
    checker = QualityChecker(CHANNELS, period_s=PERIOD)
    with pytest.raises(ValueError, match="expected 4 values"):
        checker.check(1.0, [1.0, 2.0])


# -- configuration --------------------------------------------------------------------------------

def test_settings_load_from_toml_shaped_data():
    s = convert({"ranges": {"rpm": [0, 3000]}, "stuck_n": 20, "spike_k": 6}, QualitySettings, "agent.toml")
    assert s.ranges == {"rpm": (0.0, 3000.0)} and s.stuck_n == 20 and s.spike_k == 6.0
    assert msgspec.convert(msgspec.to_builtins(s), QualitySettings) == s


@pytest.mark.parametrize("data, match", [
    ({"ranges": {"rpm": [3000, 0]}}, "quality.ranges.rpm: need finite min < max"),
    ({"spike_window": 8}, "spike_window must be odd"),
    ({"gap_factor": 1.0}, "gap_factor must be 0"),
    ({"stuck_n": -1}, "stuck_n"),
    ({"stuck_limit": 3}, "stuck_limit"),
])
def test_bad_settings_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        convert(data, QualitySettings, "agent.toml")


def test_settings_for_channels_the_source_lacks_are_refused():
    with pytest.raises(ValueError, match=r"channels the source does not have: \['pressure'\]"):
        QualityChecker(CHANNELS, QualitySettings(ranges={"pressure": (0.0, 10.0)}), period_s=PERIOD)
    with pytest.raises(ValueError, match="period_s must be > 0"):
        QualityChecker(CHANNELS, period_s=0)


def test_public_names_are_exported():
    for name in quality.__all__:
        assert hasattr(quality, name), name
