"""Data-quality checks at the edge: flag bad readings as they are sampled.

Every reading gets a bit mask (``Reading.flags`` on the wire); a window's ``Features.flags`` is
the OR of its readings' masks (:func:`combine`). The bits live here, in one place, so that the
agent, the aggregator and the dashboards name them the same way (:func:`describe`). Device bits
stay below 256; bits from 256 up are reserved for the aggregator (:data:`TIME_ADJUSTED`).

Checks, each O(1) per reading and channel (streaming, no history beyond a few samples):

=============  ==================================================================================
out_of_range   value outside the channel's configured ``[min, max]`` (or ±inf)
stuck          value unchanged within ``stuck_tolerance`` for ``>= stuck_n`` consecutive readings
spike          ``|x - median of the last spike_window values| > spike_k x robust scale``; the
               scale is an EWMA of the clipped absolute deviation, learnt over ``spike_warmup``
               readings before the check starts. A step change is flagged for about half the
               median window, then the median has moved with it.
missing        value ``None`` or NaN (no value at that sample time)
gap            the sample time advanced more than ``gap_factor`` x the sampling period
clock_step     set by the sampler when :class:`edge_agent.clock.ClockWatch` sees a wall-clock step
=============  ==================================================================================

Use (the sampler owns the clock; ``t`` is the reading's time, ``period_s`` in the same units)::

    from edge_agent import quality
    checker = quality.QualityChecker(source.channels, config.quality, period_s=1 / rate_hz)
    flags = checker.check(t, values)             # int bit mask for wire.Reading(t, values, flags)
    if clock_step is not None:
        flags |= quality.CLOCK_STEP
    window_flags = quality.combine(flags_of_the_window_readings)   # -> Features.flags
    checker.counts()    # {"vibration": {"out_of_range": 0, "stuck": 0, "spike": 2, "missing": 0}, ...}
    quality.describe(5) # ["out_of_range", "spike"]

Configuration (TOML, under ``[quality]``)::

    stuck_n = 50
    spike_k = 8.0
    [quality.ranges]
    vibration = [-50.0, 50.0]
    bearing_temp = [-20.0, 120.0]
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from typing import Annotated, Iterable, Sequence

from msgspec import Meta, Struct

__all__ = [
    "OUT_OF_RANGE",
    "STUCK",
    "SPIKE",
    "GAP",
    "CLOCK_STEP",
    "MISSING",
    "TIME_ADJUSTED",
    "DEVICE_MASK",
    "FLAGS",
    "CHECKS",
    "describe",
    "combine",
    "QualitySettings",
    "QualityChecker",
]

OUT_OF_RANGE = 1 << 0
STUCK = 1 << 1
SPIKE = 1 << 2
GAP = 1 << 3
CLOCK_STEP = 1 << 4
MISSING = 1 << 5
#: Set by the aggregator when it corrected a device timestamp; devices never set bits >= 256.
TIME_ADJUSTED = 1 << 8
#: The bits a device may set.
DEVICE_MASK = 0xFF

#: Every named bit, in bit order.
FLAGS: dict[str, int] = {
    "out_of_range": OUT_OF_RANGE,
    "stuck": STUCK,
    "spike": SPIKE,
    "gap": GAP,
    "clock_step": CLOCK_STEP,
    "missing": MISSING,
    "time_adjusted": TIME_ADJUSTED,
}
#: The per-channel checks counted by :meth:`QualityChecker.counts`.
CHECKS = ("out_of_range", "stuck", "spike", "missing")


def describe(flags: int) -> list[str]:
    """Names of the bits set in ``flags``, in bit order; unnamed bits read ``bit<N>``."""
    if flags < 0:
        raise ValueError(f"flags must be >= 0, got {flags}")
    names = [name for name, bit in FLAGS.items() if flags & bit]
    rest = flags & ~sum(FLAGS.values())
    n = 0
    while rest:
        if rest & 1:
            names.append(f"bit{n}")
        rest >>= 1
        n += 1
    return names


def combine(flags: Iterable[int]) -> int:
    """The OR of the readings' masks: the flags of the window (``Features.flags``) they form."""
    out = 0
    for f in flags:
        out |= f
    return out


class QualitySettings(Struct, kw_only=True, forbid_unknown_fields=True):
    """Data-quality check settings; a count or factor of 0 turns its check off.

    The defaults flag none of the simulated machine's normal data (< 0.5 %, tested) and catch
    stuck, spiking and missing sensors. ``ranges`` is per channel; a channel not named there has
    no range check.
    """

    enabled: bool = True
    #: Physical limits per channel: ``{"bearing_temp": (-20.0, 120.0)}``.
    ranges: dict[str, tuple[float, float]] = {}
    #: Consecutive readings within ``stuck_tolerance`` of each other that make a channel "stuck".
    stuck_n: Annotated[int, Meta(ge=0)] = 50
    stuck_tolerance: Annotated[float, Meta(ge=0)] = 0.0
    #: Per-channel ``stuck_n`` (a slow or coarse sensor may legitimately hold its value longer).
    stuck_n_by_channel: dict[str, Annotated[int, Meta(ge=0)]] = {}
    #: A spike is ``|x - median| > spike_k x scale``.
    spike_k: Annotated[float, Meta(ge=0)] = 8.0
    #: Past values in the rolling median (odd, small: the check is O(window) with a tiny constant).
    spike_window: Annotated[int, Meta(ge=3, le=63)] = 9
    #: Readings used to learn the scale before the spike check starts.
    spike_warmup: Annotated[int, Meta(ge=1)] = 50
    #: EWMA weight of the scale after warm-up (about 1/alpha readings of memory).
    spike_alpha: Annotated[float, Meta(gt=0, le=1)] = 0.02
    #: Smallest scale per channel (e.g. the sensor's resolution), so a constant-ish signal
    #: does not turn every small change into a spike. Channels not named use ``1e-9``.
    spike_min_scale: dict[str, Annotated[float, Meta(ge=0)]] = {}
    #: A sample time advancing more than ``gap_factor`` x the period is a gap.
    gap_factor: Annotated[float, Meta(ge=0)] = 1.5

    def __post_init__(self) -> None:
        for channel, (lo, hi) in self.ranges.items():
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"quality.ranges.{channel}: need finite min < max, got [{lo}, {hi}]")
        if self.spike_window % 2 == 0:
            raise ValueError(f"quality.spike_window must be odd, got {self.spike_window}")
        if 0 < self.gap_factor <= 1:
            raise ValueError(f"quality.gap_factor must be 0 (off) or > 1, got {self.gap_factor}")


class _Channel:
    """Streaming state of one channel's checks."""

    __slots__ = (
        "lo", "hi", "stuck_n", "tol", "ref", "run",
        "k", "window", "recent", "ordered", "seen", "warmup", "scale", "alpha", "min_scale",
        "n_range", "n_stuck", "n_spike", "n_missing",
    )

    def __init__(self, name: str, s: QualitySettings) -> None:
        self.lo, self.hi = s.ranges.get(name, (-math.inf, math.inf))
        self.stuck_n = s.stuck_n_by_channel.get(name, s.stuck_n)
        self.tol = s.stuck_tolerance
        self.ref: float | None = None
        self.run = 0
        self.k = s.spike_k
        self.window = s.spike_window
        self.recent: deque[float] = deque()
        self.ordered: list[float] = []
        self.seen = 0
        self.warmup = s.spike_warmup
        self.scale = 0.0
        self.alpha = s.spike_alpha
        self.min_scale = s.spike_min_scale.get(name, 1e-9)
        self.n_range = self.n_stuck = self.n_spike = self.n_missing = 0

    def check(self, x: float | None) -> int:
        if x is None or x != x:  # None or NaN
            self.n_missing += 1
            return MISSING
        flags = 0
        if not self.lo <= x <= self.hi:
            self.n_range += 1
            if x in (math.inf, -math.inf):
                return OUT_OF_RANGE  # keep ±inf out of the median and the scale
            flags = OUT_OF_RANGE

        if self.stuck_n:
            ref = self.ref
            if ref is not None and abs(x - ref) <= self.tol:
                self.run += 1
            else:
                self.ref = x
                self.run = 1
            if self.run >= self.stuck_n:
                self.n_stuck += 1
                flags |= STUCK

        if self.k:
            ordered = self.ordered
            n = len(ordered)
            if n:
                med = ordered[n >> 1]
                dev = abs(x - med)
                self.seen += 1
                if self.seen > self.warmup and n == self.window:
                    limit = self.k * max(self.scale, self.min_scale)
                    if dev > limit:
                        self.n_spike += 1
                        flags |= SPIKE
                        dev = limit  # clipped: a spike must not inflate the scale
                    self.scale += self.alpha * (dev - self.scale)
                else:  # warm-up: plain running mean of the deviation
                    self.scale += (dev - self.scale) / self.seen
            recent = self.recent
            recent.append(x)
            insort(ordered, x)
            if len(recent) > self.window:
                del ordered[bisect_left(ordered, recent.popleft())]
        return flags


class QualityChecker:
    """Per-channel streaming checks for one device's readings (not thread-safe: one sampler)."""

    def __init__(self, channels: Sequence[str], settings: QualitySettings | None = None,
                 *, period_s: float) -> None:
        if not (period_s > 0 and math.isfinite(period_s)):
            raise ValueError(f"period_s must be > 0, got {period_s!r}")
        self.settings = settings = settings if settings is not None else QualitySettings()
        unknown = (set(settings.ranges) | set(settings.stuck_n_by_channel)
                   | set(settings.spike_min_scale)) - set(channels)
        if unknown:
            raise ValueError(
                f"quality settings name channels the source does not have: {sorted(unknown)}; "
                f"channels are {list(channels)}")
        self.channels = tuple(channels)
        self.period_s = float(period_s)
        self._states = [_Channel(c, settings) for c in self.channels]
        self._gap_s = settings.gap_factor * self.period_s if settings.gap_factor else math.inf
        self._last_t: float | None = None
        self.readings = 0  # readings checked
        self.flagged = 0  # readings with any flag
        self.gaps = 0  # sample-time gaps seen

    def check(self, t: float, values: Sequence[float | None]) -> int:
        """The flag mask of the reading ``values`` (in ``channels`` order) taken at time ``t``."""
        if not self.settings.enabled:
            return 0
        if len(values) != len(self._states):
            raise ValueError(f"expected {len(self._states)} values ({self.channels}), got {len(values)}")
        flags = 0
        last, self._last_t = self._last_t, t
        if last is not None and t - last > self._gap_s:
            self.gaps += 1
            flags = GAP
        for state, x in zip(self._states, values):
            flags |= state.check(x)
        self.readings += 1
        if flags:
            self.flagged += 1
        return flags

    def counts(self) -> dict[str, dict[str, int]]:
        """Per channel, how many readings each check flagged (for the status message)."""
        return {
            name: {"out_of_range": s.n_range, "stuck": s.n_stuck, "spike": s.n_spike,
                   "missing": s.n_missing}
            for name, s in zip(self.channels, self._states)
        }

    def summary(self) -> dict:
        """Totals plus :meth:`counts`: ``{"readings", "flagged", "gaps", "channels"}``."""
        return {"readings": self.readings, "flagged": self.flagged, "gaps": self.gaps,
                "channels": self.counts()}

