"""A deterministic healthcare wearable: a wrist band on someone going about their day.

===========  =====  ===============================================================================
channel      unit   model
===========  =====  ===============================================================================
heart_rate   bpm    62 bpm at rest + 50 bpm x activity (seen through a 30 s lag) + respiratory sinus
                    arrhythmia (±2 bpm at 0.25 Hz) + noise 0.8 bpm
spo2         %      97.5 % ± 0.4 % (slow) - 0.6 % x activity + noise 0.25 %, at most 100 %
skin_temp    °C     33.5 °C + 0.3 x (ambient shift) - 0.6 °C x activity (sweat cooling, 120 s lag)
motion       g      0.05 g + 0.6 g x activity, + |noise| 0.08 g x (1 + 2 x activity)
===========  =====  ===============================================================================

Activity (0 to 1) is a sum of slow sinusoids (periods 40, 11 and 3 minutes, from the seed),
clipped at 0: walks come and go.

Faults (:class:`Fault`, size 1 stated):

* ``arrhythmia`` (sudden): the heart rate jumps by 35 bpm x size and turns irregular (beat to
  beat swings of 15 bpm x size), SpO2 -1 % x size.
* ``desaturation`` (gradual, default ramp a quarter of the duration): SpO2 falls by 8 % x size,
  the heart compensates with +8 bpm x size.

Drift: ``ambient`` (size in °C of ambient) moves the skin temperature by 0.3 x size °C;
``regime`` size 1 is a new, more active wearer or a training plan: activity +0.3.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import numpy as np

from simulators import base
from simulators.base import Drift, Simulator

__all__ = ["CHANNELS", "FAULT_KINDS", "Fault", "WearableSimulator", "create"]

CHANNELS = ("heart_rate", "spo2", "skin_temp", "motion")
FAULT_KINDS = ("arrhythmia", "desaturation")

_HR_TAU_S, _SKIN_TAU_S = 30.0, 120.0


class Fault(base.Fault):
    """A wearer's episode (see the module docstring for what size 1 does)."""

    KINDS: ClassVar[tuple[str, ...]] = FAULT_KINDS + base.SENSOR_FAULTS
    GRADUAL: ClassVar[tuple[str, ...]] = ("desaturation",)


class WearableSimulator(Simulator):
    """Deterministic samples of one wrist-worn health monitor."""

    channels = CHANNELS
    Fault = Fault
    NOISE_COLUMNS = 5
    NOISE_TAG = 0x7765
    SPIKE_SCALE = {"heart_rate": 60.0, "spo2": 10.0, "skin_temp": 5.0, "motion": 2.0}

    def _setup(self, p: np.random.Generator) -> None:
        self._omega = 2 * np.pi / (np.array([2400.0, 660.0, 180.0]) * p.uniform(0.85, 1.15, 3))
        self._amps = np.array([0.25, 0.15, 0.08])
        self._phases = p.uniform(0, 2 * np.pi, 3)
        self._rest_hr = 62.0 + p.uniform(-4, 4)
        self._spo2 = 97.5 + p.uniform(-0.3, 0.3)
        self._spo2_omega = 2 * np.pi / (1800.0 * p.uniform(0.9, 1.1))
        self._skin = 33.5 + p.uniform(-0.3, 0.3)
        self._rsa_phase = p.uniform(0, 2 * np.pi)

    def _activity(self, t: np.ndarray, tau: float) -> np.ndarray:
        """Activity seen through a first-order lag ``tau`` (0: as it is), before clipping."""
        gain, delay = base.sinusoid_lag(self._omega, tau)
        arg = self._omega[:, None] * t + self._phases[:, None] - delay[:, None]
        return 0.2 + (self._amps * gain) @ np.sin(arg)

    def _physics(self, t: np.ndarray, noise: np.ndarray, fault: dict, drift: dict) -> np.ndarray:
        regime = 0.3 * drift["regime"]
        activity = np.clip(self._activity(t, 0.0) + regime, 0.0, 1.0)
        felt = np.clip(self._activity(t, _HR_TAU_S) + regime, 0.0, 1.0)
        cooled = np.clip(self._activity(t, _SKIN_TAU_S) + regime, 0.0, 1.0)
        arrhythmia, desat = fault["arrhythmia"], fault["desaturation"]

        hr = (self._rest_hr + 50.0 * felt + 2.0 * np.sin(2 * np.pi * 0.25 * t + self._rsa_phase)
              + 35.0 * arrhythmia + 8.0 * desat
              + (0.8 + 15.0 * arrhythmia) * noise[:, 0])
        spo2 = (self._spo2 + 0.4 * np.sin(self._spo2_omega * t) - 0.6 * activity
                - 1.0 * arrhythmia - 8.0 * desat + 0.25 * noise[:, 1])
        spo2 = np.minimum(spo2, 100.0)
        skin = self._skin + 0.3 * drift["ambient"] - 0.6 * cooled + 0.05 * noise[:, 2]
        motion = 0.05 + 0.6 * activity + 0.08 * (1 + 2 * activity) * np.abs(noise[:, 3])
        return np.column_stack((hr, spo2, skin, motion))


def create(
    seed: int = 0, rate_hz: float = 10.0, faults: Sequence[Fault | dict] = (), drift: Sequence[Drift | dict] = ()
) -> WearableSimulator:
    """Factory under the common simulator signature ``(seed, rate_hz, faults, drift)``."""
    return WearableSimulator(seed=seed, rate_hz=rate_hz, faults=faults, drift=drift)
