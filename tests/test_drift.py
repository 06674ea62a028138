"""Feature drift (models/drift.py): PSI and KS per feature on simulated machine windows."""

from __future__ import annotations

import numpy as np
import pytest

from models.drift import DriftReport, drift_report, ks_statistic, out_of_range_share, psi
from models.features import feature_names
from models.training import make_simulator, simulated_windows
from simulators.machine import CHANNELS, Fault

NAMES = feature_names(CHANNELS)
MACHINES = range(4)
REFERENCE_WINDOWS = 2200  # ~3 h of 5 s windows per machine: whole load and ambient cycles
RECENT_WINDOWS = 1440  # the 2 h after them


def windows(seed: int, count: int, start: int = 0, faults=()) -> np.ndarray:
    return simulated_windows(make_simulator("machine", seed=seed, faults=faults), windows=count,
                             start=start)[0]


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return np.vstack([windows(s, REFERENCE_WINDOWS) for s in MACHINES])


def recent(faults=()) -> np.ndarray:
    start = REFERENCE_WINDOWS * 50
    return np.vstack([windows(s, RECENT_WINDOWS, start, faults) for s in MACHINES])


def test_same_regime_later_is_not_drift(reference):
    report = drift_report(reference, recent(), NAMES)
    assert not report.drifted, report.verdict
    assert report.max_psi < 0.1  # measured 0.03
    assert report.verdict.startswith("no drift")
    assert report.reference_rows == 4 * REFERENCE_WINDOWS and report.recent_rows == 4 * RECENT_WINDOWS


def test_half_size_bearing_wear_is_drift_in_the_features_it_moves(reference):
    wear = [Fault("bearing_wear", 0.0, 1e7, size=0.5, ramp_s=0.0)]
    report = drift_report(reference, recent(wear), NAMES)
    assert report.drifted
    top = [name for name, _, _ in report.top]
    assert len(top) == 5
    # The wear adds a defect tone (vibration bands) and heat (bearing temperature), not rpm.
    assert any(n.startswith("vibration__band") for n in top[:3])
    assert any(n.startswith("bearing_temp__") for n in top)
    assert not any(n.startswith("rpm__") for n in report.drifting)
    assert report.top[0][1] == pytest.approx(report.max_psi) and report.max_psi > 1.0
    assert "drift in" in report.verdict and top[0] in report.verdict
    metrics = report.as_metrics()
    assert metrics["drift_max_psi"] == report.max_psi and metrics["drift_features"] >= 3


def test_psi_and_ks_on_known_samples():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=20_000), rng.normal(size=20_000)
    assert psi(a, b) < 0.01 and ks_statistic(a, b) < 0.03
    shifted = b + 1.0  # one standard deviation
    assert psi(a, shifted) > 0.5
    assert ks_statistic(a, shifted) == pytest.approx(0.383, abs=0.02)  # 2*Phi(0.5)-1
    assert ks_statistic([1, 2, 3], [10, 11]) == 1.0
    # A constant reference: no drift while recent keeps the value, drift once it leaves it.
    assert psi(np.zeros(100), np.zeros(50)) == 0.0
    assert psi(np.zeros(100), np.ones(50)) > 1.0


def test_ks_threshold_and_argument_checks():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(500, 2))
    cur = ref[:200].copy()
    cur[:, 1] = np.sort(cur[:, 1])  # same values: PSI and KS 0
    report = drift_report(ref, cur + [0.0, 0.3], ["a", "b"], psi_threshold=5.0, ks_threshold=0.05)
    assert isinstance(report, DriftReport) and report.drifting == ["b"]
    with pytest.raises(ValueError, match="column counts differ"):
        drift_report(ref, cur[:, :1], ["a", "b"])
    with pytest.raises(ValueError, match="reference rows"):
        drift_report(ref[:3], cur, ["a", "b"])
    with pytest.raises(ValueError, match="psi_threshold"):
        drift_report(ref, cur, ["a", "b"], psi_threshold=0)


def test_a_short_window_of_a_seen_cycle_is_psi_drift_but_not_out_of_range(reference):
    """Why ``range_threshold`` exists: 300 s of a machine whose load cycles over ~30 min fill only
    some of the reference's bins, so PSI calls it drift; its values stay inside the range seen."""
    short = np.vstack([windows(s, 60, REFERENCE_WINDOWS * 50) for s in MACHINES])  # 300 s each
    report = drift_report(reference, short, NAMES)
    assert report.drifted and report.max_psi > 0.2  # PSI reads the cycle's phase as drift
    by_range = drift_report(reference, short, NAMES, range_threshold=0.05)
    assert not by_range.drifted and by_range.max_outside <= 0.05, by_range.verdict
    assert by_range.max_psi == report.max_psi  # PSI is still reported
    assert "no drift" in by_range.verdict and "out of range" in by_range.verdict


def test_a_short_window_after_an_ambient_shift_is_out_of_range(reference):
    from simulators.base import Drift

    shifted = np.vstack([simulated_windows(make_simulator("machine", seed=s, drift=[Drift("ambient", 0.0, size=6.0)]),
                                           windows=60, start=REFERENCE_WINDOWS * 50)[0] for s in MACHINES])
    report = drift_report(reference, shifted, NAMES, range_threshold=0.05)
    assert report.drifted and report.max_outside > 0.5
    assert report.drifting[0].startswith("bearing_temp__"), report.verdict
    assert report.as_metrics()["drift_max_outside"] == report.max_outside


def test_out_of_range_share_counts_both_sides_per_column():
    ref = np.array([[0.0, 10.0], [1.0, 20.0]])
    cur = np.array([[-0.1, 15.0], [0.5, 25.0], [2.0, 20.0], [0.5, 10.0]])
    assert out_of_range_share(ref, cur).tolist() == [0.5, 0.25]
    with pytest.raises(ValueError, match="same columns"):
        out_of_range_share(ref, cur[:, :1])
    with pytest.raises(ValueError, match="range_threshold"):
        drift_report(np.zeros((20, 1)), np.zeros((3, 1)), ["a"], range_threshold=1.0)
