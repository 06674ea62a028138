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

Every value is a pure function of ``(seed, i)`` (see :mod:`simulators.base`, which also adds the
sensor faults ``stuck``/``spike``/``dropout`` and the recalibration drift). Faults (:class:`Fault`)
carry the ground truth: ``label(i)`` is true while a fault is active.

Drift (:class:`simulators.base.Drift`): ``ambient`` shifts the ambient temperature by ``size`` °C
(the bearing follows one for one); ``regime`` size 1 is a heavier product on the line: +0.15 load
(about +1.4 A, -7.5 rpm, +3.7 °C once the bearing has warmed).
"""

from __future__ import annotations

import math
from typing import ClassVar, Sequence

import numpy as np

from simulators import base
from simulators.base import BLOCK, Drift, Simulator

__all__ = ["CHANNELS", "FAULT_KINDS", "BLOCK", "Fault", "MachineSimulator", "create"]

CHANNELS = ("vibration", "bearing_temp", "motor_current", "rpm")
#: Process faults; the sensor faults of :data:`simulators.base.SENSOR_FAULTS` are accepted too.
FAULT_KINDS = ("bearing_wear", "sudden")

_SYNC_RPM = 1500.0
_SLIP_RPM = 50.0  # rpm lost per unit of load
_GEAR_RATIO = 20.0
_BPFO = 3.6  # bearing outer-race defect frequency, in multiples of the shaft speed
_THERMAL_TAU_S = 240.0


class Fault(base.Fault):
    """A machine fault from ``start_s`` for ``duration_s`` seconds (simulated time).

    ``size`` is a dimensionless severity (1.0 is a clearly failing part). ``bearing_wear`` grows
    linearly over ``ramp_s`` (default: a quarter of the duration) and then holds: it adds the
    bearing defect tone (1.2 m/s² x size) and broadband vibration, +10 °C x size bearing temperature
    and +0.8 A x size motor current. ``sudden`` is a step (a loose mounting or a jam): the rotation
    harmonic grows by 150 % x size, +2 A x size, -10 rpm x size, and the bearing warms by 4 °C x size
    through the thermal lag. ``label`` is true on ``[start_s, start_s + duration_s)``.
    """

    KINDS: ClassVar[tuple[str, ...]] = FAULT_KINDS + base.SENSOR_FAULTS
    GRADUAL: ClassVar[tuple[str, ...]] = ("bearing_wear",)


class MachineSimulator(Simulator):
    """Deterministic samples of one simulated machine (see the module docstring for units)."""

    channels = CHANNELS
    Fault = Fault
    NOISE_COLUMNS = 4
    SPIKE_SCALE = {"vibration": 5.0, "bearing_temp": 15.0, "motor_current": 8.0, "rpm": 100.0}

    def _setup(self, p: np.random.Generator) -> None:
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

    def _physics(self, t: np.ndarray, noise: np.ndarray, fault: dict, drift: dict) -> np.ndarray:
        n = t.size
        arg = self._omega[:, None] * t + self._phases[:, None]  # (3, n)
        regime = 0.15 * drift["regime"]
        load = 0.7 + self._amps @ np.sin(arg) + regime

        wear = fault["bearing_wear"]
        sudden = fault["sudden"]
        sudden_heat = np.zeros(n)
        for f in self._process:
            if f.kind == "sudden":
                sudden_heat += 4.0 * f.size * base.lagged_step(t, f.start_s, f.end_s, _THERMAL_TAU_S)

        rpm = _SYNC_RPM - _SLIP_RPM * load - 10.0 * sudden + 0.5 * noise[:, 3]
        current = 3.5 + 9.0 * load + 0.8 * wear + 2.0 * sudden + 0.08 * noise[:, 2]

        # Thermal lag of each load sinusoid, in closed form: gain 1/sqrt(1+(w tau)^2), phase -atan.
        gain, delay = base.sinusoid_lag(self._omega, _THERMAL_TAU_S)
        lagged = 0.7 + (self._amps * gain) @ np.sin(arg - delay[:, None])
        if self.drift:
            for d in self.drift:
                if d.kind == "regime":  # the bearing warms to the new load through the same lag
                    lagged = lagged + 0.15 * d.size * base.lagged_step(
                        t, d.start_s, d.start_s + d.duration_s, _THERMAL_TAU_S)
        ambient = self._ambient + 1.5 * np.sin(self._ambient_omega * t + self._ambient_phase) + drift["ambient"]
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

    def _shaft_phase(self, t: np.ndarray) -> np.ndarray:
        """Integral of the output-shaft angular speed, in closed form (the load is sinusoidal).

        The few-rpm drop of a sudden fault or a regime change is left out of the phase: it shifts
        a tone by < 1 %.
        """
        k = 2 * np.pi / (60.0 * _GEAR_RATIO)
        base_rpm = (_SYNC_RPM - _SLIP_RPM * 0.7) * t
        # integral of sin(w t + p) from 0 to t = (cos p - cos(w t + p)) / w
        ripple = (
            (np.cos(self._phases)[:, None] - np.cos(self._omega[:, None] * t + self._phases[:, None]))
            / self._omega[:, None]
        )
        return k * (base_rpm - _SLIP_RPM * (self._amps @ ripple))


def create(
    seed: int = 0, rate_hz: float = 10.0, faults: Sequence[Fault | dict] = (), drift: Sequence[Drift | dict] = ()
) -> MachineSimulator:
    """Factory under the common simulator signature ``(seed, rate_hz, faults, drift)``."""
    return MachineSimulator(seed=seed, rate_hz=rate_hz, faults=faults, drift=drift)
