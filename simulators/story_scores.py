"""The story's narration of the loop (:class:`Follower`) and its final scores (:func:`score_story`).

:class:`Follower` polls the aggregator's retrainer and rollout manager and says what changed:
a retrain and why (drift with its PSI, schedule, manual), each rollout state (canary, promoting,
watching, done, rejected, rolled back) and each new champion.

:func:`score_story` judges the models against the simulator's ground truth, event based
(:func:`simulators.scoring.alarm_episodes` and :func:`simulators.scoring.score`):

* **before**: the first store-trained model on the champion windows it served before
  the drift began;
* **after**: the loop's champions (whichever version served each window) once the drift has set
  in, i.e. after the last drift's ramp ended (``start + ramp_s``): the new regime the loop must
  bring F1 back in;
* **frozen after**: that first model scored offline on the stored features of exactly those windows,
  what the fleet would have seen had nobody retrained;
* **after onset** / **frozen after onset**: the same from the moment the drift began, ramp included
  (the loop chases a moving world there; reported, not the bar);
* **recovered** / **frozen recovered**: from one operating cycle (``cycle_s``) after the drift
  settled: the loop once it could have seen the new regime's whole cycle (reported, not the bar).
"""

from __future__ import annotations

import math
from collections import defaultdict

__all__ = ["Follower", "score_story", "score_rows"]


class Follower:
    """Narrates retrains, rollout states and champions; remembers them for the summary."""

    def __init__(self, agg, profiles: list[str], say) -> None:
        self.agg, self.profiles, self.say = agg, profiles, say
        self.champions: dict[str, list[str]] = {p: [agg.models.champion(p)] for p in profiles}
        self.retrains: list[tuple[str, str, str]] = []
        self._seen: dict[str, tuple[str, str]] = {}
        self._decisions: dict[str, object] = {}
        self._states: dict[tuple[str, str], str] = {}

    def poll(self) -> None:
        agg = self.agg
        for profile in self.profiles:
            d = agg.retrainer.last.get(profile) if agg.retrainer is not None else None
            if d is not None and d is not self._decisions.get(profile):
                self._decisions[profile] = d
                if d.version is not None:
                    self.retrains.append((profile, d.reason, d.version))
                    why = d.reason
                    if d.drift is not None:
                        why += f" ({d.drift.verdict})"
                    self.say(f"  retrained {profile}/{d.version}: {why}")
            s = agg.rollouts.status(profile)
            if s is not None:
                key = (profile, s["version"])
                if self._states.get(key) != s["state"]:
                    self._states[key] = s["state"]
                    last = s["events"][-1][1] if s["events"] else ""
                    self.say(f"  rollout {profile}/{s['version']}: {s['state']} - {last}")
            champion = agg.models.champion(profile)
            if champion != self.champions[profile][-1]:
                self.champions[profile].append(champion)
                self.say(f"  {profile}: champion is now {champion}")

    def finished(self) -> list[tuple[str, str, str]]:
        return [(p, v, s) for (p, v), s in sorted(self._states.items())]


def score_rows(rows, faults, *, lead_s: float, min_consecutive: int, merge_gap_s: float, model: str):
    """A :class:`simulators.story.PeriodScore` of ``(device, window_end, anomaly)`` rows against
    ``faults`` (``FaultWindow`` of those devices) over each device's span of rows."""
    from simulators import scoring
    from simulators.story import PeriodScore

    span: dict[str, list[float]] = {}
    for device, t, _ in rows:
        lo, hi = span.get(device, (math.inf, -math.inf))
        span[device] = [min(lo, t), max(hi, t)]
    hours = sum(hi - lo for lo, hi in span.values()) / 3600.0
    seen = [f for f in faults if f.device in span and f.end > span[f.device][0] - lead_s
            and f.start - lead_s <= span[f.device][1]]
    alarms = scoring.alarm_episodes(rows, merge_gap_s=merge_gap_s, min_consecutive=min_consecutive)
    s = scoring.score(seen, alarms, device_hours=hours, lead_s=lead_s)
    return PeriodScore(model=model, start=min((v[0] for v in span.values()), default=0.0),
                       end=max((v[1] for v in span.values()), default=0.0), windows=len(rows),
                       faults=s.faults, detected=s.detected, alarms=s.alarms, f1=s.f1)


def score_story(story, agg, sources, result) -> None:
    """Fill ``result.before``, ``result.after`` and ``result.frozen_after`` (see the module docstring)."""
    import numpy as np

    from edge_agent.inference import Model
    from simulators import scoring

    sc, o = story.sc, story.o
    faults, drift_start, drift_settled = [], {}, {}
    for device, src in sources.items():
        seen = src.observed_faults()
        faults += [scoring.FaultWindow(device, f["kind"], float(f["start"]), float(f["end"]))
                   for f in seen["faults"] if f.get("category", "process") == "process"]
        starts = [d["start"] for d in seen["drift"] if d.get("start") is not None]
        if starts:
            drift_start[device] = min(starts)
            drift_settled[device] = max(d["start"] + float(d.get("ramp_s") or 0.0)
                                        for d in seen["drift"] if d.get("start") is not None)
    kw = {"lead_s": sc.lead_s, "min_consecutive": o.min_consecutive, "merge_gap_s": 2.5 * sc.window_s}
    by_profile: dict[str, list] = defaultdict(list)
    for row in story.rows:
        by_profile[row[4]].append(row)
    for profile, rows in by_profile.items():
        first = story.first.get(profile)
        if first is None:
            continue
        before = [(d, t, a) for d, v, t, a, _ in rows if v == first and t < drift_start.get(d, math.inf)]
        if before:
            result.before[profile] = score_rows(before, faults, model=first, **kw)
        retrained = set(result.versions.get(profile, [])) - {first, None} - {v for v in result.versions.get(profile, [])[:1]}
        if not retrained or not any(story.profiles[d] == profile for d in drift_start):
            continue
        recovered = {d: t + o.cycle_s for d, t in drift_settled.items()}
        for since, loop_out, frozen_out in ((drift_settled, result.after, result.frozen_after),
                                            (drift_start, result.after_onset, result.frozen_after_onset),
                                            (recovered, result.recovered, result.frozen_recovered)):
            _score_after(story, agg, rows, faults, profile, first, since, loop_out, frozen_out, kw)


def _score_after(story, agg, rows, faults, profile, first, since, loop_out, frozen_out, kw) -> None:
    """Score the loop's champion windows from ``since[device]`` on, and the frozen first model on
    the stored features of the same windows."""
    import numpy as np

    from edge_agent.inference import Model

    after = [(d, t, a) for d, v, t, a, _ in rows if v != story.factory and d in since and t >= since[d]]
    if not after:
        return
    served = sorted({v for d, v, t, a, _ in rows if d in since and t >= since[d]})
    loop_out[profile] = score_rows(after, faults, model="loop: " + ", ".join(served), **kw)
    entry = agg.models.get(profile, first)
    frozen = Model.load((entry.onnx_bytes(), entry.manifest))
    lo, hi = min(t for _, t, _ in after), max(t for _, t, _ in after)
    stored = agg.store.feature_rows(profile, lo - 1e-3, hi + 1e-3, feature_set=entry.manifest.feature_set,
                                    names=entry.manifest.feature_names, exclude_flagged=False)
    flags = frozen.score_batch(np.asarray(stored.matrix, dtype=np.float32)) > frozen.threshold
    wanted = {(d, round(t, 3)) for d, t, _ in after}
    frozen_rows = [(d, float(t), bool(f)) for d, t, f in zip(stored.devices, stored.times, flags)
                   if (d, round(float(t), 3)) in wanted]
    frozen_out[profile] = score_rows(frozen_rows, faults, model=f"{first} (frozen)", **kw)
