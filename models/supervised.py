"""A supervised failure predictor where labels exist: a small time-budgeted model search.

Input: feature rows with their window end times and a target per row (True = failing, or about
to fail within the labels' horizon, see :func:`aggregator.labels.window_labels`). The rows are
split by TIME, never shuffled: the oldest ``1 - val_fraction`` train, the newest validate, so no
window of the validation period (nor its neighbours, which share slow trends) leaks into
training. A few estimators with two settings each (:func:`default_candidates`: logistic
regression, random forest, gradient boosting — the cheap ones first) are fitted on the training
part and ranked by F1 on the validation part; the search stops starting new candidates once
``budget_s`` has passed (at least one is always fitted).

The winner is exported with skl2onnx to the manifest convention: one float input ``X``
``[batch, n]`` and an output ``score`` ``[batch]`` = the probability of failure, so the agent's
Model serves it like any anomaly model (``anomaly = score > threshold``). The threshold is the
one that maximises F1 on the validation part, computed with the ONNX graph's own scores. The
model kept is the one fitted on the training part (refitting on everything would move the
probabilities the threshold was chosen for).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnx.utils
from onnx import helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from models import features
from models.evaluation import classification_metrics
from models.manifest import Manifest
from models.training import TARGET_OPSET, _check_matrix, onnx_manifest

__all__ = [
    "Candidate",
    "SearchResult",
    "default_candidates",
    "time_split",
    "best_threshold",
    "search",
    "to_onnx_classifier",
    "train_supervised",
]

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Candidate:
    """One estimator setting: ``family`` names the algorithm in the manifest."""

    name: str
    family: str
    params: dict[str, Any]
    build: Callable[[], Any]


@dataclass
class SearchResult:
    """The winner (fitted on the training part) and what the search tried."""

    best: Candidate
    estimator: Any
    val_f1: float
    tried: list[tuple[str, float, float]] = field(default_factory=list)  # (name, val F1, seconds)
    stopped_early: bool = False
    seconds: float = 0.0


def default_candidates(seed: int = 0) -> list[Candidate]:
    """Two or three settings each of three estimators, cheapest first."""
    out = []
    for c in (1.0, 0.1):
        out.append(Candidate(
            f"logreg_c{c:g}", "logistic_regression", {"C": c},
            lambda c=c: make_pipeline(StandardScaler(), LogisticRegression(
                C=c, class_weight="balanced", max_iter=2000)),
        ))
    for n, depth in ((100, 8), (200, None)):
        out.append(Candidate(
            f"forest_{n}_d{depth}", "random_forest", {"n_estimators": n, "max_depth": depth},
            lambda n=n, depth=depth: RandomForestClassifier(
                n_estimators=n, max_depth=depth, min_samples_leaf=2, class_weight="balanced",
                random_state=seed, n_jobs=1),
        ))
    for n, depth, rate in ((100, 3, 0.1), (200, 2, 0.05)):
        out.append(Candidate(
            f"boost_{n}_d{depth}", "gradient_boosting",
            {"n_estimators": n, "max_depth": depth, "learning_rate": rate},
            lambda n=n, depth=depth, rate=rate: GradientBoostingClassifier(
                n_estimators=n, max_depth=depth, learning_rate=rate, random_state=seed),
        ))
    return out


def time_split(times: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the oldest ``1 - val_fraction`` rows and of the newest ones."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.argsort(np.asarray(times, dtype=np.float64), kind="stable")
    cut = int(round(order.size * (1 - val_fraction)))
    return order[:cut], order[cut:]


def best_threshold(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising the F1 of ``score > threshold`` against ``y``."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=bool).ravel()
    cands = np.unique(s)
    cands = np.concatenate([[np.nextafter(cands[0], -np.inf)], cands[:-1]])
    order = np.argsort(s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    pos_after = np.cumsum(y_sorted[::-1])[::-1]  # positives among rows k.. (sorted ascending)
    first = np.searchsorted(s_sorted, cands, side="right")  # first row with score > threshold
    predicted = s.size - first
    tp = np.where(first < s.size, pos_after[np.minimum(first, s.size - 1)], 0)
    f1 = 2 * tp / np.maximum(predicted + y.sum(), 1)
    k = int(np.argmax(f1))
    return float(cands[k]), float(f1[k])


def _check_labels(X: np.ndarray, y: np.ndarray, times: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype=bool).ravel()
    if y.shape[0] != X.shape[0] or np.asarray(times).shape[0] != X.shape[0]:
        raise ValueError(f"{X.shape[0]} rows but {y.shape[0]} labels and {len(times)} times")
    return y


def search(
    X: np.ndarray,
    y: np.ndarray,
    times: np.ndarray,
    *,
    budget_s: float = 60.0,
    val_fraction: float = 0.3,
    candidates: Sequence[Candidate] | None = None,
    seed: int = 0,
    on_progress: Progress | None = None,
) -> SearchResult:
    """Fit candidates on the older rows, rank them by F1 on the newer ones, within ``budget_s``."""
    X = _check_matrix(X)
    y = _check_labels(X, y, times)
    train, val = time_split(times, val_fraction)
    for part, idx in (("training", train), ("validation", val)):
        n_pos = int(y[idx].sum())
        if n_pos == 0 or n_pos == idx.size:
            raise ValueError(
                f"the {part} part ({idx.size} rows, time-ordered split) holds "
                f"{'no' if n_pos == 0 else 'only'} failure windows; a supervised model needs both "
                "classes in both parts: add labels, widen the time range or the horizon"
            )
    cands = list(candidates) if candidates is not None else default_candidates(seed)
    if not cands:
        raise ValueError("no candidates to search")
    started = time.monotonic()
    best: tuple[float, Candidate, Any] | None = None
    tried: list[tuple[str, float, float]] = []
    stopped = False
    for k, cand in enumerate(cands):
        if tried and time.monotonic() - started >= budget_s:
            stopped = True
            break
        if on_progress:
            on_progress(f"fitting {cand.name} ({k + 1}/{len(cands)})", k, len(cands))
        t0 = time.monotonic()
        est = cand.build().fit(X[train], y[train].astype(np.int64))
        proba = est.predict_proba(X[val])[:, 1]
        _, f1 = best_threshold(proba, y[val])
        tried.append((cand.name, f1, time.monotonic() - t0))
        if best is None or f1 > best[0]:
            best = (f1, cand, est)
    if on_progress:
        on_progress(f"best: {best[1].name} (validation F1 {best[0]:.3f})", len(cands), len(cands))
    return SearchResult(best[1], best[2], best[0], tried, stopped, time.monotonic() - started)


def to_onnx_classifier(estimator: Any, n_features: int) -> onnx.ModelProto:
    """skl2onnx graph reduced to ``X`` -> ``score`` [batch] = probability of the class True/1."""
    final = estimator.steps[-1][1] if isinstance(estimator, Pipeline) else estimator
    if list(final.classes_) != [0, 1]:
        raise ValueError(f"expected classes [0, 1], got {list(final.classes_)}")
    proto = convert_sklearn(
        estimator,
        initial_types=[("X", FloatTensorType([None, n_features]))],
        target_opset=TARGET_OPSET,
        options={id(final): {"zipmap": False}},
    )
    graph = proto.graph
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(1, dtype=np.int64), "positive"))
    graph.node.append(helper.make_node(
        "Gather", ["probabilities", "positive"], ["score"], axis=1, name="failure_probability"))
    graph.output.append(helper.make_tensor_value_info("score", onnx.TensorProto.FLOAT, [None]))
    proto = onnx.utils.Extractor(proto).extract_model(["X"], ["score"])
    proto.producer_name = "edgeloop"
    onnx.checker.check_model(proto)
    return proto


def _onnx_scores(onnx_bytes: bytes, X: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return session.run(["score"], {"X": X.astype(np.float32)})[0].reshape(-1).astype(np.float64)


def train_supervised(
    X: np.ndarray,
    y: np.ndarray,
    times: np.ndarray,
    feature_names: Sequence[str],
    *,
    version: str,
    profile: str,
    seed: int = 0,
    budget_s: float = 60.0,
    val_fraction: float = 0.3,
    horizon_s: float = 0.0,
    candidates: Sequence[Candidate] | None = None,
    feature_set: str = features.FEATURE_SET,
    parent_version: str | None = None,
    on_progress: Progress | None = None,
) -> tuple[bytes, Manifest]:
    """Search, export the winner, pick its threshold on validation; ONNX bytes + manifest."""
    X = _check_matrix(X)
    if X.shape[1] != len(feature_names):
        raise ValueError(f"X has {X.shape[1]} columns but {len(feature_names)} feature names")
    result = search(X, y, times, budget_s=budget_s, val_fraction=val_fraction,
                    candidates=candidates, seed=seed, on_progress=on_progress)
    y = np.asarray(y, dtype=bool)
    train, val = time_split(times, val_fraction)
    proto = to_onnx_classifier(result.estimator, X.shape[1])
    onnx_bytes = proto.SerializeToString()
    val_scores = _onnx_scores(onnx_bytes, X[val])
    threshold, _ = best_threshold(val_scores, y[val])
    metrics = {f"val_{k}": v for k, v in classification_metrics(val_scores, threshold, y[val]).items()}
    t = np.asarray(times, dtype=np.float64)
    params: dict[str, int | float | str | None] = {
        f"model_{k}": v for k, v in result.best.params.items()
    }
    params.update(candidate=result.best.name, seed=seed, budget_s=float(budget_s),
                  val_fraction=float(val_fraction), horizon_s=float(horizon_s),
                  candidates_tried=len(result.tried), stopped_early=int(result.stopped_early))
    manifest = onnx_manifest(
        proto, onnx_bytes, version=version, profile=profile, feature_set=feature_set, feature_names=feature_names,
        threshold=threshold,
        algorithm=f"supervised_{result.best.family}",
        params=params,
        parent_version=parent_version,
        metrics={
            **metrics,
            "train_rows": float(train.size),
            "val_rows": float(val.size),
            "train_positives": float(y[train].sum()),
            "search_seconds": result.seconds,
        },
        training_window=(float(t.min()), float(t.max())),
    )
    return onnx_bytes, manifest
