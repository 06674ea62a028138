"""What a rollout remembers: the persisted :class:`Rollout` record and the bookkeeping around it.

:class:`aggregator.rollout.RolloutManager` decides (gate, waves, watch, rollback); this module
holds what those decisions read and write, kept apart so the state machine reads as one story:

* :class:`Rollout`, one profile's rollout as stored in ``<state_dir>/rollouts/<profile>.json``
  (:func:`load_rollouts`, :func:`encode_rollout`), so an aggregator restart resumes it;
* :class:`LiveRollout`, the in-memory companions of a running one (membership sets, verdicts
  still waiting for their other half);
* :func:`record_inference` and :func:`record_deployment`, which file one uplink message into the
  record. They run on the ingest writer's thread under the manager's lock and only record;
* :func:`summarize`, the record as the API and CLI show it (bulky evidence counted, not listed);
* the arithmetic that fills a new record: :func:`canary_count`, :func:`plan_waves`, and the
  ground truth from labels (:func:`gate_truth`, :func:`watch_truth`) the gate and watch compare F1 on.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Sequence

import msgspec
from msgspec import Struct

from edgeloop import wire
from aggregator.rollout_gate import Pair, RolloutPolicy, Verdict, false_alarm_rate, label_windows

__all__ = ["Rollout", "RolloutError", "LiveRollout", "STATES", "ACTIVE_STATES", "MAX_EVENTS",
           "load_rollouts", "encode_rollout", "record_inference", "record_deployment", "summarize",
           "canary_count", "plan_waves", "gate_truth", "watch_truth", "baseline_false_rate"]

log = logging.getLogger("aggregator.rollout")

STATES = ("canary", "promoting", "watching", "done", "rejected", "rolled_back")
ACTIVE_STATES = frozenset({"canary", "promoting", "watching"})
MAX_HALVES = 8192  # unpaired champion/shadow verdicts kept while waiting for their other half
MAX_EVENTS = 200  # a rollout's event log keeps the newest this many
MAX_BASELINE = 4096  # old-champion windows kept (fleet-wide, while canary) to label for the watch


class RolloutError(ValueError):
    """A rollout request that cannot be done (unknown model, one already running, no devices...).
    ``status`` is the HTTP status that fits: 404 unknown, 409 conflicting state, 400 bad input."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Rollout(Struct, kw_only=True):
    """One rollout's persisted state. ``members`` are the profile's devices when it started."""

    profile: str
    version: str
    previous: str
    state: str
    started_at: float
    updated_at: float
    canaries: list[str]
    members: list[str]
    pairs: dict[str, list[Pair]] = {}
    rejections: list[str] = []
    gate: Verdict | None = None
    waves: list[list[str]] = []
    wave: int = 0
    wave_started_at: float = 0.0
    active: list[str] = []
    laggards: list[str] = []
    baseline_windows: int = 0
    baseline_anomalies: int = 0
    baseline_f1: float | None = None
    #: The old champion's first windows fleet-wide while canary, (device, window_end, anomaly):
    #: labelled at watch time, their false-alarm rate is the watch's baseline.
    baseline: list[tuple[str, float, bool]] = []
    watch: list[tuple[str, float, bool]] = []  # (device, window_end, anomaly) of the new champion
    watch_started_at: float = 0.0
    watch_verdict: Verdict | None = None
    rollback_version: str | None = None
    #: Why the world drifted from this version's training data during the rollout ("": it did
    #: not), as the retrainer's drift check said (:meth:`RolloutManager.note_drift`).
    drift: str = ""
    reasons: list[str] = []
    error: str = ""
    events: list[tuple[float, str]] = []


class LiveRollout:
    """In-memory companions of an active rollout: fast membership sets and unpaired verdicts."""

    def __init__(self, r: Rollout) -> None:
        self.r = r
        self.canaries = set(r.canaries)
        self.members = set(r.members) | self.canaries
        self.active = set(r.active)
        self.halves: dict[tuple[str, float], tuple[str, bool, float]] = {}


# -- persistence ----------------------------------------------------------------------------------


def load_rollouts(directory: Path) -> dict[str, Rollout]:
    """Every readable ``*.json`` record in ``directory`` by profile; unreadable ones are logged."""
    out: dict[str, Rollout] = {}
    for path in sorted(Path(directory).glob("*.json")):
        try:
            r = msgspec.json.decode(path.read_bytes(), type=Rollout)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("cannot read rollout state %s: %s", path, exc)
            continue
        out[r.profile] = r
    return out


def encode_rollout(r: Rollout) -> bytes:
    return msgspec.json.encode(r)


# -- recording (ingest writer thread, under the manager's lock) -----------------------------------


def record_inference(live: LiveRollout, msg: wire.Inference, policy: RolloutPolicy) -> bool:
    """File one verdict: baseline counts and champion/shadow pairs while canary, the new
    champion's windows while watching. True if the persisted record changed."""
    r = live.r
    if r.state == "canary":
        if msg.role == "champion" and msg.model_version == r.previous:
            r.baseline_windows += 1
            r.baseline_anomalies += bool(msg.anomaly)
            if len(r.baseline) < MAX_BASELINE:
                r.baseline.append((msg.device, float(msg.window_end), bool(msg.anomaly)))
        if msg.device not in live.canaries or (msg.role == "shadow" and msg.model_version != r.version):
            return False
        key = (msg.device, msg.window_end)
        other = live.halves.get(key)
        if other is None or other[0] == msg.role:
            if len(live.halves) >= MAX_HALVES:
                live.halves.pop(next(iter(live.halves)))
            live.halves[key] = (msg.role, bool(msg.anomaly), float(msg.latency_us))
            return False
        del live.halves[key]
        champ, shadow = (other, (msg.role, msg.anomaly, msg.latency_us)) if msg.role == "shadow" else \
            ((msg.role, msg.anomaly, msg.latency_us), other)
        pairs = r.pairs.setdefault(msg.device, [])
        if len(pairs) < policy.gate_windows:
            pairs.append(Pair(msg.window_end, bool(champ[1]), bool(shadow[1]), float(champ[2]), float(shadow[2])))
            return True
    elif r.state == "watching":
        if msg.role == "champion" and msg.model_version == r.version and len(r.watch) < policy.watch_windows:
            r.watch.append((msg.device, msg.window_end, bool(msg.anomaly)))
            return True
    return False


def record_deployment(live: LiveRollout, msg: wire.Deployment) -> bool:
    """File one deployment report of the rollout's version: ``active`` devices, rejections.
    True if the persisted record changed."""
    r = live.r
    if msg.state == "active" and msg.device not in live.active:
        live.active.add(msg.device)
        r.active.append(msg.device)
        return True
    if msg.state in ("rejected", "rolled_back"):
        r.rejections.append(f"{msg.device} reported {r.version} {msg.state}"
                            + (f": {msg.reason}" if msg.reason else ""))
        return True
    return False


# -- reading --------------------------------------------------------------------------------------


def summarize(r: Rollout, policy: RolloutPolicy) -> dict:
    """The record for the API and CLI: pairs and watched windows counted, the policy's targets added."""
    out = msgspec.to_builtins(r)
    out["pairs"] = {d: len(p) for d, p in out["pairs"].items()}
    out["gate_windows"] = policy.gate_windows
    out["watch"] = len(out["watch"])
    out["baseline"] = len(out["baseline"])
    out["watch_windows"] = policy.watch_windows
    return out


# -- filling a record: canaries, waves, ground truth ----------------------------------------------


def canary_count(canary: int | None, share: float | None, total: int) -> int:
    """How many of ``total`` devices go canary: ``canary`` devices, or a ``share`` (at least one)."""
    if canary is not None and share is not None:
        raise RolloutError("give either a canary count or a canary share, not both")
    if share is not None:
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise RolloutError(f"canary share must be a number in (0, 1], not {share!r}")
        return max(1, math.ceil(share * total))
    canary = 1 if canary is None else canary
    if isinstance(canary, bool) or not isinstance(canary, int) or canary < 1:
        raise RolloutError(f"canary must be a device count of at least 1, not {canary!r}")
    return min(canary, total)


def plan_waves(canaries: Sequence[str], others: Sequence[str], fractions: Sequence[float]) -> list[list[str]]:
    """The promotion waves: the canaries first, then up to each fraction of all devices in order."""
    everyone = list(canaries) + list(others)
    waves, done = [list(canaries)], len(canaries)
    for fraction in fractions:
        upto = max(done, math.ceil(fraction * len(everyone)))
        if upto > done:
            waves.append(everyone[done:upto])
            done = upto
    return waves


#: ``(device, t0, t1) -> fault windows or None``: the manager's labels look-up (None: unlabelled).
Labels = Callable[[str, float, float], "list | None"]


def gate_truth(pairs: dict[str, list[Pair]], labels: Labels, lead_s: float = 0.0,
               after_s: float = 0.0) -> dict[str, list[bool | None]] | None:
    """Per canary, whether each paired window was in a labelled fault (None: near one, see
    :func:`~aggregator.rollout_gate.label_windows`); None if no canary is labelled."""
    truth = {}
    for device, p in pairs.items():
        if p:
            faults = labels(device, min(x.window_end for x in p) - after_s, max(x.window_end for x in p) + lead_s)
            if faults is not None:
                truth[device] = label_windows([x.window_end for x in p], faults, lead_s, after_s)
    return truth or None


def watch_truth(watch: list[tuple[str, float, bool]], labels: Labels, lead_s: float = 0.0,
                after_s: float = 0.0) -> list[bool | None] | None:
    """Whether each watched (or baseline) window was in a labelled fault; None unless every
    device is labelled (or there is no window)."""
    if not watch:
        return None
    by_device: dict[str, list[float]] = {}
    for device, t, _ in watch:
        by_device.setdefault(device, []).append(t)
    labelled: dict[str, list] = {}
    for device, ts in by_device.items():
        faults = labels(device, min(ts) - after_s, max(ts) + lead_s)
        if faults is None:
            return None
        labelled[device] = faults
    return [label_windows([t], labelled[device], lead_s, after_s)[0] for device, t, _ in watch]


def baseline_false_rate(baseline: list[tuple[str, float, bool]], labels: Labels, lead_s: float = 0.0,
                        after_s: float = 0.0) -> float | None:
    """The old champion's false-alarm rate on its labelled baseline windows (None: unlabelled or
    no window labelled normal): what the watch holds a labelled new champion to."""
    truth = watch_truth(baseline, labels, lead_s, after_s)
    return None if truth is None else false_alarm_rate(truth, [w[2] for w in baseline])
