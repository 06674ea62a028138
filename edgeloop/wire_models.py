"""The wire contract of model distribution: offers, chunks, chunk requests, desired models, keys.

A model is signed (see :mod:`models.signing`), so its bytes may be shared: they are broadcast once
per profile rather than sent once per device. Topics::

    edgeloop/v1/models/{profile}/{version}/offer        cloud -> devices, retained: ModelOffer
    edgeloop/v1/models/{profile}/{version}/chunk/{i}    cloud -> devices: raw bytes of chunk i
    edgeloop/v1/models/{profile}/key                    cloud -> devices, retained: KeyRotation
    edgeloop/v1/dev/{device}/chunkreq                   device -> cloud: ChunkRequest (not stored)
    edgeloop/v1/ctl/{device}/models                     cloud -> device, retained: DesiredModels

The flow: the aggregator publishes the retained offer and broadcasts every chunk once. It then
sets each chosen device's retained ``DesiredModels`` (which version is champion, which runs in
shadow). A device that needs a version it does not hold subscribes to that version's topics,
writes chunks to disk as they come (checking each against ``chunk_sha256``), and asks for what is
still missing with a ``ChunkRequest`` when chunks stop arriving; the aggregator re-broadcasts
just those. When all chunks are there the device verifies the whole model (signature, sha256,
profile, feature set, input shape, a smoke inference, version policy) before it serves it, and
reports each step as a :class:`edgeloop.wire.Deployment` message.

Chunk payloads are the raw model bytes (no JSON): chunk ``i`` holds bytes
``[i * chunk_size, min((i + 1) * chunk_size, size))``.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from edgeloop.wire import (
    DEVICE_ID_PATTERN,
    TOPIC_ROOT,
    VERSION_PATTERN,
    DeviceId,
    Text,
    Timestamp,
    Version,
    WireError,
    _check_ranges,
    _check_size,
    _decode_checked,
    valid_device_id,
)

__all__ = [
    "ModelOffer",
    "ChunkRequest",
    "DesiredModels",
    "KeyRotation",
    "MAX_MODEL_BYTES",
    "MAX_CHUNKS",
    "offer_topic",
    "chunk_topic",
    "version_filter",
    "topic_version",
    "key_topic",
    "chunkreq_topic",
    "desired_models_topic",
    "parse_chunk_topic",
    "decode_offer",
    "decode_chunk_request",
    "decode_desired_models",
    "decode_key_rotation",
]

#: Largest model a device accepts (it is written to disk chunk by chunk, never held whole in a message).
MAX_MODEL_BYTES = 256 * 1024 * 1024
MAX_CHUNKS = 65536

Profile = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{1,32}\Z")]
Sha256Hex = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")]
ChunkRange = tuple[Annotated[int, Meta(ge=0, lt=MAX_CHUNKS)], Annotated[int, Meta(ge=0, lt=MAX_CHUNKS)]]


class ModelOffer(Struct, kw_only=True, tag_field="type", tag="offer"):
    """Cloud -> devices of a profile, retained: a model version is available, and how to fetch it.

    ``manifest`` is the model's signed manifest as its JSON text (exactly the bytes the registry
    stores, so the signature can be checked over them); ``chunk_sha256[i]`` pins chunk ``i``.
    """

    v: Annotated[int, Meta(ge=1, le=1000)]
    profile: Profile
    version: Version
    manifest: Annotated[str, Meta(max_length=1_000_000)]
    size: Annotated[int, Meta(ge=1, le=MAX_MODEL_BYTES)]
    sha256: Sha256Hex
    chunk_size: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)]
    chunk_sha256: Annotated[list[Sha256Hex], Meta(min_length=1, max_length=MAX_CHUNKS)]
    ts: Timestamp

    def __post_init__(self) -> None:
        expected = -(-self.size // self.chunk_size)
        if len(self.chunk_sha256) != expected:
            raise ValueError(f"{self.size} bytes in chunks of {self.chunk_size} make {expected} chunks, "
                             f"not {len(self.chunk_sha256)}")

    @property
    def chunks(self) -> int:
        return len(self.chunk_sha256)


class ChunkRequest(Struct, kw_only=True, tag_field="type", tag="chunkreq"):
    """Device -> cloud: the chunks of ``version`` this device still misses (inclusive ranges)."""

    v: Annotated[int, Meta(ge=1, le=1000)]
    device: DeviceId
    profile: Profile
    version: Version
    missing: Annotated[list[ChunkRange], Meta(min_length=1, max_length=4096)]
    ts: Timestamp

    def __post_init__(self) -> None:
        _check_ranges(self.missing)


class DesiredModels(Struct, kw_only=True, tag_field="type", tag="models"):
    """Cloud -> one device, retained: which version should serve as champion and which in shadow.

    ``revision`` only grows; a device ignores a revision it has already processed. ``champion``
    None leaves the running champion alone; ``shadow`` None removes the shadow.
    """

    v: Annotated[int, Meta(ge=1, le=1000)]
    device: DeviceId
    revision: Annotated[int, Meta(ge=1, le=2**63 - 1)]
    champion: Version | None = None
    shadow: Version | None = None
    ts: Timestamp


class KeyRotation(Struct, kw_only=True, tag_field="type", tag="key"):
    """Cloud -> devices of a profile, retained: a new model-signing public key.

    ``signature`` is ``"ed25519:<base64>"`` by the CURRENT key over ``new_public_key``'s PEM bytes
    followed by ``key_id``; a device that cannot verify it with the key it holds keeps its key.
    """

    v: Annotated[int, Meta(ge=1, le=1000)]
    key_id: Version
    new_public_key: Annotated[str, Meta(max_length=4096)]  # PEM (SubjectPublicKeyInfo)
    signature: Annotated[str, Meta(max_length=200)]
    ts: Timestamp
    note: Text = ""


def _profile_ok(profile: str) -> str:
    if not profile or "/" in profile or "+" in profile or "#" in profile or len(profile) > 32:
        raise ValueError(f"invalid profile {profile!r}")
    return profile


_VERSION_RE = re.compile(VERSION_PATTERN)


def topic_version(version: str) -> str:
    """``version`` as a topic level. Versions may carry a ``+build`` suffix (rollback entries are
    ``1.2.0+rollback.1``), and ``+`` is a wildcard in MQTT: it travels as ``~``, which no version
    contains, so the mapping is one to one (:func:`parse_chunk_topic` maps it back)."""
    if not _VERSION_RE.match(version):
        raise ValueError(f"invalid model version {version!r}: must match {VERSION_PATTERN}")
    return version.replace("+", "~")


def offer_topic(profile: str, version: str) -> str:
    return f"{TOPIC_ROOT}/models/{_profile_ok(profile)}/{topic_version(version)}/offer"


def chunk_topic(profile: str, version: str, index: int) -> str:
    return f"{TOPIC_ROOT}/models/{_profile_ok(profile)}/{topic_version(version)}/chunk/{int(index)}"


def version_filter(profile: str, version: str) -> str:
    """What a device subscribes to while it needs ``version``: its offer and its chunks."""
    return f"{TOPIC_ROOT}/models/{_profile_ok(profile)}/{topic_version(version)}/#"


def key_topic(profile: str) -> str:
    return f"{TOPIC_ROOT}/models/{_profile_ok(profile)}/key"


def chunkreq_topic(device: str) -> str:
    if not valid_device_id(device):
        raise ValueError(f"invalid device id {device!r}: must match {DEVICE_ID_PATTERN}")
    return f"{TOPIC_ROOT}/dev/{device}/chunkreq"


def desired_models_topic(device: str) -> str:
    if not valid_device_id(device):
        raise ValueError(f"invalid device id {device!r}: must match {DEVICE_ID_PATTERN}")
    return f"{TOPIC_ROOT}/ctl/{device}/models"


def parse_chunk_topic(name: str) -> tuple[str, str, int] | None:
    """``(profile, version, index)`` for a chunk topic, None for any other topic."""
    parts = name.split("/")
    if len(parts) != 7 or parts[2] != "models" or parts[5] != "chunk" or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT:
        return None
    try:
        index = int(parts[6])
    except ValueError:
        return None
    if not 0 <= index < MAX_CHUNKS or str(index) != parts[6]:
        return None
    return parts[3], parts[4].replace("~", "+"), index


_offer_decoder = msgspec.json.Decoder(ModelOffer)
_chunkreq_decoder = msgspec.json.Decoder(ChunkRequest)
_desired_decoder = msgspec.json.Decoder(DesiredModels)
_key_decoder = msgspec.json.Decoder(KeyRotation)


def decode_offer(payload: bytes) -> ModelOffer:
    if len(payload) > 2_000_000:
        raise WireError("oversize", f"offer of {len(payload)} bytes")
    return _decode_checked(_offer_decoder, payload)


def decode_chunk_request(payload: bytes, topic_name: str | None = None) -> ChunkRequest:
    return _decode_device_message(_chunkreq_decoder, payload, topic_name, chunkreq_topic, "chunk request")


def decode_desired_models(payload: bytes, topic_name: str | None = None) -> DesiredModels:
    return _decode_device_message(_desired_decoder, payload, topic_name, desired_models_topic, "desired models")


def _decode_device_message(decoder, payload: bytes, topic_name: str | None, topic_of, what: str):
    """Decode a message naming one device; with ``topic_name``, it must be that device's topic."""
    _check_size(payload)
    message = _decode_checked(decoder, payload)
    if topic_name is not None and topic_name != topic_of(message.device):
        raise WireError("device-mismatch", f"{what} of {message.device!r} on {topic_name[:200]!r}")
    return message


def decode_key_rotation(payload: bytes) -> KeyRotation:
    _check_size(payload)
    return _decode_checked(_key_decoder, payload)
