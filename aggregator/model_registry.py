"""The model registry: every trained model version on disk, and which one is each profile's champion.

Layout under ``root`` (by default ``<data_dir>/models``, never inside the package)::

    <profile>/<version>/model.onnx       the ONNX bytes
    <profile>/<version>/manifest.json    its (normally signed) manifest
    <profile>/champion.json              {"champion": version, "history": [older champions..., champion]}

Entries are immutable: :meth:`ModelRegistry.add` refuses a version that exists, and writes the
entry into a temporary directory renamed into place, so a reader never sees half an entry.
``history`` is a stack of champions: :meth:`promote` pushes, :meth:`rollback` pops back to the
previous one (optionally standing a re-signed copy of it in its place, see ``via``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from models.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, ManifestError, load_manifest, save_manifest, write_atomic
from models.signing import version_key

__all__ = ["RegistryError", "ModelEntry", "ModelRegistry", "CHAMPION_FILE"]

CHAMPION_FILE = "champion.json"


class RegistryError(ValueError):
    """A registry operation that cannot be done: unknown model, duplicate version, no champion."""


@dataclass(frozen=True)
class ModelEntry:
    """One stored model version."""

    path: Path
    manifest: Manifest

    @property
    def profile(self) -> str:
        return self.manifest.profile

    @property
    def version(self) -> str:
        return self.manifest.version

    def onnx_bytes(self) -> bytes:
        return (self.path / MODEL_FILE).read_bytes()


class ModelRegistry:
    """Model versions per profile on disk, with a champion pointer and its history per profile."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        if root is None:
            from edgeloop.config import default_data_dir

            root = default_data_dir() / "models"
        self.root = Path(root)

    # -- entries ----------------------------------------------------------------------------------

    def add(self, onnx_bytes: bytes, manifest: Manifest) -> Path:
        """Store a new version; return its directory. Refuses duplicates and a wrong sha256."""
        if not manifest.profile:
            raise RegistryError(f"model {manifest.version}: the manifest names no profile")
        digest = hashlib.sha256(onnx_bytes).hexdigest()
        if manifest.sha256 != digest:
            raise RegistryError(
                f"model {manifest.profile}/{manifest.version}: manifest sha256 "
                f"{manifest.sha256[:16] or '(empty)'}... is not the sha256 of the ONNX bytes ({digest[:16]}...)"
            )
        try:  # replace() does not validate: check the manifest reads back before storing it
            Manifest.from_json(manifest.to_json())
        except ManifestError as exc:
            raise RegistryError(f"model {manifest.profile}/{manifest.version}: {exc}") from exc
        profile_dir = self.root / manifest.profile
        final = profile_dir / manifest.version
        if final.exists():
            raise RegistryError(self._duplicate(manifest))
        profile_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{manifest.version}.", dir=profile_dir))
        try:
            write_atomic(tmp / MODEL_FILE, onnx_bytes)
            save_manifest(tmp / MANIFEST_FILE, manifest)
            try:
                os.rename(tmp, final)  # fails if another writer created a non-empty entry meanwhile
            except OSError as exc:
                raise RegistryError(self._duplicate(manifest)) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _duplicate(self, manifest: Manifest) -> str:
        return (
            f"model {manifest.profile}/{manifest.version} already exists in {self.root}; "
            "versions are immutable, pick a new version"
        )

    def get(self, profile: str, version: str) -> ModelEntry:
        for what, name in (("profile", profile), ("version", version)):
            if not name or "/" in name or "\\" in name or name.startswith("."):
                raise RegistryError(f"invalid model {what} {name!r}")
        path = self.root / profile / version
        if not (path / MANIFEST_FILE).is_file():
            known = [m.version for m in self.list(profile)]
            raise RegistryError(f"no model {profile}/{version} in {self.root}; known: {known or 'none'}")
        return ModelEntry(path, load_manifest(path / MANIFEST_FILE))

    def list(self, profile: str | None = None) -> list[Manifest]:
        """Manifests, sorted by profile then version (oldest first)."""
        if not self.root.is_dir():
            return []
        profiles = [profile] if profile is not None else sorted(p.name for p in self.root.iterdir() if p.is_dir())
        out: list[Manifest] = []
        for name in profiles:
            pdir = self.root / name
            if not pdir.is_dir():
                continue
            found = [
                load_manifest(d / MANIFEST_FILE)
                for d in pdir.iterdir()
                if d.is_dir() and not d.name.startswith(".") and (d / MANIFEST_FILE).is_file()
            ]
            out.extend(sorted(found, key=lambda m: (version_key(m.version), m.created, m.version)))
        return out

    def latest(self, profile: str) -> ModelEntry | None:
        """The highest version of ``profile`` (ties, e.g. a rollback entry: the newest created)."""
        manifests = self.list(profile)
        return self.get(profile, manifests[-1].version) if manifests else None

    # -- champion ---------------------------------------------------------------------------------

    def champion(self, profile: str) -> str | None:
        return self._pointer(profile)["champion"]

    def history(self, profile: str) -> list[str]:
        """Champions, oldest first; the last one is the current champion."""
        return list(self._pointer(profile)["history"])

    def promote(self, profile: str, version: str) -> None:
        """Make ``version`` the champion of ``profile`` (it must be stored)."""
        self.get(profile, version)
        state = self._pointer(profile)
        if state["champion"] == version:
            return
        state["history"].append(version)
        self._save_pointer(profile, state["history"])

    def previous_champion(self, profile: str) -> str | None:
        history = self.history(profile)
        return history[-2] if len(history) >= 2 else None

    def rollback(self, profile: str, *, via: str | None = None) -> str:
        """Drop the current champion and return the new one (the previous champion).

        ``via`` names a stored entry that stands in for the previous champion (the CLI stores a
        re-signed copy of it with ``rollback_of`` set) and takes its place in the history.
        """
        history = self.history(profile)
        if len(history) < 2:
            raise RegistryError(
                f"profile {profile!r} has no previous champion to roll back to (history: {history or 'empty'})"
            )
        history.pop()
        if via is not None:
            self.get(profile, via)
            history[-1] = via
        self._save_pointer(profile, history)
        return history[-1]

    def _pointer(self, profile: str) -> dict:
        path = self.root / profile / CHAMPION_FILE
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {"champion": None, "history": []}
        except (OSError, ValueError) as exc:
            raise RegistryError(f"cannot read {path}: {exc}") from exc
        history = data.get("history") or []
        return {"champion": history[-1] if history else None, "history": history}

    def _save_pointer(self, profile: str, history: list[str]) -> None:
        path = self.root / profile / CHAMPION_FILE
        body = {"champion": history[-1] if history else None, "history": history}
        write_atomic(path, (json.dumps(body, indent=2) + "\n").encode())
