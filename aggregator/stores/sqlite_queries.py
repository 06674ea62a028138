"""The API/dashboard queries (``base.Store``) for the embedded SQLite store.

A mixin of ``SQLiteStore``: it reads through the store's ``_read`` (the reader connection) and
answers exactly what the InfluxDB store answers (tests/test_store_queries.py runs both). Telemetry
values live in a JSON array per reading whose order is its channel set, so a channel's position
differs between channel sets: the queries pick it per set with a ``CASE`` over bound parameters
and let SQLite's ``json_extract`` read it. Identifiers never reach the SQL text; the aggregate
function comes from a fixed map.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .base import DEFAULT_FEATURE_LIMIT, check_feature_query, finish_feature_rows
from .queries import check_device, check_field, check_profile, check_range, check_series
from .queries import check_limit, check_window_series, empty_aggregates

__all__ = ["SQLiteQueries"]

_SQL_AGG = {"mean": "AVG", "min": "MIN", "max": "MAX"}
_values = msgspec.json.Decoder(list[float | None]).decode
_names = msgspec.json.Decoder(list[str]).decode
_floats = msgspec.json.Decoder(list[float]).decode


def _us(t: float) -> int:
    return round(t * 1e6)


def _time_clause(start: float | None, end: float | None) -> tuple[str, list[Any]]:
    sql, params = "", []
    if start is not None:
        sql += " AND t_us>=?"
        params.append(_us(start))
    if end is not None:
        sql += " AND t_us<?"
        params.append(_us(end))
    return sql, params


class SQLiteQueries:
    """Read queries over the SQLite schema of ``sqlite.py``."""

    _read: Any  # provided by SQLiteStore

    def _positions(self, field: str) -> tuple[str, list[Any]]:
        """A SQL expression for ``field``'s value in a row, and its parameters (None if absent)."""
        cases: list[Any] = []
        for cid, names in self._read("SELECT id, names FROM channel_sets"):
            names = msgspec.json.decode(names)
            if field in names:
                cases += [cid, f"$[{names.index(field)}]"]
        if not cases:
            return "", []
        whens = " ".join(["WHEN ? THEN ?"] * (len(cases) // 2))
        return f"json_extract(vals, CASE channel_set {whens} END)", cases

    def series(self, device, field, start, end, every_s=60.0, agg="mean"):
        q = check_series(device, field, start, end, every_s, agg)
        expr, params = self._positions(q.field)
        if not expr:
            return []
        sql = (
            f"SELECT b, {_SQL_AGG[q.agg]}(v) FROM (SELECT (t_us / ?) * ? AS b, {expr} AS v"
            " FROM telemetry WHERE device=? AND t_us>=? AND t_us<?)"
            " WHERE v IS NOT NULL GROUP BY b ORDER BY b"
        )
        args = [q.every_us, q.every_us, *params, q.device, q.start_us, q.end_us]
        return [(b / 1e6, float(v)) for b, v in self._read(sql, args)]

    def latest(self, device):
        check_device(device)
        rows = self._read(
            "SELECT seq, idx, t_us, flags, channel_set, vals FROM telemetry WHERE device=?"
            " ORDER BY t_us DESC, seq DESC, idx DESC LIMIT 1",
            (device,),
        )
        if not rows:
            return {}
        seq, idx, t_us, flags, cid, vals = rows[0]
        ((names,),) = self._read("SELECT names FROM channel_sets WHERE id=?", (cid,))
        values = {
            n: v for n, v in zip(msgspec.json.decode(names), _values(vals)) if v is not None
        }
        return {"time": t_us / 1e6, "seq": seq, "idx": idx, "flags": flags, "values": values}

    def fleet_aggregates(self, profile, field, start=None, end=None):
        check_profile(profile)
        check_field(field)
        start, end = check_range(start, end)
        expr, params = self._positions(field)
        if not expr:
            return empty_aggregates()
        where, times = _time_clause(start, end)
        sql = (
            f"SELECT AVG(v), MIN(v), MAX(v), COUNT(v) FROM (SELECT {expr} AS v FROM telemetry"
            f" WHERE profile=?{where})"
        )
        mean, lo, hi, n = self._read(sql, [*params, profile, *times])[0]
        if not n:
            return empty_aggregates()
        return {"mean": float(mean), "min": float(lo), "max": float(hi), "count": n}

    def anomaly_counts(self, start=None, end=None):
        start, end = check_range(start, end)
        where, params = _time_clause(start, end)
        sql = (
            "SELECT device, COUNT(*) FROM inference WHERE role='champion' AND anomaly=1"
            f"{where} GROUP BY device"
        )
        return {device: n for device, n in self._read(sql, params)}

    def alert_counts(self, start=None, end=None):
        start, end = check_range(start, end)
        where, params = _time_clause(start, end)
        sql = f"SELECT device, severity, COUNT(*) FROM alerts WHERE 1{where} GROUP BY 1, 2"
        out: dict[str, dict[str, int]] = {}
        for device, severity, n in self._read(sql, params):
            out.setdefault(device, {})[severity] = n
        return out

    # -- the dashboard's device page ----------------------------------------------------------

    def window_series(self, kind, device, field, start, end, every_s=60.0, agg="mean"):
        q = check_window_series(kind, device, field, start, end, every_s, agg)
        if kind == "inference":
            # The column name comes from the fixed INFERENCE_FIELDS, never from the caller's text.
            column = {"score": "score", "latency_us": "latency_us"}[q.field]
            inner = f"SELECT (t_us / ?) * ? AS b, {column} AS v FROM inference WHERE role='champion'"
            args: list[Any] = [q.every_us, q.every_us]
        else:
            # A feature's position differs between feature sets: find it in each row's names.
            inner = (
                "SELECT (t_us / ?) * ? AS b, (SELECT j.value FROM json_each(vals) j WHERE j.key ="
                " (SELECT n.key FROM json_each(names) n WHERE n.value = ?)) AS v FROM features WHERE 1"
            )
            args = [q.every_us, q.every_us, q.field]
        sql = (
            f"SELECT b, {_SQL_AGG[q.agg]}(v) FROM ({inner} AND device=? AND t_us>=? AND t_us<?)"
            " WHERE v IS NOT NULL GROUP BY b ORDER BY b"
        )
        rows = self._read(sql, [*args, q.device, q.start_us, q.end_us])
        return [(b / 1e6, float(v)) for b, v in rows]

    def recent_alerts(self, start=None, end=None, device=None, limit=100):
        start, end = check_range(start, end)
        check_limit(limit)
        where, params = _time_clause(start, end)
        if device is not None:
            check_device(device)
            where += " AND device=?"
            params.append(device)
        sql = (
            "SELECT device, seq, t_us, profile, rule, severity, value, message FROM alerts"
            f" WHERE 1{where} ORDER BY t_us DESC, device, seq DESC LIMIT ?"
        )
        keys = ("device", "seq", "time", "profile", "rule", "severity", "value", "message")
        out = []
        for row in self._read(sql, [*params, limit]):
            alert = dict(zip(keys, row))
            alert["time"] /= 1e6
            out.append(alert)
        return out

    def model_changes(self, device, start=None, end=None):
        check_device(device)
        start, end = check_range(start, end)
        where, params = _time_clause(start, end)
        sql = (
            "SELECT MIN(t_us), model_version FROM inference WHERE role='champion' AND device=?"
            f"{where} GROUP BY model_version ORDER BY 1"
        )
        return [(t / 1e6, version) for t, version in self._read(sql, [device, *params])]

    def device_fields(self, device):
        check_device(device)
        rows = self._read(
            "SELECT names FROM features WHERE device=? ORDER BY t_us DESC, seq DESC LIMIT 1",
            (device,),
        )
        features = sorted(msgspec.json.decode(rows[0][0])) if rows else []
        return {"telemetry": sorted(self.latest(device).get("values", {})), "features": features}

    def feature_rows(self, profile, start, end, *, feature_set, names=None, exclude_flagged=True,
                     limit=DEFAULT_FEATURE_LIMIT):
        q = check_feature_query(profile, start, end, feature_set, names, exclude_flagged, limit)
        where, params = _time_clause(q.start, q.end)
        if q.exclude_flagged:
            where += " AND flags=0"
        sql = (
            "SELECT t_us, device, seq, names, vals FROM features WHERE profile=? AND feature_set=?"
            f"{where} ORDER BY t_us DESC, device DESC, seq DESC LIMIT ?"
        )
        rows = [
            (t_us, device, seq, dict(zip(_names(n), _floats(v))))
            for t_us, device, seq, n, v in self._read(sql, [q.profile, q.feature_set, *params,
                                                            q.limit])
        ]
        return finish_feature_rows(q, rows)
