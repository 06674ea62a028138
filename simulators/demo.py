"""``edgeloop demo``: a simulated fleet through the whole loop, on embedded or real servers.

The story so far (later issues add drift, retraining and rollouts): train a first anomaly model
from simulated normal data; start the aggregator (embedded broker and SQLite store unless real
servers are given); bring N simulated machines online, some of which develop a bearing fault;
each scores its windows at the edge and publishes through its outbox; finally wait until every
device's outbox is confirmed and compare what the devices sent with what the store holds.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgeloop import config as _config

__all__ = ["DemoOptions", "DemoResult", "run_demo", "run_fleet"]

log = logging.getLogger(__name__)


@dataclass
class DemoOptions:
    devices: int = 5
    duration_s: float = 60.0
    rate_hz: float = 10.0
    seed: int = 1
    mqtt_url: str | None = None
    influx_url: str | None = None
    influx_database: str = "edgeloop"
    influx_org: str | None = None
    data_dir: str | None = None
    window_s: float = 5.0
    drain_timeout_s: float = 120.0
    http_port: int = 0  # the aggregator's API while the demo runs (0: any free port)
    quiet: bool = False


@dataclass
class DemoResult:
    devices: list[str]
    readings_sent: int
    readings_stored: int
    anomalies_flagged: int
    anomalies_stored: int
    undelivered: int  # messages still in outboxes after the drain
    quarantined: int
    sent_by_device: dict[str, int]
    stored_by_device: dict[str, int]

    @property
    def ok(self) -> bool:
        return self.undelivered == 0 and self.sent_by_device == self.stored_by_device


def run_demo(options: DemoOptions) -> bool:
    """Run the demo with progress and a summary on the terminal; True if stored == sent."""
    from rich.console import Console
    from rich.table import Table

    console = Console(quiet=options.quiet)
    result = run_fleet(options, console=console)
    table = Table(title="edgeloop demo", show_header=False)
    table.add_row("devices", str(len(result.devices)))
    table.add_row("readings sent", f"{result.readings_sent:,}")
    table.add_row("readings stored", f"{result.readings_stored:,}")
    table.add_row("anomalies flagged at the edge", f"{result.anomalies_flagged:,}")
    table.add_row("messages still undelivered", f"{result.undelivered:,}")
    table.add_row("messages quarantined", f"{result.quarantined:,}")
    console.print(table)
    if result.ok:
        console.print("[green]every reading sent was stored exactly once[/green]")
    else:
        diff = {d: (result.sent_by_device.get(d), result.stored_by_device.get(d)) for d in result.devices
                if result.sent_by_device.get(d) != result.stored_by_device.get(d)}
        console.print(f"[red]sent and stored differ: {diff}[/red]")
    return result.ok


def run_fleet(options: DemoOptions, console=None) -> DemoResult:
    from aggregator.service import Aggregator, AggregatorConfig, HttpSettings, InfluxSettings, MqttSettings
    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig, SamplingSettings, SourceSettings
    from edge_agent.inference import Model
    from models import training

    say = console.print if console is not None else (lambda *a, **k: None)
    run_id = secrets.token_hex(2)
    base = Path(options.data_dir) if options.data_dir else _config.default_data_dir()
    run_dir = base / "demo" / f"{time.strftime('%Y%m%d-%H%M%S')}-{run_id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    say(f"[bold]edgeloop demo[/bold]: {options.devices} devices, {options.duration_s:.0f} s, state in {run_dir}")

    with contextlib.ExitStack() as stack:
        mqtt_url, capabilities = options.mqtt_url, None
        if mqtt_url is None:
            from aggregator.embedded_broker import EmbeddedBroker

            broker = stack.enter_context(EmbeddedBroker(data_dir=str(run_dir / "broker")))
            mqtt_url, capabilities = broker.url, broker.capabilities
            say(f"embedded MQTT broker on {mqtt_url}")
        protocol = "auto" if capabilities is None else ("5" if capabilities.mqtt5 else "3.1.1")
        shared = capabilities is None or capabilities.shared_subscriptions

        window_len = max(2, round(options.window_s * options.rate_hz))
        say("training the first anomaly model on simulated normal data ...")
        X, names = training.simulated_training_set(
            "machine", seed=options.seed + 1000, windows=1500, window_len=window_len, rate_hz=options.rate_hz
        )
        onnx_bytes, manifest = training.train_isolation_forest(
            X, names, version="1.0.0", profile="machine", seed=options.seed, n_estimators=100
        )
        model_dir = training.write_model(run_dir / "models" / "1.0.0", onnx_bytes, manifest)
        say(f"model 1.0.0: isolation forest over {len(names)} features, threshold {manifest.threshold:.3f}")

        agg_cfg = AggregatorConfig(
            data_dir=str(run_dir),
            mqtt=MqttSettings(
                # A group of its own: a real broker may hold other aggregators' sessions.
                url=mqtt_url, protocol=protocol, share_group=f"edgeloop-demo-{run_id}" if shared else None,
                client_id=f"edgeloop-demo-agg-{run_id}",
                receive_maximum=capabilities.receive_maximum if capabilities else 1000,
            ),
            influx=InfluxSettings(url=options.influx_url, database=options.influx_database, org=options.influx_org),
            http=HttpSettings(port=options.http_port),
        )
        aggregator = Aggregator(agg_cfg)
        aggregator.start()
        stack.callback(aggregator.stop, forget_session=True)
        say(f"aggregator storing into {aggregator.store.name}")
        api = f"http://127.0.0.1:{aggregator.http_port}"
        say(f"fleet while it runs: {api}/api/fleet  (or `edgeloop fleet --api {api}`), metrics: {api}/metrics")

        devices = [f"machine-{run_id}-{k + 1:02d}" for k in range(options.devices)]
        agents: list[Agent] = []
        for k, device in enumerate(devices):
            faults = []
            if k % 3 == 1:  # every third machine develops a bearing fault halfway through
                start = options.duration_s * 0.5
                faults = [{"kind": "bearing_wear", "start_s": start, "duration_s": options.duration_s, "size": 1.5,
                           "ramp_s": options.duration_s * 0.1}]
            cfg = AgentConfig(
                device_id=device,
                profile="machine",
                data_dir=str(run_dir / "devices"),
                mqtt=_agent_mqtt(mqtt_url, protocol, capabilities),
                sampling=SamplingSettings(rate_hz=options.rate_hz, batch_s=1.0, window_s=options.window_s),
                source=SourceSettings(name="simulated", options={"profile": "machine", "seed": options.seed * 100 + k,
                                                                  "rate_hz": options.rate_hz, "faults": faults}),
            )
            agents.append(Agent(cfg, model=Model.load(model_dir)))

        stop = threading.Event()
        drained: dict[str, bool] = {}

        def run_agent(a: Agent) -> None:
            try:
                drained[a.device] = a.run(stop, drain_timeout=options.drain_timeout_s)
            except Exception:
                log.exception("agent %s failed", a.device)
                drained[a.device] = False

        threads = [threading.Thread(target=run_agent, args=(a,), name=a.device, daemon=True) for a in agents]
        for t in threads:
            t.start()
        _progress(console, options.duration_s, agents, aggregator)
        stop.set()
        say("sampling stopped; waiting for the cloud to confirm every outbox ...")
        for t in threads:
            t.join(options.drain_timeout_s + 30)
        undelivered = sum(a.outbox_depth for a in agents)

        store = aggregator.store
        sent = {a.device: a.stats.readings_accepted for a in agents}
        stored = {d: store.count("telemetry", d) for d in devices}
        return DemoResult(
            devices=devices,
            readings_sent=sum(sent.values()),
            readings_stored=sum(stored.values()),
            anomalies_flagged=sum(a.stats.anomalies for a in agents),
            anomalies_stored=sum(store.anomaly_count(d) for d in devices),
            undelivered=undelivered,
            quarantined=aggregator.quarantine.total(),
            sent_by_device=sent,
            stored_by_device=stored,
        )


def _agent_mqtt(url: str, protocol: str, capabilities=None):
    from edge_agent.config import MqttSettings

    if capabilities is None:
        return MqttSettings(url=url, protocol=protocol)
    return MqttSettings(url=url, protocol=protocol, max_payload=capabilities.max_payload,
                        max_inflight=min(200, capabilities.receive_maximum))


def _progress(console, duration_s: float, agents, aggregator) -> None:
    """Show readings sent and stored while the fleet runs."""
    if console is None or console.quiet:
        time.sleep(duration_s)
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), TimeRemainingColumn(), console=console
    ) as progress:
        task = progress.add_task("running", total=duration_s)
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < duration_s:
            sent = sum(a.stats.readings_accepted for a in agents)
            stored = aggregator.ingest.stats.stored_readings
            flagged = sum(a.stats.anomalies for a in agents)
            progress.update(task, completed=elapsed,
                            description=f"sent {sent:,} stored {stored:,} anomalies {flagged}")
            time.sleep(0.5)
        progress.update(task, completed=duration_s)
