"""A deterministic manufacturing machine: a motor driving a slow shaft through a gearbox.

The simulated machine is an induction motor (4-pole, 50 Hz: 1500 rpm synchronous) that drives a
conveyor pulley through a 20:1 gearbox. A load profile (a sum of slow sinusoids whose periods and
phases come from the seed) drives everything else:

==============  =====  ============================================================================
channel         unit   model
==============  =====  ============================================================================
vibration       m/s²   raw accelerometer on the pulley bearing housing: the output-shaft rotation
                       harmonic (~1.2 Hz), its 2nd harmonic (~2.4 Hz) and white noise; a worn bearing
                       adds its outer-race defect tone at 3.6 x shaft speed (~4.4 Hz) and broadband
                       noise. Keep ``rate_hz`` >= 10 so these tones stay below the Nyquist frequency.
bearing_temp    °C     ambient (24 °C +- 1.5 °C over about an hour) + heat from the load through a
                       first-order thermal lag (240 s)
motor_current   A      no-load magnetising current + a share proportional to the load
rpm             rpm    motor shaft speed; the slip grows with the load (1500 synchronous)
==============  =====  ============================================================================

Every value is a pure function of ``(seed, i)``: slow processes are closed-form functions of the
time ``i / rate_hz`` and noise comes from a counter-based scheme (one generator per block of
``BLOCK`` samples, seeded with ``[seed, block number]``), so ``sample(i)`` returns the same numbers
whatever the order of the calls, and ``block(i0, n)`` is vectorised (millions of samples/s).

Faults (:class:`Fault`) carry the ground truth: ``label(i)`` is true while a fault is active.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["CHANNELS", "FAULT_KINDS", "BLOCK", "Fault", "MachineSimulator", "create"]

CHANNELS = ("vibration", "bearing_temp", "motor_current", "rpm")
FAULT_KINDS = ("bearing_wear", "sudden")
#: Samples per noise block; one generator is created per block.
BLOCK = 1024

_SYNC_RPM = 1500.0
_SLIP_RPM = 50.0  # rpm lost per unit of load
_GEAR_RATIO = 20.0
_BPFO = 3.6  # bearing outer-race defect frequency, in multiples of the shaft speed
_THERMAL_TAU_S = 240.0
_NOISE_TAG, _PARAM_TAG = 0x6E6F, 0x7061  # keep the parameter and noise streams apart


@dataclass(frozen=True)
class Fault:
    """A fault injected from ``start_s`` for ``duration_s`` seconds (simulated time).

    ``size`` is a dimensionless severity (1.0 is a clearly failing part). ``bearing_wear`` grows
    linearly over ``ramp_s`` (default: a quarter of the duration) and then holds: it adds the
    bearing defect tone (1.2 m/s² x size) and broadband vibration, +10 °C x size bearing temperature
    and +0.8 A x size motor current. ``sudden`` is a step (a loose mounting or a jam): the rotation
    harmonic grows by 150 % x size, +2 A x size, -10 rpm x size, and the bearing warms by 4 °C x size
    through the thermal lag. ``label`` is true on ``[start_s, start_s + duration_s)``.
    """

    kind: str
    start_s: float
    duration_s: float
    size: float = 1.0
    ramp_s: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")
        if not (self.duration_s > 0 and math.isfinite(self.duration_s)):
            raise ValueError(f"fault duration_s must be > 0, got {self.duration_s!r}")
        if not (self.start_s >= 0 and math.isfinite(self.start_s)):
            raise ValueError(f"fault start_s must be >= 0, got {self.start_s!r}")
        if not (self.size >= 0 and math.isfinite(self.size)):
            raise ValueError(f"fault size must be >= 0, got {self.size!r}")
        if self.ramp_s is not None and not self.ramp_s >= 0:
            raise ValueError(f"fault ramp_s must be >= 0, got {self.ramp_s!r}")

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s

    def active(self, t: np.ndarray) -> np.ndarray:
        return (t >= self.start_s) & (t < self.end_s)

    def severity(self, t: np.ndarray) -> np.ndarray:
        """Severity in [0, size] at times ``t``: the ramp (or step) while active, 0 outside."""
        ramp = self.ramp_s
        if ramp is None:
            ramp = self.duration_s / 4 if self.kind == "bearing_wear" else 0.0
        if ramp > 0:
            grown = np.clip((t - self.start_s) / ramp, 0.0, 1.0)
        else:
            grown = np.ones_like(t)
        return np.where(self.active(t), self.size * grown, 0.0)


def _coerce_fault(f: Fault | dict) -> Fault:
    if isinstance(f, Fault):
        return f
    if isinstance(f, dict):
        return Fault(**f)
    raise TypeError(f"a fault must be a Fault or a dict of its fields, got {type(f).__name__}")


class MachineSimulator:
    """Deterministic samples of one simulated machine (see the module docstring for units)."""

    channels = CHANNELS

    def __init__(
        self, seed: int, rate_hz: float = 10.0, faults: Sequence[Fault | dict] = ()
    ) -> None:
        try:
            seed = operator.index(seed)
        except TypeError:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}") from None
        if seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if not (rate_hz > 0 and math.isfinite(rate_hz)):
            raise ValueError(f"rate_hz must be > 0, got {rate_hz!r}")
        self.seed = seed
        self.rate_hz = float(rate_hz)
        self.faults = tuple(_coerce_fault(f) for f in faults)
        p = np.random.default_rng([seed, _PARAM_TAG])
        # Load: 0.7 + three slow sinusoids; per-machine periods jitter by +-10 %.
        self._periods = np.array([1800.0, 420.0, 90.0]) * p.uniform(0.9, 1.1, 3)
        self._omega = 2 * np.pi / self._periods
        self._amps = np.array([0.08, 0.05, 0.03])
        self._phases = p.uniform(0, 2 * np.pi, 3)
        # Ambient: per-machine offset kept well inside the hourly swing every machine sees, so
        # that one model can serve a fleet of these machines.
        self._ambient = 24.0 + p.uniform(-0.3, 0.3)
        self._ambient_omega = 2 * np.pi / (3600.0 * p.uniform(0.9, 1.1))
        self._ambient_phase = p.uniform(0, 2 * np.pi)
        self._harmonic_phases = p.uniform(0, 2 * np.pi, 2)
        self._cache: tuple[int, np.ndarray] | None = None

    # -- ground truth -------------------------------------------------------------------------
    def label(self, i: int) -> bool:
        """True when a fault is active at sample ``i``."""
        return bool(self.labels(i, 1)[0])

    def labels(self, i0: int, n: int) -> np.ndarray:
        """Ground truth of samples ``i0 .. i0+n-1`` as a bool array."""
        if i0 < 0 or n < 0:
            raise ValueError(f"need i0 >= 0 and n >= 0, got i0={i0}, n={n}")
        t = self._times(i0, n)
        out = np.zeros(n, dtype=bool)
        for f in self.faults:
            out |= f.active(t)
        return out

    # -- samples ------------------------------------------------------------------------------
    def sample(self, i: int) -> list[float]:
        """The channel values of sample ``i`` (cached per block, so sequential reads are cheap)."""
        if i < 0:
            raise ValueError(f"sample index must be >= 0, got {i}")
        b = i // BLOCK
        cached = self._cache
        if cached is None or cached[0] != b:
            cached = (b, self.block(b * BLOCK, BLOCK))
            self._cache = cached
        return cached[1][i - b * BLOCK].tolist()

    def block(self, i0: int, n: int) -> np.ndarray:
        """Samples ``i0 .. i0+n-1`` as a float64 array of shape ``(n, len(channels))``."""
        if i0 < 0 or n < 0:
            raise ValueError(f"need i0 >= 0 and n >= 0, got i0={i0}, n={n}")
        t = self._times(i0, n)
        noise = self._noise(i0, n)
        arg = self._omega[:, None] * t + self._phases[:, None]  # (3, n)
        load = 0.7 + self._amps @ np.sin(arg)

        wear = np.zeros(n)
        sudden = np.zeros(n)
        sudden_heat = np.zeros(n)
        for f in self.faults:
            if f.kind == "bearing_wear":
                wear += f.severity(t)
            else:
                sudden += f.severity(t)
                sudden_heat += 4.0 * f.size * self._lagged_step(t, f)

        rpm = _SYNC_RPM - _SLIP_RPM * load - 10.0 * sudden + 0.5 * noise[:, 3]
        current = 3.5 + 9.0 * load + 0.8 * wear + 2.0 * sudden + 0.08 * noise[:, 2]

        # Thermal lag of each load sinusoid, in closed form: gain 1/sqrt(1+(w tau)^2), phase -atan.
        wt = self._omega * _THERMAL_TAU_S
        lag_amps = self._amps / np.sqrt(1 + wt**2)
        lagged = 0.7 + lag_amps @ np.sin(arg - np.arctan(wt)[:, None])
        ambient = self._ambient + 1.5 * np.sin(self._ambient_omega * t + self._ambient_phase)
        temp = ambient + 25.0 * lagged + 10.0 * wear + sudden_heat + 0.1 * noise[:, 1]

        phase = self._shaft_phase(t)
        ph2, ph3 = self._harmonic_phases
        vib = (
            (0.7 + 0.2 * load) * (1 + 1.5 * sudden) * np.sin(phase)
            + 0.3 * np.sin(2 * phase + ph2)
            + 1.2 * wear * np.sin(_BPFO * phase + ph3) * (1 + 0.5 * np.sin(phase))
            + 0.25 * (1 + wear + 0.5 * sudden) * noise[:, 0]
        )
        return np.column_stack((vib, temp, current, rpm))

    # -- internals ----------------------------------------------------------------------------
    def _times(self, i0: int, n: int) -> np.ndarray:
        return np.arange(i0, i0 + n, dtype=np.float64) / self.rate_hz

    def _noise(self, i0: int, n: int) -> np.ndarray:
        """Standard normal noise for samples i0..i0+n-1, generated block by block."""
        if n == 0:
            return np.zeros((0, 4))
        b0, b1 = i0 // BLOCK, (i0 + n - 1) // BLOCK
        parts = [
            np.random.default_rng([self.seed, _NOISE_TAG, b]).standard_normal((BLOCK, 4))
            for b in range(b0, b1 + 1)
        ]
        start = i0 - b0 * BLOCK
        return np.concatenate(parts)[start : start + n]

    def _shaft_phase(self, t: np.ndarray) -> np.ndarray:
        """Integral of the output-shaft angular speed, in closed form (the load is sinusoidal).

        The few-rpm drop of a sudden fault is left out of the phase: it shifts a tone by < 1 %.
        """
        k = 2 * np.pi / (60.0 * _GEAR_RATIO)
        base = (_SYNC_RPM - _SLIP_RPM * 0.7) * t
        # integral of sin(w t + p) from 0 to t = (cos p - cos(w t + p)) / w
        ripple = (
            (np.cos(self._phases)[:, None] - np.cos(self._omega[:, None] * t + self._phases[:, None]))
            / self._omega[:, None]
        )
        return k * (base - _SLIP_RPM * (self._amps @ ripple))

    @staticmethod
    def _lagged_step(t: np.ndarray, f: Fault) -> np.ndarray:
        """A unit step on [start, end) seen through the thermal lag (rises, then decays after end)."""
        rise = 1 - np.exp(-np.clip(t - f.start_s, 0, None) / _THERMAL_TAU_S)
        after = t >= f.end_s
        peak = 1 - math.exp(-f.duration_s / _THERMAL_TAU_S)
        decay = peak * np.exp(-np.clip(t - f.end_s, 0, None) / _THERMAL_TAU_S)
        return np.where(t < f.start_s, 0.0, np.where(after, decay, rise))


def create(seed: int = 0, rate_hz: float = 10.0, faults: Sequence[Fault | dict] = ()) -> MachineSimulator:
    """Factory under the common simulator signature ``(seed, rate_hz, faults)``."""
    return MachineSimulator(seed=seed, rate_hz=rate_hz, faults=faults)
