"""The fleet registry: what the aggregator knows about each device, kept across restarts.

Fed by the ingest after each durable write: every stored message and the retained status messages
(birth and last will). Saved as JSON in the data directory after changes, at most every
``save_every_s`` seconds, and on close. Per device it keeps:

* **Sequence accounting.** The numbers stored (merged inclusive ranges, so a sequential stream is
  one range), ``max_seq`` (highest number stored or announced by ``status.seq``), the ranges the
  device reported dropped (``status.dropped``), and the holes. A hole is *pending* while a re-send
  may still fill it and *lost* once it stayed unfilled ``lost_after_s`` after the registry first
  learnt that its number had been assigned (a higher number stored, or a status announcing it).
  ``stored + dropped + lost + pending == max_seq + 1`` (numbers both stored and dropped count as
  stored). Very fragmented accounting (more than ``max_ranges`` stored ranges) is settled: the
  oldest part, once past the grace, is folded into counters and its ranges forgotten.
* **Presence.** The last reported state (birth ``online`` / will ``offline``; a new message also
  means online), and a last-seen timeout ``offline_after_s`` on the aggregator clock.
* **Clock health.** ``clock_skew_s`` is the last message's device time minus receive time. Transit
  and re-sends only make that more negative, so the clock offset estimate ``skew_s`` is the largest
  value over the last one or two ``skew_window_s`` windows; the device is ``skew_flagged`` when
  that exceeds ``max_skew_s`` either way (behind only after a full window, so that a backlog replayed
  after an outage is not taken for a slow clock). A *clock step* is a message with a higher
  sequence number than any before whose ``ts`` is more than ``step_s`` earlier than that one's.
  Status messages are left out of both: a will carries its connect-time ``ts``.
* **Models.** ``model_version`` is the champion the device serves (from its status and champion
  inferences); ``deployments`` holds, per model version, the latest state the device reported for
  it (a ``deployment`` message: offered ... active, rejected, rolled_back), with its reason,
  device time and download progress; only the ``max_deployments`` most recent versions are kept.

Gap counts are **per aggregator**: several aggregators in one shared-subscription group each
store only part of a device's sequence, so each one's registry sees the others' numbers as holes
(and, past the grace, as lost) unless the registry is shared. A device whose outbox is wiped starts
again at 0; its new numbers then count as duplicates (not handled here).
"""

from __future__ import annotations

import bisect
import json
import math
import threading
import time
from pathlib import Path

import msgspec

from edgeloop import wire
from edgeloop.files import write_atomic

__all__ = ["DeploymentState", "DeviceRecord", "Registry", "SeqAccount"]

_DATA = (wire.Telemetry, wire.Features, wire.Inference, wire.Alert)


class DeploymentState(msgspec.Struct, kw_only=True):
    """The latest state a device reported for one model version (see ``wire.Deployment``)."""

    state: str
    reason: str = ""
    ts: float = 0.0  # device clock
    chunks_have: int = 0
    chunks_total: int = 0
    seq: int = -1  # of the message it came from: an older re-send never overwrites a newer state


class DeviceRecord(msgspec.Struct, kw_only=True):
    """One device as the registry knows it. Every field has a default so older files still load.

    ``state`` and the ``seq_*`` counts are derived: they are refreshed in what :meth:`Registry.devices`
    and :meth:`Registry.get` return (and in the saved file), not on every message.
    """

    device: str
    profile: str = ""
    state: str = "unknown"  # online | offline | unknown, as of the last read
    reported_state: str = ""  # last birth/will, or "online" from a new message
    first_seen: float = 0.0
    last_seen: float = 0.0  # aggregator clock
    last_device_ts: float = 0.0  # device clock
    max_seq: int = -1
    messages: int = 0
    agent_version: str | None = None
    model_version: str | None = None
    outbox_depth: int = 0
    # -- sequence accounting
    dropped: list[tuple[int, int]] = []  # reported by the device
    stored: list[tuple[int, int]] = []
    seq_base: int = -1  # accounting covers [seq_base, max_seq]; -1: file from before accounting
    matured_seq: int = -1  # holes at or below this are past the grace
    exposed: list[tuple[int, float]] = []  # (hi, t): numbers <= hi known assigned since t
    duplicates: int = 0
    below_base: int = 0  # stored messages numbered below seq_base (settled or from an old file)
    settled_stored: int = 0
    settled_dropped: int = 0
    settled_lost: int = 0
    seq_stored: int = 0
    seq_dropped: int = 0
    seq_lost: int = 0
    seq_pending: int = 0
    # -- clock health
    clock_skew_s: float = 0.0  # device clock minus receive time, last data message
    skew_s: float = 0.0  # estimated offset: largest clock_skew_s over the recent window(s)
    skew_flagged: bool = False
    skewed_messages: int = 0  # data messages received while |skew_s| > max_skew_s
    head_seq: int = -1  # highest data message seen and its ts, for step detection
    head_ts: float = 0.0
    clock_steps: int = 0
    last_step_at: float = 0.0  # aggregator clock
    last_step_s: float = 0.0  # how far ts went back (negative)
    # -- models
    deployments: dict[str, DeploymentState] = {}  # model version -> latest reported state


class SeqAccount(msgspec.Struct, kw_only=True):
    """A device's sequence accounting at ``now``; ranges are inclusive, the counts include settled ones."""

    device: str
    max_seq: int
    stored: int
    dropped: int
    lost: int
    pending: int
    duplicates: int
    lost_ranges: list[tuple[int, int]]
    pending_ranges: list[tuple[int, int]]


class _Window:
    """Clock-offset windows of one device (memory only: rebuilt after a restart)."""

    __slots__ = ("start", "top", "prev")

    def __init__(self) -> None:
        self.start = -math.inf
        self.top = 0.0
        self.prev: float | None = None


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"Registry {name} must be > 0, got {value!r}")
    return value


class Registry:
    """Thread-safe device registry; :meth:`observe` runs in the ingest writer's hot path."""

    def __init__(
        self,
        path: str | Path | None,
        save_every_s: float = 2.0,
        *,
        lost_after_s: float = 120.0,
        offline_after_s: float = 90.0,
        max_skew_s: float = 300.0,
        step_s: float = 5.0,
        skew_window_s: float = 60.0,
        max_ranges: int = 512,
        max_deployments: int = 16,
    ) -> None:
        self.path = Path(path) if path else None
        self.save_every_s = save_every_s
        self.lost_after_s = _positive("lost_after_s", lost_after_s)
        self.offline_after_s = _positive("offline_after_s", offline_after_s)
        self.max_skew_s = _positive("max_skew_s", max_skew_s)
        self.step_s = _positive("step_s", step_s)
        self.skew_window_s = _positive("skew_window_s", skew_window_s)
        if max_ranges < 8:
            raise ValueError(f"Registry max_ranges must be >= 8, got {max_ranges!r}")
        self.max_ranges = max_ranges
        self.max_deployments = max(1, max_deployments)
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceRecord] = {}
        self._windows: dict[str, _Window] = {}
        self._dirty = False
        self._saved_at = 0.0
        if self.path and self.path.exists():
            try:
                records = msgspec.json.decode(self.path.read_bytes(), type=list[DeviceRecord])
            except msgspec.DecodeError as exc:
                raise ValueError(f"registry file {self.path} is unreadable ({exc}); move it away to start afresh") from exc
            for rec in records:
                if rec.seq_base < 0:  # written before sequence accounting: numbers so far are unknown
                    rec.seq_base = rec.max_seq + 1
                    rec.matured_seq = rec.max_seq
                if not rec.reported_state:
                    rec.reported_state = rec.state
                self._devices[rec.device] = rec

    # -- feeding ------------------------------------------------------------------------------

    def observe(self, msg: wire.DeviceMessage, received_at: float) -> None:
        """Account one durably stored message (or status) received at ``received_at`` (epoch s)."""
        with self._lock:
            rec = self._devices.get(msg.device)
            if rec is None:
                rec = self._devices[msg.device] = DeviceRecord(
                    device=msg.device, first_seen=received_at, seq_base=0)
            if msg.profile:
                rec.profile = msg.profile
            if received_at > rec.last_seen:
                rec.last_seen = received_at
            if msg.ts > rec.last_device_ts:
                rec.last_device_ts = msg.ts
            rec.messages += 1
            if rec.exposed and rec.exposed[0][1] <= received_at - self.lost_after_s:
                self._mature(rec, received_at)
            if type(msg) is wire.Status:
                self._observe_status(rec, msg, received_at)
            else:
                self._observe_data(rec, msg, received_at)
            self._dirty = True

    def _observe_status(self, rec: DeviceRecord, msg: wire.Status, received_at: float) -> None:
        rec.reported_state = msg.state
        rec.agent_version = msg.agent_version
        rec.model_version = msg.model_version
        rec.outbox_depth = msg.outbox_depth
        if msg.dropped:
            rec.dropped = wire.merge_ranges(rec.dropped + list(msg.dropped))
        # A status's seq is the device's *next* sequence number: it has assigned 0 .. seq - 1.
        last = msg.seq - 1
        if last > rec.max_seq:
            self._expose(rec, last, received_at)
            rec.max_seq = last

    def _observe_data(self, rec: DeviceRecord, msg, received_at: float) -> None:
        seq = msg.seq
        if seq > rec.max_seq:
            if seq > rec.max_seq + 1:
                self._expose(rec, seq - 1, received_at)
            rec.max_seq = seq
            rec.reported_state = "online"
        if seq < rec.seq_base:
            rec.below_base += 1
        elif not self._insert(rec.stored, seq):
            rec.duplicates += 1
        elif len(rec.stored) > self.max_ranges and len(rec.stored) % 32 == 0:
            self._settle(rec)
        if isinstance(msg, wire.Inference) and msg.role == "champion":
            rec.model_version = msg.model_version
        elif type(msg) is wire.Deployment:
            self._observe_deployment(rec, msg)
        # Clock offset: transit only lowers ts - received_at, so the window maximum is the estimate.
        offset = msg.ts - received_at
        rec.clock_skew_s = offset
        win = self._windows.get(rec.device)
        if win is None:
            win = self._windows[rec.device] = _Window()
        age = received_at - win.start
        if age >= self.skew_window_s:
            win.prev = win.top if age < 2 * self.skew_window_s else None
            win.start, win.top = received_at, offset
        elif offset > win.top:
            win.top = offset
        est = win.top if win.prev is None or win.top > win.prev else win.prev
        rec.skew_s = est
        rec.skew_flagged = est > self.max_skew_s or (est < -self.max_skew_s and win.prev is not None)
        if rec.skew_flagged:
            rec.skewed_messages += 1
        # Clock step: sequence numbers follow creation order, timestamps should too.
        if seq > rec.head_seq:
            if rec.head_seq >= 0 and msg.ts < rec.head_ts - self.step_s:
                rec.clock_steps += 1
                rec.last_step_at = received_at
                rec.last_step_s = msg.ts - rec.head_ts
            rec.head_seq, rec.head_ts = seq, msg.ts

    def _observe_deployment(self, rec: DeviceRecord, msg: wire.Deployment) -> None:
        known = rec.deployments.get(msg.model_version)
        if known is not None and known.seq > msg.seq:
            return
        if known is None and len(rec.deployments) >= self.max_deployments:
            oldest = min(rec.deployments, key=lambda v: rec.deployments[v].seq)
            if rec.deployments[oldest].seq > msg.seq:
                return
            del rec.deployments[oldest]
        rec.deployments[msg.model_version] = DeploymentState(
            state=msg.state, reason=msg.reason, ts=msg.ts, chunks_have=msg.chunks_have,
            chunks_total=msg.chunks_total, seq=msg.seq)

    def has_stored(self, device: str, seq: int) -> bool:
        """Whether this aggregator has stored ``(device, seq)`` already (a re-send or redelivery).

        Conservative: numbers folded into the settled counters answer False, so at worst a repeat
        is written again (which the stores make harmless)."""
        with self._lock:
            rec = self._devices.get(device)
            if rec is None or seq < rec.seq_base or not rec.stored:
                return False
            ranges = rec.stored
            i = bisect.bisect_right(ranges, (seq, math.inf))
            return bool(i) and ranges[i - 1][0] <= seq <= ranges[i - 1][1]

    @staticmethod
    def _insert(ranges: list[tuple[int, int]], seq: int) -> bool:
        """Add ``seq`` to sorted, disjoint, non-adjacent ``ranges``; False if already there."""
        if not ranges:
            ranges.append((seq, seq))
            return True
        lo, hi = ranges[-1]
        if seq == hi + 1:
            ranges[-1] = (lo, seq)
            return True
        if seq > hi:
            ranges.append((seq, seq))
            return True
        if seq >= lo:
            return False
        i = bisect.bisect_right(ranges, (seq, math.inf))  # ranges[i] is the first with lo > seq
        if i and ranges[i - 1][1] >= seq:
            return False
        left = i and ranges[i - 1][1] == seq - 1
        right = ranges[i][0] == seq + 1
        if left and right:
            ranges[i - 1 : i + 1] = [(ranges[i - 1][0], ranges[i][1])]
        elif left:
            ranges[i - 1] = (ranges[i - 1][0], seq)
        elif right:
            ranges[i] = (seq, ranges[i][1])
        else:
            ranges.insert(i, (seq, seq))
        return True

    def _expose(self, rec: DeviceRecord, hi: int, t: float) -> None:
        """Numbers up to ``hi`` are now known to be assigned; holes among them start their grace."""
        if rec.exposed and t < rec.exposed[-1][1]:
            t = rec.exposed[-1][1]
        rec.exposed.append((hi, t))

    def _mature(self, rec: DeviceRecord, now: float) -> None:
        limit = now - self.lost_after_s
        exposed = rec.exposed
        k = 0
        while k < len(exposed) and exposed[k][1] <= limit:
            k += 1
        if k:
            rec.matured_seq = max(rec.matured_seq, exposed[k - 1][0])
            del exposed[:k]

    def _settle(self, rec: DeviceRecord) -> None:
        """Fold the older half of a fragmented accounting into counters (only holes past grace)."""
        cut = min(rec.stored[len(rec.stored) // 2][0], rec.matured_seq + 1)
        if cut <= rec.seq_base:
            return
        acc = self._account(rec, math.inf, rec.seq_base, cut - 1)
        rec.settled_stored += acc.stored
        rec.settled_dropped += acc.dropped
        rec.settled_lost += acc.lost + acc.pending
        rec.stored = [r for r in rec.stored if r[0] >= cut]
        rec.seq_base = cut

    # -- reading ------------------------------------------------------------------------------

    def _account(self, rec: DeviceRecord, now: float, lo: int, hi: int) -> SeqAccount:
        """Counts and holes over [lo, hi], without the settled counters."""
        if hi < lo or (len(rec.stored) == 1 and rec.stored[0][0] <= lo and rec.stored[0][1] >= hi):
            # Nothing missing (the usual case): skip the range arithmetic.
            n = max(hi - lo + 1, 0)
            return SeqAccount(device=rec.device, max_seq=rec.max_seq, stored=n, dropped=0, lost=0, pending=0,
                              duplicates=rec.duplicates, lost_ranges=[], pending_ranges=[])

        def clipped(ranges):
            return [(max(a, lo), min(b, hi)) for a, b in ranges if b >= lo and a <= hi]

        stored = clipped(rec.stored)
        covered = wire.merge_ranges(stored + clipped(rec.dropped))
        n_stored = sum(b - a + 1 for a, b in stored)
        n_covered = sum(b - a + 1 for a, b in covered)
        holes, nxt = [], lo
        for a, b in covered + [(hi + 1, hi + 1)]:
            if a > nxt:
                holes.append((nxt, a - 1))
            nxt = max(nxt, b + 1)
        # Segments of the number line with their grace verdict: matured, then each exposure.
        limit = now - self.lost_after_s
        segments, start = [], -1
        if rec.matured_seq >= 0:
            segments.append((0, rec.matured_seq, True))
            start = rec.matured_seq + 1
        for top, t in rec.exposed:
            if top >= start:
                segments.append((start, top, t <= limit))
                start = top + 1
        segments.append((max(start, 0), math.inf, False))
        lost, pending = [], []
        for a, b in holes:
            for s_lo, s_hi, past in segments:
                x, y = max(a, s_lo), min(b, s_hi)
                if x <= y:
                    (lost if past else pending).append((x, int(y)))
        return SeqAccount(
            device=rec.device, max_seq=rec.max_seq, stored=n_stored, dropped=n_covered - n_stored,
            lost=sum(b - a + 1 for a, b in lost), pending=sum(b - a + 1 for a, b in pending),
            duplicates=rec.duplicates, lost_ranges=wire.merge_ranges(lost), pending_ranges=wire.merge_ranges(pending))

    def _refresh(self, rec: DeviceRecord, now: float) -> SeqAccount:
        acc = self._account(rec, now, rec.seq_base, rec.max_seq)
        acc.stored += rec.settled_stored
        acc.dropped += rec.settled_dropped
        acc.lost += rec.settled_lost
        rec.seq_stored, rec.seq_dropped, rec.seq_lost, rec.seq_pending = acc.stored, acc.dropped, acc.lost, acc.pending
        rec.state = self._state(rec, now)
        return acc

    def _state(self, rec: DeviceRecord, now: float) -> str:
        if rec.reported_state == "offline" or (rec.last_seen and now - rec.last_seen > self.offline_after_s):
            return "offline"
        return rec.reported_state or "unknown"

    def gaps(self, device: str, now: float | None = None) -> SeqAccount | None:
        """``device``'s counts (stored, dropped, lost, pending) and hole ranges; None if unknown."""
        now = time.time() if now is None else now
        with self._lock:
            rec = self._devices.get(device)
            return None if rec is None else self._refresh(rec, now)

    def state(self, device: str, now: float | None = None) -> str:
        """``offline`` if its will said so or nothing was heard for ``offline_after_s``; else as reported."""
        now = time.time() if now is None else now
        with self._lock:
            rec = self._devices.get(device)
            return "unknown" if rec is None else self._state(rec, now)

    def _snapshot(self, rec: DeviceRecord, now: float) -> DeviceRecord:
        self._refresh(rec, now)
        return msgspec.structs.replace(
            rec, dropped=list(rec.dropped), stored=list(rec.stored), exposed=list(rec.exposed),
            deployments=dict(rec.deployments))

    def get(self, device: str, now: float | None = None) -> DeviceRecord | None:
        """A copy of ``device``'s record with derived fields as of ``now``; None if unknown."""
        now = time.time() if now is None else now
        with self._lock:
            rec = self._devices.get(device)
            return None if rec is None else self._snapshot(rec, now)

    def devices(self, now: float | None = None) -> list[DeviceRecord]:
        """Copies of every record, sorted by device id, derived fields as of ``now``."""
        now = time.time() if now is None else now
        with self._lock:
            return [self._snapshot(self._devices[d], now) for d in sorted(self._devices)]

    # -- persistence --------------------------------------------------------------------------

    def maybe_save(self) -> None:
        if self._dirty and time.monotonic() - self._saved_at >= self.save_every_s:
            self.save()

    def save(self) -> None:
        """Write every record atomically (temporary file, then rename)."""
        if not self.path:
            return
        now = time.time()
        with self._lock:
            for rec in self._devices.values():
                self._refresh(rec, now)
            data = msgspec.json.encode(list(self._devices.values()))
            self._dirty = False
        self._saved_at = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, data, 0o644)

    def as_json(self) -> str:
        return json.dumps([msgspec.to_builtins(r) for r in self.devices()])
