"""Scoring feature vectors with an ONNX model on the device (numpy + onnxruntime only).

:meth:`Model.load` refuses anything it cannot serve correctly, with a :class:`ModelError` that says
why, so the caller keeps its current model: a ``model.onnx`` whose sha256 differs from the
manifest's, bytes onnxruntime cannot load, or a graph whose input or output disagrees with the
manifest. Optionally it also checks the feature set and names the agent computes.

A :class:`SessionCache` lets many models with identical bytes (simulated devices in one process)
share one onnxruntime session; each :meth:`Model.load` still hashes its own bytes.

Score convention (see :mod:`models.manifest`): the graph's output holds one score per row, higher
is more anomalous, and ``anomaly = score > manifest.threshold``.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from edge_agent.memory import release_freed_memory
from models.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, ManifestError, load_manifest

__all__ = ["ModelError", "Model", "SessionCache", "session_options", "sha256_file"]


class ModelError(Exception):
    """A model the agent refuses to serve; the message says why.

    ``reason`` is a short stable code: ``sha256-mismatch``, ``wrong-feature-set``,
    ``wrong-input-shape`` (the graph or manifest takes another input than the agent computes),
    ``bad-manifest``, ``load-failed`` (onnxruntime cannot load it, or unreadable files) or
    ``smoke-failed`` (scoring a test vector failed or gave no finite number).
    """

    def __init__(self, message: str, reason: str = "load-failed") -> None:
        super().__init__(message)
        self.reason = reason


class SessionCache:
    """onnxruntime sessions shared by sha256 of the model bytes, freed when no model uses them.

    Many simulated devices in one process swapping to the same model would each build a session
    (tens of ms and MBs each); with a cache they share one. The cache holds weak references, so a
    session lives exactly as long as some :class:`Model` holds it. Only the session is shared:
    the caller passes the sha256 it computed itself over the bytes, and every ``Model.load``
    checks its own bytes and manifest. onnxruntime's ``run`` is thread-safe, so sharing is safe.
    """

    def __init__(self) -> None:
        self._sessions: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # sha256 -> session
        self._lock = threading.Lock()
        self.builds = 0  # sessions built through this cache
        self.hits = 0  # loads served by an existing session

    def get(self, sha256: str, build: Callable[[], ort.InferenceSession]) -> tuple[ort.InferenceSession, bool]:
        """``(session, built)``: the live session for ``sha256``, or a new one from ``build()``."""
        with self._lock:
            session = self._sessions.get(sha256)
            if session is not None:
                self.hits += 1
                return session, False
        session = build()  # outside the lock: a build takes tens of ms
        with self._lock:
            existing = self._sessions.get(sha256)
            if existing is not None:  # another thread built it meanwhile: use one session only
                self.hits += 1
                return existing, False
            self._sessions[sha256] = session
            self.builds += 1
            return session, True

    def __len__(self) -> int:
        """Live sessions."""
        return len(self._sessions)

    def __contains__(self, sha256: object) -> bool:
        return sha256 in self._sessions


def session_options() -> ort.SessionOptions:
    """One thread, sequential, no spinning, no CPU memory arena.

    A batch-of-one tree ensemble gains nothing from threads, and spinning pool threads would burn
    a Pi's CPU. Measured with the stock 100-tree isolation forest (30 MB of RSS for the session):
    turning the CPU arena off saves ~0.2 MB at no cost; turning the memory pattern off saved
    nothing and made scoring ~35 % slower (1.1 ms instead of 0.83 ms p50), so it stays on.
    Measured again with two 100-tree fused forests (446 KB each) in the agent: memory pattern off,
    graph optimisation disabled or basic, ``session.disable_prepacking`` each changed the RSS by
    0.5 MB or less. What a session costs is onnxruntime's one-time kernel registry (~9 MB, mostly
    its own code pages, even for a one-node model) plus ~2.5-3 MB per model after the trim.
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = True
    so.log_severity_level = 3  # errors only: warnings about unused initializers are noise here
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


class Model:
    """A loaded, checked model. Build it with :meth:`load`; score one vector with :meth:`score`."""

    def __init__(self, session: ort.InferenceSession, manifest: Manifest, load_ms: float) -> None:
        self._session = session
        self.manifest = manifest
        self.load_ms = load_ms
        self._input = manifest.input_name
        self._outputs = [manifest.output_name]
        self._threshold = float(manifest.threshold)
        self._buf = np.zeros((1, manifest.n_features), dtype=np.float32)

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def feature_set(self) -> str:
        return self.manifest.feature_set

    @property
    def feature_names(self) -> list[str]:
        return self.manifest.feature_names

    @property
    def threshold(self) -> float:
        return self._threshold

    @classmethod
    def load(
        cls,
        source: str | os.PathLike | tuple[bytes | os.PathLike, Manifest],
        *,
        feature_set: str | None = None,
        feature_names: Sequence[str] | None = None,
        cache: SessionCache | None = None,
    ) -> Model:
        """Load from a model directory, ``(onnx_bytes, manifest)`` or ``(model_file, manifest)``,
        checking everything.

        A ``model_file`` path is hashed streaming and onnxruntime reads it itself, so the bytes
        never pass through Python (a downloaded model is checked and loaded this way). With ``feature_set`` / ``feature_names`` (what this agent computes), a model that expects
        anything else is refused too. With ``cache``, a live session for the same bytes is reused
        (the bytes are still hashed here, and the graph checks and smoke test still run).
        """
        started = time.perf_counter()
        if isinstance(source, tuple):
            onnx_bytes, manifest = source
            if not isinstance(manifest, Manifest):
                raise TypeError("expected (onnx_bytes or model file path, Manifest)")
        else:
            onnx_bytes, manifest = _read_dir(Path(source))

        if isinstance(onnx_bytes, (bytes, bytearray, memoryview)):
            digest = hashlib.sha256(onnx_bytes).hexdigest()
        else:
            onnx_bytes = str(onnx_bytes)  # onnxruntime takes a path as str
            digest = sha256_file(onnx_bytes)
        if digest != manifest.sha256:
            raise ModelError(
                f"model {manifest.version}: sha256 of {MODEL_FILE} is {digest[:16]}..., the "
                f"manifest says {manifest.sha256[:16] or '(empty)'}...; the file is corrupt or "
                "does not belong to this manifest",
                "sha256-mismatch",
            )
        if feature_set is not None and manifest.feature_set != feature_set:
            raise ModelError(
                f"model {manifest.version} expects feature set {manifest.feature_set!r}, "
                f"this agent computes {feature_set!r}",
                "wrong-feature-set",
            )
        if feature_names is not None and list(feature_names) != manifest.feature_names:
            missing = sorted(set(manifest.feature_names) - set(feature_names))
            if len(feature_names) != manifest.n_features:
                raise ModelError(
                    f"model {manifest.version} takes {manifest.n_features} features (input_shape "
                    f"{manifest.input_shape}), this agent computes {len(feature_names)} "
                    f"(missing here: {missing[:5] or 'none'})",
                    "wrong-input-shape",
                )
            raise ModelError(
                f"model {manifest.version} expects other features than this agent computes "
                f"(missing here: {missing[:5] or 'none, the order differs'})",
                "wrong-feature-set",
            )
        built = True
        if cache is None:
            session = _build_session(onnx_bytes, manifest)
        else:
            session, built = cache.get(digest, lambda: _build_session(onnx_bytes, manifest))
        _check_signature(session, manifest)
        model = cls(session, manifest, (time.perf_counter() - started) * 1000)
        model._smoke_test()
        if built:  # session building leaves ~7 MB of freed scratch in glibc's heap: give it back
            release_freed_memory()
        return model

    def score(self, features: np.ndarray | Sequence[float]) -> tuple[float, bool, float]:
        """``(score, anomaly, latency_us)`` for one feature vector in manifest order."""
        x = np.asarray(features, dtype=np.float32).reshape(-1)
        if x.shape[0] != self._buf.shape[1]:
            raise ValueError(
                f"model {self.version} takes {self._buf.shape[1]} features, got {x.shape[0]}"
            )
        self._buf[0] = x
        t0 = time.perf_counter_ns()
        out = self._session.run(self._outputs, {self._input: self._buf})[0]
        latency_us = (time.perf_counter_ns() - t0) / 1000.0
        score = float(out.reshape(-1)[0])
        return score, score > self._threshold, latency_us

    def score_batch(self, X: np.ndarray) -> np.ndarray:
        """Scores of the rows of ``X`` (shape ``(n, n_features)``), as float64."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self._buf.shape[1]:
            raise ValueError(f"X must have shape (n, {self._buf.shape[1]}), got {X.shape}")
        return self._session.run(self._outputs, {self._input: X})[0].reshape(-1).astype(np.float64)

    def _smoke_test(self) -> None:
        """Score a zero vector once: refuses graphs that load but cannot run or give no number."""
        try:
            score, _, _ = self.score(np.zeros(self._buf.shape[1]))
        except Exception as exc:
            raise ModelError(f"model {self.version}: scoring a test vector failed: {exc}", "smoke-failed") from exc
        if not math.isfinite(score):
            raise ModelError(f"model {self.version}: scoring a test vector gave {score}", "smoke-failed")

    def __repr__(self) -> str:
        return f"Model(version={self.version!r}, features={self._buf.shape[1]})"


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """sha256 (hex) of a file, read ``block`` bytes at a time: memory stays bounded."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(block):
                h.update(chunk)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}", "load-failed") from exc
    return h.hexdigest()


def _build_session(onnx_bytes: bytes | str, manifest: Manifest) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(onnx_bytes, sess_options=session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelError(f"model {manifest.version}: onnxruntime cannot load it: {exc}", "load-failed") from exc


def _read_dir(directory: Path) -> tuple[bytes, Manifest]:
    try:
        manifest = load_manifest(directory / MANIFEST_FILE)
    except ManifestError as exc:
        raise ModelError(str(exc), "bad-manifest") from exc
    try:
        return (directory / MODEL_FILE).read_bytes(), manifest
    except OSError as exc:
        raise ModelError(f"cannot read {directory / MODEL_FILE}: {exc.strerror or exc}") from exc


def _check_signature(session: ort.InferenceSession, manifest: Manifest) -> None:
    """The graph's input and output must be what the manifest describes."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"model {manifest.version} has {len(inputs)} inputs, expected 1", "wrong-input-shape")
    inp = inputs[0]
    if inp.name != manifest.input_name:
        raise ModelError(
            f"model {manifest.version}: input is named {inp.name!r}, the manifest says "
            f"{manifest.input_name!r}",
            "wrong-input-shape",
        )
    if inp.type != "tensor(float)":
        raise ModelError(f"model {manifest.version}: input type {inp.type}, expected tensor(float)", "wrong-input-shape")
    shape = list(inp.shape)
    width = shape[1] if len(shape) == 2 else None
    batch_ok = len(shape) == 2 and (not isinstance(shape[0], int) or shape[0] in (1, -1))
    if not batch_ok or width != manifest.n_features:
        raise ModelError(
            f"model {manifest.version}: input shape {shape} does not match the manifest's "
            f"input_shape {manifest.input_shape} ({manifest.n_features} features)",
            "wrong-input-shape",
        )
    outputs = {o.name: o for o in session.get_outputs()}
    if manifest.output_name not in outputs:
        raise ModelError(
            f"model {manifest.version}: no output {manifest.output_name!r} "
            f"(outputs: {sorted(outputs)})",
            "bad-manifest",
        )
