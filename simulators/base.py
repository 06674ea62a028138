"""What every device simulator shares: faults, drift, sensor faults, noise and ground truth.

A profile module (``machine``, ``cold_chain``, ``wearable``) subclasses :class:`Simulator` and
writes only its physics: ``_physics(t, noise, fault, drift)`` returns the clean channel values of
the times ``t``, given the severity of each process fault kind and the level of each drift kind.
This base then applies what is the same on every device:

* **recalibration drift**: an offset of ``size`` channel units on ``channel`` (a sensor swapped or
  recalibrated), ramped over ``ramp_s``;
* **sensor faults** (kinds in :data:`SENSOR_FAULTS`, each on one ``channel``): ``stuck`` holds the
  channel at its value at the fault start; ``spike`` adds, on about 5 % of the samples, spikes of
  ``size`` x the channel's spike scale (a random sign); ``dropout`` turns the channel's values into
  NaN (``None`` from :meth:`Simulator.sample`) with probability ``min(size, 1)``.

Every value is a pure function of ``(seed, i)``: slow processes are closed-form functions of the
time ``i / rate_hz``, and noise comes from one generator per block of :data:`BLOCK` samples seeded
with ``[seed, tag, block]``, so ``sample(i)`` does not depend on the order of the calls and
``block(i0, n)`` is vectorised.

Ground truth: :meth:`Simulator.ground_truth` lists every injected fault window (kind, category,
start and end in simulated seconds since sample 0) and every drift, for scoring.
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

__all__ = [
    "BLOCK",
    "SENSOR_FAULTS",
    "DRIFT_KINDS",
    "Fault",
    "Drift",
    "Simulator",
    "lagged_step",
    "sinusoid_lag",
]

#: Samples per noise block; one generator is created per block.
BLOCK = 1024
SENSOR_FAULTS = ("stuck", "spike", "dropout")
#: ambient: ambient / seasonal shift (size in °C of ambient); recalibration: a sensor offset
#: (size in the channel's units, needs ``channel``); regime: a new operating regime (size 1 is the
#: profile's stated regime change, see each profile's docstring).
DRIFT_KINDS = ("ambient", "recalibration", "regime")
_SPIKE_TAG, _DROP_TAG = 0x7370, 0x6472
_SPIKE_SHARE = 0.05


def _finite(name: str, value: float, *, low: float = 0.0, strict: bool = False) -> float:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Fault:
    """A fault injected from ``start_s`` for ``duration_s`` seconds (simulated time).

    ``size`` is a dimensionless severity (1.0 is a clearly failing part; each profile states what
    size 1 does to each channel). Gradual kinds grow linearly over ``ramp_s`` (default: a quarter
    of the duration) and then hold; sudden kinds are steps. Sensor faults (``stuck``, ``spike``,
    ``dropout``) need ``channel``. A profile subclasses this with its own ``KINDS``/``GRADUAL``.
    """

    kind: str
    start_s: float
    duration_s: float
    size: float = 1.0
    ramp_s: float | None = None
    channel: str | None = None

    KINDS: ClassVar[tuple[str, ...]] = SENSOR_FAULTS
    GRADUAL: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {self.KINDS}")
        if not (isinstance(self.duration_s, (int, float)) and self.duration_s > 0 and math.isfinite(self.duration_s)):
            raise ValueError(f"fault duration_s must be > 0, got {self.duration_s!r}")
        _finite("fault start_s", self.start_s)
        _finite("fault size", self.size)
        if self.ramp_s is not None:
            _finite("fault ramp_s", self.ramp_s)
        if self.kind in SENSOR_FAULTS and not self.channel:
            raise ValueError(f"sensor fault {self.kind!r} needs a 'channel'")

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s

    @property
    def category(self) -> str:
        return "sensor" if self.kind in SENSOR_FAULTS else "process"

    def active(self, t: np.ndarray) -> np.ndarray:
        return (t >= self.start_s) & (t < self.end_s)

    def severity(self, t: np.ndarray) -> np.ndarray:
        """Severity in [0, size] at times ``t``: the ramp (or step) while active, 0 outside."""
        ramp = self.ramp_s
        if ramp is None:
            ramp = self.duration_s / 4 if self.kind in self.GRADUAL else 0.0
        grown = np.clip((t - self.start_s) / ramp, 0.0, 1.0) if ramp > 0 else np.ones_like(t)
        return np.where(self.active(t), self.size * grown, 0.0)


@dataclass(frozen=True)
class Drift:
    """A concept drift from ``start_s`` on (for ``duration_s``, forever by default).

    Not a fault: the device is healthy, but its normal data moves, so a model trained before the
    drift starts to alarm or to miss. ``size`` is in the units :data:`DRIFT_KINDS` states; the
    change grows linearly over ``ramp_s`` (0: a step).
    """

    kind: str
    start_s: float
    size: float = 1.0
    ramp_s: float = 0.0
    duration_s: float = math.inf
    channel: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in DRIFT_KINDS:
            raise ValueError(f"unknown drift kind {self.kind!r}; expected one of {DRIFT_KINDS}")
        _finite("drift start_s", self.start_s)
        _finite("drift ramp_s", self.ramp_s)
        if not (isinstance(self.size, (int, float)) and math.isfinite(self.size)):
            raise ValueError(f"drift size must be a finite number, got {self.size!r}")
        if not (isinstance(self.duration_s, (int, float)) and self.duration_s > 0):
            raise ValueError(f"drift duration_s must be > 0, got {self.duration_s!r}")
        if self.kind == "recalibration" and not self.channel:
            raise ValueError("drift 'recalibration' needs a 'channel'")

    def level(self, t: np.ndarray) -> np.ndarray:
        grown = np.clip((t - self.start_s) / self.ramp_s, 0.0, 1.0) if self.ramp_s > 0 else (t >= self.start_s) * 1.0
        return np.where((t >= self.start_s) & (t < self.start_s + self.duration_s), self.size * grown, 0.0)


def lagged_step(t: np.ndarray, start: float, end: float, tau: float) -> np.ndarray:
    """A unit step on [start, end) seen through a first-order lag ``tau`` (rises, then decays)."""
    rise = 1 - np.exp(-np.clip(t - start, 0, None) / tau)
    peak = 1 - math.exp(-(end - start) / tau) if math.isfinite(end) else 1.0
    decay = peak * np.exp(-np.clip(t - end, 0, None) / tau)
    return np.where(t < start, 0.0, np.where(t >= end, decay, rise))


def sinusoid_lag(omega: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Gain and phase delay of a first-order lag ``tau`` for sinusoids of angular speeds ``omega``."""
    wt = np.asarray(omega) * tau
    return 1 / np.sqrt(1 + wt**2), np.arctan(wt)


def _coerce(cls: type, item: Any, what: str):
    if isinstance(item, cls):
        return item
    if isinstance(item, Mapping):
        try:
            return cls(**item)
        except TypeError as exc:
            raise ValueError(f"bad {what} {dict(item)!r}: {exc}") from None
    if what == "fault" and isinstance(item, Fault):  # another profile's Fault: re-check the kind here
        return cls(**asdict(item))
    raise TypeError(f"a {what} must be a {cls.__name__} or a dict of its fields, got {type(item).__name__}")


class Simulator:
    """Deterministic samples of one simulated device; subclasses provide the physics.

    Subclasses set ``channels``, ``Fault`` (their fault class), ``NOISE_COLUMNS``, ``NOISE_TAG``
    and ``SPIKE_SCALE`` (channel units per unit of spike size), and implement
    :meth:`_setup` (per-device parameters from the seeded generator) and :meth:`_physics`.
    """

    channels: ClassVar[tuple[str, ...]] = ()
    Fault: ClassVar[type[Fault]] = Fault
    NOISE_COLUMNS: ClassVar[int] = 4
    NOISE_TAG: ClassVar[int] = 0x6E6F
    PARAM_TAG: ClassVar[int] = 0x7061
    SPIKE_SCALE: ClassVar[Mapping[str, float]] = {}

    def __init__(
        self,
        seed: int,
        rate_hz: float = 10.0,
        faults: Sequence[Fault | dict] = (),
        drift: Sequence[Drift | dict] = (),
    ) -> None:
        try:
            seed = operator.index(seed)
        except TypeError:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}") from None
        if seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if not (isinstance(rate_hz, (int, float)) and rate_hz > 0 and math.isfinite(rate_hz)):
            raise ValueError(f"rate_hz must be > 0, got {rate_hz!r}")
        self.seed = seed
        self.rate_hz = float(rate_hz)
        self.faults = tuple(_coerce(self.Fault, f, "fault") for f in faults)
        self.drift = tuple(_coerce(Drift, d, "drift") for d in drift)
        for item in (*self.faults, *self.drift):
            if item.channel is not None and item.channel not in self.channels:
                raise ValueError(
                    f"{item.kind!r} names channel {item.channel!r}, which {type(self).__name__} does not "
                    f"have; channels: {', '.join(self.channels)}"
                )
        self._process = tuple(f for f in self.faults if f.category == "process")
        self._sensor = tuple(f for f in self.faults if f.category == "sensor")
        self._setup(np.random.default_rng([seed, self.PARAM_TAG]))
        self._cache: tuple[int, np.ndarray] | None = None

    # -- for subclasses ---------------------------------------------------------------------------
    def _setup(self, p: np.random.Generator) -> None:
        """Draw the per-device constants from ``p`` (called once by the constructor)."""

    def _physics(self, t: np.ndarray, noise: np.ndarray, fault: dict, drift: dict) -> np.ndarray:
        """Clean values ``(n, len(channels))``; ``fault[kind]`` and ``drift[kind]`` are arrays of
        severity/level over ``t`` (zeros when absent)."""
        raise NotImplementedError

    # -- ground truth -----------------------------------------------------------------------------
    def label(self, i: int) -> bool:
        """True when a fault (process or sensor) is active at sample ``i``."""
        return bool(self.labels(i, 1)[0])

    def labels(self, i0: int, n: int) -> np.ndarray:
        """Ground truth of samples ``i0 .. i0+n-1`` as a bool array."""
        self._check_range(i0, n)
        t = self._times(i0, n)
        out = np.zeros(n, dtype=bool)
        for f in self.faults:
            out |= f.active(t)
        return out

    def ground_truth(self) -> dict:
        """The injected faults and drift, in simulated seconds since sample 0 (JSON-ready)."""
        faults = [
            {"kind": f.kind, "category": f.category, "start_s": f.start_s, "end_s": f.end_s,
             "size": f.size, "channel": f.channel}
            for f in self.faults
        ]
        drift = [
            {"kind": d.kind, "start_s": d.start_s, "end_s": d.start_s + d.duration_s if math.isfinite(d.duration_s)
             else None, "size": d.size, "ramp_s": d.ramp_s, "channel": d.channel}
            for d in self.drift
        ]
        return {"faults": faults, "drift": drift}

    # -- samples ----------------------------------------------------------------------------------
    def sample(self, i: int) -> list[float | None]:
        """The channel values of sample ``i`` (``None`` where a sensor dropped out); cached per block."""
        if i < 0:
            raise ValueError(f"sample index must be >= 0, got {i}")
        b = i // BLOCK
        cached = self._cache
        if cached is None or cached[0] != b:
            cached = (b, self.block(b * BLOCK, BLOCK))
            self._cache = cached
        row = cached[1][i - b * BLOCK].tolist()
        return [None if v != v else v for v in row]

    def block(self, i0: int, n: int) -> np.ndarray:
        """Samples ``i0 .. i0+n-1`` as float64 ``(n, len(channels))``, NaN where a sensor dropped out."""
        self._check_range(i0, n)
        t = self._times(i0, n)
        x = self._clean(t, self._noise(i0, n, self.NOISE_TAG, self.NOISE_COLUMNS))
        for d in self.drift:
            if d.kind == "recalibration":
                x[:, self.channels.index(d.channel)] += d.level(t)
        for f in self._sensor:
            self._apply_sensor_fault(f, x, i0, t)
        return x

    # -- internals --------------------------------------------------------------------------------
    def _clean(self, t: np.ndarray, noise: np.ndarray) -> np.ndarray:
        fault = {k: np.zeros(t.size) for k in self.Fault.KINDS if k not in SENSOR_FAULTS}
        for f in self._process:
            fault[f.kind] = fault[f.kind] + f.severity(t)
        drift = {k: np.zeros(t.size) for k in DRIFT_KINDS}
        for d in self.drift:
            drift[d.kind] = drift[d.kind] + d.level(t)
        return self._physics(t, noise, fault, drift)

    def _apply_sensor_fault(self, f: Fault, x: np.ndarray, i0: int, t: np.ndarray) -> None:
        active = f.active(t)
        if not active.any():
            return
        j = self.channels.index(f.channel)
        if f.kind == "stuck":
            i_start = math.ceil(f.start_s * self.rate_hz - 1e-9)
            held = self._clean(self._times(i_start, 1), self._noise(i_start, 1, self.NOISE_TAG, self.NOISE_COLUMNS))
            x[active, j] = held[0, j]
        elif f.kind == "spike":
            u = self._noise(i0, t.size, _SPIKE_TAG, 2, uniform=True)
            hit = active & (u[:, 0] < _SPIKE_SHARE)
            sign = np.where(u[:, 1] < 0.5, -1.0, 1.0)
            x[hit, j] += f.size * self.SPIKE_SCALE.get(f.channel, 1.0) * sign[hit]
        else:  # dropout
            u = self._noise(i0, t.size, _DROP_TAG, 1, uniform=True)
            x[active & (u[:, 0] < min(f.size, 1.0)), j] = np.nan

    def _times(self, i0: int, n: int) -> np.ndarray:
        return np.arange(i0, i0 + n, dtype=np.float64) / self.rate_hz

    @staticmethod
    def _check_range(i0: int, n: int) -> None:
        if i0 < 0 or n < 0:
            raise ValueError(f"need i0 >= 0 and n >= 0, got i0={i0}, n={n}")

    def _noise(self, i0: int, n: int, tag: int, columns: int, uniform: bool = False) -> np.ndarray:
        """Noise for samples i0..i0+n-1 (standard normal, or uniform in [0, 1)), block by block."""
        if n == 0:
            return np.zeros((0, columns))
        b0, b1 = i0 // BLOCK, (i0 + n - 1) // BLOCK
        parts = []
        for b in range(b0, b1 + 1):
            g = np.random.default_rng([self.seed, tag, b])
            parts.append(g.random((BLOCK, columns)) if uniform else g.standard_normal((BLOCK, columns)))
        start = i0 - b0 * BLOCK
        return np.concatenate(parts)[start : start + n]
