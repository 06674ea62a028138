"""A thousand simulated devices in one process: RSS, CPU, messages/s, zero loss; ingest scaling.

Each device is a real agent (simulated machine source, features every window, SQLite outbox,
its own MQTT connection) stepped by :class:`simulators.fleet.FleetRunner`: one scheduler thread
and one network thread for the whole fleet. The fleet publishes through real Mosquitto to an
in-process aggregator with its SQLite store (a separate process would not change the fleet's
own figures; the aggregator's CPU is reported apart). Zero loss is checked per device: every
sequence number a device made durable is in the store exactly once (telemetry and features).

Figures: the process's RSS before the fleet and at its peak (from /proc/self/status; the
aggregator's share cannot be separated in one process, hence the baseline), CPU seconds of the
fleet's two threads (from /proc/self/task) per wall second, messages/s accepted and stored, and
the scheduler's lateness. (Python does not name OS threads, so
the two threads are found by their native ids.) Also the cost of the outbox itself: appending N messages to 1,000
SQLite WAL databases with ``synchronous=FULL`` and ``NORMAL``.

Run alone: ``.venv/bin/python -m bench.fleet --devices 1000 --seconds 60``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.proc import rss_mb, thread_cpu_s

__all__ = ["run_fleet", "outbox_cost", "scaling", "table"]

ROOT = Path(__file__).resolve().parent.parent






def _configs(url: str, data_dir: Path, n: int, prefix: str, rate_hz: float, synchronous: str):
    from edge_agent.config import AgentConfig, MqttSettings, OutboxSettings, SamplingSettings, SourceSettings

    return [
        AgentConfig(
            device_id=f"{prefix}-{k:04d}",
            data_dir=str(data_dir),
            mqtt=MqttSettings(url=url, protocol="5", max_inflight=50),
            sampling=SamplingSettings(rate_hz=rate_hz, batch_s=1.0, window_s=5.0),
            source=SourceSettings(name="simulated", options={"profile": "machine", "seed": k, "rate_hz": rate_hz}),
            outbox=OutboxSettings(synchronous=synchronous),
        )
        for k in range(n)
    ]


def run_fleet(broker_url: str, devices: int, seconds: float, *, speed: float = 1.0, rate_hz: float = 10.0,
              synchronous: str = "NORMAL", drain_timeout: float = 120.0) -> dict:
    """Run ``devices`` agents for ``seconds`` against an in-process aggregator; the figures."""
    from aggregator.service import Aggregator, AggregatorConfig, MqttSettings
    from aggregator.stores import make_store
    from simulators.fleet import FleetRunner

    tag = f"b{os.getpid()}x{devices}"
    with tempfile.TemporaryDirectory(prefix="edgeloop-fleet-") as tmp:
        tmp = Path(tmp)
        agg = Aggregator(AggregatorConfig(data_dir=str(tmp / "agg"), mqtt=MqttSettings(
            url=broker_url, client_id=f"fleet-bench-{tag}", share_group=f"fleet-bench-{tag}")))
        agg.start()
        try:
            rss0, threads0 = rss_mb(), threading.active_count()
            runner = FleetRunner(_configs(broker_url, tmp / "dev", devices, tag, rate_hz, synchronous),
                                 speed=speed, outbox_synchronous=synchronous, drain_timeout=drain_timeout)
            runner.start()
            runner.wait_connected(timeout=120)
            open_s = runner.stats.open_s
            threads = threading.active_count() - threads0
            fleet_threads = [runner._thread.native_id, runner.network_loop._thread.native_id]
            cpu0, proc0, wall0 = thread_cpu_s(*fleet_threads), time.process_time(), time.monotonic()
            msgs0 = sum(a.stats.messages_accepted for a in runner.agents)
            stored0 = agg.ingest.stats.stored_readings
            rss_peak = rss_mb()
            while time.monotonic() - wall0 < seconds:
                time.sleep(1.0)
                rss_peak = max(rss_peak, rss_mb())
            wall = time.monotonic() - wall0
            fleet_cpu = thread_cpu_s(*fleet_threads) - cpu0
            proc_cpu = time.process_time() - proc0
            msgs = sum(a.stats.messages_accepted for a in runner.agents) - msgs0
            stored_readings = agg.ingest.stats.stored_readings - stored0
            results = runner.stop()
            stats = runner.stats
        finally:
            agg.stop(forget_session=True)
        lost = doubled = 0
        with make_store(sqlite_path=str(tmp / "agg" / "aggregator" / "store.sqlite")) as store:
            for a in runner.agents:
                seqs = [r.seq for r in store.telemetry(a.device) if r.idx == 0]
                made = a.stats.messages_accepted
                stored_msgs = len(set(seqs)) + store.count("features", a.device) + store.count("inference", a.device)
                doubled += len(seqs) - len(set(seqs))
                lost += made - stored_msgs
    return {
        "devices": devices, "seconds": wall, "speed": speed, "rate_hz": rate_hz, "synchronous": synchronous,
        "open_s": open_s, "threads_added": threads, "rss_before_mb": rss0, "rss_peak_mb": rss_peak,
        "fleet_cpu_cores": fleet_cpu / wall, "process_cpu_cores": proc_cpu / wall,
        "msg_per_s": msgs / wall, "readings_stored_per_s": stored_readings / wall,
        "late_steps": stats.late_steps, "max_lateness_s": stats.max_lateness_s, "drain_s": stats.drain_s,
        "drained": sum(1 for v in results.values() if v is True), "lost": lost, "doubled": doubled,
    }


def outbox_cost(devices: int = 1000, messages: int = 5) -> dict:
    """Seconds per append over ``devices`` open SQLite outboxes, FULL vs NORMAL, and the open cost."""
    from edge_agent.outbox import Outbox

    payload = b"x" * 600  # about one second of a 4-channel machine's readings, encoded
    out = {}
    for sync in ("FULL", "NORMAL"):
        with tempfile.TemporaryDirectory(prefix="edgeloop-outbox-") as tmp:
            t0 = time.perf_counter()
            boxes = [Outbox(Path(tmp) / f"d{k}" / "outbox.sqlite", synchronous=sync) for k in range(devices)]
            opened = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(messages):
                for box in boxes:
                    box.append("telemetry", lambda seq: payload)
            per = (time.perf_counter() - t0) / (devices * messages)
            for box in boxes:
                box.close()
        out[sync] = {"open_s": opened, "append_us": per * 1e6, "appends_per_s": 1 / per}
    return out


def scaling(broker_url: str, sizes=(10, 100, 1000), seconds: float = 20.0) -> list[dict]:
    return [run_fleet(broker_url, n, seconds) for n in sizes]


def table(main: dict, scale: list[dict], outbox: dict) -> str:
    m = main
    lines = [
        f"{m['devices']:,} simulated devices in one process for {m['seconds']:.0f} s ({m['rate_hz']:.0f} Hz, "
        f"speed {m['speed']:g}, one telemetry message per second and features every 5 s per device, "
        f"outbox synchronous={m['synchronous']}), through Mosquitto to an in-process aggregator (SQLite store).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| threads added by the fleet | {m['threads_added']} |",
        f"| time to open and connect every device | {m['open_s']:.1f} s |",
        f"| RSS before the fleet / peak with it | {m['rss_before_mb']:.0f} MB / {m['rss_peak_mb']:.0f} MB |",
        f"| CPU of the fleet's two threads | {m['fleet_cpu_cores']:.2f} cores |",
        f"| CPU of the whole process (fleet + aggregator) | {m['process_cpu_cores']:.2f} cores |",
        f"| messages accepted by the devices | {m['msg_per_s']:,.0f} msg/s |",
        f"| readings stored | {m['readings_stored_per_s']:,.0f} /s |",
        f"| scheduler steps late by > 0.1 s (worst) | {m['late_steps']:,} ({m['max_lateness_s']:.2f} s) |",
        f"| drain after stop; outboxes confirmed empty | {m['drain_s']:.1f} s; {m['drained']:,} of {m['devices']:,} |",
        f"| messages lost / doubled | {m['lost']} / {m['doubled']} |",
        "",
        "Scaling (same settings, shorter runs):",
        "",
        "| devices | msg/s | readings stored/s | fleet CPU (cores) | process CPU (cores) | peak RSS (MB) | lost |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['devices']:,} | {r['msg_per_s']:,.0f} | {r['readings_stored_per_s']:,.0f} | "
          f"{r['fleet_cpu_cores']:.2f} | {r['process_cpu_cores']:.2f} | {r['rss_peak_mb']:.0f} | {r['lost']} |"
          for r in scale],
        "",
        "Outbox cost, 1,000 SQLite WAL databases open at once, 600-byte messages:",
        "",
        "| synchronous | open all | per append | appends/s |",
        "|---|---|---|---|",
        *[f"| {k} | {v['open_s']:.2f} s | {v['append_us']:,.0f} µs | {v['appends_per_s']:,.0f} |"
          for k, v in outbox.items()],
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--scale-seconds", type=float, default=20.0)
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import logging

    logging.basicConfig(level=logging.ERROR)
    from tests.services import MosquittoServer

    outbox = outbox_cost()
    print("outbox:", outbox, file=sys.stderr, flush=True)
    with MosquittoServer() as broker:
        main_run = run_fleet(broker.url, args.devices, args.seconds)
        print("fleet:", main_run, file=sys.stderr, flush=True)
        scale = [] if args.no_scaling else scaling(broker.url, seconds=args.scale_seconds)
    if args.json:
        Path(args.json).write_text(json.dumps({"fleet": main_run, "scaling": scale, "outbox": outbox}, indent=1))
    print(table(main_run, scale, outbox))
    return 0


if __name__ == "__main__":
    sys.exit(main())
