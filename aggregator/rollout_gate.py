"""The rollout gate and the post-promotion health check: pure statistics, no I/O, no clock.

A rollout (see :mod:`aggregator.rollout`) runs the challenger in shadow on a few canary devices.
Each canary scores every window with both models, so the evidence is a list of :class:`Pair` per
canary: the champion's and the shadow's verdict on the same window. :func:`evaluate_gate` turns
those pairs into a pass/fail decision with every reason spelled out; :func:`evaluate_watch` does
the same for the new champion's first windows after promotion against the old champion's baseline.

The checks, all set by :class:`RolloutPolicy`:

* **agreement**: the share of windows where both models flag the same way, at least ``min_agreement``;
* **anomaly rate**: the shadow's rate at most the champion's plus ``max_rate_increase``, and never
  above the absolute cap ``max_anomaly_rate``;
* **latency**: the shadow's p95 at most ``latency_factor`` x the champion's p95 plus
  ``latency_slack_us`` (the slack keeps microsecond-scale noise from failing a fast model);
* **F1** where labels exist: shadow F1 >= champion F1 - ``f1_tolerance``, on windows whose truth is
  known (a window is positive when its end falls inside a labelled fault window);
* **rejections**: any canary reporting the challenger ``rejected`` or ``rolled_back`` fails the gate.

**Labels decide when they cover the evidence.** When every canary's windows are labelled (the
labels provider answered for each, even with "no fault here"), the truth is known, and agreement
and raw anomaly rates stop being vetoes: a challenger that catches a real fault the champion
misses raises its anomaly rate, and one that no longer raises the champion's false alarms after a
drift disagrees with it; both are better, not worse. Then the checks are F1 (when the windows hold
a fault) and the **false-alarm rate** (flagged share of the windows labelled normal) against the
champion's plus ``max_rate_increase`` and under the ``max_anomaly_rate`` cap. Without labels, or
with only some canaries labelled, agreement and rates decide as above (F1 added where labelled).
The watch does the same: labelled watch windows are judged by F1 and the false-alarm rate against
the old champion's, unlabelled ones by the anomaly rate.
"""

from __future__ import annotations

import math
from typing import Annotated, Iterable, Sequence

import msgspec
from msgspec import Meta, Struct

__all__ = ["RolloutPolicy", "Pair", "Verdict", "evaluate_gate", "evaluate_watch", "f1_score",
           "false_alarm_rate", "label_windows", "percentile"]

Fraction = Annotated[float, Meta(ge=0.0, le=1.0)]


class RolloutPolicy(Struct, kw_only=True, forbid_unknown_fields=True):
    """How a rollout decides. Defaults suit windows of a few seconds and a fleet of tens of devices."""

    gate_windows: Annotated[int, Meta(ge=1, le=100_000)] = 60  # paired windows per canary
    min_agreement: Fraction = 0.9
    max_rate_increase: Fraction = 0.05  # shadow anomaly rate - champion's, at most
    max_anomaly_rate: Fraction = 0.25  # absolute cap on the shadow's anomaly rate
    latency_factor: Annotated[float, Meta(ge=1.0)] = 2.0
    latency_slack_us: Annotated[float, Meta(ge=0.0)] = 200.0
    f1_tolerance: Fraction = 0.05
    #: Cumulative fractions of the profile's devices after the canaries (the last must be 1.0).
    waves: Annotated[list[Annotated[float, Meta(gt=0.0, le=1.0)]], Meta(min_length=1, max_length=20)] = msgspec.field(default_factory=lambda: [0.5, 1.0])
    watch_windows: Annotated[int, Meta(ge=1, le=1_000_000)] = 120  # new-champion windows, fleet-wide
    watch_rate_increase: Fraction = 0.05  # new champion's anomaly rate over the old baseline, at most
    canary_timeout_s: Annotated[float, Meta(gt=0)] = 3600.0  # no verdict by then: rejected
    wave_timeout_s: Annotated[float, Meta(gt=0)] = 600.0  # a wave stops waiting for silent devices
    watch_timeout_s: Annotated[float, Meta(gt=0)] = 86400.0  # too few windows by then: judged on what came
    #: Seconds between two rounds of decisions (:meth:`RolloutManager.serve`): each state change
    #: waits up to this long, so a rollout's canary, waves and watch take a few of them.
    tick_s: Annotated[float, Meta(gt=0, le=60)] = 1.0
    #: Labelled windows this long before a fault or after it are neither fault nor normal (an early
    #: warning, a machine settling back): not judged.
    label_lead_s: Annotated[float, Meta(ge=0)] = 60.0
    label_after_s: Annotated[float, Meta(ge=0)] = 120.0

    def __post_init__(self) -> None:
        if list(self.waves) != sorted(self.waves) or self.waves[-1] != 1.0:
            raise ValueError(f"waves must rise and end at 1.0, not {self.waves}")


class Pair(Struct, array_like=True):
    """One window scored by both models on one device: ``[window_end, champion flag, shadow flag,
    champion latency µs, shadow latency µs]`` (array-like: compact in the persisted state)."""

    window_end: float
    champion: bool
    shadow: bool
    champion_us: float
    shadow_us: float


class Verdict(Struct, kw_only=True):
    """A decision and its evidence. ``ready`` is False while evidence is still missing."""

    ready: bool
    passed: bool
    reasons: list[str] = []
    stats: dict[str, dict[str, float | int | None]] = {}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` percentile (0-100) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def _window_bounds(window) -> tuple[float, float]:
    """(start, end) of a fault window given as a pair, a mapping or an object with start/end."""
    if isinstance(window, dict):
        return float(window["start"]), float(window["end"])
    if hasattr(window, "start") and hasattr(window, "end"):
        return float(window.start), float(window.end)
    start, end = window
    return float(start), float(end)


def label_windows(window_ends: Iterable[float], faults: Iterable, lead_s: float = 0.0,
                  after_s: float = 0.0) -> list[bool | None]:
    """Ground truth per window: True when its end lies inside one of the fault windows, None
    (unknown: not judged) within ``lead_s`` before or ``after_s`` after one, else False."""
    spans = sorted(_window_bounds(w) for w in faults)
    out: list[bool | None] = []
    for t in window_ends:
        if any(lo <= t <= hi for lo, hi in spans):
            out.append(True)
        elif any(lo - lead_s <= t <= hi + after_s for lo, hi in spans):
            out.append(None)
        else:
            out.append(False)
    return out


def f1_score(truth: Sequence[bool | None], predicted: Sequence[bool]) -> float | None:
    """F1 of ``predicted`` against ``truth`` (windows whose truth is None left out); None when
    the truth has no positive (F1 undefined)."""
    known = [(t, p) for t, p in zip(truth, predicted) if t is not None]
    tp = sum(1 for t, p in known if t and p)
    positives = sum(1 for t, _ in known if t)
    if positives == 0:
        return None
    flagged = sum(1 for _, p in known if p)
    return 2.0 * tp / (positives + flagged)


def false_alarm_rate(truth: Sequence[bool | None], predicted: Sequence[bool]) -> float | None:
    """Share of the windows labelled normal (truth False) that ``predicted`` flags; None without such windows."""
    flags = [p for t, p in zip(truth, predicted) if t is False]
    return _rate(flags) if flags else None


def _rate(flags: Sequence[bool]) -> float:
    return sum(1 for f in flags if f) / len(flags) if flags else 0.0


def evaluate_gate(
    pairs: dict[str, list[Pair]],
    policy: RolloutPolicy,
    *,
    truth: dict[str, list[bool]] | None = None,
    rejections: Sequence[str] = (),
    final: bool = False,
) -> Verdict:
    """Decide the canary gate from each canary's pairs (the first ``gate_windows`` of each).

    ``truth`` holds, per canary, the label of each of its pairs (from :func:`label_windows`);
    canaries missing from it count as unlabelled. ``rejections`` are reasons a canary refused the
    challenger: any of them fails the gate at once. Without enough pairs the verdict is not
    ``ready`` unless ``final`` (the canary time-out), which fails it naming the short canaries.
    """
    if rejections:
        return Verdict(ready=True, passed=False, reasons=list(rejections))
    short = {d: len(p) for d, p in pairs.items() if len(p) < policy.gate_windows}
    if short:
        if not final:
            return Verdict(ready=False, passed=False)
        detail = ", ".join(f"{d} gave {n}" for d, n in sorted(short.items()))
        return Verdict(ready=True, passed=False,
                       reasons=[f"too few paired windows: {detail} of the {policy.gate_windows} needed"])
    used = {d: p[: policy.gate_windows] for d, p in pairs.items()}
    every = [x for p in used.values() for x in p]
    if not every:
        return Verdict(ready=True, passed=False, reasons=["no canary devices"])
    reasons: list[str] = []
    champ_flags, shadow_flags = [x.champion for x in every], [x.shadow for x in every]
    agreement = sum(1 for x in every if x.champion == x.shadow) / len(every)
    champ_rate, shadow_rate = _rate(champ_flags), _rate(shadow_flags)
    champ_p95 = percentile([x.champion_us for x in every], 95)
    shadow_p95 = percentile([x.shadow_us for x in every], 95)
    stats: dict[str, dict] = {"all": {
        "windows": len(every), "agreement": agreement, "champion_rate": champ_rate, "shadow_rate": shadow_rate,
        "champion_p95_us": champ_p95, "shadow_p95_us": shadow_p95, "champion_f1": None, "shadow_f1": None}}
    for device, p in sorted(used.items()):
        stats[device] = {"windows": len(p), "agreement": sum(1 for x in p if x.champion == x.shadow) / len(p),
                         "champion_rate": _rate([x.champion for x in p]), "shadow_rate": _rate([x.shadow for x in p])}
    labelled = bool(truth) and all(d in truth for d in used)
    stats["all"]["by_labels"] = int(labelled)  # 1: labels decided, agreement and rates only shown
    if not labelled:
        reasons += _rate_reasons(agreement, champ_rate, shadow_rate, policy)
    allowed_us = champ_p95 * policy.latency_factor + policy.latency_slack_us
    if shadow_p95 > allowed_us:
        reasons.append(f"latency p95 {shadow_p95:.0f} us above {allowed_us:.0f} us "
                       f"({policy.latency_factor:g} x the champion's {champ_p95:.0f} us + {policy.latency_slack_us:g})")
    if truth:
        t_all, c_all, s_all = [], [], []
        for device, p in used.items():
            labels = truth.get(device)
            if labels is None:
                continue
            t_all += labels[: len(p)]
            c_all += [x.champion for x in p]
            s_all += [x.shadow for x in p]
        champ_f1, shadow_f1 = f1_score(t_all, c_all), f1_score(t_all, s_all)
        champ_fa, shadow_fa = false_alarm_rate(t_all, c_all), false_alarm_rate(t_all, s_all)
        stats["all"].update(champion_f1=champ_f1, shadow_f1=shadow_f1, champion_false_rate=champ_fa,
                            shadow_false_rate=shadow_fa, labelled_windows=len(t_all))
        if champ_f1 is not None and shadow_f1 is not None and shadow_f1 < champ_f1 - policy.f1_tolerance:
            reasons.append(f"F1 {shadow_f1:.3f} below the champion's {champ_f1:.3f} "
                           f"by more than {policy.f1_tolerance:.3f}")
        if labelled:
            reasons += _false_alarm_reasons(shadow_fa, champ_fa, policy.max_rate_increase, policy, "champion's")
    return Verdict(ready=True, passed=not reasons, reasons=reasons, stats=stats)


def _rate_reasons(agreement: float, champ_rate: float, shadow_rate: float, policy: RolloutPolicy) -> list[str]:
    """The unlabelled gate: agreement with the champion and anomaly rates."""
    reasons = []
    if agreement < policy.min_agreement:
        reasons.append(f"agreement {agreement:.3f} below {policy.min_agreement:.3f}")
    if shadow_rate > champ_rate + policy.max_rate_increase:
        reasons.append(f"anomaly rate {shadow_rate:.3f} exceeds the champion's {champ_rate:.3f} "
                       f"by more than {policy.max_rate_increase:.3f}")
    if shadow_rate > policy.max_anomaly_rate:
        reasons.append(f"anomaly rate {shadow_rate:.3f} above the cap {policy.max_anomaly_rate:.3f}")
    return reasons


def _false_alarm_reasons(rate: float | None, baseline: float | None, allowed: float, policy: RolloutPolicy,
                         whose: str) -> list[str]:
    """The labelled check: false alarms on windows labelled normal, against a baseline and the cap."""
    if rate is None:
        return []
    reasons = []
    if baseline is not None and rate > baseline + allowed:
        reasons.append(f"false-alarm rate {rate:.3f} on windows labelled normal exceeds the {whose} "
                       f"{baseline:.3f} by more than {allowed:.3f}")
    if rate > policy.max_anomaly_rate:
        reasons.append(f"false-alarm rate {rate:.3f} above the cap {policy.max_anomaly_rate:.3f}")
    return reasons


def evaluate_watch(
    flags: Sequence[bool],
    baseline_rate: float,
    policy: RolloutPolicy,
    *,
    truth: Sequence[bool] | None = None,
    baseline_f1: float | None = None,
    baseline_false_rate: float | None = None,
    final: bool = False,
) -> Verdict:
    """Judge the new champion's first ``watch_windows`` flags against the old champion's baseline.

    Without labels (``truth`` None), worse means an anomaly rate more than ``watch_rate_increase``
    above ``baseline_rate``. With labels for these windows, the anomaly rate is no measure (a
    model catching a real fault raises it): worse means a false-alarm rate on the windows labelled
    normal more than ``watch_rate_increase`` above ``baseline_false_rate`` (default
    ``baseline_rate``) or over the cap, or, with a baseline F1 and a fault in the windows, an F1
    more than ``f1_tolerance`` below it. Not ``ready`` until ``watch_windows`` flags came, unless
    ``final`` (the watch time-out).
    """
    if len(flags) < policy.watch_windows and not final:
        return Verdict(ready=False, passed=False)
    used = list(flags[: policy.watch_windows])
    rate = _rate(used)
    stats: dict[str, dict] = {"watch": {"windows": len(used), "rate": rate, "baseline_rate": baseline_rate,
                                        "f1": None, "baseline_f1": baseline_f1}}
    reasons = []
    if truth is None:
        if rate > baseline_rate + policy.watch_rate_increase:
            reasons.append(f"anomaly rate {rate:.3f} over {len(used)} windows exceeds the previous champion's "
                           f"{baseline_rate:.3f} by more than {policy.watch_rate_increase:.3f}")
        return Verdict(ready=True, passed=not reasons, reasons=reasons, stats=stats)
    labels = list(truth[: len(used)])
    false_rate = false_alarm_rate(labels, used)
    baseline_fa = baseline_rate if baseline_false_rate is None else baseline_false_rate
    stats["watch"].update(false_rate=false_rate, baseline_false_rate=baseline_fa, by_labels=1)
    reasons += _false_alarm_reasons(false_rate, baseline_fa, policy.watch_rate_increase, policy,
                                    "previous champion's")
    if baseline_f1 is not None:
        f1 = f1_score(labels, used)
        stats["watch"]["f1"] = f1
        if f1 is not None and f1 < baseline_f1 - policy.f1_tolerance:
            reasons.append(f"F1 {f1:.3f} below the previous champion's {baseline_f1:.3f} "
                           f"by more than {policy.f1_tolerance:.3f}")
    return Verdict(ready=True, passed=not reasons, reasons=reasons, stats=stats)


def policy_from_dict(data: dict) -> RolloutPolicy:
    """A policy from plain values (a config table), errors naming the key."""
    return msgspec.convert(data, RolloutPolicy)
