"""The agent's run loop: sample -> batch -> window features -> model -> outbox -> MQTT.

One thread runs the loop and owns the outbox; paho's network thread only hands confirmations
and connection events over through a queue. Nothing leaves the device without first being in
the outbox, and nothing leaves the outbox until the aggregator confirms it (see outbox.py).

Sampling runs on a monotonic schedule (``start + i / rate``), so it does not drift over hours.
Readings carry the wall-clock time at which they were taken; a simulated device with
``speed > 1`` runs its own clock faster instead.

Models pushed over MQTT (:class:`edge_agent.updates.ModelUpdates`) ride the same event path:
paho's thread only decodes and queues, and the loop thread writes chunks, installs, and swaps
the champion or shadow between two samples, reporting each step as a ``deployment`` message
through the outbox.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import msgspec
import numpy as np

from edgeloop import wire
from edgeloop.mqtt import MqttLink, parse_mqtt_url
from edge_agent import memory, quality
from edge_agent.clock import ClockWatch
from edge_agent.config import AgentConfig
from edge_agent.outbox import Outbox
from edge_agent.rules import Rules
from edge_agent.updates import ModelUpdates
from models import features

__all__ = ["Agent", "AgentStats", "ModelUpdates"]

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"


@dataclass
class AgentStats:
    samples: int = 0
    missed_samples: int = 0
    readings_accepted: int = 0
    readings_kept_local: int = 0
    messages_accepted: int = 0
    windows: int = 0
    inferences: int = 0
    anomalies: int = 0
    confirmed: int = 0
    shadow_inferences: int = 0
    alerts: int = 0
    #: The latest inference latencies (bounded: an agent runs for months).
    inference_us: deque = field(default_factory=lambda: deque(maxlen=1000))


class Agent:
    """One device. ``run(stop)`` blocks until ``stop`` is set; ``drain()`` waits for confirmations."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        source=None,
        model=None,
        on_accept: Callable[[wire.Struct], None] | None = None,
    ) -> None:
        self.config = config
        self.device = config.device_id
        self.state_dir = config.state_dir()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if source is None:
            from edge_agent.sources import create_source

            source = create_source(config.source.name, dict(config.source.options))
            if config.source.name not in ("simulated", "composite"):  # composite guards its parts itself
                from edge_agent.sources.guard import GuardedSource

                # A hung or failing sensor yields None for its channels; it never stalls the sampler.
                source = GuardedSource(source, timeout_s=min(1.0, 0.5 / config.sampling.rate_hz))
        self.source = source
        self.channels = tuple(source.channels)
        self.model = model
        self.shadow = None  # a challenger scored on the same windows, reported with role "shadow"
        if model is None and config.model_dir:
            from edge_agent.inference import Model

            # A model that expects other features than this agent computes is refused here.
            self.model = Model.load(config.model_dir, feature_set=features.FEATURE_SET,
                                    feature_names=features.feature_names(self.channels))
        self.on_accept = on_accept
        self._quality = quality.QualityChecker(self.channels, config.quality, period_s=1.0 / config.sampling.rate_hz)
        self._clock = ClockWatch(config.clock_step_s)
        self._rules = Rules(config.rules) if config.rules.rules else None
        self._window_flags = 0
        self.stats = AgentStats()
        self._events: queue.Queue = queue.Queue()
        self._outbox: Outbox | None = None
        self._link: MqttLink | None = None
        self._started = time.monotonic()
        self._batch: list[wire.Reading] = []
        self._window_t: list[float] = []
        self._window_v: list[list[float]] = []
        self._index = 0  # sample number, continuous across re-schedules
        self._reschedule = True
        self._status_at = float("-inf")
        self._config_revision = 0
        self._config_rejected: dict[str, str] = {}
        self._local = None  # raw readings kept on the device in privacy mode
        self._dropped: list[tuple[int, int]] = []  # the outbox's drops, refreshed by the loop
        self._dropped_seen = 0
        #: Models pushed over MQTT; None for a device without a profile (no model topics then).
        self.updates = ModelUpdates(self) if config.profile else None
        if self.updates is not None:
            self.updates.restore()  # an OTA-installed champion (and shadow) serves again after a restart

    # -- wiring ------------------------------------------------------------------------------------

    def _open(self) -> None:
        ob = self.config.outbox
        self._outbox = Outbox(
            self.state_dir / "outbox.sqlite",
            max_bytes=ob.max_bytes,
            max_age_s=ob.max_age_s,
            resend_after_s=ob.resend_after_s,
            max_unconfirmed=ob.max_unconfirmed,
            synchronous=ob.synchronous,
        )
        self._dropped, self._dropped_seen = self._outbox.dropped_ranges(), self._outbox.dropped_total
        m = self.config.mqtt
        from edgeloop.config import resolve_secret

        password = resolve_secret(m.password, m.password_file, "MQTT password")
        address = parse_mqtt_url(m.url).with_credentials(m.username, password)
        will = wire.encode(self._status("offline"))
        self._link = MqttLink(
            address,
            client_id=f"edgeloop-dev-{self.device}",
            protocol=m.protocol,
            max_inflight=m.max_inflight,
            keepalive=m.keepalive_s,
            will=(wire.topic(self.device, "status"), will, 1, True),
            ca_file=m.ca_file,
            cert_file=m.cert_file,
            key_file=m.key_file,
            on_connect=lambda: self._events.put(("connected", None)),
            on_message=self._on_message,
        )

    def _on_message(self, msg) -> None:  # paho's thread: hand over, never touch the outbox here
        try:
            if msg.topic == wire.confirm_topic(self.device):
                self._events.put(("confirm", wire.decode_confirm(msg.payload, msg.topic)))
            elif msg.topic == wire.config_topic(self.device) and msg.payload:
                self._events.put(("config", wire.decode_config(msg.payload, msg.topic)))
            elif self.updates is not None and (event := self.updates.classify(msg)) is not None:
                self._events.put(event)
        except wire.WireError as exc:
            log.warning("%s: ignoring a bad message on %s: %s", self.device, msg.topic, exc)
            if msg.topic == wire.config_topic(self.device):
                self._events.put(("config-error", exc))

    def _apply_config(self, desired: wire.DesiredConfig) -> None:
        """Apply a desired-config revision once; report what was applied and refused in the status."""
        if desired.revision <= self._config_revision:
            return
        from edge_agent.remote_config import apply_settings

        before = self.config.sampling
        self.config, applied, rejected = apply_settings(self.config, dict(desired.settings))
        self._config_revision, self._config_rejected = desired.revision, rejected
        if self.config.sampling != before:
            self._reschedule = True
        log.info("%s: config revision %d applied %s, refused %s", self.device, desired.revision, applied, rejected)
        self._publish_status()

    def _publish_status(self) -> None:
        if self._link is not None and self._link.publish(
            wire.topic(self.device, "status"), wire.encode(self._status("online")), 1, True
        ):
            self._status_at = time.monotonic()

    # -- run ----------------------------------------------------------------------------------------

    # Simulation hooks: simulators.fleet sets them on an agent before open(); a device leaves them be.
    #: A shared :class:`edgeloop.netloop.NetworkLoop` to drive the MQTT link (None: its own thread).
    network_loop = None
    #: Stamp readings on the sampling schedule (start + k / rate) even at speed 1, not time.time().
    simulated_clock = False
    #: Added to every reading's time from the next sample on: a simulated wall-clock step.
    clock_offset_s = 0.0
    #: A late step may take up to this many real seconds of samples it missed (a simulated source can
    #: be read in the past; a real sensor cannot, so a device counts them as missed instead).
    catch_up_s = 0.0
    #: Gives freed heap back to the kernel now and then (one schedule per process, see memory.py).
    memory_trim: memory.PeriodicTrim = memory.PROCESS_TRIM

    def run(self, stop: threading.Event, *, drain_timeout: float = 0.0, connect_timeout: float = 5.0) -> bool:
        """Sample and publish until ``stop`` is set, then keep delivering for up to ``drain_timeout``
        seconds until the cloud has confirmed everything. Returns True if the outbox is empty;
        whatever is unconfirmed stays on disk for the next run either way.

        The same as :meth:`open`, :meth:`step` until ``stop``, then :meth:`close`; a simulated fleet
        calls those itself to step many agents from one thread (``simulators/fleet.py``)."""
        self.open(connect_timeout=connect_timeout)
        try:
            self._loop(stop)
        except BaseException:
            self._close()
            raise
        return self.close(drain_timeout)

    def open(self, *, connect_timeout: float = 5.0) -> None:
        """Open the outbox and start connecting. A broker that does not answer within
        ``connect_timeout`` is no reason not to sample: the link keeps trying in the background.
        A broker that refuses us raises :class:`edgeloop.mqtt.MqttError` (a configuration error).
        The thread that calls open() must make every later call: the outbox is SQLite."""
        self._open()
        assert self._link is not None and self._outbox is not None
        if self.network_loop is not None:
            self._link.network_loop = self.network_loop
        self._plan: tuple | None = None  # (period, device_step, batch_n, window_n, start_mono, start_wall)
        self._k = 0  # samples taken on the current plan
        self._last_base: float | None = None  # time of the last sample before clock_offset_s
        self._sampling_done = False
        try:
            self._link.start(timeout=connect_timeout, require=False)
        except BaseException:
            self._close()
            raise

    def step(self, now: float | None = None, *, max_idle: float = 0.05) -> float:
        """Take every sample that is due at monotonic time ``now``, then service the outbox and the
        link once (confirmations, reconnects, refilling the MQTT window). Returns the monotonic time
        at which the agent next needs a step: its next sample, or ``now + max_idle`` if sooner, so
        that confirmations and the window are handled even between slow samples."""
        now = time.monotonic() if now is None else now
        if self._reschedule or self._plan is None:  # at start, and whenever remote config changed the sampling
            self._reschedule = False
            s = self.config.sampling
            device_step = 1.0 / s.rate_hz  # device-clock seconds between samples
            start_wall = time.time() if self._last_base is None else self._last_base + device_step
            self._plan = (1.0 / (s.rate_hz * s.speed), device_step, max(1, round(s.batch_s * s.rate_hz)),
                          max(2, round(s.window_s * s.rate_hz)), now, start_wall)
            self._k = 0
        period, device_step, batch_n, window_n, start_mono, start_wall = self._plan
        due = int((now - start_mono) / period) + 1
        k = self._k
        if due - k > max(2, int(self.catch_up_s / period)):  # the loop stalled: sensors cannot be read in the past
            self.stats.missed_samples += due - k - 1
            k = due - 1
        scheduled = self.simulated_clock or self.config.sampling.speed != 1.0
        while k < due:
            self._last_base = start_wall + k * device_step if scheduled else time.time()
            self._sample(self._index, self._last_base + self.clock_offset_s, batch_n, window_n)
            self._index += 1
            k += 1
        self._k = k
        self._service()
        return min(start_mono + k * period, now + max_idle)

    def finish_sampling(self) -> None:
        """Stop sampling: the readings of a partly filled batch go to the outbox now."""
        if not self._sampling_done:
            self._sampling_done = True
            self._flush_batch()

    def deliver(self) -> bool:
        """One delivery pass without sampling (handle confirmations, refill the window); True once
        the outbox is empty, i.e. the cloud has confirmed everything."""
        self._service()
        return self._outbox.depth == 0

    def close(self, drain_timeout: float = 0.0) -> bool:
        """Stop sampling, keep delivering for up to ``drain_timeout`` seconds until the outbox is
        confirmed, then say "offline" and close. Returns True if the outbox is empty."""
        try:
            self.finish_sampling()
            deadline = time.monotonic() + drain_timeout
            while not self.deliver() and time.monotonic() < deadline:
                time.sleep(0.02)
            if self._outbox.depth:
                log.warning("%s: %d messages still unconfirmed after the drain: %s", self.device,
                            self._outbox.depth, self.diagnostics())
            return self._outbox.depth == 0
        finally:
            self._close()

    def diagnostics(self) -> dict:
        """Delivery state, for status pages and for tests that must say why something did not drain."""
        link, ob = self._link, self._outbox
        return {
            "connected": bool(link and link.connected),
            "inflight": link.inflight if link else 0,
            "window_free": link.window_free if link else 0,
            "reconnects": link.reconnects if link else 0,
            "published": link.published if link else 0,
            "outbox_depth": ob.depth if ob else 0,
            "unconfirmed_sent": ob.unconfirmed_sent if ob else 0,
            "confirmed": self.stats.confirmed,
        }

    @property
    def dropped_ranges(self) -> list[tuple[int, int]]:
        """Sequence ranges the outbox's drop policy removed, as of the loop's last pass."""
        return list(self._dropped)

    @property
    def outbox_depth(self) -> int:
        return self._outbox.depth if self._outbox is not None else 0

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            due = self.step()
            stop.wait(max(due - time.monotonic(), 0.0))
        self.finish_sampling()

    def _service(self) -> None:
        """Handle confirmations and reconnects, then fill the MQTT window from the outbox."""
        ob, link = self._outbox, self._link
        while True:
            try:
                event, payload = self._events.get_nowait()
            except queue.Empty:
                break
            if event == "confirm":
                self.stats.confirmed += ob.confirm(payload.ranges)
            elif event == "model":
                role, model = payload
                if role == "champion":
                    self.model = model
                else:
                    self.shadow = model
                self._publish_status()
            elif event == "promote" and self.shadow is not None:
                self.model, self.shadow = self.shadow, None
                self._publish_status()
            elif event == "config":
                self._apply_config(payload)
            elif event == "config-error":  # the whole message was unreadable: say so in the status
                self._config_rejected = {"message": str(payload)[:300]}
                self._publish_status()
            elif event in ModelUpdates.EVENTS:
                self.updates.handle(event, payload)
            elif event == "connected":
                link.subscribe(wire.confirm_topic(self.device), qos=1)
                link.subscribe(wire.config_topic(self.device), qos=1)
                if self.updates is not None:
                    for topic_filter in self.updates.subscriptions():
                        link.subscribe(topic_filter, qos=1)
                ob.replay()
                self._publish_status()
        if self.updates is not None and self.updates.wanted:
            self.updates.tick(time.monotonic())
        if ob.dropped_total != self._dropped_seen:  # the policy dropped something: tell the cloud now
            self._dropped_seen = ob.dropped_total
            self._dropped = ob.dropped_ranges()
            self._publish_status()
        now = time.monotonic()
        if now - self._status_at >= self.config.status_interval_s:
            self._publish_status()
        self.memory_trim.maybe(now)
        free = link.window_free
        if free:
            for entry in ob.due(free):
                if not link.publish(wire.topic(self.device, entry.kind), entry.payload, qos=1):
                    break
                ob.mark_sent(entry.seq)

    # -- sampling, batching, windows ------------------------------------------------------------------

    def _sample(self, i: int, t: float, batch_n: int, window_n: int) -> None:
        raw = list(self.source.read(i, t))
        flags = self._quality.check(t, raw)
        if self.simulated_clock or self.config.sampling.speed != 1.0:
            # A simulated device clock runs on the sampling schedule (speed x faster than the
            # monotonic clock when accelerated): that schedule is its "monotonic" time, and a step
            # is what clock_offset_s added on top (FleetRunner.clock_step). self._last_base is
            # t - clock_offset_s as step() computed t, even if another thread moved the offset since.
            step = self._clock.observe(self._last_base, t)
        else:
            step = self._clock.observe(time.monotonic(), time.time())
        if step is not None:
            flags |= quality.CLOCK_STEP
            log.warning("%s: wall clock stepped by %+.3f s; readings flagged", self.device, step)
        # The contract carries finite numbers only; the quality flags already say what was wrong.
        values = [v if v is None or math.isfinite(v) else None for v in raw]
        self.stats.samples += 1
        self._window_flags |= flags
        self._batch.append(wire.Reading(t, values, flags))
        if len(self._batch) >= batch_n:
            self._flush_batch()
        self._window_t.append(t)
        self._window_v.append([np.nan if v is None else v for v in values])
        if len(self._window_t) >= window_n:
            self._close_window()

    def _flush_batch(self) -> None:
        if not self._batch:
            return
        readings, self._batch = self._batch, []
        if self.config.privacy:  # raw readings stay on the device
            if self._local is None:
                from edge_agent.localstore import LocalReadings

                self._local = LocalReadings(self.state_dir / "readings.sqlite")
            self._local.add(self.channels, readings)
            self.stats.readings_kept_local += len(readings)
            return
        for part in self._fit_payload(readings):
            self._append("telemetry", lambda seq, part=part: wire.Telemetry(
                v=wire.SCHEMA_VERSION, device=self.device, seq=seq, ts=time.time(),
                profile=self.config.profile, channels=list(self.channels), readings=part,
            ))
            self.stats.readings_accepted += len(part)

    def _fit_payload(self, readings: list[wire.Reading]) -> list[list[wire.Reading]]:
        """Split a batch so that each message fits the broker's (and the contract's) payload limit."""
        limit = min(self.config.mqtt.max_payload, wire.MAX_PAYLOAD_BYTES) - 256  # headroom for seq/ts digits
        # A float or null takes at most 24 characters in JSON: most batches are far below the
        # limit, so only those that might not be are encoded here (then again in the outbox).
        if len(readings) * (26 * len(self.channels) + 40) + 70 * len(self.channels) + 200 <= limit:
            return [readings]
        probe = wire.Telemetry(v=wire.SCHEMA_VERSION, device=self.device, seq=2**62, ts=time.time(),
                               profile=self.config.profile, channels=list(self.channels), readings=readings)
        if len(wire.encode(probe)) <= limit or len(readings) == 1:
            return [readings]
        half = len(readings) // 2
        return self._fit_payload(readings[:half]) + self._fit_payload(readings[half:])

    def _close_window(self) -> None:
        t = np.asarray(self._window_t)
        window = np.asarray(self._window_v, dtype=float)
        self._window_t, self._window_v = [], []
        window_flags, self._window_flags = self._window_flags, 0
        names = features.feature_names(self.channels)
        vector = features.compute(window, t, self.channels)
        self.stats.windows += 1
        start, end = float(t[0]), float(t[-1])

        self._append("features", lambda seq: wire.Features(
            v=wire.SCHEMA_VERSION, device=self.device, seq=seq, ts=time.time(), profile=self.config.profile,
            feature_set=features.FEATURE_SET, window_start=start, window_end=end,
            names=list(names), values=[float(x) for x in vector], flags=window_flags,
        ))
        inputs = dict(zip(names, (float(x) for x in vector)))
        inputs.update(zip(self.channels, (float(v) for v in window[-1])))
        for role, model in (("champion", self.model), ("shadow", self.shadow)):
            if model is None:
                continue
            score, anomaly, latency_us = model.score(vector)
            if role == "champion":
                if self.config.threshold is not None:
                    anomaly = bool(score > self.config.threshold)
                inputs["score"] = float(score)
                self.stats.inferences += 1
                self.stats.anomalies += int(anomaly)
            else:
                self.stats.shadow_inferences += 1
            self.stats.inference_us.append(latency_us)
            self._append("inference", lambda seq, role=role, version=model.version, score=score, anomaly=anomaly,
                         latency_us=latency_us: wire.Inference(
                v=wire.SCHEMA_VERSION, device=self.device, seq=seq, ts=time.time(),
                profile=self.config.profile, model_version=version,
                feature_set=features.FEATURE_SET, window_end=end, score=float(score),
                anomaly=bool(anomaly), latency_us=float(latency_us), role=role,
            ))

        if self._rules is not None:
            for event in self._rules.evaluate(inputs, time.monotonic()):
                self.stats.alerts += 1
                self._append("alert", lambda seq, e=event: msgspec.structs.replace(
                    e.alert(device=self.device, seq=seq, ts=time.time(), window_end=end,
                            profile=self.config.profile), state=e.state))

    # -- models ------------------------------------------------------------------------------------

    def swap_model(self, model, role: str = "champion") -> None:
        """Serve ``model`` as champion or shadow (None removes the shadow). Thread-safe: the loop
        applies it between two samples, so no window is lost or scored by half a swap."""
        if role not in ("champion", "shadow"):
            raise ValueError(f"role must be champion or shadow, not {role!r}")
        self._events.put(("model", (role, model)))

    def promote_shadow(self) -> None:
        """Make the shadow the champion (thread-safe, applied between samples)."""
        self._events.put(("promote", None))

    def _append(self, kind: str, make: Callable[[int], wire.Struct]) -> None:
        """Put one message in the outbox under the next sequence number; report it once it is durable."""
        made: list = []
        self._outbox.append(kind, lambda seq: wire.encode(made.append(make(seq)) or made[0]))
        self.stats.messages_accepted += 1
        if self.on_accept is not None:
            self.on_accept(made[0])

    def _status(self, state: str) -> wire.Status:
        ob = self._outbox
        return wire.Status(
            v=wire.SCHEMA_VERSION, device=self.device, seq=ob.next_seq if ob else 0, ts=time.time(),
            profile=self.config.profile, state=state, agent_version=AGENT_VERSION,
            model_version=getattr(self.model, "version", None),
            outbox_depth=ob.depth if ob else 0, dropped=list(self._dropped),
            uptime_s=time.monotonic() - self._started,
            config_revision=self._config_revision, config_rejected=dict(self._config_rejected),
            quality=self._quality_totals(), clock_steps=self._clock.steps,
            last_clock_step_s=self._clock.last.step_s if self._clock.last else 0.0,
        )

    def _quality_totals(self) -> dict[str, int]:
        totals: dict[str, int] = {"gap": self._quality.gaps}
        for per_check in self._quality.counts().values():
            for check, n in per_check.items():
                totals[check] = totals.get(check, 0) + n
        return totals

    def _close(self) -> None:
        if self._link is not None:
            # A clean DISCONNECT discards the last will, so say "offline" ourselves first.
            self._link.publish(wire.topic(self.device, "status"), wire.encode(self._status("offline")), 1, True)
            self._link.stop()
        if self._outbox is not None:
            self._dropped = self._outbox.dropped_ranges()
            self._outbox.close()
        if self._local is not None:
            self._local.close()
        if self._rules is not None:
            self._rules.close()
        if self.updates is not None:
            self.updates.close()  # download progress survives the restart
