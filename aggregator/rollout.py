"""Rollouts: a new model in shadow on canaries, a gate, promotion in waves, automatic rollback.

One rollout per profile at a time, a small state machine persisted as JSON under ``state_dir``
(one file per profile) so an aggregator restart resumes it where it was::

    canary ──gate passes──▶ promoting ──all waves active──▶ watching ──healthy──▶ done
      │                         │                              │
      └──gate fails──▶ rejected └────────rejection─────────────┴──worse──▶ rolled_back

* ``canary``: canary devices (online first, then by id) run the current champion and the new
  version in shadow on the same windows; :meth:`RolloutManager.observe` pairs their verdicts by
  (device, window_end) and counts the old champion's anomaly rate fleet-wide as the baseline.
  The gate (:func:`aggregator.rollout_gate.evaluate_gate`) decides once each canary gave
  ``gate_windows`` pairs; a canary rejecting the model fails it at once.
* ``promoting``: the new version becomes champion wave by wave (the canaries, then the policy's
  fractions of the profile's devices); a wave is done when each of its online devices reported
  ``active`` (or after ``wave_timeout_s``, naming the laggards). Then ``ModelRegistry.promote``.
* ``watching``: the new champion's first ``watch_windows`` windows fleet-wide are compared with
  the baseline (:func:`~aggregator.rollout_gate.evaluate_watch`; with labels, false alarms against
  the old champion's canary-time ones); worse, or any device rejecting
  the model, rolls back: a signed rollback entry (:mod:`aggregator.model_rollback`) is offered and
  made every device's champion, and the registry points at it.

**Drift ends the watch, not the gate.** The gate compares both models on the same windows, which
stays fair when the world changes. The watch compares the new champion's windows with the old
champion's earlier ones: after a drift that is a regime the new model was not trained for against
one it was (measured in the drift story: a good first model rolled back for the drift's false
alarms, which the old champion raised as well). So when the retrainer reports drift from the
rolled-out version's training data (:meth:`RolloutManager.note_drift`), a watch ends ``done``
("not judged") as soon as it runs, and the retrainer takes over with a model of the new regime.

Every state ends on its own: no gate verdict by ``canary_timeout_s`` rejects the model naming the
canaries that gave too few paired windows; silent devices hold a wave for ``wave_timeout_s`` at
most; the watch is judged on what came by ``watch_timeout_s``. The profile is then free for the
next rollout.

Observers run on the ingest writer's thread and only record; every decision and every publish
happens in :meth:`RolloutManager.tick` (driven by :meth:`serve`'s thread or by a test's clock).
The distributor is anything with ``offer(profile, version)``, ``set_desired(device, *, champion,
shadow)`` and ``retire(profile, version)`` (:class:`aggregator.ota.ModelDistributor`).

The persisted record (:class:`~aggregator.rollout_state.Rollout`), how observed messages are filed
into it, and the canary/wave/ground-truth arithmetic are in :mod:`aggregator.rollout_state`.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from edgeloop import wire
from edgeloop.files import write_atomic
from aggregator.rollout_gate import RolloutPolicy, evaluate_gate, evaluate_watch
from aggregator.rollout_state import (ACTIVE_STATES, MAX_EVENTS, STATES, LiveRollout, Rollout, RolloutError,
                                      baseline_false_rate, canary_count, encode_rollout, gate_truth, load_rollouts, plan_waves,
                                      record_deployment, record_inference, summarize, watch_truth)

__all__ = ["RolloutManager", "RolloutError", "Rollout", "ACTIVE_STATES", "STATES"]

log = logging.getLogger(__name__)

LabelsProvider = Callable[[str, float, float], "list | None"]


class RolloutManager:
    """Runs model rollouts per profile over a distributor, the model registry and the fleet registry."""

    def __init__(self, distributor, models, fleet, *, state_dir, policy: RolloutPolicy | None = None,
                 labels: LabelsProvider | None = None, signing_key=None) -> None:
        self.distributor, self.models, self.fleet = distributor, models, fleet
        self.policy = policy or RolloutPolicy()
        self.labels = labels
        self.signing_key = signing_key
        self.dir = Path(state_dir) / "rollouts"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # state: taken briefly by observers
        self._act = threading.RLock()  # decisions and publishes: one at a time
        self._rollouts: dict[str, Rollout] = {}
        self._live: dict[str, LiveRollout] = {}
        self._dirty: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._load()

    # -- persistence --------------------------------------------------------------------------

    def _load(self) -> None:
        for r in load_rollouts(self.dir).values():
            self._rollouts[r.profile] = r
            if r.state in ACTIVE_STATES:
                self._live[r.profile] = LiveRollout(r)

    def _save(self, profile: str) -> None:
        with self._lock:
            r = self._rollouts[profile]
            body = encode_rollout(r)
            self._dirty.discard(profile)
        write_atomic(self.dir / f"{profile}.json", body)

    def _event(self, r: Rollout, now: float, text: str) -> None:
        with self._lock:
            r.events.append((now, text))
            del r.events[:-MAX_EVENTS]
            r.updated_at = now
            self._dirty.add(r.profile)
        log.info("rollout %s/%s: %s", r.profile, r.version, text)

    # -- observing (ingest writer thread: record only) -----------------------------------------

    def observe(self, msg, received_at: float) -> None:
        """Ingest observer: record inference verdicts and deployment reports of running rollouts.
        Cheap (a dict lookup per message when no rollout runs), never raises."""
        kind = type(msg)
        if kind is wire.Inference:
            if self._live:
                with self._lock:
                    for live in self._live.values():
                        if msg.device in live.members and record_inference(live, msg, self.policy):
                            self._dirty.add(live.r.profile)
        elif kind is wire.Deployment and self._live:
            with self._lock:
                for live in self._live.values():
                    if (msg.device in live.members and msg.model_version == live.r.version
                            and record_deployment(live, msg)):
                        self._dirty.add(live.r.profile)

    # -- commands -----------------------------------------------------------------------------

    def start(self, profile: str, version: str, canary: int | None = None, *, share: float | None = None,
              now: float | None = None) -> dict:
        """Start rolling ``version`` out to ``profile``: ``canary`` devices, or a ``share`` in (0, 1] of
        the profile's devices (at least one), get it in shadow. Default: one canary. Returns :meth:`status`."""
        from aggregator.model_registry import RegistryError

        now = time.time() if now is None else now
        with self._act:
            running = self._rollouts.get(profile)
            if running is not None and running.state in ACTIVE_STATES:
                raise RolloutError(f"a rollout of {profile}/{running.version} is {running.state}; promote or "
                                   "roll it back first", 409)
            try:
                entry = self.models.get(profile, version)
            except RegistryError as exc:
                raise RolloutError(str(exc), 404) from None
            if not entry.manifest.signature:
                raise RolloutError(f"model {profile}/{version} is not signed; agents would refuse it")
            previous = self.models.champion(profile)
            if previous is None:
                raise RolloutError(f"profile {profile!r} has no champion to compare {version} with; "
                                   "make the first model champion with `edgeloop models promote`", 409)
            if previous == version:
                raise RolloutError(f"{profile}/{version} is already the champion", 409)
            members = self._ordered_devices(profile, now)
            if not members:
                raise RolloutError(f"no devices of profile {profile!r} in the fleet registry", 409)
            n = canary_count(canary, share, len(members))
            r = Rollout(profile=profile, version=version, previous=previous, state="canary", started_at=now,
                        updated_at=now, canaries=members[:n], members=members)
            self._event(r, now, f"canary: {', '.join(r.canaries)} run {version} in shadow of {previous}")
            for device in r.canaries:  # desired first: devices subscribe, then catch the one broadcast
                self.distributor.set_desired(device, champion=previous, shadow=version)
            self.distributor.offer(profile, version)
            with self._lock:
                self._rollouts[profile] = r
                self._live[profile] = LiveRollout(r)
            self._save(profile)
            return self.status(profile)

    def promote(self, profile: str, version: str | None = None, *, now: float | None = None) -> dict:
        """Operator override: skip the gate (canary), go to the last wave (promoting) or end the watch."""
        now = time.time() if now is None else now
        with self._act:
            r = self._require_active(profile, version)
            if r.state == "canary":
                self._begin_promotion(r, now, "promoted by the operator; gate skipped")
            elif r.state == "promoting":
                with self._lock:
                    r.waves[r.wave:] = [[d for wave in r.waves[r.wave:] for d in wave]]
                self._event(r, now, "promoted by the operator: every remaining device at once")
                self._send_wave(r)
            else:
                self._finish(r, now, "done", "watch ended by the operator")
            self._save(profile)
            return self.status(profile)

    def rollback(self, profile: str, version: str | None = None, *, now: float | None = None) -> dict:
        """Operator override: stop a canary, or roll a promoted version back on every device."""
        now = time.time() if now is None else now
        with self._act:
            r = self._require_active(profile, version, allow_done=True)
            if r.state == "canary":
                self._reject(r, now, ["stopped by the operator"])
            else:
                self._roll_back(r, now, ["rolled back by the operator"])
            self._save(profile)
            return self.status(profile)

    def note_drift(self, profile: str, why: str, *, now: float | None = None) -> bool:
        """The world drifted from the training data of the version being rolled out (``why``: the
        drift check's verdict). A running watch ends ``done`` without a verdict; a canary or a
        promotion goes on (the gate is like-for-like) and its watch ends as soon as it begins.
        False when no rollout of ``profile`` runs or the drift was already noted."""
        now = time.time() if now is None else now
        with self._act:
            r = self._rollouts.get(profile)
            if r is None or r.state not in ACTIVE_STATES or r.drift:
                return False
            with self._lock:
                r.drift = why
            self._event(r, now, f"drift from {r.version}'s training data: {why}")
            if r.state == "watching":
                self._end_watch_on_drift(r, now)
            self._save(profile)
            return True

    def _end_watch_on_drift(self, r: Rollout, now: float) -> None:
        self._finish(r, now, "done", f"watch not judged: the world drifted from {r.version}'s training data, "
                     "and comparing it with the previous champion's earlier windows would judge the drift; "
                     "the retrainer takes over")

    def _require_active(self, profile: str, version: str | None, allow_done: bool = False) -> Rollout:
        r = self._rollouts.get(profile)
        ok = ACTIVE_STATES | ({"done"} if allow_done else set())
        if r is None or r.state not in ok:
            what = f"the last one of {r.version} ended {r.state}" if r is not None else "none was started"
            raise RolloutError(f"no rollout of profile {profile!r} is running ({what}); "
                               "start one with `edgeloop models push`", 409)
        if version is not None and version != r.version:
            raise RolloutError(f"the rollout of {profile!r} is of {r.version}, not {version}", 409)
        return r

    # -- deciding -----------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Take every decision that is due, then save what changed. Safe to call often."""
        now = time.time() if now is None else now
        with self._act:
            for profile, live in list(self._live.items()):
                r = live.r
                try:
                    if r.state == "canary":
                        self._tick_canary(live, now)
                    elif r.state == "promoting":
                        self._tick_promoting(live, now)
                    elif r.state == "watching":
                        self._tick_watching(live, now)
                except Exception as exc:  # a failed publish or registry write: say so, retry next tick
                    if r.error != str(exc):
                        r.error = str(exc)
                        self._event(r, now, f"error: {exc}")
                        self._dirty.add(profile)
                    log.exception("rollout %s/%s: tick failed", profile, r.version)
                if profile in self._dirty:
                    self._save(profile)

    def _tick_canary(self, live: LiveRollout, now: float) -> None:
        r = live.r
        with self._lock:
            pairs = {d: list(r.pairs.get(d, [])) for d in r.canaries}
            rejections = list(r.rejections)
        final = now - r.started_at >= self.policy.canary_timeout_s
        full = all(len(p) >= self.policy.gate_windows for p in pairs.values())
        margins = (self.policy.label_lead_s, self.policy.label_after_s)  # near a fault: not judged
        truth = gate_truth(pairs, self._labels, *margins) if (full or final) and not rejections else None
        verdict = evaluate_gate(pairs, self.policy, truth=truth, rejections=rejections, final=final)
        if not verdict.ready:
            return
        r.gate = verdict
        if not verdict.passed:
            self._reject(r, now, verdict.reasons)
            return
        r.baseline_f1 = verdict.stats["all"].get("champion_f1")
        self._begin_promotion(r, now, "gate passed")

    def _tick_promoting(self, live: LiveRollout, now: float) -> None:
        r = live.r
        if r.rejections:
            self._roll_back(r, now, list(r.rejections))
            return
        wave = r.waves[r.wave]
        waiting = [d for d in wave if d not in live.active and self._online(d, now)]
        if waiting and now - r.wave_started_at < self.policy.wave_timeout_s:
            return
        if waiting:
            r.laggards.extend(waiting)
            self._event(r, now, f"wave {r.wave + 1}: no 'active' from {', '.join(waiting)} "
                        f"within {self.policy.wave_timeout_s:g} s; going on")
        r.wave += 1
        r.wave_started_at = now
        if r.wave < len(r.waves):
            self._send_wave(r)
            return
        self.models.promote(r.profile, r.version)
        with self._lock:
            r.state, r.watch_started_at = "watching", now
        self._event(r, now, f"every wave done; {r.version} is the champion in the registry; watching "
                    f"{self.policy.watch_windows} windows")

    def _tick_watching(self, live: LiveRollout, now: float) -> None:
        r = live.r
        if r.rejections:
            self._roll_back(r, now, list(r.rejections))
            return
        if r.drift:
            self._end_watch_on_drift(r, now)
            return
        with self._lock:
            watch = list(r.watch)
        final = now - r.watch_started_at >= self.policy.watch_timeout_s
        if len(watch) < self.policy.watch_windows and not (final and watch):
            if final:
                self._finish(r, now, "done", "watch timed out without any window of the new champion")
            return
        baseline = (r.baseline_anomalies / r.baseline_windows if r.baseline_windows
                    else (r.gate.stats.get("all", {}).get("champion_rate") or 0.0) if r.gate else 0.0)
        margins = (self.policy.label_lead_s, self.policy.label_after_s)
        truth = watch_truth(watch, self._labels, *margins)
        with self._lock:
            before = list(r.baseline)
        baseline_fa = baseline_false_rate(before, self._labels, *margins) if truth is not None else None
        verdict = evaluate_watch([w[2] for w in watch], baseline, self.policy, truth=truth,
                                 baseline_f1=r.baseline_f1, baseline_false_rate=baseline_fa, final=final)
        if not verdict.ready:
            return
        r.watch_verdict = verdict
        if verdict.passed:
            self._finish(r, now, "done", f"healthy over {len(watch)} windows")
        else:
            self._roll_back(r, now, verdict.reasons)

    # -- transitions --------------------------------------------------------------------------

    def _begin_promotion(self, r: Rollout, now: float, why: str) -> None:
        ordered = [d for d in self._ordered_devices(r.profile, now) if d not in r.canaries]
        everyone = list(r.canaries) + ordered
        waves = plan_waves(r.canaries, ordered, self.policy.waves)
        with self._lock:
            r.waves, r.wave, r.wave_started_at, r.state = waves, 0, now, "promoting"
            live = self._live.get(r.profile)
            if live is not None:
                live.members |= set(everyone)
            r.members = sorted(set(r.members) | set(everyone))
        self._event(r, now, f"{why}; promoting in {len(waves)} waves of {', '.join(str(len(w)) for w in waves)}")
        self._send_wave(r)

    def _send_wave(self, r: Rollout) -> None:
        for device in r.waves[r.wave]:
            self.distributor.set_desired(device, champion=r.version, shadow=None)

    def _reject(self, r: Rollout, now: float, reasons: list[str]) -> None:
        for device in r.canaries:
            self.distributor.set_desired(device, champion=r.previous, shadow=None)
        self.distributor.retire(r.profile, r.version)
        r.reasons = list(reasons)
        self._finish(r, now, "rejected", "; ".join(reasons))

    def _roll_back(self, r: Rollout, now: float, reasons: list[str]) -> None:
        from aggregator.model_rollback import signed_rollback

        if self.signing_key is None:
            raise RolloutError("cannot roll back: the aggregator has no model signing key "
                               "(run `edgeloop models keygen` in its data directory)", 409)
        if self.models.champion(r.profile) != r.version:  # still promoting: make the history say so
            self.models.promote(r.profile, r.version)
        result = signed_rollback(self.models, r.profile, self.signing_key)
        r.rollback_version = result.version
        for device in r.members:
            self.distributor.set_desired(device, champion=result.version, shadow=None)
        self.distributor.offer(r.profile, result.version)
        self.distributor.retire(r.profile, r.version)
        r.reasons = list(reasons)
        self._finish(r, now, "rolled_back", f"rolled back to {result.version} (a signed copy of {result.previous}): "
                     + "; ".join(reasons))

    def _finish(self, r: Rollout, now: float, state: str, why: str) -> None:
        with self._lock:
            r.state, r.error = state, ""
            self._live.pop(r.profile, None)
            self._dirty.add(r.profile)
        self._event(r, now, f"{state}: {why}")

    # -- helpers ------------------------------------------------------------------------------

    def _ordered_devices(self, profile: str, now: float) -> list[str]:
        """The profile's devices, online first, then by id: the deterministic canary and wave order."""
        records = [rec for rec in self.fleet.devices(now) if rec.profile == profile]
        return [rec.device for rec in sorted(records, key=lambda rec: (rec.state != "online", rec.device))]

    def _online(self, device: str, now: float) -> bool:
        rec = self.fleet.get(device, now)
        return rec is not None and rec.state == "online"

    def _labels(self, device: str, t0: float, t1: float):
        if self.labels is None:
            return None
        try:
            return self.labels(device, t0, t1)
        except Exception:
            log.exception("labels provider failed for %s [%s, %s]", device, t0, t1)
            return None

    # -- reading ------------------------------------------------------------------------------

    def status(self, profile: str) -> dict | None:
        """One profile's rollout for the API and CLI (bulky evidence summarised), None if none ran."""
        with self._lock:
            r = self._rollouts.get(profile)
            return None if r is None else summarize(r, self.policy)

    def statuses(self) -> list[dict]:
        with self._lock:
            profiles = sorted(self._rollouts)
        return [s for s in (self.status(p) for p in profiles) if s is not None]

    # -- driving ------------------------------------------------------------------------------

    def serve(self, interval_s: float = 1.0) -> None:
        """Call :meth:`tick` every ``interval_s`` on a daemon thread until :meth:`close`."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.tick()
                except Exception:  # never let the thread die; tick already logged what failed
                    log.exception("rollout tick failed")

        self._thread = threading.Thread(target=loop, name="rollouts", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the tick thread and save everything."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        with self._act:
            for profile in list(self._dirty):
                self._save(profile)
