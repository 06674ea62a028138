"""The ``edgeloop`` command line.

Every subcommand imports what it needs inside its own function, so ``edgeloop agent`` on a
Raspberry Pi never loads scikit-learn, skl2onnx or a web framework.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from edgeloop.config import ConfigError

__all__ = ["main"]


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeloop")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """edgeloop: edge agents, a lossless MQTT -> InfluxDB aggregator, and the model loop."""
    _setup_logging(verbose)


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Agent TOML configuration.")
@click.option("--example-config", is_flag=True, help="Print a complete, commented example configuration and exit.")
@click.option("--device-id", help="Overrides device_id.")
@click.option("--mqtt", "mqtt_url", metavar="URL", help="Broker, mqtt://HOST:PORT or mqtts://HOST:PORT.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Outbox, sequence and model state.")
@click.option("--model-dir", type=click.Path(file_okay=False), help="Serve model.onnx + manifest.json from here.")
def agent(config_file, example_config, device_id, mqtt_url, data_dir, model_dir) -> None:
    """Run the device agent: sample, compute features, score, publish through the outbox."""
    from edge_agent import config as agent_config

    if example_config:
        click.echo(agent_config.EXAMPLE, nl=False)
        return
    if not config_file and not device_id:
        raise click.UsageError("give --config FILE or at least --device-id (see --example-config)")
    try:
        cfg = agent_config.load(
            config_file, device_id=device_id, data_dir=data_dir, model_dir=model_dir, **{"mqtt.url": mqtt_url}
        )
        from edge_agent.agent import Agent

        runner = Agent(cfg)
    except (ConfigError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    stop = _stop_on_signals()
    click.echo(f"agent {cfg.device_id}: publishing to {cfg.mqtt.url}, state in {cfg.state_dir()}", err=True)
    runner.run(stop, drain_timeout=5.0)


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Aggregator TOML configuration.")
@click.option("--example-config", is_flag=True, help="Print a complete, commented example configuration and exit.")
@click.option("--mqtt", "mqtt_url", metavar="URL", help="Broker, mqtt://HOST:PORT.")
@click.option("--influx-url", metavar="URL", help="InfluxDB URL; unset: the embedded SQLite store.")
@click.option("--influx-database", metavar="NAME", help="Database (the bucket on InfluxDB 2.x/3.x).")
@click.option("--influx-org", metavar="ORG", help="Organisation (InfluxDB 2.x/3.x).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Registry, quarantine, embedded store.")
def aggregator(config_file, example_config, mqtt_url, influx_url, influx_database, influx_org, data_dir) -> None:
    """Run the aggregator: ingest from MQTT, store, confirm delivery, keep the fleet registry.

    Secrets come from EDGELOOP_INFLUX_TOKEN, EDGELOOP_INFLUX_USERNAME / EDGELOOP_INFLUX_PASSWORD
    or the config file's *_file keys, never from the command line.
    """
    from aggregator import service

    if example_config:
        click.echo(service.EXAMPLE, nl=False)
        return
    try:
        cfg = service.load(
            config_file,
            data_dir=data_dir,
            **{"mqtt.url": mqtt_url, "influx.url": influx_url, "influx.database": influx_database, "influx.org": influx_org},
        )
        runner = service.Aggregator(cfg)
    except (ConfigError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # store or broker unreachable at start: say so plainly
        raise click.ClickException(f"cannot start the aggregator: {exc}") from None
    stop = _stop_on_signals()
    click.echo(f"aggregator: {cfg.mqtt.url} -> {runner.store.name}; Ctrl-C to stop", err=True)
    runner.run_until(stop)


@main.command()
@click.option("--devices", default=5, show_default=True, type=click.IntRange(1, 1000), help="Simulated devices.")
@click.option("--duration", default=60.0, show_default=True, type=click.FloatRange(5, 86400), help="Seconds of sampling.")
@click.option("--rate", default=10.0, show_default=True, type=click.FloatRange(0.1, 1000), help="Samples per second per device.")
@click.option("--seed", default=1, show_default=True, type=int, help="Simulation seed.")
@click.option("--mqtt", "mqtt_url", metavar="URL", help="Use this broker instead of the embedded one.")
@click.option("--influx-url", metavar="URL", help="Use this InfluxDB instead of the embedded SQLite store.")
@click.option("--influx-database", default="edgeloop", show_default=True, metavar="NAME", help="Database (bucket on 2.x/3.x).")
@click.option("--influx-org", metavar="ORG", help="Organisation (InfluxDB 2.x/3.x).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where the run keeps its state.")
def demo(devices, duration, rate, seed, mqtt_url, influx_url, influx_database, influx_org, data_dir) -> None:
    """Run a simulated fleet through the whole loop and print what was sent and stored.

    Without --mqtt / --influx-url everything runs in this process: an embedded broker and the
    embedded SQLite store. InfluxDB secrets come from EDGELOOP_INFLUX_TOKEN or
    EDGELOOP_INFLUX_USERNAME / EDGELOOP_INFLUX_PASSWORD. Exits 1 if anything sent was not stored.
    """
    from simulators.demo import DemoOptions, run_demo

    options = DemoOptions(
        devices=devices, duration_s=duration, rate_hz=rate, seed=seed, mqtt_url=mqtt_url,
        influx_url=influx_url, influx_database=influx_database, influx_org=influx_org, data_dir=data_dir,
    )
    try:
        ok = run_demo(options)
    except (ConfigError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(0 if ok else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
