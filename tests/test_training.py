"""Training on simulated normal data -> ONNX -> the agent's Model: parity, false alarms, detection."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest

from edge_agent.inference import Model
from models.features import FEATURE_SET, feature_names
from models.manifest import Manifest, load_manifest
from models.training import (
    fit_isolation_forest,
    make_simulator,
    simulated_training_set,
    simulated_windows,
    train_isolation_forest,
    write_model,
)
from simulators.machine import CHANNELS, Fault

SEED = 0
TREES = 50


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    X, names = simulated_training_set("machine", seed=SEED, windows=2000, machines=4)
    onnx_bytes, manifest = train_isolation_forest(
        X, names, version="m-1", profile="machine", seed=SEED, n_estimators=TREES,
        training_window=(1000.0, 2000.0),
    )
    directory = write_model(tmp_path_factory.mktemp("model"), onnx_bytes, manifest)
    return X, names, onnx_bytes, manifest, Model.load(directory)


def held_out_normal() -> np.ndarray:
    """Machines the model never saw, hours after the training windows' times."""
    parts = [
        simulated_windows(make_simulator("machine", seed=s), windows=300, start=150_000)[0]
        for s in range(100, 105)
    ]
    return np.vstack(parts)


def test_training_set_uses_the_shared_feature_code():
    X, names = simulated_training_set("machine", seed=3, windows=10, window_len=40, machines=2)
    assert names == feature_names(CHANNELS)
    assert X.shape == (10, len(names))
    sim = make_simulator("machine", seed=3)
    first, _ = simulated_windows(sim, windows=1, window_len=40)
    np.testing.assert_array_equal(X[0], first[0])
    with pytest.raises(ValueError, match="unknown simulator profile"):
        simulated_training_set("pump", seed=0, windows=5)


def test_manifest_describes_the_model(trained, tmp_path):
    X, names, onnx_bytes, manifest, model = trained
    assert manifest.sha256 == hashlib.sha256(onnx_bytes).hexdigest()
    assert manifest.feature_set == FEATURE_SET
    assert manifest.feature_names == names
    assert manifest.input_shape == [-1, len(names)]
    assert manifest.score_kind == "anomaly_score" and manifest.output_name == "score"
    assert manifest.training_window == (1000.0, 2000.0)
    assert manifest.params["n_estimators"] == TREES
    assert manifest.metrics["train_rows"] == len(X)
    assert manifest.metrics["train_alarm_rate"] <= 0.006  # the 99.5 % quantile rule
    proto = onnx.load_from_string(onnx_bytes)
    assert manifest.opset == next(o.version for o in proto.opset_import if o.domain == "")
    assert [o.name for o in proto.graph.output] == ["score"]
    assert [i.name for i in proto.graph.input] == ["X"]
    # On disk: the bytes and a manifest that reads back equal.
    write_model(tmp_path, onnx_bytes, manifest)
    assert (tmp_path / "model.onnx").read_bytes() == onnx_bytes
    assert load_manifest(tmp_path) == manifest
    assert json.loads((tmp_path / "manifest.json").read_text())["threshold"] == manifest.threshold


def test_write_model_fills_in_the_sha256(trained, tmp_path):
    _, _, onnx_bytes, manifest, _ = trained
    blank = Manifest(**{f: getattr(manifest, f) for f in manifest.__struct_fields__ if f != "sha256"})
    assert blank.sha256 == ""
    write_model(tmp_path, onnx_bytes, blank)
    assert load_manifest(tmp_path).sha256 == manifest.sha256
    Model.load(tmp_path)


def test_onnx_scores_match_sklearn(trained):
    X, names, _, manifest, model = trained
    reference = fit_isolation_forest(X, seed=SEED, n_estimators=TREES)  # deterministic refit
    faulty = make_simulator("machine", seed=50, faults=[Fault("bearing_wear", 0.0, 1e6, 0.7)])
    rows = np.vstack([held_out_normal()[:700], simulated_windows(faulty, windows=300)[0]])
    assert rows.shape[0] == 1000
    expected = -reference.decision_function(rows.astype(np.float32))
    got = model.score_batch(rows)
    assert np.max(np.abs(got - expected)) < 1e-5
    # One at a time through score() as the agent does, and the threshold is the training rule.
    for row, want in zip(rows[:50], expected[:50]):
        score, anomaly, latency_us = model.score(row)
        assert score == pytest.approx(want, abs=1e-5)
        assert anomaly is (score > manifest.threshold)
        assert latency_us > 0
    train_scores = -reference.decision_function(X.astype(np.float32))
    assert manifest.threshold == pytest.approx(np.quantile(train_scores, 0.995))


def test_normal_windows_rarely_alarm(trained):
    *_, model = trained
    scores = model.score_batch(held_out_normal())
    rate = float(np.mean(scores > model.threshold))
    assert rate < 0.02, f"{rate:.1%} of normal windows flagged"


def test_full_size_bearing_wear_is_mostly_flagged(trained):
    """bearing_wear of size 1.0 (+10 °C, a 1.2 m/s² defect tone), windows after its 300 s ramp."""
    *_, model = trained
    rates = []
    for seed in (60, 61):
        wear = Fault("bearing_wear", start_s=100.0, duration_s=2500.0, size=1.0, ramp_s=300.0)
        X, labels = simulated_windows(make_simulator("machine", seed=seed, faults=[wear]), windows=500)
        t_end = (np.arange(500) * 50 + 49) / 10.0
        grown = labels & (t_end >= 400.0)
        assert grown.sum() > 400
        rates.append(np.mean(model.score_batch(X[grown]) > model.threshold))
    assert min(rates) > 0.8, rates


def test_sudden_fault_is_mostly_flagged(trained):
    *_, model = trained
    fault = Fault("sudden", start_s=100.0, duration_s=2000.0, size=1.0)
    X, labels = simulated_windows(make_simulator("machine", seed=70, faults=[fault]), windows=500)
    rate = np.mean(model.score_batch(X[labels]) > model.threshold)
    assert rate > 0.8, rate


def test_bad_training_input_is_refused():
    X = np.random.default_rng(0).normal(size=(50, 3))
    with pytest.raises(ValueError, match="feature names"):
        train_isolation_forest(X, ["a", "b"], version="v", profile="p", seed=0)
    X[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        train_isolation_forest(X, ["a", "b", "c"], version="v", profile="p", seed=0)
    with pytest.raises(ValueError, match="threshold_quantile"):
        train_isolation_forest(
            np.ones((5, 1)), ["a"], version="v", profile="p", seed=0, threshold_quantile=1.0
        )
