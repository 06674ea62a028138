"""Feature drift between a model's training window and a recent window (numpy only).

Two statistics per feature, both computed against the *reference* (training) distribution:

* PSI, the population stability index: the reference is cut into ``bins`` quantile bins (so each
  holds about the same share of training rows), both samples are counted into them and
  ``PSI = sum((p_recent - p_ref) * ln(p_recent / p_ref))``. Shares are floored at ``EPS`` so an
  empty bin does not make it infinite. Rules of thumb: < 0.1 stable, 0.1-0.2 moderate, > 0.2 a
  shift worth retraining for (the default threshold).
* KS, the two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical
  CDFs, in [0, 1]. Reported alongside PSI and optionally also thresholded.

:func:`drift_report` returns a :class:`DriftReport` with every feature's numbers, the features
that drift most and a verdict. Only numpy is used, so this could run on a device too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["EPS", "DEFAULT_PSI_THRESHOLD", "psi", "ks_statistic", "out_of_range_share", "DriftReport",
           "drift_report"]

#: Floor for a bin's share in the PSI formula.
EPS = 1e-4
DEFAULT_PSI_THRESHOLD = 0.2


def _bin_edges(reference: np.ndarray, bins: int) -> np.ndarray:
    """Inner edges of ``bins`` quantile bins of ``reference`` (repeated quantiles merged)."""
    qs = np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(qs)


def psi(reference: np.ndarray, recent: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``recent`` against ``reference`` (1-D samples)."""
    reference = np.asarray(reference, dtype=np.float64).ravel()
    recent = np.asarray(recent, dtype=np.float64).ravel()
    if reference.size == 0 or recent.size == 0:
        raise ValueError("psi needs at least one value in each sample")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    edges = _bin_edges(reference, bins)
    # Bins are (-inf, e0], (e0, e1], ..., (e_last, inf): a value equal to an edge falls in the
    # bin the edge closes, as np.quantile puts that share of the reference at or below it. A
    # constant reference thus gets two bins, "at or below its value" and "above".
    ref_counts = np.bincount(np.searchsorted(edges, reference), minlength=edges.size + 1)
    cur_counts = np.bincount(np.searchsorted(edges, recent), minlength=edges.size + 1)
    p = np.maximum(ref_counts / reference.size, EPS)
    q = np.maximum(cur_counts / recent.size, EPS)
    return float(np.sum((q - p) * np.log(q / p)))


def ks_statistic(reference: np.ndarray, recent: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: max |F_reference(x) - F_recent(x)|."""
    a = np.sort(np.asarray(reference, dtype=np.float64).ravel())
    b = np.sort(np.asarray(recent, dtype=np.float64).ravel())
    if a.size == 0 or b.size == 0:
        raise ValueError("ks_statistic needs at least one value in each sample")
    points = np.concatenate([a, b])
    fa = np.searchsorted(a, points, side="right") / a.size
    fb = np.searchsorted(b, points, side="right") / b.size
    return float(np.max(np.abs(fa - fb)))


def out_of_range_share(reference: np.ndarray, recent: np.ndarray) -> np.ndarray:
    """Per column, the share of ``recent`` rows below the reference's minimum or above its maximum."""
    reference = np.asarray(reference, dtype=np.float64)
    recent = np.asarray(recent, dtype=np.float64)
    if reference.ndim != 2 or recent.ndim != 2 or reference.shape[1] != recent.shape[1]:
        raise ValueError(f"need two 2-D samples with the same columns, got {reference.shape} and {recent.shape}")
    if reference.shape[0] < 1 or recent.shape[0] < 1:
        raise ValueError("out_of_range_share needs at least one row in each sample")
    outside = (recent < reference.min(axis=0)) | (recent > reference.max(axis=0))
    return outside.mean(axis=0)


@dataclass(frozen=True)
class DriftReport:
    """Per-feature PSI and KS of a recent window against the reference, and the verdict.

    ``drifted`` is true when some feature's PSI exceeds ``psi_threshold`` (or, when
    ``ks_threshold`` is set, its KS exceeds that). With ``range_threshold`` set it is true when
    some feature's out-of-range share exceeds that instead (PSI is then only reported; see the
    module docstring). ``top`` lists the most drifting features by PSI, as (name, psi, ks).
    """

    names: list[str]
    psi: np.ndarray
    ks: np.ndarray
    psi_threshold: float
    ks_threshold: float | None
    reference_rows: int
    recent_rows: int
    top: list[tuple[str, float, float]] = field(default_factory=list)
    outside: np.ndarray | None = None  # per feature, the share of recent rows out of the reference's range
    range_threshold: float | None = None

    @property
    def max_outside(self) -> float:
        return float(self.outside.max()) if self.outside is not None and self.outside.size else 0.0

    @property
    def max_psi(self) -> float:
        return float(self.psi.max()) if self.psi.size else 0.0

    @property
    def drifting(self) -> list[str]:
        """Features over a threshold, most drifting first."""
        if self.range_threshold is not None:
            order = np.argsort(-self.outside, kind="stable")
            return [self.names[i] for i in order if self.outside[i] > self.range_threshold]
        over = self.psi > self.psi_threshold
        if self.ks_threshold is not None:
            over |= self.ks > self.ks_threshold
        order = np.argsort(-self.psi, kind="stable")
        return [self.names[i] for i in order if over[i]]

    @property
    def drifted(self) -> bool:
        return bool(self.drifting)

    @property
    def verdict(self) -> str:
        if self.range_threshold is not None:
            worst = self.drifting[:3] or [self.names[int(np.argmax(self.outside))]]
            shown = ", ".join(f"{n} ({self.outside[self.names.index(n)]:.0%} out of range)" for n in worst)
            head = "drift" if self.drifted else f"no drift (<= {self.range_threshold:.0%} out of range)"
            return (f"{head}: {shown}; max PSI {self.max_psi:.2f} ({self.recent_rows} recent vs "
                    f"{self.reference_rows} reference rows)")
        if not self.drifted:
            return (
                f"no drift: max PSI {self.max_psi:.3f} <= {self.psi_threshold} over "
                f"{len(self.names)} features ({self.recent_rows} recent vs {self.reference_rows} "
                "reference rows)"
            )
        shown = ", ".join(f"{n} (PSI {p:.2f}, KS {k:.2f})" for n, p, k in self.top[:3])
        return f"drift in {len(self.drifting)} of {len(self.names)} features: {shown}"

    def as_metrics(self, prefix: str = "drift_") -> dict[str, float]:
        """Flat floats for a manifest's metrics or a log line."""
        return {
            f"{prefix}max_psi": self.max_psi,
            f"{prefix}max_ks": float(self.ks.max()) if self.ks.size else 0.0,
            f"{prefix}features": float(len(self.drifting)),
            f"{prefix}max_outside": self.max_outside,
        }


def drift_report(
    reference: np.ndarray,
    recent: np.ndarray,
    names: Sequence[str],
    *,
    psi_threshold: float = DEFAULT_PSI_THRESHOLD,
    ks_threshold: float | None = None,
    range_threshold: float | None = None,
    bins: int = 10,
    top: int = 5,
) -> DriftReport:
    """Compare every column of ``recent`` with the same column of ``reference``; see
    :class:`DriftReport` for what ``psi_threshold``, ``ks_threshold`` and ``range_threshold`` decide."""
    reference = np.asarray(reference, dtype=np.float64)
    recent = np.asarray(recent, dtype=np.float64)
    if reference.ndim != 2 or recent.ndim != 2:
        raise ValueError("reference and recent must be 2-D (rows x features)")
    if not reference.shape[1] == recent.shape[1] == len(names):
        raise ValueError(
            f"column counts differ: reference {reference.shape[1]}, recent {recent.shape[1]}, "
            f"{len(names)} names"
        )
    if reference.shape[0] < bins or recent.shape[0] < 1:
        raise ValueError(
            f"need at least {bins} reference rows and 1 recent row, got {reference.shape[0]} "
            f"and {recent.shape[0]}"
        )
    if not psi_threshold > 0:
        raise ValueError(f"psi_threshold must be > 0, got {psi_threshold}")
    if range_threshold is not None and not 0 <= range_threshold < 1:
        raise ValueError(f"range_threshold must be in [0, 1), got {range_threshold}")
    psis = np.array([psi(reference[:, j], recent[:, j], bins) for j in range(len(names))])
    kss = np.array([ks_statistic(reference[:, j], recent[:, j]) for j in range(len(names))])
    order = np.argsort(-psis, kind="stable")[:top]
    return DriftReport(
        names=list(names),
        psi=psis,
        ks=kss,
        psi_threshold=float(psi_threshold),
        ks_threshold=ks_threshold,
        reference_rows=int(reference.shape[0]),
        recent_rows=int(recent.shape[0]),
        top=[(names[i], float(psis[i]), float(kss[i])) for i in order],
        outside=out_of_range_share(reference, recent),
        range_threshold=None if range_threshold is None else float(range_threshold),
    )
