"""Ed25519 model signing and the version acceptance rule (agent-safe).

The aggregator signs a model's manifest; the manifest's ``sha256`` pins ``model.onnx``, so one
signature over :meth:`Manifest.signing_payload` covers both. An agent verifies with the public key
from its device bundle (``signing.pub``, copied there by ``aggregator.provision`` from
``<data_dir>/keys/signing.pub``).

Import cost: ``cryptography``'s Ed25519 adds ~6 MB RSS to the agent (measured, see DESIGN.md), so
this module imports it only inside the functions that need it, i.e. when a model arrives. Importing
this module itself loads only msgspec and the standard library. With ``EDGELOOP_VERIFY_IN_CHILD=1``
(a device's setting) a verification runs in a short-lived child process instead, so the agent
never maps cryptography at all.

Formats: private key PEM PKCS8 (``signing.key``, mode 0600), public key PEM SubjectPublicKeyInfo
(``signing.pub``; a raw 32-byte key is accepted too), signature ``"ed25519:<base64>"`` in
``Manifest.signature``.

Errors: :class:`SignatureError` (a ``ValueError``) with ``reason`` one of :data:`REASONS`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from edgeloop.files import write_atomic
from models.manifest import Manifest

if TYPE_CHECKING:  # pragma: no cover
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "KEYS_DIR",
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "SIGNATURE_PREFIX",
    "REASONS",
    "SignatureError",
    "key_paths",
    "generate_keypair",
    "load_private_key",
    "sign",
    "verify",
    "verify_digest",
    "key_rotation_payload",
    "sign_key_rotation",
    "verify_key_rotation",
    "version_key",
    "is_acceptable_version",
]

KEYS_DIR = "keys"
PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"
SIGNATURE_PREFIX = "ed25519:"
#: Why a model was refused, as ``SignatureError.reason``.
REASONS = ("sha256_mismatch", "missing_signature", "malformed_signature", "bad_signature", "malformed_key")


class SignatureError(ValueError):
    """A model whose signature does not hold; ``reason`` says which check failed."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def key_paths(data_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``(<data_dir>/keys/signing.key, <data_dir>/keys/signing.pub)``."""
    keys = Path(data_dir) / KEYS_DIR
    return keys / PRIVATE_KEY_FILE, keys / PUBLIC_KEY_FILE


def generate_keypair(data_dir: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair into ``<data_dir>/keys/``; return ``(private, public)`` paths.

    Refuses to replace an existing key unless ``overwrite``: every device trusts the old public
    key, so a silent replacement would make the fleet refuse all new models.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    priv_path, pub_path = key_paths(data_dir)
    if not overwrite and (priv_path.exists() or pub_path.exists()):
        raise FileExistsError(
            f"a signing key already exists in {priv_path.parent}; devices trust its public key. "
            "Pass overwrite=True (CLI: --force) to replace it and re-provision every device"
        )
    priv_path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(priv_path.parent, 0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_atomic(priv_path, pem, 0o600)
    write_atomic(pub_path, pub, 0o644)
    return priv_path, pub_path


def load_private_key(key: bytes | str | os.PathLike | Ed25519PrivateKey) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM bytes, a path to ``signing.key``, or a key object."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if isinstance(key, Ed25519PrivateKey):
        return key
    if isinstance(key, (str, os.PathLike)):
        try:
            key = Path(key).read_bytes()
        except OSError as exc:
            raise SignatureError("malformed_key", f"cannot read private key {key}: {exc.strerror or exc}") from exc
    try:
        loaded = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError("malformed_key", f"private key is not a PEM PKCS8 key: {exc}") from exc
    if not isinstance(loaded, Ed25519PrivateKey):
        raise SignatureError("malformed_key", f"private key is {type(loaded).__name__}, not Ed25519")
    return loaded


def _load_public_key(data: bytes) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not isinstance(data, (bytes, bytearray)):
        raise SignatureError("malformed_key", f"public key must be bytes, got {type(data).__name__}")
    if len(data) == 32:
        return Ed25519PublicKey.from_public_bytes(bytes(data))
    try:
        loaded = serialization.load_pem_public_key(bytes(data))
    except (ValueError, TypeError) as exc:
        raise SignatureError(
            "malformed_key", f"public key is neither PEM nor 32 raw bytes ({len(data)} bytes): {exc}"
        ) from exc
    if not isinstance(loaded, Ed25519PublicKey):
        raise SignatureError("malformed_key", f"public key is {type(loaded).__name__}, not Ed25519")
    return loaded


def sign(manifest: Manifest, onnx_bytes: bytes, private_key) -> Manifest:
    """A copy of ``manifest`` carrying a signature over its payload (which pins ``onnx_bytes``).

    The manifest's sha256 must already equal sha256(onnx_bytes): signing a manifest for other
    bytes would produce a model no agent accepts, so it is refused here.
    """
    digest = hashlib.sha256(onnx_bytes).hexdigest()
    if manifest.sha256 != digest:
        raise SignatureError(
            "sha256_mismatch",
            f"model {manifest.version}: manifest sha256 {manifest.sha256[:16] or '(empty)'}... is not "
            f"the sha256 of the bytes to sign ({digest[:16]}...)",
        )
    key = load_private_key(private_key)
    unsigned = msgspec.structs.replace(manifest, signature=None)
    raw = key.sign(unsigned.signing_payload())
    return msgspec.structs.replace(unsigned, signature=SIGNATURE_PREFIX + base64.b64encode(raw).decode())


def verify(manifest: Manifest, onnx_bytes: bytes, public_key_bytes: bytes) -> None:
    """Return if ``manifest`` is signed by the key and pins ``onnx_bytes``; else :class:`SignatureError`.

    Checks, in order: the signature is present and well formed; the bytes hash to the manifest's
    sha256; the public key parses; the signature verifies over ``signing_payload()``.
    """
    verify_digest(manifest, hashlib.sha256(onnx_bytes).hexdigest(), public_key_bytes)


def verify_digest(manifest: Manifest, sha256_hex: str, public_key_bytes: bytes) -> None:
    """:func:`verify` for a model known by its sha256 (hex) rather than its bytes.

    A device hashes a downloaded model streaming from disk, so it never has to hold the bytes
    to check them; ``sha256_hex`` must be what it computed itself. Same checks and reasons as
    :func:`verify`.
    """
    name = f"model {manifest.profile}/{manifest.version}"
    if not manifest.signature:
        raise SignatureError("missing_signature", f"{name} is not signed; refusing an unsigned model")
    if not manifest.signature.startswith(SIGNATURE_PREFIX):
        raise SignatureError(
            "malformed_signature", f"{name}: signature does not start with {SIGNATURE_PREFIX!r}"
        )
    try:
        raw = base64.b64decode(manifest.signature[len(SIGNATURE_PREFIX):], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError("malformed_signature", f"{name}: signature is not valid base64: {exc}") from exc
    if len(raw) != 64:
        raise SignatureError("malformed_signature", f"{name}: signature is {len(raw)} bytes, Ed25519 gives 64")
    digest = sha256_hex
    if digest != manifest.sha256:
        raise SignatureError(
            "sha256_mismatch",
            f"{name}: sha256 of model.onnx is {digest[:16]}..., the signed manifest says "
            f"{manifest.sha256[:16] or '(empty)'}...; the file is corrupt or was replaced",
        )
    if not _ed25519_verifies(public_key_bytes, raw, manifest.signing_payload()):
        raise SignatureError(
            "bad_signature",
            f"{name}: signature does not verify with this public key (signed by another key, or the "
            "manifest was changed after signing)",
        )


# -- key rotation ---------------------------------------------------------------------------------


def key_rotation_payload(new_public_pem: bytes | str, key_id: str) -> bytes:
    """What a key rotation signs: the new key's PEM bytes followed by ``key_id`` (UTF-8)."""
    pem = new_public_pem.encode() if isinstance(new_public_pem, str) else bytes(new_public_pem)
    return pem + key_id.encode()


def sign_key_rotation(new_public_pem: bytes | str, key_id: str, private_key) -> str:
    """``"ed25519:<base64>"`` by the CURRENT private key over :func:`key_rotation_payload`.

    This is the ``signature`` of an :class:`edgeloop.wire_models.KeyRotation`; the new key must
    parse as an Ed25519 public key (a rotation to garbage would lock every device out).
    """
    pem = new_public_pem.encode() if isinstance(new_public_pem, str) else bytes(new_public_pem)
    _load_public_key(pem)
    raw = load_private_key(private_key).sign(key_rotation_payload(pem, key_id))
    return SIGNATURE_PREFIX + base64.b64encode(raw).decode()


def verify_key_rotation(new_public_pem: bytes | str, key_id: str, signature: str, public_key_bytes: bytes) -> None:
    """Return if ``signature`` is the holder of ``public_key_bytes`` vouching for the new key.

    Raises :class:`SignatureError`: ``malformed_signature``, ``malformed_key`` (either key does not
    parse) or ``bad_signature``.
    """
    pem = new_public_pem.encode() if isinstance(new_public_pem, str) else bytes(new_public_pem)
    if not signature.startswith(SIGNATURE_PREFIX):
        raise SignatureError("malformed_signature", f"key rotation {key_id}: signature does not start with {SIGNATURE_PREFIX!r}")
    try:
        raw = base64.b64decode(signature[len(SIGNATURE_PREFIX):], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError("malformed_signature", f"key rotation {key_id}: signature is not valid base64: {exc}") from exc
    if not _ed25519_verifies(public_key_bytes, raw, key_rotation_payload(pem, key_id), also_parse=pem):
        raise SignatureError("bad_signature", f"key rotation {key_id}: not signed by the key this device trusts")


# -- the Ed25519 check itself, in this process or in a short-lived child ----------------------------

#: Set (to anything but "" or "0") to verify in a child process: see :func:`_ed25519_verifies`.
VERIFY_IN_CHILD_ENV = "EDGELOOP_VERIFY_IN_CHILD"


def verify_in_child() -> bool:
    """Whether signatures are checked in a child process (``EDGELOOP_VERIFY_IN_CHILD``)."""
    return os.environ.get(VERIFY_IN_CHILD_ENV, "") not in ("", "0")


def _ed25519_verifies(public_key_bytes: bytes, raw: bytes, payload: bytes, *, also_parse: bytes | None = None) -> bool:
    """Whether ``raw`` is the Ed25519 signature of ``payload`` by ``public_key_bytes`` (PEM or raw).

    Raises :class:`SignatureError` ``malformed_key`` if the key (or ``also_parse``, another key that
    must parse) does not. With ``EDGELOOP_VERIFY_IN_CHILD`` set, the check runs in a child Python
    process that imports ``cryptography``, answers and exits: a device then never maps the
    cryptography library (measured: 6-7 MB of RSS that would stay for the process's life, since
    an extension module cannot be unloaded), at the price of one interpreter start per model
    installed or restored (rare). Without it the check runs here, which is what a process serving
    many simulated devices wants.
    """
    if verify_in_child():
        return _verify_in_child(public_key_bytes, raw, payload, also_parse)
    return _verify_here(public_key_bytes, raw, payload, also_parse)


def _verify_here(public_key_bytes: bytes, raw: bytes, payload: bytes, also_parse: bytes | None) -> bool:
    from cryptography.exceptions import InvalidSignature

    if also_parse is not None:
        _load_public_key(also_parse)
    key = _load_public_key(public_key_bytes)
    try:
        key.verify(raw, payload)
    except InvalidSignature:
        return False
    return True


def _verify_in_child(public_key_bytes: bytes, raw: bytes, payload: bytes, also_parse: bytes | None) -> bool:
    import json
    import subprocess
    import sys

    if not isinstance(public_key_bytes, (bytes, bytearray)):  # the same refusal as in process
        raise SignatureError("malformed_key", f"public key must be bytes, got {type(public_key_bytes).__name__}")
    request = {k: None if v is None else base64.b64encode(bytes(v)).decode() for k, v in
               (("key", public_key_bytes), ("sig", raw), ("payload", payload), ("also", also_parse))}
    try:
        done = subprocess.run([sys.executable, "-c", "import models.signing as s; s._child_main()"],
                              input=json.dumps(request), capture_output=True, text=True, timeout=120, check=False)
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        raise SignatureError("bad_signature", f"cannot check the signature: the verifier process failed ({detail})") from exc
    if answer.get("error"):
        raise SignatureError(answer.get("reason", "malformed_key"), answer["error"])
    return bool(answer["ok"])


def _child_main() -> None:
    """The child's side of :func:`_verify_in_child`: one JSON request on stdin, one answer on stdout."""
    import json
    import sys

    req = {k: None if v is None else base64.b64decode(v) for k, v in json.loads(sys.stdin.read()).items()}
    try:
        ok = _verify_here(req["key"], req["sig"], req["payload"], req["also"])
        answer: dict = {"ok": ok}
    except SignatureError as exc:
        answer = {"error": str(exc), "reason": exc.reason}
    sys.stdout.write(json.dumps(answer) + "\n")


# -- version rule ---------------------------------------------------------------------------------


def version_key(version: str) -> tuple:
    """Sort key for versions: ``[v]A.B.C[+build]``.

    The ``+build`` suffix (e.g. ``+rollback.1``) is ignored, as in semantic versioning, so a
    rollback entry ranks with the version it restores. The rest is split on ``.``; a part of
    digits compares as an integer, any other part as a string and after every integer; missing
    trailing parts count as 0 (``1.2 == 1.2.0``). A leading ``v`` is dropped.
    """
    core = version.split("+", 1)[0]
    if core[:1] in ("v", "V") and core[1:2].isdigit():
        core = core[1:]
    parts = [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in core.split(".")]
    while len(parts) > 1 and parts[-1] == (0, 0, ""):
        parts.pop()
    return tuple(parts)


def is_acceptable_version(current: str | None, candidate: Manifest) -> tuple[bool, str]:
    """Whether an agent running ``current`` may switch to ``candidate``, and why (or why not).

    Rule: with no current model anything is acceptable. A candidate whose ``rollback_of`` is set
    is acceptable only when it names ``current`` exactly (a signed rollback of this very model),
    whatever its version. Otherwise the candidate must be strictly newer by :func:`version_key`;
    the same or an older version is refused (a replayed old model must not downgrade a device).
    This checks the rule only: call :func:`verify` first, which is what makes ``rollback_of``
    trustworthy.
    """
    if candidate.rollback_of is not None:
        if current is not None and candidate.rollback_of == current:
            return True, f"signed rollback of {current} to {candidate.version}"
        return False, (
            f"{candidate.version} is a rollback of {candidate.rollback_of}, but the device runs "
            f"{current or 'no model'}"
        )
    if current is None:
        return True, f"no current model; {candidate.version} accepted"
    if candidate.version == current:
        return False, f"{current} is already the current model"
    if version_key(candidate.version) > version_key(current):
        return True, f"{candidate.version} is newer than {current}"
    return False, (
        f"{candidate.version} is not newer than {current}; an older model is accepted only as a "
        "signed rollback"
    )
