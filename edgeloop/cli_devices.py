"""``edgeloop devices add|revoke|list`` and ``edgeloop broker-config``: credentials in and out.

Standalone click objects that ``edgeloop/cli.py`` registers with ``main.add_command``. They
print paths and names, never a password: the secret goes only into the bundle's
``mqtt-password`` file (mode 0600). See docs/security.md.
"""

from __future__ import annotations

import click

__all__ = ["devices", "broker_config"]

_DATA_DIR = click.option("--data-dir", type=click.Path(file_okay=False),
                         help="Where the device registry and CA key live (default: the edgeloop data dir).")


def _provisioner(data_dir):
    from aggregator.provision import Provisioner

    return Provisioner(data_dir)


def _reload_note(pid, reload: bool) -> str:
    if pid:
        return f"broker (pid {pid}) reloaded"
    if not reload:
        return "reload the broker to apply: kill -HUP <pid> (or systemctl reload mosquitto)"
    return "no running broker found through its pid_file; reload it to apply: kill -HUP <pid>"


@click.command("broker-config")
@click.option("--dir", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for mosquitto.conf, passwd, acl and the TLS files.")
@click.option("--port", default=8883, show_default=True, type=click.IntRange(1, 65535), help="Listener port.")
@click.option("--tls/--no-tls", default=True, show_default=True, help="TLS with a generated CA on the listener.")
@click.option("--host", "hosts", multiple=True, metavar="NAME",
              help="Name or address devices use for the broker (repeatable; the first goes into issued configs; "
                   "all go into the certificate). Default 127.0.0.1.")
@click.option("--bind", metavar="ADDRESS", help="Listen address (default: all interfaces with TLS, 127.0.0.1 without).")
@click.option("--profile", type=click.Path(dir_okay=False, exists=True),
              help="Broker profile to start from (default deploy/mosquitto/edgeloop.conf).")
@_DATA_DIR
def broker_config(out_dir, port, tls, hosts, bind, profile, data_dir) -> None:
    """Write an authenticated Mosquitto 2.0 configuration: passwords, ACL and TLS.

    Then run `mosquitto -c DIR/mosquitto.conf` and issue credentials with `edgeloop devices add`.
    """
    from aggregator.provision import ProvisionError

    prov = _provisioner(data_dir)
    kwargs = {"profile": profile} if profile else {}
    try:
        settings = prov.configure_broker(out_dir, port=port, tls=tls, hosts=hosts, bind=bind, **kwargs)
    except (ProvisionError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"broker configuration in {settings.dir}; devices will connect to {settings.url}")
    click.echo(f"start it: mosquitto -c {settings.dir}/mosquitto.conf")
    if not tls:
        click.echo("warning: without TLS, passwords cross the network in clear text", err=True)


@click.group()
def devices() -> None:
    """Issue, revoke and list broker credentials for devices and aggregators."""


@devices.command("add")
@click.argument("name")
@click.option("--profile", default="machine", show_default=True, help="Device profile (which models it receives).")
@click.option("--role", type=click.Choice(["device", "aggregator"]), default="device", show_default=True,
              help="aggregator: NAME must start with 'aggregator-'; reads every device, offers models.")
@click.option("--dir", "out_dir", type=click.Path(file_okay=False),
              help="Where to write the bundle (default ./NAME); must be new or empty.")
@click.option("--install-dir", metavar="PATH",
              help="Where the bundle will live on the device, for the paths in its config (default: --dir).")
@click.option("--reload/--no-reload", default=True, show_default=True, help="SIGHUP the running broker.")
@_DATA_DIR
def add(name, profile, role, out_dir, install_dir, reload, data_dir) -> None:
    """Issue NAME's credentials into a directory and grant them on the broker."""
    from aggregator.provision import ProvisionError

    try:
        issued = _provisioner(data_dir).add(name, out_dir=out_dir or name, profile=profile, role=role,
                                            install_dir=install_dir, reload=reload)
    except (ProvisionError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"issued {issued.role} {issued.name} into {issued.dir}:")
    for path in issued.files:
        click.echo(f"  {path.name}")
    click.echo(_reload_note(issued.reloaded_pid, reload))
    click.echo("copy the directory to the device over a trusted channel, then delete it here", err=True)


@devices.command("revoke")
@click.argument("name")
@click.option("--reload/--no-reload", default=True, show_default=True, help="SIGHUP the running broker.")
@_DATA_DIR
def revoke(name, reload, data_dir) -> None:
    """Remove NAME from the broker's password and ACL files (the broker then refuses it)."""
    from aggregator.provision import ProvisionError

    try:
        pid = _provisioner(data_dir).revoke(name, reload=reload)
    except ProvisionError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"revoked {name}; {_reload_note(pid, reload)}")


@devices.command("list")
@_DATA_DIR
def list_(data_dir) -> None:
    """Issued credentials: name, role, profile, when."""
    import datetime as dt

    from aggregator.provision import ProvisionError

    prov = _provisioner(data_dir)
    try:
        clients, broker = prov.clients(), prov.broker()
    except ProvisionError as exc:
        raise click.ClickException(str(exc)) from None
    if broker:
        click.echo(f"broker {broker.url}, files in {broker.dir}")
    if not clients:
        click.echo("no credentials issued")
    for c in clients:
        when = dt.datetime.fromtimestamp(c.issued_at).isoformat(timespec="seconds")
        click.echo(f"{c.name:<32} {c.role:<10} {c.profile or '-':<12} {when}")
