"""The registry of simulated device profiles: what each simulates, its channels and fault kinds.

Importing this module is cheap (no numpy): the command line lists profiles from it, and
:func:`create` imports a profile's module only when a simulator is built. Each profile module
offers ``create(seed, rate_hz, faults, drift)``; its docstring states the physics and what a
fault of size 1 does to each channel. A test keeps the channels and kinds here equal to the
modules'.

Every profile also accepts the sensor faults ``stuck``, ``spike`` and ``dropout`` (on one
``channel``) and the drift kinds ``ambient``, ``recalibration`` and ``regime``
(:mod:`simulators.base`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["FaultKind", "Profile", "PROFILES", "SENSOR_FAULTS", "DRIFT_KINDS", "names", "get", "create"]

#: Kept equal to :mod:`simulators.base` by a test (not imported, so this module needs no numpy).
SENSOR_FAULTS = ("stuck", "spike", "dropout")
DRIFT_KINDS = ("ambient", "recalibration", "regime")


@dataclass(frozen=True)
class FaultKind:
    """A process fault kind: ``gradual`` (ramps up) or sudden, and what size 1 does."""

    name: str
    gradual: bool
    size_1: str


@dataclass(frozen=True)
class Profile:
    name: str
    module: str
    description: str
    channels: tuple[str, ...]
    faults: tuple[FaultKind, ...]
    #: The rate the profile is meant to be sampled at, and the window length of its models.
    rate_hz: float = 10.0
    window_s: float = 5.0
    #: Channels that report a state (0/1): they hold their value for minutes and jump by their
    #: whole range, so the agent's stuck and spike checks must not judge them as readings
    #: (measured: with the defaults every refrigerator window was flagged ``stuck`` on ``door_open``
    #: and training found no clean window left).
    state_channels: tuple[str, ...] = ()

    @property
    def fault_kinds(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.faults)

    def quality_settings(self):
        """The agent's data-quality settings for this profile: the defaults, with the stuck check
        off and the spike scale at the full 0/1 step for its state channels."""
        from edge_agent.quality import QualitySettings

        states = self.state_channels
        return QualitySettings(stuck_n_by_channel={c: 0 for c in states}, spike_min_scale={c: 1.0 for c in states})

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description (for ``edgeloop simulate --list-profiles --json``)."""
        return {
            "name": self.name,
            "description": self.description,
            "channels": list(self.channels),
            "rate_hz": self.rate_hz,
            "faults": [{"kind": f.name, "gradual": f.gradual, "size_1": f.size_1} for f in self.faults],
            "sensor_faults": list(SENSOR_FAULTS),
            "drift": list(DRIFT_KINDS),
        }


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="machine",
            module="simulators.machine",
            description="manufacturing machine: vibration (with spectrum), bearing temperature, "
            "motor current, rpm; bearing wear leading to failure",
            channels=("vibration", "bearing_temp", "motor_current", "rpm"),
            faults=(
                FaultKind("bearing_wear", True, "defect tone 1.2 m/s², +10 °C bearing, +0.8 A"),
                FaultKind("sudden", False, "rotation harmonic +150 %, +2 A, -10 rpm, +4 °C (lagged)"),
            ),
        ),
        Profile(
            name="cold-chain",
            module="simulators.cold_chain",
            description="retail refrigerator: cabinet temperature with compressor cycling, door "
            "openings, compressor current; compressor failure, door left open",
            channels=("cabinet_temp", "ambient_temp", "compressor_current", "door_open"),
            state_channels=("door_open",),
            faults=(
                FaultKind("compressor_failure", True, "capacity down to 20 %, +1.2 A running, cabinet ~+5 °C"),
                FaultKind("door_left_open", False, "door open, compressor always on, cabinet 60 % of the "
                          "way to the shop's temperature (300 s lag)"),
            ),
        ),
        Profile(
            name="wearable",
            module="simulators.wearable",
            description="healthcare wearable: heart rate, SpO2, skin temperature, motion; "
            "arrhythmia-like episodes, gradual desaturation",
            channels=("heart_rate", "spo2", "skin_temp", "motion"),
            faults=(
                FaultKind("arrhythmia", False, "+35 bpm and beat-to-beat swings of 15 bpm, SpO2 -1 %"),
                FaultKind("desaturation", True, "SpO2 -8 %, heart rate +8 bpm"),
            ),
        ),
    )
}


def names() -> list[str]:
    return list(PROFILES)


def get(name: str) -> Profile:
    """The profile ``name``; a ``ValueError`` names the known ones."""
    try:
        return PROFILES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown simulator profile {name!r}; known profiles: {', '.join(PROFILES)}") from None


def create(name: str, *, seed: int = 0, rate_hz: float = 10.0, faults: Sequence[Any] = (), drift: Sequence[Any] = ()):
    """Build the simulator of profile ``name``."""
    module = importlib.import_module(get(name).module)
    return module.create(seed=seed, rate_hz=rate_hz, faults=list(faults), drift=list(drift))
