"""Ed25519 model signing: round trip, each refusal with its reason, the version rule, lazy import."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from models.manifest import Manifest
from models.signing import (
    SignatureError,
    generate_keypair,
    is_acceptable_version,
    key_paths,
    sign,
    verify,
    version_key,
)

ONNX = b"\x08\x07fake-onnx-bytes" * 64


def _manifest(version="1.0.0", onnx=ONNX, **kw) -> Manifest:
    return Manifest(
        version=version, profile="machine", feature_set="basic-v1", feature_names=["a", "b"],
        input_shape=[-1, 2], opset=17, threshold=0.1, sha256=hashlib.sha256(onnx).hexdigest(), **kw,
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    priv, pub = generate_keypair(d)
    return priv, pub.read_bytes()


def test_keypair_paths_and_modes(tmp_path):
    priv, pub = generate_keypair(tmp_path)
    assert (priv, pub) == key_paths(tmp_path) == (tmp_path / "keys" / "signing.key", tmp_path / "keys" / "signing.pub")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    with pytest.raises(FileExistsError, match="already exists"):
        generate_keypair(tmp_path)
    old = pub.read_bytes()
    generate_keypair(tmp_path, overwrite=True)
    assert pub.read_bytes() != old


def test_round_trip(keys):
    priv, pub = keys
    signed = sign(_manifest(), ONNX, priv)
    assert signed.signature.startswith("ed25519:")
    verify(signed, ONNX, pub)
    # survives the JSON file round trip
    verify(Manifest.from_json(signed.to_json()), ONNX, pub)
    # PEM bytes work as the private key too
    verify(sign(_manifest(), ONNX, priv.read_bytes()), ONNX, pub)


def test_sign_refuses_bytes_that_do_not_match_sha256(keys):
    with pytest.raises(SignatureError, match="not the sha256") as exc:
        sign(_manifest(), ONNX + b"x", keys[0])
    assert exc.value.reason == "sha256_mismatch"


def _reason(manifest, onnx, pub) -> str:
    with pytest.raises(SignatureError) as exc:
        verify(manifest, onnx, pub)
    return exc.value.reason


def test_flipped_byte_refused(keys):
    signed = sign(_manifest(), ONNX, keys[0])
    flipped = bytearray(ONNX)
    flipped[100] ^= 0x01
    assert _reason(signed, bytes(flipped), keys[1]) == "sha256_mismatch"


def test_wrong_key_refused(keys, tmp_path):
    signed = sign(_manifest(), ONNX, keys[0])
    _, other_pub = generate_keypair(tmp_path)
    assert _reason(signed, ONNX, other_pub.read_bytes()) == "bad_signature"


@pytest.mark.parametrize("field,value", [("threshold", 0.5), ("version", "9.9.9"), ("rollback_of", "0.9"),
                                         ("expires", 1.0), ("metrics", {"auc": 1.0})])
def test_tampered_field_refused(keys, field, value):
    signed = sign(_manifest(), ONNX, keys[0])
    tampered = msgspec.structs.replace(signed, **{field: value})
    assert _reason(tampered, ONNX, keys[1]) == "bad_signature"


def test_tampered_sha256_with_matching_bytes_refused(keys):
    """Swapping model AND sha256 together still fails: the sha256 is inside the signed payload."""
    signed = sign(_manifest(), ONNX, keys[0])
    other = b"other model"
    swapped = msgspec.structs.replace(signed, sha256=hashlib.sha256(other).hexdigest())
    assert _reason(swapped, other, keys[1]) == "bad_signature"


def test_missing_and_malformed_signature_refused(keys):
    assert _reason(_manifest(), ONNX, keys[1]) == "missing_signature"
    assert _reason(_manifest(signature="rsa:abc"), ONNX, keys[1]) == "malformed_signature"
    assert _reason(_manifest(signature="ed25519:!!notbase64"), ONNX, keys[1]) == "malformed_signature"
    assert _reason(_manifest(signature="ed25519:AAAA"), ONNX, keys[1]) == "malformed_signature"


@pytest.mark.parametrize("pub", [b"", b"not a key", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"])
def test_malformed_key_refused(keys, pub):
    signed = sign(_manifest(), ONNX, keys[0])
    assert _reason(signed, ONNX, pub) == "malformed_key"


def test_private_key_is_not_a_public_key(keys):
    signed = sign(_manifest(), ONNX, keys[0])
    assert _reason(signed, ONNX, keys[0].read_bytes()) == "malformed_key"


def test_raw_32_byte_public_key_accepted(keys):
    from cryptography.hazmat.primitives import serialization

    raw = serialization.load_pem_public_key(keys[1]).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    verify(sign(_manifest(), ONNX, keys[0]), ONNX, raw)


def test_version_key_rule():
    assert version_key("1.10") > version_key("1.9")
    assert version_key("1.2") == version_key("1.2.0") == version_key("v1.2.0")
    assert version_key("1.0+rollback.3") == version_key("1.0")
    assert version_key("2") > version_key("1.99.99")
    assert version_key("1.0.rc1") > version_key("1.0.9")  # a non-numeric part sorts after numbers


@pytest.mark.parametrize("current,candidate,ok,why", [
    (None, _manifest("0.1"), True, "no current model"),
    ("1.0.0", _manifest("1.0.1"), True, "newer"),
    ("1.9", _manifest("1.10"), True, "newer"),
    ("1.0.0", _manifest("1.0.0"), False, "already the current"),
    ("1.0.0", _manifest("1.0"), False, "not newer"),
    ("1.1.0", _manifest("1.0.0"), False, "signed rollback"),
    ("1.1.0", _manifest("1.0.0+rollback.1", rollback_of="1.1.0"), True, "rollback of 1.1.0"),
    ("1.2.0", _manifest("1.0.0+rollback.1", rollback_of="1.1.0"), False, "device runs 1.2.0"),
    (None, _manifest("1.0.0+rollback.1", rollback_of="1.1.0"), False, "no model"),
])
def test_is_acceptable_version(current, candidate, ok, why):
    accepted, reason = is_acceptable_version(current, candidate)
    assert accepted is ok
    assert why in reason


def test_import_does_not_load_cryptography(tmp_path):
    code = (
        "import sys, models.signing as s\n"
        "assert 'cryptography' not in sys.modules, 'imported at module load'\n"
        f"s.generate_keypair({str(tmp_path)!r})\n"
        "assert 'cryptography' in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr


# -- EDGELOOP_VERIFY_IN_CHILD: the same checks and reasons, run in a short-lived child process ------


@pytest.fixture
def in_child(monkeypatch):
    monkeypatch.setenv("EDGELOOP_VERIFY_IN_CHILD", "1")


def test_child_verifier_accepts_and_refuses_like_in_process(keys, tmp_path, in_child):
    from models.signing import verify_in_child

    assert verify_in_child()
    priv, pub = keys
    signed = sign(_manifest(), ONNX, priv)
    verify(signed, ONNX, pub)
    other = generate_keypair(tmp_path)[1].read_bytes()
    assert _reason(signed, ONNX, other) == "bad_signature"
    tampered = msgspec.structs.replace(signed, threshold=0.5)
    assert _reason(tampered, ONNX, pub) == "bad_signature"
    assert _reason(signed, ONNX, b"not a key") == "malformed_key"


def test_child_verifier_checks_key_rotations(keys, tmp_path, in_child):
    from models.signing import sign_key_rotation, verify_key_rotation

    priv, pub = keys
    new_pub = generate_keypair(tmp_path)[1].read_bytes()
    signature = sign_key_rotation(new_pub, "k2", priv)
    verify_key_rotation(new_pub, "k2", signature, pub)
    with pytest.raises(SignatureError) as err:
        verify_key_rotation(new_pub, "k3", signature, pub)  # signed for another key id
    assert err.value.reason == "bad_signature"
    with pytest.raises(SignatureError) as err:
        verify_key_rotation(b"garbage", "k2", signature, pub)
    assert err.value.reason == "malformed_key"


def test_child_verifier_never_imports_cryptography_here(keys):
    """The point of the child: a device verifying models never maps cryptography itself."""
    priv, pub = keys
    signed = sign(_manifest(), ONNX, priv)
    code = (
        "import sys, msgspec, models.signing as s\n"
        "from models.manifest import Manifest\n"
        "m = msgspec.json.decode(sys.stdin.buffer.read(), type=Manifest)\n"
        f"s.verify(m, {ONNX!r}, {pub!r})\n"
        "try:\n"
        f"    s.verify(msgspec.structs.replace(m, threshold=0.5), {ONNX!r}, {pub!r})\n"
        "except s.SignatureError as e:\n"
        "    assert e.reason == 'bad_signature', e.reason\n"
        "else:\n"
        "    raise SystemExit('a tampered manifest verified')\n"
        "assert 'cryptography' not in sys.modules, 'cryptography was imported in the verifying process'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "EDGELOOP_VERIFY_IN_CHILD": "1"}
    proc = subprocess.run([sys.executable, "-c", code], input=msgspec.json.encode(signed), capture_output=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
