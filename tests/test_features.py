"""Window features (basic-v1) on windows whose features can be worked out by hand."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeloop.wire import NAME_PATTERN
from models.features import BANDS, FEATURE_SET, STATS, compute, feature_names

CH = ("vibration", "bearing_temp")


def feats(window, t, channels=CH, spectral=("vibration",)) -> dict[str, float]:
    values = compute(np.asarray(window, dtype=float), np.asarray(t, dtype=float), channels, spectral)
    names = feature_names(channels, spectral)
    assert values.shape == (len(names),)
    return dict(zip(names, values))


def test_names_order_and_wire_pattern():
    names = feature_names(("vibration", "bearing_temp", "motor_current", "rpm"))
    assert FEATURE_SET == "basic-v1"
    assert len(names) == 4 * len(STATS) + len(BANDS)
    assert names[: len(STATS) + len(BANDS)] == [f"vibration__{s}" for s in STATS + BANDS]
    assert names[len(STATS) + len(BANDS)] == "bearing_temp__mean"
    assert all(re.match(NAME_PATTERN, n) for n in names)


@pytest.mark.parametrize("bad", ["1temp", "temp-C", "x" * 60, "tëmp"])
def test_channel_names_that_make_bad_feature_names_are_refused(bad):
    with pytest.raises(ValueError, match="does not match"):
        feature_names((bad,))
    with pytest.raises(ValueError):
        compute(np.zeros((4, 1)), np.arange(4.0), (bad,))


def test_repeated_channels_refused():
    with pytest.raises(ValueError, match="repeat"):
        feature_names(("a", "a"))


def test_line_gives_its_slope_and_basic_stats():
    t = np.array([0.0, 0.5, 1.5, 2.0, 4.0])  # uneven spacing: slope must use t, not the index
    window = np.column_stack((np.zeros(5), 3.0 * t - 1.0))
    f = feats(window, t)
    assert f["bearing_temp__slope"] == pytest.approx(3.0)
    assert f["bearing_temp__mean"] == pytest.approx(3.0 * t.mean() - 1.0)
    assert f["bearing_temp__min"] == pytest.approx(-1.0)
    assert f["bearing_temp__max"] == pytest.approx(11.0)
    assert f["bearing_temp__last"] == pytest.approx(11.0)
    assert f["bearing_temp__std"] == pytest.approx(np.std(3.0 * t - 1.0))
    assert f["vibration__slope"] == 0.0


def test_rms_and_std_of_a_sine_and_a_constant():
    n = 200
    t = np.arange(n) / 100.0
    sine = 2.0 * np.sin(2 * np.pi * 5.0 * t)  # whole periods
    f = feats(np.column_stack((sine, np.full(n, -4.0))), t)
    assert f["vibration__rms"] == pytest.approx(2.0 / np.sqrt(2), rel=1e-9)
    assert f["vibration__std"] == pytest.approx(2.0 / np.sqrt(2), rel=1e-9)
    assert f["vibration__mean"] == pytest.approx(0.0, abs=1e-12)
    assert f["bearing_temp__rms"] == pytest.approx(4.0)
    assert f["bearing_temp__std"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    "cycles_per_sample, band", [(0.05, "band_low"), (0.25, "band_mid"), (0.4, "band_high")]
)
def test_pure_tone_lands_in_its_band(cycles_per_sample, band):
    n = 60
    k = np.arange(n)
    amplitude = 1.5
    tone = amplitude * np.sin(2 * np.pi * cycles_per_sample * k) + 7.0  # an offset must not count
    f = feats(np.column_stack((tone, np.zeros(n))), k / 10.0)
    power = {b: f[f"vibration__{b}"] for b in BANDS}
    # Parseval: the bands add up to the variance; all of it is in the tone's band.
    assert sum(power.values()) == pytest.approx(np.var(tone), rel=1e-9)
    assert power[band] == pytest.approx(amplitude**2 / 2, rel=1e-9)
    for other in set(BANDS) - {band}:
        assert power[other] == pytest.approx(0.0, abs=1e-12)


def test_nyquist_tone_is_counted_once():
    n = 50
    tone = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)  # 0.5 cycles/sample
    f = feats(np.column_stack((tone, np.zeros(n))), np.arange(n) / 10.0)
    assert f["vibration__band_high"] == pytest.approx(1.0)


def test_nan_is_ignored_per_channel():
    t = np.arange(6, dtype=float)
    temp = 2.0 * t + 1.0
    vib = np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    clean = feats(np.column_stack((vib, temp)), t)
    holed = temp.copy()
    holed[[1, 5]] = np.nan  # including the last sample
    f = feats(np.column_stack((vib, holed)), t)
    valid = temp[[0, 2, 3, 4]]
    assert f["bearing_temp__mean"] == pytest.approx(valid.mean())
    assert f["bearing_temp__std"] == pytest.approx(valid.std())
    assert f["bearing_temp__min"] == pytest.approx(1.0)
    assert f["bearing_temp__max"] == pytest.approx(9.0)
    assert f["bearing_temp__last"] == pytest.approx(9.0)  # the last *valid* value
    assert f["bearing_temp__slope"] == pytest.approx(2.0)
    assert f["bearing_temp__rms"] == pytest.approx(np.sqrt((valid**2).mean()))
    # The other channel is untouched.
    for name in feature_names(CH):
        if name.startswith("vibration__"):
            assert f[name] == clean[name]


def test_all_nan_channel_gives_zeros_and_infinities_count_as_missing():
    t = np.arange(8, dtype=float)
    vib = np.array([np.nan, np.inf, -np.inf, np.nan, np.nan, np.nan, np.nan, np.nan])
    f = feats(np.column_stack((vib, t)), t)
    for name, value in f.items():
        if name.startswith("vibration__"):
            assert value == 0.0, name
    assert f["bearing_temp__slope"] == pytest.approx(1.0)


def test_thin_windows():
    one = feats(np.array([[2.0, 5.0]]), np.array([0.0]))
    assert one["bearing_temp__last"] == 5.0 and one["bearing_temp__slope"] == 0.0
    assert one["vibration__band_low"] == 0.0 and one["vibration__std"] == 0.0
    same_t = feats(np.array([[1.0, 1.0], [2.0, 3.0]]), np.array([4.0, 4.0]))
    assert same_t["bearing_temp__slope"] == 0.0


def test_band_power_with_missing_samples_is_scaled_to_valid_count():
    n = 60
    k = np.arange(n)
    tone = np.sin(2 * np.pi * 0.05 * k)
    holed = tone.copy()
    holed[::10] = np.nan
    f = feats(np.column_stack((holed, np.zeros(n))), k / 10.0)
    total = sum(f[f"vibration__{b}"] for b in BANDS)
    assert f["vibration__band_low"] / total > 0.9  # still mostly the tone's band
    assert total == pytest.approx(0.5, rel=0.15)


def test_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        compute(np.zeros((5, 3)), np.arange(5.0), CH)
    with pytest.raises(ValueError, match="t must"):
        compute(np.zeros((5, 2)), np.arange(4.0), CH)
    with pytest.raises(ValueError, match="empty"):
        compute(np.zeros((0, 2)), np.zeros(0), CH)


def test_no_spectral_channel():
    f = compute(np.ones((5, 2)), np.arange(5.0), CH, spectral_channels=())
    assert f.shape == (2 * len(STATS),)


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.lists(
            st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.just(float("nan"))),
            min_size=2,
            max_size=2,
        ),
        min_size=1,
        max_size=40,
    )
)
def test_always_finite_and_nan_rows_at_the_front_change_nothing_but_slope(data):
    window = np.array(data, dtype=float)
    t = np.arange(len(window), dtype=float)
    f = compute(window, t, CH)
    assert np.isfinite(f).all()
    padded = np.vstack((np.full((3, 2), np.nan), window))
    g = compute(padded, np.arange(len(padded), dtype=float) - 3, CH)
    names = feature_names(CH)
    for name, a, b in zip(names, f, g):
        if name.endswith("__slope"):
            assert b == pytest.approx(a, rel=1e-6, abs=1e-6)
        elif "band" not in name:  # the spectrum sees a longer window, other stats must not move
            assert b == pytest.approx(a, rel=1e-9, abs=1e-9), name
