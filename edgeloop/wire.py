"""The wire contract: every message that crosses MQTT, its topic, and how to check it.

Both sides import this one module. Payloads are JSON encoded and decoded by msgspec (small, fast
and cheap on a Pi). Field types are fixed here, so a value can never change type between two
messages; the decoder refuses anything else with a reason the aggregator quarantines.

Topics (``{device}`` and ``{kind}`` are single topic levels)::

    edgeloop/v1/dev/{device}/{kind}      device -> cloud: telemetry, features, inference, alert,
                                         deployment
    edgeloop/v1/dev/{device}/status      device -> cloud, retained: birth (online) / last will
    edgeloop/v1/ctl/{device}/confirm     cloud -> device: sequence ranges durably stored
    edgeloop/v1/ctl/{device}/config      cloud -> device, retained: desired settings

Model distribution (offers, chunks, chunk requests, desired models, key rotation) lives in
:mod:`edgeloop.wire_models`.

Every device message carries ``v`` (schema version), ``device``, ``seq`` (per-device sequence
number that survives restarts) and ``ts`` (device wall clock, seconds since the epoch). A
telemetry reading is identified by (device, seq, index in ``readings``). See docs/protocol.md.
"""

from __future__ import annotations

import numbers
import re
from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta, Struct

__all__ = [
    "SCHEMA_VERSION",
    "ACCEPTED_SCHEMA_VERSIONS",
    "MAX_PAYLOAD_BYTES",
    "TOPIC_ROOT",
    "UPLINK_KINDS",
    "WireError",
    "Reading",
    "Telemetry",
    "Features",
    "Inference",
    "Alert",
    "Status",
    "Deployment",
    "DEPLOYMENT_STATES",
    "Confirm",
    "DesiredConfig",
    "DeviceMessage",
    "Topic",
    "topic",
    "confirm_topic",
    "config_topic",
    "control_topic",
    "DOWNLINK_KINDS",
    "uplink_filter",
    "parse_topic",
    "encode",
    "decode",
    "decode_confirm",
    "decode_config",
    "merge_ranges",
    "ranges_contain",
    "valid_device_id",
    "DEVICE_ID_PATTERN",
    "NAME_PATTERN",
    "RESERVED_NAMES",
]

SCHEMA_VERSION = 1
#: Versions the aggregator accepts, so a fleet can be upgraded device by device.
ACCEPTED_SCHEMA_VERSIONS = frozenset({1})
#: Refuse bigger payloads before decoding them (a reading batch of 50 x 8 channels is ~3 KB).
MAX_PAYLOAD_BYTES = 256 * 1024
TOPIC_ROOT = "edgeloop/v1"

# ``\Z`` rather than ``$``: ``$`` also matches before a trailing newline.
# Identifiers end up as InfluxDB tags, field names and SQLite values; restricting their alphabet
# here is what makes line-protocol and InfluxQL injection impossible further down.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z"
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,63}\Z"
_DEVICE_RE = re.compile(DEVICE_ID_PATTERN)
#: Field and tag names the stores use themselves; channels and features may not take them.
RESERVED_NAMES = frozenset({"seq", "idx", "flags", "time", "device", "profile", "feature_set"})

DeviceId = Annotated[str, Meta(pattern=DEVICE_ID_PATTERN)]
Name = Annotated[str, Meta(pattern=NAME_PATTERN)]
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-+]{0,63}\Z"
Version = Annotated[str, Meta(pattern=VERSION_PATTERN)]
Text = Annotated[str, Meta(max_length=1024)]
Seq = Annotated[int, Meta(ge=0, le=2**63 - 1)]
# NaN and the infinities fail these bounds, so they never pass the decoder.
Finite = Annotated[float, Meta(ge=-1e300, le=1e300)]
Timestamp = Annotated[float, Meta(ge=0, le=4102444800.0)]  # up to 2100-01-01
SeqRange = tuple[Seq, Seq]


class WireError(ValueError):
    """A payload or topic that breaks the contract; ``reason`` is short and stable for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class _Header(Struct, kw_only=True, tag_field="type", forbid_unknown_fields=False):
    v: Annotated[int, Meta(ge=1, le=1000)]
    device: DeviceId
    seq: Seq
    ts: Timestamp
    profile: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{0,32}\Z")] = ""


def _check_ranges(ranges) -> None:
    for lo, hi in ranges:
        if lo > hi:
            raise ValueError(f"range [{lo}, {hi}] is reversed")


class Reading(Struct, array_like=True, gc=False):
    """One sample time: ``[t, [v1, v2, ...], flags]`` with values in ``Telemetry.channels`` order.

    ``None`` marks a channel that had no value at ``t``; ``flags`` is the data-quality bit mask.
    Readings are not tracked by the garbage collector (``gc=False``; they hold only numbers, so
    they cannot be part of a cycle): the aggregator decodes tens of thousands of readings a second
    and holds thousands at once, and the collector's passes over one tracked struct per reading
    cost about as much as decoding them (see ``aggregator/gc_policy.py``).
    """

    t: Timestamp
    values: list[Finite | None]
    flags: Annotated[int, Meta(ge=0, le=2**31 - 1)] = 0


class Telemetry(_Header, kw_only=True, tag="telemetry"):
    """A batch of raw readings from one device."""

    channels: Annotated[list[Name], Meta(min_length=1, max_length=128)]
    readings: Annotated[list[Reading], Meta(min_length=1, max_length=10_000)]

    def __post_init__(self) -> None:
        width = len(self.channels)
        if len(set(self.channels)) != width:
            raise ValueError("channel names repeat")
        if RESERVED_NAMES.intersection(self.channels):
            raise ValueError(f"channel names may not be any of {sorted(RESERVED_NAMES)}")
        for reading in self.readings:
            if len(reading.values) != width:
                raise ValueError("a reading's value count differs from the channel count")


class Features(_Header, kw_only=True, tag="features"):
    """The feature vector the device computed over one window (training reads these)."""

    feature_set: Version
    window_start: Timestamp
    window_end: Timestamp
    names: Annotated[list[Name], Meta(min_length=1, max_length=4096)]
    values: list[Finite]
    flags: Annotated[int, Meta(ge=0, le=2**31 - 1)] = 0

    def __post_init__(self) -> None:
        if len(self.names) != len(self.values):
            raise ValueError("names and values differ in length")
        if len(set(self.names)) != len(self.names):
            raise ValueError("feature names repeat")
        if RESERVED_NAMES.intersection(self.names):
            raise ValueError(f"feature names may not be any of {sorted(RESERVED_NAMES)}")


class Inference(_Header, kw_only=True, tag="inference"):
    """A model's verdict on one window; ``role`` tells the champion from a shadow challenger."""

    model_version: Version
    feature_set: Version
    window_end: Timestamp
    score: Finite
    anomaly: bool
    latency_us: Annotated[float, Meta(ge=0, le=1e9)]
    role: Literal["champion", "shadow"] = "champion"


class Alert(_Header, kw_only=True, tag="alert"):
    """A local rule fired on the device."""

    rule: Name
    severity: Literal["info", "warning", "critical"]
    value: Finite
    window_end: Timestamp
    message: Text = ""
    state: Literal["fired", "cleared"] = "fired"


class Status(_Header, kw_only=True, tag="status"):
    """Birth (``online``) and last will (``offline``); retained. ``seq`` is the device's next
    sequence number: it has assigned ``0 .. seq - 1`` (0: none yet)."""

    state: Literal["online", "offline"]
    agent_version: Version = "0"
    model_version: Version | None = None
    outbox_depth: Annotated[int, Meta(ge=0)] = 0
    dropped: list[SeqRange] = []
    uptime_s: Annotated[float, Meta(ge=0)] = 0.0
    #: The desired-config revision the agent has processed (0: none), and what it refused and why.
    config_revision: Annotated[int, Meta(ge=0)] = 0
    config_rejected: Annotated[dict[Name, Text], Meta(max_length=64)] = {}
    #: Readings flagged by each data-quality check since the agent started (see the flag bits).
    quality: Annotated[dict[Name, Annotated[int, Meta(ge=0)]], Meta(max_length=32)] = {}
    #: Wall-clock steps the sampler saw (a Pi without RTC syncing NTP late) and the last one's size.
    clock_steps: Annotated[int, Meta(ge=0)] = 0
    last_clock_step_s: Finite = 0.0

    def __post_init__(self) -> None:
        _check_ranges(self.dropped)


#: A model version's life on one device, in order; ``rejected`` and ``rolled_back`` end it.
DEPLOYMENT_STATES = ("offered", "downloading", "verified", "shadow", "active", "rejected", "rolled_back")


class Deployment(_Header, kw_only=True, tag="deployment"):
    """A device reports where one model version stands on it (through the outbox, like data).

    ``reason`` says why a version was rejected or rolled back (a short stable code, then detail);
    ``chunks_have`` / ``chunks_total`` show download progress.
    """

    model_version: Version
    state: Literal["offered", "downloading", "verified", "shadow", "active", "rejected", "rolled_back"]
    reason: Text = ""
    chunks_have: Annotated[int, Meta(ge=0)] = 0
    chunks_total: Annotated[int, Meta(ge=0)] = 0


class Confirm(Struct, kw_only=True, tag_field="type", tag="confirm"):
    """Cloud -> device: these sequence ranges (inclusive) are durably stored; forget them."""

    v: Annotated[int, Meta(ge=1, le=1000)]
    device: DeviceId
    ranges: list[SeqRange]
    ts: Timestamp

    def __post_init__(self) -> None:
        _check_ranges(self.ranges)


ConfigValue = Union[bool, int, float, Text, list[Name]]


class DesiredConfig(Struct, kw_only=True, tag_field="type", tag="config"):
    """Cloud -> device, retained: settings to change at run time, as ``{name: value}``.

    The values are checked by the agent, key by key, not here: a bad key is refused on its own
    (and reported in ``Status.config_rejected``) while the valid ones apply.
    """

    v: Annotated[int, Meta(ge=1, le=1000)]
    device: DeviceId
    revision: Annotated[int, Meta(ge=1, le=2**63 - 1)]
    ts: Timestamp
    settings: Annotated[dict[Name, ConfigValue], Meta(max_length=64)]


DeviceMessage = Union[Telemetry, Features, Inference, Alert, Status, Deployment]
_UPLINK: dict[str, type] = {
    "telemetry": Telemetry,
    "features": Features,
    "inference": Inference,
    "alert": Alert,
    "status": Status,
    "deployment": Deployment,
}
UPLINK_KINDS = tuple(_UPLINK)

_encoder = msgspec.json.Encoder()
_decoders = {kind: msgspec.json.Decoder(cls) for kind, cls in _UPLINK.items()}
_confirm_decoder = msgspec.json.Decoder(Confirm)
_config_decoder = msgspec.json.Decoder(DesiredConfig)
#: Cloud -> device kinds (topic ``edgeloop/v1/ctl/{device}/{kind}``).
DOWNLINK_KINDS = ("confirm", "config")


class Topic(Struct, frozen=True):
    direction: Literal["dev", "ctl"]
    device: str
    kind: str


def valid_device_id(device: str) -> bool:
    return bool(_DEVICE_RE.match(device))


def topic(device: str, kind: str) -> str:
    """The uplink topic a device publishes ``kind`` messages on."""
    if kind not in _UPLINK:
        raise ValueError(f"unknown message kind {kind!r}; expected one of {', '.join(_UPLINK)}")
    if not valid_device_id(device):
        raise ValueError(f"invalid device id {device!r}: must match {DEVICE_ID_PATTERN}")
    return f"{TOPIC_ROOT}/dev/{device}/{kind}"


def confirm_topic(device: str) -> str:
    return control_topic(device, "confirm")


def config_topic(device: str) -> str:
    """The retained desired-config topic of one device."""
    return control_topic(device, "config")


def control_topic(device: str, kind: str) -> str:
    if kind not in DOWNLINK_KINDS:
        raise ValueError(f"unknown control kind {kind!r}; expected one of {', '.join(DOWNLINK_KINDS)}")
    if not valid_device_id(device):
        raise ValueError(f"invalid device id {device!r}: must match {DEVICE_ID_PATTERN}")
    return f"{TOPIC_ROOT}/ctl/{device}/{kind}"


def uplink_filter(share_group: str | None = None) -> str:
    """The subscription the aggregator uses; ``$share/<group>/`` splits load between members."""
    base = f"{TOPIC_ROOT}/dev/+/+"
    return f"$share/{share_group}/{base}" if share_group else base


def parse_topic(name: str) -> Topic:
    parts = name.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT:
        raise WireError("bad-topic", name[:200])
    _, _, direction, device, kind = parts
    if not valid_device_id(device):
        raise WireError("bad-device-id", device[:200])
    if direction == "dev" and kind in _UPLINK:
        return Topic("dev", device, kind)
    if direction == "ctl" and kind in DOWNLINK_KINDS:
        return Topic("ctl", device, kind)
    raise WireError("bad-topic", name[:200])


def encode(message: Struct) -> bytes:
    return _encoder.encode(message)


def _check_size(payload: bytes) -> None:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise WireError("oversize", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")


def _decode_checked(decoder: msgspec.json.Decoder, payload: bytes):
    """Decode with ``decoder``; every failure becomes a WireError, and the schema version is checked."""
    try:
        message = decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise WireError("invalid", str(exc)[:300]) from exc
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise WireError("malformed", str(exc)[:300]) from exc
    if message.v not in ACCEPTED_SCHEMA_VERSIONS:
        raise WireError("unsupported-version", f"v={message.v}")
    return message


def decode(topic_name: str, payload: bytes) -> DeviceMessage:
    """Decode and check one uplink message; raise :class:`WireError` with a reason otherwise."""
    _check_size(payload)
    where = parse_topic(topic_name)
    if where.direction != "dev":
        raise WireError("bad-topic", "not an uplink topic")
    message = _decode_checked(_decoders[where.kind], payload)
    if message.device != where.device:
        raise WireError("device-mismatch", f"payload {message.device!r} on topic of {where.device!r}")
    return message


def decode_confirm(payload: bytes, topic_name: str | None = None) -> Confirm:
    """Decode a delivery confirmation; with ``topic_name``, also check it is for that topic's device."""
    return _decode_control("confirm", _confirm_decoder, payload, topic_name)


def decode_config(payload: bytes, topic_name: str | None = None) -> DesiredConfig:
    """Decode a desired-config message; with ``topic_name``, also check it is for that device."""
    return _decode_control("config", _config_decoder, payload, topic_name)


def _decode_control(kind: str, decoder: msgspec.json.Decoder, payload: bytes, topic_name: str | None):
    _check_size(payload)
    message = _decode_checked(decoder, payload)
    if topic_name is not None:
        where = parse_topic(topic_name)
        if where.direction != "ctl" or where.kind != kind or where.device != message.device:
            raise WireError("device-mismatch", f"{kind} for {message.device!r} on {topic_name[:200]!r}")
    return message


def merge_ranges(seqs_or_ranges) -> list[tuple[int, int]]:
    """Collapse sequence numbers and inclusive ranges into sorted, disjoint, inclusive ranges."""
    spans = sorted(
        (int(x), int(x)) if isinstance(x, numbers.Integral) else (int(x[0]), int(x[1])) for x in seqs_or_ranges
    )
    merged: list[tuple[int, int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1] + 1:
            if hi > merged[-1][1]:
                merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return merged


def ranges_contain(ranges: list[tuple[int, int]], seq: int) -> bool:
    return any(lo <= seq <= hi for lo, hi in ranges)

