"""Training recipes and ONNX conversion (aggregator side: imports scikit-learn, skl2onnx and onnx).

The recipe here is an isolation forest over ``basic-v1`` window features (no scaling needed: the
forest's random splits are invariant to per-feature affine maps). Score convention (see
:mod:`models.manifest`): the exported graph outputs ``score = -decision_function(X)``; with
``contamination="auto"`` that is the isolation-forest anomaly score of Liu et al. minus 0.5, so it
lies in (-0.5, 0.5) and HIGHER = MORE ANOMALOUS. The decision threshold is the
``threshold_quantile`` quantile of the training scores (99.5 % by default), so about 0.5 % of the
training windows, all of which are assumed normal, would alarm.

The simulated training set runs the simulator and the agent's own :func:`models.features.compute`,
so the features a model is trained on and the features it is served are the same code.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import msgspec
import numpy as np
import onnx
import onnx.utils
from onnx import helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import IsolationForest

from models import features
from models.fused_iforest import to_fused_onnx
from models.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, save_manifest, write_atomic

__all__ = [
    "TARGET_OPSET",
    "DEFAULT_MAX_SAMPLES",
    "CONVERTERS",
    "train_isolation_forest",
    "fit_isolation_forest",
    "to_onnx",
    "make_simulator",
    "simulated_windows",
    "simulated_training_set",
    "write_model",
    "MIN_STORE_ROWS",
    "agent_feature_order",
    "load_training_rows",
    "train_from_store",
]

#: Opsets of the exported graphs: the default domain and ai.onnx.ml (TreeEnsembleRegressor v3).
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
#: The fused isolation forest uses ai.onnx.ml 5's TreeEnsemble (onnxruntime >= 1.20): a third of
#: the bytes and a fraction of the session memory of opset 3's TreeEnsembleRegressor, same parity.
FUSED_ML_OPSET = 5
#: Rows drawn per tree. sklearn's "auto" (256) gives trees 8 levels deep: a window far outside
#: the training range then scores about like the most extreme training windows (the forest
#: saturates) and ~30 mostly unaffected features dilute it. 1024 rows (10 levels) raised the
#: detection of a half-size simulated bearing wear from ~60 % to ~85 % at the same ~1 % false
#: alarm rate, for twice the ONNX size.
DEFAULT_MAX_SAMPLES = 1024
#: ONNX conversions: "fused" (:mod:`models.fused_iforest`, one tree-ensemble node, ~7 µs per row
#: and ~35 ms to load at 1024 rows per tree) and "stock" (skl2onnx's converter, a subgraph per
#: tree, ~0.9 ms per row; kept as the benchmark baseline). Both output the same score.
CONVERTERS = ("fused", "stock")


def fit_isolation_forest(
    X: np.ndarray, *, seed: int, n_estimators: int = 100, max_samples: int = DEFAULT_MAX_SAMPLES
) -> IsolationForest:
    """Fit on float32 features (what the ONNX graph sees, so the two agree on every split)."""
    X = _check_matrix(X)
    model = IsolationForest(
        n_estimators=n_estimators,
        max_samples=min(int(max_samples), X.shape[0]),
        contamination="auto",
        random_state=seed,
        n_jobs=1,
    )
    return model.fit(X)


def to_onnx(model: IsolationForest, n_features: int, *, converter: str = "fused") -> onnx.ModelProto:
    """Convert to the manifest convention: input ``X``, output ``score = -decision_function``.

    ``converter="fused"`` builds one tree-ensemble node (:func:`models.fused_iforest.to_fused_onnx`).
    ``converter="stock"`` uses skl2onnx, which emits ``label`` and ``scores`` (=
    decision_function); we keep only the scores, negate them, and drop the nodes that only
    served ``label``.
    """
    if converter == "fused":
        return to_fused_onnx(model, n_features, ml_opset=FUSED_ML_OPSET)
    if converter != "stock":
        raise ValueError(f"converter must be one of {CONVERTERS}, got {converter!r}")
    proto = convert_sklearn(
        model,
        initial_types=[("X", FloatTensorType([None, n_features]))],
        target_opset=TARGET_OPSET,
    )
    graph = proto.graph
    graph.node.append(helper.make_node("Neg", ["scores"], ["score"], name="anomaly_score"))
    graph.output.append(helper.make_tensor_value_info("score", onnx.TensorProto.FLOAT, [None, 1]))
    proto = onnx.utils.Extractor(proto).extract_model(["X"], ["score"])
    proto.producer_name = "edgeloop"
    onnx.checker.check_model(proto)
    return proto


def train_isolation_forest(
    X: np.ndarray,
    feature_names: Sequence[str],
    *,
    version: str,
    profile: str,
    seed: int,
    n_estimators: int = 100,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    threshold_quantile: float = 0.995,
    feature_set: str = features.FEATURE_SET,
    parent_version: str | None = None,
    training_window: tuple[float, float] = (0.0, 0.0),
    converter: str = "fused",
) -> tuple[bytes, Manifest]:
    """Train on normal feature rows; return the ONNX bytes and a manifest (sha256 filled in).

    ``converter`` picks the ONNX conversion (see :data:`CONVERTERS`); the score is the same.
    """
    X = _check_matrix(X)
    if X.shape[1] != len(feature_names):
        raise ValueError(f"X has {X.shape[1]} columns but {len(feature_names)} feature names")
    if not 0.5 <= threshold_quantile < 1:
        raise ValueError(f"threshold_quantile must be in [0.5, 1), got {threshold_quantile}")
    if converter not in CONVERTERS:
        raise ValueError(f"converter must be one of {CONVERTERS}, got {converter!r}")
    started = time.perf_counter()
    model = fit_isolation_forest(X, seed=seed, n_estimators=n_estimators, max_samples=max_samples)
    scores = -model.decision_function(X)
    threshold = float(np.quantile(scores, threshold_quantile))
    fit_s = time.perf_counter() - started

    proto = to_onnx(model, X.shape[1], converter=converter)
    onnx_bytes = proto.SerializeToString()
    manifest = onnx_manifest(
        proto, onnx_bytes, version=version, profile=profile, feature_set=feature_set, feature_names=feature_names,
        threshold=threshold,
        params={
            "n_estimators": n_estimators,
            "max_samples": min(int(max_samples), X.shape[0]),
            "seed": seed,
            "threshold_quantile": threshold_quantile,
            "converter": converter,
        },
        parent_version=parent_version,
        metrics={
            "train_rows": float(X.shape[0]),
            "train_alarm_rate": float(np.mean(scores > threshold)),
            "train_score_p50": float(np.median(scores)),
            "fit_seconds": fit_s,
        },
        training_window=(float(training_window[0]), float(training_window[1])),
    )
    return onnx_bytes, manifest


def onnx_manifest(proto: onnx.ModelProto, onnx_bytes: bytes, *, version: str, profile: str, feature_set: str,
                  feature_names: Sequence[str], threshold: float, metrics: dict | None = None,
                  **fields) -> Manifest:
    """The manifest of an exported model: what every recipe fills in the same way (input shape
    from the feature names, the default-domain opset read from the graph, sha256, created, the
    ONNX size among the metrics) plus the recipe's own ``fields`` (params, algorithm, ...)."""
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return Manifest(
        version=version, profile=profile, feature_set=feature_set, feature_names=list(feature_names),
        input_shape=[-1, len(feature_names)], opset=opset, threshold=threshold,
        sha256=hashlib.sha256(onnx_bytes).hexdigest(), created=time.time(),
        metrics={**(metrics or {}), "onnx_bytes": float(len(onnx_bytes))}, **fields)


def write_model(directory: str | os.PathLike, onnx_bytes: bytes, manifest: Manifest) -> Path:
    """Write ``model.onnx`` then ``manifest.json`` (sha256 set from the bytes), each atomically."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(onnx_bytes).hexdigest()
    if manifest.sha256 != digest:
        manifest = msgspec.structs.replace(manifest, sha256=digest)
    write_atomic(d / MODEL_FILE, onnx_bytes)
    save_manifest(d / MANIFEST_FILE, manifest)
    return d


# -- stored data ----------------------------------------------------------------------------------

#: Fewer stored feature rows than this and :func:`train_from_store` refuses: a forest of a few
#: dozen windows has seen too little of the normal regime to tell it from a fault.
MIN_STORE_ROWS = 200


def agent_feature_order(names: Sequence[str], profile: str) -> list[str]:
    """The order the profile's agents compute ``names`` in, when it can be known here.

    Stores cannot keep a feature vector's order (InfluxDB returns fields sorted), but an agent
    refuses a model whose ``feature_names`` differ from its own, order included. For a simulated
    profile whose features are exactly ``basic-v1`` of its channels that order is the one of
    :func:`models.features.feature_names`; otherwise the names come back sorted, and the caller
    should pass the order explicitly (e.g. the champion's ``feature_names``).
    """
    try:
        sim = make_simulator(profile, seed=0)
    except ValueError:
        return sorted(names)
    expected = features.feature_names(sim.channels)
    return expected if set(expected) == set(names) else sorted(names)


def load_training_rows(
    store,
    profile: str,
    start: float | None,
    end: float | None,
    *,
    feature_names: Sequence[str] | None = None,
    feature_set: str = features.FEATURE_SET,
    min_rows: int = MIN_STORE_ROWS,
    limit: int | None = None,
    exclude: Callable[[np.ndarray, Sequence[str]], np.ndarray] | None = None,
):
    """Unflagged feature rows of ``profile`` from ``store`` (a ``base.Store``), columns in
    ``feature_names`` order (default: :func:`agent_feature_order` of the stored names).

    ``exclude(times, devices)`` returns a boolean mask of rows to leave out as well: the
    retrainer passes one that marks windows in and around labelled faults, so a model of
    "normal" does not learn the faults it should catch.

    Refuses with a ValueError that says what was found when fewer than ``min_rows`` remain.
    """
    kw = {} if limit is None else {"limit": limit}
    rows = store.feature_rows(profile, start, end, feature_set=feature_set,
                              names=feature_names, exclude_flagged=True, **kw)
    if feature_names is None and rows.names:
        order = agent_feature_order(rows.names, profile)
        pos = {n: k for k, n in enumerate(rows.names)}
        rows = rows._replace(names=order, matrix=rows.matrix[:, [pos[n] for n in order]])
    left_out = 0
    if exclude is not None and len(rows.devices):
        drop = np.asarray(exclude(np.asarray(rows.times, dtype=np.float64), rows.devices), dtype=bool)
        left_out = int(drop.sum())
        if left_out:
            keep = np.flatnonzero(~drop)
            rows = rows._replace(devices=[rows.devices[k] for k in keep], times=np.asarray(rows.times)[keep],
                                 matrix=rows.matrix[keep])
    if len(rows.devices) < min_rows:
        span = f"[{start}, {end})" if start is not None or end is not None else "all time"
        raise ValueError(
            f"only {len(rows.devices)} unflagged {feature_set} feature rows of profile "
            f"{profile!r} in {span} in the {getattr(store, 'name', 'store')} store; need at least "
            f"{min_rows}" + (f" ({left_out} in or near labelled faults left out)" if left_out else "")
            + ": widen --since/--until or let the devices run longer"
        )
    return rows


def train_from_store(
    store,
    profile: str,
    start: float | None,
    end: float | None,
    *,
    version: str,
    feature_names: Sequence[str] | None = None,
    feature_set: str = features.FEATURE_SET,
    min_rows: int = MIN_STORE_ROWS,
    limit: int | None = None,
    exclude: Callable[[np.ndarray, Sequence[str]], np.ndarray] | None = None,
    **train_kw,
) -> tuple[bytes, Manifest]:
    """An isolation forest on the store's unflagged feature rows of ``profile`` in [start, end),
    less the rows ``exclude`` marks (see :func:`load_training_rows`).

    ``training_window`` is the time span of the rows used; ``train_kw`` go to
    :func:`train_isolation_forest` (seed, n_estimators, parent_version, threshold_quantile, ...).
    """
    rows = load_training_rows(store, profile, start, end, feature_names=feature_names,
                              feature_set=feature_set, min_rows=min_rows, limit=limit, exclude=exclude)
    train_kw.setdefault("seed", 0)
    onnx_bytes, manifest = train_isolation_forest(
        rows.matrix, rows.names, version=version, profile=profile, feature_set=feature_set,
        training_window=(float(rows.times[0]), float(rows.times[-1])), **train_kw,
    )
    manifest.metrics["train_devices"] = float(len(set(rows.devices)))
    return onnx_bytes, manifest


# -- simulated data -------------------------------------------------------------------------------


def make_simulator(profile: str, *, seed: int, rate_hz: float = 10.0, faults=(), drift=()):
    """A simulator for ``profile`` (``machine``, ``cold-chain``, ``wearable``: :mod:`simulators.profiles`)."""
    from simulators import profiles

    return profiles.create(profile, seed=seed, rate_hz=rate_hz, faults=faults, drift=drift)


def simulated_windows(
    simulator, *, windows: int, window_len: int = 50, stride: int | None = None, start: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Features of consecutive windows and their labels (a window takes its last sample's label).

    Window k covers samples ``start + k*stride .. + window_len - 1``; ``stride`` defaults to
    ``window_len`` (no overlap). Times are ``i / rate_hz``, as the sampler would stamp them.
    """
    stride = window_len if stride is None else stride
    if windows < 1 or window_len < 1 or stride < 1:
        raise ValueError("windows, window_len and stride must be >= 1")
    total = (windows - 1) * stride + window_len
    data = simulator.block(start, total)
    t = np.arange(start, start + total) / simulator.rate_hz
    labels = simulator.labels(start, total)
    channels = simulator.channels
    X = np.empty((windows, len(features.feature_names(channels))))
    y = np.empty(windows, dtype=bool)
    for k in range(windows):
        a = k * stride
        X[k] = features.compute(data[a : a + window_len], t[a : a + window_len], channels)
        y[k] = labels[a + window_len - 1]
    return X, y


def simulated_training_set(
    profile: str = "machine",
    seed: int = 0,
    *,
    windows: int = 2000,
    window_len: int = 50,
    rate_hz: float = 10.0,
    stride: int | None = None,
    machines: int = 1,
) -> tuple[np.ndarray, list[str]]:
    """Features of ``windows`` windows of normal (fault-free) simulated data, and their names.

    The windows are split evenly over ``machines`` simulated machines (seeds ``seed``,
    ``seed + 1``, ...), like a model trained on a fleet's published features.
    """
    if machines < 1 or windows < machines:
        raise ValueError(f"need 1 <= machines <= windows, got machines={machines}, windows={windows}")
    parts = []
    for k in range(machines):
        sim = make_simulator(profile, seed=seed + k, rate_hz=rate_hz)
        count = windows // machines + (1 if k < windows % machines else 0)
        X, _ = simulated_windows(sim, windows=count, window_len=window_len, stride=stride)
        parts.append(X)
    return np.vstack(parts), features.feature_names(sim.channels)


def _check_matrix(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] < 2 or X.shape[1] < 1:
        raise ValueError(f"X must be a 2-D matrix with at least 2 rows, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("X holds NaN or infinite values")
    return X
