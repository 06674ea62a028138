"""The benchmark cases: InfluxDB's own write rate, the ingest end to end, and a naive writer.

Every case takes running servers (tests/services.py) and uses a fresh database. Each returns a
plain dict of figures; ``bench.report`` turns them into tables. CPU seconds of the broker,
InfluxDB, the aggregator (this process) and the publishers are recorded per case, because on a
small machine they all compete for the same cores and that is usually what bounds a figure.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import urllib3

from bench.load import CHANNELS, LoadSpec, run_publishers
from bench.proc import cpu_s

__all__ = ["influx_write_rate", "publishers_alone", "aggregator_end_to_end", "naive_end_to_end"]





class _Cpu:
    """CPU seconds used by the broker, InfluxDB and this process between start and stop."""

    def __init__(self, broker, influx) -> None:
        self._pids = {"broker": broker.pid, "influxd": influx.pid}
        self.used: dict[str, float] = {}

    def __enter__(self):
        self._t0 = {k: cpu_s(p) for k, p in self._pids.items()}
        self._self0 = time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.used = {k: cpu_s(p) - self._t0[k] for k, p in self._pids.items()}
        self.used["aggregator"] = time.process_time() - self._self0


def _lines(n: int, device: str, first: int, rng: random.Random) -> bytes:
    """``n`` telemetry lines shaped like the store's (tags device, profile; 4 floats, seq, idx, flags)."""
    out = []
    for k in range(first, first + n):
        vals = ",".join(f"{c}={rng.uniform(-5, 50):.4f}" for c in CHANNELS)
        out.append(f"telemetry,device={device},profile=bench seq={k // 50}i,idx={k % 50}i,flags=0i,{vals} "
                   f"{1_700_000_000_000_000_000 + k * 1_000_000}\n")
    return "".join(out).encode()


def influx_write_rate(influx, duration_s: float, clients: tuple[int, ...] = (1, 4), batch_lines: int = 5000,
                      devices: int = 40, max_points_per_s: int = 300_000) -> dict:
    """Pre-built ``batch_lines``-line bodies POSTed back to back to /write, by 1 and by several
    concurrent clients (each count into a fresh database). Returns one entry per client count."""
    rng = random.Random(1)
    count = max(devices, int(max_points_per_s * duration_s / batch_lines))
    bodies = [_lines(batch_lines, f"raw-{k % devices}", (k // devices) * batch_lines, rng) for k in range(count)]
    out = {}
    for n in clients:
        db = influx.new_database("bench_raw")
        influx.create_database(db)
        url = f"{influx.url}/write?{urlencode({'db': db, 'precision': 'ns'})}"
        http = urllib3.PoolManager(retries=False, timeout=30, maxsize=n)
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        lock, queue_, written, errors = threading.Lock(), iter(bodies), [0], []
        deadline = time.perf_counter() + duration_s

        def post() -> None:
            while time.perf_counter() < deadline:
                with lock:
                    body = next(queue_, None)
                if body is None:
                    return
                resp = http.request("POST", url, body=body, headers=headers)
                if resp.status != 204:
                    errors.append(f"{resp.status}: {resp.data[:300]!r}")
                    return
                with lock:
                    written[0] += batch_lines

        cpu0, began = cpu_s(influx.pid), time.perf_counter()
        threads = [threading.Thread(target=post) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - began
        cpu = cpu_s(influx.pid) - cpu0
        if errors:
            raise RuntimeError(f"InfluxDB refused a benchmark write: {errors[0]}")
        stored = _count(influx, db)
        influx.query(None, f'DROP DATABASE "{db}"')
        if stored != written[0]:
            raise RuntimeError(f"InfluxDB holds {stored} of {written[0]} points written")
        out[n] = {"points": written[0], "seconds": elapsed, "points_per_s": written[0] / elapsed,
                  "cpu": {"influxd": cpu}, "exhausted": written[0] == len(bodies) * batch_lines}
    return out


def _count(influx, db: str, group: bool = False):
    """COUNT(idx) of the telemetry measurement, in total or per device."""
    q = 'SELECT COUNT("idx") FROM "telemetry"' + (' GROUP BY "device"' if group else "")
    doc = influx.query(db, q)
    per: dict[str, int] = {}
    for result in doc.get("results", []):
        if "error" in result:
            raise RuntimeError(f"count query failed: {result['error']}")
        for series in result.get("series", []):
            per[(series.get("tags") or {}).get("device", "")] = int(series["values"][0][1])
    return per if group else sum(per.values())


def publishers_alone(broker, spec: LoadSpec) -> dict:
    """The publishers against the broker with no subscriber: what the load side can offer."""
    result = run_publishers(spec)
    return {"messages": result.messages, "readings": result.readings, "seconds": result.publish_s,
            "msg_per_s": result.msg_per_s, "readings_per_s": result.readings / result.publish_s,
            "publisher_cpu_s": result.cpu_s, "exhausted": result.pool_exhausted}


def _make_ingest(broker, influx, db: str, tmp: Path, tag: str, **ingest_kw):
    from aggregator.ingest import Ingest
    from aggregator.quarantine import Quarantine
    from aggregator.registry import Registry
    from aggregator.stores.influx import InfluxStore

    store = InfluxStore(influx.url, db)
    store.open()
    ingest = Ingest(store, broker.url, client_id=f"bench-agg-{tag}", share_group=f"bench{tag}",
                    protocol="5", quarantine=Quarantine(tmp / "quarantine.sqlite"),
                    registry=Registry(None), **ingest_kw)
    return store, ingest


def stored_per_device(influx, db: str, load, spec: LoadSpec) -> tuple[int, dict[str, int]]:
    """Count the points each device has in ``db``, then drop it: ``(stored, {device: missing})``,
    missing negative for a device with extra points. Zero loss is an empty dict."""
    per_device = _count(influx, db, group=True)
    influx.query(None, f'DROP DATABASE "{db}"')
    expected = {d: n * spec.readings_per_message for d, n in load.per_device.items()}
    missing = {d: expected[d] - per_device.get(d, 0) for d in expected if per_device.get(d, 0) != expected[d]}
    return sum(per_device.values()), missing


def aggregator_end_to_end(broker, influx, spec: LoadSpec, drain_timeout_s: float = 120.0, **ingest_kw) -> dict:
    """Publishers -> Mosquitto -> Ingest(InfluxStore) -> InfluxDB; zero loss is checked per device."""
    db = influx.new_database("bench_e2e")
    tag = os.urandom(3).hex()
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-") as tmp:
        store, ingest = _make_ingest(broker, influx, db, Path(tmp), tag, **ingest_kw)
        ingest.start()
        began = {}
        try:
            with _Cpu(broker, influx) as cpu:
                load = run_publishers(spec, on_go=lambda: began.setdefault("t", time.perf_counter()))
                deadline = time.perf_counter() + drain_timeout_s
                while ingest.stats.stored_readings < load.readings and time.perf_counter() < deadline:
                    time.sleep(0.005)
                done = time.perf_counter()
            stats = dict(vars(ingest.stats))
        finally:
            ingest.stop(forget_session=True)
            store.close()
            ingest.quarantine.close()
    stored, missing = stored_per_device(influx, db, load, spec)
    elapsed = done - began["t"]
    return {
        "messages": load.messages, "readings": load.readings, "stored": stored,
        "lost_or_extra_devices": missing, "seconds": elapsed,
        "readings_per_s": load.readings / elapsed, "msg_per_s": load.messages / elapsed,
        "publish_s": load.publish_s, "publisher_msg_per_s": load.msg_per_s,
        "cpu": {**cpu.used, "publishers": load.cpu_s}, "ingest": stats, "exhausted": load.pool_exhausted,
    }


class _NaiveWriter:
    """The baseline: paho on_message -> decode -> one HTTP /write per message, acked by paho."""

    def __init__(self, broker_url: str, influx_url: str, db: str, tag: str) -> None:
        from aggregator.stores.lineproto import encode_message
        from edgeloop import wire
        from edgeloop.mqtt import MqttLink

        self._encode, self._decode = encode_message, wire.decode
        self._http = urllib3.PoolManager(retries=False, timeout=30)
        self._url = f"{influx_url}/write?{urlencode({'db': db, 'precision': 'ns'})}"
        self.written = 0
        self.first: float | None = None
        self.lock = threading.Lock()
        self.link = MqttLink(broker_url, f"bench-naive-{tag}", protocol="5", on_message=self._on_message,
                             on_connect=lambda: self.link.subscribe(wire.uplink_filter(f"naive{tag}"), 1))

    def _on_message(self, msg) -> None:
        body, _ = self._encode(self._decode(msg.topic, msg.payload))
        resp = self._http.request("POST", self._url, body=body)
        if resp.status != 204:
            raise RuntimeError(f"naive write refused ({resp.status})")
        if self.first is None:
            self.first = time.perf_counter()
        self.written += 1


def naive_end_to_end(broker, influx, spec: LoadSpec) -> dict:
    """How many messages/s the naive writer stores while the publishers run."""
    db = influx.new_database("bench_naive")
    influx.create_database(db)
    writer = _NaiveWriter(broker.url, influx.url, db, os.urandom(3).hex())
    writer.link.start()
    marks = {}
    try:
        with _Cpu(broker, influx) as cpu:
            load = run_publishers(spec, on_go=lambda: marks.setdefault("t", time.perf_counter()))
            # The broker queues what the naive writer cannot take yet: count what it stored
            # during the load window (publishing usually ends first).
            time.sleep(max(0.0, marks["t"] + spec.duration_s - time.perf_counter()))
            written, elapsed = writer.written, time.perf_counter() - marks["t"]
    finally:
        writer.link.stop(forget_session=True)
    stored = _count(influx, db)
    influx.query(None, f'DROP DATABASE "{db}"')
    return {"messages": written, "stored": stored, "seconds": elapsed, "msg_per_s": written / elapsed,
            "published": load.messages, "cpu": {**cpu.used, "publishers": load.cpu_s}}
