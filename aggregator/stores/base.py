"""The one interface every time-series store implements.

Stores are transports: they turn validated wire messages into rows and do I/O. Batching,
retries, acknowledgement and delivery confirmation live once, above them, in the ingest.

Contract (tests/test_store_contract.py runs it against every store that can run here):

* ``write`` returns only once the batch is durable; a repeat of a message already stored
  (same device and seq) leaves exactly one copy of each row and identical values.
* A message the server refuses on its own merits is reported in ``WriteOutcome.rejected`` with
  the server's reason; everything else in the batch is stored. Nothing is dropped silently.
* ``StoreUnavailable`` means "nothing is known to be stored, try the whole batch again later".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

from edgeloop.wire import DeviceMessage

__all__ = ["StoreError", "StoreUnavailable", "WriteOutcome", "TelemetryRow", "Store"]


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

    def close(self) -> None:
        """Release connections; the default has nothing to release."""

    def __enter__(self) -> "Store":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
