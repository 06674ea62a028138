"""``edgeloop demo``: the whole loop told as one story, on embedded or real servers.

A mixed fleet (machines, cold-chain refrigerators, wearables; time-accelerated) comes online and
the dashboard URL is printed at once; a warm-up period feeds window features into the store; a
first model per profile is trained from the store, signed and rolled out (OTA over MQTT, canary in
shadow, gate, waves); faults are caught at the edge; drift sets in on the machines, the retrainer
detects it (PSI), trains a new model, and the rollout shadows and promotes it. At the end: F1 of
the loop's models before and after the drift next to the frozen first model on the same
post-drift windows, and delivery accounting (sent = stored per device and kind, every outbox
confirmed). The story itself is :mod:`simulators.story`; this module builds the fleet and prints.

``quick`` shrinks the fleet and the time line for tests (about a minute).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

__all__ = ["DemoOptions", "run_demo", "demo_scenario"]

log = logging.getLogger(__name__)


@dataclass
class DemoOptions:
    devices: int = 18  # split over the three profiles; the machines drift
    speed: float = 60.0  # device seconds per real second (8,400 s of device time: ~2.5 minutes)
    seed: int = 1
    quick: bool = False
    mqtt_url: str | None = None
    influx_url: str | None = None
    influx_database: str = "edgeloop"
    influx_org: str | None = None
    data_dir: str | None = None
    http_port: int = 0
    quiet: bool = False


def demo_scenario(devices: int, seed: int, *, quick: bool = False, run_id: str | None = None):
    """A mixed fleet: half machines, the rest cold-chain refrigerators and wearables.

    The full time line (8,400 device seconds) gives every model a whole operating cycle to learn
    from, as the drift scenario does (simulators/scenarios/drift.toml): a 40-minute warm-up (bearing
    wear on some machines in it, labelled and left out of training), faults on every profile after
    the first model is out, then the machines' ambient shift and new operating regime, and faults
    again once the new regime has run a cycle. ``quick`` (tests) squeezes the same phases into
    3,600 s: too short for a model to learn a machine's cycle, so its F1 means little.
    Device ids carry ``run_id`` (default: random) so runs sharing a broker never mix devices."""
    import secrets

    from simulators.scenario import parse

    run_id = run_id or secrets.token_hex(2)
    machines = max(2, devices // 2)
    others = max(0, devices - machines)
    if quick:
        t = {"wear": 600, "before": 1000, "drift": 1500, "regime": 1800, "ramp": 600, "after": 2800,
             "jitter": 250, "end": 3600}
    else:
        t = {"wear": 900, "before": 2700, "drift": 3600, "regime": 3900, "ramp": 600, "after": 6400,
             "jitter": 1500, "end": 8400}
    fleet = [{"profile": "machine", "count": machines, "prefix": f"machine-{run_id}",
              "faults": [{"kind": "bearing_wear", "start_s": t["wear"], "duration_s": 400, "share": 0.5,
                          "jitter_s": 100},
                         {"kind": "sudden", "start_s": t["before"], "duration_s": 120, "share": 0.5, "jitter_s": 200},
                         {"kind": "sudden", "start_s": t["after"], "duration_s": 120, "share": 1.0,
                          "jitter_s": t["jitter"]}],
              "drift": [{"kind": "ambient", "start_s": t["drift"], "ramp_s": t["ramp"], "size": 6.0},
                        {"kind": "regime", "start_s": t["regime"], "ramp_s": 60, "size": 1.0}]}]
    if others:
        fleet.append({"profile": "cold-chain", "count": (others + 1) // 2, "prefix": f"fridge-{run_id}",
                      "faults": [{"kind": "compressor_failure", "start_s": t["before"], "duration_s": 600,
                                  "share": 0.5, "jitter_s": 200},
                                 {"kind": "door_left_open", "start_s": t["after"], "duration_s": 400,
                                  "share": 0.5, "jitter_s": 200}]})
    if others > 1:
        fleet.append({"profile": "wearable", "count": others // 2, "prefix": f"wearable-{run_id}",
                      "faults": [{"kind": "arrhythmia", "start_s": t["before"], "duration_s": 300,
                                  "share": 0.5, "jitter_s": 200},
                                 {"kind": "arrhythmia", "start_s": t["after"], "duration_s": 300,
                                  "share": 0.5, "jitter_s": 200}]})
    return parse({"name": "demo", "seed": seed, "duration_s": t["end"], "lead_s": 30, "fleet": fleet}, "demo")


def run_demo(options: DemoOptions) -> bool:
    """Run the story with progress and narration; print the scores and the delivery summary.
    True when every message sent was stored and every outbox confirmed."""
    from rich.console import Console
    from rich.table import Table

    from simulators.story import StoryOptions, run_story

    console = Console(quiet=options.quiet)
    devices, speed = options.devices, options.speed
    if options.quick:
        devices, speed = min(devices, 6), max(speed, 60.0)
    scenario = demo_scenario(devices, options.seed, quick=options.quick)
    # A full operating cycle of warm-up before the first model (see demo_scenario); the quick run
    # has no time for it. Drift is judged on 5 minutes by the share of rows out of the training
    # range (PSI on 5 minutes of a 30-minute cycle reads the cycle's phase as drift).
    tuning = dict(warmup_s=300.0) if options.quick else dict(
        warmup_s=2400.0, recent_s=300.0, range_threshold=0.05, train_s=7200.0, check_every_s=120.0 / speed)
    console.print(f"[bold]edgeloop demo[/bold]: {len(scenario.devices)} devices, "
                  f"{scenario.duration_s:g} s of device time at {speed:g}x "
                  f"(about {scenario.duration_s / speed:.0f} s)")
    story = StoryOptions(
        scenario=scenario, speed=speed, **tuning, mqtt_url=options.mqtt_url, influx_url=options.influx_url,
        influx_database=options.influx_database, influx_org=options.influx_org, data_dir=options.data_dir,
        http_port=options.http_port, say=lambda m: console.print(m, markup=False, highlight=False))
    result = run_story(story)

    scores = Table(title="F1 (event based, vs the simulator's ground truth)")
    for col in ("profile", "period", "model", "windows", "faults", "found", "alarms", "F1"):
        scores.add_column(col)
    for profile in sorted(set(result.before) | set(result.after)):
        for period, s in (("before drift", result.before.get(profile)), ("after drift: loop", result.after.get(profile)),
                          ("after drift: frozen", result.frozen_after.get(profile)),
                          ("a cycle later: loop", result.recovered.get(profile)),
                          ("a cycle later: frozen", result.frozen_recovered.get(profile))):
            if s is not None:
                scores.add_row(profile, period, s.model, str(s.windows), str(s.faults), str(s.detected),
                               str(s.alarms), f"{s.f1:.2f}")
    console.print(scores)
    telemetry_sent = sum(n for (d, k), n in result.sent.items() if k == "telemetry")
    telemetry_stored = sum(n for (d, k), n in result.stored.items() if k == "telemetry")
    table = Table(title="edgeloop demo", show_header=False)
    table.add_row("devices", str(len(result.devices)))
    table.add_row("readings sent", f"{telemetry_sent:,}")
    table.add_row("readings stored", f"{telemetry_stored:,}")
    table.add_row("messages sent (all kinds)", f"{sum(result.sent.values()):,}")
    table.add_row("messages stored (all kinds)", f"{sum(result.stored.values()):,}")
    table.add_row("messages still undelivered", f"{len(result.unconfirmed):,}")
    table.add_row("alerts raised at the edge", f"{result.edge_alarms:,}")
    table.add_row("models", "; ".join(f"{p}: {' -> '.join(v)}" for p, v in sorted(result.versions.items())))
    console.print(table)
    console.print(f"state in {result.run_dir}; dashboard was {result.dashboard}")
    if result.delivered:
        console.print("[green]every message sent was stored: sent = stored for every device and kind[/green]")
    else:
        diff = {f"{d}/{k}": (n, result.stored.get((d, k))) for (d, k), n in result.sent.items()
                if result.stored.get((d, k)) != n}
        console.print(f"[red]lost or unconfirmed: {diff} unconfirmed outboxes {result.unconfirmed}[/red]")
    return result.delivered
