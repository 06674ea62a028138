"""Where bad input goes: every refused message, with its topic, reason and raw bytes.

A malformed or hostile message is stored here durably before it is acknowledged to the broker,
so it neither loops through redelivery nor vanishes; the counts per reason feed the metrics.
The table is capped: past ``max_rows`` the oldest entries go (their counts stay).
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Iterable

__all__ = ["Quarantine"]


class Quarantine:
    def __init__(self, path: str | Path, max_rows: int = 100_000) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self.max_rows = max_rows
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS quarantine (id INTEGER PRIMARY KEY, at REAL NOT NULL, topic TEXT NOT NULL,"
            " reason TEXT NOT NULL, detail TEXT NOT NULL, payload BLOB NOT NULL)"
        )
        self.counts: Counter[str] = Counter(
            dict(self._db.execute("SELECT reason, COUNT(*) FROM quarantine GROUP BY reason").fetchall())
        )

    def add_many(self, items: Iterable[tuple[str, str, str, bytes]]) -> int:
        """Store (topic, reason, detail, payload) tuples durably; returns how many."""
        rows = [(time.time(), topic[:1024], reason, detail[:2000], bytes(payload)) for topic, reason, detail, payload in items]
        if not rows:
            return 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT INTO quarantine (at, topic, reason, detail, payload) VALUES (?, ?, ?, ?, ?)", rows
            )
            self._db.execute(
                "DELETE FROM quarantine WHERE id <= (SELECT MAX(id) FROM quarantine) - ?", (self.max_rows,)
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self.counts.update(r[2] for r in rows)
        return len(rows)

    def recent(self, limit: int = 100) -> list[dict]:
        cur = self._db.execute(
            "SELECT at, topic, reason, detail, payload FROM quarantine ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [
            {"at": at, "topic": topic, "reason": reason, "detail": detail, "payload": bytes(payload)}
            for at, topic, reason, detail, payload in cur
        ]

    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        self._db.close()
