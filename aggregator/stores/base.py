"""The one interface every time-series store implements.

Stores are transports: they turn validated wire messages into rows and do I/O. Batching,
retries, acknowledgement and delivery confirmation live once, above them, in the ingest.

Contract (tests/test_store_contract.py runs it against every store that can run here):

* ``write`` returns only once the batch is durable; a repeat of a message already stored
  (same device and seq) leaves exactly one copy of each row and identical values.
* A message the server refuses on its own merits is reported in ``WriteOutcome.rejected`` with
  the server's reason; everything else in the batch is stored. Nothing is dropped silently.
* ``StoreUnavailable`` means "nothing is known to be stored, try the whole batch again later".
* A device clock that steps back never makes a new reading replace a stored one: every
  (device, seq, idx) stays stored once, with its own values (docs/storage.md, "Time"). A store
  that had to move a reading's stored time to keep it sets ``FLAG_TIME_ADJUSTED`` in its flags.
* Reads (``series``, ``latest``, ``fleet_aggregates``, ``anomaly_counts``, ``alert_counts``,
  and the device page's ``window_series``, ``recent_alerts``, ``model_changes``, ``device_fields``)
  check their arguments with ``queries`` (ValueError naming the parameter) and answer the same
  on every store. Times are seconds since the epoch, ranges ``[start, end)``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from edgeloop.wire import DeviceMessage

__all__ = [
    "FLAG_TIME_ADJUSTED",
    "StoreError",
    "StoreUnavailable",
    "WriteOutcome",
    "TelemetryRow",
    "FeatureRows",
    "FeatureQuery",
    "check_feature_query",
    "DEFAULT_FEATURE_LIMIT",
    "Store",
]

#: Bit the store sets in a telemetry reading's ``flags`` when it stored the reading a few
#: nanoseconds after its device time, because another reading of the same device already held
#: that time (a device clock stepped back). The same bit as ``edge_agent.quality.TIME_ADJUSTED``:
#: devices set only bits below 256.
FLAG_TIME_ADJUSTED = 1 << 8


class StoreError(Exception):
    """A store problem that retrying will not fix (bad credentials, no right to create a database)."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or answered 5xx / timed out; retry the same batch later."""


@dataclass
class WriteOutcome:
    #: (index into the written batch, reason) for each message the server refused.
    rejected: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class TelemetryRow:
    device: str
    seq: int
    idx: int
    t: float
    values: dict[str, float]
    flags: int = 0


#: ``feature_rows`` returns at most this many rows unless told otherwise (31 features x 200k rows
#: is ~50 MB of float64: enough to train on, small enough for the aggregator's memory).
DEFAULT_FEATURE_LIMIT = 200_000
_FEATURE_SET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-+]{0,63}\Z")  # wire.Version


class FeatureRows(NamedTuple):
    """Stored feature vectors: ``times[k]`` (window end, seconds), ``devices[k]`` and
    ``matrix[k]`` (float64, one column per name in ``names``), oldest first."""

    times: np.ndarray
    devices: list[str]
    names: list[str]
    matrix: np.ndarray


@dataclass(frozen=True)
class FeatureQuery:
    """A checked ``feature_rows`` request (times in seconds, None = open)."""

    profile: str
    start: float | None
    end: float | None
    feature_set: str
    names: tuple[str, ...] | None
    exclude_flagged: bool
    limit: int


def check_feature_query(
    profile: object, start: object, end: object, feature_set: object, names: object,
    exclude_flagged: object, limit: object,
) -> FeatureQuery:
    """Check ``feature_rows``' arguments (ValueError naming the parameter)."""
    from .queries import check_field, check_profile, check_range

    check_profile(profile)
    s, e = check_range(start, end)
    if not isinstance(feature_set, str) or not _FEATURE_SET_RE.match(feature_set):
        raise ValueError(f"invalid feature_set {feature_set!r}: must match {_FEATURE_SET_RE.pattern}")
    if names is not None:
        if isinstance(names, str) or not names:
            raise ValueError(f"invalid names {names!r}: expected a non-empty list of feature names")
        names = tuple(check_field(n, "feature name") for n in names)
        if len(set(names)) != len(names):
            raise ValueError("invalid names: a feature name repeats")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"invalid limit {limit!r}: expected an int >= 1")
    return FeatureQuery(profile, s, e, feature_set, names, bool(exclude_flagged), limit)  # type: ignore[arg-type]


def finish_feature_rows(
    q: FeatureQuery, rows: list[tuple[int, str, int, dict[str, float]]]
) -> FeatureRows:
    """Shape both stores' raw rows alike: ``rows`` are (time_us, device, seq, {name: value}),
    the newest ``q.limit`` of them that passed the flags filter, in any order.

    The columns are ``q.names`` or else the sorted names of the newest row; rows that lack any of
    them are left out. Rows come back oldest first, ties by device then seq.
    """
    rows = sorted(rows, key=lambda r: (r[0], r[1], r[2]))
    names = list(q.names) if q.names is not None else (sorted(rows[-1][3]) if rows else [])
    kept = [r for r in rows if all(n in r[3] for n in names)]
    matrix = np.array([[r[3][n] for n in names] for r in kept], dtype=np.float64)
    return FeatureRows(
        np.array([r[0] / 1e6 for r in kept], dtype=np.float64),
        [r[1] for r in kept],
        names,
        matrix.reshape(len(kept), len(names)),
    )


class Store(ABC):
    """A time-series store. Open once, write many batches, close."""

    name: str = "store"

    @abstractmethod
    def open(self) -> None:
        """Connect and create the database/schema if missing (StoreError if not allowed)."""

    @abstractmethod
    def write(self, messages: Sequence[DeviceMessage]) -> WriteOutcome:
        """Store a batch durably and idempotently; see the module docstring."""

    @abstractmethod
    def telemetry(
        self, device: str, start: float | None = None, end: float | None = None
    ) -> list[TelemetryRow]:
        """Every stored telemetry reading of ``device`` (optionally in [start, end)), by time."""

    @abstractmethod
    def count(self, kind: str, device: str | None = None) -> int:
        """Stored rows of one kind: telemetry readings, features, inference, alert, status."""

    @abstractmethod
    def anomaly_count(self, device: str | None = None) -> int:
        """Stored champion inference rows flagged as anomalies."""

    # -- queries for the API and dashboard (arguments checked by ``queries``) --------------------

    @abstractmethod
    def series(
        self,
        device: str,
        field: str,
        start: float,
        end: float,
        every_s: float = 60.0,
        agg: str = "mean",
    ) -> list[tuple[float, float]]:
        """Channel ``field`` of ``device`` in [start, end), downsampled: one (t, value) per
        interval of ``every_s`` seconds that holds values, ``t`` the interval's start (intervals
        aligned to multiples of ``every_s`` since the epoch), ``agg`` one of mean, min, max."""

    @abstractmethod
    def latest(self, device: str) -> dict:
        """The newest telemetry reading of ``device`` by device time: ``{"time", "seq", "idx",
        "flags", "values"}`` (values without the channels it had no value for); ``{}`` if none."""

    @abstractmethod
    def fleet_aggregates(
        self, profile: str, field: str, start: float | None = None, end: float | None = None
    ) -> dict:
        """``{"mean", "min", "max", "count"}`` of channel ``field`` over every reading of the
        devices of ``profile`` ("" = devices without one) in [start, end); None/0 if none."""

    @abstractmethod
    def anomaly_counts(
        self, start: float | None = None, end: float | None = None
    ) -> dict[str, int]:
        """Champion anomalies per device whose window ended in [start, end) (devices with none
        are left out)."""

    @abstractmethod
    def alert_counts(
        self, start: float | None = None, end: float | None = None
    ) -> dict[str, dict[str, int]]:
        """Alerts per device and severity whose window ended in [start, end)."""

    # -- the dashboard's device page (arguments checked by ``queries``; aggregator/http.py) -----

    @abstractmethod
    def window_series(
        self,
        kind: str,
        device: str,
        field: str,
        start: float,
        end: float,
        every_s: float = 60.0,
        agg: str = "mean",
    ) -> list[tuple[float, float]]:
        """Like ``series``, over windows: feature ``field`` of ``device``'s feature vectors
        (``kind`` "features") or ``field`` ("score", "latency_us") of its champion verdicts
        (``kind`` "inference"), by window end."""

    @abstractmethod
    def recent_alerts(
        self,
        start: float | None = None,
        end: float | None = None,
        device: str | None = None,
        limit: int = 100,
    ) -> list[dict]:
        """Stored alerts whose window ended in [start, end), newest first, at most ``limit``:
        ``{"device", "seq", "time", "profile", "rule", "severity", "value", "message"}``."""

    @abstractmethod
    def model_changes(
        self, device: str, start: float | None = None, end: float | None = None
    ) -> list[tuple[float, str]]:
        """(time, model_version) of the first champion verdict of each model version ``device``
        served in [start, end), by time: where the dashboard marks a model change."""

    @abstractmethod
    def device_fields(self, device: str) -> dict[str, list[str]]:
        """What can be charted for ``device``: ``{"telemetry": channels of its newest reading,
        "features": names of its newest feature vector}`` (empty lists if none stored)."""

    @abstractmethod
    def feature_rows(
        self,
        profile: str,
        start: float | None,
        end: float | None,
        *,
        feature_set: str,
        names: Sequence[str] | None = None,
        exclude_flagged: bool = True,
        limit: int = DEFAULT_FEATURE_LIMIT,
    ) -> FeatureRows:
        """The stored feature vectors of ``profile``'s devices for ``feature_set`` whose window
        ended in [start, end): the newest ``limit`` of them, returned oldest first. With
        ``exclude_flagged`` windows whose quality ``flags`` are non-zero are left out. Columns:
        ``names`` in that order, or the sorted names of the newest row; a row lacking any of the
        columns is left out (see :func:`finish_feature_rows`)."""

    def close(self) -> None:
        """Release connections; the default has nothing to release."""

    def __enter__(self) -> "Store":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
