"""A fitted scikit-learn IsolationForest as ONE fused ONNX tree-ensemble node (numpy + onnx only).

skl2onnx's stock converter emits a subgraph per tree (depth lookups, gathers, path-length
arithmetic), so a 100-tree forest costs ~0.9 ms per row at batch 1 and ~170 ms to build a session.
Here every tree becomes part of one ``ai.onnx.ml`` tree-ensemble node whose leaf values are that
leaf's path-length contribution, already scaled, summed over the trees; two elementwise nodes
finish the score. That scores a row in ~10 µs (``bench/inference.py`` has the figures).

The math, as scikit-learn computes it (``sklearn/ensemble/_iforest.py``): a row reaching leaf
``l`` of tree ``t`` has path length ``h_t = depth(l) + c(n_l)``, where ``depth`` counts edges from
the root, ``n_l`` is the number of training rows that reached ``l`` and ``c`` is the average path
length of an unsuccessful BST search (``c(n) = 0`` for ``n <= 1``, ``1`` for ``n == 2``, else
``2 (ln(n-1) + γ) - 2 (n-1)/n``). Then ``score_samples = -2^(-mean_t h_t / c(max_samples_))``
and ``decision_function = score_samples - offset_``. The graph outputs the edgeloop score
``-decision_function = 2^(-mean_t h_t / c(ψ)) + offset_``; each leaf holds
``-ln 2 · h / (n_trees · c(ψ))`` so that the ensemble's SUM is the exponent of ``Exp``.

Exactness details that make the graph agree with scikit-learn to ~1e-7:

- scikit-learn compares float32 features (promoted to float64) with float64 thresholds; the node
  takes float32 thresholds, so each threshold is rounded DOWN to the largest float32 ``t`` with
  ``t <= threshold``, which sends every float32 input the same way (``x <= t  ⇔  x <= threshold``).
- With ``max_features < 1.0`` each tree was fitted on its own subset of columns
  (``estimators_features_``); its split features are mapped back to the full input's columns.
- A tree that is a single leaf (all rows identical) and ``c(ψ) = 0`` (ψ = 1) are handled as
  scikit-learn does.

The module imports neither scikit-learn nor skl2onnx: it reads the fitted attributes only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["ML_OPSETS", "average_path_length", "to_fused_onnx", "FusedForest", "extract"]

#: ``ai.onnx.ml`` opsets this converter emits: 3 -> ``TreeEnsembleRegressor``, 5 -> ``TreeEnsemble``.
ML_OPSETS = (3, 5)
#: The default-domain opset of the graph (``Exp``, ``Add``), the same as the stock conversion's.
DEFAULT_OPSET = 17
_BRANCH_LEQ = 0  # TreeEnsemble (opset 5) nodes_modes code for "x <= split"


def average_path_length(n: np.ndarray | int) -> np.ndarray:
    """``c(n)``: average path length of an unsuccessful BST search over ``n`` rows (sklearn's)."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


@dataclass(frozen=True)
class FusedForest:
    """All trees flattened, in float64 before conversion; node ids are per tree (root = 0).

    ``leaf`` marks leaves; for them ``value`` is the path-length contribution ``h = depth + c(n)``
    and ``feature``/``threshold``/``left``/``right`` are meaningless (zero / -1).
    """

    tree: np.ndarray  # int64, which tree a node belongs to
    node: np.ndarray  # int64, node id within its tree
    feature: np.ndarray  # int64, column of the FULL input
    threshold: np.ndarray  # float32, rounded down (see module docstring)
    left: np.ndarray  # int64, per-tree id of the "x <= threshold" child
    right: np.ndarray  # int64
    leaf: np.ndarray  # bool
    value: np.ndarray  # float64, h at leaves, 0 elsewhere
    n_trees: int
    n_features: int
    max_samples: int  # max_samples_ (ψ), rows drawn per tree
    c_psi: float  # c(ψ)
    offset: float  # offset_ (-0.5 with contamination="auto")


def _round_down_f32(t: np.ndarray) -> np.ndarray:
    """Largest float32 not above each float64 threshold."""
    f = t.astype(np.float32)
    above = f.astype(np.float64) > t
    f[above] = np.nextafter(f[above], np.float32(-np.inf))
    return f


def extract(model, n_features: int | None = None) -> FusedForest:
    """Flatten a fitted ``IsolationForest`` into a :class:`FusedForest`; refuses anything else."""
    for attr in ("estimators_", "estimators_features_", "max_samples_", "offset_"):
        if not hasattr(model, attr):
            raise TypeError(
                f"expected a fitted sklearn IsolationForest, got {type(model).__name__} "
                f"without {attr!r} (call fit first)"
            )
    fitted_width = int(model.n_features_in_)
    if n_features is not None and int(n_features) != fitted_width:
        raise ValueError(f"the forest was fitted on {fitted_width} features, not {n_features}")
    parts = {k: [] for k in ("tree", "node", "feature", "threshold", "left", "right", "leaf", "value")}
    for t, (est, cols) in enumerate(zip(model.estimators_, model.estimators_features_)):
        tr = est.tree_
        left = tr.children_left.astype(np.int64)
        right = tr.children_right.astype(np.int64)
        count = tr.node_count
        # sklearn numbers a child after its parent, so one forward pass sets every depth.
        depth = np.zeros(count, dtype=np.int64)
        for i in range(count):
            if left[i] != -1:
                depth[left[i]] = depth[right[i]] = depth[i] + 1
        is_leaf = left == -1
        cols = np.asarray(cols, dtype=np.int64)
        # A tree sees columns ``cols`` only when the forest subsamples features (bagging's rule).
        local = np.where(is_leaf, 0, tr.feature).astype(np.int64)
        feature = cols[local] if len(cols) != fitted_width else local
        value = np.where(is_leaf, depth + average_path_length(tr.n_node_samples), 0.0)
        parts["tree"].append(np.full(count, t, dtype=np.int64))
        parts["node"].append(np.arange(count, dtype=np.int64))
        parts["feature"].append(np.where(is_leaf, 0, feature))
        parts["threshold"].append(_round_down_f32(np.where(is_leaf, 0.0, tr.threshold)))
        parts["left"].append(left)
        parts["right"].append(right)
        parts["leaf"].append(is_leaf)
        parts["value"].append(value)
    flat = {k: np.concatenate(v) for k, v in parts.items()}
    return FusedForest(
        **flat,
        n_trees=len(model.estimators_),
        n_features=fitted_width,
        max_samples=int(model.max_samples_),
        c_psi=float(average_path_length(int(model.max_samples_))),
        offset=float(model.offset_),
    )


def to_fused_onnx(
    model, n_features: int | None = None, *, ml_opset: int = 3, input_name: str = "X",
    output_name: str = "score",
) -> onnx.ModelProto:
    """Convert a fitted IsolationForest: input ``X`` float32 ``[N, F]``, output ``score`` ``[N, 1]``.

    ``score = -decision_function(X)``, higher = more anomalous. ``ml_opset`` picks the node:
    3 (``TreeEnsembleRegressor``, the default) or 5 (``TreeEnsemble``).
    """
    if ml_opset not in ML_OPSETS:
        raise ValueError(f"ml_opset must be one of {ML_OPSETS}, got {ml_opset}")
    forest = extract(model, n_features)
    if forest.c_psi > 0:
        scale = -math.log(2.0) / (forest.n_trees * forest.c_psi)
        base = 0.0
    else:  # psi = 1: sklearn defines the exponent as -1 (score 0.5) whatever the depths
        scale, base = 0.0, -math.log(2.0)
    weights = forest.value * scale
    build = _tree_ensemble_v3 if ml_opset == 3 else _tree_ensemble_v5
    ensemble = build(forest, weights, base, input_name, "neg_log2_score")
    nodes = [
        ensemble,
        helper.make_node("Exp", ["neg_log2_score"], ["minus_score_samples"], name="pow2"),
        helper.make_node("Add", ["minus_score_samples", "offset"], [output_name], name="offset"),
    ]
    graph = helper.make_graph(
        nodes,
        "fused_isolation_forest",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [None, forest.n_features])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [None, 1])],
        initializer=[numpy_helper.from_array(np.array([forest.offset], dtype=np.float32), "offset")],
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", DEFAULT_OPSET), helper.make_opsetid("ai.onnx.ml", ml_opset)],
        producer_name="edgeloop",
        doc_string=(
            f"IsolationForest, {forest.n_trees} trees, max_samples={forest.max_samples}: "
            "score = -decision_function, higher = more anomalous"
        ),
    )
    proto.ir_version = min(proto.ir_version, 9)  # onnxruntime builds of 2024+ read IR 9
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _tree_ensemble_v3(forest: FusedForest, weights, base, x: str, y: str) -> onnx.NodeProto:
    """``TreeEnsembleRegressor`` (ai.onnx.ml 3): every node listed, leaves weighted, SUM."""
    leaf = forest.leaf
    modes = np.where(leaf, "LEAF", "BRANCH_LEQ").tolist()
    return helper.make_node(
        "TreeEnsembleRegressor",
        [x],
        [y],
        domain="ai.onnx.ml",
        name="isolation_forest",
        n_targets=1,
        aggregate_function="SUM",
        post_transform="NONE",
        base_values=[float(base)],
        nodes_treeids=forest.tree.tolist(),
        nodes_nodeids=forest.node.tolist(),
        nodes_featureids=forest.feature.tolist(),
        nodes_values=forest.threshold.tolist(),
        nodes_modes=modes,
        nodes_truenodeids=np.where(leaf, 0, forest.left).tolist(),
        nodes_falsenodeids=np.where(leaf, 0, forest.right).tolist(),
        nodes_missing_value_tracks_true=np.zeros(len(leaf), dtype=np.int64).tolist(),
        target_treeids=forest.tree[leaf].tolist(),
        target_nodeids=forest.node[leaf].tolist(),
        target_ids=np.zeros(int(leaf.sum()), dtype=np.int64).tolist(),
        target_weights=weights[leaf].astype(np.float32).tolist(),
    )


def _tree_ensemble_v5(forest: FusedForest, weights, base, x: str, y: str) -> onnx.NodeProto:
    """``TreeEnsemble`` (ai.onnx.ml 5): interior nodes and leaves in separate arrays.

    Node ids become global indices (interior nodes into ``nodes_*``, leaves into ``leaf_*``). A
    tree that is a single leaf gets one dummy split whose two branches reach that leaf. The base
    value (only non-zero when ψ = 1) is added to the first tree's leaves.
    """
    leaf = forest.leaf.copy()
    tree, feature, split = forest.tree, forest.feature.copy(), forest.threshold.copy()
    left, right = forest.left.copy(), forest.right.copy()
    weights = weights.copy()
    weights[forest.tree == 0] += base
    # Global position of every (tree, node) in its own array.
    starts = np.flatnonzero(forest.node == 0)
    interior_pos = np.cumsum(~leaf) - 1
    leaf_pos = np.cumsum(leaf) - 1
    roots = []
    extra_feat, extra_split, extra_true, extra_false = [], [], [], []
    n_interior = int((~leaf).sum())
    for t, s in enumerate(starts):
        if leaf[s]:  # single-leaf tree: a dummy interior node appended after the real ones
            roots.append(n_interior + len(extra_feat))
            extra_feat.append(0)
            extra_split.append(0.0)
            extra_true.append(leaf_pos[s])
            extra_false.append(leaf_pos[s])
        else:
            roots.append(interior_pos[s])
    inner = ~leaf
    base_of = starts[tree]  # flat index of each node's tree root
    lt, rt = left + base_of, right + base_of
    true_leaf = leaf[lt[inner]]
    false_leaf = leaf[rt[inner]]
    true_ids = np.where(true_leaf, leaf_pos[lt[inner]], interior_pos[lt[inner]])
    false_ids = np.where(false_leaf, leaf_pos[rt[inner]], interior_pos[rt[inner]])
    n_extra = len(extra_feat)
    feats = np.concatenate([feature[inner], np.array(extra_feat, dtype=np.int64)])
    splits = np.concatenate([split[inner], np.array(extra_split, dtype=np.float32)])
    trues = np.concatenate([true_ids, np.array(extra_true, dtype=np.int64)])
    falses = np.concatenate([false_ids, np.array(extra_false, dtype=np.int64)])
    true_is_leaf = np.concatenate([true_leaf, np.ones(n_extra, dtype=bool)]).astype(np.int64)
    false_is_leaf = np.concatenate([false_leaf, np.ones(n_extra, dtype=bool)]).astype(np.int64)
    modes = np.full(len(feats), _BRANCH_LEQ, dtype=np.uint8)
    n_leaves = int(leaf.sum())
    return helper.make_node(
        "TreeEnsemble",
        [x],
        [y],
        domain="ai.onnx.ml",
        name="isolation_forest",
        n_targets=1,
        aggregate_function=1,  # SUM
        post_transform=0,  # NONE
        tree_roots=[int(r) for r in roots],
        nodes_featureids=feats.tolist(),
        nodes_splits=numpy_helper.from_array(splits.astype(np.float32)),
        nodes_modes=numpy_helper.from_array(modes),
        nodes_truenodeids=trues.tolist(),
        nodes_trueleafs=true_is_leaf.tolist(),
        nodes_falsenodeids=falses.tolist(),
        nodes_falseleafs=false_is_leaf.tolist(),
        leaf_targetids=np.zeros(n_leaves, dtype=np.int64).tolist(),
        leaf_weights=numpy_helper.from_array(weights[leaf].astype(np.float32)),
    )
