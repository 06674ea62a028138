"""Model distribution, cloud side: offers, chunk broadcasts, re-sends on request, desired models.

A signed model is the same bytes for every device of a profile, so it is broadcast once rather
than sent once per device (the protocol is in :mod:`edgeloop.wire_models`):

* :meth:`ModelDistributor.offer` publishes the retained offer (the registry entry's manifest text,
  size, sha256 per chunk) and broadcasts every chunk once (QoS 1, not retained).
* :meth:`ModelDistributor.set_desired` publishes a device's retained ``DesiredModels`` (champion,
  shadow) under a revision that only grows, persisted in ``state_dir`` so a restart never reuses
  one. A device that needs a version subscribes to its topics, gets the retained offer, and asks
  for the chunks it still misses with a ``ChunkRequest``.
* :meth:`ModelDistributor.handle_chunk_request` re-broadcasts exactly the chunks asked for;
  requests for a chunk that is queued, or was sent less than ``coalesce_s`` ago, are merged, so
  a fleet that comes back at once costs one re-send per chunk, not one per device.

Nothing here blocks its caller on the network: publishes go through one sender thread that feeds
the link's bounded in-flight window (``MqttLink.publish`` says False when it is full or down; the
thread waits and tries again), control messages (offers, desired models) before chunks. The model
bytes of every offered version are held in memory (models are KB to a few MB) and reloaded from
the :class:`~aggregator.model_registry.ModelRegistry` after a restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from edgeloop import wire
from edgeloop.files import write_atomic
from edgeloop.wire_models import (
    ChunkRequest,
    DesiredModels,
    KeyRotation,
    ModelOffer,
    chunk_topic,
    desired_models_topic,
    key_topic,
    offer_topic,
)
from aggregator.model_registry import ModelRegistry, RegistryError
from models.manifest import MANIFEST_FILE

__all__ = ["ModelDistributor", "DistributionError", "DEFAULT_CHUNK_SIZE", "STATE_FILE"]

log = logging.getLogger(__name__)

#: 64 KiB: with topic and headers far below Mosquitto's limit, the embedded broker's 1 MiB
#: ``max_payload`` and the agents' default 256 KiB ``mqtt.max_payload``; small enough that a
#: resumed download re-fetches little.
DEFAULT_CHUNK_SIZE = 64 * 1024
STATE_FILE = "ota.json"


class DistributionError(ValueError):
    """An offer or desired-models request that cannot be carried out; the message says why."""


@dataclass
class _Offered:
    offer: ModelOffer
    data: bytes


class ModelDistributor:
    """Publishes offers, chunks and desired models over ``link`` for models in ``models``."""

    def __init__(
        self,
        link,
        models: ModelRegistry,
        *,
        state_dir: str | Path,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        coalesce_s: float = 1.0,
    ) -> None:
        if not 1024 <= chunk_size <= 16 * 1024 * 1024:
            raise DistributionError(f"chunk_size must be between 1024 and 16777216 bytes, got {chunk_size}")
        self.link = link
        self.models = models
        self.state_path = Path(state_dir) / STATE_FILE
        self.chunk_size = chunk_size
        self.coalesce_s = coalesce_s
        self.chunks_sent = 0  # every chunk publish, broadcast or re-send
        self.chunks_resent = 0  # those asked for by a ChunkRequest
        self.requests = 0
        self.requests_unknown = 0  # for a version not (or no longer) offered
        self.coalesced = 0
        self._sent_by: dict[tuple[str, str], int] = {}
        self._resent_by: dict[tuple[str, str], int] = {}
        self._cond = threading.Condition()
        self._control: deque[tuple[str, bytes]] = deque()  # retained (topic, payload), in order
        self._chunks: deque[tuple[str, str, int, bool]] = deque()  # profile, version, index, resend
        self._queued: set[tuple[str, str, int]] = set()
        self._last_sent: dict[tuple[str, str, int], float] = {}
        self._busy = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._offers: dict[tuple[str, str], _Offered] = {}
        self._desired: dict[str, DesiredModels] = {}
        self._keys: dict[str, KeyRotation] = {}  # profile -> the latest key rotation (retained)
        self._revision = 0
        self._load()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._send_loop, name="ota-sender", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued has been handed to the broker; False on time-out."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._control or self._chunks or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def on_connect(self) -> None:
        """After a (re)connect: publish the retained offers and desired models again, in case
        the broker lost its retained store (Mosquitto keeps none without persistence)."""
        with self._cond:
            for item in self._offers.values():
                self._control.append((offer_topic(item.offer.profile, item.offer.version), wire.encode(item.offer)))
            for desired in self._desired.values():
                self._control.append((desired_models_topic(desired.device), wire.encode(desired)))
            for profile, rotation in self._keys.items():
                self._control.append((key_topic(profile), wire.encode(rotation)))
            self._cond.notify_all()

    # -- offers -------------------------------------------------------------------------------

    def offer(self, profile: str, version: str) -> ModelOffer:
        """Offer ``profile/version`` from the registry: retained offer, then every chunk once."""
        offer, data = self._build(profile, version, self.chunk_size)
        with self._cond:
            self._offers[(profile, version)] = _Offered(offer, data)
            self._save_locked()
            self._control.append((offer_topic(profile, version), wire.encode(offer)))
            for index in range(offer.chunks):
                self._enqueue_locked(profile, version, index, resend=False)
            self._cond.notify_all()
        log.info("offered model %s/%s: %d bytes in %d chunks", profile, version, offer.size, offer.chunks)
        return offer

    def _build(self, profile: str, version: str, chunk_size: int) -> tuple[ModelOffer, bytes]:
        try:
            entry = self.models.get(profile, version)
        except RegistryError as exc:
            raise DistributionError(f"cannot offer {profile}/{version}: {exc}") from exc
        data = entry.onnx_bytes()
        manifest_text = (entry.path / MANIFEST_FILE).read_text(encoding="utf-8")
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.manifest.sha256:
            raise DistributionError(f"cannot offer {profile}/{version}: model.onnx does not match its manifest's sha256")
        chunks = [hashlib.sha256(data[i : i + chunk_size]).hexdigest() for i in range(0, len(data), chunk_size)]
        try:
            offer = ModelOffer(v=wire.SCHEMA_VERSION, profile=profile, version=version, manifest=manifest_text,
                               size=len(data), sha256=digest, chunk_size=chunk_size, chunk_sha256=chunks,
                               ts=time.time())
            from edgeloop.wire_models import decode_offer

            decode_offer(wire.encode(offer))  # the constructor does not check constraints: the decoder does
        except (ValueError, wire.WireError) as exc:
            raise DistributionError(f"cannot offer {profile}/{version}: {exc}") from exc
        return offer, data

    def retire(self, profile: str, version: str) -> None:
        """Stop offering ``profile/version``: clear its retained offer, drop its queued chunks."""
        with self._cond:
            self._offers.pop((profile, version), None)
            self._save_locked()
            self._control.append((offer_topic(profile, version), b""))
            self._chunks = deque(c for c in self._chunks if (c[0], c[1]) != (profile, version))
            self._queued = {k for k in self._queued if (k[0], k[1]) != (profile, version)}
            self._cond.notify_all()

    def offers(self) -> list[ModelOffer]:
        with self._cond:
            return [o.offer for o in self._offers.values()]

    # -- signing keys ---------------------------------------------------------------------------

    def rotate_key(self, profile: str, new_public_pem: bytes, key_id: str, current_private_key, note: str = "") -> KeyRotation:
        """Tell ``profile``'s devices to trust a new model-signing key from now on.

        The rotation is signed by the CURRENT key (the one the devices hold), published retained on
        the profile's key topic so devices that are offline learn it later. Sign new models with the
        new key only once the devices have it (their status and the next deployment reports tell).
        """
        from models.signing import sign_key_rotation

        pem = bytes(new_public_pem)
        rotation = KeyRotation(v=wire.SCHEMA_VERSION, key_id=key_id, new_public_key=pem.decode("ascii"),
                               signature=sign_key_rotation(pem, key_id, current_private_key),
                               ts=time.time(), note=note)
        with self._cond:
            self._keys[profile] = rotation
            self._save_locked()
            self._control.append((key_topic(profile), wire.encode(rotation)))
            self._cond.notify_all()
        log.info("published model-signing key %s for profile %s", key_id, profile)
        return rotation

    # -- desired models -----------------------------------------------------------------------

    def set_desired(self, device: str, *, champion: str | None, shadow: str | None) -> int:
        """Publish ``device``'s retained desired models; return the revision used.

        The revision is the larger of the last one plus one and the current time in
        milliseconds, persisted before publishing: it grows across restarts, and even after the
        state file is lost."""
        return self.set_desired_many([device], champion=champion, shadow=shadow)

    def set_desired_many(self, devices, *, champion: str | None, shadow: str | None) -> int:
        """:meth:`set_desired` for many devices at once, persisting the state once (a wave of a
        thousand devices would otherwise write and fsync the state file a thousand times)."""
        devices = list(devices)
        for device in devices:
            if not wire.valid_device_id(device):
                raise DistributionError(f"invalid device id {device!r}: must match {wire.DEVICE_ID_PATTERN}")
        with self._cond:
            self._revision = max(self._revision + 1, int(time.time() * 1000))
            for device in devices:
                desired = DesiredModels(v=wire.SCHEMA_VERSION, device=device, revision=self._revision,
                                        champion=champion, shadow=shadow, ts=time.time())
                self._desired[device] = desired
            self._save_locked()
            for device in devices:
                self._control.append((desired_models_topic(device), wire.encode(self._desired[device])))
            self._cond.notify_all()
            return self._revision

    def desired(self, device: str) -> DesiredModels | None:
        with self._cond:
            return self._desired.get(device)

    # -- chunk requests -----------------------------------------------------------------------

    def handle_chunk_request(self, req: ChunkRequest) -> int:
        """Queue a re-broadcast of the chunks ``req`` misses; return how many were queued.

        Cheap and non-blocking (it runs in the ingest's network thread)."""
        key = (req.profile, req.version)
        now = time.monotonic()
        queued = 0
        with self._cond:
            self.requests += 1
            item = self._offers.get(key)
            if item is None:
                self.requests_unknown += 1
                log.info("%s asks for chunks of %s/%s, which is not offered", req.device, *key)
                return 0
            last = item.offer.chunks - 1
            for lo, hi in req.missing:
                for index in range(lo, min(hi, last) + 1):
                    ck = (req.profile, req.version, index)
                    if ck in self._queued or now - self._last_sent.get(ck, -1e18) < self.coalesce_s:
                        self.coalesced += 1
                        continue
                    self._enqueue_locked(req.profile, req.version, index, resend=True)
                    queued += 1
            if queued:
                self._cond.notify_all()
        return queued

    def counts(self, profile: str, version: str) -> tuple[int, int]:
        """``(chunks_sent, chunks_resent)`` for one version."""
        with self._cond:
            key = (profile, version)
            return self._sent_by.get(key, 0), self._resent_by.get(key, 0)

    def _enqueue_locked(self, profile: str, version: str, index: int, *, resend: bool) -> None:
        self._chunks.append((profile, version, index, resend))
        self._queued.add((profile, version, index))

    # -- sender thread ------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not (self._control or self._chunks) and not self._stop.is_set():
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return
                self._busy = True
                if self._control:
                    kind, (topic, payload) = "control", self._control[0]
                else:
                    profile, version, index, resend = self._chunks[0]
                    item = self._offers.get((profile, version))
                    kind, topic = "chunk", chunk_topic(profile, version, index)
                    size = item.offer.chunk_size if item else 0
                    payload = item.data[index * size : (index + 1) * size] if item else b""
            retain = kind == "control"
            if kind == "chunk" and not payload:  # retired meanwhile
                ok = True
            else:
                ok = self.link.publish(topic, payload, qos=1, retain=retain)
            if not ok:  # window full or link down: wait for room, keep the order
                self._stop.wait(0.01)
                continue
            with self._cond:
                if kind == "control":
                    self._control.popleft()
                    continue
                self._chunks.popleft()
                key = (profile, version, index)
                self._queued.discard(key)
                if payload:
                    self._last_sent[key] = time.monotonic()
                    self.chunks_sent += 1
                    self._sent_by[(profile, version)] = self._sent_by.get((profile, version), 0) + 1
                    if resend:
                        self.chunks_resent += 1
                        self._resent_by[(profile, version)] = self._resent_by.get((profile, version), 0) + 1

    # -- persistence ----------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            state = json.loads(self.state_path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise DistributionError(f"OTA state file {self.state_path} is unreadable ({exc}); "
                                    "move it away to start afresh") from exc
        self._revision = int(state.get("revision", 0))
        from edgeloop.wire_models import decode_desired_models

        for raw in state.get("desired", {}).values():
            desired = decode_desired_models(json.dumps(raw).encode())
            self._desired[desired.device] = desired
        from edgeloop.wire_models import decode_key_rotation

        for profile, raw in state.get("keys", {}).items():
            self._keys[profile] = decode_key_rotation(json.dumps(raw).encode())
        for profile, version, chunk_size in state.get("offers", []):
            try:
                offer, data = self._build(profile, version, int(chunk_size))
            except (DistributionError, OSError) as exc:
                log.warning("not offering %s/%s again after the restart: %s", profile, version, exc)
                continue
            self._offers[(profile, version)] = _Offered(offer, data)

    def _save_locked(self) -> None:
        state = {
            "revision": self._revision,
            "offers": [[p, v, o.offer.chunk_size] for (p, v), o in self._offers.items()],
            "desired": {d: json.loads(wire.encode(m)) for d, m in self._desired.items()},
            "keys": {p: json.loads(wire.encode(k)) for p, k in self._keys.items()},
        }
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state_path, json.dumps(state, indent=1).encode(), 0o644)
