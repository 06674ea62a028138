"""Window features, feature set ``basic-v1`` (numpy only: the agent and the trainer share this code).

For every channel, in channel order: ``mean``, ``std`` (population, ddof=0), ``min``, ``max``,
``last`` (the last valid value), ``slope`` (least squares on the sample times, units per second)
and ``rms`` (root mean square of the raw values). For each *spectral* channel three more follow:
``band_low``, ``band_mid``, ``band_high``, the power of the mean-removed signal in the thirds
(0, 1/3], (1/3, 2/3], (2/3, 1] of the Nyquist frequency, in squared channel units. They come from
the one-sided rFFT scaled by Parseval, so the three bands add up to the window's variance. The
spectrum assumes evenly spaced samples: the sampler runs at a fixed rate and marks a missing
reading as NaN rather than dropping the row.

Missing values: NaN or infinite entries are ignored channel by channel; they never spill into
another channel's features. For the spectrum a missing sample is set to the channel mean (0 after
mean removal) and the band powers are scaled by ``n / n_valid``. Rules for thin windows:

* a channel with no valid value yields 0 for every one of its features (a dead sensor then looks
  anomalous to the model, which is what we want; the caller flags the data quality);
* ``slope`` is 0 with fewer than two valid values or when all their times are equal;
* band powers are 0 with fewer than two valid values.

Names are ``{channel}__{stat}`` and match the wire contract's name pattern.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

__all__ = ["FEATURE_SET", "STATS", "BANDS", "NAME_RE", "feature_names", "compute"]

FEATURE_SET = "basic-v1"
STATS = ("mean", "std", "min", "max", "last", "slope", "rms")
BANDS = ("band_low", "band_mid", "band_high")
DEFAULT_SPECTRAL = ("vibration",)
#: Same as ``edgeloop.wire.NAME_PATTERN`` (not imported, so this module stays numpy-only).
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


def feature_names(
    channels: Sequence[str], spectral_channels: Sequence[str] = DEFAULT_SPECTRAL
) -> list[str]:
    """The names of the values :func:`compute` returns, in the same order."""
    if len(set(channels)) != len(channels):
        raise ValueError(f"channel names repeat: {list(channels)}")
    spectral = set(spectral_channels)
    names: list[str] = []
    for ch in channels:
        stats = STATS + BANDS if ch in spectral else STATS
        for stat in stats:
            name = f"{ch}__{stat}"
            if not NAME_RE.match(name):
                raise ValueError(
                    f"channel {ch!r} gives the feature name {name!r}, which does not match "
                    f"{NAME_RE.pattern}; channel names must start with a letter, use only "
                    "letters, digits and '_', and be at most 53 characters long"
                )
            names.append(name)
    return names


def _band_matrix(n: int) -> np.ndarray:
    """(bins, 3) matrix: the one-sided Parseval weight of each rFFT bin in each band.

    Bin k sits at k/n cycles per sample; it belongs to band b when its fraction of the Nyquist
    frequency (0.5) lies in (b/3, (b+1)/3]. DC belongs to no band.
    """
    third = np.ceil(np.fft.rfftfreq(n) / 0.5 * 3 - 1e-9).astype(np.int64) - 1
    weight = np.full(third.shape, 2.0 / (n * n))
    if n % 2 == 0:
        weight[-1] = 1.0 / (n * n)  # the Nyquist bin has no mirror image
    m = np.zeros((third.size, 3))
    for b in range(3):
        m[1:][third[1:] == b, b] = weight[1:][third[1:] == b]
    return m


def compute(
    window: np.ndarray,
    t: np.ndarray,
    channels: Sequence[str],
    spectral_channels: Sequence[str] = DEFAULT_SPECTRAL,
) -> np.ndarray:
    """Feature vector (float64, in :func:`feature_names` order) of one window.

    ``window`` has shape ``(n, len(channels))``, NaN where a reading is missing; ``t`` holds the
    n (finite) sample times in seconds.
    """
    x = np.asarray(window, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(channels):
        raise ValueError(f"window must have shape (n, {len(channels)}), got {x.shape}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("window is empty")
    if t.shape != (n,):
        raise ValueError(f"t must have shape ({n},), got {t.shape}")

    key = (tuple(channels), tuple(spectral_channels), n)
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = _layout(channels, spectral_channels, n)
    spectral, order, band_m = layout

    valid = np.isfinite(x)
    if valid.all():
        stats, dev, count = _stats_dense(x, t)
    else:
        stats, dev, count = _stats_sparse(x, t, valid)

    if not spectral:
        return stats.T.ravel()
    spec = np.abs(np.fft.rfft(dev[:, spectral], axis=0)) ** 2  # (bins, s)
    bands = spec.T @ band_m
    if count is not None:
        bands *= (n / np.maximum(count[spectral], 1))[:, None]
        bands[count[spectral] < 2] = 0.0
    elif n < 2:
        bands[:] = 0.0
    return np.concatenate((stats.T.ravel(), bands.ravel()))[order]


_LAYOUTS: dict[tuple, tuple[list[int], np.ndarray, np.ndarray]] = {}


def _layout(channels: Sequence[str], spectral_channels: Sequence[str], n: int):
    """Which channels are spectral, and the permutation that interleaves bands after stats."""
    feature_names(channels, spectral_channels)  # refuse repeated or unusable channel names once
    wanted = set(spectral_channels)
    spectral = [j for j, ch in enumerate(channels) if ch in wanted]
    c, k, b = len(channels), len(STATS), len(BANDS)
    order: list[int] = []
    for j in range(c):
        order.extend(range(j * k, (j + 1) * k))
        if j in spectral:
            s = spectral.index(j)
            order.extend(range(c * k + s * b, c * k + (s + 1) * b))
    layout = (spectral, np.array(order, dtype=np.intp), _band_matrix(n))
    if len(_LAYOUTS) < 256:
        _LAYOUTS[(tuple(channels), tuple(spectral_channels), n)] = layout
    return layout


def _stats_dense(x: np.ndarray, t: np.ndarray):
    """STATS for a window without missing values: (stats (7, c), mean-removed x, None)."""
    mean = x.mean(axis=0)
    dev = x - mean
    std = np.sqrt(np.einsum("ij,ij->j", dev, dev) / x.shape[0])
    rms = np.sqrt(np.einsum("ij,ij->j", x, x) / x.shape[0])
    t_dev = t - t.mean()
    sxx = t_dev @ t_dev
    slope = (t_dev @ dev) / sxx if sxx > 0 else np.zeros_like(mean)
    return np.stack((mean, std, x.min(axis=0), x.max(axis=0), x[-1], slope, rms)), dev, None


def _stats_sparse(x: np.ndarray, t: np.ndarray, valid: np.ndarray):
    """STATS ignoring invalid entries per channel: (stats, mean-removed x with 0 holes, count)."""
    n = x.shape[0]
    count = valid.sum(axis=0)
    safe_count = np.maximum(count, 1)
    xz = np.where(valid, x, 0.0)
    mean = xz.sum(axis=0) / safe_count
    dev = np.where(valid, x - mean, 0.0)
    std = np.sqrt((dev * dev).sum(axis=0) / safe_count)
    rms = np.sqrt((xz * xz).sum(axis=0) / safe_count)
    lo = np.where(valid, x, np.inf).min(axis=0)
    hi = np.where(valid, x, -np.inf).max(axis=0)
    last = x[n - 1 - np.argmax(valid[::-1], axis=0), np.arange(x.shape[1])]

    # Least squares slope per channel over that channel's own valid sample times.
    t_mean = np.where(valid, t[:, None], 0.0).sum(axis=0) / safe_count
    t_dev = np.where(valid, t[:, None] - t_mean, 0.0)
    sxx = (t_dev * t_dev).sum(axis=0)
    sxy = (t_dev * dev).sum(axis=0)
    slope = np.divide(sxy, sxx, out=np.zeros_like(sxy), where=(sxx > 0) & (count >= 2))

    stats = np.stack((mean, std, lo, hi, last, slope, rms))
    stats[:, count == 0] = 0.0
    return stats, dev, count
