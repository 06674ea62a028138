"""The device side of model updates: chunks to disk, every refusal with its reason, resume, memory,
key rotation and the shared session cache. Real signed models (tiny trained forests), real files."""

from __future__ import annotations

import gc
import hashlib
import signal
import subprocess
import sys
import time
import tracemalloc

import msgspec
import numpy as np
import pytest

from edge_agent.inference import Model, SessionCache
from edge_agent.ota import REASONS, ModelReceiver, ModelRefused
from edgeloop.wire_models import KeyRotation, ModelOffer
from models.features import FEATURE_SET
from models.manifest import Manifest
from models.signing import generate_keypair, sign, sign_key_rotation
from models.training import simulated_training_set, train_isolation_forest

CHUNK = 4096


@pytest.fixture(scope="module")
def data():
    X, names = simulated_training_set("machine", seed=1, windows=300)
    return X, names


@pytest.fixture(scope="module")
def base(data):
    """A tiny 10-tree forest (tens of KB: a handful of 4 KB chunks) and its unsigned manifest."""
    X, names = data
    return train_isolation_forest(X, names, version="1.0.0", profile="machine", seed=1, n_estimators=10,
                                  max_samples=256)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two signing keys: ``a`` (the device trusts it) and ``b`` (a stranger, later rotated to)."""
    out = {}
    for name in ("a", "b"):
        priv, pub = generate_keypair(tmp_path_factory.mktemp(f"key-{name}"))
        out[name] = (priv, pub.read_bytes())
    return out


def signed(base, keys, version="1.0.0", *, onnx=None, key="a", **changes) -> tuple[bytes, Manifest]:
    onnx_bytes = base[0] if onnx is None else onnx
    manifest = msgspec.structs.replace(base[1], version=version, sha256=hashlib.sha256(onnx_bytes).hexdigest(), **changes)
    return onnx_bytes, sign(manifest, onnx_bytes, keys[key][0])


def make_offer(onnx: bytes, manifest: Manifest, *, chunk_size: int = CHUNK, chunk_bytes: bytes | None = None,
               manifest_text: str | None = None, **changes) -> ModelOffer:
    """The offer the aggregator would publish; ``chunk_bytes`` pins the chunk list to other bytes."""
    pinned = onnx if chunk_bytes is None else chunk_bytes
    fields = dict(v=1, profile="machine", version=manifest.version,
                  manifest=manifest_text or manifest.to_json().decode(), size=len(onnx),
                  sha256=hashlib.sha256(onnx).hexdigest(), chunk_size=chunk_size,
                  chunk_sha256=[hashlib.sha256(c).hexdigest() for c in chunks(pinned, chunk_size)], ts=time.time())
    fields.update(changes)
    return ModelOffer(**fields)


def chunks(onnx: bytes, size: int = CHUNK) -> list[bytes]:
    return [onnx[i:i + size] for i in range(0, len(onnx), size)]


@pytest.fixture
def make_receiver(tmp_path, keys, data):
    def make(state="state", **kw):
        kw.setdefault("public_key", keys["a"][1])
        return ModelReceiver(tmp_path / state, profile="machine", feature_set=FEATURE_SET,
                             feature_names=data[1], **kw)
    return make


def feed(rx: ModelReceiver, offer: ModelOffer, onnx: bytes, order=None) -> list[bool]:
    parts = chunks(onnx, offer.chunk_size)
    return [rx.on_chunk(offer.version, i, parts[i]) for i in (order if order is not None else range(len(parts)))]


def refusal(fn, *args, **kw) -> str:
    with pytest.raises(ModelRefused) as exc:
        fn(*args, **kw)
    assert exc.value.reason in REASONS and str(exc.value)
    return exc.value.reason


def test_chunks_out_of_order_and_duplicated_install(base, keys, data, make_receiver, tmp_path):
    onnx, manifest = signed(base, keys)
    offer = make_offer(onnx, manifest)
    n = offer.chunks
    assert n >= 4, f"the test model should span several chunks, got {n}"
    rx = make_receiver()
    rx.on_offer(offer)
    rx.on_offer(offer)  # idempotent
    assert rx.progress("1.0.0") == (0, n) and rx.missing("1.0.0") == [(0, n - 1)]
    order = list(range(n - 1, -1, -2))  # every other chunk, backwards
    assert all(feed(rx, offer, onnx, order))
    assert feed(rx, offer, onnx, order) == [False] * len(order)  # duplicates are not stored again
    assert rx.progress("1.0.0") == (len(order), n) and not rx.complete("1.0.0")
    assert rx.missing("1.0.0") == [(i, i) for i in range(n - 2, -1, -2)][::-1]
    assert rx.missing("1.0.0", max_ranges=1) == rx.missing("1.0.0")[:1]
    assert all(feed(rx, offer, onnx, [i for i in range(n) if i not in order]))
    assert rx.complete("1.0.0") and rx.missing("1.0.0") == []

    model = rx.install("1.0.0", current=None)
    assert model.version == "1.0.0" and rx.installed() == ["1.0.0"] and rx.pending() == []
    assert (tmp_path / "state/models/1.0.0/model.onnx").read_bytes() == onnx
    assert not (tmp_path / "state/downloads/1.0.0").exists()
    X = data[0][:20]
    np.testing.assert_array_equal(model.score_batch(X), Model.load((onnx, manifest)).score_batch(X))
    np.testing.assert_array_equal(rx.load_installed("1.0.0").score_batch(X), model.score_batch(X))
    rx.on_offer(offer)  # already installed with these bytes: nothing to download
    assert rx.pending() == []


def test_bad_chunks_are_refused_on_arrival_and_stay_missing(base, keys, make_receiver):
    onnx, manifest = signed(base, keys)
    offer = make_offer(onnx, manifest)
    rx = make_receiver()
    rx.on_offer(offer)
    parts = chunks(onnx)
    flipped = bytearray(parts[2])
    flipped[100] ^= 0x01
    assert rx.on_chunk("1.0.0", 2, bytes(flipped)) is False
    assert rx.on_chunk("1.0.0", 3, parts[3][:-1]) is False  # short
    assert rx.on_chunk("1.0.0", offer.chunks, b"x" * CHUNK) is False  # no such index
    assert rx.on_chunk("9.9.9", 0, parts[0]) is False  # no such download
    assert rx.rejected_chunks == 2
    feed(rx, offer, onnx, [i for i in range(offer.chunks) if i not in (2, 3)])
    assert rx.missing("1.0.0") == [(2, 3)]
    with pytest.raises(ValueError, match="no complete download"):
        rx.install("1.0.0", current=None)
    assert rx.on_chunk("1.0.0", 2, parts[2]) and rx.on_chunk("1.0.0", 3, parts[3])
    assert rx.install("1.0.0", current=None).version == "1.0.0"


def test_offer_refusals_each_with_its_reason(base, keys, data, make_receiver):
    X, names = data
    rx = make_receiver()
    onnx, manifest = signed(base, keys)
    good_text = manifest.to_json().decode()
    # one byte of the signed manifest changed
    flipped = good_text.replace('"isolation_forest"', '"isolation_foresT"')
    assert flipped != good_text
    assert refusal(rx.on_offer, make_offer(onnx, manifest, manifest_text=flipped)) == "bad-signature"
    # signed by a key this device does not trust
    assert refusal(rx.on_offer, make_offer(*signed(base, keys, key="b"))) == "bad-signature"
    # unsigned
    unsigned = msgspec.structs.replace(manifest, signature=None)
    assert refusal(rx.on_offer, make_offer(onnx, unsigned)) == "bad-signature"
    # offer and manifest disagree on the bytes
    other = hashlib.sha256(b"other").hexdigest()
    offer = make_offer(onnx, manifest)
    assert refusal(rx.on_offer, msgspec.structs.replace(offer, sha256=other)) == "sha256-mismatch"
    # profile: the offer's, then a manifest for another profile offered on ours
    assert refusal(rx.on_offer, make_offer(onnx, manifest, profile="pump")) == "wrong-profile"
    assert refusal(rx.on_offer, make_offer(*signed(base, keys, profile="pump"))) == "wrong-profile"
    # feature set and input shape (a model trained on one column fewer)
    assert refusal(rx.on_offer, make_offer(*signed(base, keys, feature_set="basic-v9"))) == "wrong-feature-set"
    fewer = train_isolation_forest(X[:, :-1], names[:-1], version="1.0.0", profile="machine", seed=1,
                                   n_estimators=5, max_samples=64)
    assert refusal(rx.on_offer, make_offer(*signed(fewer, keys))) == "wrong-input-shape"
    swapped = [names[1], names[0], *names[2:]]
    assert refusal(rx.on_offer, make_offer(*signed(base, keys, feature_names=swapped))) == "wrong-feature-set"
    # expired, too large, not JSON
    assert refusal(rx.on_offer, make_offer(*signed(base, keys, expires=time.time() - 10))) == "expired"
    small = make_receiver("small", max_model_bytes=1024)
    assert refusal(small.on_offer, offer) == "too-large"
    assert refusal(rx.on_offer, make_offer(onnx, manifest, manifest_text="{not json")) == "bad-manifest"
    assert rx.pending() == []  # nothing was downloaded for any of them
    # no key: refused, unless explicitly allowed
    assert refusal(make_receiver("nokey", public_key=None).on_offer, offer) == "no-key"
    loose = make_receiver("loose", public_key=None, allow_unsigned=True)
    loose_offer = make_offer(onnx, unsigned)
    loose.on_offer(loose_offer)
    feed(loose, loose_offer, onnx)
    assert loose.install("1.0.0", current=None).version == "1.0.0"


def _download(rx, onnx, manifest, **offer_kw) -> ModelOffer:
    offer = make_offer(onnx, manifest, **offer_kw)
    rx.on_offer(offer)
    feed(rx, offer, onnx)
    assert rx.complete(offer.version)
    return offer


def test_install_refusals_drop_the_download(base, keys, data, make_receiver, tmp_path):
    X, names = data
    rx = make_receiver()
    # a replayed older version
    _download(rx, *signed(base, keys, "1.0.0"))
    assert refusal(rx.install, "1.0.0", current="2.0.0") == "older-version"
    assert rx.pending() == [] and not (tmp_path / "state/downloads/1.0.0").exists() and rx.installed() == []
    # an installed older version is served on the cloud's word only under the same policy
    _download(rx, *signed(base, keys, "1.5.0"))
    rx.install("1.5.0", current=None)
    assert refusal(rx.load_installed, "1.5.0", current="2.0.0") == "older-version"
    assert rx.load_installed("1.5.0").version == rx.load_installed("1.5.0", current="1.0.0").version == "1.5.0"
    rx.remove("1.5.0")
    # the same version as the one serving is refused too; a signed rollback of it is accepted
    _download(rx, *signed(base, keys, "2.0.0"))
    assert refusal(rx.install, "2.0.0", current="2.0.0") == "older-version"
    _download(rx, *signed(base, keys, "1.0.0+rollback.1", rollback_of="2.0.0"))
    assert rx.install("1.0.0+rollback.1", current="2.0.0").version == "1.0.0+rollback.1"
    # chunks that each match the offer's list, but the list does not describe the signed model
    onnx, manifest = signed(base, keys, "3.0.0")
    tampered = bytearray(onnx)
    tampered[10] ^= 0xFF
    offer = make_offer(onnx, manifest, chunk_bytes=bytes(tampered))
    rx.on_offer(offer)
    feed(rx, offer, bytes(tampered))
    assert refusal(rx.install, "3.0.0", current=None) == "chunk-mismatch"
    # signed bytes onnxruntime cannot run
    _download(rx, *signed(base, keys, "4.0.0", onnx=b"\x08\x07 not a model " * 300))
    assert refusal(rx.install, "4.0.0", current=None) == "smoke-failed"
    # the graph takes fewer inputs than its (signed) manifest claims
    fewer = train_isolation_forest(X[:, :-1], names[:-1], version="5.0.0", profile="machine", seed=1,
                                   n_estimators=5, max_samples=64)
    _download(rx, *signed(base, keys, "5.0.0", onnx=fewer[0]))
    assert refusal(rx.install, "5.0.0", current=None) == "wrong-input-shape"
    assert rx.installed() == ["1.0.0+rollback.1"] and rx.pending() == []
    assert not [p for p in (tmp_path / "state/models").iterdir() if p.name.startswith(".")]


def test_deny_list_is_persisted_and_enforced(base, keys, make_receiver):
    rx = make_receiver()
    _download(rx, *signed(base, keys, "1.0.0"))
    rx.install("1.0.0", current=None)
    _download(rx, *signed(base, keys, "2.0.0"))
    rx.deny("2.0.0", "rolled back: alarm rate 3x the champion's")
    assert rx.pending() == []  # its download is dropped
    rx.deny("1.0.0", "rolled back")
    again = make_receiver()
    assert again.denied("2.0.0").startswith("rolled back: alarm rate") and again.denied("3.0.0") is None
    assert refusal(again.on_offer, make_offer(*signed(base, keys, "2.0.0"))) == "denied"
    assert refusal(again.load_installed, "1.0.0") == "denied"


def test_load_installed_detects_tampering(base, keys, make_receiver, tmp_path):
    rx = make_receiver()
    onnx, manifest = signed(base, keys, "1.0.0")
    _download(rx, onnx, manifest)
    rx.install("1.0.0", current=None)
    path = tmp_path / "state/models/1.0.0"
    (path / "model.onnx").write_bytes(onnx[:-1] + bytes([onnx[-1] ^ 1]))
    assert refusal(rx.load_installed, "1.0.0") == "sha256-mismatch"
    (path / "model.onnx").write_bytes(onnx)
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text.replace('"isolation_forest"', '"isolation_foresT"'))
    assert refusal(rx.load_installed, "1.0.0") == "bad-signature"
    with pytest.raises(FileNotFoundError, match="not installed"):
        rx.load_installed("7.0.0")
    rx.remove("1.0.0")
    assert rx.installed() == []


def test_resume_with_a_new_receiver_asks_only_for_missing_chunks(base, keys, make_receiver):
    onnx, manifest = signed(base, keys)
    offer = make_offer(onnx, manifest)
    n = offer.chunks
    rx = make_receiver()
    rx.on_offer(offer)
    feed(rx, offer, onnx, range(0, n, 2))
    rx.flush()
    del rx
    rx = make_receiver()  # a restart
    assert rx.pending() == ["1.0.0"] and rx.offer("1.0.0") == offer
    assert rx.missing("1.0.0") == [(i, i) for i in range(1, n, 2)]
    rx.on_offer(offer)  # the retained offer arrives again: progress is kept
    assert rx.progress("1.0.0") == (len(range(0, n, 2)), n)
    assert feed(rx, offer, onnx, range(0, n, 2)) == [False] * len(range(0, n, 2))
    assert all(feed(rx, offer, onnx, range(1, n, 2)))
    # a DIFFERENT offer for the same version starts over
    rx.on_offer(make_offer(onnx, manifest, chunk_size=2 * CHUNK))
    assert rx.progress("1.0.0") == (0, -(-len(onnx) // (2 * CHUNK)))


def test_kill_9_at_worst_re_requests_chunks(base, keys, make_receiver, tmp_path):
    """A child process stores chunks (progress saved every 3) and is killed with SIGKILL mid-way."""
    onnx, manifest = signed(base, keys)
    offer = make_offer(onnx, manifest, chunk_size=1024)
    assert offer.chunks >= 8
    (tmp_path / "offer.json").write_bytes(msgspec.json.encode(offer))
    (tmp_path / "model.onnx").write_bytes(onnx)
    (tmp_path / "pub.pem").write_bytes(keys["a"][1])
    code = f"""
import os, signal, msgspec
from pathlib import Path
from edge_agent.ota import ModelReceiver
from edgeloop.wire_models import ModelOffer
from models.features import FEATURE_SET
d = Path({str(tmp_path)!r})
offer = msgspec.json.decode((d / "offer.json").read_bytes(), type=ModelOffer)
onnx = (d / "model.onnx").read_bytes()
rx = ModelReceiver(d / "state", profile="machine", public_key=(d / "pub.pem").read_bytes(),
                   feature_set=FEATURE_SET, feature_names={list(manifest.feature_names)!r})
rx.save_every = (3, 3600.0)
rx.on_offer(offer)
for i in range(7):
    assert rx.on_chunk(offer.version, i, onnx[i * offer.chunk_size:(i + 1) * offer.chunk_size])
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    rx = make_receiver()
    assert rx.progress("1.0.0") == (6, offer.chunks)  # chunk 6 was stored but not yet recorded
    assert rx.missing("1.0.0") == [(6, offer.chunks - 1)]
    assert all(feed(rx, offer, onnx, range(6, offer.chunks)))
    assert rx.install("1.0.0", current=None).version == "1.0.0"


def _padded(base, megabytes: float) -> bytes:
    """The tiny forest plus an unused random initializer: a real ONNX model of the given size."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(base[0])
    pad = np.random.default_rng(0).standard_normal(int(megabytes * (1 << 20)) // 4).astype(np.float32)
    proto.graph.initializer.append(numpy_helper.from_array(pad, name="padding"))
    return proto.SerializeToString()


def test_5_mb_model_installs_with_bounded_memory(base, keys, data, make_receiver):
    onnx_bytes = _padded(base, 5)
    assert len(onnx_bytes) > 5 << 20
    onnx_bytes, manifest = signed(base, keys, "1.0.0", onnx=onnx_bytes)
    chunk_size = 64 * 1024
    offer = make_offer(onnx_bytes, manifest, chunk_size=chunk_size)
    rx = make_receiver()
    view = memoryview(onnx_bytes)
    tracemalloc.start()
    try:
        base_mem, _ = tracemalloc.get_traced_memory()
        rx.on_offer(offer)
        for i in reversed(range(offer.chunks)):
            assert rx.on_chunk("1.0.0", i, bytes(view[i * chunk_size:(i + 1) * chunk_size]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    bound = 3 * chunk_size + (256 << 10)  # measured: ~75 KB (one chunk and bookkeeping)
    assert peak - base_mem < bound, f"chunk handling peaked at {peak - base_mem} bytes, bound {bound}"
    model = rx.install("1.0.0", current=None)
    X = data[0][:10]
    np.testing.assert_allclose(model.score_batch(X), Model.load((base[0], base[1])).score_batch(X), rtol=1e-6)


def test_key_rotation(base, keys, make_receiver, tmp_path):
    priv_a, pub_a = keys["a"]
    priv_b, pub_b = keys["b"]
    rx = make_receiver()
    _download(rx, *signed(base, keys, "1.0.0", key="a"))
    rx.install("1.0.0", current=None)
    # signed by a key the device does not hold: refused, the key stays
    forged = KeyRotation(v=1, key_id="k2", new_public_key=pub_b.decode(),
                         signature=sign_key_rotation(pub_b, "k2", priv_b), ts=time.time())
    assert refusal(rx.rotate_key, forged) == "bad-signature" and rx.public_key == pub_a
    # the key_id is signed too
    good_sig = sign_key_rotation(pub_b, "k2", priv_a)
    relabelled = KeyRotation(v=1, key_id="k3", new_public_key=pub_b.decode(), signature=good_sig, ts=time.time())
    assert refusal(rx.rotate_key, relabelled) == "bad-signature"
    rotation = KeyRotation(v=1, key_id="k2", new_public_key=pub_b.decode(), signature=good_sig, ts=time.time())
    rx.rotate_key(rotation)
    assert rx.public_key == pub_b
    rx.rotate_key(rotation)  # the retained message again: no-op
    # a restart with the bundle's (old) key keeps the rotated one
    rx = make_receiver()
    assert rx.public_key == pub_b
    assert refusal(rx.on_offer, make_offer(*signed(base, keys, "2.0.0", key="a"))) == "bad-signature"
    _download(rx, *signed(base, keys, "2.0.0", key="b"))
    assert rx.install("2.0.0", current="1.0.0").version == "2.0.0"
    # the model installed under the old key still loads (checked with the key that verified it)
    assert rx.load_installed("1.0.0").version == "1.0.0"
    # an old rotation replayed (signed by a, now that b is held) is refused
    back = KeyRotation(v=1, key_id="k1", new_public_key=pub_a.decode(),
                       signature=sign_key_rotation(pub_a, "k1", priv_a), ts=time.time())
    assert refusal(rx.rotate_key, back) == "bad-signature"


def test_session_cache_shares_one_session_for_equal_bytes(base, keys, data, make_receiver):
    X, names = data
    cache = SessionCache()
    rx1 = make_receiver("dev1", session_cache=cache)
    rx2 = make_receiver("dev2", session_cache=cache)
    onnx, manifest = signed(base, keys, "1.0.0")
    for rx in (rx1, rx2):
        _download(rx, onnx, manifest)
    m1 = rx1.install("1.0.0", current=None)
    m2 = rx2.install("1.0.0", current=None)
    assert m1._session is m2._session and (cache.builds, cache.hits, len(cache)) == (1, 1, 1)
    assert m1 is not m2 and m1.score(X[0])[0] == m2.score(X[0])[0]
    other = train_isolation_forest(X, names, version="2.0.0", profile="machine", seed=2, n_estimators=10,
                                   max_samples=256)
    _download(rx1, *signed(other, keys, "2.0.0"))
    m3 = rx1.install("2.0.0", current="1.0.0")
    assert m3._session is not m1._session and (cache.builds, len(cache)) == (2, 2)
    # each device still verifies its own bytes: a tampered copy is refused despite the cached session
    path = rx2.state_dir / "models/1.0.0/model.onnx"
    path.write_bytes(onnx[:-1] + bytes([onnx[-1] ^ 1]))
    assert refusal(rx2.load_installed, "1.0.0") == "sha256-mismatch"
    del m1, m2, m3
    gc.collect()
    assert len(cache) == 0  # freed when no model serves it


def test_durable_switch_reaches_the_downloads_and_files_stay_few(base, keys, make_receiver, tmp_path, monkeypatch):
    """A fleet switches syncing off after building the receiver: no part file is synced then. A
    download completing before its first progress save writes no bookkeeping file, and the
    install moves the download's directory whole (nothing left under downloads/)."""
    import edge_agent.ota_download as ota_download

    synced = []
    monkeypatch.setattr(ota_download.os, "fsync", lambda fd: synced.append(fd))
    onnx, manifest = signed(base, keys)
    offer = make_offer(onnx, manifest)
    rx = make_receiver()
    rx.durable = False
    rx.save_every = (1, 3600.0)  # record progress after every chunk
    synced.clear()  # (building the receiver synced its key files: it was durable then)
    rx.on_offer(offer)
    d = tmp_path / "state/downloads/1.0.0"
    assert sorted(p.name for p in d.iterdir()) == ["model.part"]  # offer.json waits for the first save
    assert rx.on_chunk("1.0.0", 0, chunks(onnx)[0])
    assert sorted(p.name for p in d.iterdir()) == ["have.bin", "model.part", "offer.json"] and synced == []

    rx2 = make_receiver("state2")
    rx2.durable = False
    synced.clear()
    rx2.on_offer(offer)
    assert all(feed(rx2, offer, onnx))
    assert sorted(p.name for p in (tmp_path / "state2/downloads/1.0.0").iterdir()) == ["model.part"]
    assert rx2.install("1.0.0", current=None).version == "1.0.0" and synced == []
    assert list((tmp_path / "state2/downloads").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "state2/models/1.0.0").iterdir()) == [
        "install.json", "manifest.json", "model.onnx"]
    # a download lost before its first save (offer.json not written yet) is dropped at restart
    rx3 = make_receiver("state3")
    rx3.on_offer(offer)
    assert rx3.on_chunk("1.0.0", 0, chunks(onnx)[0])
    del rx3
    assert make_receiver("state3").pending() == []


def test_store_if_known_waits_for_the_offer(base, keys, make_receiver):
    """The network thread may store a chunk only once the loop took the offer; before, None says
    "hand it on" and nothing is stored or counted."""
    onnx, manifest = signed(base, keys)
    offer = make_offer(onnx, manifest)
    parts = chunks(onnx)
    rx = make_receiver()
    assert rx.store_if_known("1.0.0", 0, parts[0]) is None and rx.progress("1.0.0") == (0, 0)
    rx.on_offer(offer)
    assert rx.store_if_known("1.0.0", 0, parts[0]) is True
    assert rx.store_if_known("1.0.0", 0, parts[0]) is False  # a duplicate
    assert rx.store_if_known("1.0.0", 1, parts[0]) is False and rx.rejected_chunks == 1  # wrong bytes
    assert rx.progress("1.0.0") == (1, offer.chunks)
