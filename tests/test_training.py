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


# -- training from the store ----------------------------------------------------------------------

T0 = 1_700_000_000.0  # device time of simulated sample 0


def store_windows(store, device, X, *, seq0=1, t0=T0, flags=None, profile="machine", names=None):
    """Write feature rows as the agent publishes them: window k ends at t0 + 5 (k + 1)."""
    from edgeloop.wire import Features

    names = names or feature_names(CHANNELS)
    batch = [
        Features(v=1, device=device, seq=seq0 + k, ts=t0 + 5.0 * (k + 1), profile=profile,
                 feature_set=FEATURE_SET, window_start=t0 + 5.0 * k, window_end=t0 + 5.0 * (k + 1),
                 names=names, values=[float(v) for v in row],
                 flags=0 if flags is None else int(flags[k]))
        for k, row in enumerate(X)
    ]
    for a in range(0, len(batch), 500):
        assert store.write(batch[a:a + 500]).rejected == []


@pytest.fixture
def sqlite_store(tmp_path):
    from aggregator.stores import SQLiteStore

    with SQLiteStore(str(tmp_path / "store.sqlite")) as store:
        yield store


def test_training_from_sqlite_leaves_out_flagged_windows(sqlite_store):
    from models.training import load_training_rows, train_from_store

    normal, _ = simulated_windows(make_simulator("machine", seed=1), windows=300)
    broken = normal.copy()
    flags = np.zeros(300, dtype=int)
    flags[::10] = 2  # every tenth window flagged by the agent's quality checks ...
    broken[::10] *= 1000.0  # ... and holding garbage that must never reach a model
    store_windows(sqlite_store, "m-1", broken, flags=flags)
    rows = load_training_rows(sqlite_store, "machine", T0, T0 + 10_000)
    assert rows.names == feature_names(CHANNELS)  # the agent's order, not the store's
    np.testing.assert_array_equal(rows.matrix, normal[flags == 0])  # exactly the clean rows
    onnx_bytes, manifest = train_from_store(sqlite_store, "machine", T0, T0 + 10_000,
                                            version="2.0.0", n_estimators=20, seed=0)
    assert manifest.metrics["train_rows"] == 270
    assert manifest.training_window == (T0 + 10.0, T0 + 1500.0)  # window 0 flagged, 299 not
    model = Model.load((onnx_bytes, manifest), feature_set=FEATURE_SET,
                       feature_names=feature_names(CHANNELS))
    # Had the garbage been trained on, the threshold would sit far above normal scores.
    assert np.mean(model.score_batch(normal) > model.threshold) < 0.05
    assert np.all(model.score_batch(broken[::10]) > model.threshold)


def test_training_from_the_store_refuses_too_few_rows(sqlite_store):
    from models.training import train_from_store

    X, _ = simulated_windows(make_simulator("machine", seed=1), windows=40)
    store_windows(sqlite_store, "m-1", X)
    with pytest.raises(ValueError, match=r"only 40 unflagged basic-v1 feature rows .* at least 200"):
        train_from_store(sqlite_store, "machine", T0, T0 + 1e4, version="1.0.1")
    with pytest.raises(ValueError, match="only 0 unflagged"):
        train_from_store(sqlite_store, "pump", None, None, version="1.0.1")


def test_training_from_real_influxdb(influxdb):
    from aggregator.stores import InfluxStore, Retention
    from models.training import train_from_store

    store = InfluxStore(influxdb.url, influxdb.new_database("train"),
                        retention=Retention(raw_duration="INF", long_duration="INF"))
    store.open()
    try:
        parts = [simulated_windows(make_simulator("machine", seed=s), windows=150)[0] for s in (1, 2)]
        for k, X in enumerate(parts):
            store_windows(store, f"m-{k}", X, seq0=1)
        onnx_bytes, manifest = train_from_store(store, "machine", T0, T0 + 1e4, version="1.1.0",
                                                n_estimators=20)
    finally:
        store.close()
    assert manifest.feature_names == feature_names(CHANNELS)
    assert manifest.metrics["train_rows"] == 300 and manifest.metrics["train_devices"] == 2
    assert manifest.training_window == (T0 + 5.0, T0 + 750.0)
    Model.load((onnx_bytes, manifest), feature_names=feature_names(CHANNELS))


# -- supervised failure predictor -----------------------------------------------------------------


def wear_fleet():
    """Six machines, each with a bearing wear at a different time; labels from ground truth."""
    from aggregator.labels import labels_from_faults, window_labels

    Xs, times, devices, labels = [], [], [], []
    for k, seed in enumerate(range(200, 206)):
        wear = Fault("bearing_wear", start_s=1500.0 + 300 * k, duration_s=1500.0, size=0.4)
        X, _ = simulated_windows(make_simulator("machine", seed=seed, faults=[wear]), windows=800)
        Xs.append(X)
        times.append(T0 + 5.0 * np.arange(1, 801))
        devices += [f"m-{k}"] * 800
        labels += labels_from_faults(f"m-{k}", [wear], t0=T0)
    times = np.concatenate(times)
    y = window_labels(times, devices, labels, horizon_s=0.0)
    return np.vstack(Xs), y, times


def test_supervised_predictor_beats_chance_on_bearing_wear():
    from models.supervised import default_candidates, train_supervised

    X, y, times = wear_fleet()
    assert 0.2 < y.mean() < 0.5
    progress = []
    quick = [c for c in default_candidates(0) if c.name in ("logreg_c1", "forest_100_d8")]
    onnx_bytes, manifest = train_supervised(
        X, y, times, feature_names(CHANNELS), version="3.0.0", profile="machine",
        candidates=quick, budget_s=120, on_progress=lambda *a: progress.append(a))
    assert manifest.algorithm.startswith("supervised_")
    assert manifest.output_name == "score" and manifest.params["candidates_tried"] == 2
    model = Model.load((onnx_bytes, manifest), feature_names=feature_names(CHANNELS))
    # The validation part is the newest 30 % of the rows: judge on it, as the search did.
    newest = np.argsort(times, kind="stable")[int(round(len(times) * 0.7)):]
    scores = model.score_batch(X[newest])
    assert np.all((scores >= 0) & (scores <= 1))  # a probability
    pred = scores > model.threshold
    base_rate = y[newest].mean()
    precision = (pred & y[newest]).sum() / max(pred.sum(), 1)
    recall = (pred & y[newest]).sum() / y[newest].sum()
    assert precision > base_rate + 0.3 and recall > 0.6, (precision, recall, base_rate)
    assert manifest.metrics["val_f1"] > 0.7 and manifest.metrics["val_auc"] > 0.9
    assert progress[0][0].startswith("fitting ") and progress[-1][0].startswith("best: ")


def test_supervised_search_stops_at_its_time_budget():
    from models.supervised import search

    X, y, times = wear_fleet()
    result = search(X[::4], y[::4], times[::4], budget_s=0.0)
    assert result.stopped_early and len(result.tried) == 1  # one fit, then the budget is spent
    with pytest.raises(ValueError, match="holds no failure windows"):
        search(X[:700], y[:700] & False, times[:700])


def test_cli_trains_from_the_store_and_supervised_from_labels(tmp_path):
    from click.testing import CliRunner

    from aggregator.labels import LabelStore
    from aggregator.stores import SQLiteStore
    from edgeloop.cli import main

    runner = CliRunner()
    assert runner.invoke(main, ["models", "keygen", "--data-dir", str(tmp_path)]).exit_code == 0
    (tmp_path / "aggregator").mkdir()
    with SQLiteStore(str(tmp_path / "aggregator" / "store.sqlite")) as store, \
            LabelStore(tmp_path / "labels.sqlite") as labels:
        for k in range(3):
            wear = Fault("bearing_wear", 1500.0 + 300 * k, 1500.0, size=0.4)
            X, _ = simulated_windows(make_simulator("machine", seed=k, faults=[wear]), windows=800)
            store_windows(store, f"m-{k}", X)
            labels.add(f"m-{k}", T0 + wear.start_s, T0 + wear.end_s, "bearing_wear")
    base = ["models", "train", "--from-store", "--since", str(T0), "--until", "2023-11-15T00:00:00",
            "--data-dir", str(tmp_path)]
    out = runner.invoke(main, base + ["--version", "1.0.0", "--trees", "20"])
    assert out.exit_code == 0, out.output
    assert "isolation_forest" in out.output and "train_rows=2400" in out.output
    out = runner.invoke(main, base + ["--version", "1.1.0", "--supervised", "--budget", "0"])
    assert out.exit_code == 0, out.output
    assert "supervised_" in out.output and "val_f1=" in out.output
    out = runner.invoke(main, base[:4] + ["1h", "--data-dir", str(tmp_path), "--version", "1.2.0"])
    assert out.exit_code == 1 and "only 0 unflagged basic-v1 feature rows" in out.output
