"""The fused isolation-forest conversion: one tree-ensemble node that scores as scikit-learn does.

Parity is checked against ``-IsolationForest.decision_function`` on 10,000 rows (normal ones and
rows far outside the training range) through onnxruntime with the agent's session options, for
both ``ai.onnx.ml`` opsets, several forest shapes and degenerate data.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from sklearn.ensemble import IsolationForest

from edge_agent.inference import Model, session_options
from models.fused_iforest import average_path_length, extract, to_fused_onnx
from models.training import train_isolation_forest

TOLERANCE = 1e-5


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(
        proto.SerializeToString(), sess_options=session_options(), providers=["CPUExecutionProvider"]
    )


def _scores(proto: onnx.ModelProto, rows: np.ndarray) -> np.ndarray:
    out = _session(proto).run(["score"], {"X": rows.astype(np.float32)})[0]
    assert out.shape == (rows.shape[0], 1)
    return out.reshape(-1).astype(np.float64)


def _rows(rng: np.random.Generator, train: np.ndarray, n: int = 10_000) -> np.ndarray:
    """Mostly rows like the training data, a tenth far outside it (x1000 spread, shifted)."""
    lo, hi = train.min(axis=0), train.max(axis=0)
    inside = rng.uniform(lo, hi, size=(n - n // 10, train.shape[1]))
    outside = rng.normal(loc=1e3, scale=1e4, size=(n // 10, train.shape[1]))
    return np.vstack([inside, outside]).astype(np.float32)


def _assert_parity(model: IsolationForest, rows: np.ndarray, ml_opset: int) -> None:
    proto = to_fused_onnx(model, rows.shape[1], ml_opset=ml_opset)
    want = -model.decision_function(rows)
    got = _scores(proto, rows)
    worst = float(np.max(np.abs(got - want)))
    assert worst <= TOLERANCE, f"max |onnx - sklearn| = {worst:.3g}"


@pytest.mark.parametrize("ml_opset", [3, 5])
@pytest.mark.parametrize(
    "n_estimators,max_samples,max_features",
    [(100, 256, 1.0), (40, 1024, 1.0), (30, 128, 0.5), (25, 64, 3), (7, 2, 1.0)],
)
def test_scores_match_sklearn(ml_opset, n_estimators, max_samples, max_features):
    rng = np.random.default_rng(n_estimators)
    train = (rng.normal(size=(1500, 8)) * [1, 10, 0.1, 5, 1, 1, 100, 1e-3]).astype(np.float32)
    model = IsolationForest(
        n_estimators=n_estimators, max_samples=max_samples, max_features=max_features,
        random_state=3,
    ).fit(train)
    _assert_parity(model, _rows(rng, train), ml_opset)


@pytest.mark.parametrize("ml_opset", [3, 5])
def test_constant_feature_and_contamination_offset(ml_opset):
    """A constant column is never split on; a fitted offset_ (not -0.5) is carried into the graph."""
    rng = np.random.default_rng(1)
    train = rng.normal(size=(800, 5)).astype(np.float32)
    train[:, 2] = 7.0
    model = IsolationForest(n_estimators=30, contamination=0.05, random_state=0).fit(train)
    assert model.offset_ != -0.5
    rows = _rows(rng, train)
    rows[:50, 2] = 7.0
    _assert_parity(model, rows, ml_opset)


@pytest.mark.parametrize("ml_opset", [3, 5])
def test_all_constant_data_gives_single_leaf_trees(ml_opset):
    train = np.full((300, 3), 2.5, dtype=np.float32)
    model = IsolationForest(n_estimators=10, random_state=0).fit(train)
    assert all(e.tree_.node_count == 1 for e in model.estimators_)
    _assert_parity(model, _rows(np.random.default_rng(2), train + [[0.0], [1.0]] * 150), ml_opset)


@pytest.mark.parametrize("ml_opset", [3, 5])
def test_one_sample_per_tree(ml_opset):
    """max_samples=1: c(ψ) = 0 and sklearn fixes score_samples at -0.5."""
    train = np.random.default_rng(3).normal(size=(50, 4)).astype(np.float32)
    model = IsolationForest(n_estimators=5, max_samples=1, random_state=0).fit(train)
    _assert_parity(model, train, ml_opset)


@pytest.mark.parametrize("ml_opset", [3, 5])
def test_rows_on_the_float32_neighbours_of_every_threshold(ml_opset):
    """Inputs a float32 ulp either side of each split go the same way as in scikit-learn.

    Thresholds are float64; casting one to float32 can round it up past an input that sklearn
    sends right. The converter rounds down, so these rows must agree exactly.
    """
    rng = np.random.default_rng(4)
    train = rng.normal(size=(600, 4)).astype(np.float32)
    model = IsolationForest(n_estimators=20, max_samples=256, random_state=5).fit(train)
    rows = []
    for est in model.estimators_[:5]:
        tr = est.tree_
        for node in np.flatnonzero(tr.children_left != -1):
            t = tr.threshold[node]
            for x in (np.float32(t), np.nextafter(np.float32(t), np.float32(np.inf)),
                      np.nextafter(np.float32(t), np.float32(-np.inf))):
                row = train[node % len(train)].copy()
                row[tr.feature[node]] = x
                rows.append(row)
    _assert_parity(model, np.array(rows, dtype=np.float32), ml_opset)


@pytest.mark.parametrize("ml_opset", [3, 5])
def test_graph_is_one_ensemble_node_and_checks(ml_opset):
    train = np.random.default_rng(5).normal(size=(400, 6)).astype(np.float32)
    model = IsolationForest(n_estimators=12, random_state=0).fit(train)
    proto = to_fused_onnx(model, 6, ml_opset=ml_opset)
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops == ["TreeEnsembleRegressor" if ml_opset == 3 else "TreeEnsemble", "Exp", "Add"]
    assert {o.domain: o.version for o in proto.opset_import} == {"": 17, "ai.onnx.ml": ml_opset}
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "X" and out.name == "score"
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == [0, 6]
    assert [d.dim_value for d in out.type.tensor_type.shape.dim] == [0, 1]


def test_average_path_length_special_cases():
    c = average_path_length(np.array([0, 1, 2, 3, 256]))
    assert c[0] == c[1] == 0.0 and c[2] == 1.0
    assert c[3] == pytest.approx(2 * (np.log(2) + np.euler_gamma) - 4 / 3)
    assert c[4] == pytest.approx(2 * (np.log(255) + np.euler_gamma) - 2 * 255 / 256)


def test_leaf_values_are_depth_plus_c_of_leaf_size():
    train = np.random.default_rng(6).normal(size=(300, 3)).astype(np.float32)
    model = IsolationForest(n_estimators=3, random_state=0).fit(train)
    forest = extract(model)
    tr = model.estimators_[0].tree_
    first = forest.tree == 0
    # Recompute a few leaves' depth by walking from the root.
    parent = {
        int(c): p
        for p in range(tr.node_count)
        for c in (tr.children_left[p], tr.children_right[p])
        if c != -1
    }
    for leaf in np.flatnonzero(tr.children_left == -1)[:10]:
        depth, node = 0, int(leaf)
        while node != 0:
            node, depth = parent[node], depth + 1
        expected = depth + average_path_length(tr.n_node_samples[leaf])
        assert forest.value[first][leaf] == pytest.approx(expected)
    assert forest.max_samples == model.max_samples_ and forest.offset == -0.5


def test_refuses_unfitted_and_mismatched_models():
    with pytest.raises(TypeError, match="fitted sklearn IsolationForest"):
        to_fused_onnx(IsolationForest(), 3)
    model = IsolationForest(n_estimators=2, random_state=0).fit(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="fitted on 4 features, not 5"):
        to_fused_onnx(model, 5)
    with pytest.raises(ValueError, match="ml_opset"):
        to_fused_onnx(model, 4, ml_opset=4)


def test_training_uses_the_fused_graph_and_keeps_stock_as_an_option():
    X = np.random.default_rng(7).normal(size=(600, 5))
    names = [f"f{i}" for i in range(5)]
    common = dict(version="v1", profile="machine", seed=0, n_estimators=20)
    fused_bytes, fused_manifest = train_isolation_forest(X, names, **common)
    stock_bytes, stock_manifest = train_isolation_forest(X, names, converter="stock", **common)
    assert fused_manifest.params["converter"] == "fused"
    assert stock_manifest.params["converter"] == "stock"
    assert [n.op_type for n in onnx.load_from_string(fused_bytes).graph.node][0] == "TreeEnsemble"  # ai.onnx.ml 5
    assert len(fused_bytes) < len(stock_bytes)
    fused, stock = Model.load((fused_bytes, fused_manifest)), Model.load((stock_bytes, stock_manifest))
    rows = np.random.default_rng(8).normal(scale=3, size=(2000, 5))
    np.testing.assert_allclose(fused.score_batch(rows), stock.score_batch(rows), atol=TOLERANCE)
    assert fused.threshold == stock.threshold
    with pytest.raises(ValueError, match="converter must be one of"):
        train_isolation_forest(X, names, converter="fast", **common)


def test_module_does_not_import_sklearn():
    code = "import sys, models.fused_iforest; sys.exit('sklearn' in sys.modules or 'skl2onnx' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
