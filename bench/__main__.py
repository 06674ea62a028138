"""``python -m bench``: run every benchmark case against real servers and rewrite BENCHMARKS.md.

Options shorten or lengthen the load (``--seconds``) and choose the number of publisher
processes; ``--output -`` prints the report instead of writing the file. Each case is bounded
in time, so the whole run takes a few minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _in_fresh_process(module: str, *args: str) -> dict:
    """Run ``python -m module *args --json FILE`` and return the results it wrote."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-") as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, "-m", module, *args, "--json", str(out)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load per end-to-end case (default 10)")
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes (default 2)")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"), help="report path, or - for stdout")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--quick", action="store_true", help="fewer iterations for the inference case")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(ROOT))  # tests/services.py holds the server harness

    from bench import cases, machine, report
    from bench.bounds import explain
    from bench.load import LoadSpec
    from tests.services import InfluxServer, MosquittoServer
    from aggregator import gc_policy

    # This process hosts the aggregator of the end-to-end cases: it runs under the aggregator
    # process's garbage-collector policy, as `edgeloop aggregator` does (aggregator/gc_policy.py).
    gc_policy.settle()

    load_avg = os.getloadavg()
    results: dict = {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}
    devices, window, s = 10, 200, args.seconds

    def spec(url: str, readings: int, msg_per_s: int) -> LoadSpec:
        return LoadSpec(url, args.publishers, readings, s, msg_per_s, devices, window)

    def step(name: str) -> None:
        print(f"bench: {name}", file=sys.stderr, flush=True)

    with MosquittoServer() as broker, InfluxServer() as influx:
        results["machine"] = {**machine.describe(broker.binary, influx.binary),
                              "Load average at start": " ".join(f"{x:.2f}" for x in load_avg)}
        step("publishers alone")
        results["pub50"] = cases.publishers_alone(broker, spec(broker.url, 50, 6_000))
        results["pub1"] = cases.publishers_alone(broker, spec(broker.url, 1, 20_000))
        step("InfluxDB's own write rate")
        raw_s = min(8.0, s)
        results["influx"] = cases.influx_write_rate(influx, raw_s)
        # End to end: a fixed amount of work sized for the target rate over --seconds.
        step("end to end, 50 readings/message")
        results["e2e50"] = cases.aggregator_end_to_end(broker, influx, spec(broker.url, 50, 3_000))
        step("end to end, 1 reading/message")
        results["e2e1"] = cases.aggregator_end_to_end(broker, influx, spec(broker.url, 1, 10_000))
        step("naive writer, 1 reading/message")
        results["naive"] = cases.naive_end_to_end(broker, influx, spec(broker.url, 1, 10_000))
        step("API: /api/series over 24 h of 1 s data")
        from bench import api as api_bench

        results["api"] = api_bench.run(influx)
        step("one aggregator process against two")
        from bench import scaling

        results["scaling"] = scaling.run(broker, influx, lambda r, m: spec(broker.url, r, m))
        step("1,000 simulated devices in one process; ingest against 10 / 100 / 1,000 devices")
        from bench import fleet as fleet_bench

        results["fleet_outbox"] = fleet_bench.outbox_cost()
        results["fleet"] = fleet_bench.run_fleet(broker.url, 1000, 20.0 if args.quick else 60.0)
        results["fleet_scaling"] = fleet_bench.scaling(broker.url, seconds=10.0 if args.quick else 20.0)
        step("model push to 1,000 simulated devices: shared session, then one per device")
        from bench import ota_push

        # In a process of its own (with its own Mosquitto, same deploy profile): the devices'
        # process then holds the fleet and nothing the earlier cases left in this one.
        results["ota_push"] = _in_fresh_process("bench.ota_push", "--devices", "200" if args.quick else "1000")
        step("one agent process: CPU, RSS/PSS, inference latency")
        from bench import agent as agent_bench

        results["agent"] = agent_bench.run(broker.url, seconds=20 if args.quick else 60)
    step("isolation-forest inference: fused vs stock vs sklearn, agent memory")
    from bench import inference

    results["inference"] = inference.run(quick=args.quick)
    results["args"] = {"publishers": args.publishers, "devices": devices, "window": window, "raw_s": raw_s,
                       "seconds": s}
    results["bounds"] = explain(results)
    text = report.render(results) + (
        "\n## Isolation-forest inference and agent memory\n\n"
        "Batch 1, one thread, the agent's session options; the same rows through every scorer. "
        "Target: fused p50 <= 20 µs; agent with champion and shadow loaded <= 64 MB.\n\n"
        + inference.tables(results["inference"]) + "\n"
        + "\n## API latency\n\n" + api_bench.table(results["api"])
        + "\n## One aggregator against two\n\n"
        "The same load through one aggregator process, then through two in one shared-subscription "
        "group (separate processes, so no shared GIL), into the same InfluxDB; zero loss checked per "
        "device. On 2 cores the broker, InfluxDB and the publishers already use most of the machine.\n\n"
        + scaling.table(results["scaling"])
        + "\n## Model push to 1,000 devices\n\n" + ota_push.table(results["ota_push"])
        + "\n## Agent CPU and memory (8 channels x 10 Hz)\n\n" + agent_bench.table(results["agent"])
        + "\n## A thousand simulated devices in one process\n\n"
        + fleet_bench.table(results["fleet"], results["fleet_scaling"], results["fleet_outbox"]) + "\n"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.output == "-":
        print(text)
    else:
        Path(args.output).write_text(text)
        print(f"bench: wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
