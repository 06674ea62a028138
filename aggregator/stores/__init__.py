"""Time-series stores behind one interface (``base.Store``): InfluxDB, and embedded SQLite.

``make_store`` picks one from configuration; the stores share one schema (measurement/table per
message kind, device timestamps; docs/storage.md) and pass the same contract tests.
"""

from __future__ import annotations

from .base import FLAG_TIME_ADJUSTED, Store, StoreError, StoreUnavailable, TelemetryRow
from .base import WriteOutcome
from .influx import InfluxStore
from .retention import Retention
from .sqlite import SQLiteStore

__all__ = [
    "FLAG_TIME_ADJUSTED",
    "Retention",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TelemetryRow",
    "WriteOutcome",
    "InfluxStore",
    "SQLiteStore",
    "make_store",
]

DEFAULT_DATABASE = "edgeloop"


def make_store(
    influx_url: str | None = None,
    database: str | None = None,
    org: str | None = None,
    token: str | None = None,
    username: str | None = None,
    password: str | None = None,
    sqlite_path: str | None = None,
    retention: Retention | None = Retention(),
) -> Store:
    """The store the configuration names, not yet opened.

    With ``influx_url`` an :class:`InfluxStore` on ``database`` (default "edgeloop"; the bucket on
    InfluxDB 2.x/3.x, which also need ``token`` and ``org``); otherwise the embedded
    :class:`SQLiteStore` at ``sqlite_path``. ``influx_url`` wins when both are given: the SQLite
    path is the fallback for when no InfluxDB is configured. ``retention``: the retention
    policies and downsampling ``open()`` sets up on InfluxDB 1.x (None: leave them alone).
    """
    if influx_url:
        if not influx_url.startswith(("http://", "https://")):
            raise ValueError(f"influx_url must start with http:// or https://, got {influx_url!r}")
        return InfluxStore(
            influx_url,
            database or DEFAULT_DATABASE,
            username=username or None,
            password=password or None,
            token=token or None,
            org=org or None,
            retention=retention,
        )
    if sqlite_path:
        return SQLiteStore(sqlite_path)
    raise ValueError("no store configured: give influx_url (InfluxDB) or sqlite_path (embedded)")
