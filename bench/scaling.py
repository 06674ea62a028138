"""One aggregator against two: the same load through 1 or 2 aggregator processes in one group.

Each aggregator member is its own process (``multiprocessing`` spawn), so two members do not share
a GIL: this is how the aggregator scales out (docs: README "The aggregator"). Both subscribe through
the same ``$share`` group on Mosquitto and write into the same InfluxDB database; the parent runs
the publishers, waits until the members together have stored every reading, and then counts the
points per device in InfluxDB (zero loss, nothing doubled), exactly like ``cases.aggregator_end_to_end``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

from bench.cases import _Cpu, stored_per_device
from bench.proc import cpu_s
from bench.load import LoadSpec, run_publishers

__all__ = ["members_end_to_end", "run", "table"]


def _member(broker_url: str, influx_url: str, db: str, tag: str, k: int, tmp: str, stored, ready, stop) -> None:
    """One aggregator process: Ingest into InfluxDB until ``stop``; ``stored`` mirrors its count."""
    from aggregator import gc_policy
    from aggregator.ingest import Ingest
    from aggregator.quarantine import Quarantine
    from aggregator.registry import Registry
    from aggregator.stores.influx import InfluxStore

    store = InfluxStore(influx_url, db)
    store.open()
    quarantine = Quarantine(Path(tmp) / f"quarantine-{k}.sqlite")
    ingest = Ingest(store, broker_url, client_id=f"bench-member-{tag}-{k}", share_group=f"benchm{tag}",
                    protocol="5", quarantine=quarantine, registry=Registry(None))
    ingest.start()
    gc_policy.settle()  # as `edgeloop aggregator` does once started
    ready.put(k)
    try:
        while not stop.wait(0.02):
            stored.value = ingest.stats.stored_readings
        stored.value = ingest.stats.stored_readings
    finally:
        ingest.stop(forget_session=True)
        store.close()
        quarantine.close()


def members_end_to_end(broker, influx, spec: LoadSpec, members: int, drain_timeout_s: float = 120.0) -> dict:
    """Publishers -> Mosquitto -> ``members`` aggregator processes -> InfluxDB; checked per device."""
    ctx = mp.get_context("spawn")
    db = influx.new_database("bench_members")
    tag = os.urandom(3).hex()
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-") as tmp:
        stop, ready = ctx.Event(), ctx.Queue()
        counters = [ctx.Value("q", 0) for _ in range(members)]
        procs = [ctx.Process(target=_member, args=(broker.url, influx.url, db, tag, k, tmp, counters[k], ready, stop),
                             daemon=True) for k in range(members)]
        for p in procs:
            p.start()
        try:
            for _ in procs:
                ready.get(timeout=60)
            began = {}
            cpu0 = {p.pid: cpu_s(p.pid) for p in procs}
            with _Cpu(broker, influx) as cpu:
                load = run_publishers(spec, on_go=lambda: began.setdefault("t", time.perf_counter()))
                deadline = time.perf_counter() + drain_timeout_s
                while sum(c.value for c in counters) < load.readings and time.perf_counter() < deadline:
                    time.sleep(0.005)
                done = time.perf_counter()
            member_cpu = sum(cpu_s(p.pid) - cpu0[p.pid] for p in procs)
            shares = [c.value for c in counters]
        finally:
            stop.set()
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
                    p.join()
    stored, missing = stored_per_device(influx, db, load, spec)
    elapsed = done - began["t"]
    return {
        "members": members, "messages": load.messages, "readings": load.readings,
        "stored": stored, "lost_or_extra_devices": missing, "seconds": elapsed,
        "readings_per_s": load.readings / elapsed, "msg_per_s": load.messages / elapsed,
        "shares": shares, "cpu": {**cpu.used, "aggregators": member_cpu, "publishers": load.cpu_s},
    }


def run(broker, influx, spec_for) -> dict:
    """``spec_for(readings_per_message, max_msg_per_s)`` builds the load (as the other cases do)."""
    out = {}
    for members in (1, 2):
        out[f"50x{members}"] = members_end_to_end(broker, influx, spec_for(50, 3_000), members)
        out[f"1x{members}"] = members_end_to_end(broker, influx, spec_for(1, 10_000), members)
    return out


def table(result: dict) -> str:
    rows = [
        "| load | aggregators | readings/s | msg/s | ratio to one | lost | CPU s (aggregators / broker / influxd) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for size in ("50", "1"):
        one = result.get(f"{size}x1")
        for members in (1, 2):
            r = result.get(f"{size}x{members}")
            if not r:
                continue
            ratio = r["readings_per_s"] / one["readings_per_s"] if one else float("nan")
            lost = "none" if not r["lost_or_extra_devices"] and r["stored"] == r["readings"] else \
                f"{r['readings'] - r['stored']}"
            c = r["cpu"]
            rows.append(f"| {size} reading{'s' if size != '1' else ''}/message | {members} | {r['readings_per_s']:,.0f} | "
                        f"{r['msg_per_s']:,.0f} | {ratio:.2f}x | {lost} | {c['aggregators']:.1f} / "
                        f"{c.get('broker', 0):.1f} / {c.get('influxd', 0):.1f} |")
    return "\n".join(rows) + "\n"
