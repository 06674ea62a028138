"""Models pushed over MQTT, agent side: follow the desired models, download, install, serve.

The aggregator publishes, retained, which versions a device should serve (``DesiredModels``:
a champion and maybe a shadow), offers each version and broadcasts its chunks (see
docs/protocol.md and ``aggregator/ota.py``). :class:`ModelUpdates` is the agent's half: it
decodes those messages on paho's thread (:meth:`ModelUpdates.classify`), and everything else
happens on the agent's loop thread between two samples, so that no window is scored by half a
swap. The bytes, checks and installs are :class:`edge_agent.ota.ModelReceiver`'s; this module
decides what to fetch, when to ask again for missing chunks, and which model serves in which
role, and reports every step to the cloud as a ``wire.Deployment`` through the outbox.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeloop import wire, wire_models
from edgeloop.files import write_atomic
from models import features

if TYPE_CHECKING:
    from edge_agent.agent import Agent

__all__ = ["FINAL_REASONS", "ModelUpdates"]

log = logging.getLogger(__name__)

#: Refusal reasons that hold for a version whatever happens later: the version is denied on the
#: device. "no-key" (a key may be rotated in) and "too-large" (a full disk may be cleared) are not
#: final: the download stops, and the next desired-models revision or a restart tries again.
FINAL_REASONS = frozenset({
    "bad-signature", "sha256-mismatch", "chunk-mismatch", "wrong-profile", "wrong-feature-set",
    "wrong-input-shape", "smoke-failed", "older-version", "expired", "bad-manifest",
})


#: Download progress goes into a deployment report at most this often (each report is a message
#: through the outbox, the ingest and the store; a fleet-wide push would otherwise send four each).
PROGRESS_EVERY_S = 2.0


@dataclass
class _Download:
    """A model version this device wants and does not hold yet (loop thread only)."""

    role: str  # "champion" or "shadow"
    offer: wire_models.ModelOffer | None = None
    last_progress: float = 0.0  # monotonic: offer or new chunk; a chunk request also restarts the wait
    quarter: int = 0  # download progress last reported, in quarters
    reported_at: float = 0.0  # monotonic: when progress was last reported
    requests: int = 0


class ModelUpdates:
    """Models pushed over MQTT, agent side: follows the retained ``DesiredModels``, downloads the
    versions named there (a :class:`edge_agent.ota.ModelReceiver` writes and checks the chunks),
    asks for missing chunks, installs, and serves each version as champion or shadow.

    Everything but :meth:`classify` runs in the agent's loop thread. Each step is reported as a
    ``wire.Deployment`` through the outbox: offered, downloading (each quarter, at most every
    :data:`PROGRESS_EVERY_S`, so a download of a second or two reports none),
    verified, shadow / active, rejected (with the refusal's reason code and detail), rolled_back
    (a champion replaced by an older version, which is then denied). A refused model never
    replaces the one serving. The versions served from downloads are remembered in
    ``serving.json`` so that a restart serves them again.
    """

    #: "retained-offer": an offer the broker delivered from its retained store, i.e. on our
    #: subscription, after its broadcast: the chunks will not come unasked.
    EVENTS = frozenset({"desired", "offer", "retained-offer", "chunk", "key"})

    def __init__(self, agent: Agent) -> None:
        from edge_agent.ota import ModelReceiver

        cfg = agent.config.models
        self.agent = agent
        self.profile = agent.config.profile
        self.rerequest_after_s = cfg.rerequest_after_s
        key = None
        if cfg.public_key_file:
            from pathlib import Path

            key = Path(cfg.public_key_file).read_bytes()
        self.receiver = ModelReceiver(
            agent.state_dir / "ota", profile=self.profile, public_key=key, feature_set=features.FEATURE_SET,
            feature_names=features.feature_names(agent.channels), allow_unsigned=cfg.allow_unsigned)
        self.wanted: dict[str, _Download] = {}
        self.revision = 0  # of the last DesiredModels processed (not persisted: a restart re-applies it)
        self.chunk_requests = 0
        self._served: dict[str, str | None] = {"champion": None, "shadow": None}  # versions from downloads
        self._serving_path = agent.state_dir / "serving.json"
        self._desired_topic = wire_models.desired_models_topic(agent.device)
        self._key_topic = wire_models.key_topic(self.profile)
        self._models_prefix = f"{wire.TOPIC_ROOT}/models/{self.profile}/"

    # -- paho's thread ---------------------------------------------------------------------------

    def classify(self, msg) -> tuple[str, object] | None:
        """The loop event for an incoming message on a model topic, None for any other topic.
        Decodes only (WireError for a bad payload); an empty payload (a cleared retained
        message) is no event."""
        topic = msg.topic
        if topic == self._desired_topic:
            return ("desired", wire_models.decode_desired_models(msg.payload, topic)) if msg.payload else None
        if not topic.startswith(self._models_prefix):
            return None
        if topic == self._key_topic:
            return ("key", wire_models.decode_key_rotation(msg.payload)) if msg.payload else None
        chunk = wire_models.parse_chunk_topic(topic)
        if chunk is not None:
            return "chunk", (chunk[1], chunk[2], msg.payload)
        if topic.endswith("/offer") and msg.payload:
            return "retained-offer" if getattr(msg, "retain", False) else "offer", wire_models.decode_offer(msg.payload)
        return None

    # -- loop thread -----------------------------------------------------------------------------

    def subscriptions(self) -> list[str]:
        """What to (re)subscribe after every connect."""
        return [self._desired_topic, self._key_topic] + [
            wire_models.version_filter(self.profile, v) for v in self.wanted]

    def handle(self, event: str, payload) -> None:
        """Apply one event; a failure is logged and never stops the agent's loop."""
        try:
            if event == "desired":
                self._on_desired(payload)
            elif event in ("offer", "retained-offer"):
                self._on_offer(payload, retained=event == "retained-offer")
            elif event == "chunk":
                self._on_chunk(*payload)
            elif event == "key":
                self.receiver.rotate_key(payload)
                log.info("%s: model-signing key rotated to %s", self.agent.device, payload.key_id)
        except Exception as exc:
            from edge_agent.ota import ModelRefused

            if isinstance(exc, ModelRefused) and event == "key":
                log.warning("%s: key rotation refused: %s", self.agent.device, exc)
            else:
                log.exception("%s: handling a model %s event failed", self.agent.device, event)

    def restore(self) -> None:
        """Serve again the versions that were served from downloads before a restart."""
        try:
            served = json.loads(self._serving_path.read_bytes())
        except (OSError, ValueError):
            return
        for role in ("champion", "shadow"):
            version = served.get(role) if isinstance(served, dict) else None
            if not isinstance(version, str):
                continue
            try:
                model = self.receiver.load_installed(version)
            except Exception as exc:  # refused, or gone: keep what the agent was built with
                log.warning("%s: cannot serve %s %s again: %s", self.agent.device, role, version, exc)
                continue
            setattr(self.agent, "model" if role == "champion" else "shadow", model)
            self._served[role] = version

    def close(self) -> None:
        """Record download progress now (on every stop), so that a restart resumes without asking
        again for the chunks already stored."""
        self.receiver.flush()

    def tick(self, now: float) -> None:
        """Ask for the chunks still missing of each download that made no progress for a while."""
        for version, dl in self.wanted.items():
            if dl.offer is None or now - dl.last_progress < self.rerequest_after_s:
                continue
            self._request_missing(version, dl, now)

    def _request_missing(self, version: str, dl: _Download, now: float) -> None:
        """Ask the cloud for the chunks of ``version`` this device still misses (if any)."""
        missing = self.receiver.missing(version, max_ranges=4096)
        if not missing:
            return
        link = self.agent._link
        req = wire_models.ChunkRequest(v=wire.SCHEMA_VERSION, device=self.agent.device, profile=self.profile,
                                       version=version, missing=missing, ts=time.time())
        if link is not None and link.publish(wire_models.chunkreq_topic(self.agent.device), wire.encode(req), qos=1):
            dl.last_progress = now
            dl.requests += 1
            self.chunk_requests += 1

    def _on_desired(self, desired: wire_models.DesiredModels) -> None:
        if desired.revision <= self.revision:
            return
        self.revision = desired.revision
        agent = self.agent
        for version in list(self.wanted):
            if version not in (desired.champion, desired.shadow):
                self._forget(version)  # no longer wanted: stop downloading it
        if desired.champion is not None and getattr(agent.model, "version", None) != desired.champion:
            if agent.shadow is not None and agent.shadow.version == desired.champion:
                self._serve("champion", agent.shadow)  # promotion: the shadow's session serves on
            else:
                self._get(desired.champion, "champion")
        if desired.shadow is None:
            if agent.shadow is not None:
                agent.shadow = None
                self._served["shadow"] = None
                self._save()
                agent._publish_status()
        elif getattr(agent.shadow, "version", None) != desired.shadow:
            self._get(desired.shadow, "shadow")

    def _get(self, version: str, role: str) -> None:
        """Serve ``version`` as ``role``: from disk if installed, else start downloading it."""
        from edge_agent.ota import ModelRefused

        reason = self.receiver.denied(version)
        if reason is not None:
            self._report(version, "rejected", f"denied: {reason}")
            return
        if version in self.receiver.installed():
            try:  # the version policy applies: an older version serves only as a signed rollback
                self._serve(role, self.receiver.load_installed(
                    version, current=getattr(self.agent.model, "version", None)))
            except ModelRefused as exc:
                self._report(version, "rejected", f"{exc.reason}: {exc}")
            return
        if version in self.wanted:
            self.wanted[version].role = role
            return
        link = self.agent._link
        if link is not None and link.connected:  # subscribed first: whoever sees the version
            # wanted sees its SUBSCRIBE counted in link.subscriptions_pending too
            link.subscribe(wire_models.version_filter(self.profile, version), qos=1)
        self.wanted[version] = _Download(role=role, last_progress=time.monotonic())

    def _on_offer(self, offer: wire_models.ModelOffer, retained: bool = False) -> None:
        """Start (or resume) a wanted download. A ``retained`` offer came from the broker's store
        on our subscription, after its broadcast: the missing chunks are asked for at once rather
        than after ``rerequest_after_s`` of silence (measured in the drift story: each wave of a
        promotion waited that second, a whole rollout ~5 s of real time at 120x)."""
        from edge_agent.ota import ModelRefused

        dl = self.wanted.get(offer.version)
        if dl is None or offer.profile != self.profile:
            return
        try:
            self.receiver.on_offer(offer)
        except ModelRefused as exc:
            self._refused(offer.version, exc)
            return
        first = dl.offer is None
        dl.offer, dl.last_progress = offer, time.monotonic()
        have, total = self.receiver.progress(offer.version)
        if first:
            dl.quarter = have * 4 // total if total else 0
            dl.reported_at = dl.last_progress
            self._report(offer.version, "offered", chunks=(have, total))
        self._progressed(offer.version, dl)
        if first and retained and offer.version in self.wanted:
            self._request_missing(offer.version, dl, dl.last_progress)

    def _on_chunk(self, version: str, index: int, data: bytes) -> None:
        dl = self.wanted.get(version)
        if dl is None or dl.offer is None or not self.receiver.on_chunk(version, index, data):
            return
        dl.last_progress = time.monotonic()
        self._progressed(version, dl)

    def _progressed(self, version: str, dl: _Download) -> None:
        have, total = self.receiver.progress(version)
        done = self.receiver.complete(version)
        now = time.monotonic()
        if total and have * 4 // total > dl.quarter and not done and now - dl.reported_at >= PROGRESS_EVERY_S:
            dl.quarter, dl.reported_at = have * 4 // total, now
            self._report(version, "downloading", chunks=(have, total))
        if done:
            self._install(version, dl)

    def _install(self, version: str, dl: _Download) -> None:
        from edge_agent.ota import ModelRefused

        self._forget(version)
        try:
            model = self.receiver.install(version, current=getattr(self.agent.model, "version", None))
        except ModelRefused as exc:
            self._refused(version, exc)
            return
        self._report(version, "verified", chunks=(dl.offer.chunks, dl.offer.chunks) if dl.offer else (0, 0))
        self._serve(dl.role, model)

    def _refused(self, version: str, exc) -> None:
        """Report a refusal and stop fetching; deny the version on this device only when the
        reason is final (:data:`FINAL_REASONS`), so that a key rotated in later or a disk with
        room again lets the next desired-models revision (or a restart) try once more."""
        reason = f"{exc.reason}: {exc}"
        log.warning("%s: model %s refused: %s", self.agent.device, version, reason)
        self._forget(version)
        if exc.reason in FINAL_REASONS:
            self.receiver.deny(version, reason)
        self._report(version, "rejected", reason)

    def _serve(self, role: str, model) -> None:
        from models.signing import version_key

        agent = self.agent
        if role == "champion":
            old = agent.model
            if old is not None and version_key(model.version) < version_key(old.version):
                self._report(old.version, "rolled_back", f"rolled_back: the champion went back to {model.version}")
                self.receiver.deny(old.version, f"rolled back to {model.version}")
            agent.model = model
            if agent.shadow is not None and agent.shadow.version == model.version:
                agent.shadow, self._served["shadow"] = None, None
        else:
            agent.shadow = model
        self._served[role] = model.version
        self._save()
        self._report(model.version, "active" if role == "champion" else "shadow")
        agent._publish_status()

    def _forget(self, version: str) -> None:
        """Stop fetching ``version``: no more chunks for it reach this device."""
        if self.wanted.pop(version, None) is None:
            return
        link = self.agent._link
        if link is not None and link.connected:
            link.unsubscribe(wire_models.version_filter(self.profile, version))

    def _report(self, version: str, state: str, reason: str = "", chunks: tuple[int, int] = (0, 0)) -> None:
        agent = self.agent
        agent._append("deployment", lambda seq: wire.Deployment(
            v=wire.SCHEMA_VERSION, device=agent.device, seq=seq, ts=time.time(), profile=self.profile,
            model_version=version, state=state, reason=reason[:1024], chunks_have=chunks[0], chunks_total=chunks[1]))

    def _save(self) -> None:
        write_atomic(self._serving_path, json.dumps(self._served).encode(), 0o644,
                     durable=getattr(self.receiver, "durable", True))
