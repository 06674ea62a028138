"""The alert feed: stored alerts with acknowledgement and silences, and optional webhook delivery.

Devices fire alerts from their local rules (``wire.Alert``); the ingest stores them like any other
message. This module adds what people need on top, without touching the ingest:

* :class:`AlertBook` keeps acknowledgements and silences in a SQLite file in the aggregator's
  state directory (``alerts.sqlite``), so they survive restarts. An alert's id is
  ``"<device>:<seq>"``: device ids cannot hold a colon, and (device, seq) is already the key the
  stores deduplicate on. A silence mutes a device, a rule, or one rule on one device until a time.
* :func:`feed` joins the store's :meth:`~aggregator.stores.base.Store.recent_alerts` with that state.
* :class:`WebhookSender` POSTs alerts as JSON to a URL from a bounded queue on its own thread,
  retrying with exponential backoff; a full queue drops (and counts) rather than waits.
* :class:`AlertWatcher` polls the store for new alerts and hands the unsilenced ones to the
  sender. Polling the store keeps webhooks off the ingest's hot path entirely: a slow or dead
  webhook can never delay a durable write. Which alerts were notified is kept in the book, so a
  restart does not notify them twice; alerts stored more than ``lookback_s`` later than their
  device time (a long outage's backlog) are not notified.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from aggregator.stores.queries import MAX_TIME_S, check_device, check_limit
from edgeloop.wire import NAME_PATTERN

__all__ = ["AlertSettings", "AlertBook", "WebhookSender", "AlertWatcher", "feed", "alert_id", "parse_alert_id"]

log = logging.getLogger(__name__)


class AlertSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``[alerts]`` of the aggregator configuration: where to deliver new alerts, if anywhere."""

    webhook_url: str | None = None  # http(s)://...; unset: no delivery, the feed still works
    webhook_timeout_s: Annotated[float, Meta(gt=0, le=60)] = 5.0
    retries: Annotated[int, Meta(ge=0, le=20)] = 5  # attempts after the first
    backoff_s: Annotated[float, Meta(gt=0, le=60)] = 1.0  # doubled after each failed attempt
    queue_size: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    poll_s: Annotated[float, Meta(gt=0, le=600)] = 2.0
    lookback_s: Annotated[float, Meta(gt=0, le=86400)] = 600.0


def alert_id(device: str, seq: int) -> str:
    return f"{device}:{seq}"


def parse_alert_id(text: str) -> tuple[str, int]:
    """(device, seq) of an alert id; ValueError naming what is wrong."""
    device, sep, seq = text.rpartition(":")
    if not sep or not seq.isdigit():
        raise ValueError(f"invalid alert id {text!r}: expected DEVICE:SEQ, e.g. press-7:42")
    return check_device(device, "alert id device"), int(seq)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS acks (device TEXT NOT NULL, seq INTEGER NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (device, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS silences (id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT, rule TEXT,
    until REAL NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS notified (device TEXT NOT NULL, seq INTEGER NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (device, seq)) WITHOUT ROWID;
"""

_NAME = re.compile(NAME_PATTERN)


class AlertBook:
    """Acknowledgements, silences and notified alerts in one SQLite file; thread-safe."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def _sql(self, sql: str, params=()) -> list[tuple]:
        with self._lock:
            if self._db is None:
                raise RuntimeError(f"alert book {self.path} is closed")
            return self._db.execute(sql, params).fetchall()

    def ack(self, device: str, seq: int, at: float | None = None) -> float:
        """Acknowledge one alert; acknowledging again keeps the first time. Returns that time."""
        self._sql("INSERT OR IGNORE INTO acks VALUES (?,?,?)", (device, seq, at or time.time()))
        return self._sql("SELECT at FROM acks WHERE device=? AND seq=?", (device, seq))[0][0]

    def acks(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], float]:
        out: dict[tuple[str, int], float] = {}
        for i in range(0, len(keys), 400):  # stay under SQLite's bound-parameter limit
            part = keys[i:i + 400]
            where = " OR ".join(["(device=? AND seq=?)"] * len(part))
            for device, seq, at in self._sql(f"SELECT device, seq, at FROM acks WHERE {where}",
                                             [x for k in part for x in k]):
                out[(device, seq)] = at
        return out

    def silence(self, device: str | None, rule: str | None, until: float) -> dict:
        """Mute alerts of ``device`` (any rule), of ``rule`` (any device), or both, until ``until``."""
        if device is None and rule is None:
            raise ValueError("a silence needs a device, a rule or both")
        if device is not None:
            check_device(device)
        if rule is not None and (not isinstance(rule, str) or not _NAME.match(rule)):
            raise ValueError(f"invalid rule {rule!r}: must match {NAME_PATTERN}")
        if isinstance(until, bool) or not isinstance(until, (int, float)) or not time.time() < until <= MAX_TIME_S:
            raise ValueError(f"invalid until {until!r}: expected a future time in seconds since the epoch")
        now = time.time()
        with self._lock:
            if self._db is None:
                raise RuntimeError(f"alert book {self.path} is closed")
            cur = self._db.execute("INSERT INTO silences (device, rule, until, created) VALUES (?,?,?,?)",
                                   (device, rule, float(until), now))
            sid = cur.lastrowid
        return {"id": sid, "device": device, "rule": rule, "until": float(until), "created": now}

    def unsilence(self, silence_id: int) -> bool:
        """Remove a silence; False if there was none with that id."""
        with self._lock:
            if self._db is None:
                raise RuntimeError(f"alert book {self.path} is closed")
            return self._db.execute("DELETE FROM silences WHERE id=?", (silence_id,)).rowcount > 0

    def silences(self, now: float | None = None) -> list[dict]:
        """The silences still in force at ``now``, oldest first."""
        rows = self._sql("SELECT id, device, rule, until, created FROM silences WHERE until > ? ORDER BY id",
                         (now if now is not None else time.time(),))
        return [dict(zip(("id", "device", "rule", "until", "created"), r)) for r in rows]

    @staticmethod
    def silenced_by(alert: dict, silences: list[dict]) -> int | None:
        """The id of the first silence that mutes ``alert``, else None."""
        for s in silences:
            if (s["device"] in (None, alert["device"])) and (s["rule"] in (None, alert["rule"])):
                return s["id"]
        return None

    def mark_notified(self, device: str, seq: int) -> bool:
        """Record that ``device:seq`` was handed to the webhook; False if it already was."""
        with self._lock:
            if self._db is None:
                raise RuntimeError(f"alert book {self.path} is closed")
            return self._db.execute("INSERT OR IGNORE INTO notified VALUES (?,?,?)",
                                    (device, seq, time.time())).rowcount > 0

    def forget_notified(self, older_than: float) -> None:
        self._sql("DELETE FROM notified WHERE at < ?", (older_than,))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def feed(store, book: AlertBook, start: float | None = None, end: float | None = None,
         device: str | None = None, limit: int = 100, now: float | None = None) -> list[dict]:
    """The newest stored alerts, each with ``id``, ``acked_at`` (None if not acknowledged) and
    ``silenced_by`` (the muting silence's id, or None)."""
    check_limit(limit)
    alerts = store.recent_alerts(start, end, device=device, limit=limit)
    acks = book.acks([(a["device"], a["seq"]) for a in alerts])
    silences = book.silences(now)
    for a in alerts:
        a["id"] = alert_id(a["device"], a["seq"])
        a["acked_at"] = acks.get((a["device"], a["seq"]))
        a["silenced_by"] = book.silenced_by(a, silences)
    return alerts


class WebhookSender:
    """POST each submitted alert as JSON to ``url`` from a daemon thread, with retries.

    ``submit`` never blocks: past ``queue_size`` waiting alerts it drops and counts. An attempt
    fails on a connection error, a timeout or a non-2xx answer; after a failure the sender waits
    ``backoff_s``, doubled each time (capped at 60 s), for at most ``retries`` more attempts.
    """

    def __init__(self, url: str, *, timeout_s: float = 5.0, retries: int = 5, backoff_s: float = 1.0,
                 queue_size: int = 1000) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"invalid webhook url {url!r}: expected http:// or https://")
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self.delivered = self.failed = self.dropped = self.attempts = 0
        self._thread = threading.Thread(target=self._run, name="alert-webhook", daemon=True)
        self._thread.start()

    def submit(self, alert: dict) -> bool:
        try:
            self._queue.put_nowait(alert)
            return True
        except queue.Full:
            self.dropped += 1
            log.warning("alert webhook queue full (%d): dropped %s", self._queue.maxsize, alert.get("id"))
            return False

    def _post(self, body: bytes) -> None:
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "edgeloop"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            resp.read()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                alert = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            body = json.dumps({"kind": "edgeloop.alert", "alert": alert}).encode()
            delay = self.backoff_s
            for attempt in range(self.retries + 1):
                self.attempts += 1
                try:
                    self._post(body)
                    self.delivered += 1
                    break
                except (urllib.error.URLError, OSError, ValueError) as exc:
                    log.warning("alert webhook %s attempt %d failed: %s", self.url, attempt + 1, exc)
                    if attempt == self.retries or self._stop.wait(delay):
                        self.failed += 1
                        break
                    delay = min(delay * 2, 60.0)

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)


class AlertWatcher:
    """Polls ``store`` every ``poll_s`` for alerts of the last ``lookback_s`` and submits each
    unsilenced one not notified before to ``sender``; see the module docstring."""

    def __init__(self, store, book: AlertBook, sender: WebhookSender, *, poll_s: float = 2.0,
                 lookback_s: float = 600.0) -> None:
        self.store, self.book, self.sender = store, book, sender
        self.poll_s, self.lookback_s = poll_s, lookback_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alert-watcher", daemon=True)

    def start(self) -> "AlertWatcher":
        self._thread.start()
        return self

    def poll_once(self, now: float | None = None) -> int:
        """One look at the store; returns how many alerts were handed to the sender."""
        now = time.time() if now is None else now
        silences = self.book.silences(now)
        handed = 0
        for a in reversed(self.store.recent_alerts(max(0.0, now - self.lookback_s), None, limit=1000)):
            a["id"] = alert_id(a["device"], a["seq"])
            # A silenced alert counts as notified: it stays quiet when the silence ends.
            if self.book.mark_notified(a["device"], a["seq"]) and self.book.silenced_by(a, silences) is None:
                self.sender.submit(a)
                handed += 1
        self.book.forget_notified(now - 2 * self.lookback_s - 86400)
        return handed

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll_once()
            except Exception as exc:  # a store outage: try again next round
                log.warning("alert watcher could not read the store: %s", exc)

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
