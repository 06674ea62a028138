"""``edgeloop simulate`` (profiles, scenario runs) and ``edgeloop score`` (alarms vs ground truth).

``simulate --scenario FILE`` runs a :mod:`simulators.scenario` fleet: it trains a first anomaly
model per profile on simulated normal data, starts an aggregator (embedded broker and SQLite
store unless real servers are given), runs every device as a real agent on the one-process
fleet runner (:class:`simulators.fleet.FleetRunner`), applies the scenario's network cuts and
clock steps, and writes next to the run:

* ``ground-truth.json``: each device's injected faults and drift in device time (what the
  simulated source saw), for :mod:`simulators.scoring`;
* ``events.jsonl``: every inference and alert the devices produced (wire JSON, one per line);
* ``scores.json``: precision, recall, F1, false alarms per device-hour and detection delay per
  model version and profile.

Heavy imports (numpy, scikit-learn, the agent, the aggregator) happen inside the commands.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from pathlib import Path

import click

__all__ = ["simulate", "score", "run_scenario"]


@click.command()
@click.option("--list-profiles", is_flag=True, help="Name the simulator profiles and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --list-profiles: channels, faults and drift as JSON.")
@click.option("--scenario", "scenario_file", type=click.Path(dir_okay=False), help="Scenario TOML to run.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Where the run writes its files.")
@click.option("--speed", type=click.FloatRange(0.1, 10_000), help="Override the scenario's time acceleration.")
@click.option("--mqtt", "mqtt_url", metavar="URL", help="Use this broker instead of the embedded one.")
@click.option("--influx-url", metavar="URL", help="Use this InfluxDB instead of the embedded SQLite store.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def simulate(list_profiles, as_json, scenario_file, out_dir, speed, mqtt_url, influx_url, quiet) -> None:
    """Simulated devices: list the profiles, or run a scenario and write its ground truth."""
    from simulators import profiles

    if list_profiles:
        if as_json:
            click.echo(json.dumps([p.describe() for p in profiles.PROFILES.values()], indent=2))
        else:
            width = max(len(n) for n in profiles.PROFILES)
            for p in profiles.PROFILES.values():
                click.echo(f"{p.name:<{width}}  {p.description}")
        return
    if not scenario_file:
        examples = ", ".join(sorted(str(p) for p in _examples()))
        raise click.UsageError(f"give --list-profiles or --scenario FILE (examples: {examples})")
    from simulators.scenario import ScenarioError, load

    try:
        scenario = load(scenario_file)
    except ScenarioError as exc:
        raise click.ClickException(str(exc)) from None
    say = (lambda *a: None) if quiet else (lambda msg: click.echo(msg, err=True))
    out = run_scenario(scenario, out_dir=out_dir, speed=speed, mqtt_url=mqtt_url, influx_url=influx_url, say=say)
    click.echo(str(out))


def _examples():
    from simulators.scenario import EXAMPLES

    return sorted(EXAMPLES.glob("*.toml"))


@click.command()
@click.option("--ground-truth", "truth_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="ground-truth.json written by `edgeloop simulate`.")
@click.option("--alerts", "events_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON Lines of inference and alert messages (events.jsonl of a run).")
@click.option("--lead-s", type=click.FloatRange(0), help="Lead time before a fault that still counts "
              "(default: the scenario's).")
@click.option("--min-consecutive", default=1, show_default=True, type=click.IntRange(1),
              help="Anomalous windows in a row that make one alarm.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def score(truth_file, events_file, lead_s, min_consecutive, as_json) -> None:
    """Precision, recall, F1, false alarms per device-hour and detection delay of the alarms."""
    from simulators import scoring

    try:
        truth = scoring.load_ground_truth(truth_file)
        events = scoring.load_events(events_file)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    lead = float(truth.get("lead_s", 0.0)) if lead_s is None else lead_s
    results = scoring.evaluate(truth, events, lead_s=lead, min_consecutive=min_consecutive)
    if as_json:
        click.echo(json.dumps([{"group": g, "profile": p, **s.to_dict()} for (g, p), s in sorted(results.items())],
                              indent=2))
        return
    _print_scores(results, lead)


def _print_scores(results, lead_s: float, echo=click.echo) -> None:
    if not results:
        echo("no inferences or alerts of the ground truth's devices")
        return
    echo(f"{'model/rule':<18} {'profile':<11} {'faults':>6} {'found':>5} {'alarms':>6} {'prec':>5} {'recall':>6} "
         f"{'F1':>5} {'FA/dev-h':>8} {'delay s':>8}   (lead time {lead_s:g} s)")
    for (group, profile), s in sorted(results.items()):
        delay = "-" if s.median_delay_s is None else f"{s.median_delay_s:.0f}"
        echo(f"{group:<18} {profile:<11} {s.faults:>6} {s.detected:>5} {s.alarms:>6} {s.precision:>5.2f} "
             f"{s.recall:>6.2f} {s.f1:>5.2f} {s.false_alarms_per_device_hour:>8.2f} {delay:>8}")


def run_scenario(scenario, *, out_dir=None, speed=None, mqtt_url=None, influx_url=None, say=print,
                 drain_timeout_s: float = 120.0) -> Path:
    """Run ``scenario`` and write its ground truth, events and scores; returns the run directory."""
    import contextlib

    from edgeloop import config as _config

    run_id = secrets.token_hex(2)
    base = Path(out_dir) if out_dir else _config.default_data_dir() / "simulate"
    run_dir = base if out_dir else base / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}-{run_id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    speed = float(speed or scenario.speed)
    say(f"scenario {scenario.name}: {len(scenario.devices)} devices, {scenario.duration_s:g} s of device time "
        f"at speed {speed:g}; files in {run_dir}")
    (run_dir / "scenario.json").write_text(json.dumps(scenario.to_dict(), indent=2))
    model_dirs = _train_models(scenario, run_dir, say)

    events: list[bytes] = []
    with contextlib.ExitStack() as stack:
        aggregator, url, protocol, caps = _start_cloud(stack, run_dir, run_id, mqtt_url, influx_url, say)
        sources = _run_fleet(scenario, run_dir, url, protocol, caps, model_dirs, speed, events, say, drain_timeout_s)
        stored = aggregator.store.count("inference")
    say(f"{len(events)} inferences and alerts produced, {stored} inference rows stored")
    return _write_results(scenario, run_dir, sources, events, say)


def _train_models(scenario, run_dir: Path, say) -> dict[str, Path]:
    from models import training

    window_len = max(2, round(scenario.window_s * scenario.rate_hz))
    dirs = {}
    for k, profile in enumerate(sorted({d.profile for d in scenario.devices})):
        say(f"training the first {profile} model on simulated normal data ...")
        X, names = training.simulated_training_set(profile, seed=scenario.seed * 1000 + 500_000 + 10 * k,
                                                   windows=4000, window_len=window_len, rate_hz=scenario.rate_hz,
                                                   machines=8)
        onnx_bytes, manifest = training.train_isolation_forest(
            X, names, version="1.0.0", profile=profile, seed=scenario.seed, threshold_quantile=0.999)
        dirs[profile] = training.write_model(run_dir / "models" / profile, onnx_bytes, manifest)
    return dirs


def _start_cloud(stack, run_dir: Path, run_id: str, mqtt_url, influx_url, say):
    from aggregator.service import Aggregator, AggregatorConfig, HttpSettings, InfluxSettings, MqttSettings

    caps = None
    if mqtt_url is None:
        from aggregator.embedded_broker import EmbeddedBroker

        broker = stack.enter_context(EmbeddedBroker(data_dir=str(run_dir / "broker")))
        mqtt_url, caps = broker.url, broker.capabilities
    protocol = "auto" if caps is None else ("5" if caps.mqtt5 else "3.1.1")
    shared = caps is None or caps.shared_subscriptions
    cfg = AggregatorConfig(
        data_dir=str(run_dir),
        mqtt=MqttSettings(url=mqtt_url, protocol=protocol, share_group=f"edgeloop-sim-{run_id}" if shared else None,
                          client_id=f"edgeloop-sim-agg-{run_id}",
                          receive_maximum=caps.receive_maximum if caps else 1000),
        influx=InfluxSettings(url=influx_url),
        http=HttpSettings(port=0),
    )
    aggregator = Aggregator(cfg)
    aggregator.start()
    stack.callback(aggregator.stop, forget_session=True)
    say(f"aggregator on {mqtt_url}, storing into {aggregator.store.name}; API http://127.0.0.1:{aggregator.http_port}")
    return aggregator, mqtt_url, protocol, caps


def _run_fleet(scenario, run_dir, url, protocol, caps, model_dirs, speed, events, say, drain_timeout_s):
    """Run every device on the one-process fleet runner; returns device -> its simulated source."""
    import msgspec

    from edgeloop import wire
    from simulators.fleet import FleetRunner, scenario_agents

    lock = threading.Lock()
    encoder = msgspec.json.Encoder()

    def record(message) -> None:
        if isinstance(message, (wire.Inference, wire.Alert)):
            with lock:
                events.append(encoder.encode(message))

    configs, sources = scenario_agents(scenario, url=url, protocol=protocol, caps=caps, data_dir=run_dir / "devices",
                                       model_dirs=model_dirs, speed=speed)
    runner = FleetRunner(configs, [sources[c.device_id] for c in configs], speed=speed, on_accept=record,
                         drain_timeout=drain_timeout_s)
    # Network cuts and clock steps are in device seconds since the start; the runner plans in real ones.
    for spec in scenario.devices:
        for cut in spec.cuts:
            runner.at(cut.start_s / speed, lambda f, d=spec.id, s=cut.duration_s / speed: f.cut(s, [d]))
        for step in spec.clock_steps:
            runner.at(step.at_s / speed, lambda f, d=spec.id, s=step.step_s: f.clock_step(s, [d]))
    with runner:
        deadline = time.monotonic() + scenario.duration_s / speed
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 5.0))
            left = max(0.0, deadline - time.monotonic())
            say(f"  {scenario.duration_s - left * speed:6.0f} / {scenario.duration_s:g} s device time, "
                f"{len(events)} inferences and alerts")
        say("sampling stopped; waiting for the cloud to confirm every outbox ...")
        results = runner.stop(drain_timeout_s)
    undelivered = [d for d, ok in results.items() if ok is not True]
    if undelivered:
        say(f"outboxes not confirmed empty: {', '.join(undelivered[:10])}")
    return sources


def _write_results(scenario, run_dir: Path, sources, events, say) -> Path:
    from simulators import scoring

    devices = []
    for spec in scenario.devices:
        seen = sources[spec.id].observed_faults()
        devices.append({"device": spec.id, "profile": spec.profile, "seed": spec.seed, **seen})
    truth = scoring.ground_truth_document(devices, scenario=scenario.name, lead_s=scenario.lead_s,
                                          rate_hz=scenario.rate_hz, window_s=scenario.window_s)
    truth_path = run_dir / "ground-truth.json"
    truth_path.write_text(json.dumps(truth, indent=2))
    events_path = run_dir / "events.jsonl"
    events_path.write_bytes(b"".join(e + b"\n" for e in events))
    results = scoring.evaluate(truth, (json.loads(e) for e in events), lead_s=scenario.lead_s)
    (run_dir / "scores.json").write_text(json.dumps(
        [{"group": g, "profile": p, **s.to_dict()} for (g, p), s in sorted(results.items())], indent=2))
    _print_scores(results, scenario.lead_s, echo=say)
    say(f"ground truth: {truth_path}\nscore again: edgeloop score --ground-truth {truth_path} --alerts {events_path}")
    return run_dir
