"""How good a model is on held-out windows, and whether a challenger beats the champion.

Aggregator side (scikit-learn's metrics). A model here is anything with ``score_batch(X)`` and a
``threshold`` — the agent's own :class:`edge_agent.inference.Model`, so the numbers are those of
the exact ONNX graph the devices will run — or an ``(onnx_bytes, manifest)`` pair, loaded that way.

With labels (``y``: True = failure/fault window) :func:`evaluate` gives precision, recall, F1 at
the model's threshold and the ROC AUC of its scores; without labels only the score distribution
(quantiles and the share of windows over the threshold, the "anomaly rate"). :func:`compare` runs
both models on the same holdout and returns flat floats, ready for a manifest's ``metrics``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

__all__ = ["QUANTILES", "score_summary", "classification_metrics", "evaluate", "as_model", "compare"]

QUANTILES = (0.05, 0.5, 0.95, 0.99)


def score_summary(scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Quantiles of the scores, their mean and the share over ``threshold``."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("no scores to summarise")
    out = {f"score_p{round(q * 100)}": float(np.quantile(scores, q)) for q in QUANTILES}
    out["score_mean"] = float(scores.mean())
    out["anomaly_rate"] = float(np.mean(scores > threshold))
    out["rows"] = float(scores.size)
    return out


def classification_metrics(scores: np.ndarray, threshold: float, y: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of ``score > threshold`` against ``y``, and the scores' AUC.

    ``auc`` is left out when ``y`` holds one class only (it is undefined then, and a manifest's
    metrics must be finite); precision of a model that never alarms is 0.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=bool).ravel()
    if scores.shape != y.shape:
        raise ValueError(f"{scores.size} scores but {y.size} labels")
    pred = scores > threshold
    p, r, f, _ = precision_recall_fscore_support(
        y, pred, average="binary", pos_label=True, zero_division=0
    )
    out = {"precision": float(p), "recall": float(r), "f1": float(f), "positives": float(y.sum())}
    if 0 < y.sum() < y.size:
        out["auc"] = float(roc_auc_score(y, scores))
    return out


def as_model(model: Any) -> Any:
    """A scorer from a loaded model or an ``(onnx_bytes, manifest)`` pair."""
    if isinstance(model, tuple):
        from edge_agent.inference import Model

        return Model.load(model)
    if not (hasattr(model, "score_batch") and hasattr(model, "threshold")):
        raise TypeError(
            f"expected a model with score_batch() and threshold or (onnx_bytes, manifest), got "
            f"{type(model).__name__}"
        )
    return model


def evaluate(model: Any, X: np.ndarray, y: np.ndarray | None = None) -> dict[str, float]:
    """Score ``X`` with ``model``: the score summary, plus classification metrics if ``y``."""
    model = as_model(model)
    scores = model.score_batch(np.asarray(X, dtype=np.float32))
    out = score_summary(scores, model.threshold)
    if y is not None:
        out.update(classification_metrics(scores, model.threshold, y))
    return out


def _columns(model: Any, X: np.ndarray, names: Sequence[str] | None) -> np.ndarray:
    """``X``'s columns in the order the model expects (when ``names`` says what X holds)."""
    if names is None:
        return X
    wanted = list(model.feature_names)
    missing = sorted(set(wanted) - set(names))
    if missing:
        raise ValueError(f"model {model.version} needs features the holdout lacks: {missing[:5]}")
    pos = {n: k for k, n in enumerate(names)}
    return X[:, [pos[n] for n in wanted]]


def compare(
    challenger: Any,
    champion: Any,
    X_holdout: np.ndarray,
    y_holdout: np.ndarray | None = None,
    *,
    names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Both models on the same holdout: ``challenger_<metric>``, ``champion_<metric>`` and, for
    F1, AUC and the anomaly rate, ``delta_<metric>`` (challenger minus champion).

    ``names``: the holdout's column names, to feed each model its own column order.
    """
    X = np.asarray(X_holdout, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"X_holdout must be a non-empty 2-D matrix, got shape {X.shape}")
    out: dict[str, float] = {"holdout_rows": float(X.shape[0])}
    results = {}
    for role, model in (("challenger", challenger), ("champion", champion)):
        model = as_model(model)
        results[role] = evaluate(model, _columns(model, X, names), y_holdout)
        out.update({f"{role}_{k}": v for k, v in results[role].items() if k != "rows"})
    for key in ("f1", "auc", "anomaly_rate"):
        if key in results["challenger"] and key in results["champion"]:
            out[f"delta_{key}"] = results["challenger"][key] - results["champion"][key]
    return out
