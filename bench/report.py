"""Render the benchmark results as BENCHMARKS.md: machine, tables with baselines and ratios, bounds."""

from __future__ import annotations

__all__ = ["render"]


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _cores(cpu: dict, seconds: float) -> str:
    """CPU use per process during a case, in cores (CPU seconds / wall seconds)."""
    return ", ".join(f"{k} {v / seconds:.2f}" for k, v in cpu.items())


def _verdict(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


def render(r: dict) -> str:
    m, a = r["machine"], r["args"]
    raw = r["influx"]
    raw1, rawn = raw[1], raw[max(raw)]
    influx_best = max(v["points_per_s"] for v in raw.values())
    e2, e1, naive = r["e2e50"], r["e2e1"], r["naive"]
    p50, p1 = r["pub50"], r["pub1"]
    ratio50 = e2["readings_per_s"] / influx_best
    ratio_naive = e1["msg_per_s"] / naive["msg_per_s"]
    out = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`.venv/bin/python -m bench`) on {r['date']}; every figure below comes",
        "from that one run, each next to the baseline measured in the same run. Everything runs on",
        "loopback: Mosquitto with the deploy profile (`deploy/mosquitto/edgeloop.conf`, via",
        "`tests/services.py`), InfluxDB from Debian with a fresh database per case, publisher",
        f"processes (`bench/load.py`, {a['publishers']} processes x {a['devices']} devices each, QoS 1,",
        f"window {a['window']}, pre-encoded wire-contract Telemetry) and the aggregator's `Ingest` with",
        "an `InfluxStore` in the benchmark's own process. Zero loss is checked by counting the stored",
        "points per device in InfluxDB (each (device, seq, idx) is one point).",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in m.items()],
        "",
        "All processes (publishers, broker, aggregator, InfluxDB) share these cores, and the machine",
        "may be shared with other work: the load average above was read when the run began.",
        "",
        "## 0. The load generator alone (publishers -> Mosquitto, no subscriber)",
        "",
        "| case | msg/s | readings/s | publishers' CPU (cores) |",
        "|---|---|---|---|",
        f"| 50 readings/message | {_n(p50['msg_per_s'])} | {_n(p50['readings_per_s'])} | "
        f"{p50['publisher_cpu_s'] / p50['seconds']:.2f} |",
        f"| 1 reading/message | {_n(p1['msg_per_s'])} | {_n(p1['readings_per_s'])} | "
        f"{p1['publisher_cpu_s'] / p1['seconds']:.2f} |",
        "",
        "The publishers offer several times what the aggregator takes, so they are not what the",
        "figures below measure. They speak MQTT 3.1.1 over a raw socket: paho costs ~120 us of CPU",
        "per publish here, and two paho publishers could not offer even 10,000 msg/s on 2 cores.",
        "",
        "## 1. InfluxDB's own write rate",
        "",
        f"Pre-built bodies of 5,000 lines shaped like our telemetry (tags device, profile; 4 float",
        f"channels, seq, idx, flags) POSTed to `/write?precision=ns` back to back for {a['raw_s']:.0f} s.",
        "",
        "| clients | points/s | influxd CPU (cores) |",
        "|---|---|---|",
        *[f"| {n} | {_n(v['points_per_s'])} | {v['cpu']['influxd'] / v['seconds']:.2f} |" for n, v in raw.items()],
        "",
        f"InfluxDB's own rate below is the best of these: {_n(influx_best)} points/s. One client",
        f"reaches {raw1['points_per_s'] / influx_best:.2f}x of it: influxd is not CPU-bound (see its cores),",
        "each write waits for the write-ahead log's fsync, so requests in flight at once add up.",
        "",
        "## 2. End to end, 50 readings per message",
        "",
        f"{_n(e2['messages'])} messages ({_n(e2['readings'])} readings) published as fast as the window",
        "allows; the figure is all readings / (release of the publishers -> last reading stored).",
        "",
        "| figure | value | baseline | ratio | target | result |",
        "|---|---|---|---|---|---|",
        f"| readings/s stored | {_n(e2['readings_per_s'])} | InfluxDB's own {_n(influx_best)} points/s | "
        f"{ratio50:.2f}x | >= 150,000/s and >= 0.5x | "
        f"{_verdict(e2['readings_per_s'] >= 150_000 and ratio50 >= 0.5)} |",
        f"| readings/s vs one-client InfluxDB | {_n(e2['readings_per_s'])} | {_n(raw1['points_per_s'])} | "
        f"{e2['readings_per_s'] / raw1['points_per_s']:.2f}x | - | - |",
        f"| readings lost or doubled | {e2['readings'] - e2['stored']:+,} (devices off: "
        f"{len(e2['lost_or_extra_devices'])}) | 0 | - | 0 | {_verdict(not e2['lost_or_extra_devices'])} |",
        "",
        f"CPU during the case (cores): {_cores(e2['cpu'], e2['seconds'])}. Ingest: "
        f"{e2['ingest']['batches']} batches, {e2['ingest']['store_retries']} store retries.",
        "",
        "## 3. End to end, 1 reading per message, against a naive writer",
        "",
        "The naive writer is paho's `on_message` -> decode -> one HTTP `/write` per message (paho",
        "acknowledges after the callback), fed by the same publishers in the same run.",
        "",
        "| figure | value | baseline | ratio | target | result |",
        "|---|---|---|---|---|---|",
        f"| msg/s stored | {_n(e1['msg_per_s'])} | naive {_n(naive['msg_per_s'])} msg/s | {ratio_naive:.1f}x | "
        f">= 10,000/s and >= 7x | {_verdict(e1['msg_per_s'] >= 10_000 and ratio_naive >= 7)} |",
        f"| messages lost or doubled | {e1['readings'] - e1['stored']:+,} (devices off: "
        f"{len(e1['lost_or_extra_devices'])}) | 0 | - | 0 | {_verdict(not e1['lost_or_extra_devices'])} |",
        "",
        f"CPU (cores), aggregator case: {_cores(e1['cpu'], e1['seconds'])}; naive case: "
        f"{_cores(naive['cpu'], naive['seconds'])}. Ingest: {e1['ingest']['batches']} batches of "
        f"~{e1['messages'] / max(1, e1['ingest']['batches']):.0f} messages.",
        "",
        "## 4. What bounds each figure",
        "",
        r["bounds"],
        "",
    ]
    return "\n".join(out)
