"""A source backed by a deterministic simulator from the ``simulators`` package.

The simulator module is imported only when a :class:`SimulatedSource` is built, so an agent
reading real sensors never loads it. Sample ``index`` of the sampler is sample ``index`` of the
simulator: the same seed gives the same readings on every run, and the simulator's ``label``
gives the ground truth for each one.

:meth:`SimulatedSource.observed_faults` is the ground truth in *device time*: the source sees
the timestamp the sampler gives each sample, so it records when each injected fault actually
began and ended on this device's clock, whatever stalls or clock steps happened on the way.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Sequence

from edge_agent.sources.base import Source

__all__ = ["PROFILES", "SimulatedSource"]

#: Profile name -> simulator module; each module offers ``create(seed, rate_hz, faults, drift)``.
#: Kept equal to :data:`simulators.profiles.PROFILES` by a test (listed here so that building
#: the registry of sources imports nothing from ``simulators``).
PROFILES: dict[str, str] = {
    "machine": "simulators.machine",
    "cold-chain": "simulators.cold_chain",
    "wearable": "simulators.wearable",
}
_MASK = (1 << 64) - 1


def _unit_hash(seed: int, index: int, channel: int) -> float:
    """A uniform number in [0, 1) from (seed, index, channel): splitmix64's finaliser."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + channel * 0x94D049BB133111EB + 1)
    z &= _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return (z ^ (z >> 31)) / 2.0**64


class SimulatedSource(Source):
    """Readings of a simulated device.

    Options: ``profile`` (simulator, see :data:`PROFILES`), ``seed``, ``rate_hz`` (must equal the
    sampler's rate so that simulated time matches wall time), ``faults`` (a list of fault
    dicts or the profile's ``Fault`` objects), ``drift`` (a list of drift dicts, see
    :mod:`simulators.base`) and ``missing`` (the probability, in [0, 1),
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
        drift: Sequence[Any] = (),
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
            self.simulator = module.create(seed=seed, rate_hz=rate_hz, faults=list(faults), drift=list(drift))
        except TypeError as exc:
            raise ValueError(f"simulated source: bad fault or option: {exc}") from exc
        self.profile = profile
        self.seed = int(seed)
        self.rate_hz = float(rate_hz)
        self.missing = float(missing)
        self.channels = tuple(self.simulator.channels)
        # Sample indices where a fault begins or ends -> [(fault number, "start"|"end")].
        self._edges: dict[int, list[tuple[int, str]]] = {}
        for k, f in enumerate(self.simulator.faults):
            for what, at in (("start", f.start_s), ("end", f.end_s)):
                self._edges.setdefault(math.ceil(at * self.rate_hz - 1e-9), []).append((k, what))
        self._seen: dict[int, dict[str, float]] = {}
        self._first: tuple[int, float] | None = None
        self._last: tuple[int, float] | None = None

    def read(self, index: int, now: float) -> list[float | None]:
        if self._first is None:
            self._first = (index, now)
        self._last = (index, now)
        if index in self._edges:
            for k, what in self._edges[index]:
                self._seen.setdefault(k, {}).setdefault(what, now)
        values: list[float | None] = self.simulator.sample(index)
        if self.missing:
            for j in range(len(values)):
                if _unit_hash(self.seed, index, j) < self.missing:
                    values[j] = None
        return values

    def label(self, index: int) -> bool:
        """Ground truth: is a simulated fault active at sample ``index``?"""
        return self.simulator.label(index)

    def observed_faults(self) -> dict:
        """Ground truth in device time: ``{"start", "end", "faults", "drift"}``.

        ``start``/``end`` span the samples read so far; each fault that began while the source
        was read has ``start`` and ``end`` as device timestamps (``end`` is the last sample's time
        plus one period if the fault had not ended yet). Faults before the first read or after
        the last are left out; drift keeps its simulated-time fields plus ``start`` when seen.
        """
        if self._first is None or self._last is None:
            return {"start": None, "end": None, "faults": [], "drift": []}
        first_i, first_t = self._first
        last_t = self._last[1] + 1.0 / self.rate_hz
        truth = self.simulator.ground_truth()
        faults = []
        for k, (f, info) in enumerate(zip(self.simulator.faults, truth["faults"])):
            seen = self._seen.get(k, {})
            start = seen.get("start")
            if start is None:
                if not f.start_s * self.rate_hz <= first_i < f.end_s * self.rate_hz:
                    continue  # never active while read
                start = first_t  # active from before the first read
            faults.append({**info, "start": start, "end": seen.get("end", last_t)})
        drift = []
        for d in truth["drift"]:
            at = first_t + (d["start_s"] - first_i / self.rate_hz)
            drift.append({**d, "start": at})
        return {"start": first_t, "end": last_t, "faults": faults, "drift": drift}
