"""``edgeloop models keygen|train|labels|list|show|verify|promote|rollback|push|rollout``: signed models.

A standalone click group that ``edgeloop/cli.py`` registers with ``main.add_command``. Each command
imports what it needs inside its function (training pulls in scikit-learn; the others do not).
``train`` and ``labels`` (the fault windows supervised training learns from) are in
``edgeloop/cli_train.py``, added to this group at the end of this module.

Rollback rule: ``rollback PROFILE`` re-signs the previous champion as a NEW registry entry
``<previous version without +suffix>+rollback.<N>`` (N = 1 + the rollback entries of that base
already stored) with ``rollback_of`` = the current champion's version and ``parent_version`` = the
previous champion's version, stores it, and makes it the champion in place of the previous one.
Agents accept an older model only as such a signed rollback (models.signing.is_acceptable_version).
The entry is made by aggregator.model_rollback.signed_rollback, which automatic rollbacks use too.

On a running aggregator (``--api URL``): ``push`` starts a rollout (canaries in shadow, gate, waves,
watch; see aggregator/rollout.py), ``rollout status`` shows it, and ``promote`` / ``rollback`` act
on it. Control calls send ``Authorization: Bearer`` with the token from ``--token-file`` or
``$EDGELOOP_API_TOKEN``.
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


_API = click.option("--api", "api_url", metavar="URL",  # no env default: offline unless asked
                    help="Act on the running aggregator at this HTTP address instead of the registry in --data-dir.")
_TOKEN = click.option("--token-file", type=click.Path(dir_okay=False),
                      help="File holding the aggregator's API token (default: $EDGELOOP_API_TOKEN).")
_TIMEOUT = click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(0.1, 300),
                        help="Seconds to wait for the aggregator.")


def _token(token_file) -> str:
    import os

    if token_file:
        try:
            lines = open(token_file, encoding="utf-8").read().splitlines()
        except OSError as exc:
            raise click.ClickException(f"cannot read the API token from {token_file}: {exc.strerror or exc}") from None
        if not lines or not lines[0].strip():
            raise click.ClickException(f"{token_file} is empty; it should hold the aggregator's API token")
        return lines[0].strip()
    token = os.environ.get("EDGELOOP_API_TOKEN")
    if not token:
        raise click.ClickException("no API token: pass --token-file or set EDGELOOP_API_TOKEN")
    return token


def _api(api_url: str, method: str, path: str, *, body: dict | None = None, token: str | None = None,
         timeout: float = 10.0):
    """One JSON call to the aggregator API (see edgeloop.cli.api_json); ``api_url`` may omit the scheme."""
    from edgeloop.cli import api_json

    if "://" not in api_url:
        api_url = f"http://{api_url}"
    return api_json(api_url.rstrip("/") + path, method=method, body=body, token=token, timeout=timeout)


def _rollout_line(r: dict) -> str:
    """One rollout as a few readable lines."""
    lines = [f"{r['profile']}: {r['version']} (replacing {r['previous']})  {r['state'].upper()}"]
    if r["state"] == "canary":
        got = ", ".join(f"{d} {r['pairs'].get(d, 0)}/{r['gate_windows']}" for d in r["canaries"])
        lines.append(f"  canaries   {got} paired windows")
    if r.get("waves"):
        lines.append(f"  waves      {' | '.join(', '.join(w) for w in r['waves'])}  (at wave {r['wave'] + 1})")
    if r["state"] == "watching":
        lines.append(f"  watching   {r['watch']}/{r['watch_windows']} windows of the new champion")
    if r.get("rollback_version"):
        lines.append(f"  rolled back to {r['rollback_version']}")
    for reason in r.get("reasons") or []:
        lines.append(f"  reason     {reason}")
    if r.get("error"):
        lines.append(f"  error      {r['error']}")
    return "\n".join(lines)


@models.command("promote")
@click.argument("profile")
@click.argument("version")
@_DATA_DIR
@_API
@_TOKEN
@_TIMEOUT
def promote(profile, version, data_dir, api_url, token_file, timeout) -> None:
    """Make VERSION the champion of PROFILE (with --api: push the running rollout of VERSION forward)."""
    from aggregator.model_registry import RegistryError

    if api_url:
        status = _api(api_url, "POST", f"/api/rollouts/{profile}/promote", body={"version": version},
                      token=_token(token_file), timeout=timeout)
        click.echo(_rollout_line(status))
        return
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
@_API
@_TOKEN
@_TIMEOUT
def rollback(profile, data_dir, api_url, token_file, timeout) -> None:
    """Make PROFILE's previous champion the champion again, as a signed rollback entry
    (with --api: stop or roll back the running rollout on every device)."""
    from aggregator.model_registry import RegistryError
    from aggregator.model_rollback import signed_rollback
    from models.signing import SignatureError

    if api_url:
        status = _api(api_url, "POST", f"/api/rollouts/{profile}/rollback", body={},
                      token=_token(token_file), timeout=timeout)
        click.echo(_rollout_line(status))
        return
    registry = _registry(data_dir)
    if registry.previous_champion(profile) is None:
        raise click.ClickException(
            f"profile {profile!r} has no previous champion to roll back to (history: {registry.history(profile) or 'empty'})"
        )
    key = _private_key(data_dir)
    try:
        result = signed_rollback(registry, profile, key)
    except (RegistryError, SignatureError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{profile}: champion {result.current} -> {result.version} (signed rollback to {result.previous})")


@models.command("push")
@click.argument("profile")
@click.argument("version")
@click.option("--canary", type=click.IntRange(1), help="Canary devices that run VERSION in shadow first (default 1).")
@click.option("--share", type=click.FloatRange(0, 1, min_open=True), help="Or: this share of PROFILE's devices.")
@click.option("--api", "api_url", metavar="URL", envvar="EDGELOOP_API", default="http://127.0.0.1:8080",
              show_default=True, help="The aggregator's HTTP address (env EDGELOOP_API).")
@_TOKEN
@_TIMEOUT
def push(profile, version, canary, share, api_url, token_file, timeout) -> None:
    """Start rolling VERSION out to PROFILE's devices: shadow on canaries, gate, waves, watch."""
    if canary is not None and share is not None:
        raise click.UsageError("give --canary or --share, not both")
    body: dict = {"profile": profile, "version": version}
    if canary is not None:
        body["canary"] = canary
    if share is not None:
        body["share"] = share
    status = _api(api_url, "POST", "/api/rollouts", body=body, token=_token(token_file), timeout=timeout)
    click.echo(_rollout_line(status))
    click.echo(f"follow it with: edgeloop models rollout status --api {api_url}")


@models.group("rollout")
def rollout() -> None:
    """Rollouts on a running aggregator."""


@rollout.command("status")
@click.option("--profile", help="Only this profile.")
@click.option("--api", "api_url", metavar="URL", envvar="EDGELOOP_API", default="http://127.0.0.1:8080",
              show_default=True, help="The aggregator's HTTP address (env EDGELOOP_API).")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON as it is.")
@_TIMEOUT
def rollout_status(profile, api_url, as_json, timeout) -> None:
    """Each profile's last rollout: state, canary evidence, waves, reasons."""
    import json

    data = _api(api_url, "GET", "/api/rollouts", timeout=timeout)
    rollouts = [r for r in data.get("rollouts", []) if profile is None or r.get("profile") == profile]
    if as_json:
        click.echo(json.dumps(rollouts, indent=2))
        return
    if not rollouts:
        click.echo("no rollouts" + (f" of profile {profile!r}" if profile else ""))
        return
    for r in rollouts:
        click.echo(_rollout_line(r))


# ``train`` and ``labels`` live in cli_train.py, which adds them to ``models`` with the helpers
# above: imported last, so that either module may be imported first.
import edgeloop.cli_train  # noqa: E402,F401
