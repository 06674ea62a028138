"""Raw readings kept on the device (privacy mode): a bounded local SQLite table.

In privacy mode the agent publishes only features, inferences and alerts; the raw readings stay
here, newest ``max_rows`` kept, for local inspection or a later, deliberate export.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Sequence

__all__ = ["LocalReadings"]


class LocalReadings:
    def __init__(self, path: str | Path, max_rows: int = 1_000_000) -> None:
        self.max_rows = max_rows
        self._db = sqlite3.connect(Path(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # local copies: a power cut may lose the last second
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS readings (id INTEGER PRIMARY KEY, t REAL NOT NULL,"
            " channels TEXT NOT NULL, reading TEXT NOT NULL, flags INTEGER NOT NULL)"
        )

    def add(self, channels: Sequence[str], readings) -> None:
        names = json.dumps(list(channels))
        rows = [(r.t, names, json.dumps(r.values), r.flags) for r in readings]
        self._db.execute("BEGIN")
        self._db.executemany("INSERT INTO readings (t, channels, reading, flags) VALUES (?, ?, ?, ?)", rows)
        self._db.execute("DELETE FROM readings WHERE id <= (SELECT MAX(id) FROM readings) - ?", (self.max_rows,))
        self._db.execute("COMMIT")

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM readings").fetchone()[0]

    def latest(self, n: int = 10) -> list[tuple[float, dict[str, float | None]]]:
        rows = self._db.execute("SELECT t, channels, reading FROM readings ORDER BY id DESC LIMIT ?", (n,))
        return [(t, dict(zip(json.loads(c), json.loads(v)))) for t, c, v in rows]

    def close(self) -> None:
        self._db.close()
