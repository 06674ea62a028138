"""A time budget around a source's reads: a slow or failing source is reported, never waited for.

:class:`GuardedSource` runs the wrapped source's ``read`` on its own worker thread and waits at
most ``timeout_s`` for it. A read that raises, overruns or returns the wrong number of values
gives ``None`` for every channel and is counted in :class:`SourceStatus`; while a read is still
hung, later reads are not started (sources are not thread-safe) but skipped at once, so the
sampler loses at most one budget per hung read, not one per sample.

The worker is a daemon thread: a source stuck in a driver call forever cannot keep the agent
process from exiting (``concurrent.futures`` workers are joined at exit, so they are not used).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from edge_agent.sources.base import Source

__all__ = ["GuardedSource", "PendingRead", "SourceStatus"]


@dataclass
class SourceStatus:
    """Counters of one source for the agent's status: how its reads went since it started."""

    source: str
    channels: int
    #: Reads asked for (every call of ``read``).
    reads: int = 0
    #: Reads that returned values within the budget.
    ok: int = 0
    #: Reads that raised or returned a malformed sample.
    errors: int = 0
    #: Reads that overran the budget.
    timeouts: int = 0
    #: Reads not started because the previous one was still running.
    skipped: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    #: Slowest read that finished, in seconds (including ones that finished late).
    max_read_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PendingRead:
    """One read handed to the worker thread; ``done`` is set when it has finished."""

    __slots__ = ("index", "now", "done", "values", "error", "duration")

    def __init__(self, index: int, now: float) -> None:
        self.index, self.now = index, now
        self.done = threading.Event()
        self.values: Sequence[float | None] | None = None
        self.error: BaseException | None = None
        self.duration = 0.0


class GuardedSource(Source):
    """``source`` with a time budget of ``timeout_s`` per read, on a worker thread of its own.

    ``read`` never blocks longer than the budget; :meth:`status` gives the counters. Use
    :meth:`submit` and :meth:`collect` to run the reads of several guarded sources at once under
    one shared deadline (as :class:`~edge_agent.sources.composite.CompositeSource` does).
    """

    name = "guarded"

    def __init__(self, source: Source, timeout_s: float = 0.5, *, label: str | None = None) -> None:
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self.source = source
        self.timeout_s = float(timeout_s)
        self.channels = tuple(source.channels)
        self.label = label or getattr(source, "name", type(source).__name__)
        self._status = SourceStatus(self.label, len(self.channels))
        self._lock = threading.Lock()  # guards _status: the worker records late finishes
        self._jobs: queue.SimpleQueue[PendingRead | None] = queue.SimpleQueue()
        self._pending: PendingRead | None = None
        self._worker: threading.Thread | None = None
        self._closed = False

    # -- the worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            started = time.perf_counter()
            try:
                job.values = self.source.read(job.index, job.now)
            except BaseException as exc:  # noqa: BLE001 - reported through the status, never lost
                job.error = exc
            job.duration = time.perf_counter() - started
            with self._lock:
                self._status.max_read_s = max(self._status.max_read_s, job.duration)
            job.done.set()

    def _ensure_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name=f"source-{self.label}", daemon=True)
            self._worker.start()

    # -- reads -----------------------------------------------------------------------------------

    def submit(self, index: int, now: float) -> PendingRead | None:
        """Start a read; ``None`` when the previous read is still running (counted as skipped)."""
        if self._closed:
            raise RuntimeError(f"source {self.label!r} is closed")
        with self._lock:
            self._status.reads += 1
            if self._pending is not None and not self._pending.done.is_set():
                self._status.skipped += 1
                return None
        self._ensure_worker()
        job = PendingRead(index, now)
        self._pending = job
        self._jobs.put(job)
        return job

    def collect(self, job: PendingRead | None, deadline: float) -> list[float | None]:
        """The values of ``job``, waiting until ``deadline`` (``time.monotonic()``) at the most."""
        nothing: list[float | None] = [None] * len(self.channels)
        if job is None:
            return nothing
        if not job.done.wait(max(0.0, deadline - time.monotonic())):
            self._record("timeouts", f"read of sample {job.index} took longer than {self.timeout_s:g} s")
            return nothing
        if job.error is not None:
            self._record("errors", f"{type(job.error).__name__}: {job.error}")
            return nothing
        try:
            values = [None if v is None or not math.isfinite(v) else float(v) for v in job.values]
        except (TypeError, ValueError) as exc:
            self._record("errors", f"read returned a non-number: {exc}")
            return nothing
        if len(values) != len(self.channels):
            self._record("errors", f"read returned {len(values)} values for {len(self.channels)} channels")
            return nothing
        with self._lock:
            self._status.ok += 1
        return values

    def read(self, index: int, now: float) -> list[float | None]:
        return self.collect(self.submit(index, now), time.monotonic() + self.timeout_s)

    def _record(self, counter: str, message: str) -> None:
        with self._lock:
            setattr(self._status, counter, getattr(self._status, counter) + 1)
            self._status.last_error = message
            self._status.last_error_at = time.time()

    def status(self) -> SourceStatus:
        """A copy of the counters, safe to publish while reads go on."""
        with self._lock:
            return SourceStatus(**asdict(self._status))

    def close(self) -> None:
        """Stop the worker (it finishes a running read in the background) and close the source."""
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            self._jobs.put(None)
        self.source.close()

    def __repr__(self) -> str:
        return f"GuardedSource({self.source!r}, timeout_s={self.timeout_s:g})"
