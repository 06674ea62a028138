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
* Reads (``series``, ``latest``, ``fleet_aggregates``, ``anomaly_counts``, ``alert_counts``)
  check their arguments with ``queries`` (ValueError naming the parameter) and answer the same
  on every store. Times are seconds since the epoch, ranges ``[start, end)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

from edgeloop.wire import DeviceMessage

__all__ = [
    "FLAG_TIME_ADJUSTED",
    "StoreError",
    "StoreUnavailable",
    "WriteOutcome",
    "TelemetryRow",
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

    def close(self) -> None:
        """Release connections; the default has nothing to release."""

    def __enter__(self) -> "Store":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
