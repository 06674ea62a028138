"""Evaluation (models/evaluation.py) and the supervised ONNX export of every candidate family."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.inference import Model
from models.evaluation import classification_metrics, compare, evaluate, score_summary
from models.features import feature_names
from models.supervised import best_threshold, default_candidates, to_onnx_classifier
from models.training import make_simulator, simulated_windows, train_isolation_forest
from simulators.machine import CHANNELS, Fault

NAMES = feature_names(CHANNELS)


@pytest.fixture(scope="module")
def holdout():
    """Normal windows of two machines and fully grown bearing wear of two others."""
    wear = [Fault("bearing_wear", 0.0, 1e6, size=1.0, ramp_s=0.0)]
    normal = [simulated_windows(make_simulator("machine", seed=s), windows=200, start=60_000)[0]
              for s in (30, 31)]
    faulty = [simulated_windows(make_simulator("machine", seed=s, faults=wear), windows=100)[0]
              for s in (32, 33)]
    X = np.vstack(normal + faulty)
    return X, np.r_[np.zeros(400, bool), np.ones(200, bool)]


def forest(trees: int, windows: int, version: str) -> Model:
    X = np.vstack([simulated_windows(make_simulator("machine", seed=s), windows=windows)[0]
                   for s in range(3)])
    return Model.load(train_isolation_forest(X, NAMES, version=version, profile="machine", seed=0,
                                             n_estimators=trees))


def test_metrics_on_known_scores():
    y = np.array([0, 0, 0, 1, 1, 1], bool)
    scores = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])
    m = classification_metrics(scores, 0.5, y)
    assert m == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "positives": 3,
                               "auc": 8 / 9})
    assert "auc" not in classification_metrics(scores, 0.5, np.zeros(6, bool))  # undefined
    s = score_summary(scores, 0.5)
    assert s["anomaly_rate"] == 0.5 and s["score_p50"] == pytest.approx(0.5) and s["rows"] == 6
    assert best_threshold(scores, y) == (0.2, pytest.approx(6 / 7))  # > 0.2: 4 alarms, 3 right


def test_compare_on_the_same_holdout(holdout):
    X, y = holdout
    champion, challenger = forest(5, 60, "1.0.0"), forest(50, 400, "1.0.1")
    out = compare(challenger, champion, X, y)
    assert out["holdout_rows"] == 600
    for role, model in (("challenger", challenger), ("champion", champion)):
        alone = evaluate(model, X, y)
        assert out[f"{role}_f1"] == alone["f1"] and out[f"{role}_auc"] == alone["auc"]
    assert out["delta_f1"] == pytest.approx(out["challenger_f1"] - out["champion_f1"])
    assert out["challenger_auc"] > 0.95  # full-size wear is easy
    unlabelled = compare(challenger, champion, X)
    assert "challenger_f1" not in unlabelled and "delta_anomaly_rate" in unlabelled
    assert all(np.isfinite(v) for v in out.values())  # fit for a manifest's metrics
    # Columns named: each model gets its own order from its manifest.
    shuffled = np.arange(len(NAMES))[::-1]
    named = compare(challenger, champion, X[:, shuffled], y, names=[NAMES[i] for i in shuffled])
    assert named == out
    with pytest.raises(TypeError, match="score_batch"):
        compare(object(), champion, X)


@pytest.mark.parametrize("candidate", default_candidates(0), ids=lambda c: c.name)
def test_every_candidate_exports_to_the_manifest_convention(holdout, candidate):
    X, y = holdout
    est = candidate.build().fit(X[::3], y[::3].astype(int))
    proto = to_onnx_classifier(est, X.shape[1])
    assert [i.name for i in proto.graph.input] == ["X"]
    assert [o.name for o in proto.graph.output] == ["score"]
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["score"], {"X": X.astype(np.float32)})[0]
    assert got.shape == (len(X),)
    want = est.predict_proba(X.astype(np.float32))[:, 1]
    assert np.max(np.abs(got - want)) < 1e-4
