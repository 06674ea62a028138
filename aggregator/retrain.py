"""Retraining: watch each profile's features for drift and train, sign and register a new model.

:class:`DriftMonitor` compares the champion's training window (``manifest.training_window``, read
back from the store) with the last ``recent_s`` seconds of stored features, per feature, with
:func:`models.drift.drift_report`. :class:`Retrainer` runs it on a schedule (a thread, every
``check_every_s``) and trains a new isolation forest from the last ``train_s`` seconds of stored,
unflagged features when

* the drift is above ``drift_threshold`` (PSI), or, with ``range_threshold`` set, more than that
  share of the recent rows lie outside the training range of some feature (the check for a
  ``recent_s`` shorter than the data's slowest normal cycle, see :mod:`models.drift`), or
* ``schedule_s`` has passed since the profile's last model (None: never on time alone), or
* someone asks: :meth:`Retrainer.retrain_now`.

Labelled faults (:mod:`aggregator.labels`: maintenance records, a simulator's ground truth) are
left out of both the drift check and the training rows, with ``label_horizon_s`` before each fault
and ``label_margin_s`` after it: a fault is not drift, and a model of "normal" must not learn the
faults it is meant to catch (measured on the drift scenario: bearing wear alone moved
bearing_temp's PSI to 2-8 and the model retrained on it missed the next faults). Quality-flagged
windows are left out too (the store's ``exclude_flagged``). The decision threshold is the
``threshold_quantile`` of the training scores.

The new model is compared with the champion on the recent window (:func:`models.evaluation.compare`,
stored in its manifest's metrics), signed, added to the registry as the next version with the
champion as parent, and handed to ``on_new_model(profile, version)``: the rollout manager decides
whether and how it reaches devices. The retrainer never promotes.

Times: the drift and training windows are device times from the store, counted back from
``clock()`` (default ``time.time``); the schedule compares the wall clock with the newest model's
``manifest.created``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from aggregator.labels import window_labels
from aggregator.model_registry import ModelRegistry
from models.drift import DEFAULT_PSI_THRESHOLD, DriftReport, drift_report
from models.features import FEATURE_SET
from models.signing import load_private_key, sign, version_key

__all__ = ["DriftMonitor", "Retrainer", "RetrainDecision", "next_version", "label_exclusion"]

log = logging.getLogger(__name__)

#: ``(start, end) -> labels overlapping [start, end)`` of every device (``LabelStore.list``).
LabelSource = Callable[[float, float], Sequence]


def label_exclusion(labels: LabelSource | None, horizon_s: float = 60.0, margin_s: float = 120.0):
    """A row filter ``(times, devices) -> mask`` marking windows from ``horizon_s`` before a
    labelled fault of their device to ``margin_s`` after it (None without labels)."""
    if labels is None:
        return None

    def exclude(times: np.ndarray, devices: Sequence[str]) -> np.ndarray:
        if not len(devices):
            return np.zeros(0, dtype=bool)
        found = labels(float(np.min(times)) - margin_s, float(np.max(times)) + horizon_s + 1e-6)
        return window_labels(times, devices, found, horizon_s=horizon_s, after_s=margin_s)

    return exclude


def _without(rows, exclude):
    """``rows`` (a store's FeatureRows) less those ``exclude`` marks."""
    if exclude is None or not len(rows.devices):
        return rows
    keep = np.flatnonzero(~exclude(np.asarray(rows.times, dtype=np.float64), rows.devices))
    return rows._replace(times=np.asarray(rows.times)[keep], devices=[rows.devices[k] for k in keep],
                         matrix=rows.matrix[keep])


def next_version(versions: Sequence[str]) -> str:
    """A version newer than all of ``versions`` (by ``version_key``): the newest one with its last
    numeric part incremented (``1.2.0`` -> ``1.2.1``, build suffix dropped), ``.1`` appended when
    it has none, ``1.0.0`` when there is none."""
    if not versions:
        return "1.0.0"
    newest = max(versions, key=version_key).split("+", 1)[0]
    parts = newest.split(".")
    for k in range(len(parts) - 1, -1, -1):
        if parts[k].isdigit():
            parts[k] = str(int(parts[k]) + 1)
            return ".".join(parts[: k + 1] + ["0"] * (len(parts) - k - 1))
    return newest + ".1"


class DriftMonitor:
    """Drift of a profile's recent features against its champion's training window, both
    without the windows ``exclude`` marks (see :func:`label_exclusion`)."""

    def __init__(
        self, store, models: ModelRegistry, *, recent_s: float = 3600.0,
        psi_threshold: float = DEFAULT_PSI_THRESHOLD, min_rows: int = 50,
        clock: Callable[[], float] = time.time, exclude=None, fallback_s: float = 86400.0,
        range_threshold: float | None = None, reference_s: float | None = None,
    ) -> None:
        self.store, self.models = store, models
        self.reference_s = recent_s if reference_s is None else reference_s
        self.range_threshold = range_threshold
        self.recent_s, self.psi_threshold, self.min_rows = recent_s, psi_threshold, min_rows
        self.fallback_s = fallback_s
        self.clock = clock
        self.exclude = exclude
        self._first: dict[str, float] = {}  # profile -> device time of its oldest stored row seen

    def _first_stored(self, profile: str, now: float, kw: dict) -> float:
        """Device time of ``profile``'s oldest stored feature row within ``fallback_s`` of ``now``
        (``now - fallback_s`` when none, or when the store holds rows older than that): looked
        up until found, then remembered."""
        first = self._first.get(profile)
        if first is None:
            rows = self.store.feature_rows(profile, max(0.0, now - self.fallback_s), now, **kw)
            if not len(rows.devices):
                return now - self.fallback_s
            first = self._first[profile] = float(np.min(np.asarray(rows.times, dtype=np.float64)))
        return first

    def check(self, profile: str, version: str | None = None) -> DriftReport | None:
        """The drift report against the training window of ``version`` (default: the champion),
        or None when there is no such model or too few rows to judge.

        A model trained elsewhere (a factory model, or a rollback to one) has no training window
        in the store: the reference is then the oldest ``reference_s`` (default ``recent_s``) of
        the rows stored within the last ``fallback_s`` (the oldest part of what a retrain would
        learn from), judged only once that much is stored before the recent window, so the loop
        keeps watching. (It used to be the ``recent_s`` that began exactly ``fallback_s`` ago,
        which is empty while the store holds less than ``fallback_s`` of data: measured in the
        drift story, a rollback to the factory model left drift unjudged for an hour.) With the
        range check, ``reference_s`` should span a whole normal operating cycle, like ``recent_s``
        for PSI: a shorter reference reads the cycle's phase as drift."""
        version = version or self.models.champion(profile)
        if version is None:
            return None
        manifest = self.models.get(profile, version).manifest
        lo, hi = manifest.training_window
        now = self.clock()
        kw = {"feature_set": manifest.feature_set, "names": manifest.feature_names}
        if not hi > lo:
            lo = max(self._first_stored(profile, now, kw), min(now - self.fallback_s, now - self.recent_s - self.reference_s))
            hi = lo + self.reference_s
            if hi > now - self.recent_s:  # not yet a whole reference before the recent window
                log.info("drift %s: too few rows to judge (model %s has no training window; %.0f s of the "
                         "%.0f s reference stored)", profile, version, max(0.0, now - self.recent_s - lo),
                         self.reference_s)
                return None
        reference = _without(self.store.feature_rows(profile, lo, hi + 1e-6, **kw), self.exclude) if hi > lo else None
        recent = _without(self.store.feature_rows(profile, max(0.0, now - self.recent_s), now, **kw), self.exclude)
        if reference is None or min(len(reference.devices), len(recent.devices)) < self.min_rows:
            log.info("drift %s: too few rows to judge (model %s; reference %.0f-%.0f, %d recent rows)", profile,
                     version, lo, hi, len(recent.devices))
            if reference is not None and len(reference.devices) < self.min_rows:
                self._first.pop(profile, None)  # retention may have removed them: look again next time
            return None
        return drift_report(reference.matrix, recent.matrix, manifest.feature_names,
                            psi_threshold=self.psi_threshold, range_threshold=self.range_threshold)


@dataclass(frozen=True)
class RetrainDecision:
    """Why a profile was (or was not) retrained in one check; ``version`` if it was."""

    profile: str
    reason: str  # "drift", "schedule", "manual" or "none"
    drift: DriftReport | None = None
    version: str | None = None


class Retrainer:
    """Check drift per profile on a schedule; train, sign and register when it is time."""

    def __init__(
        self,
        store,
        models: ModelRegistry,
        signing_key,
        *,
        profiles: Sequence[str] = ("machine",),
        schedule_s: float | None = None,
        drift_threshold: float = DEFAULT_PSI_THRESHOLD,
        range_threshold: float | None = None,
        on_new_model: Callable[[str, str], None] | None = None,
        check_every_s: float = 300.0,
        recent_s: float = 3600.0,
        train_s: float = 86400.0,
        min_rows: int = 200,
        n_estimators: int = 100,
        seed: int = 0,
        clock: Callable[[], float] = time.time,
        labels: LabelSource | None = None,
        label_horizon_s: float = 60.0,
        label_margin_s: float = 120.0,
        threshold_quantile: float = 0.995,
        reference_s: float | None = None,
    ) -> None:
        self.store, self.models = store, models
        self._key = load_private_key(signing_key)
        self.profiles = list(profiles)
        self.schedule_s, self.check_every_s = schedule_s, check_every_s
        self.train_s, self.min_rows, self.n_estimators, self.seed = train_s, min_rows, n_estimators, seed
        self.recent_s = recent_s
        self.on_new_model = on_new_model
        self.clock = clock
        self.threshold_quantile = threshold_quantile
        self.exclude = label_exclusion(labels, label_horizon_s, label_margin_s)
        self.monitor = DriftMonitor(store, models, recent_s=recent_s, psi_threshold=drift_threshold,
                                    clock=clock, exclude=self.exclude, fallback_s=train_s,
                                    range_threshold=range_threshold, reference_s=reference_s)
        self._lock = threading.Lock()  # one training at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: dict[str, RetrainDecision] = {}

    # -- decisions ------------------------------------------------------------------------------

    def check(self, profile: str) -> RetrainDecision:
        """Check one profile now and retrain it if drift or the schedule says so."""
        report = self.monitor.check(profile)
        if report is not None and report.drifted:
            log.info("drift %s: %s", profile, report.verdict)
            decision = RetrainDecision(profile, "drift", report, self._train(profile, report))
        elif self._due(profile):
            decision = RetrainDecision(profile, "schedule", report, self._train(profile, report))
        else:
            decision = RetrainDecision(profile, "none", report)
        self.last[profile] = decision
        return decision

    def retrain_now(self, profile: str) -> str:
        """Train, sign and register a new model of ``profile`` now; its version."""
        version = self._train(profile, None)
        self.last[profile] = RetrainDecision(profile, "manual", None, version)
        return version

    def run_once(self) -> list[RetrainDecision]:
        """One pass over every profile; a profile that fails is logged and skipped."""
        out = []
        for profile in self.profiles:
            try:
                out.append(self.check(profile))
            except Exception:  # one profile's trouble must not stop the others' checks
                log.exception("retraining check of profile %s failed", profile)
        return out

    def _due(self, profile: str) -> bool:
        if self.schedule_s is None:
            return False
        latest = self.models.latest(profile)
        # Wall-clock time, like ``manifest.created``; ``clock`` is for the data's device times.
        return latest is None or time.time() - latest.manifest.created >= self.schedule_s

    # -- training -------------------------------------------------------------------------------

    def _train(self, profile: str, report: DriftReport | None) -> str:
        from edge_agent.inference import Model
        from models.evaluation import compare
        from models.training import train_from_store

        with self._lock:
            champion = self.models.champion(profile)
            entry = self.models.get(profile, champion) if champion else None
            names = entry.manifest.feature_names if entry else None
            feature_set = entry.manifest.feature_set if entry else FEATURE_SET
            version = next_version([m.version for m in self.models.list(profile)])
            now = self.clock()
            onnx_bytes, manifest = train_from_store(
                self.store, profile, max(0.0, now - self.train_s), now, version=version,
                feature_names=names, feature_set=feature_set, min_rows=self.min_rows,
                seed=self.seed, n_estimators=self.n_estimators, parent_version=champion,
                exclude=self.exclude, threshold_quantile=self.threshold_quantile,
            )
            if report is not None:
                manifest.metrics.update(report.as_metrics())
            if entry is not None:
                recent = _without(self.store.feature_rows(
                    profile, max(0.0, now - self.recent_s), now, feature_set=feature_set,
                    names=manifest.feature_names), self.exclude)
                if recent.devices:
                    manifest.metrics.update(compare(
                        Model.load((onnx_bytes, manifest)),
                        Model.load((entry.onnx_bytes(), entry.manifest)), recent.matrix))
            manifest = sign(manifest, onnx_bytes, self._key)
            self.models.add(onnx_bytes, manifest)
        log.info("retrained %s: %s (parent %s)", profile, version, champion)
        if self.on_new_model is not None:
            self.on_new_model(profile, version)
        return version

    # -- schedule -------------------------------------------------------------------------------

    def start(self) -> Retrainer:
        """Check every profile every ``check_every_s`` in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError("retrainer already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="edgeloop-retrainer", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.check_every_s):
            self.run_once()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
