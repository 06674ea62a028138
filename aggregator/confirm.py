"""Delivery confirmations: tell each device which of its sequence numbers are durably stored.

The ingest calls :meth:`Confirmer.stored` after every durable write and :meth:`Confirmer.flush`
about once a second; each device then gets one ``Confirm`` message with merged inclusive ranges.
Several aggregators in one shared-subscription group each confirm what they themselves stored.
A confirmation that cannot be published now (link down, window full) stays pending and goes
out with the next flush; a lost one only makes the device re-send, which is harmless.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable

from edgeloop import wire

__all__ = ["Confirmer"]


class Confirmer:
    def __init__(self, publish: Callable[[str, bytes], bool], interval_s: float = 1.0) -> None:
        self._publish = publish
        self.interval_s = interval_s
        self._pending: dict[str, list] = defaultdict(list)
        self._last_flush = time.monotonic()
        self.sent = 0

    def stored(self, device: str, seq: int) -> None:
        self._pending[device].append(seq)

    def due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return bool(self._pending) and now - self._last_flush >= self.interval_s

    def flush(self) -> int:
        """Publish one Confirm per device with pending sequence numbers; returns how many went out."""
        self._last_flush = time.monotonic()
        sent = 0
        for device in list(self._pending):
            ranges = wire.merge_ranges(self._pending[device])
            msg = wire.Confirm(v=wire.SCHEMA_VERSION, device=device, ranges=ranges, ts=time.time())
            if self._publish(wire.confirm_topic(device), wire.encode(msg)):
                del self._pending[device]
                sent += 1
            else:
                self._pending[device] = [tuple(r) for r in ranges]  # keep them compact meanwhile
        self.sent += sent
        return sent

    @property
    def pending_devices(self) -> int:
        return len(self._pending)
