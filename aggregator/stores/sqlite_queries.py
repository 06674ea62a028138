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

from .queries import check_device, check_field, check_profile, check_range, check_series
from .queries import empty_aggregates

__all__ = ["SQLiteQueries"]

_SQL_AGG = {"mean": "AVG", "min": "MIN", "max": "MAX"}
_values = msgspec.json.Decoder(list[float | None]).decode


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
