"""Say what bounds each figure, from the CPU each process used during the case.

On a small machine every part competes for the same cores, so the first question is whether the
cores were full and who held them; a part far below one core while the figure stalls is waiting
(for InfluxDB's fsync, for acknowledgements), not working. The profile notes are what py-spy
showed when the ingest was profiled under these loads (see the report).
"""

from __future__ import annotations

import os

__all__ = ["explain"]

_PROFILE = (
    "A py-spy profile of the aggregator under case 3 (single-reading messages) put most of its "
    "busy time in paho's network thread: reading the socket, parsing each PUBLISH in Python "
    "(with MQTT 5 every message also builds a `Properties` object) and queueing one PUBACK per "
    "message; then msgspec decoding and `Telemetry.__post_init__`, then the HTTP send. Per-message "
    "Python work in paho, not the line encoding or InfluxDB, is what the single-reading figure "
    "pays for; with 50-reading messages the same per-message cost is spread over 50 readings."
)


def _summary(cpu: dict, seconds: float) -> tuple[str, float, str]:
    cores = {k: v / seconds for k, v in cpu.items()}
    total = sum(cores.values())
    busiest = max(cores, key=cores.get)
    return busiest, total, ", ".join(f"{k} {v:.2f}" for k, v in sorted(cores.items(), key=lambda kv: -kv[1]))


def _case(name: str, res: dict, ncpu: int) -> str:
    busiest, total, detail = _summary(res["cpu"], res["seconds"])
    if total >= 0.85 * ncpu:
        verdict = (f"the {ncpu} cores were full ({total:.2f} cores in use, most by {busiest}): the parts "
                   f"compete for CPU, and more speed needs fewer CPU seconds per reading or more cores")
    else:
        verdict = (f"only {total:.2f} of {ncpu} cores were busy, so the figure is bound by waiting: the "
                   f"aggregator keeps at most the broker's in-flight allowance (1000 messages) unacknowledged "
                   f"and acknowledges only after InfluxDB answers, so InfluxDB's write latency (its WAL "
                   f"fsync) sets the pace")
    return f"**{name}.** CPU in cores: {detail}. {verdict[0].upper() + verdict[1:]}."


def explain(r: dict) -> str:
    ncpu = os.cpu_count() or 1
    raw = r["influx"]
    raw_text = "; ".join(f"{n} client(s): {v['cpu']['influxd'] / v['seconds']:.2f} cores" for n, v in raw.items())
    parts = [
        f"**1. InfluxDB alone.** influxd used {raw_text}. Far from the {ncpu} cores: each `/write` "
        "returns after the write-ahead log is fsync'ed, so one client is bound by that latency and "
        "concurrent writes overlap it. The disk and whatever else runs on the machine move this "
        "figure from run to run; the ratios below compare figures from the same run.",
        _case("2. 50 readings per message", r["e2e50"], ncpu)
        + " The ingest overlaps up to 4 store writes (encode + HTTP in a thread pool) with decoding "
        "in paho's thread, and acknowledges each batch in arrival order when its write returns.",
        _case("3. Single-reading messages", r["e2e1"], ncpu)
        + " Every message costs a PUBLISH parse, a decode, a registry update and a PUBACK in Python, "
        "under one GIL. The naive writer waits for a whole HTTP round trip and fsync per message, so "
        f"it stays at {r['naive']['msg_per_s']:,.0f} msg/s however idle the CPU is.",
        _PROFILE,
    ]
    return "\n\n".join(parts)
