"""Ingest: broker -> validate -> batched durable write -> MQTT ack -> delivery confirmation.

Two threads. paho's network thread decodes each message through the wire contract (cheap, in
C) and queues it with its message id. The writer thread gathers a batch and flushes it when it
holds ``batch_lines`` readings, when ``ack_threshold`` messages wait for acknowledgement (the
broker stops sending once its in-flight allowance is used, so a batch that waits for more
would never fill), or when the oldest message has waited ``max_delay_s``.

A flush, in this order: quarantine the refused messages durably; write the good ones to the
store (retrying with backoff while the store is down, acknowledging nothing meanwhile, which
bounds memory at the broker's in-flight allowance); quarantine what the store refused; then
acknowledge every message of the batch to the broker; then queue delivery confirmations.
Acknowledging only after the durable write is what makes ingest at-least-once; writing
identical points for a repeat is what makes it exactly-once in the store.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from edgeloop import wire
from edgeloop.mqtt import BrokerAddress, Incoming, MqttLink
from aggregator.confirm import Confirmer
from aggregator.quarantine import Quarantine
from aggregator.registry import Registry
from aggregator.stores.base import Store, StoreError, StoreUnavailable, WriteOutcome

__all__ = ["Ingest", "IngestStats"]

log = logging.getLogger(__name__)


@dataclass
class IngestStats:
    received: int = 0
    stored_messages: int = 0
    stored_readings: int = 0
    quarantined: int = 0
    batches: int = 0
    store_retries: int = 0
    last_batch_s: float = 0.0


@dataclass
class _Item:
    mid: int
    qos: int
    received_at: float
    topic: str
    payload: bytes
    message: wire.DeviceMessage | None
    error: wire.WireError | None


class Ingest:
    def __init__(
        self,
        store: Store,
        address: BrokerAddress | str,
        *,
        client_id: str = "edgeloop-aggregator",
        protocol: str = "auto",
        receive_maximum: int = 1000,
        quarantine: Quarantine,
        registry: Registry,
        share_group: str | None = "edgeloop",
        batch_lines: int = 5000,
        max_delay_s: float = 0.05,
        ack_threshold: int = 500,
        confirm_interval_s: float = 1.0,
    ) -> None:
        self.store = store
        # A stable client id with a persistent session: what the broker holds for us while we
        # restart is delivered when we come back.
        self.link = MqttLink(
            address,
            client_id,
            protocol=protocol,
            max_inflight=1000,
            persistent_session=True,
            manual_ack=True,
            receive_maximum=receive_maximum,
            on_connect=self._on_connect,
            on_message=self._on_message,
        )
        self.quarantine = quarantine
        self.registry = registry
        self.share_group = share_group
        self.batch_lines = batch_lines
        self.max_delay_s = max_delay_s
        self.ack_threshold = ack_threshold
        self.confirmer = Confirmer(self._publish_confirm, confirm_interval_s)
        self.stats = IngestStats()
        self._inbox: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, connect_timeout: float = 15.0) -> None:
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)
        self._writer.start()
        self.link.start(timeout=connect_timeout)

    def diagnostics(self) -> dict:
        return {**vars(self.stats), "connected": self.link.connected, "waiting": self._inbox.qsize(),
                "confirm_pending_devices": self.confirmer.pending_devices, "confirms_sent": self.confirmer.sent,
                "reconnects": self.link.reconnects, "writer_alive": bool(self._writer and self._writer.is_alive())}

    def stop(self, timeout: float = 10.0, forget_session: bool = False) -> None:
        """Stop taking messages, flush what was received (write, ack, confirm), disconnect."""
        (log.warning if self.confirmer.pending_devices or self._inbox.qsize() else log.info)(
            "ingest stopping: %s", self.diagnostics())
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout)
        self.link.stop(forget_session=forget_session)
        self.registry.save()

    # -- paho's thread -------------------------------------------------------------------------

    def _on_connect(self) -> None:
        self.link.subscribe(wire.uplink_filter(self.share_group), qos=1)

    def _on_message(self, msg: Incoming) -> None:
        if not msg.payload and msg.retain and msg.topic.endswith("/status"):
            # Someone cleared a retained status (the documented way to forget a device): not data.
            self.link.ack(msg.mid, msg.qos)
            return
        try:
            decoded, error = wire.decode(msg.topic, msg.payload), None
        except wire.WireError as exc:
            decoded, error = None, exc
        self._inbox.put(_Item(msg.mid, msg.qos, time.time(), msg.topic, msg.payload, decoded, error))

    # -- writer thread -----------------------------------------------------------------------------

    def _write_loop(self) -> None:
        batch: list[_Item] = []
        lines = 0
        oldest = 0.0
        while True:
            stopping = self._stop.is_set()
            try:
                item = self._inbox.get(timeout=0.01)
            except queue.Empty:
                item = None
            if item is not None:
                if not batch:
                    oldest = time.monotonic()
                batch.append(item)
                if isinstance(item.message, wire.Telemetry):
                    lines += len(item.message.readings)
                else:
                    lines += 1
            full = lines >= self.batch_lines or len(batch) >= self.ack_threshold
            late = batch and time.monotonic() - oldest >= self.max_delay_s
            if batch and (full or late or (stopping and item is None)):
                try:
                    flushed = self._flush(batch)
                except Exception:  # a bug must not silently stop ingest: keep the batch, retry
                    log.exception("flush failed; the batch stays unacknowledged and is retried")
                    self.stats.store_retries += 1
                    if self._stop.wait(1.0):
                        return
                    continue
                if not flushed:
                    return  # stopping while the store is down: nothing acked, the broker keeps it
                batch, lines = [], 0
            if self.confirmer.due():
                self.confirmer.flush()
                self.registry.maybe_save()
            if stopping and item is None and not batch:
                self.confirmer.flush()
                return

    def _flush(self, batch: list[_Item]) -> bool:
        started = time.monotonic()
        bad = [(i.topic, i.error.reason, i.error.detail, i.payload) for i in batch if i.error is not None]
        good = [i for i in batch if i.message is not None]
        if bad:
            self.quarantine.add_many(bad)
        outcome = self._write_with_retry([i.message for i in good])
        if outcome is None:
            return False
        refused = {index: reason for index, reason in outcome.rejected}
        if refused:
            self.quarantine.add_many(
                (good[k].topic, "store-refused", reason, good[k].payload) for k, reason in refused.items()
            )
        for item in batch:
            self.link.ack(item.mid, item.qos)
        for k, item in enumerate(good):
            msg = item.message
            if k in refused:
                # Durably held in the quarantine with the store's reason: confirmed as well, or the
                # device would re-send a message no store will ever take until its age limit.
                self.confirmer.stored(msg.device, msg.seq)
                continue
            self.registry.observe(msg, item.received_at)
            if not isinstance(msg, wire.Status):
                self.confirmer.stored(msg.device, msg.seq)
            self.stats.stored_messages += 1
            if isinstance(msg, wire.Telemetry):
                self.stats.stored_readings += len(msg.readings)
        self.stats.received += len(batch)
        self.stats.quarantined += len(bad) + len(refused)
        self.stats.batches += 1
        self.stats.last_batch_s = time.monotonic() - started
        return True

    def _write_with_retry(self, messages):
        if not messages:
            return WriteOutcome()
        delay = 0.1
        while True:
            try:
                return self.store.write(messages)
            except StoreUnavailable as exc:
                self.stats.store_retries += 1
                log.warning("store unavailable (%s); retrying in %.1fs, acknowledging nothing meanwhile", exc, delay)
            except StoreError:
                log.exception("store refused the batch; holding it unacknowledged")
                self.stats.store_retries += 1
            if self._stop.wait(delay):
                return None
            delay = min(delay * 2, 5.0)

    def _publish_confirm(self, topic: str, payload: bytes) -> bool:
        return self.link.publish(topic, payload, qos=1)
