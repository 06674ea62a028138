"""Drift-triggered, scheduled and manual retraining (aggregator/retrain.py) on a real SQLite store.

Four simulated machines publish 3 h of normal features; the champion is trained on them. Then
2 h more arrive, either of the same regime or with a half-size bearing wear on every machine.
"""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.model_registry import ModelRegistry
from aggregator.retrain import Retrainer, next_version
from aggregator.stores import SQLiteStore
from edge_agent.inference import Model
from models.features import feature_names
from models.signing import generate_keypair, sign, verify
from models.training import make_simulator, simulated_windows, train_from_store
from simulators.machine import CHANNELS, Fault
from tests.test_training import T0, store_windows
from tests.waiting import wait_until

MACHINES = range(4)
REFERENCE, RECENT = 2200, 1440  # windows of 5 s per machine: ~3 h, then 2 h
END = T0 + 5.0 * (REFERENCE + RECENT) + 1.0


@pytest.fixture
def setup(tmp_path):
    """(store, registry, private key path, public key bytes) with a signed champion 1.0.0."""
    priv, pub = generate_keypair(tmp_path)
    registry = ModelRegistry(tmp_path / "models")
    with SQLiteStore(str(tmp_path / "store.sqlite")) as store:
        for s in MACHINES:
            X, _ = simulated_windows(make_simulator("machine", seed=s), windows=REFERENCE)
            store_windows(store, f"m-{s}", X)
        onnx_bytes, manifest = train_from_store(store, "machine", None, None, version="1.0.0",
                                                n_estimators=20)
        registry.add(onnx_bytes, sign(manifest, onnx_bytes, priv))
        registry.promote("machine", "1.0.0")
        yield store, registry, priv, pub.read_bytes()


def publish_recent(store, faults=()):
    for s in MACHINES:
        sim = make_simulator("machine", seed=s, faults=faults)
        X, _ = simulated_windows(sim, windows=RECENT, start=REFERENCE * 50)
        store_windows(store, f"m-{s}", X, seq0=REFERENCE + 1, t0=T0 + 5.0 * REFERENCE)


def retrainer(store, registry, priv, calls, **kw):
    kw.setdefault("recent_s", 5.0 * RECENT)
    return Retrainer(store, registry, priv, profiles=["machine"],
                     n_estimators=20, on_new_model=lambda p, v: calls.append((p, v)),
                     clock=lambda: END, **kw)


def test_drift_produces_a_signed_registered_model_and_calls_back(setup):
    store, registry, priv, pub = setup
    publish_recent(store, [Fault("bearing_wear", 0.0, 1e7, size=0.5, ramp_s=0.0)])
    calls = []
    decision = retrainer(store, registry, priv, calls).check("machine")
    assert decision.reason == "drift" and decision.drift.drifted
    assert decision.version == "1.0.1" and calls == [("machine", "1.0.1")]
    entry = registry.get("machine", "1.0.1")
    verify(entry.manifest, entry.onnx_bytes(), pub)  # raises unless signed by our key
    m = entry.manifest
    assert m.parent_version == "1.0.0" and registry.champion("machine") == "1.0.0"  # not promoted
    assert m.feature_names == feature_names(CHANNELS)
    assert m.metrics["drift_max_psi"] > 1.0 and "delta_anomaly_rate" in m.metrics
    assert m.metrics["champion_anomaly_rate"] > 0.5  # the champion alarms on the worn machines
    assert m.training_window[1] == pytest.approx(END - 1.0)
    Model.load(entry.path, feature_names=feature_names(CHANNELS))


def test_same_regime_is_left_alone_until_asked(setup):
    store, registry, priv, _ = setup
    publish_recent(store)
    calls = []
    r = retrainer(store, registry, priv, calls)
    decision = r.check("machine")
    assert decision.reason == "none" and not decision.drift.drifted and decision.version is None
    assert calls == [] and [m.version for m in registry.list("machine")] == ["1.0.0"]
    assert r.retrain_now("machine") == "1.0.1" and calls == [("machine", "1.0.1")]
    assert r.last["machine"].reason == "manual"


def test_schedule_retrains_from_a_background_thread(setup):
    store, registry, priv, _ = setup
    publish_recent(store)
    calls = []
    r = retrainer(store, registry, priv, calls, schedule_s=0.0, check_every_s=0.05).start()
    try:
        wait_until(lambda: calls, timeout=60, what="a scheduled retrain")
    finally:
        r.stop()
    assert calls[0] == ("machine", "1.0.1") and r.last["machine"].reason in ("schedule", "none")
    assert registry.get("machine", "1.0.1").manifest.parent_version == "1.0.0"


def test_next_version():
    assert next_version([]) == "1.0.0"
    assert next_version(["1.0.0", "1.2.0", "1.10.0"]) == "1.10.1"
    assert next_version(["2.0.0+rollback.1"]) == "2.0.1"
    assert next_version(["m-1"]) == "m-1.1"
    assert next_version(["1.2.x"]) == "1.3.0"


def test_labelled_faults_are_neither_drift_nor_training_data(setup):
    """Two of four machines wear their bearings for the whole recent period: unlabelled that is
    drift; labelled (maintenance records) it is left out of the check and of the new model."""
    from aggregator.labels import Label, window_labels
    from aggregator.retrain import label_exclusion

    store, registry, priv, _ = setup
    wear = [Fault("bearing_wear", 0.0, 1e7, size=0.5, ramp_s=0.0)]
    for s in MACHINES:
        sim = make_simulator("machine", seed=s, faults=wear if s < 2 else ())
        X, _ = simulated_windows(sim, windows=RECENT, start=REFERENCE * 50)
        store_windows(store, f"m-{s}", X, seq0=REFERENCE + 1, t0=T0 + 5.0 * REFERENCE)
    labels = [Label(0, f"m-{s}", T0 + 5.0 * REFERENCE, END, "bearing_wear") for s in (0, 1)]
    asked = []

    def source(start, end):
        asked.append((start, end))
        return [lb for lb in labels if lb.end > start and lb.start < end]

    calls = []
    assert retrainer(store, registry, priv, calls).check("machine").reason == "drift"
    labelled = retrainer(store, registry, priv, calls, labels=source)
    decision = labelled.check("machine")
    assert decision.reason == "none" and not decision.drift.drifted, decision.drift.verdict
    assert decision.drift.recent_rows == 2 * RECENT and asked
    version = labelled.retrain_now("machine")
    m = registry.get("machine", version).manifest
    rows = store.feature_rows("machine", END - labelled.train_s, END, feature_set=m.feature_set)
    expected = len(rows.devices) - int(window_labels(rows.times, rows.devices, labels, 60.0, 120.0).sum())
    assert m.metrics["train_rows"] == expected < len(rows.devices)
    # The filter itself: horizon before, margin after, other devices untouched.
    mask = label_exclusion(source, horizon_s=60.0, margin_s=120.0)(
        np.array([T0 + 5.0 * REFERENCE - 61, T0 + 5.0 * REFERENCE - 59, END + 119, END + 121, END]),
        ["m-0", "m-0", "m-1", "m-1", "m-2"])
    assert mask.tolist() == [False, True, True, False, False]
    assert label_exclusion(None) is None


def test_threshold_quantile_reaches_the_manifest(setup):
    store, registry, priv, _ = setup
    publish_recent(store)
    r = retrainer(store, registry, priv, [], threshold_quantile=0.999)
    m = registry.get("machine", r.retrain_now("machine")).manifest
    assert m.params["threshold_quantile"] == 0.999 and m.metrics["train_alarm_rate"] <= 0.0015


def test_range_threshold_judges_a_short_recent_window_by_what_the_model_never_saw(setup):
    """A recent window shorter than the load cycle: PSI calls the steady machine drifted, the
    out-of-range share does not; an ambient shift leaves the training range and is drift."""
    from simulators.base import Drift

    store, registry, priv, _ = setup
    publish_recent(store)
    short = dict(recent_s=300.0, min_rows=10)
    by_psi = Retrainer(store, registry, priv, profiles=["machine"], n_estimators=20, clock=lambda: END, **short)
    assert by_psi.monitor.check("machine").drifted  # the cycle's phase, read as drift
    calls = []
    r = retrainer(store, registry, priv, calls, range_threshold=0.05, **short)
    decision = r.check("machine")
    assert decision.reason == "none" and not decision.drift.drifted, decision.drift.verdict
    for s in MACHINES:  # 10 more minutes, 6 °C warmer
        sim = make_simulator("machine", seed=s, drift=[Drift("ambient", 0.0, size=6.0)])
        X, _ = simulated_windows(sim, windows=120, start=(REFERENCE + RECENT) * 50)
        store_windows(store, f"m-{s}", X, seq0=REFERENCE + RECENT + 1, t0=END - 1.0)
    r.clock = r.monitor.clock = lambda: END + 600.0
    decision = r.check("machine")
    assert decision.reason == "drift" and decision.version == "1.0.1" and calls == [("machine", "1.0.1")]
    assert decision.drift.max_outside > 0.5


def test_a_champion_without_a_training_window_is_judged_on_the_oldest_stored_rows(tmp_path):
    """A factory model (or a rollback to one) has no training window in the store. With less
    stored than ``fallback_s`` (the story: 1 h of data, ``train_s`` 2 h) the reference is the
    oldest ``recent_s`` stored; it used to be the empty ``recent_s`` from ``fallback_s`` ago, so
    drift went unjudged until the store was ``fallback_s`` old."""
    from simulators.base import Drift

    priv, _ = generate_keypair(tmp_path)
    registry = ModelRegistry(tmp_path / "models")
    from models.training import train_isolation_forest

    X, _ = simulated_windows(make_simulator("machine", seed=9), windows=200)
    onnx_bytes, manifest = train_isolation_forest(X, feature_names(CHANNELS), version="0.1.0", profile="machine",
                                                  seed=0, n_estimators=20)
    assert manifest.training_window == (0.0, 0.0)  # trained elsewhere: no window in the store
    registry.add(onnx_bytes, sign(manifest, onnx_bytes, priv))
    registry.promote("machine", "0.1.0")
    steady, warm = 400, 120  # windows of 5 s per machine: 33 min, then 10 min 6 °C warmer
    end = T0 + 5.0 * (steady + warm) + 1.0
    with SQLiteStore(str(tmp_path / "store.sqlite")) as store:
        for s in MACHINES:
            X, _ = simulated_windows(make_simulator("machine", seed=s), windows=steady)
            store_windows(store, f"m-{s}", X)
            sim = make_simulator("machine", seed=s, drift=[Drift("ambient", 0.0, size=6.0)])
            X, _ = simulated_windows(sim, windows=warm, start=steady * 50)
            store_windows(store, f"m-{s}", X, seq0=steady + 1, t0=T0 + 5.0 * steady)
        calls = []
        r = Retrainer(store, registry, priv, profiles=["machine"], n_estimators=20, recent_s=300.0,
                      train_s=7200.0, min_rows=10, range_threshold=0.05, clock=lambda: end,
                      on_new_model=lambda p, v: calls.append((p, v)))
        report = r.monitor.check("machine")
        assert report is not None, "a factory champion's drift must be judged on the stored rows"
        assert report.drifted and 4 * 60 <= report.reference_rows <= 4 * 61  # the first 300 s of each machine
        assert r.check("machine").reason == "drift" and calls == [("machine", "0.1.1")]
        # A reference longer than what is stored before the recent window: not judged yet.
        long_ref = Retrainer(store, registry, priv, profiles=["machine"], recent_s=300.0, train_s=7200.0,
                             min_rows=10, range_threshold=0.05, clock=lambda: end, reference_s=2400.0)
        assert long_ref.monitor.check("machine") is None  # 2300 s stored before the recent 300 s
        long_ref.monitor.reference_s = 1800.0
        assert long_ref.monitor.check("machine").reference_rows >= 4 * 360
        # Against a given version (a rollout's candidate): its own training window.
        assert r.monitor.check("machine", "0.1.1").drifted is False
