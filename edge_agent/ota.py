"""Receiving, verifying and installing a model pushed over the air (the device side of issue 5).

The aggregator offers a signed model (:class:`edgeloop.wire_models.ModelOffer`) and broadcasts its
chunks; :class:`ModelReceiver` writes each chunk to disk as it comes, checks everything before a
model may serve, and keeps what it installed. It does no MQTT itself: the agent feeds it offers
and chunks and publishes :meth:`ModelReceiver.missing` as chunk requests.

Memory stays bounded whatever the model size: a chunk is hashed and written at its offset in a
pre-sized file, and the whole file is hashed streaming; the bytes are read whole only once, at
install, to build the onnxruntime session (that is the model's own memory).

Layout under ``state_dir``::

    downloads/<version>/...                                    downloads in progress (edge_agent.ota_download)
    models/<version>/model.onnx, manifest.json, install.json   installed models
    keys/<fingerprint>.pem, keys/trusted.json                  held public keys (rotation)
    denied.json                                                {version: reason}

Crash safety: download progress is saved every :attr:`ModelReceiver.save_every` chunks or
seconds (see :mod:`edge_agent.ota_download`), so a kill -9 (or power loss) at worst re-requests
chunks. Every chunk is checked against ``chunk_sha256`` on arrival and the whole file against
``sha256`` before install, so no wrong byte is ever served.

Refusals raise :class:`ModelRefused` with a stable ``reason`` code (:data:`REASONS`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Sequence

from edge_agent.inference import Model, ModelError, SessionCache, sha256_file
from edge_agent.ota_download import (HAVE_FILE, OFFER_FILE, SAFE_VERSION as _VERSION, Downloads, PartialDownload,
                                     fsync_path)
from edgeloop import wire_models
from edgeloop.files import write_atomic
from models.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, ManifestError

__all__ = ["REASONS", "ModelRefused", "ModelReceiver"]

#: Why a model was refused, as ``ModelRefused.reason``.
REASONS = (
    "bad-signature", "no-key", "sha256-mismatch", "chunk-mismatch", "wrong-profile", "wrong-feature-set",
    "wrong-input-shape", "smoke-failed", "older-version", "denied", "expired", "too-large", "bad-manifest",
)
INSTALL_FILE = "install.json"
_UNCHECKED = object()  # load_installed without the version policy
# models.signing reasons -> ours; a malformed HELD key is a missing usable key.
_SIG_REASONS = {"sha256_mismatch": "sha256-mismatch", "malformed_key": "no-key"}
# edge_agent.inference reasons -> ours; a graph onnxruntime cannot load fails the smoke test.
_LOAD_REASONS = {"load-failed": "smoke-failed"}


class ModelRefused(Exception):
    """A model this device will not serve. ``reason``: a code from :data:`REASONS`; str: the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown refusal reason {reason!r}; expected one of {REASONS}")
        super().__init__(detail)
        self.reason = reason


class ModelReceiver:
    """Downloads, verifies, installs and re-loads the models of one device (thread-safe).

    ``public_key`` is the model-signing key from the device bundle (PEM or 32 raw bytes); a key
    rotated to later (:meth:`rotate_key`) is kept in ``state_dir`` and wins over it. With no key,
    every model is refused (``no-key``) unless ``allow_unsigned`` (tests, demo). ``durable=False``
    skips fsync (simulated fleets on one machine; a crash may then lose what was written).
    """

    save_every = (64, 2.0)  # persist download progress after this many chunks or seconds

    def __init__(self, state_dir: str | os.PathLike, *, profile: str, public_key: bytes | None,
                 feature_set: str, feature_names: Sequence[str], max_model_bytes: int = 64 << 20,
                 session_cache: SessionCache | None = None, allow_unsigned: bool = False,
                 durable: bool = True) -> None:
        self.state_dir = Path(state_dir)
        self.profile = profile
        self.feature_set = feature_set
        self.feature_names = list(feature_names)
        self.max_model_bytes = int(max_model_bytes)
        self.session_cache = session_cache
        self.allow_unsigned = bool(allow_unsigned)
        self.rejected_chunks = 0  # chunks that failed their length or sha256 check on arrival
        self._lock = threading.RLock()
        self._downloads = Downloads(self.state_dir / "downloads", write=self._write, durable=bool(durable))
        self._models = self.state_dir / "models"
        self._keys = self.state_dir / "keys"
        for d in (self._models, self._keys):
            d.mkdir(parents=True, exist_ok=True)
        self._denied: dict[str, str] = self._read_json(self.state_dir / "denied.json")
        self._key: bytes | None = None
        self._key_fp: str | None = None
        self._init_key(public_key)
        for tmp in self._models.glob(".*"):  # an install interrupted before its final rename
            shutil.rmtree(tmp, ignore_errors=True)
        self._downloads.resume(done=lambda version: self._installed_sha256(version) is not None)

    @property
    def durable(self) -> bool:
        """Whether files are synced to the disk (downloads' part files and bitmaps, installs, keys)."""
        return self._downloads.durable

    @durable.setter
    def durable(self, value: bool) -> None:
        # One switch for the receiver and its downloads: a fleet that turns syncing off after
        # construction must not keep fsyncing every part file at each progress save.
        self._downloads.durable = bool(value)

    # -- keys -------------------------------------------------------------------------------------

    @property
    def public_key(self) -> bytes | None:
        """The model-signing public key this device trusts now."""
        return self._key

    def rotate_key(self, rotation: wire_models.KeyRotation) -> None:
        """Trust ``rotation.new_public_key`` if the key held now signed it; persist it.

        The same key again is a no-op (the rotation is a retained message, seen at every connect).
        Raises :class:`ModelRefused` ``bad-signature`` (or ``no-key`` with no key held) otherwise.
        """
        from models.signing import SignatureError, verify_key_rotation

        new = rotation.new_public_key.encode()
        with self._lock:
            if self._key is None:
                raise ModelRefused("no-key", f"key rotation {rotation.key_id}: this device holds no key to check it with")
            if _fingerprint(new) == self._key_fp:
                return
            try:
                verify_key_rotation(new, rotation.key_id, rotation.signature, self._key)
            except SignatureError as exc:
                raise ModelRefused("bad-signature", f"key rotation {rotation.key_id} refused: {exc}") from exc
            state = self._read_json(self._keys / "trusted.json")
            self._trust(new, list(state.get("chain", [])))

    def _init_key(self, configured: bytes | None) -> None:
        state = self._read_json(self._keys / "trusted.json")
        chain = list(state.get("chain", []))
        current = state.get("current")
        if configured is not None and _fingerprint(configured) not in chain:
            self._trust(bytes(configured), [])  # first start, or the device was re-provisioned
        elif current and (self._keys / f"{current}.pem").is_file():
            self._key, self._key_fp = (self._keys / f"{current}.pem").read_bytes(), current
        elif configured is not None:
            self._trust(bytes(configured), [])

    def _trust(self, key: bytes, chain: list[str]) -> None:
        fp = _fingerprint(key)
        self._write(self._keys / f"{fp}.pem", key)
        self._write(self._keys / "trusted.json", json.dumps({"current": fp, "chain": chain + [fp]}).encode())
        self._key, self._key_fp = key, fp

    # -- downloading ------------------------------------------------------------------------------

    def on_offer(self, offer: wire_models.ModelOffer) -> None:
        """Start or resume downloading ``offer`` (idempotent).

        Refuses at once, with :class:`ModelRefused`, an offer this device could never serve
        (checked on the manifest alone, before a byte is fetched): another profile, too large,
        denied, bad or unsigned manifest, expired, other features. The same offer again keeps
        the chunks stored; a different one for the same version starts over. A version already
        installed with these bytes needs nothing.
        """
        with self._lock:
            manifest = self._check_offer(offer)
            installed = self._installed_sha256(offer.version)
            if installed is not None:
                if installed != offer.sha256:
                    raise ModelRefused("sha256-mismatch", f"model {offer.version} is installed with other bytes "
                                       f"(sha256 {installed[:16]}...); versions are immutable")
                return
            dl = self._downloads.get(offer.version)
            if dl is not None and dl.same_as(offer):
                dl.verified_fp = self._key_fp  # (a download resumed from disk is checked again here)
                dl.manifest = manifest
                return
            try:
                dl = self._downloads.start(offer)
            except OSError as exc:
                raise ModelRefused("too-large", f"model {offer.version}: cannot reserve {offer.size} bytes "
                                   f"in {self._downloads.root}: {exc.strerror or exc}") from exc
            dl.verified_fp, dl.manifest = self._key_fp, manifest

    def on_chunk(self, version: str, index: int, data: bytes) -> bool:
        """Store chunk ``index`` of ``version``: True if newly stored, False if a duplicate, for an
        unknown version or index, or of the wrong length or sha256 (it stays missing)."""
        with self._lock:
            dl = self._downloads.get(version)
            if dl is None or not 0 <= index < dl.offer.chunks or dl.has(index):
                return False
            if len(data) != dl.chunk_len(index) or hashlib.sha256(data).hexdigest() != dl.offer.chunk_sha256[index]:
                self.rejected_chunks += 1
                return False
            dl.store(index, data)
            if dl.unsaved >= self.save_every[0] or time.monotonic() - dl.saved_at >= self.save_every[1]:
                self._downloads.save(dl)
            return True

    def store_if_known(self, version: str, index: int, data: bytes) -> bool | None:
        """:meth:`on_chunk` for a caller that may run before the offer was taken, such as the
        MQTT network thread: None (nothing done) while no download of ``version`` is known, so
        that the caller hands the chunk on to whoever takes the offer; else what :meth:`on_chunk`
        returns. Storing a chunk where it arrives frees its bytes at once (no queue of chunks
        waiting for a busy loop) and lets the hashing run beside that loop."""
        with self._lock:
            if self._downloads.get(version) is None:
                return None
            return self.on_chunk(version, index, data)

    def progress(self, version: str) -> tuple[int, int]:
        """``(chunks_have, chunks_total)``; ``(0, 0)`` for a version not being downloaded."""
        with self._lock:
            dl = self._downloads.get(version)
            return (dl.count, dl.offer.chunks) if dl else (0, 0)

    def missing(self, version: str, max_ranges: int | None = None) -> list[tuple[int, int]]:
        """Inclusive chunk ranges still missing, in order (at most ``max_ranges``); ``[]`` when
        complete or not being downloaded."""
        with self._lock:
            dl = self._downloads.get(version)
            return dl.missing(max_ranges) if dl is not None else []

    def complete(self, version: str) -> bool:
        with self._lock:
            dl = self._downloads.get(version)
            return dl is not None and dl.complete

    def pending(self) -> list[str]:
        """Versions being downloaded (also those resumed from disk after a restart)."""
        with self._lock:
            return self._downloads.versions()

    def offer(self, version: str) -> wire_models.ModelOffer | None:
        """The offer a pending download follows (to resubscribe after a restart)."""
        with self._lock:
            dl = self._downloads.get(version)
            return dl.offer if dl else None

    def flush(self) -> None:
        """Persist the progress of every download now (e.g. before a clean stop) and close the
        part files held open between chunks (the next chunk opens its file again)."""
        with self._lock:
            self._downloads.flush()

    def drop(self, version: str) -> None:
        """Forget a download and delete its files (no error if there is none)."""
        with self._lock:
            self._downloads.drop(version)

    # -- installing -------------------------------------------------------------------------------

    def install(self, version: str, *, current: str | None) -> Model:
        """Verify the complete download of ``version`` and install it; return the loaded model.

        Checks everything :meth:`on_offer` checks again (the key may have rotated meanwhile), the
        version policy against ``current`` (the champion now serving; :func:`models.signing.
        is_acceptable_version`), the whole file's sha256, then loads it (graph checks and a
        smoke inference). On success the model is in ``models/<version>/``; on any refusal the
        download is dropped and :class:`ModelRefused` raised. ``ValueError`` if the download is
        unknown or incomplete (a caller error; nothing is dropped).
        """
        from models.signing import is_acceptable_version

        with self._lock:
            dl = self._downloads.get(version)
            if dl is None or not dl.complete:
                have, total = self.progress(version)
                raise ValueError(f"model {version}: no complete download to install ({have} of {total} chunks)")
            try:
                # the signature again only if the key changed since the offer was checked
                manifest = self._check_offer(dl.offer, signature=dl.verified_fp != self._key_fp, parsed=dl.manifest)
                ok, why = is_acceptable_version(current, manifest)
                if not ok:
                    raise ModelRefused("older-version", why)
                try:  # hashes the part file streaming, then onnxruntime reads it (or a cached session)
                    model = self._load(dl.part, manifest)
                except ModelRefused as exc:
                    if exc.reason != "sha256-mismatch":
                        raise
                    raise ModelRefused("chunk-mismatch", f"model {version}: every chunk matched the offer's list, "
                                       f"but together they do not hash to its sha256 ({exc})") from exc
                self._place(dl, model.manifest)  # moves the download's directory: nothing left to drop
            except ModelRefused:
                self.drop(version)
                raise
            return model

    def installed(self) -> list[str]:
        """Installed versions, oldest first by :func:`models.signing.version_key`."""
        from models.signing import version_key

        found = [d.name for d in self._models.iterdir()
                 if not d.name.startswith(".") and (d / MANIFEST_FILE).is_file() and (d / MODEL_FILE).is_file()]
        return sorted(found, key=version_key)

    def load_installed(self, version: str, *, current: str | None | object = _UNCHECKED) -> Model:
        """Load an installed model, re-checking signature, sha256, expiry, profile and features.

        Refuses (:class:`ModelRefused`) a denied, expired, altered or unsigned one; raises
        ``FileNotFoundError`` if ``version`` is not installed. The signature is checked with the
        key that verified it at install, which stays trusted for it after a key rotation. Pass
        ``current`` (the champion serving now, or None) to apply the version policy too, as when
        switching to an older installed version on the cloud's word; leave it out when serving
        again after a restart what was served before.
        """
        from models.signing import SignatureError, is_acceptable_version, verify_digest

        with self._lock:
            reason = self.denied(version)
            if reason is not None:
                raise ModelRefused("denied", f"model {version} is denied on this device: {reason}")
            directory = self._models / version
            if not _VERSION.match(version) or not (directory / MANIFEST_FILE).is_file():
                raise FileNotFoundError(f"model {version} is not installed in {self._models}; installed: {self.installed()}")
            manifest = _parse_manifest((directory / MANIFEST_FILE).read_bytes(), version)
            key = self._install_key(directory)
            if key is not None:
                try:  # the signed manifest; Model.load then checks the file against its sha256
                    verify_digest(manifest, manifest.sha256, key)
                except SignatureError as exc:
                    raise ModelRefused(_SIG_REASONS.get(exc.reason, "bad-signature"), str(exc)) from exc
            elif not self.allow_unsigned:
                raise ModelRefused("no-key", f"model {version}: no public key to check its signature")
            self._check_manifest(manifest, version)
            if current is not _UNCHECKED:
                ok, why = is_acceptable_version(current, manifest)
                if not ok:
                    raise ModelRefused("older-version", why)
            return self._load(directory / MODEL_FILE, manifest)

    def remove(self, version: str) -> None:
        """Delete an installed model (free disk space; no error if it is not installed)."""
        with self._lock:
            if _VERSION.match(version):
                shutil.rmtree(self._models / version, ignore_errors=True)

    # -- deny-list --------------------------------------------------------------------------------

    def deny(self, version: str, reason: str) -> None:
        """Never accept ``version`` again (e.g. rolled back); persisted. Drops its download."""
        with self._lock:
            self._denied[version] = reason[:500]
            self._write(self.state_dir / "denied.json", json.dumps(self._denied, indent=1).encode())
            self.drop(version)

    def denied(self, version: str) -> str | None:
        """Why ``version`` is denied, or None."""
        return self._denied.get(version)

    # -- checks -----------------------------------------------------------------------------------

    def _check_offer(self, offer: wire_models.ModelOffer, *, signature: bool = True,
                     parsed: Manifest | None = None) -> Manifest:
        """Everything that can be refused from the offer alone; the parsed, verified manifest.
        ``parsed``: the manifest parsed from this very offer before (its text is immutable), so
        that an install does not parse it a second time; every check still runs."""
        from models.signing import SignatureError, verify_digest

        name = f"model {offer.profile}/{offer.version}"
        if offer.profile != self.profile:
            raise ModelRefused("wrong-profile", f"{name} is for profile {offer.profile!r}, this device is {self.profile!r}")
        reason = self.denied(offer.version)
        if reason is not None:
            raise ModelRefused("denied", f"{name} is denied on this device: {reason}")
        if offer.size > self.max_model_bytes:
            raise ModelRefused("too-large", f"{name} is {offer.size} bytes, this device takes at most {self.max_model_bytes}")
        manifest = parsed if parsed is not None else _parse_manifest(offer.manifest.encode(), offer.version)
        if signature and self._key is not None:
            try:  # the signature covers the manifest, whose sha256 pins the bytes to come
                verify_digest(manifest, manifest.sha256, self._key)
            except SignatureError as exc:
                raise ModelRefused(_SIG_REASONS.get(exc.reason, "bad-signature"), str(exc)) from exc
        elif signature and not self.allow_unsigned:
            raise ModelRefused("no-key", f"{name}: this device holds no public key to check the signature with")
        if manifest.sha256 != offer.sha256:
            raise ModelRefused("sha256-mismatch", f"{name}: the offer's sha256 {offer.sha256[:16]}... is not the "
                               f"signed manifest's {manifest.sha256[:16] or '(empty)'}...")
        self._check_manifest(manifest, offer.version)
        return manifest

    def _check_manifest(self, manifest: Manifest, version: str) -> None:
        name = f"model {manifest.profile}/{manifest.version}"
        if manifest.version != version:
            raise ModelRefused("bad-manifest", f"model {version}: its manifest names version {manifest.version!r}")
        if manifest.profile != self.profile:
            raise ModelRefused("wrong-profile", f"{name}: the manifest is for profile {manifest.profile!r}, "
                               f"this device is {self.profile!r}")
        if manifest.expires is not None and manifest.expires <= time.time():
            raise ModelRefused("expired", f"{name} expired at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(manifest.expires))}")
        if manifest.feature_set != self.feature_set:
            raise ModelRefused("wrong-feature-set", f"{name} expects feature set {manifest.feature_set!r}, "
                               f"this device computes {self.feature_set!r}")
        if manifest.n_features != len(self.feature_names):
            raise ModelRefused("wrong-input-shape", f"{name} takes {manifest.n_features} features (input_shape "
                               f"{manifest.input_shape}), this device computes {len(self.feature_names)}")
        if manifest.feature_names != self.feature_names:
            diff = sorted(set(manifest.feature_names) - set(self.feature_names))
            raise ModelRefused("wrong-feature-set", f"{name} expects other features than this device computes "
                               f"(missing here: {diff[:5] or 'none, the order differs'})")

    def _load(self, model_file: Path, manifest: Manifest) -> Model:
        try:
            return Model.load((model_file, manifest), feature_set=self.feature_set, feature_names=self.feature_names,
                              cache=self.session_cache)
        except ModelError as exc:
            reason = _LOAD_REASONS.get(exc.reason, exc.reason)
            raise ModelRefused(reason if reason in REASONS else "smoke-failed", str(exc)) from exc

    # -- files ------------------------------------------------------------------------------------

    def _place(self, dl: PartialDownload, manifest: Manifest) -> None:
        """Turn the download's directory into ``models/<version>/``: the verified part file
        becomes ``model.onnx`` beside the manifest and the install record, then one directory
        rename publishes the three (no copy, no temporary directory: until that rename the
        download directory is the staging area, which :meth:`installed` never looks at).

        A crash half-way leaves a download directory without its offer, which the next start
        deletes (the model is then fetched again); anything failing here drops the download.
        """
        staging = dl.dir
        try:
            dl.close()
            for name in (OFFER_FILE, HAVE_FILE) if dl.offer_saved else ():  # bookkeeping, if ever saved
                (staging / name).unlink(missing_ok=True)
            self._write_new(staging / MANIFEST_FILE, dl.offer.manifest.encode())
            info = {"sha256": dl.offer.sha256, "signed_by": self._key_fp, "installed_at": time.time()}
            self._write_new(staging / INSTALL_FILE, json.dumps(info).encode())
            if self.durable:
                fsync_path(dl.part)
            os.rename(dl.part, staging / MODEL_FILE)
            final = self._models / manifest.version
            if final.exists():  # a re-install of the same version replaces it whole
                shutil.rmtree(final)
            os.rename(staging, final)
        except BaseException:
            self._downloads.drop(dl.offer.version)
            raise
        self._downloads.forget(dl.offer.version)

    def _write_new(self, path: Path, data: bytes) -> None:
        """Write a file in a directory nobody reads yet (the staging one): no temp file needed."""
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _install_key(self, directory: Path) -> bytes | None:
        fp = self._read_json(directory / INSTALL_FILE).get("signed_by")
        if fp and re.fullmatch(r"[0-9a-f]{16,64}", fp) and (self._keys / f"{fp}.pem").is_file():
            return (self._keys / f"{fp}.pem").read_bytes()
        return self._key

    def _installed_sha256(self, version: str) -> str | None:
        directory = self._models / version
        if not (directory / MODEL_FILE).is_file():
            return None
        return self._read_json(directory / INSTALL_FILE).get("sha256") or sha256_file(directory / MODEL_FILE)

    def _write(self, path: Path, data: bytes) -> None:
        if self.durable:
            write_atomic(path, data)
        else:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)

    @staticmethod
    def _read_json(path: Path) -> dict:
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


def _parse_manifest(raw: bytes, version: str) -> Manifest:
    try:
        return Manifest.from_json(raw)
    except ManifestError as exc:
        raise ModelRefused("bad-manifest", f"model {version}: {exc}") from exc


def _fingerprint(key: bytes) -> str:
    return hashlib.sha256(bytes(key).strip()).hexdigest()[:32]
