"""Fault labels: when a device was failing, for training and judging a failure predictor.

A label is a fault window of one device: ``[start, end)`` in device time (seconds since the
epoch), a ``kind`` (``bearing_wear``, ``maintenance``, ...) and a free-text note. They come from
maintenance records entered by hand (CLI / API) or from a simulator's ground truth
(:func:`labels_from_faults`). :class:`LabelStore` keeps them in a small SQLite file under the data
directory (``<data_dir>/labels.sqlite`` by default), apart from the time-series store, because
labels are few, edited by people, and must survive the store's retention.

:func:`window_labels` turns labels into per-window targets: a window is positive when its end
time falls inside one of its device's fault windows or within ``horizon_s`` before one starts, so
a model learns to warn ahead of the failure.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from aggregator.stores.queries import check_device, check_range

__all__ = ["Label", "LabelStore", "LABELS_FILE", "window_labels", "labels_from_faults"]

LABELS_FILE = "labels.sqlite"
_KIND_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}\Z")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, start REAL NOT NULL,
    end REAL NOT NULL, kind TEXT NOT NULL, note TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS labels_device ON labels (device, start);
"""


@dataclass(frozen=True)
class Label:
    """One fault window of one device."""

    id: int
    device: str
    start: float
    end: float
    kind: str
    note: str = ""


def _check(device: str, start: float, end: float, kind: str, note: str) -> None:
    check_device(device)
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"invalid label {name} {value!r}: expected seconds since the epoch")
    if not start < end:
        raise ValueError(f"invalid label: start {start} must be before end {end}")
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise ValueError(f"invalid label kind {kind!r}: must match {_KIND_RE.pattern}")
    if not isinstance(note, str) or len(note) > 1000:
        raise ValueError("invalid label note: expected text of at most 1000 characters")


class LabelStore:
    """Labels in the SQLite file at ``path`` (created on first use). Thread-safe."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    @classmethod
    def in_data_dir(cls, data_dir: str | os.PathLike) -> LabelStore:
        return cls(Path(data_dir) / LABELS_FILE)

    def add(self, device: str, start: float, end: float, kind: str, note: str = "") -> Label:
        """Store one label and return it with its id."""
        _check(device, start, end, kind, note)
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO labels (device, start, end, kind, note) VALUES (?,?,?,?,?)",
                (device, float(start), float(end), kind, note),
            )
        return Label(int(cur.lastrowid), device, float(start), float(end), kind, note)

    def add_many(self, labels: Iterable[Label]) -> list[Label]:
        return [self.add(lb.device, lb.start, lb.end, lb.kind, lb.note) for lb in labels]

    def list(
        self, device: str | None = None, start: float | None = None, end: float | None = None
    ) -> list[Label]:
        """Labels (of ``device``) overlapping [start, end), by device then start."""
        sql, params = "SELECT id, device, start, end, kind, note FROM labels WHERE 1", []
        if device is not None:
            sql += " AND device=?"
            params.append(check_device(device))
        start, end = check_range(start, end)
        if start is not None:
            sql += " AND end>?"
            params.append(start)
        if end is not None:
            sql += " AND start<?"
            params.append(end)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY device, start, id", params).fetchall()
        return [Label(*row) for row in rows]

    def delete(self, label_id: int) -> bool:
        """Delete one label; False if there was none with that id."""
        with self._lock:
            cur = self._db.execute("DELETE FROM labels WHERE id=?", (int(label_id),))
        return cur.rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def window_labels(
    times: np.ndarray, devices: Sequence[str], labels: Iterable[Label], horizon_s: float = 0.0,
    after_s: float = 0.0,
) -> np.ndarray:
    """True for each window (end time ``times[k]`` of ``devices[k]``) inside a fault window of
    its device, within ``horizon_s`` before one starts or within ``after_s`` after it ends.

    ``after_s`` is for leaving data out rather than for targets: a machine is not back to normal
    the moment a fault window closes (a worn bearing cools for minutes), so training and drift
    checks skip a margin after each fault as well as the horizon before it."""
    for name, value in (("horizon_s", horizon_s), ("after_s", after_s)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    times = np.asarray(times, dtype=np.float64)
    if times.shape[0] != len(devices):
        raise ValueError(f"{times.shape[0]} times but {len(devices)} devices")
    devs = np.asarray(devices, dtype=object)
    y = np.zeros(times.shape[0], dtype=bool)
    for lb in labels:
        y |= (devs == lb.device) & (times >= lb.start - horizon_s) & (times < lb.end + after_s)
    return y


def labels_from_faults(device: str, faults: Iterable, *, t0: float = 0.0) -> list[Label]:
    """Labels from a simulator's faults (``start_s``, ``end_s``, ``kind``), sample time 0 = t0."""
    return [
        Label(0, device, t0 + f.start_s, t0 + f.end_s, f.kind, "simulator ground truth")
        for f in faults
    ]
