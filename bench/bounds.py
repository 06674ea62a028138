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
    "py-spy profiles of the aggregator (`py-spy record --gil`, time holding the interpreter lock). "
    "Case 2, 50 readings per message: at 145,000 readings/s (the code before commit 51adad2), half of that "
    "time sat on the line that decodes a message, ten times what decoding costs alone; it was the cyclic garbage "
    "collector, started by allocations there: paho built a self-referencing closure for every "
    "message it received, every reading was a tracked struct, and thousands of messages wait for "
    "their write at any moment. With that avoided (`edgeloop.mqtt._EmptyFastMatcher`, untracked "
    "readings) and the aggregator process's collector policy (`aggregator/gc_policy.py`: freeze "
    "after start, young threshold 50,000) the collector ran 5 times instead of ~1,900 per 1.5 "
    "million readings, and the aggregator's CPU per reading fell from ~6 to ~3 µs. "
    "What remains: line encoding about a third, paho's reading and acknowledging about a quarter, "
    "msgspec decoding about a sixth, then the time guard, the batching and the HTTP client. "
    "Case 3, single-reading messages: most of the time is paho's network thread: reading the "
    "socket, parsing each PUBLISH in Python (with MQTT 5 every message also builds a `Properties` "
    "object) and queueing one PUBACK per message; then decoding and the HTTP send."
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
        + " The ingest overlaps up to 8 store writes (encode + HTTP in a thread pool) with decoding "
        "in paho's thread, and acknowledges each batch in arrival order when its write returns.",
        _case("3. Single-reading messages", r["e2e1"], ncpu)
        + " Every message costs a PUBLISH parse, a decode, a registry update and a PUBACK in Python, "
        "under one GIL. The naive writer waits for a whole HTTP round trip and fsync per message, so "
        f"it stays at {r['naive']['msg_per_s']:,.0f} msg/s however idle the CPU is.",
        _PROFILE,
    ]
    return "\n\n".join(parts)
