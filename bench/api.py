"""API latency: ``GET /api/series`` over 24 h of one field at 1 s, on a real InfluxDB.

Target (issue 6): p95 <= 100 ms for 24 h of one field of one device at 1 s resolution (86,400
points), downsampled to <= 1,000 points. The points are written through the InfluxDB store (the
aggregator's own write path), then the aggregator's HTTP app (uvicorn on a free port, the store
behind it) answers ``requests`` sequential requests over one keep-alive connection. Beside it, in
the same run, the baselines: the same downsampling InfluxQL query sent straight to InfluxDB's
``/query`` (what the API costs on top of the database), and the raw 86,400 points read through the
store (what a client without downsampling would wait for).

Run alone: ``python -m bench.api`` (starts its own InfluxDB); ``python -m bench`` calls :func:`run`.
"""

from __future__ import annotations

import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

__all__ = ["run", "table", "POINTS", "TARGET_P95_MS"]

POINTS = 86_400
TARGET_P95_MS = 100.0
DEVICE, FIELD = "bench-api-1", "temp"


def _write_day(store, end: float) -> tuple[float, float]:
    """POINTS readings at 1 s ending before ``end``, through the store; returns (start, seconds taken)."""
    from edgeloop import wire

    start = float(int(end) - POINTS)
    t = time.perf_counter()
    batch = []
    for seq, k0 in enumerate(range(0, POINTS, 1000)):
        readings = [wire.Reading(start + k, [20.0 + (k % 3600) / 360.0], 0) for k in range(k0, min(k0 + 1000, POINTS))]
        batch.append(wire.Telemetry(v=wire.SCHEMA_VERSION, device=DEVICE, seq=seq, ts=start + k0, profile="bench",
                                    channels=[FIELD], readings=readings))
        if len(batch) == 5:  # 5,000 lines per write, InfluxDB's sweet spot here
            assert store.write(batch).rejected == []
            batch = []
    if batch:
        assert store.write(batch).rejected == []
    return start, time.perf_counter() - t


def _timed_gets(host: str, port: int, path: str, n: int, check) -> list[float]:
    """Milliseconds of ``n`` sequential GETs of ``path`` on one keep-alive connection (after 3 warm-ups)."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    out = []
    try:
        for i in range(n + 3):
            t = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            ms = (time.perf_counter() - t) * 1000
            if resp.status != 200:
                raise RuntimeError(f"GET {path} answered {resp.status}: {body[:300]!r}")
            if i == 0:
                check(json.loads(body))
            if i >= 3:
                out.append(ms)
    finally:
        conn.close()
    return out


def _stats(ms: list[float], points: int) -> dict:
    q = statistics.quantiles(ms, n=20, method="inclusive")
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p95_ms": q[18], "max_ms": max(ms), "points": points}


def run(influx, requests: int = 50) -> dict:
    """Write the day into a fresh database of ``influx`` (tests.services.InfluxServer) and measure."""
    from aggregator.http import HttpServer, make_app
    from aggregator.service import Aggregator, AggregatorConfig, MqttSettings
    from aggregator.stores import make_store

    database = influx.new_database("bench_api")
    store = make_store(influx_url=influx.url, database=database)
    store.open()
    tmp = tempfile.TemporaryDirectory(prefix="bench-api-")
    server = None
    agg = None
    try:
        end = time.time() - 60
        start, write_s = _write_day(store, end)
        until = start + POINTS
        agg = Aggregator(AggregatorConfig(data_dir=tmp.name, mqtt=MqttSettings(url="mqtt://127.0.0.1:1")), store=store)
        server = HttpServer(make_app(agg), port=0)
        server.start()
        seen: dict = {}

        def check(body: dict) -> None:
            seen.update(points=len(body["points"]), every=body["every"])
            if not 0 < len(body["points"]) <= 1000:
                raise RuntimeError(f"/api/series answered {len(body['points'])} points")

        path = "/api/series?" + urlencode({"device": DEVICE, "field": FIELD, "since": start, "until": until})
        api_ms = _timed_gets("127.0.0.1", server.port, path, requests, check)

        every_us = round(seen["every"] * 1e6)
        influxql = (f'SELECT mean("{FIELD}") FROM "telemetry" WHERE "device" = \'{DEVICE}\' AND time >= {int(start)}s'
                    f" AND time < {int(until)}s GROUP BY time({every_us}u) fill(none)")
        split = urlsplit(influx.url)
        raw_path = "/query?" + urlencode({"db": database, "q": influxql, "epoch": "u"})
        raw_points: dict = {}

        def check_raw(body: dict) -> None:
            raw_points["n"] = len(body["results"][0]["series"][0]["values"])

        influx_ms = _timed_gets(split.hostname, split.port, raw_path, requests, check_raw)

        full_ms = []
        for _ in range(3):
            t = time.perf_counter()
            rows = store.telemetry(DEVICE, start, until)
            full_ms.append((time.perf_counter() - t) * 1000)
        return {
            "points_written": POINTS, "write_s": write_s, "every_s": seen["every"],
            "api": _stats(api_ms, seen["points"]),
            "influxql": _stats(influx_ms, raw_points["n"]),
            "raw_read": {"n": len(full_ms), "p50_ms": statistics.median(full_ms), "p95_ms": max(full_ms),
                         "max_ms": max(full_ms), "points": len(rows)},
            "target_p95_ms": TARGET_P95_MS,
        }
    finally:
        if server is not None:
            server.stop()
        if agg is not None:
            agg.quarantine.close()
        store.close()
        tmp.cleanup()


def table(result: dict) -> str:
    """The result as a Markdown section body."""
    ok = result["api"]["p95_ms"] <= result["target_p95_ms"]
    lines = [
        f"{result['points_written']:,} points (one field, one device, 1 s apart) written through the InfluxDB store "
        f"in {result['write_s']:.1f} s; the API picked {result['every_s']:g} s intervals. "
        f"Target: API p95 <= {result['target_p95_ms']:.0f} ms ({'met' if ok else 'NOT met'}).",
        "",
        "| request | n | points | p50 ms | p95 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, name in (("api", "GET /api/series (downsampled, through the aggregator)"),
                      ("influxql", "same InfluxQL straight to InfluxDB /query (baseline)"),
                      ("raw_read", "all raw points through the store (no downsampling)")):
        r = result[key]
        lines.append(f"| {name} | {r['n']} | {r['points']:,} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['max_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))  # tests/services.py holds the server harness
    from tests.services import InfluxServer

    with InfluxServer() as influx:
        result = run(influx)
    print(table(result))
    return 0 if result["api"]["p95_ms"] <= TARGET_P95_MS else 1


if __name__ == "__main__":
    sys.exit(main())
