"""``edgeloop models keygen|train|list|show|verify|promote|rollback``: signed models in the registry.

A standalone click group that ``edgeloop/cli.py`` registers with ``main.add_command``. Each command
imports what it needs inside its function (training pulls in scikit-learn; the others do not).

Rollback rule: ``rollback PROFILE`` re-signs the previous champion as a NEW registry entry
``<previous version without +suffix>+rollback.<N>`` (N = 1 + the rollback entries of that base
already stored) with ``rollback_of`` = the current champion's version and ``parent_version`` = the
previous champion's version, stores it, and makes it the champion in place of the previous one.
Agents accept an older model only as such a signed rollback (models.signing.is_acceptable_version).
"""

from __future__ import annotations

import click

__all__ = ["models"]

_DATA_DIR = click.option("--data-dir", type=click.Path(file_okay=False),
                         help="Where the signing key and the model registry live (default: the edgeloop data dir).")


def _data_dir(data_dir):
    from pathlib import Path

    from edgeloop.config import default_data_dir

    return Path(data_dir) if data_dir else default_data_dir()


def _registry(data_dir):
    from aggregator.model_registry import ModelRegistry

    return ModelRegistry(_data_dir(data_dir) / "models")


def _private_key(data_dir):
    from models.signing import SignatureError, key_paths, load_private_key

    priv, _ = key_paths(_data_dir(data_dir))
    if not priv.exists():
        raise click.ClickException(f"no signing key at {priv}; run `edgeloop models keygen` first")
    try:
        return load_private_key(priv)
    except SignatureError as exc:
        raise click.ClickException(str(exc)) from None


def _summary(m) -> str:
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(m.metrics.items()))
    lines = [
        f"model {m.profile}/{m.version}  ({m.algorithm}, feature set {m.feature_set}, "
        f"{m.n_features} features, opset {m.opset})",
        f"  sha256     {m.sha256}",
        f"  threshold  {m.threshold:.6g}",
        f"  signed     {'yes' if m.signature else 'NO'}",
    ]
    if m.parent_version:
        lines.append(f"  parent     {m.parent_version}")
    if m.rollback_of:
        lines.append(f"  rollback of {m.rollback_of}")
    if metrics:
        lines.append(f"  metrics    {metrics}")
    return "\n".join(lines)


@click.group()
def models() -> None:
    """Sign, store, promote and roll back models (the registry in <data-dir>/models)."""


@models.command("keygen")
@click.option("--force", is_flag=True, help="Replace an existing key (every device must then get the new signing.pub).")
@_DATA_DIR
def keygen(force, data_dir) -> None:
    """Create the Ed25519 model signing key pair in <data-dir>/keys/."""
    from models.signing import generate_keypair

    try:
        priv, pub = generate_keypair(_data_dir(data_dir), overwrite=force)
    except FileExistsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"private key {priv} (keep it here, mode 0600)")
    click.echo(f"public key  {pub} (goes into every device bundle issued from now on)")


@models.command("train")
@click.option("--profile", default="machine", show_default=True, help="Simulated profile to train on.")
@click.option("--version", "version", required=True, help="Version of the new model (e.g. 1.2.0).")
@click.option("--seed", default=0, show_default=True, type=int, help="Simulator and forest seed.")
@click.option("--windows", default=2000, show_default=True, type=click.IntRange(2), help="Normal windows to train on.")
@click.option("--trees", default=100, show_default=True, type=click.IntRange(1), help="Trees in the isolation forest.")
@click.option("--parent", "parent_version", help="Version this one replaces (default: the current champion).")
@_DATA_DIR
def train(profile, version, seed, windows, trees, parent_version, data_dir) -> None:
    """Train an isolation forest on simulated normal data, sign it and add it to the registry."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from aggregator.model_registry import RegistryError
    from models.signing import SignatureError, sign

    key = _private_key(data_dir)
    registry = _registry(data_dir)
    if parent_version is None:
        parent_version = registry.champion(profile)
    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(f"simulating {windows} normal windows", total=4)
        from models.training import simulated_training_set, train_isolation_forest

        try:
            X, names = simulated_training_set(profile, seed, windows=windows)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        progress.update(task, advance=1, description=f"fitting {trees} trees on {X.shape[0]} rows")
        try:
            onnx_bytes, manifest = train_isolation_forest(
                X, names, version=version, profile=profile, seed=seed, n_estimators=trees,
                parent_version=parent_version, training_window=(0.0, X.shape[0] * 5.0),
            )
        except (ValueError, TypeError) as exc:  # msgspec rejects a malformed version
            raise click.ClickException(f"cannot build model {version!r}: {exc}") from None
        progress.update(task, advance=1, description="signing")
        try:
            manifest = sign(manifest, onnx_bytes, key)
        except SignatureError as exc:
            raise click.ClickException(str(exc)) from None
        progress.update(task, advance=1, description="storing in the registry")
        try:
            path = registry.add(onnx_bytes, manifest)
        except RegistryError as exc:
            raise click.ClickException(str(exc)) from None
        progress.update(task, advance=1)
    click.echo(_summary(manifest))
    click.echo(f"stored in {path}")


@models.command("list")
@click.option("--profile", help="Only this profile.")
@_DATA_DIR
def list_(profile, data_dir) -> None:
    """Stored models: profile, version, champion mark, created, signed, sha256 prefix."""
    import datetime as dt

    registry = _registry(data_dir)
    manifests = registry.list(profile)
    if not manifests:
        click.echo(f"no models in {registry.root}")
        return
    champions: dict[str, str | None] = {}
    click.echo(f"{'':2}{'PROFILE':<12}{'VERSION':<28}{'CREATED':<22}{'SIGNED':<8}SHA256")
    for m in manifests:
        if m.profile not in champions:
            champions[m.profile] = registry.champion(m.profile)
        mark = "* " if champions[m.profile] == m.version else "  "
        created = dt.datetime.fromtimestamp(m.created, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        click.echo(f"{mark}{m.profile:<12}{m.version:<28}{created:<22}{'yes' if m.signature else 'no':<8}{m.sha256[:12]}")
    click.echo("* = champion")


@models.command("show")
@click.argument("profile")
@click.argument("version")
@_DATA_DIR
def show(profile, version, data_dir) -> None:
    """Print a stored model's manifest as JSON."""
    from aggregator.model_registry import RegistryError

    try:
        entry = _registry(data_dir).get(profile, version)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(entry.manifest.to_json().decode(), nl=False)


@models.command("verify")
@click.argument("profile")
@click.argument("version")
@_DATA_DIR
def verify_(profile, version, data_dir) -> None:
    """Check a stored model's signature and sha256 against <data-dir>/keys/signing.pub."""
    from aggregator.model_registry import RegistryError
    from models.signing import SignatureError, key_paths, verify

    _, pub = key_paths(_data_dir(data_dir))
    try:
        entry = _registry(data_dir).get(profile, version)
        verify(entry.manifest, entry.onnx_bytes(), pub.read_bytes())
    except (RegistryError, SignatureError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot read {pub}: {exc.strerror or exc}") from None
    click.echo(f"model {profile}/{version}: signature and sha256 OK")


@models.command("promote")
@click.argument("profile")
@click.argument("version")
@_DATA_DIR
def promote(profile, version, data_dir) -> None:
    """Make VERSION the champion of PROFILE."""
    from aggregator.model_registry import RegistryError

    registry = _registry(data_dir)
    try:
        entry = registry.get(profile, version)
        if not entry.manifest.signature:
            raise click.ClickException(f"model {profile}/{version} is not signed; agents would refuse it")
        before = registry.champion(profile)
        registry.promote(profile, version)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{profile}: champion {before or '(none)'} -> {version}")


@models.command("rollback")
@click.argument("profile")
@_DATA_DIR
def rollback(profile, data_dir) -> None:
    """Make PROFILE's previous champion the champion again, as a signed rollback entry."""
    import time

    import msgspec

    from aggregator.model_registry import RegistryError
    from models.signing import SignatureError, sign

    registry = _registry(data_dir)
    current, previous = registry.champion(profile), registry.previous_champion(profile)
    if previous is None:
        raise click.ClickException(
            f"profile {profile!r} has no previous champion to roll back to (history: {registry.history(profile) or 'empty'})"
        )
    key = _private_key(data_dir)
    try:
        prev = registry.get(profile, previous)
        base = previous.split("+", 1)[0]
        stored = {m.version for m in registry.list(profile)}
        n = 1
        while f"{base}+rollback.{n}" in stored:
            n += 1
        manifest = msgspec.structs.replace(
            prev.manifest, version=f"{base}+rollback.{n}", rollback_of=current, parent_version=previous,
            created=time.time(), signature=None,
        )
        onnx_bytes = prev.onnx_bytes()
        manifest = sign(manifest, onnx_bytes, key)
        registry.add(onnx_bytes, manifest)
        registry.rollback(profile, via=manifest.version)
    except (RegistryError, SignatureError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{profile}: champion {current} -> {manifest.version} (signed rollback to {previous})")
