"""A source backed by a deterministic simulator from the ``simulators`` package.

The simulator module is imported only when a :class:`SimulatedSource` is built, so an agent
reading real sensors never loads it. Sample ``index`` of the sampler is sample ``index`` of the
simulator: the same seed gives the same readings on every run, and the simulator's ``label``
gives the ground truth for each one.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Sequence

from edge_agent.sources.base import Source

__all__ = ["PROFILES", "SimulatedSource"]

#: Profile name -> simulator module; each module offers ``create(seed, rate_hz, faults)``.
PROFILES: dict[str, str] = {"machine": "simulators.machine"}
_MASK = (1 << 64) - 1


def _unit_hash(seed: int, index: int, channel: int) -> float:
    """A uniform number in [0, 1) from (seed, index, channel): splitmix64's finaliser."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + channel * 0x94D049BB133111EB + 1)
    z &= _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return (z ^ (z >> 31)) / 2.0**64


class SimulatedSource(Source):
    """Readings of a simulated machine.

    Options: ``profile`` (simulator, see :data:`PROFILES`), ``seed``, ``rate_hz`` (must equal the
    sampler's rate so that simulated time matches wall time), ``faults`` (a list of fault
    dicts or ``simulators.machine.Fault`` objects) and ``missing`` (the probability, in [0, 1),
    that a channel's reading is dropped to ``None``; deterministic in seed and index too).
    """

    name = "simulated"

    def __init__(
        self,
        profile: str = "machine",
        seed: int = 0,
        rate_hz: float = 10.0,
        faults: Sequence[Any] = (),
        missing: float = 0.0,
    ) -> None:
        module_name = PROFILES.get(profile)
        if module_name is None:
            raise ValueError(
                f"unknown simulator profile {profile!r}; known profiles: {', '.join(sorted(PROFILES))}"
            )
        if not (0.0 <= missing < 1.0 and math.isfinite(missing)):
            raise ValueError(f"option 'missing' must be in [0, 1), got {missing!r}")
        module = importlib.import_module(module_name)
        try:
            self.simulator = module.create(seed=seed, rate_hz=rate_hz, faults=list(faults))
        except TypeError as exc:
            raise ValueError(f"simulated source: bad fault or option: {exc}") from exc
        self.profile = profile
        self.seed = int(seed)
        self.rate_hz = float(rate_hz)
        self.missing = float(missing)
        self.channels = tuple(self.simulator.channels)

    def read(self, index: int, now: float) -> list[float | None]:
        values: list[float | None] = self.simulator.sample(index)
        if self.missing:
            for j in range(len(values)):
                if _unit_hash(self.seed, index, j) < self.missing:
                    values[j] = None
        return values

    def label(self, index: int) -> bool:
        """Ground truth: is a simulated fault active at sample ``index``?"""
        return self.simulator.label(index)
