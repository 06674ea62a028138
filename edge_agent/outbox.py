"""The durable outbox: every message the agent accepts waits here until the cloud confirms it.

One SQLite database in WAL mode holds the per-device sequence counter and the unconfirmed
messages. A message is written with its sequence number in one transaction, so a number is
never handed out twice, not even after kill -9 or (with ``synchronous=FULL``) a power cut.

An entry leaves the outbox only when the aggregator's delivery confirmation covers its
sequence number. A PUBACK only frees a slot in the MQTT window. Entries sent but still
unconfirmed after ``resend_after_s`` are sent again; after a reconnect everything unconfirmed
is replayed in sequence order. The aggregator drops the duplicates.

The outbox is bounded in bytes and age. When full, it drops by a declared policy: the lowest
priority kind first (raw telemetry, then features, then inference, alerts last), oldest first,
and records each drop as a sequence range that the agent reports in its status, so the
aggregator can tell a policy drop from a loss.

Only the agent's own thread uses an Outbox (SQLite connections are not shared across threads).
"""

from __future__ import annotations

import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from edgeloop.wire import merge_ranges

__all__ = ["Outbox", "Entry", "PRIORITY"]

#: Lower numbers are dropped first when the outbox is full. Deployment reports (which model a
#: device serves, and why it refused one) are few and small, and rollouts decide on them: last.
PRIORITY = {"telemetry": 0, "features": 1, "inference": 2, "alert": 3, "deployment": 4}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    priority INTEGER NOT NULL,
    created REAL NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_drop_order ON outbox (priority, seq);
CREATE TABLE IF NOT EXISTS dropped (
    lo INTEGER NOT NULL, hi INTEGER NOT NULL, kind TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL
);
"""


#: SQLite page cache of the outbox's connection, KiB (SQLite's default: 2000).
CACHE_KIB = 512


@dataclass(frozen=True)
class Entry:
    seq: int
    kind: str
    payload: bytes


class Outbox:
    """A bounded, durable queue of encoded messages keyed by sequence number."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        max_age_s: float | None = 7 * 24 * 3600,
        resend_after_s: float = 10.0,
        max_unconfirmed: int = 5000,
        synchronous: str = "FULL",
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be FULL or NORMAL")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.resend_after_s = resend_after_s
        self.max_unconfirmed = max_unconfirmed
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        # SQLite's default page cache is 2 MB per connection; appends at the tail and deletes at the
        # head touch few pages, so 512 KiB serves as well and caps what a long outage can hold in RAM.
        self._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        self._next_seq = row[0] if row else 0
        self._bytes, self._depth = self._db.execute(
            "SELECT COALESCE(SUM(LENGTH(payload)), 0), COUNT(*) FROM outbox"
        ).fetchone()
        # Sent but unconfirmed: seq -> monotonic time of the last send. Kept in memory only: after
        # a restart everything unconfirmed counts as unsent and is replayed in order.
        self._sent: dict[int, float] = {}
        # Sends of each unconfirmed entry so far: every re-send of the same entry waits twice as
        # long as the one before (up to 4 x resend_after_s), so an outage on the cloud side does not
        # turn into a re-send storm, while what was lost is still re-sent within a minute or so.
        self._attempts: dict[int, int] = {}
        self._next_due = math.inf  # no sent entry times out before this (monotonic time)
        self._cursor = -1  # highest seq handed out for a first send since the last replay
        #: Messages the drop policy removed, counted in memory (cheap to poll from any thread).
        self.dropped_total = self.dropped_count()

    # -- accepting ------------------------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def last_seq(self) -> int:
        """The last sequence number assigned (-1 before the first)."""
        return self._next_seq - 1

    def append(self, kind: str, build: Callable[[int], bytes], now: float | None = None) -> int:
        """Assign the next sequence number, encode with ``build(seq)`` and store durably."""
        if kind not in PRIORITY:
            raise ValueError(f"unknown outbox kind {kind!r}")
        seq = self._next_seq
        payload = build(seq)
        created = time.time() if now is None else now
        with self._transaction():
            self._db.execute(
                "INSERT INTO outbox (seq, kind, priority, created, payload) VALUES (?, ?, ?, ?, ?)",
                (seq, kind, PRIORITY[kind], created, payload),
            )
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('next_seq', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (seq + 1,),
            )
        self._next_seq = seq + 1
        self._bytes += len(payload)
        self._depth += 1
        self._enforce_bounds(created)
        return seq

    # -- sending --------------------------------------------------------------------------------

    def due(self, limit: int, now: float | None = None) -> list[Entry]:
        """Up to ``limit`` entries to send now: time-outs first (oldest seq first), then new ones."""
        if limit <= 0:
            return []
        now = time.monotonic() if now is None else now
        expired: list[int] = []
        if self._sent and now >= self._next_due:  # the loop calls this every few ms: scan only when due
            soonest = math.inf
            for seq, at in self._sent.items():
                due_at = at + self._resend_delay(seq)
                if due_at <= now:
                    expired.append(seq)
                elif due_at < soonest:
                    soonest = due_at
            expired = sorted(expired)[:limit]
            # Until the caller has re-sent the expired ones (mark_sent), look again on every call.
            self._next_due = now if expired else soonest
        out = self._fetch(expired) if expired else []
        room = min(limit - len(out), self.max_unconfirmed - len(self._sent))
        if room > 0 and self._cursor < self._next_seq - 1:  # something never sent yet
            rows = self._db.execute(
                "SELECT seq, kind, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (self._cursor, room),
            ).fetchall()
            out.extend(Entry(*r) for r in rows)
        return out

    def mark_sent(self, seq: int, now: float | None = None) -> None:
        at = time.monotonic() if now is None else now
        self._sent[seq] = at
        self._attempts[seq] = self._attempts.get(seq, 0) + 1
        self._next_due = min(self._next_due, at + self._resend_delay(seq))
        if seq > self._cursor:
            self._cursor = seq

    def _resend_delay(self, seq: int) -> float:
        return self.resend_after_s * (1 << min(self._attempts.get(seq, 1) - 1, 2))

    def replay(self) -> None:
        """After a reconnect: treat every unconfirmed entry as unsent, to resend in seq order."""
        self._sent.clear()
        self._attempts.clear()  # a new connection: start the back-off afresh
        self._cursor = -1

    # -- confirming -----------------------------------------------------------------------------

    def confirm(self, ranges: Iterable[tuple[int, int]]) -> int:
        """Forget every entry inside the inclusive ranges; returns how many left the outbox."""
        removed = 0
        freed = 0
        with self._transaction():
            for lo, hi in ranges:
                freed += self._db.execute(
                    "SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM outbox WHERE seq BETWEEN ? AND ?", (lo, hi)
                ).fetchone()[0]
                removed += self._db.execute("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", (lo, hi)).rowcount
                for seq in [s for s in self._sent if lo <= s <= hi]:
                    del self._sent[seq]
                    self._attempts.pop(seq, None)
        self._bytes -= freed
        self._depth -= removed
        return removed

    # -- state ------------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def size_bytes(self) -> int:
        return self._bytes

    @property
    def unconfirmed_sent(self) -> int:
        return len(self._sent)

    def dropped_ranges(self) -> list[tuple[int, int]]:
        """Every sequence number the drop policy removed, as merged inclusive ranges."""
        return merge_ranges(self._db.execute("SELECT lo, hi FROM dropped").fetchall())

    def dropped_count(self) -> int:
        return self._db.execute("SELECT COALESCE(SUM(hi - lo + 1), 0) FROM dropped").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    # -- internals --------------------------------------------------------------------------------

    def _fetch(self, seqs: list[int]) -> list[Entry]:
        marks = ",".join("?" * len(seqs))
        rows = self._db.execute(
            f"SELECT seq, kind, payload FROM outbox WHERE seq IN ({marks}) ORDER BY seq", seqs
        ).fetchall()
        present = {r[0] for r in rows}
        for seq in seqs:  # confirmed meanwhile
            if seq not in present:
                self._sent.pop(seq, None)
        return [Entry(*r) for r in rows]

    def _enforce_bounds(self, now: float) -> None:
        if self.max_age_s is not None:
            self._drop_where("created < ?", (now - self.max_age_s,), "age")
        while self._bytes > self.max_bytes and self._depth > 1:
            # Lowest priority first, oldest first; a run of consecutive seqs of one kind at a time.
            rows = self._db.execute(
                "SELECT seq, LENGTH(payload) FROM outbox ORDER BY priority, seq LIMIT 256"
            ).fetchall()
            excess = self._bytes - self.max_bytes
            victims = []
            for seq, size in rows:
                victims.append(seq)
                excess -= size
                if excess <= 0:
                    break
            marks = ",".join("?" * len(victims))
            self._drop_where(f"seq IN ({marks})", victims, "size")

    def _drop_where(self, where: str, args, reason: str) -> None:
        rows = self._db.execute(
            f"SELECT seq, kind, LENGTH(payload) FROM outbox WHERE {where} ORDER BY seq", args
        ).fetchall()
        if not rows:
            return
        with self._transaction():
            self._db.execute(f"DELETE FROM outbox WHERE {where}", args)
            for lo, hi, kind in _runs(rows):
                self._db.execute(
                    "INSERT INTO dropped (lo, hi, kind, reason, at) VALUES (?, ?, ?, ?, ?)",
                    (lo, hi, kind, reason, time.time()),
                )
        for seq, _, size in rows:
            self._sent.pop(seq, None)
            self._attempts.pop(seq, None)
            self._bytes -= size
        self._depth -= len(rows)
        self.dropped_total += len(rows)

    def _transaction(self):
        return _Tx(self._db)


def _runs(rows) -> list[tuple[int, int, str]]:
    """Group (seq, kind, size) rows sorted by seq into runs of consecutive seqs of one kind."""
    runs: list[list] = []
    for seq, kind, _ in rows:
        if runs and runs[-1][2] == kind and runs[-1][1] == seq - 1:
            runs[-1][1] = seq
        else:
            runs.append([seq, seq, kind])
    return [tuple(r) for r in runs]


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
