"""``edgeloop models train`` and ``edgeloop models labels add|list|delete``: making new models.

``train`` builds a model, signs it with <data-dir>/keys and adds it to the registry in
<data-dir>/models: an isolation forest on simulated normal windows, or with ``--from-store`` on
the feature rows the devices stored (the aggregator config's store), or with ``--supervised`` a
failure predictor on those rows and the labels. ``labels`` keeps those labels: fault windows
(maintenance records, known failures) of one device each, in <data-dir>/labels.sqlite
(:class:`aggregator.labels.LabelStore`; the aggregator's ``/api/labels`` edits the same file).

Both commands are registered on the ``models`` group of ``edgeloop/cli_models.py``, whose helpers
(data dir, registry, signing key, summary) they use; heavy imports stay inside the functions.
"""

from __future__ import annotations

import click

from edgeloop.cli_models import _DATA_DIR, _data_dir, _private_key, _registry, _summary, models

__all__ = ["train", "labels"]


@models.command("train")
@click.option("--profile", default="machine", show_default=True, help="Profile to train for (simulated, or the devices' profile with --from-store).")
@click.option("--version", "version", required=True, help="Version of the new model (e.g. 1.2.0).")
@click.option("--seed", default=0, show_default=True, type=int, help="Simulator and forest seed.")
@click.option("--windows", default=2000, show_default=True, type=click.IntRange(2), help="Normal windows to train on (simulated).")
@click.option("--trees", default=100, show_default=True, type=click.IntRange(1), help="Trees in the isolation forest.")
@click.option("--parent", "parent_version", help="Version this one replaces (default: the current champion).")
@click.option("--from-store", is_flag=True, help="Train on the features the devices stored (the aggregator config's store).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Aggregator config naming the store (--from-store).")
@click.option("--since", help="Start of the stored window: epoch seconds, ISO 8601, or an age like 7d / 12h / 30m.")
@click.option("--until", help="End of the stored window (same forms; default: now).")
@click.option("--supervised", is_flag=True, help="Train a failure predictor on labelled windows (--from-store).")
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False), help="Labels file (default: <data-dir>/labels.sqlite).")
@click.option("--horizon", default=0.0, show_default=True, type=click.FloatRange(0), help="Seconds before a fault that count as positive.")
@click.option("--budget", default=120.0, show_default=True, type=click.FloatRange(0), help="Seconds the supervised search may spend.")
@_DATA_DIR
def train(profile, version, seed, windows, trees, parent_version, from_store, config_path, since,
          until, supervised, labels_path, horizon, budget, data_dir) -> None:
    """Train a model, sign it and add it to the registry.

    Without --from-store: an isolation forest on simulated normal data. With it: an isolation
    forest on the stored, unflagged feature rows of PROFILE, or with --supervised a failure
    predictor on them and the labels (see aggregator/labels.py).
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from aggregator.model_registry import RegistryError
    from models.signing import SignatureError, sign

    if supervised and not from_store:
        raise click.UsageError("--supervised trains on stored features: add --from-store")
    key = _private_key(data_dir)
    registry = _registry(data_dir)
    if parent_version is None:
        parent_version = registry.champion(profile)
    champion = registry.get(profile, parent_version).manifest if parent_version else None
    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("reading training data", total=4)
        try:
            if from_store:
                onnx_bytes, manifest = _train_from_store(
                    progress, task, profile=profile, version=version, seed=seed, trees=trees,
                    parent_version=parent_version, champion=champion, config_path=config_path,
                    since=since, until=until, supervised=supervised, labels_path=labels_path,
                    horizon=horizon, budget=budget, data_dir=data_dir)
            else:
                from models.training import simulated_training_set, train_isolation_forest

                progress.update(task, description=f"simulating {windows} normal windows")
                X, names = simulated_training_set(profile, seed, windows=windows)
                progress.update(task, advance=1, description=f"fitting {trees} trees on {X.shape[0]} rows")
                onnx_bytes, manifest = train_isolation_forest(
                    X, names, version=version, profile=profile, seed=seed, n_estimators=trees,
                    parent_version=parent_version, training_window=(0.0, X.shape[0] * 5.0),
                )
        except (ValueError, TypeError) as exc:  # too few rows, bad labels, a malformed version
            raise click.ClickException(f"cannot build model {version!r}: {exc}") from None
        progress.update(task, completed=2, total=4, description="signing")
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


def _when(text, name):
    """Seconds since the epoch from epoch seconds, ISO 8601 or an age ("7d", "12h", "30m", "45s")."""
    import datetime as dt
    import re
    import time

    if text is None:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return time.time() - float(m.group(1)) * unit
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected epoch seconds, ISO 8601 or an age like 7d", param_hint=name) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.timestamp()


def _train_from_store(progress, task, *, profile, version, seed, trees, parent_version, champion,
                      config_path, since, until, supervised, labels_path, horizon, budget, data_dir):
    """The --from-store half of ``train``: (onnx_bytes, manifest)."""
    import time

    from aggregator.service import load, open_store
    from models.training import load_training_rows, train_isolation_forest

    start, end = _when(since, "--since"), _when(until, "--until")
    if end is None:
        end = time.time()
    cfg = load(config_path, **({"data_dir": data_dir} if data_dir else {}))
    store = open_store(cfg)
    try:
        progress.update(task, description=f"reading {profile} features from the {store.name} store")
        kw = {"feature_names": champion.feature_names, "feature_set": champion.feature_set} if champion else {}
        rows = load_training_rows(store, profile, start, end, **kw)
    finally:
        store.close()
    progress.update(task, advance=1)
    if not supervised:
        progress.update(task, description=f"fitting {trees} trees on {len(rows.devices)} stored rows")
        return train_isolation_forest(
            rows.matrix, rows.names, version=version, profile=profile, seed=seed, n_estimators=trees,
            parent_version=parent_version, training_window=(float(rows.times[0]), float(rows.times[-1])),
            feature_set=kw.get("feature_set", "basic-v1"))
    from aggregator.labels import LABELS_FILE, LabelStore, window_labels
    from models.supervised import train_supervised

    path = labels_path or (_data_dir(data_dir) / LABELS_FILE)
    with LabelStore(path) as store:
        found = store.list()
    if not found:
        raise ValueError(f"no labels in {path}; add fault windows first")
    y = window_labels(rows.times, rows.devices, found, horizon_s=horizon)

    def report(message, done, total):
        progress.update(task, description=f"{message} [{done}/{total} candidates]")

    return train_supervised(
        rows.matrix, y, rows.times, rows.names, version=version, profile=profile, seed=seed,
        budget_s=budget, horizon_s=horizon, parent_version=parent_version, on_progress=report,
        feature_set=kw.get("feature_set", "basic-v1"))


# -- labels: fault windows in <data-dir>/labels.sqlite --------------------------------------------


def _labels_path(data_dir):
    from aggregator.labels import LABELS_FILE

    return _data_dir(data_dir) / LABELS_FILE


def _iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _label_line(lb) -> str:
    return f"{lb.id:<6}{lb.device:<24}{_iso(lb.start):<22}{_iso(lb.end):<22}{lb.kind:<18}{lb.note}"


@models.group("labels")
def labels() -> None:
    """Fault windows of devices (maintenance events, failures) for supervised training."""


@labels.command("add")
@click.argument("device")
@click.option("--start", required=True, help="Start of the fault window: epoch seconds, ISO 8601 (UTC if no zone) or an age like 2d.")
@click.option("--end", required=True, help="End of the fault window (same forms), after --start.")
@click.option("--kind", required=True, help="What it was: bearing_wear, maintenance, ... (a letter, then letters, digits, _ or -).")
@click.option("--note", default="", help="Free text, at most 1000 characters.")
@_DATA_DIR
def labels_add(device, start, end, kind, note, data_dir) -> None:
    """Add a fault window [START, END) of DEVICE and print it with its id."""
    from aggregator.labels import LabelStore

    t0, t1 = _when(start, "--start"), _when(end, "--end")
    path = _labels_path(data_dir)
    try:
        with LabelStore(path) as store:
            label = store.add(device, t0, t1, kind, note)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"label {label.id}: {label.device} {_iso(label.start)} .. {_iso(label.end)} {label.kind}"
               + (f" ({label.note})" if label.note else ""))
    click.echo(f"stored in {path}")


@labels.command("list")
@click.option("--device", help="Only this device's labels.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: a list of {id, device, start, end, kind, note}.")
@_DATA_DIR
def labels_list(device, as_json, data_dir) -> None:
    """Every stored label (of --device), by device then start."""
    import dataclasses
    import json

    from aggregator.labels import LabelStore

    path = _labels_path(data_dir)
    try:
        with LabelStore(path) as store:
            found = store.list(device)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(lb) for lb in found], indent=2))
        return
    if not found:
        click.echo(f"no labels{f' of {device}' if device else ''} in {path}")
        return
    click.echo(f"{'ID':<6}{'DEVICE':<24}{'START':<22}{'END':<22}{'KIND':<18}NOTE")
    for lb in found:
        click.echo(_label_line(lb))


@labels.command("delete")
@click.argument("label_id", metavar="ID", type=click.IntRange(1))
@_DATA_DIR
def labels_delete(label_id, data_dir) -> None:
    """Delete the label with this ID (see `edgeloop models labels list`)."""
    from aggregator.labels import LabelStore

    path = _labels_path(data_dir)
    with LabelStore(path) as store:
        deleted = store.delete(label_id)
    if not deleted:
        raise click.ClickException(f"no label {label_id} in {path}")
    click.echo(f"deleted label {label_id}")
