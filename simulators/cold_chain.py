"""A deterministic retail cold-chain refrigerator: a thermostat-cycled compressor and a door.

==================  =====  ========================================================================
channel             unit   model
==================  =====  ========================================================================
cabinet_temp        °C     a saw-tooth between 3 and 5 °C (setpoint 4 °C, hysteresis ±1 °C): falls
                           while the compressor runs, rises while it rests; each door opening warms
                           the cabinet through a 60 s lag (+3 °C x (1 - e^(-open/60 s)))
ambient_temp        °C     the shop: 21 °C ± 1.5 °C over about four hours
compressor_current  A      4.2 A while running (+ inrush-free noise 0.1 A), 0.05 A at rest
door_open           0/1    1 while the door is open: about 6 short openings an hour, 5-40 s each
==================  =====  ========================================================================

The compressor cycles with a period of about 15 minutes; its duty (the running share of a cycle)
is what the cabinet needs: ``0.35 + 0.03/°C x (ambient - 21 °C)``, divided by the compressor's
capacity. When the duty would exceed 1 the compressor runs all the time and the cabinet warms by
6 °C per unit of missing duty.

Faults (:class:`Fault`, size 1 stated):

* ``compressor_failure`` (gradual, default ramp a quarter of the duration): the capacity falls to
  ``1 - 0.8 x size`` (20 % at size 1), the running current rises by 1.2 A x size (a laboured
  motor): the duty grows, then saturates and the cabinet warms (about +5 °C at size 1).
* ``door_left_open`` (sudden): the door reads 1, the compressor runs all the time and the cabinet
  approaches the shop's temperature through a 300 s lag, ``0.6 x size`` of the way.

Drift: ``ambient`` moves the shop's temperature by ``size`` °C (summer; the duty follows);
``regime`` size 1 is a busier shop: three times as many door openings and the duty +0.1.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import numpy as np

from simulators import base
from simulators.base import Drift, Simulator

__all__ = ["CHANNELS", "FAULT_KINDS", "Fault", "ColdChainSimulator", "create"]

CHANNELS = ("cabinet_temp", "ambient_temp", "compressor_current", "door_open")
FAULT_KINDS = ("compressor_failure", "door_left_open")

_SETPOINT, _BAND = 4.0, 1.0
_DOOR_TAU_S, _DOOR_LEFT_TAU_S = 60.0, 300.0
_DOOR_TAG = 0x646F
_OPENINGS_PER_HOUR = 6.0


class Fault(base.Fault):
    """A refrigerator fault (see the module docstring for what size 1 does)."""

    KINDS: ClassVar[tuple[str, ...]] = FAULT_KINDS + base.SENSOR_FAULTS
    GRADUAL: ClassVar[tuple[str, ...]] = ("compressor_failure",)


class ColdChainSimulator(Simulator):
    """Deterministic samples of one refrigerated display cabinet."""

    channels = CHANNELS
    Fault = Fault
    NOISE_COLUMNS = 3
    NOISE_TAG = 0x6363
    SPIKE_SCALE = {"cabinet_temp": 8.0, "ambient_temp": 8.0, "compressor_current": 5.0, "door_open": 1.0}

    def _setup(self, p: np.random.Generator) -> None:
        self._cycle_s = 900.0 * p.uniform(0.9, 1.1)
        self._cycle_phase = p.uniform(0, 1)
        self._ambient = 21.0 + p.uniform(-0.5, 0.5)
        self._ambient_omega = 2 * np.pi / (4 * 3600.0 * p.uniform(0.9, 1.1))
        self._ambient_phase = p.uniform(0, 2 * np.pi)

    # -- door openings: Poisson per hour, drawn from (seed, hour) so any hour is reproducible ----
    def _openings(self, hour: int, busy: bool) -> np.ndarray:
        g = np.random.default_rng([self.seed, _DOOR_TAG, hour])
        count = g.poisson(_OPENINGS_PER_HOUR * 3)  # a busy hour's openings; a normal hour keeps a third
        starts = hour * 3600.0 + g.uniform(0, 3600.0, count)
        lengths = g.uniform(5.0, 40.0, count)
        keep = (np.arange(count) % 3 == 0) != busy  # busy: the two thirds a normal hour leaves out
        return np.column_stack((starts, lengths))[keep]

    def _doors(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(door 0/1, cabinet warming in °C) from the normal door openings."""
        door = np.zeros(t.size)
        heat = np.zeros(t.size)
        if t.size == 0:
            return door, heat
        first = int(max(t[0] - 10 * _DOOR_TAU_S, 0) // 3600)
        for hour in range(first, int(t[-1] // 3600) + 1):
            for busy_set in (False, True):
                for start, length in self._openings(hour, busy_set):
                    if busy_set and self._regime_at(start) < 0.5:  # extra openings only in a busy regime
                        continue
                    end = start + length
                    if end + 10 * _DOOR_TAU_S < t[0] or start > t[-1]:
                        continue
                    door = np.maximum(door, (t >= start) & (t < end))
                    heat += 3.0 * base.lagged_step(t, start, end, _DOOR_TAU_S)
                if not any(d.kind == "regime" for d in self.drift):
                    break
        return door, heat

    def _regime_at(self, t: float) -> float:
        at = np.array([t])
        return float(sum(d.level(at)[0] for d in self.drift if d.kind == "regime"))

    def _physics(self, t: np.ndarray, noise: np.ndarray, fault: dict, drift: dict) -> np.ndarray:
        ambient = (self._ambient + 1.5 * np.sin(self._ambient_omega * t + self._ambient_phase)
                   + drift["ambient"])
        regime = drift["regime"]
        failing = fault["compressor_failure"]
        capacity = np.clip(1.0 - 0.8 * failing, 0.05, None)
        need = 0.35 + 0.03 * (ambient - 21.0) + 0.1 * regime
        duty = need / capacity

        door, door_heat = self._doors(t)
        left_open = np.zeros(t.size)
        for f in self._process:
            if f.kind == "door_left_open":
                left_open += f.size * 0.6 * base.lagged_step(t, f.start_s, f.end_s, _DOOR_LEFT_TAU_S)
        door = np.maximum(door, fault["door_left_open"] > 0)

        # Saw-tooth over the compressor cycle: falls 5 -> 3 while running, rises 3 -> 5 at rest.
        d = np.clip(duty, 0.02, 0.98)
        phi = np.mod(t / self._cycle_s + self._cycle_phase, 1.0)
        running = phi < d
        tooth = np.where(running, _SETPOINT + _BAND - 2 * _BAND * phi / d,
                         _SETPOINT - _BAND + 2 * _BAND * (phi - d) / (1 - d))
        saturated = duty >= 1.0
        tooth = np.where(saturated, _SETPOINT, tooth)
        running = running | saturated | (fault["door_left_open"] > 0)
        warming = 6.0 * np.clip(duty - 1.0, 0.0, None)
        cabinet = (tooth + warming + door_heat + left_open * (ambient - _SETPOINT)
                   + 0.05 * noise[:, 0])
        current = np.where(running, 4.2 + 1.2 * failing + 0.1 * noise[:, 1], 0.05 + 0.01 * noise[:, 1])
        return np.column_stack((cabinet, ambient + 0.05 * noise[:, 2], current, door.astype(float)))


def create(
    seed: int = 0, rate_hz: float = 10.0, faults: Sequence[Fault | dict] = (), drift: Sequence[Drift | dict] = ()
) -> ColdChainSimulator:
    """Factory under the common simulator signature ``(seed, rate_hz, faults, drift)``."""
    return ColdChainSimulator(seed=seed, rate_hz=rate_hz, faults=faults, drift=drift)
