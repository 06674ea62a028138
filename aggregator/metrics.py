"""Prometheus metrics for one aggregator, read from its live objects at scrape time.

:class:`AggregatorCollector` keeps no counters of its own: every scrape reads the ingest's
:class:`~aggregator.ingest.IngestStats` and ``diagnostics()``, the quarantine's per-reason
counts and the registry's device states, so the numbers cannot drift from what the service
itself reports. Each :class:`~aggregator.service.Aggregator` registers one collector on a
private :class:`~prometheus_client.CollectorRegistry` (:func:`make_registry`), never on the
process-wide default, so several aggregators in one process (tests, the demo) stay apart.

Exported families (``_total`` is appended to counters by the exposition format):

=======================================  =======  =============================================
``edgeloop_ingest_messages_received``    counter  messages taken from the broker and flushed
``edgeloop_ingest_messages_stored``      counter  messages durably written to the store
``edgeloop_ingest_readings_stored``      counter  telemetry readings durably written
``edgeloop_ingest_quarantined``          counter  quarantined messages, label ``reason``
``edgeloop_ingest_batches``              counter  flushed batches
``edgeloop_store_retries``               counter  store writes retried (unavailable or refused)
``edgeloop_ingest_last_batch_seconds``   gauge    duration of the last flush
``edgeloop_ingest_waiting_messages``     gauge    decoded messages waiting for the writer
``edgeloop_ingest_lag_seconds``          gauge    age of the oldest waiting message (see below)
``edgeloop_confirmations_sent``          counter  delivery confirmations published to devices
``edgeloop_confirm_pending_devices``     gauge    devices with stored but unconfirmed messages
``edgeloop_mqtt_connected``              gauge    1 while the ingest link is connected
``edgeloop_mqtt_reconnects``             counter  reconnections of the ingest link
``edgeloop_devices``                     gauge    registry devices, label ``state``
=======================================  =======  =============================================

``edgeloop_ingest_lag_seconds`` is ``Ingest.lag_seconds()``: the age of the oldest message
received but not yet durably stored and acknowledged (0 when none waits). It climbs through a
store outage and falls back once the backlog is written: the number to alert on.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from aggregator.service import Aggregator

__all__ = ["AggregatorCollector", "make_registry", "DEVICE_STATES"]

# Always exported, at 0 when no device is in that state, so dashboards need no absent() guards.
DEVICE_STATES = ("online", "offline", "unknown")


class AggregatorCollector(Collector):
    """Reads one aggregator's ingest, quarantine and registry at every scrape."""

    def __init__(self, aggregator: "Aggregator") -> None:
        self._agg = aggregator

    def collect(self) -> Iterator[Metric]:
        ingest = self._agg.ingest
        stats = ingest.stats
        diag = ingest.diagnostics()

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"edgeloop_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"edgeloop_{name}", doc, value=value)

        yield counter("ingest_messages_received", "Messages taken from the broker and flushed.", stats.received)
        yield counter("ingest_messages_stored", "Messages durably written to the store.", stats.stored_messages)
        yield counter("ingest_readings_stored", "Telemetry readings durably written to the store.", stats.stored_readings)
        quarantined = CounterMetricFamily(
            "edgeloop_ingest_quarantined", "Messages quarantined, by reason.", labels=["reason"]
        )
        for reason, count in sorted(Counter(self._agg.quarantine.counts).items()):
            quarantined.add_metric([reason], count)
        yield quarantined
        yield counter("ingest_batches", "Batches flushed by the ingest writer.", stats.batches)
        yield counter("store_retries", "Store writes retried because the store was down or refused.", stats.store_retries)
        yield gauge("ingest_last_batch_seconds", "Duration of the last flush (write, ack, confirm).", stats.last_batch_s)
        yield gauge("ingest_waiting_messages", "Decoded messages waiting for the writer.", diag.get("waiting", 0))
        lag = getattr(ingest, "lag_seconds", None)
        if callable(lag):
            yield gauge("ingest_lag_seconds", "Age of the oldest message waiting for the writer, 0 if none.", lag())
        yield counter("confirmations_sent", "Delivery confirmations published to devices.", diag.get("confirms_sent", 0))
        yield gauge("confirm_pending_devices", "Devices with stored but not yet confirmed messages.",
                    diag.get("confirm_pending_devices", 0))
        yield gauge("mqtt_connected", "1 while the ingest's MQTT link is connected.", 1 if diag.get("connected") else 0)
        yield counter("mqtt_reconnects", "Reconnections of the ingest's MQTT link.", diag.get("reconnects", 0))
        states = Counter(record.state for record in self._agg.registry.devices())
        devices = GaugeMetricFamily("edgeloop_devices", "Devices in the fleet registry, by state.", labels=["state"])
        for state in sorted(set(DEVICE_STATES) | set(states)):
            devices.add_metric([state], states.get(state, 0))
        yield devices


def make_registry(aggregator: "Aggregator") -> CollectorRegistry:
    """A private registry holding only this aggregator's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AggregatorCollector(aggregator))
    return registry
