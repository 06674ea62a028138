"""The model manifest: what a model is, what it expects and how to read its output (agent-safe).

A model directory holds ``model.onnx`` and ``manifest.json``. The manifest names the feature set
and the exact feature names (in input order) the model was trained on, the input shape, the ONNX
opset, the sha256 of ``model.onnx`` and the decision threshold.

Score convention (``score_kind = "anomaly_score"``): the ONNX graph has one float input
(``input_name``, shape ``[batch, n_features]``) and an output ``output_name`` holding one score
per row, where HIGHER means MORE ANOMALOUS; a window is an anomaly when ``score > threshold``.

Only msgspec and the standard library are used here, so the agent can import this module.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from edgeloop.files import write_atomic  # re-exported: training and the model registry use it

__all__ = [
    "MANIFEST_SCHEMA",
    "MODEL_FILE",
    "MANIFEST_FILE",
    "ManifestError",
    "Manifest",
    "load_manifest",
    "save_manifest",
    "write_atomic",
]

MANIFEST_SCHEMA = 1
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"

# Same patterns as edgeloop.wire (versions and names travel in messages and become tags).
Version = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-+]{0,63}$")]
Name = Annotated[str, Meta(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$")]
Sha256 = Annotated[str, Meta(pattern=r"^([0-9a-f]{64})?$")]  # "" until the model file is written


class ManifestError(ValueError):
    """A manifest that cannot be read or that contradicts itself."""


class Manifest(Struct, kw_only=True, forbid_unknown_fields=False):
    """Everything an agent needs to decide whether it can serve a model, and how.

    ``created`` and ``training_window`` are seconds since the epoch (like the wire timestamps);
    ``training_window`` spans the device timestamps of the feature rows trained on.
    """

    version: Version
    profile: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{0,32}$")]
    feature_set: Version
    feature_names: Annotated[list[Name], Meta(min_length=1, max_length=4096)]
    input_shape: Annotated[list[int], Meta(min_length=2, max_length=2)]
    opset: Annotated[int, Meta(ge=1)]
    threshold: float
    sha256: Sha256 = ""
    score_kind: Literal["anomaly_score"] = "anomaly_score"
    input_name: str = "X"
    output_name: str = "score"
    algorithm: str = "isolation_forest"
    params: dict[str, int | float | str | None] = {}
    created: float = 0.0
    parent_version: Version | None = None
    metrics: dict[str, float] = {}
    training_window: tuple[float, float] = (0.0, 0.0)
    schema: int = MANIFEST_SCHEMA
    # Seconds since the epoch after which the model should no longer be served; None = never.
    expires: float | None = None
    # Set only on a rollback entry: the version this manifest replaces (the champion being rolled
    # back). It lies inside the signed payload, so an agent may accept an OLDER model only when
    # the aggregator signed that very rollback (see models.signing.is_acceptable_version).
    rollback_of: Version | None = None
    # Detached Ed25519 signature over ``signing_payload()`` (the manifest without this field,
    # whose sha256 in turn pins model.onnx): ``"ed25519:<base64>"``. See models.signing.
    signature: str | None = None

    def __post_init__(self) -> None:
        if len(set(self.feature_names)) != len(self.feature_names):
            raise ValueError("feature names repeat")
        if self.input_shape[1] != len(self.feature_names):
            raise ValueError(
                f"input_shape {self.input_shape} does not match the "
                f"{len(self.feature_names)} feature names"
            )
        if self.input_shape[0] not in (-1, 1):
            raise ValueError("input_shape[0] (batch) must be 1 or -1 (any)")
        if not math.isfinite(self.threshold):
            raise ValueError("threshold must be finite")
        if self.training_window[0] > self.training_window[1]:
            raise ValueError("training_window starts after it ends")

    @property
    def n_features(self) -> int:
        return self.input_shape[1]

    def to_json(self) -> bytes:
        return msgspec.json.format(_encoder.encode(self), indent=2) + b"\n"

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        try:
            return _decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ManifestError(f"invalid manifest: {exc}") from exc

    def signing_payload(self) -> bytes:
        """Canonical bytes to sign: sorted keys, no whitespace, without ``signature``."""
        unsigned = msgspec.structs.replace(self, signature=None)
        return _canonical.encode(unsigned)


_encoder = msgspec.json.Encoder()
_canonical = msgspec.json.Encoder(order="sorted")
_decoder = msgspec.json.Decoder(Manifest)


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read a manifest file, or ``manifest.json`` inside a model directory."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_FILE
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {p}: {exc.strerror or exc}") from exc
    return Manifest.from_json(data)


def save_manifest(path: str | os.PathLike, manifest: Manifest) -> Path:
    """Write atomically (temp file + rename) so a reader never sees half a manifest."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_FILE
    write_atomic(p, manifest.to_json())
    return p

