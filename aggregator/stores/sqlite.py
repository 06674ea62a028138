"""The embedded store: one SQLite file, for the demo and for machines without InfluxDB.

Same schema semantics as the InfluxDB store (see ``lineproto``): device times in integer
microseconds, the ``profile`` "" when absent, values exactly as sent, None values omitted on read.

Durability: WAL journal with ``synchronous=FULL``, so every commit fsyncs the WAL before
``write`` returns. The ingest acknowledges messages to the broker and confirms them to the
device once ``write`` returns, and the device then forgets them; ``NORMAL`` would survive a
crash of the process but could lose the last commits on a power cut, i.e. confirmed data.

Idempotence: primary keys make a repeat replace its own rows with identical values:
telemetry (device, seq, idx), so a device clock that steps back never replaces another reading;
features, inference, alerts and deployments (device, seq); agent_health
(device, profile, time), the key InfluxDB gives that measurement.

Retention (``retention_s``): rows whose device time is older than now - retention_s are deleted,
checked after a write at most every ``housekeeping_s``. Size cap (``max_bytes``): after each write
batch, while the pages in use exceed the cap, the oldest tenth (by device time) of the first
non-empty table in this order is deleted: telemetry, features, inference, alerts, agent_health,
deployments; raw readings are the bulk and the cheapest to lose, features are what retraining
needs. The file itself does not shrink (freed pages are reused) and the WAL comes on top.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from edgeloop.wire import Alert, Deployment, DeviceMessage, Features, Inference, Status, Telemetry

from .base import Store, StoreError, StoreUnavailable, TelemetryRow, WriteOutcome
from .lineproto import MEASUREMENTS
from .sqlite_queries import SQLiteQueries, _time_clause, _us

__all__ = ["SQLiteStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS channel_sets (id INTEGER PRIMARY KEY, names TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS devices (device TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS telemetry (
    device TEXT NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL, t_us INTEGER NOT NULL,
    profile TEXT NOT NULL, flags INTEGER NOT NULL,
    channel_set INTEGER NOT NULL,  -- channel_sets.id: the names, in the order of vals
    vals BLOB NOT NULL,            -- JSON array of floats, null where the reading had None
    PRIMARY KEY (device, seq, idx)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS telemetry_time ON telemetry (device, t_us);
CREATE TABLE IF NOT EXISTS features (
    device TEXT NOT NULL, seq INTEGER NOT NULL, t_us INTEGER NOT NULL, profile TEXT NOT NULL,
    feature_set TEXT NOT NULL, window_start REAL NOT NULL, names BLOB NOT NULL,
    vals BLOB NOT NULL, flags INTEGER NOT NULL, PRIMARY KEY (device, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inference (
    device TEXT NOT NULL, seq INTEGER NOT NULL, t_us INTEGER NOT NULL, profile TEXT NOT NULL,
    model_version TEXT NOT NULL, feature_set TEXT NOT NULL, role TEXT NOT NULL,
    score REAL NOT NULL, anomaly INTEGER NOT NULL, latency_us REAL NOT NULL,
    PRIMARY KEY (device, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alerts (
    device TEXT NOT NULL, seq INTEGER NOT NULL, t_us INTEGER NOT NULL, profile TEXT NOT NULL,
    rule TEXT NOT NULL, severity TEXT NOT NULL, value REAL NOT NULL, message TEXT NOT NULL,
    PRIMARY KEY (device, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS agent_health (
    device TEXT NOT NULL, profile TEXT NOT NULL, t_us INTEGER NOT NULL, seq INTEGER NOT NULL,
    state TEXT NOT NULL, outbox_depth INTEGER NOT NULL, uptime_s REAL NOT NULL,
    agent_version TEXT NOT NULL, model_version TEXT,
    PRIMARY KEY (device, profile, t_us)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deployments (
    device TEXT NOT NULL, seq INTEGER NOT NULL, t_us INTEGER NOT NULL, profile TEXT NOT NULL,
    model_version TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL,
    chunks_have INTEGER NOT NULL, chunks_total INTEGER NOT NULL,
    PRIMARY KEY (device, seq)) WITHOUT ROWID;
"""

_INSERT = {
    "telemetry": "INSERT OR REPLACE INTO telemetry VALUES (?,?,?,?,?,?,?,?)",
    "features": "INSERT OR REPLACE INTO features VALUES (?,?,?,?,?,?,?,?,?)",
    "inference": "INSERT OR REPLACE INTO inference VALUES (?,?,?,?,?,?,?,?,?,?)",
    "alerts": "INSERT OR REPLACE INTO alerts VALUES (?,?,?,?,?,?,?,?)",
    "agent_health": "INSERT OR REPLACE INTO agent_health VALUES (?,?,?,?,?,?,?,?,?)",
    "deployments": "INSERT OR REPLACE INTO deployments VALUES (?,?,?,?,?,?,?,?,?)",
}
#: Size-cap deletion order, first to go first.
_EVICTION_ORDER = ("telemetry", "features", "inference", "alerts", "agent_health", "deployments")
#: Errors that belong to one message's rows, not to the store (it is rejected, the rest stored).
_ROW_ERRORS = (
    ValueError, TypeError, AttributeError, OverflowError,
    sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError,
)
_json = msgspec.json.Encoder().encode
_values = msgspec.json.Decoder(list[float | None]).decode


def _finite(values: Iterable[float]) -> bool:
    return all(math.isfinite(v) for v in values)


class SQLiteStore(SQLiteQueries, Store):
    """Store into the SQLite file at ``path`` (created with its schema on ``open``)."""

    name = "sqlite"

    def __init__(
        self,
        path: str,
        max_bytes: int | None = None,
        retention_s: float | None = None,
        housekeeping_s: float = 10.0,
    ) -> None:
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if retention_s is not None and retention_s <= 0:
            raise ValueError(f"retention_s must be positive, got {retention_s}")
        self.path = str(path)
        self.max_bytes = max_bytes
        self.retention_s = retention_s
        self._housekeeping_s = housekeeping_s
        self._last_retention = -math.inf
        self._db: sqlite3.Connection | None = None  # writes, under _lock
        self._reader: sqlite3.Connection | None = None  # reads, concurrent with writes (WAL)
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._channel_ids: dict[str, int] = {}
        self._channel_names: dict[int, list[str]] = {}

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    def open(self) -> None:
        try:
            self._db = self._connect()
            self._db.executescript(_SCHEMA)
            self._reader = self._connect()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite store {self.path}: {exc}") from exc
        for cid, names in self._db.execute("SELECT id, names FROM channel_sets"):
            self._channel_ids[names] = cid
            self._channel_names[cid] = msgspec.json.decode(names)

    def close(self) -> None:
        with self._lock, self._read_lock:
            for db in (self._db, self._reader):
                if db is not None:
                    db.close()
            self._db = self._reader = None

    # -- write --------------------------------------------------------------------------------

    def _channel_set(self, channels: list[str]) -> int:
        key = _json(channels).decode()
        cid = self._channel_ids.get(key)
        if cid is None:
            self._db.execute("INSERT OR IGNORE INTO channel_sets (names) VALUES (?)", (key,))
            row = self._db.execute("SELECT id FROM channel_sets WHERE names=?", (key,)).fetchone()
            cid = row[0]
            self._channel_ids[key] = cid
            self._channel_names[cid] = list(channels)
        return cid

    def _rows(self, m: DeviceMessage) -> tuple[str, list[tuple]]:
        """(table, rows) for one message; ValueError if it holds a value SQLite cannot keep."""
        d, p = m.device, m.profile
        if isinstance(m, Telemetry):
            cid = self._channel_set(m.channels)
            rows = [(d, m.seq, i, _us(r.t), p, r.flags, cid, _json(r.values))
                    for i, r in enumerate(m.readings)]
            # msgspec spells NaN and inf as null; only then check for them exactly.
            for i, r in enumerate(m.readings):
                if b"null" in rows[i][7] and not _finite(v for v in r.values if v is not None):
                    raise ValueError(f"reading {i} holds a non-finite value")
            return "telemetry", rows
        if isinstance(m, Features):
            if not _finite(m.values):
                raise ValueError("non-finite feature value")
            return "features", [(d, m.seq, _us(m.window_end), p, m.feature_set, m.window_start,
                                 _json(m.names), _json(m.values), m.flags)]
        if isinstance(m, Inference):
            if not _finite((m.score, m.latency_us)):
                raise ValueError("non-finite score or latency")
            return "inference", [(d, m.seq, _us(m.window_end), p, m.model_version, m.feature_set,
                                  m.role, m.score, int(m.anomaly), m.latency_us)]
        if isinstance(m, Alert):
            if not _finite((m.value,)):
                raise ValueError("non-finite alert value")
            return "alerts", [(d, m.seq, _us(m.window_end), p, m.rule, m.severity, m.value,
                               m.message)]
        if isinstance(m, Status):
            if not _finite((m.uptime_s,)):
                raise ValueError("non-finite uptime")
            return "agent_health", [(d, p, _us(m.ts), m.seq, m.state, m.outbox_depth,
                                     m.uptime_s, m.agent_version, m.model_version)]
        if isinstance(m, Deployment):
            return "deployments", [(d, m.seq, _us(m.ts), p, m.model_version, m.state, m.reason,
                                    m.chunks_have, m.chunks_total)]
        raise ValueError(f"not a device message: {type(m).__name__}")

    def write(self, messages: Sequence[DeviceMessage]) -> WriteOutcome:
        if self._db is None:
            raise StoreError("SQLiteStore.write called before open()")
        rejected: list[tuple[int, str]] = []
        with self._lock:
            db = self._db
            try:
                prepared = []  # (index, table, rows); new channel sets commit on their own
                for i, m in enumerate(messages):
                    try:
                        prepared.append((i, *self._rows(m)))
                    except _ROW_ERRORS as exc:
                        rejected.append((i, f"unstorable: {exc}"))
                db.execute("BEGIN IMMEDIATE")
                try:
                    try:
                        self._insert(db, prepared)
                    except _ROW_ERRORS:  # one message SQLite cannot take: isolate it
                        db.execute("ROLLBACK")
                        db.execute("BEGIN IMMEDIATE")
                        rejected += self._insert_one_by_one(db, prepared)
                    self._housekeep(db)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:  # disk full, I/O error, locked: none stored
                raise StoreUnavailable(f"SQLite store {self.path}: {exc}") from exc
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"SQLite store {self.path}: {exc}") from exc
        return WriteOutcome(sorted(rejected))

    @staticmethod
    def _insert(db: sqlite3.Connection, prepared: list[tuple[int, str, list[tuple]]]) -> None:
        by_table: dict[str, list[tuple]] = {}
        for _, table, rows in prepared:
            by_table.setdefault(table, []).extend(rows)
        devices = {(row[0],) for _, _, rows in prepared for row in rows[:1]}
        db.executemany("INSERT OR IGNORE INTO devices VALUES (?)", devices)
        for table, rows in by_table.items():
            db.executemany(_INSERT[table], rows)

    def _insert_one_by_one(
        self, db: sqlite3.Connection, prepared: list[tuple[int, str, list[tuple]]]
    ) -> list[tuple[int, str]]:
        rejected = []
        for item in prepared:
            db.execute("SAVEPOINT message")
            try:
                self._insert(db, [item])
            except _ROW_ERRORS as exc:
                db.execute("ROLLBACK TO message")
                rejected.append((item[0], f"unstorable: {exc}"))
            db.execute("RELEASE message")
        return rejected

    # -- retention and size cap ---------------------------------------------------------------

    def _housekeep(self, db: sqlite3.Connection) -> None:
        now = time.monotonic()
        if self.retention_s is not None and now - self._last_retention >= self._housekeeping_s:
            self._last_retention = now
            cutoff = _us(time.time() - self.retention_s)
            for table in _EVICTION_ORDER:
                self._delete_before(db, table, cutoff)
        if self.max_bytes is None:
            return
        for table in _EVICTION_ORDER:
            while self._used_bytes(db) > self.max_bytes:
                span = db.execute(f"SELECT MIN(t_us), MAX(t_us) FROM {table}").fetchone()
                if span[0] is None:
                    break
                lo, hi = span
                self._delete_before(db, table, lo + max(1, (hi - lo) // 10))

    @staticmethod
    def _used_bytes(db: sqlite3.Connection) -> int:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * db.execute("PRAGMA page_size").fetchone()[0]

    @staticmethod
    def _delete_before(db: sqlite3.Connection, table: str, cutoff_us: int) -> None:
        if table == "telemetry":  # per device, so that the (device, t_us) index serves it
            devices = [d for (d,) in db.execute("SELECT device FROM devices")]
            db.executemany("DELETE FROM telemetry WHERE device=? AND t_us<?",
                           [(d, cutoff_us) for d in devices])
        else:
            db.execute(f"DELETE FROM {table} WHERE t_us<?", (cutoff_us,))

    # -- read ---------------------------------------------------------------------------------

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        if self._reader is None:
            raise StoreError("SQLiteStore read before open()")
        with self._read_lock:
            try:
                return self._reader.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"SQLite store {self.path}: {exc}") from exc

    def telemetry(
        self, device: str, start: float | None = None, end: float | None = None
    ) -> list[TelemetryRow]:
        clause, params = _time_clause(start, end)
        sql = "SELECT seq, idx, t_us, flags, channel_set, vals FROM telemetry WHERE device=?" + clause
        rows = self._read(sql + " ORDER BY t_us, seq, idx", [device, *params])
        out = []
        for seq, idx, t_us, flags, cid, vals in rows:
            names = self._channel_names.get(cid) or self._load_channel_set(cid)
            values = {n: v for n, v in zip(names, _values(vals)) if v is not None}
            out.append(TelemetryRow(device, seq, idx, t_us / 1e6, values, flags))
        return out

    def _load_channel_set(self, cid: int) -> list[str]:
        (names,) = self._read("SELECT names FROM channel_sets WHERE id=?", (cid,))[0]
        return msgspec.json.decode(names)

    def count(self, kind: str, device: str | None = None) -> int:
        if kind not in MEASUREMENTS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(MEASUREMENTS)}")
        return self._count(f"SELECT COUNT(*) FROM {MEASUREMENTS[kind]} WHERE 1", device)

    def anomaly_count(self, device: str | None = None) -> int:
        sql = "SELECT COUNT(*) FROM inference WHERE role='champion' AND anomaly=1"
        return self._count(sql, device)

    def _count(self, sql: str, device: str | None) -> int:
        if device:
            return self._read(sql + " AND device=?", (device,))[0][0]
        return self._read(sql)[0][0]
