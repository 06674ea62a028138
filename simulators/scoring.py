"""Scoring edge alarms against the simulators' ground truth.

Definitions (event based, per device):

* an **alarm** is one raised alert (an :class:`edgeloop.wire.Alert` in state ``fired``) or one
  episode of anomalous champion inferences: consecutive anomalous windows of a device and model
  version no more than ``merge_gap_s`` apart are one alarm, raised at the ``min_consecutive``-th
  anomalous window of the run (a device that needs two windows in a row to alarm passes 2);
* an alarm **matches** a fault of the same device when its time ``t`` (the window's end, device
  time) falls in ``[fault.start - lead_s, fault.end)``: inside the fault window, or at most
  ``lead_s`` seconds ahead of it (an early warning);
* **precision** = matching alarms / alarms, **recall** = faults with at least one matching alarm /
  faults, **F1** their harmonic mean (0 when both are 0);
* **false alarms per device-hour** = alarms that match no fault / hours of device time observed;
* **detection delay** of a detected fault = time of its first matching alarm - fault start,
  counted as 0 for an alarm in the lead time.

Scores are grouped per (model version, profile): alarms from inferences by their model version,
alerts by ``rule:<name>``. A group counts the hours and faults of the devices and times it saw
(for inferences, each device's span between its first and last window of that version).

Input files: the ground truth JSON that ``edgeloop simulate`` writes (see
:func:`ground_truth_document`) and JSON Lines of device messages (wire ``inference`` and
``alert`` dicts, one per line; other types are ignored).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "FaultWindow",
    "Alarm",
    "Score",
    "score",
    "alarm_episodes",
    "evaluate",
    "ground_truth_document",
    "load_ground_truth",
    "load_events",
]


@dataclass(frozen=True)
class FaultWindow:
    """One injected fault, in device time."""

    device: str
    kind: str
    start: float
    end: float
    profile: str = ""
    category: str = "process"


@dataclass(frozen=True)
class Alarm:
    """One alarm raised by ``device`` at device time ``t``; ``group`` is the model version or rule."""

    device: str
    t: float
    group: str = ""


@dataclass
class Score:
    """Counts and rates of one group (see the module docstring for the definitions)."""

    faults: int = 0
    detected: int = 0
    alarms: int = 0
    true_alarms: int = 0
    device_hours: float = 0.0
    delays_s: list[float] = field(default_factory=list)

    @property
    def false_alarms(self) -> int:
        return self.alarms - self.true_alarms

    @property
    def precision(self) -> float:
        return self.true_alarms / self.alarms if self.alarms else 0.0

    @property
    def recall(self) -> float:
        return self.detected / self.faults if self.faults else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def false_alarms_per_device_hour(self) -> float:
        return self.false_alarms / self.device_hours if self.device_hours > 0 else 0.0

    @property
    def mean_delay_s(self) -> float | None:
        return sum(self.delays_s) / len(self.delays_s) if self.delays_s else None

    @property
    def median_delay_s(self) -> float | None:
        if not self.delays_s:
            return None
        d = sorted(self.delays_s)
        mid = len(d) // 2
        return d[mid] if len(d) % 2 else (d[mid - 1] + d[mid]) / 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "faults": self.faults, "detected": self.detected, "alarms": self.alarms,
            "true_alarms": self.true_alarms, "false_alarms": self.false_alarms,
            "device_hours": self.device_hours, "precision": self.precision, "recall": self.recall,
            "f1": self.f1, "false_alarms_per_device_hour": self.false_alarms_per_device_hour,
            "mean_delay_s": self.mean_delay_s, "median_delay_s": self.median_delay_s,
        }


def score(
    faults: Sequence[FaultWindow], alarms: Sequence[Alarm], *, device_hours: float, lead_s: float = 0.0
) -> Score:
    """Score ``alarms`` against ``faults`` over ``device_hours`` of observation."""
    if not (lead_s >= 0 and math.isfinite(lead_s)):
        raise ValueError(f"lead_s must be >= 0, got {lead_s!r}")
    if not device_hours >= 0:
        raise ValueError(f"device_hours must be >= 0, got {device_hours!r}")
    by_device: dict[str, list[FaultWindow]] = defaultdict(list)
    for f in faults:
        by_device[f.device].append(f)
    first_match: dict[int, float] = {}
    index = {id(f): k for k, f in enumerate(faults)}
    true_alarms = 0
    for a in alarms:
        matched = False
        for f in by_device.get(a.device, ()):
            if f.start - lead_s <= a.t < f.end:
                matched = True
                k = index[id(f)]
                first_match[k] = min(first_match.get(k, math.inf), a.t)
        true_alarms += matched
    delays = [max(0.0, first_match[k] - faults[k].start) for k in sorted(first_match)]
    return Score(faults=len(faults), detected=len(first_match), alarms=len(alarms), true_alarms=true_alarms,
                 device_hours=float(device_hours), delays_s=delays)


def alarm_episodes(
    rows: Iterable[tuple[str, float, bool]], *, merge_gap_s: float, min_consecutive: int = 1, group: str = ""
) -> list[Alarm]:
    """Alarms from ``(device, window_end, anomaly)`` rows of one model (any order).

    A run is a maximal sequence of anomalous windows of a device no more than ``merge_gap_s``
    apart, with no normal window in between; it raises one alarm at its ``min_consecutive``-th
    window, or none if it is shorter.
    """
    if min_consecutive < 1:
        raise ValueError(f"min_consecutive must be >= 1, got {min_consecutive}")
    per_device: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    for device, t, anomaly in rows:
        per_device[device].append((float(t), bool(anomaly)))
    alarms: list[Alarm] = []
    for device, seq in per_device.items():
        seq.sort()
        run = 0
        last_t = -math.inf
        for t, anomaly in seq:
            if not anomaly:
                run = 0
                continue
            run = run + 1 if run and t - last_t <= merge_gap_s else 1
            last_t = t
            if run == min_consecutive:
                alarms.append(Alarm(device, t, group))
    return alarms


def ground_truth_document(devices: Iterable[Mapping[str, Any]], **meta: Any) -> dict[str, Any]:
    """The ground-truth JSON: ``meta`` plus one entry per device with ``device``, ``profile``,
    ``start`` and ``end`` (device time observed) and ``faults``/``drift`` with absolute ``start``
    and ``end`` (device time)."""
    return {"format": "edgeloop-ground-truth-1", **meta, "devices": [dict(d) for d in devices]}


def load_ground_truth(path: str | Path) -> dict[str, Any]:
    """Read a ground-truth JSON file; errors name the file and what is wrong."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"ground truth {path}: cannot read: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("devices"), list):
        raise ValueError(f"ground truth {path}: expected an object with a 'devices' list")
    for k, d in enumerate(doc["devices"]):
        for key in ("device", "start", "end", "faults"):
            if key not in d:
                raise ValueError(f"ground truth {path}: devices[{k}] has no {key!r}")
    return doc


def load_events(path: str | Path) -> list[dict[str, Any]]:
    """Read JSON Lines of device messages; blank lines are skipped, a bad line is named."""
    path = Path(path)
    events = []
    with path.open() as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
    return events


def evaluate(
    ground_truth: Mapping[str, Any],
    events: Iterable[Mapping[str, Any]],
    *,
    lead_s: float = 0.0,
    merge_gap_s: float | None = None,
    min_consecutive: int = 1,
    categories: Sequence[str] = ("process",),
) -> dict[tuple[str, str], Score]:
    """Scores per (model version or ``rule:<name>``, profile) of wire ``inference``/``alert`` dicts.

    ``merge_gap_s`` defaults to 2.5 x the median spacing of a device's windows. Only champion
    inferences count; faults of other ``categories`` (e.g. ``sensor``) are left out.
    """
    devices = {d["device"]: d for d in ground_truth["devices"]}
    faults = [
        FaultWindow(d["device"], f["kind"], float(f["start"]), float(f["end"]), d.get("profile", ""),
                    f.get("category", "process"))
        for d in devices.values() for f in d["faults"] if f.get("category", "process") in categories
    ]
    inferences: dict[str, list[tuple[str, float, bool]]] = defaultdict(list)
    alerts: dict[str, list[Alarm]] = defaultdict(list)
    for e in events:
        device = e.get("device")
        if device not in devices:
            continue
        if e.get("type") == "inference" and e.get("role", "champion") == "champion":
            inferences[e["model_version"]].append((device, float(e["window_end"]), bool(e["anomaly"])))
        elif e.get("type") == "alert" and e.get("state", "fired") == "fired":
            group = f"rule:{e['rule']}"
            alerts[group].append(Alarm(device, float(e["window_end"]), group))

    results: dict[tuple[str, str], Score] = {}
    for version, rows in inferences.items():
        span: dict[str, list[float]] = {}
        for device, t, _ in rows:
            lo_hi = span.setdefault(device, [t, t])
            lo_hi[0], lo_hi[1] = min(lo_hi[0], t), max(lo_hi[1], t)
        gap = merge_gap_s if merge_gap_s is not None else 2.5 * _median_spacing(rows)
        alarms = alarm_episodes(rows, merge_gap_s=gap, min_consecutive=min_consecutive, group=version)
        for profile in sorted({devices[d].get("profile", "") for d in span}):
            seen = {d: s for d, s in span.items() if devices[d].get("profile", "") == profile}
            fs = [f for f in faults if f.device in seen and f.end > seen[f.device][0] - lead_s
                  and f.start - lead_s <= seen[f.device][1]]
            hours = sum(hi - lo for lo, hi in seen.values()) / 3600.0
            results[(version, profile)] = score(fs, [a for a in alarms if a.device in seen],
                                                device_hours=hours, lead_s=lead_s)
    for group, alarms in alerts.items():
        for profile in sorted({d.get("profile", "") for d in devices.values()}):
            seen = {k: d for k, d in devices.items() if d.get("profile", "") == profile}
            hours = sum(float(d["end"]) - float(d["start"]) for d in seen.values()) / 3600.0
            results[(group, profile)] = score([f for f in faults if f.device in seen],
                                              [a for a in alarms if a.device in seen],
                                              device_hours=hours, lead_s=lead_s)
    return results


def _median_spacing(rows: Sequence[tuple[str, float, bool]]) -> float:
    per: dict[str, list[float]] = defaultdict(list)
    for device, t, _ in rows:
        per[device].append(t)
    gaps = sorted(b - a for ts in per.values() for a, b in zip(sorted(ts), sorted(ts)[1:]) if b > a)
    return gaps[len(gaps) // 2] if gaps else 1.0
