"""Encode wire messages as InfluxDB line protocol, one byte chunk per message.

The schema (shared with the SQLite store, see docs/storage.md): times are the device's, rounded
to whole microseconds and written in nanoseconds (``round(t * 1e6) * 1000``, write precision
``ns``), so the same message always encodes to the same bytes and a repeat overwrites its own
points identically. The three digits below the microsecond are free for the time guard
(``timeguard``): a telemetry reading whose (series, time) another reading already holds is
written a few nanoseconds later, with ``FLAG_TIME_ADJUSTED`` set in its flags (``adjusted``).

    telemetry     tags device, profile   fields <channel>=float (None omitted), seq, idx, flags
    features      tags device, profile, feature_set   fields <feature>=float, seq, flags
    inference     tags device, profile, model_version, role   fields score, anomaly, latency_us, seq
    alerts        tags device, profile, rule, severity   fields value, message, seq
    agent_health  tags device, profile   fields state, outbox_depth, uptime_s, seq, agent_version,
                  model_version (when present); time = ts
    deployments   tags device, profile, model_version   fields state, reason, chunks_have,
                  chunks_total, seq; time = ts in µs plus ``seq % 1000`` ns (two states a device
                  reports within one microsecond must not overwrite each other)

The ``profile`` tag is omitted when the profile is "". Each message becomes its own chunk so that
a batch the server refuses in part can be traced back to the message index (the InfluxDB store
bisects over chunks). Escaping follows the line-protocol rules: measurement names escape commas
and spaces; tag keys, tag values and field keys escape commas, equals signs and spaces; string
field values escape backslashes and double quotes. Identifiers that line protocol cannot carry at
all (empty, or holding a backslash, a newline or a carriage return; the wire contract's patterns
already exclude them) make the message rejected here, with a reason, rather than mis-encoded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import msgspec

from edgeloop.wire import Alert, Deployment, DeviceMessage, Features, Inference, Status, Telemetry

from .base import FLAG_TIME_ADJUSTED

__all__ = ["EncodedBatch", "LineProtocolError", "encode_batch", "encode_message", "MEASUREMENTS"]

#: Message kind -> measurement name (also the SQLite table name).
MEASUREMENTS = {
    "telemetry": "telemetry",
    "features": "features",
    "inference": "inference",
    "alert": "alerts",
    "status": "agent_health",
    "deployment": "deployments",
}


class LineProtocolError(ValueError):
    """A message that line protocol cannot represent faithfully."""


@dataclass
class EncodedBatch:
    """Line protocol for a batch: ``chunks[i]`` holds message i's lines (None if refused here)."""

    chunks: list[bytes | None]
    #: (message index, reason) for messages refused before reaching any server.
    rejected: list[tuple[int, str]] = field(default_factory=list)
    #: Lines per message (0 for a refused one).
    line_counts: list[int] = field(default_factory=list)

    @property
    def lines(self) -> int:
        return sum(self.line_counts)

    def body(self, indices: Sequence[int] | None = None) -> bytes:
        """The request body for all encodable messages, or only for ``indices``."""
        chunks = self.chunks if indices is None else [self.chunks[i] for i in indices]
        return b"".join([c for c in chunks if c is not None])

    def indices(self) -> list[int]:
        """Indices of the messages that encoded (the ones to send)."""
        return [i for i, c in enumerate(self.chunks) if c is not None]


_UNREPRESENTABLE = ("\\", "\n", "\r")
_json = msgspec.json.Encoder().encode
_BOOL = ("false", "true")


@lru_cache(maxsize=65536)
def _ident(s: str) -> str:
    """Escape a tag key, tag value or field key (identifiers repeat, hence the cache)."""
    if not s or any(ch in s for ch in _UNREPRESENTABLE):
        raise LineProtocolError(f"identifier {s[:80]!r} cannot be written as line protocol")
    return s.replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def _string(s: str) -> str:
    """A quoted string field value; newlines are allowed inside quotes by the 1.x parser."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _profile(m: DeviceMessage) -> str:
    return f",profile={_ident(m.profile)}" if m.profile else ""


def _telemetry(
    m: Telemetry, times_us: list[int] | None = None, adjusted: dict[int, int] | None = None
) -> tuple[str, int]:
    """Lines for ``m``; ``times_us`` the readings' times if already known, ``adjusted`` maps a
    reading index to the nanosecond time it must take instead (its flags get FLAG_TIME_ADJUSTED)."""
    head = f"telemetry,device={_ident(m.device)}{_profile(m)} seq={m.seq}i,idx="
    readings = m.readings
    width = len(m.channels)
    if times_us is None:
        times_us = [round(r.t * 1e6) for r in readings]
    flags = [r.flags for r in readings]
    if adjusted:  # rare: times in ns with some moved, " %d000" becomes " %d"
        times: list[int] = [t * 1000 for t in times_us]
        for i, t_ns in adjusted.items():
            times[i] = t_ns
            flags[i] |= FLAG_TIME_ADJUSTED
        tail = " %d\n"
    else:
        times, tail = times_us, " %d000\n"
    # msgspec's C encoder spells every float in its shortest round-trip form, as repr() does but
    # ~4x faster; split its JSON into one string per value, row-major.
    text = _json([r.values for r in readings]).decode()
    values = text[2:-2].replace("],[", ",").split(",")
    nulls = text.count("null")
    if nulls == 0:  # no None: every line has the same fields, so lay the text out column-wise
        return _uniform_lines(head, _field_keys(tuple(m.channels)), values, flags, times, tail), len(readings)
    if nulls != sum([r.values.count(None) for r in readings]):  # NaN and inf encode as null too
        raise LineProtocolError(_nonfinite(m) or "non-finite value")
    keys = [f",{_ident(c)}=" for c in m.channels]
    out = []
    for i in range(len(readings)):
        row = values[i * width : (i + 1) * width]
        fields = "".join([k + v for k, v in zip(keys, row) if v != "null"])
        out.append(f"{head}{i}i,flags={flags[i]}i{fields}" + tail % times[i])
    return "".join(out), len(out)


_INDEX = [str(i) for i in range(10_000)]  # the wire contract's most readings per message


@lru_cache(maxsize=4096)
def _field_keys(channels: tuple[str, ...]) -> tuple[str, ...]:
    """The text before each channel's value: ``i,c1=`` (closing the flags integer), ``,c2=``..."""
    return tuple([("i," if k == 0 else ",") + _ident(c) + "=" for k, c in enumerate(channels)])


def _uniform_lines(head: str, keys: tuple[str, ...], values: list[str], flags: list[int],
                   times: list[int], tail: str) -> str:
    """Lines that all carry every channel: ``{head}{i}i,flags={f}i,c1=v1,...`` then ``tail % time``.

    Built as one token list filled column by column (slice assignments and ``[x] * n`` run in C)
    and joined once: about a quarter cheaper than one %-format per line, which counts at
    ~200,000 lines a second (BENCHMARKS.md)."""
    n, width = len(flags), len(keys)
    space, rest = tail.split("%d")  # " %d000\n" (times in µs) or " %d\n" (in ns)
    stride = 2 * width + 7  # head, index, ",flags=", flags, (key, value) per channel, " ", time, rest
    tokens: list[str] = [head] * (n * stride)  # column 0 stays the head; the rest is overwritten
    tokens[1::stride] = _INDEX[:n]
    tokens[2::stride] = ["i,flags="] * n
    tokens[3::stride] = [str(f) for f in flags] if any(flags) else ["0"] * n
    for k in range(width):
        tokens[4 + 2 * k :: stride] = [keys[k]] * n
        tokens[5 + 2 * k :: stride] = values[k::width]
    tokens[stride - 3 :: stride] = [space] * n
    tokens[stride - 2 :: stride] = _json(times).decode()[1:-1].split(",")
    tokens[stride - 1 :: stride] = [rest] * n
    return "".join(tokens)


def _features(m: Features) -> tuple[str, int]:
    fields = "".join([f",{_ident(n)}={v!r}" for n, v in zip(m.names, m.values)])
    return (
        f"features,device={_ident(m.device)}{_profile(m)},feature_set={_ident(m.feature_set)}"
        f" seq={m.seq}i,flags={m.flags}i{fields} {round(m.window_end * 1e6)}000\n"
    ), 1


def _inference(m: Inference) -> tuple[str, int]:
    return (
        f"inference,device={_ident(m.device)}{_profile(m)},model_version={_ident(m.model_version)}"
        f",role={_ident(m.role)} score={float(m.score)!r},anomaly={_BOOL[bool(m.anomaly)]}"
        f",latency_us={float(m.latency_us)!r},seq={m.seq}i {round(m.window_end * 1e6)}000\n"
    ), 1


def _alert(m: Alert) -> tuple[str, int]:
    return (
        f"alerts,device={_ident(m.device)}{_profile(m)},rule={_ident(m.rule)}"
        f",severity={_ident(m.severity)} value={float(m.value)!r},message={_string(m.message)}"
        f",seq={m.seq}i {round(m.window_end * 1e6)}000\n"
    ), 1


def _status(m: Status) -> tuple[str, int]:
    model = f",model_version={_string(m.model_version)}" if m.model_version is not None else ""
    return (
        f"agent_health,device={_ident(m.device)}{_profile(m)} state={_string(m.state)}"
        f",outbox_depth={int(m.outbox_depth)}i,uptime_s={float(m.uptime_s)!r},seq={m.seq}i"
        f",agent_version={_string(m.agent_version)}{model} {round(m.ts * 1e6)}000\n"
    ), 1


def _deployment(m: Deployment) -> tuple[str, int]:
    return (
        f"deployments,device={_ident(m.device)}{_profile(m)},model_version={_ident(m.model_version)}"
        f" state={_string(m.state)},reason={_string(m.reason)},chunks_have={int(m.chunks_have)}i"
        f",chunks_total={int(m.chunks_total)}i,seq={m.seq}i {deployment_time_ns(m)}\n"
    ), 1


def deployment_time_ns(m: Deployment) -> int:
    """A deployment point's time: ``ts`` in µs, plus ``seq % 1000`` ns (see the module docstring)."""
    return round(m.ts * 1e6) * 1000 + m.seq % 1000


_ENCODERS = {
    Telemetry: _telemetry,
    Features: _features,
    Inference: _inference,
    Alert: _alert,
    Status: _status,
    Deployment: _deployment,
}


def _nonfinite(m: DeviceMessage) -> str | None:
    """Why ``m`` holds a non-finite float, if it does: the exact check behind the cheap ones."""
    if isinstance(m, Telemetry):
        for i, r in enumerate(m.readings):
            if any(v is not None and not math.isfinite(v) for v in r.values):
                return f"reading {i} holds a non-finite value"
        return None
    if isinstance(m, Features):
        values = m.values
    elif isinstance(m, Inference):
        values = [m.score, m.latency_us]
    elif isinstance(m, Alert):
        values = [m.value]
    elif isinstance(m, Deployment):
        values = []
    else:
        values = [m.uptime_s]
    return "non-finite value" if any(not math.isfinite(v) for v in values) else None


def _check_finite(m: DeviceMessage, text: str) -> str:
    # repr() spells NaN and the infinities "nan", "inf", "-inf", which no InfluxDB accepts; the
    # decoder already refuses them, so only pay for the exact check when the text hints at one.
    if "=nan" in text or "=inf" in text or "=-inf" in text:
        reason = _nonfinite(m)
        if reason:
            raise LineProtocolError(reason)
    return text


def encode_message(
    m: DeviceMessage, times_us: list[int] | None = None, adjusted: dict[int, int] | None = None
) -> tuple[bytes, int]:
    """One message's lines as UTF-8 bytes and their count; LineProtocolError if unrepresentable.

    ``times_us`` and ``adjusted`` apply to telemetry only (see ``_telemetry``)."""
    encoder = _ENCODERS.get(type(m))
    if encoder is None:
        raise LineProtocolError(f"not a device message: {type(m).__name__}")
    if type(m) is Telemetry:  # telemetry checks itself for non-finite values
        text, n = _telemetry(m, times_us, adjusted)
    else:
        text, n = encoder(m)
        _check_finite(m, text)
    try:
        return text.encode(), n
    except UnicodeEncodeError as exc:
        raise LineProtocolError(f"text is not valid UTF-8: {exc.reason}") from None


def encode_batch(
    messages: Sequence[DeviceMessage],
    times_us: Sequence[list[int] | None] | None = None,
    adjusted: dict[int, dict[int, int]] | None = None,
) -> EncodedBatch:
    """Encode every message; unrepresentable ones land in ``rejected`` instead of the body.

    ``times_us[i]`` and ``adjusted[i]`` are passed on for message i (see ``encode_message``)."""
    chunks: list[bytes | None] = []
    counts: list[int] = []
    rejected: list[tuple[int, str]] = []
    adjusted = adjusted or {}
    for i, m in enumerate(messages):
        try:
            chunk, n = encode_message(m, times_us[i] if times_us else None, adjusted.get(i))
        except LineProtocolError as exc:
            chunk, n = None, 0
            rejected.append((i, f"unencodable: {exc}"))
        chunks.append(chunk)
        counts.append(n)
    return EncodedBatch(chunks, rejected, counts)
