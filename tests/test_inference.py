"""The agent's ONNX wrapper: what it loads, what it refuses, and how it scores."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import msgspec
import numpy as np
import pytest

from edge_agent.inference import Model, ModelError
from models.features import FEATURE_SET
from models.manifest import Manifest
from models.training import simulated_training_set, train_isolation_forest, write_model


@pytest.fixture(scope="module")
def small_model():
    """A quick 10-tree model: these tests are about the wrapper, not about detection."""
    X, names = simulated_training_set("machine", seed=1, windows=300)
    onnx_bytes, manifest = train_isolation_forest(
        X, names, version="small-1", profile="machine", seed=1, n_estimators=10, max_samples=256
    )
    return X, onnx_bytes, manifest


def resealed(manifest: Manifest, onnx_bytes: bytes, **changes) -> Manifest:
    """The manifest with ``changes`` and a sha256 that matches ``onnx_bytes``."""
    return msgspec.structs.replace(
        manifest, sha256=hashlib.sha256(onnx_bytes).hexdigest(), **changes
    )


def test_agent_modules_never_import_sklearn():
    code = (
        "import sys\n"
        "import edge_agent.inference, edge_agent.sources, edge_agent.sources.simulated\n"
        "import models.features, models.manifest\n"
        "bad = sorted(m for m in ('sklearn', 'skl2onnx', 'onnx') if m in sys.modules)\n"
        "assert not bad, f'agent side imported {bad}'\n"
        "assert 'simulators' not in sys.modules, 'simulators imported eagerly'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_load_from_directory_and_from_bytes(small_model, tmp_path):
    X, onnx_bytes, manifest = small_model
    write_model(tmp_path, onnx_bytes, manifest)
    from_dir = Model.load(tmp_path)
    from_bytes = Model.load((onnx_bytes, manifest))
    assert from_dir.version == from_bytes.version == "small-1"
    assert from_dir.feature_names == manifest.feature_names
    assert from_dir.threshold == manifest.threshold
    np.testing.assert_array_equal(from_dir.score_batch(X[:20]), from_bytes.score_batch(X[:20]))


def test_score_returns_score_anomaly_and_latency(small_model):
    X, onnx_bytes, manifest = small_model
    model = Model.load((onnx_bytes, manifest))
    score, anomaly, latency_us = model.score(X[0])
    assert isinstance(score, float) and isinstance(anomaly, bool) and isinstance(latency_us, float)
    assert anomaly is (score > manifest.threshold)
    assert 0 < latency_us < 1e6
    assert score == pytest.approx(model.score_batch(X[:1])[0])
    assert model.score(list(X[0]))[0] == score  # a plain sequence works too
    far = X[0] * 0 + 1e6  # nothing like the training data
    assert model.score(far)[0] > model.score(X[0])[0]
    with pytest.raises(ValueError, match="takes 31 features, got 30"):
        model.score(X[0][:30])


def test_flipped_byte_is_refused(small_model, tmp_path):
    _, onnx_bytes, manifest = small_model
    write_model(tmp_path, onnx_bytes, manifest)
    data = bytearray((tmp_path / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        Model.load(tmp_path)


def test_bytes_onnxruntime_cannot_load_are_refused(small_model):
    _, onnx_bytes, manifest = small_model
    broken = onnx_bytes[: len(onnx_bytes) // 3]
    with pytest.raises(ModelError, match="onnxruntime cannot load"):
        Model.load((broken, resealed(manifest, broken)))


def test_wrong_input_shape_is_refused(small_model):
    _, onnx_bytes, manifest = small_model
    wider = resealed(
        manifest,
        onnx_bytes,
        feature_names=manifest.feature_names + ["extra__mean"],
        input_shape=[-1, manifest.n_features + 1],
    )
    with pytest.raises(ModelError, match="input shape"):
        Model.load((onnx_bytes, wider))


def test_graph_names_must_match_the_manifest(small_model):
    _, onnx_bytes, manifest = small_model
    with pytest.raises(ModelError, match="input is named 'X'"):
        Model.load((onnx_bytes, resealed(manifest, onnx_bytes, input_name="features")))
    with pytest.raises(ModelError, match="no output 'anomaly'"):
        Model.load((onnx_bytes, resealed(manifest, onnx_bytes, output_name="anomaly")))


def test_features_the_agent_cannot_serve_are_refused(small_model):
    _, onnx_bytes, manifest = small_model
    Model.load((onnx_bytes, manifest), feature_set=FEATURE_SET, feature_names=manifest.feature_names)
    with pytest.raises(ModelError, match="feature set 'basic-v1'.*'basic-v2'"):
        Model.load((onnx_bytes, manifest), feature_set="basic-v2")
    with pytest.raises(ModelError, match="missing here"):
        Model.load((onnx_bytes, manifest), feature_names=manifest.feature_names[:-1])


def test_missing_or_garbled_files_are_refused(small_model, tmp_path):
    _, onnx_bytes, manifest = small_model
    with pytest.raises(ModelError, match="cannot read manifest"):
        Model.load(tmp_path / "nowhere")
    write_model(tmp_path, onnx_bytes, manifest)
    (tmp_path / "manifest.json").write_text('{"version": "x"')
    with pytest.raises(ModelError, match="invalid manifest"):
        Model.load(tmp_path)
    write_model(tmp_path, onnx_bytes, manifest)
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(ModelError, match="cannot read"):
        Model.load(tmp_path)


def test_a_refused_update_leaves_the_current_model_serving(small_model):
    X, onnx_bytes, manifest = small_model
    current = Model.load((onnx_bytes, manifest))
    before = current.score(X[5])[0]
    try:
        current = Model.load((onnx_bytes[:-1], manifest))
    except ModelError:
        pass
    assert current.version == "small-1" and current.score(X[5])[0] == before


def test_session_options_are_the_low_memory_single_thread_ones(small_model):
    """What issue 3's memory and CPU targets rely on: one thread, no spinning, no CPU arena."""
    from edge_agent.inference import session_options

    so = session_options()
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (1, 1)
    assert so.enable_cpu_mem_arena is False
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    _, onnx_bytes, manifest = small_model
    options = Model.load((onnx_bytes, manifest))._session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.enable_cpu_mem_arena is False
