"""A signed rollback entry: the previous champion re-signed as a new version that replaces the current one.

Agents refuse a model older than the one they serve unless the aggregator signed that very
rollback (``rollback_of`` lies inside the signed payload, see models.signing.is_acceptable_version).
So rolling back never re-sends the old entry as it is: it stores a NEW registry entry
``<previous version without +suffix>+rollback.<N>`` (N = 1 + the rollback entries of that base
already stored) holding the previous champion's bytes, with ``rollback_of`` = the current
champion and ``parent_version`` = the previous champion, signs it, and makes it the champion in
place of the previous one. ``edgeloop models rollback`` and the automatic rollback of
:mod:`aggregator.rollout` both call :func:`signed_rollback`.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import msgspec

from aggregator.model_registry import ModelRegistry, RegistryError

__all__ = ["RollbackResult", "signed_rollback", "rollback_version_name"]


class RollbackResult(NamedTuple):
    """What a rollback did: ``current`` was the champion, ``version`` (a copy of ``previous``) is now."""

    current: str
    previous: str
    version: str


def rollback_version_name(registry: ModelRegistry, profile: str, previous: str) -> str:
    """The next free ``<base>+rollback.<N>`` name for a rollback to ``previous``."""
    base = previous.split("+", 1)[0]
    stored = {m.version for m in registry.list(profile)}
    n = 1
    while f"{base}+rollback.{n}" in stored:
        n += 1
    return f"{base}+rollback.{n}"


def signed_rollback(registry: ModelRegistry, profile: str, private_key) -> RollbackResult:
    """Store and sign a rollback entry for ``profile`` and make it the champion.

    ``private_key`` is anything :func:`models.signing.load_private_key` takes (a key object, PEM
    bytes or the path of ``signing.key``). Raises :class:`RegistryError` when the profile has no
    previous champion, :class:`models.signing.SignatureError` when the key is unusable.
    """
    from models.signing import load_private_key, sign

    current, previous = registry.champion(profile), registry.previous_champion(profile)
    if current is None or previous is None:
        raise RegistryError(
            f"profile {profile!r} has no previous champion to roll back to "
            f"(history: {registry.history(profile) or 'empty'})"
        )
    key = load_private_key(private_key)
    prev = registry.get(profile, previous)
    manifest = msgspec.structs.replace(
        prev.manifest, version=rollback_version_name(registry, profile, previous), rollback_of=current,
        parent_version=previous, created=time.time(), signature=None,
    )
    onnx_bytes = prev.onnx_bytes()
    manifest = sign(manifest, onnx_bytes, key)
    registry.add(onnx_bytes, manifest)
    registry.rollback(profile, via=manifest.version)
    return RollbackResult(current, previous, manifest.version)
