"""The model registry and the ``edgeloop models`` CLI (real training, tiny forests)."""

from __future__ import annotations

import hashlib
import json
import stat

import pytest
from click.testing import CliRunner

from aggregator.model_registry import CHAMPION_FILE, ModelRegistry, RegistryError
from edgeloop.cli_models import models
from models.manifest import Manifest, load_manifest
from models.signing import generate_keypair, is_acceptable_version, key_paths, sign, verify


def _model(version: str, *, payload: bytes | None = None, created: float = 0.0) -> tuple[bytes, Manifest]:
    onnx = payload or f"onnx-{version}".encode()
    return onnx, Manifest(
        version=version, profile="machine", feature_set="basic-v1", feature_names=["a"], input_shape=[-1, 1],
        opset=17, threshold=0.0, sha256=hashlib.sha256(onnx).hexdigest(), created=created,
    )


def test_add_get_list_latest(tmp_path):
    reg = ModelRegistry(tmp_path / "models")
    assert reg.list() == [] and reg.latest("machine") is None
    for v in ("1.9", "1.10", "1.2"):
        path = reg.add(*_model(v))
        assert path == tmp_path / "models" / "machine" / v
        assert (path / "model.onnx").read_bytes() == f"onnx-{v}".encode()
        assert load_manifest(path).version == v
    other = _model("0.1")[1]
    reg.add(b"x", Manifest(**{**{f: getattr(other, f) for f in other.__struct_fields__},
                              "profile": "pump", "sha256": hashlib.sha256(b"x").hexdigest()}))
    assert [m.version for m in reg.list("machine")] == ["1.2", "1.9", "1.10"]
    assert [(m.profile, m.version) for m in reg.list()][-1] == ("pump", "0.1")
    assert reg.latest("machine").version == "1.10"
    entry = reg.get("machine", "1.9")
    assert entry.onnx_bytes() == b"onnx-1.9" and entry.manifest.version == "1.9"
    assert not [p for p in (tmp_path / "models" / "machine").iterdir() if p.name.startswith(".")]


def test_duplicate_and_bad_inputs_refused(tmp_path):
    reg = ModelRegistry(tmp_path)
    reg.add(*_model("1.0"))
    with pytest.raises(RegistryError, match="already exists"):
        reg.add(*_model("1.0", payload=b"different"))
    assert reg.get("machine", "1.0").onnx_bytes() == b"onnx-1.0"
    onnx, m = _model("1.1")
    with pytest.raises(RegistryError, match="not the sha256"):
        reg.add(onnx + b"!", m)
    with pytest.raises(RegistryError, match="no model machine/9.9 in .*; known: \\['1.0'\\]"):
        reg.get("machine", "9.9")
    with pytest.raises(RegistryError, match="invalid model version"):
        reg.get("machine", "../machine")


def test_promote_and_rollback(tmp_path):
    reg = ModelRegistry(tmp_path)
    for v in ("1.0", "1.1", "1.2"):
        reg.add(*_model(v))
    assert reg.champion("machine") is None
    with pytest.raises(RegistryError, match="no model"):
        reg.promote("machine", "2.0")
    with pytest.raises(RegistryError, match="no previous champion"):
        reg.rollback("machine")
    reg.promote("machine", "1.0")
    reg.promote("machine", "1.1")
    reg.promote("machine", "1.1")  # promoting the champion again changes nothing
    reg.promote("machine", "1.2")
    assert reg.history("machine") == ["1.0", "1.1", "1.2"]
    assert json.loads((tmp_path / "machine" / CHAMPION_FILE).read_text())["champion"] == "1.2"
    assert reg.rollback("machine") == "1.1"
    assert reg.champion("machine") == "1.1" and reg.previous_champion("machine") == "1.0"
    reg.add(*_model("1.0+rollback.1"))
    assert reg.rollback("machine", via="1.0+rollback.1") == "1.0+rollback.1"
    assert reg.history("machine") == ["1.0+rollback.1"]
    # a fresh instance reads the same state from disk
    assert ModelRegistry(tmp_path).champion("machine") == "1.0+rollback.1"


def test_default_root_is_under_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELOOP_DATA_DIR", str(tmp_path))
    assert ModelRegistry().root == tmp_path / "models"


def _run(args, data_dir):
    result = CliRunner().invoke(models, [*args, "--data-dir", str(data_dir)], catch_exceptions=False)
    return result


def test_cli_keygen_train_list_show_promote_rollback(tmp_path):
    d = tmp_path / "data"
    r = _run(["train", "--version", "1.0", "--windows", "40", "--trees", "5"], d)
    assert r.exit_code != 0 and "models keygen" in r.output

    r = _run(["keygen"], d)
    assert r.exit_code == 0, r.output
    priv, pub = key_paths(d)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600 and pub.exists()
    assert _run(["keygen"], d).exit_code != 0  # never silently replaces the fleet's key

    for v in ("1.0", "1.1"):
        r = _run(["train", "--version", v, "--windows", "40", "--trees", "5", "--seed", "1"], d)
        assert r.exit_code == 0, r.output
        assert f"model machine/{v}" in r.output and "signed     yes" in r.output
    r = _run(["train", "--version", "1.0", "--windows", "40", "--trees", "5"], d)
    assert r.exit_code != 0 and "already exists" in r.output

    reg = ModelRegistry(d / "models")
    entry = reg.get("machine", "1.1")
    verify(entry.manifest, entry.onnx_bytes(), pub.read_bytes())
    assert entry.manifest.params["n_estimators"] == 5 and entry.manifest.metrics["train_rows"] == 40

    r = _run(["show", "machine", "1.0"], d)
    assert r.exit_code == 0
    shown = Manifest.from_json(r.output)
    assert shown.version == "1.0" and shown.signature == reg.get("machine", "1.0").manifest.signature
    assert _run(["show", "machine", "7"], d).exit_code != 0
    assert "signature and sha256 OK" in _run(["verify", "machine", "1.0"], d).output

    assert _run(["rollback", "machine"], d).exit_code != 0  # nothing to roll back to yet
    assert "-> 1.0" in _run(["promote", "machine", "1.0"], d).output
    assert "1.0 -> 1.1" in _run(["promote", "machine", "1.1"], d).output
    r = _run(["list"], d)
    assert r.exit_code == 0
    line = next(ln for ln in r.output.splitlines() if " 1.1 " in ln)
    assert line.startswith("* ") and "yes" in line

    r = _run(["rollback", "machine"], d)
    assert r.exit_code == 0, r.output
    assert "1.1 -> 1.0+rollback.1" in r.output
    rb = reg.get("machine", "1.0+rollback.1")
    assert rb.manifest.rollback_of == "1.1" and rb.manifest.parent_version == "1.0"
    assert rb.onnx_bytes() == reg.get("machine", "1.0").onnx_bytes()
    verify(rb.manifest, rb.onnx_bytes(), pub.read_bytes())
    assert reg.champion("machine") == "1.0+rollback.1"
    # an agent on 1.1 takes the signed rollback, but not plain 1.0
    assert is_acceptable_version("1.1", rb.manifest)[0]
    assert not is_acceptable_version("1.1", reg.get("machine", "1.0").manifest)[0]
    assert "1.0+rollback.1" in _run(["list", "--profile", "machine"], d).output


def test_cli_promote_refuses_unsigned(tmp_path):
    d = tmp_path
    generate_keypair(d)
    ModelRegistry(d / "models").add(*_model("3.0"))
    r = _run(["promote", "machine", "3.0"], d)
    assert r.exit_code != 0 and "not signed" in r.output
    onnx, m = _model("3.1")
    ModelRegistry(d / "models").add(onnx, sign(m, onnx, key_paths(d)[0]))
    assert _run(["promote", "machine", "3.1"], d).exit_code == 0
