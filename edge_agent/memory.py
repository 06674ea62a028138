"""Giving freed heap memory back to the operating system, so the agent's RSS stays its working set.

glibc's ``malloc`` keeps memory that was freed at the top of the heap and in its per-thread arenas
for reuse; it only returns it to the kernel past a threshold. Two things in the agent free a lot
at once and then never need it again: building an onnxruntime session (graph parsing and
optimisation scratch, measured ~7 MB per 446 KB model, see :mod:`edge_agent.inference`), and
bursts such as replaying a long outbox after a network cut. ``malloc_trim(0)`` hands such free
pages back; it does not touch memory in use, so the RSS that remains is what the agent holds.

:func:`release_freed_memory` trims once (after every session build); :data:`PROCESS_TRIM`, a
:class:`PeriodicTrim`, trims from the agent's loop at a long interval (default five minutes: a trim
costs well under a millisecond, and nothing is gained by doing it often). It is one schedule per
process, so a simulated fleet of a thousand agents in one process still trims once per interval.
Where there is no glibc (musl, macOS) both are no-ops.

Measured figures and what the rest of the agent's memory is made of: BENCHMARKS.md, "Agent CPU and
memory", and docs/raspberry-pi.md ("Memory").
"""

from __future__ import annotations

import ctypes
import threading

__all__ = ["release_freed_memory", "trims", "PeriodicTrim", "PROCESS_TRIM", "DEFAULT_TRIM_INTERVAL_S"]

#: How often the agent's loop trims by default (seconds).
DEFAULT_TRIM_INTERVAL_S = 300.0

_lock = threading.Lock()
_libc: ctypes.CDLL | None | bool = False  # False: not looked up yet; None: no glibc here
_trims = 0


def _malloc_trim():
    """glibc's ``malloc_trim`` function, or None where there is none (looked up once)."""
    global _libc
    if _libc is False:
        try:
            lib = ctypes.CDLL(None)  # the symbols already loaded: libc's among them, no search needed
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            lib.malloc_trim.restype = ctypes.c_int
            _libc = lib
        except (OSError, AttributeError):
            _libc = None
    return None if _libc is None else _libc.malloc_trim


def release_freed_memory() -> bool:
    """Return freed heap pages to the kernel (``malloc_trim(0)``). True if glibc did it (whether
    or not there was anything to give back), False where there is no glibc."""
    global _trims
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    with _lock:
        _trims += 1
    return True


def trims() -> int:
    """How many trims this process has done (tests and diagnostics read it)."""
    return _trims


class PeriodicTrim:
    """Calls :func:`release_freed_memory` at most once per ``interval_s`` of monotonic time.

    The agent's loop calls :meth:`maybe` on every pass with the time it already has; only when the
    interval has passed does it trim. ``interval_s <= 0`` turns it off.
    """

    def __init__(self, interval_s: float = DEFAULT_TRIM_INTERVAL_S, *, now: float = 0.0) -> None:
        self.interval_s = float(interval_s)
        self._next = now + self.interval_s
        self._lock = threading.Lock()
        self.done = 0  # trims made through this schedule

    def maybe(self, now: float) -> bool:
        """Trim if the interval has passed since the last trim (or since ``now`` at construction)."""
        if self.interval_s <= 0 or now < self._next:
            return False
        with self._lock:  # several agents' threads may ask at once: one of them trims
            if now < self._next:
                return False
            self._next = now + self.interval_s
        if release_freed_memory():
            self.done += 1
            return True
        return False


#: The process-wide schedule the agents' loops use (monotonic clock).
PROCESS_TRIM = PeriodicTrim()
