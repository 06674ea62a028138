"""Keeps a device clock that steps back from silently replacing stored readings in InfluxDB.

InfluxDB identifies a point by series (measurement + tags) and time: a new point with the time of a
stored one replaces it without a word. A device whose clock steps back (NTP correction, RTC reset,
manual setting) sends new readings with times it has already used, and they would overwrite the
old readings. The guard prevents that while keeping repeats idempotent:

* Times are written in nanoseconds, the device's microsecond times times 1000, so a reading's
  genuine time always ends in "000" and the three digits below are free.
* Per series key (device, profile) the guard remembers the newest time stored through it (seeded
  from the store at ``open``). A telemetry message whose readings are all newer, with no time
  repeated inside it, is the normal case and costs one ``min`` and one ``set`` over its times.
* Any other message (a repeat, or a clock that stepped back) is checked against what is stored:
  one query for that series and time range returns the (time, seq, idx) already there, plus the
  points of earlier messages of the same batch. A reading whose (seq, idx) is already stored keeps
  the time it was stored under (a repeat stays identical); a new reading whose time another
  reading holds moves by +1 ns steps to the first free time within its microsecond and is marked
  with ``FLAG_TIME_ADJUSTED``. Read back at microsecond precision it still shows its device time.
* A message with a reading that finds no free time among the 1000 nanoseconds of its microsecond
  (a thousand readings of one device at one instant) is rejected with a reason, never written.

The guarantee holds for every writer that goes through one guard: one aggregator, or several
aggregators each writing different devices. Several aggregators sharing one device's messages
(a shared subscription) each know only the newest time they wrote themselves; docs/storage.md
describes that limit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from edgeloop.wire import DeviceMessage, Telemetry

__all__ = ["TimeGuard", "Plan", "Lookup"]

#: (device, profile, first_ns, last_ns) -> [(time_ns, seq, idx)] of the stored telemetry points.
Lookup = Callable[[str, str, int, int], list[tuple[int, int, int]]]


class Plan:
    """What the guard decided for one batch, in the form ``lineproto.encode_batch`` takes."""

    __slots__ = ("times_us", "adjusted", "rejected", "checked")

    def __init__(self, n: int) -> None:
        #: Per message: the readings' device times in µs (telemetry), else None.
        self.times_us: list[list[int] | None] = [None] * n
        #: message index -> {reading index: time in ns} for readings moved or kept moved.
        self.adjusted: dict[int, dict[int, int]] = {}
        #: (message index, reason) for messages that cannot be placed.
        self.rejected: list[tuple[int, str]] = []
        #: How many messages needed a look at the store (for tests and metrics).
        self.checked = 0


class TimeGuard:
    """Plans the stored time of every telemetry reading of a batch; see the module docstring."""

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup
        self._newest: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def seed(self, newest: dict[tuple[str, str], int]) -> None:
        """Newest stored time (ns) per (device, profile), as read from the store."""
        with self._lock:
            for key, t in newest.items():
                if t > self._newest.get(key, -1):
                    self._newest[key] = t

    def newest(self, device: str, profile: str = "") -> int | None:
        return self._newest.get((device, profile))

    def plan(self, messages: Sequence[DeviceMessage], *, allow_lookup: bool = True) -> Plan | None:
        """Times for every reading of ``messages``; remembers them as stored.

        With ``allow_lookup=False`` it plans only when every telemetry message takes the normal,
        monotonic path (no store lookup, nothing to place), and returns None, remembering nothing,
        otherwise. Such plans never collide with one another, so their writes may run at once.
        A plan that looks at the store must see every earlier write finished, and its own write
        must finish before the next plan: ``InfluxStore.write`` arranges both.
        """
        plan = Plan(len(messages))
        in_batch: dict[tuple[str, str], list[int]] = {}
        if not allow_lookup:
            return self._plan_monotonic(messages, plan)
        with self._lock:
            for i, m in enumerate(messages):
                if type(m) is not Telemetry:
                    continue
                us = [round(r.t * 1e6) for r in m.readings]
                plan.times_us[i] = us
                key = (m.device, m.profile)
                newest = self._newest.get(key, -1)
                first = min(us)
                if first * 1000 > newest and len(set(us)) == len(us):
                    self._newest[key] = max(us) * 1000  # the normal, monotonic path
                else:
                    plan.checked += 1
                    if not self._place(i, m, us, plan, in_batch.get(key, ()), messages):
                        continue
                in_batch.setdefault(key, []).append(i)
        return plan

    def _plan_monotonic(self, messages: Sequence[DeviceMessage], plan: Plan) -> Plan | None:
        newest: dict[tuple[str, str], int] = {}
        with self._lock:
            for i, m in enumerate(messages):
                if type(m) is not Telemetry:
                    continue
                us = [round(r.t * 1e6) for r in m.readings]
                key = (m.device, m.profile)
                if min(us) * 1000 <= newest.get(key, self._newest.get(key, -1)) or len(set(us)) != len(us):
                    return None
                plan.times_us[i] = us
                newest[key] = max(us) * 1000
            self._newest.update(newest)
        return plan

    def _place(
        self,
        i: int,
        m: Telemetry,
        us: list[int],
        plan: Plan,
        earlier: Sequence[int],
        messages: Sequence[DeviceMessage],
    ) -> bool:
        key = (m.device, m.profile)
        lo, hi = min(us) * 1000, max(us) * 1000 + 999
        occupied: dict[int, tuple[int, int]] = {
            t: (seq, idx) for t, seq, idx in self._lookup(m.device, m.profile, lo, hi)
        }
        for j in earlier:  # points of this batch that are not stored yet
            moved = plan.adjusted.get(j, {})
            seq_j = messages[j].seq
            for k, u in enumerate(plan.times_us[j] or ()):
                t = moved.get(k, u * 1000)
                if lo <= t <= hi:
                    occupied[t] = (seq_j, k)
        stored = {idx: t for t, (seq, idx) in occupied.items() if seq == m.seq}
        adjusted: dict[int, int] = {}
        final: list[int] = []
        for k, u in enumerate(us):
            base = u * 1000
            t = stored.get(k)
            if t is None:
                t = base
                while occupied.get(t, (m.seq, k)) != (m.seq, k):
                    t += 1
                if t - base > 999:
                    plan.rejected.append(
                        (i, f"time-collision: reading {k} finds no free nanosecond at {u} µs")
                    )
                    return False
                occupied[t] = (m.seq, k)
            if t != base:
                adjusted[k] = t
            final.append(t)
        if adjusted:
            plan.adjusted[i] = adjusted
        self._newest[key] = max(self._newest.get(key, -1), max(final))
        return True
