"""The reads of the InfluxDB store: contract reads, API/dashboard queries, training rows, the time
guard's look-ups.

A mixin of ``InfluxStore``, reading through its ``query`` (InfluxQL over ``/query``, which every
InfluxDB generation serves). Values always go through bound parameters (``$device``, ``$start``,
...; InfluxQL binds in WHERE only). Identifiers cannot be bound: measurement names are constants
here, and a caller's channel name reaches the statement text only after ``queries.check_field``
matched it against the wire contract's NAME pattern, double-quoted. Times are bound as integer
nanoseconds (a bare number is nanoseconds to InfluxQL) and read back in microseconds.
"""

from __future__ import annotations

from typing import Any

from .base import DEFAULT_FEATURE_LIMIT, FeatureRows, StoreError, TelemetryRow, check_feature_query
from .base import finish_feature_rows
from .lineproto import MEASUREMENTS
from .queries import check_device, check_field, check_profile, check_range, check_series
from .queries import check_limit, check_window_series, empty_aggregates

__all__ = ["InfluxQueries"]

#: Columns of the telemetry measurement that are not channels.
_TELEMETRY_META = frozenset({"time", "device", "profile", "seq", "idx", "flags"})
#: Columns of the features measurement that are not features (tags and bookkeeping fields).
_FEATURE_META = frozenset({"time", "device", "profile", "feature_set", "seq", "flags"})


def _ns(t: float) -> int:
    return round(t * 1e6) * 1000


def _time_where(start: float | None, end: float | None, where: list[str], params: dict) -> None:
    if start is not None:
        where.append("time >= $start")
        params["start"] = _ns(start)
    if end is not None:
        where.append("time < $end")
        params["end"] = _ns(end)


def _clause(where: list[str]) -> str:
    return f" WHERE {' AND '.join(where)}" if where else ""


class InfluxQueries:
    """Reads over the schema of ``lineproto``; needs ``self.query`` (InfluxStore)."""

    query: Any
    database: str
    retention: Any

    # -- the store contract's reads -----------------------------------------------------------

    def telemetry(
        self, device: str, start: float | None = None, end: float | None = None
    ) -> list[TelemetryRow]:
        where, params = ['"device" = $device'], {"device": device}
        _time_where(start, end, where, params)
        rows: list[TelemetryRow] = []
        for series in self.query(f'SELECT * FROM "telemetry"{_clause(where)}', params):
            cols = series["columns"]
            pos = {c: k for k, c in enumerate(cols)}
            it, iseq, iidx, iflags = pos["time"], pos["seq"], pos["idx"], pos["flags"]
            channels = [(c, k) for k, c in enumerate(cols) if c not in _TELEMETRY_META]
            for v in series.get("values") or []:
                values = {c: float(v[k]) for c, k in channels if v[k] is not None}
                flags = v[iflags] or 0
                rows.append(TelemetryRow(device, v[iseq], v[iidx], v[it] / 1e6, values, flags))
        return rows

    def _count(self, measurement: str, field: str, where: list[str], params: dict) -> int:
        total = 0
        statement = f'SELECT COUNT("{field}") FROM "{measurement}"{_clause(where)}'
        for series in self.query(statement, params):
            for row in series.get("values") or []:
                total += int(row[1] or 0)
        return total

    def count(self, kind: str, device: str | None = None) -> int:
        if kind not in MEASUREMENTS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(MEASUREMENTS)}")
        where, params = (['"device" = $device'], {"device": device}) if device else ([], {})
        return self._count(MEASUREMENTS[kind], "seq", where, params)

    def anomaly_count(self, device: str | None = None) -> int:
        where = ['"role" = $role', '"anomaly" = true']
        params: dict[str, Any] = {"role": "champion"}
        if device:
            where.append('"device" = $device')
            params["device"] = device
        return self._count("inference", "score", where, params)

    # -- API / dashboard queries --------------------------------------------------------------

    def series(self, device, field, start, end, every_s=60.0, agg="mean"):
        q = check_series(device, field, start, end, every_s, agg)
        statement = (
            f'SELECT {q.agg}("{q.field}") FROM "telemetry" WHERE "device" = $device'
            f" AND time >= $start AND time < $end GROUP BY time({q.every_us}u) fill(none)"
        )
        params = {"device": q.device, "start": q.start_us * 1000, "end": q.end_us * 1000}
        return [
            (t / 1e6, float(v))
            for series in self.query(statement, params)
            for t, v in series.get("values") or []
            if v is not None
        ]

    def latest(self, device):
        check_device(device)
        statement = 'SELECT * FROM "telemetry" WHERE "device" = $device ORDER BY time DESC LIMIT 1'
        for series in self.query(statement, {"device": device}):
            cols = series["columns"]
            for v in series.get("values") or []:
                row = dict(zip(cols, v))
                values = {
                    c: float(x) for c, x in row.items() if c not in _TELEMETRY_META and x is not None
                }
                return {
                    "time": row["time"] / 1e6,
                    "seq": row["seq"],
                    "idx": row["idx"],
                    "flags": row["flags"] or 0,
                    "values": values,
                }
        return {}

    def fleet_aggregates(self, profile, field, start=None, end=None):
        check_profile(profile)
        check_field(field)
        start, end = check_range(start, end)
        where, params = ['"profile" = $profile'], {"profile": profile}
        _time_where(start, end, where, params)
        statement = (
            f'SELECT mean("{field}"), min("{field}"), max("{field}"), count("{field}")'
            f' FROM "telemetry"{_clause(where)}'
        )
        for series in self.query(statement, params):
            for _, mean, lo, hi, n in series.get("values") or []:
                if n:
                    return {"mean": float(mean), "min": float(lo), "max": float(hi), "count": n}
        return empty_aggregates()

    def _per_device(self, statement: str, params: dict) -> list[tuple[dict, int]]:
        return [
            (series.get("tags") or {}, int(row[1] or 0))
            for series in self.query(statement, params)
            for row in series.get("values") or []
        ]

    def anomaly_counts(self, start=None, end=None):
        start, end = check_range(start, end)
        where, params = ['"role" = $role', '"anomaly" = true'], {"role": "champion"}
        _time_where(start, end, where, params)
        statement = f'SELECT COUNT("score") FROM "inference"{_clause(where)} GROUP BY "device"'
        return {tags["device"]: n for tags, n in self._per_device(statement, params) if n}

    def alert_counts(self, start=None, end=None):
        start, end = check_range(start, end)
        where: list[str] = []
        params: dict = {}
        _time_where(start, end, where, params)
        statement = (
            f'SELECT COUNT("value") FROM "alerts"{_clause(where)} GROUP BY "device", "severity"'
        )
        out: dict[str, dict[str, int]] = {}
        for tags, n in self._per_device(statement, params):
            if n:
                out.setdefault(tags["device"], {})[tags["severity"]] = n
        return out

    # -- the dashboard's device page ----------------------------------------------------------

    def window_series(self, kind, device, field, start, end, every_s=60.0, agg="mean"):
        q = check_window_series(kind, device, field, start, end, every_s, agg)
        where = '"device" = $device AND time >= $start AND time < $end'
        params: dict[str, Any] = {"device": q.device, "start": q.start_us * 1000, "end": q.end_us * 1000}
        if kind == "inference":
            where += ' AND "role" = $role'
            params["role"] = "champion"
        statement = (
            f'SELECT {q.agg}("{q.field}") FROM "{kind}" WHERE {where}'
            f" GROUP BY time({q.every_us}u) fill(none)"
        )
        return [
            (t / 1e6, float(v))
            for series in self.query(statement, params)
            for t, v in series.get("values") or []
            if v is not None
        ]

    def recent_alerts(self, start=None, end=None, device=None, limit=100):
        start, end = check_range(start, end)
        check_limit(limit)
        where: list[str] = []
        params: dict[str, Any] = {}
        _time_where(start, end, where, params)
        if device is not None:
            where.append('"device" = $device')
            params["device"] = check_device(device)
        statement = (
            'SELECT "device", "seq", "profile", "rule", "severity", "value", "message"'
            f' FROM "alerts"{_clause(where)} ORDER BY time DESC LIMIT {int(limit)}'
        )
        out = []
        for series in self.query(statement, params):
            cols = series["columns"]
            for v in series.get("values") or []:
                row = dict(zip(cols, v))
                out.append({
                    "device": row["device"], "seq": row["seq"], "time": row["time"] / 1e6,
                    "profile": row["profile"] or "", "rule": row["rule"], "severity": row["severity"],
                    "value": float(row["value"]), "message": row["message"] or "",
                })
        return out

    def model_changes(self, device, start=None, end=None):
        check_device(device)
        start, end = check_range(start, end)
        where, params = ['"device" = $device', '"role" = $role'], {"device": device, "role": "champion"}
        _time_where(start, end, where, params)
        statement = f'SELECT FIRST("score") FROM "inference"{_clause(where)} GROUP BY "model_version"'
        changes = [
            (row[0] / 1e6, (series.get("tags") or {}).get("model_version", ""))
            for series in self.query(statement, params)
            for row in series.get("values") or []
        ]
        return sorted(changes)

    def device_fields(self, device):
        check_device(device)
        statement = 'SELECT * FROM "features" WHERE "device" = $device ORDER BY time DESC LIMIT 1'
        meta = {"time", "device", "profile", "feature_set", "seq", "flags"}
        features: list[str] = []
        for series in self.query(statement, {"device": device}):
            cols = series["columns"]
            for v in (series.get("values") or [])[:1]:
                features = [c for c, x in zip(cols, v) if c not in meta and x is not None]
        return {"telemetry": sorted(self.latest(device).get("values", {})), "features": sorted(features)}

    # -- training sets (models.training.load_training_rows) -----------------------------------

    def feature_rows(
        self, profile, start, end, *, feature_set, names=None, exclude_flagged=True,
        limit=DEFAULT_FEATURE_LIMIT,
    ) -> FeatureRows:
        """See ``Store.feature_rows``. Values are bound; the statement text is constant."""
        q = check_feature_query(profile, start, end, feature_set, names, exclude_flagged, limit)
        where = ['"profile" = $profile', '"feature_set" = $feature_set']
        params: dict[str, Any] = {"profile": q.profile, "feature_set": q.feature_set}
        if q.exclude_flagged:
            where.append('"flags" = $flags')
            params["flags"] = 0
        for bound, op, t in (("start", ">=", q.start), ("end", "<", q.end)):
            if t is not None:
                where.append(f"time {op} ${bound}")
                params[bound] = round(t * 1e6) * 1000
        statement = (
            f'SELECT * FROM "features" WHERE {" AND ".join(where)} ORDER BY time DESC'
            f" LIMIT {q.limit}"  # an int checked by check_feature_query
        )
        rows = []
        for series in self.query(statement, params):
            cols = series["columns"]
            it, idev, iseq = cols.index("time"), cols.index("device"), cols.index("seq")
            values = [(c, k) for k, c in enumerate(cols) if c not in _FEATURE_META]
            for v in series.get("values") or []:
                feats = {c: float(v[k]) for c, k in values if v[k] is not None}
                rows.append((v[it], v[idev], v[iseq], feats))
        return finish_feature_rows(q, rows)

    # -- time guard and downsampling ----------------------------------------------------------

    def _stored_points(self, device: str, profile: str, lo_ns: int, hi_ns: int):
        """(time_ns, seq, idx) of the stored telemetry points of one series in [lo_ns, hi_ns]."""
        statement = (
            'SELECT "seq", "idx" FROM "telemetry" WHERE "device" = $device'
            ' AND "profile" = $profile AND time >= $lo AND time <= $hi'
        )
        params = {"device": device, "profile": profile, "lo": lo_ns, "hi": hi_ns}
        try:
            return [
                (t, seq, idx)
                for series in self.query(statement, params, epoch="ns")
                for t, seq, idx in series.get("values") or []
                if seq is not None and idx is not None
            ]
        except StoreError as exc:
            if "database not found" in str(exc):
                return []  # dropped under us: nothing is stored, the write recreates it
            raise

    def _newest_times(self) -> dict[tuple[str, str], int]:
        """Newest stored telemetry time (ns) per (device, profile), to seed the time guard."""
        statement = 'SELECT LAST("seq") FROM "telemetry" GROUP BY "device", "profile"'
        out = {}
        for series in self.query(statement, epoch="ns"):
            tags = series.get("tags") or {}
            for t, _ in series.get("values") or []:
                out[(tags.get("device", ""), tags.get("profile", ""))] = t
        return out

    def downsample(self, start: float, end: float) -> int:
        """Run the downsampling of ``retention`` over past device times [start, end): for points
        the continuous query missed (late arrivals, replays after an outage). Returns the number
        of downsampled points written. InfluxDB 1.x only."""
        if self.retention is None or self.retention.downsample_every is None:
            raise ValueError("downsample needs a retention with downsample_every set")
        start, end = check_range(start, end)
        if start is None or end is None:
            raise ValueError("downsample needs both start and end")
        statement = self.retention.select_into(
            self.database, " WHERE time >= $start AND time < $end"
        )
        written = 0
        for series in self.query(statement, {"start": _ns(start), "end": _ns(end)}):
            for row in series.get("values") or []:
                written += int(row[1] or 0)
        return written
