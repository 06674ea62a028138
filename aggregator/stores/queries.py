"""The read queries the API and dashboard need, and the argument checks both stores share.

Every store answers the same five questions (``base.Store``): a downsampled series of one channel,
a device's newest reading, fleet-wide aggregates of one channel per profile, and anomaly and alert
counts per device. The checks below run before any query is built: identifiers (device, channel,
profile, aggregate) must match the wire contract's patterns or a fixed whitelist, and times and
intervals must be finite numbers in the contract's range. A bad argument raises ``ValueError``
naming the parameter; nothing a caller passes can become part of an InfluxQL or SQL statement's
text except an identifier that matched its pattern (and is then double-quoted), and every value
goes through bound parameters.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from edgeloop.wire import DEVICE_ID_PATTERN, NAME_PATTERN, RESERVED_NAMES

__all__ = [
    "AGGREGATES",
    "MAX_TIME_S",
    "MAX_BUCKETS",
    "PROFILE_PATTERN",
    "SeriesQuery",
    "check_device",
    "check_field",
    "check_profile",
    "check_range",
    "check_series",
    "empty_aggregates",
    "WINDOW_KINDS",
    "INFERENCE_FIELDS",
    "MAX_ALERTS",
    "check_window_series",
    "check_limit",
]

#: Aggregates ``series`` offers (the InfluxQL function of the same name).
AGGREGATES = ("mean", "min", "max")
#: The wire contract's largest timestamp (2100-01-01), in seconds.
MAX_TIME_S = 4102444800.0
#: At most this many intervals per ``series`` call: a dashboard never needs more.
MAX_BUCKETS = 100_000
PROFILE_PATTERN = r"^[A-Za-z0-9_\-]{0,32}\Z"

_DEVICE_RE = re.compile(DEVICE_ID_PATTERN)
_NAME_RE = re.compile(NAME_PATTERN)
_PROFILE_RE = re.compile(PROFILE_PATTERN)


def check_device(device: object, name: str = "device") -> str:
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise ValueError(f"invalid {name} {device!r}: must match {DEVICE_ID_PATTERN}")
    return device


def check_field(field: object, name: str = "field") -> str:
    """A telemetry channel name: the contract's NAME pattern and not a reserved column."""
    if not isinstance(field, str) or not _NAME_RE.match(field):
        raise ValueError(f"invalid {name} {field!r}: must match {NAME_PATTERN}")
    if field in RESERVED_NAMES:
        raise ValueError(f"invalid {name} {field!r}: {sorted(RESERVED_NAMES)} are not channels")
    return field


def check_profile(profile: object, name: str = "profile") -> str:
    """A device profile; "" selects the devices that sent none."""
    if not isinstance(profile, str) or not _PROFILE_RE.match(profile):
        raise ValueError(f"invalid {name} {profile!r}: must match {PROFILE_PATTERN}")
    return profile


def _check_time(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"invalid {name} {value!r}: expected seconds since the epoch (a number)")
    if not (math.isfinite(value) and 0 <= value <= MAX_TIME_S):
        raise ValueError(f"invalid {name} {value!r}: expected 0 <= {name} <= {MAX_TIME_S:.0f}")
    return float(value)


def check_range(start: object, end: object) -> tuple[float | None, float | None]:
    """``[start, end)`` in seconds; either may be None (open)."""
    s = None if start is None else _check_time(start, "start")
    e = None if end is None else _check_time(end, "end")
    if s is not None and e is not None and not s < e:
        raise ValueError(f"invalid range: start {s!r} must be before end {e!r}")
    return s, e


@dataclass(frozen=True)
class SeriesQuery:
    """A checked ``series`` request; times in integer microseconds."""

    device: str
    field: str
    start_us: int
    end_us: int
    every_us: int
    agg: str


def check_series(
    device: object, field: object, start: object, end: object, every_s: object, agg: object
) -> SeriesQuery:
    check_device(device)
    check_field(field)
    if start is None or end is None:
        raise ValueError("series needs both start and end")
    s, e = check_range(start, end)
    if isinstance(every_s, bool) or not isinstance(every_s, (int, float)):
        raise ValueError(f"invalid every_s {every_s!r}: expected a number of seconds")
    every_us = round(every_s * 1e6) if math.isfinite(every_s) else 0
    if every_us < 1 or every_us > round(MAX_TIME_S * 1e6):
        raise ValueError(f"invalid every_s {every_s!r}: expected at least 1e-6 seconds")
    if agg not in AGGREGATES:
        raise ValueError(f"invalid agg {agg!r}: expected one of {', '.join(AGGREGATES)}")
    start_us, end_us = round(s * 1e6), round(e * 1e6)
    if (end_us - start_us) / every_us > MAX_BUCKETS:
        raise ValueError(
            f"invalid every_s {every_s!r}: more than {MAX_BUCKETS} intervals in [start, end)"
        )
    return SeriesQuery(device, field, start_us, end_us, every_us, agg)  # type: ignore[arg-type]


def empty_aggregates() -> dict:
    """What ``fleet_aggregates`` answers when no reading matches."""
    return {"mean": None, "min": None, "max": None, "count": 0}


# -- dashboard reads beyond telemetry (``window_series``, ``recent_alerts``, ...) -----------------

#: Measurements ``window_series`` charts besides telemetry: feature vectors and champion verdicts.
WINDOW_KINDS = ("features", "inference")
#: The inference fields ``window_series`` may chart.
INFERENCE_FIELDS = ("score", "latency_us")
#: At most this many alerts per ``recent_alerts`` call.
MAX_ALERTS = 1000


def check_window_series(
    kind: object, device: object, field: object, start: object, end: object, every_s: object,
    agg: object,
) -> SeriesQuery:
    """``check_series`` for a feature (``kind`` "features") or an inference field."""
    if kind not in WINDOW_KINDS:
        raise ValueError(f"invalid kind {kind!r}: expected one of {', '.join(WINDOW_KINDS)}")
    if kind == "inference" and field not in INFERENCE_FIELDS:
        raise ValueError(f"invalid field {field!r}: inference has {', '.join(INFERENCE_FIELDS)}")
    return check_series(device, field, start, end, every_s, agg)


def check_limit(limit: object, maximum: int = MAX_ALERTS) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= maximum:
        raise ValueError(f"invalid limit {limit!r}: expected an integer from 1 to {maximum}")
    return limit
