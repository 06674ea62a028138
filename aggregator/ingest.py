"""Ingest: broker -> validate -> batched durable write -> MQTT ack -> delivery confirmation.

paho's network thread decodes each message through the wire contract (cheap, in C) and queues
it with its message id. The writer thread gathers a batch and flushes it when it holds
``batch_lines`` readings, when ``ack_threshold`` messages wait for acknowledgement (the broker
stops sending once its in-flight allowance is used, so a batch that waits for more would never
fill), or when the oldest message has waited ``max_delay_s``.

A flush, in this order: quarantine the refused messages durably; hand the good ones to a pool of
``writes_in_flight`` store threads, which encode and write them (retrying with backoff while the
store is down, acknowledging nothing meanwhile, which bounds memory at the broker's in-flight
allowance). Writes overlap: InfluxDB's answer to one write is mostly fsync latency, during which
the next batch is encoded and sent (measured in bench/, see BENCHMARKS.md). When the oldest write
in flight has finished, the writer thread quarantines what the store refused, acknowledges every
message of that batch to the broker, and queues delivery confirmations; batches complete strictly
in arrival order, because brokers (the embedded one) disconnect a client that acknowledges out of
order. Stores must therefore accept ``write`` from several threads (both stores here do).
Acknowledging only after the durable write is what makes ingest at-least-once; writing
identical points for a repeat is what makes it exactly-once in the store.

Chunk requests (``dev/{device}/chunkreq``, model distribution) are not data: a valid one is
handed to :attr:`Ingest.chunk_requests` at once (the distributor only queues the re-send) and
acknowledged in order with its batch, never stored; a malformed one is quarantined with its
reason. :attr:`Ingest.observers` see every newly stored message once its batch is durable (the
rollout manager follows inference and deployment messages through them).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

from edgeloop import wire
from edgeloop.wire_models import ChunkRequest, decode_chunk_request
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
    repeats_skipped: int = 0  # already stored (a re-send or redelivery): confirmed, not rewritten
    shed: int = 0  # acknowledged and dropped while over ``max_waiting``: the device re-sends them
    chunk_requests: int = 0  # valid model chunk requests handed on (acknowledged, not stored)
    observer_errors: int = 0  # observer calls that raised (logged; ingest goes on)


@dataclass(slots=True)
class _Item:
    mid: int
    qos: int
    received_at: float
    topic: str
    payload: bytes
    message: wire.DeviceMessage | None
    error: wire.WireError | None


@dataclass(slots=True)
class _Write:
    """A batch whose store write is in flight."""

    batch: list[_Item]
    good: list[_Item]  # the batch minus what failed to decode (those are quarantined already)
    written: list[_Item]  # good minus what this aggregator has stored already
    bad: int
    started: float
    future: Future | None


_WAKE = object()  # put in the inbox when a write completes, so the writer acknowledges at once


class Ingest:
    def __init__(
        self,
        store: Store,
        address: BrokerAddress | str,
        *,
        client_id: str = "edgeloop-aggregator",
        protocol: str = "auto",
        receive_maximum: int = 1000,
        session_expiry_s: int = 300,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        quarantine: Quarantine,
        registry: Registry,
        share_group: str | None = "edgeloop",
        batch_lines: int = 5000,
        max_delay_s: float = 0.05,
        ack_threshold: int = 500,
        confirm_interval_s: float = 1.0,
        writes_in_flight: int = 8,
        max_waiting: int | None = None,
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
            session_expiry_s=session_expiry_s,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
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
        self.writes_in_flight = max(1, writes_in_flight)
        #: Messages held unacknowledged at most; past it new ones are shed (see _on_message).
        self.max_waiting = max_waiting or 4 * receive_maximum
        #: How long paho's thread waits for room before shedding (well under the keep-alive).
        self.block_s = 5.0
        self.confirmer = Confirmer(self._publish_confirm, confirm_interval_s)
        self.stats = IngestStats()
        self._inbox: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        #: Called in paho's thread with each valid ChunkRequest (must not block); None ignores them.
        self.chunk_requests: Callable[[ChunkRequest], object] | None = None
        #: Called in the writer thread with (message, received_at) for every newly stored message
        #: (and status) after its batch is durable; one that raises is logged and counted.
        self.observers: list[Callable[[wire.DeviceMessage, float], None]] = []
        #: Called in paho's thread after every (re)connect, after the subscription (must not block).
        self.on_connect_hooks: list[Callable[[], None]] = []
        self._oldest_waiting: float | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, connect_timeout: float = 15.0) -> None:
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)
        self._writer.start()
        self.link.start(timeout=connect_timeout)

    def lag_seconds(self) -> float:
        """Age of the oldest received message not yet durably stored and acknowledged (0: none).
        It grows while the store is down or slow: the number to alert on (``/metrics``)."""
        oldest = self._oldest_waiting
        return max(0.0, time.time() - oldest) if oldest is not None else 0.0

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
        for hook in self.on_connect_hooks:
            try:
                hook()
            except Exception:
                log.exception("on_connect hook %r failed", hook)

    def _on_message(self, msg: Incoming) -> None:
        if not msg.payload and msg.retain and msg.topic.endswith("/status"):
            # Someone cleared a retained status (the documented way to forget a device): not data.
            self.link.ack(msg.mid, msg.qos)
            return
        if self._inbox.qsize() >= self.max_waiting and not self._room(self.block_s):
            # Over our own bound for a while (a broker may send past its in-flight allowance:
            # Mosquitto 2.0.11 did after a store outage): acknowledge and drop. Nothing is lost:
            # the device hears no confirmation for it and re-sends it later.
            self.link.ack(msg.mid, msg.qos)
            self.stats.shed += 1
            return
        if msg.topic.endswith("/chunkreq"):
            self._inbox.put(self._chunk_request(msg))
            return
        try:
            decoded, error = wire.decode(msg.topic, msg.payload), None
        except wire.WireError as exc:
            decoded, error = None, exc
        self._inbox.put(_Item(msg.mid, msg.qos, time.time(), msg.topic, msg.payload, decoded, error))

    def _chunk_request(self, msg: Incoming) -> _Item:
        """Hand a chunk request on now; the item (no message) only carries its acknowledgement,
        or its error to the quarantine."""
        try:
            req, error = decode_chunk_request(msg.payload, msg.topic), None
        except wire.WireError as exc:
            req, error = None, exc
        except ValueError as exc:  # chunkreq_topic refuses the device id the payload names
            req, error = None, wire.WireError("device-mismatch", str(exc)[:300])
        if req is not None:
            self.stats.chunk_requests += 1
            if self.chunk_requests is not None:
                try:
                    self.chunk_requests(req)
                except Exception:
                    log.exception("chunk request handler failed for %s", msg.topic)
        return _Item(msg.mid, msg.qos, time.time(), msg.topic, msg.payload, None, error)

    def _room(self, timeout: float) -> bool:
        """Back-pressure: hold paho's thread (so it reads no more from the broker) until the
        writer has made room, for at most ``timeout`` seconds (keep-alives must still go out)."""
        deadline = time.monotonic() + timeout
        while self._inbox.qsize() >= self.max_waiting:
            if time.monotonic() >= deadline or self._stop.is_set():
                return False
            time.sleep(0.002)
        return True

    # -- writer thread -----------------------------------------------------------------------------

    def _write_loop(self) -> None:
        pool = ThreadPoolExecutor(self.writes_in_flight, thread_name_prefix="ingest-store")
        try:
            self._batch_loop(pool)
        finally:
            pool.shutdown(wait=True)

    def _batch_loop(self, pool: ThreadPoolExecutor) -> None:
        batch: list[_Item] = []
        pending: deque[_Write] = deque()  # writes in flight, oldest first: acks go in this order
        lines = 0
        oldest = 0.0
        get = self._inbox.get
        while True:
            # For lag_seconds(): the oldest message not yet acknowledged (a write in flight is
            # older than the batch being built, which is older than anything still in the inbox).
            head = pending[0].batch if pending else batch
            self._oldest_waiting = head[0].received_at if head else None
            stopping = self._stop.is_set()
            while pending and pending[0].future.done():
                if not self._complete(pending, pool):
                    return  # stopping while the store is down: nothing acked, the broker keeps it
            try:
                item = get(timeout=0.01)
            except queue.Empty:
                item = None
            if item is not None and item is not _WAKE:  # _WAKE: a write finished, look again
                if not batch:
                    oldest = time.monotonic()
                batch.append(item)
                message = item.message
                lines += len(message.readings) if type(message) is wire.Telemetry else 1
            full = lines >= self.batch_lines or len(batch) >= self.ack_threshold
            late = batch and time.monotonic() - oldest >= self.max_delay_s
            if batch and (full or late or (stopping and item is None)):
                while len(pending) >= self.writes_in_flight:
                    wait([pending[0].future])
                    if not self._complete(pending, pool):
                        return
                try:
                    pending.append(self._submit(batch, pool))
                except Exception:  # a bug must not silently stop ingest: keep the batch, retry
                    log.exception("flush failed; the batch stays unacknowledged and is retried")
                    self.stats.store_retries += 1
                    if self._stop.wait(1.0):
                        return
                    continue
                batch, lines = [], 0
            if self.confirmer.due():
                self.confirmer.flush()
                self.registry.maybe_save()
            if stopping and item is None and not batch:
                while pending:
                    wait([pending[0].future])
                    if not self._complete(pending, pool):
                        return
                self.confirmer.flush()
                return

    def _submit(self, batch: list[_Item], pool: ThreadPoolExecutor) -> _Write:
        """Quarantine the refused messages durably, then start the store write in the pool."""
        bad = [(i.topic, i.error.reason, i.error.detail, i.payload) for i in batch if i.error is not None]
        # Items with neither message nor error are chunk requests: acknowledged, not stored.
        good = [i for i in batch if i.message is not None]
        if bad:
            self.quarantine.add_many(bad)
        has = self.registry.has_stored
        written = [i for i in good if type(i.message) is wire.Status or not has(i.message.device, i.message.seq)]
        self.stats.repeats_skipped += len(good) - len(written)
        write = _Write(batch, good, written, len(bad), time.monotonic(), None)
        write.future = self._start_write(pool, written)
        return write

    def _start_write(self, pool: ThreadPoolExecutor, good: list[_Item]) -> Future:
        future = pool.submit(self._write_with_retry, [i.message for i in good])
        future.add_done_callback(self._wake)  # the writer acknowledges at once, not at its next poll
        return future

    def _wake(self, _future: Future) -> None:
        self._inbox.put(_WAKE)

    def _complete(self, pending: deque[_Write], pool: ThreadPoolExecutor) -> bool:
        """Finish the oldest write (done): quarantine what the store refused, acknowledge the
        batch, queue confirmations. False when it gave up because ingest is stopping."""
        write = pending[0]
        try:
            outcome = write.future.result()
        except Exception:  # a bug must not silently stop ingest: keep the batch, retry
            log.exception("store write failed; the batch stays unacknowledged and is retried")
            self.stats.store_retries += 1
            if self._stop.wait(1.0):
                return False
            write.future = self._start_write(pool, write.written)
            return True
        if outcome is None:
            return False
        pending.popleft()
        batch, good, written = write.batch, write.good, write.written
        refused = {id(written[index]): reason for index, reason in outcome.rejected}
        if refused:
            self.quarantine.add_many(
                (written[k].topic, "store-refused", reason, written[k].payload) for k, reason in outcome.rejected
            )
        ack = self.link.ack
        for item in batch:
            ack(item.mid, item.qos)
        stats = self.stats
        observe, stored = self.registry.observe, self.confirmer.stored
        readings = 0
        for item in good:
            msg = item.message
            if refused and id(item) in refused:
                # Durably held in the quarantine with the store's reason: confirmed as well, or the
                # device would re-send a message no store will ever take until its age limit; and
                # accounted for, or the registry would count its number as lost.
                observe(msg, item.received_at)
                stored(msg.device, msg.seq)
                continue
            observe(msg, item.received_at)
            kind = type(msg)
            if kind is wire.Telemetry:
                readings += len(msg.readings)
            if kind is not wire.Status:
                stored(msg.device, msg.seq)
        if self.observers:
            self._notify([i for i in written if id(i) not in refused] if refused else written)
        stats.stored_messages += len(good) - len(refused)
        stats.stored_readings += readings
        stats.received += len(batch)
        stats.quarantined += write.bad + len(refused)
        stats.batches += 1
        stats.last_batch_s = time.monotonic() - write.started
        return True

    def _notify(self, items: list[_Item]) -> None:
        for item in items:
            for observer in self.observers:
                try:
                    observer(item.message, item.received_at)
                except Exception:
                    self.stats.observer_errors += 1
                    if self.stats.observer_errors <= 10 or self.stats.observer_errors % 1000 == 0:
                        log.exception("ingest observer %r failed (%d failures so far)", observer,
                                      self.stats.observer_errors)

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
