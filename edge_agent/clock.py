"""Wall-clock step detection for the sampler.

The sampler keeps its schedule on the monotonic clock, which never jumps, but stamps readings with
the wall clock, which does: NTP or chrony stepping a Pi's clock after boot (a Pi has no RTC and
starts at its last saved time), an operator running ``date -s``, a GPS fix. A step shows as a
difference between how far the two clocks advanced over the same interval::

    step = (wall - last_wall) - (mono - last_mono)

A step beyond ``threshold_s`` is reported (with its size and when), and the reading taken then is
flagged :data:`edge_agent.quality.CLOCK_STEP`, so the aggregator knows that the time axis jumped.
NTP slewing is not a step: on Linux ``CLOCK_MONOTONIC`` is slewed along with the wall clock, and
``slew_ppm`` (default 500 ppm, the kernel's maximum slew rate) widens the threshold in proportion
to the interval for clocks that are not. A system suspend also shows as a forward step: the
monotonic clock stops while suspended.

Use (in the sampling loop)::

    from edge_agent.clock import ClockWatch
    watch = ClockWatch(threshold_s=1.0)
    ...
    step = watch.observe(time.monotonic(), time.time())
    if step is not None:
        flags |= quality.CLOCK_STEP
        log.warning("wall clock stepped by %+.3f s", step)
    watch.status()  # {"steps": 1, "last_step_s": -3600.0, "last_step_wall": ..., ...}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ClockStep", "ClockWatch"]


@dataclass(frozen=True)
class ClockStep:
    """One detected step: ``step_s`` > 0 when the wall clock jumped forward."""

    step_s: float
    wall: float  # wall-clock time right after the step
    mono: float  # monotonic time of the observation that saw it


class ClockWatch:
    """Compares wall-clock and monotonic deltas between consecutive observations."""

    def __init__(self, threshold_s: float = 1.0, *, slew_ppm: float = 500.0) -> None:
        if not (threshold_s > 0 and math.isfinite(threshold_s)):
            raise ValueError(f"threshold_s must be > 0, got {threshold_s!r}")
        if not (slew_ppm >= 0 and math.isfinite(slew_ppm)):
            raise ValueError(f"slew_ppm must be >= 0, got {slew_ppm!r}")
        self.threshold_s = float(threshold_s)
        self.slew = slew_ppm * 1e-6
        self._mono: float | None = None
        self._wall: float | None = None
        self.observations = 0
        self.steps = 0
        self.total_step_s = 0.0  # net wall-clock movement from steps since the start
        self.max_abs_step_s = 0.0
        self.last: ClockStep | None = None

    def observe(self, mono: float, wall: float) -> float | None:
        """Record one pair of clock readings; the step in seconds if the wall clock jumped, else None.

        ``mono`` must not go backwards (it is a monotonic clock); a ``ValueError`` says so.
        """
        last_mono, last_wall = self._mono, self._wall
        if last_mono is not None and mono < last_mono:
            raise ValueError(f"monotonic time went backwards: {mono!r} after {last_mono!r}")
        self._mono, self._wall = mono, wall
        self.observations += 1
        if last_mono is None:
            return None
        d_mono = mono - last_mono
        step = (wall - last_wall) - d_mono
        if abs(step) <= self.threshold_s + self.slew * d_mono:
            return None
        self.steps += 1
        self.total_step_s += step
        self.max_abs_step_s = max(self.max_abs_step_s, abs(step))
        self.last = ClockStep(step_s=step, wall=wall, mono=mono)
        return step

    def status(self) -> dict:
        """Counters and the last step, for the agent's status and diagnostics."""
        last = self.last
        return {
            "observations": self.observations,
            "steps": self.steps,
            "total_step_s": self.total_step_s,
            "max_abs_step_s": self.max_abs_step_s,
            "last_step_s": last.step_s if last else None,
            "last_step_wall": last.wall if last else None,
        }
