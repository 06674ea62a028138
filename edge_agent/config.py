"""The agent's configuration: one typed Struct, loaded from TOML with command-line overrides.

``edgeloop agent --example-config`` prints :data:`EXAMPLE`, which runs as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from edge_agent.quality import QualitySettings
from edge_agent.rules import RulesSettings
from edgeloop import config as _config
from edgeloop.wire import DEVICE_ID_PATTERN

__all__ = ["AgentConfig", "MqttSettings", "SamplingSettings", "SourceSettings", "OutboxSettings", "ModelSettings",
           "load", "EXAMPLE"]


class MqttSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    url: str = "mqtt://127.0.0.1:1883"
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    username: str | None = None
    password: str | None = None  # use "env:NAME" or password_file, never a literal in a shared file
    password_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    max_inflight: Annotated[int, Meta(ge=1, le=65535)] = 200
    keepalive_s: Annotated[int, Meta(ge=5, le=3600)] = 30
    #: Largest payload the broker takes; telemetry batches are split to fit (the contract caps at 256 KB).
    max_payload: Annotated[int, Meta(ge=4096)] = 256 * 1024


class SamplingSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    rate_hz: Annotated[float, Meta(gt=0, le=10_000)] = 10.0
    batch_s: Annotated[float, Meta(gt=0, le=60)] = 1.0  # one telemetry message per batch
    window_s: Annotated[float, Meta(gt=0, le=3600)] = 5.0  # feature window (non-overlapping)
    #: Simulation only: the device clock runs this many times faster than real time.
    speed: Annotated[float, Meta(gt=0, le=10_000)] = 1.0


class SourceSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    name: str = "simulated"
    options: dict[str, Any] = {}


class OutboxSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    max_bytes: Annotated[int, Meta(ge=64 * 1024)] = 64 * 1024 * 1024
    max_age_s: Annotated[float, Meta(gt=0)] = 7 * 24 * 3600.0
    resend_after_s: Annotated[float, Meta(gt=0)] = 10.0
    max_unconfirmed: Annotated[int, Meta(ge=1)] = 5000
    synchronous: Literal["FULL", "NORMAL"] = "FULL"


class ModelSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    """Models pushed over MQTT (edgeloop.wire_models): who signs them, and how downloads resume."""

    #: The model-signing public key (PEM; ``signing.pub`` of the device bundle). Without it every
    #: pushed model is refused, unless ``allow_unsigned`` (tests and the demo only).
    public_key_file: str | None = None
    allow_unsigned: bool = False
    #: Ask the cloud for the chunks still missing after this long without a new one.
    rerequest_after_s: Annotated[float, Meta(gt=0, le=3600)] = 10.0


class AgentConfig(Struct, kw_only=True, forbid_unknown_fields=True):
    device_id: Annotated[str, Meta(pattern=DEVICE_ID_PATTERN)]
    profile: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{0,32}$")] = "machine"
    data_dir: str | None = None
    model_dir: str | None = None  # a directory with model.onnx + manifest.json to serve from the start
    #: Keep raw readings on the device (a bounded local table) and publish only features,
    #: inferences and alerts.
    privacy: bool = False
    #: Override of the model's anomaly threshold on the score (None: the manifest's).
    threshold: Annotated[float, Meta(ge=-1e6, le=1e6)] | None = None
    #: How often the retained status (outbox depth, drops, uptime) is refreshed.
    status_interval_s: Annotated[float, Meta(ge=1, le=86400)] = 30.0
    mqtt: MqttSettings = msgspec.field(default_factory=MqttSettings)
    sampling: SamplingSettings = msgspec.field(default_factory=SamplingSettings)
    source: SourceSettings = msgspec.field(default_factory=SourceSettings)
    outbox: OutboxSettings = msgspec.field(default_factory=OutboxSettings)
    quality: QualitySettings = msgspec.field(default_factory=QualitySettings)
    #: Local rules: ``[[rules.rules]]`` tables (threshold, hysteresis, cool-down, optional action).
    rules: RulesSettings = msgspec.field(default_factory=RulesSettings)
    #: A wall-clock jump bigger than this between two samples is flagged as a clock step.
    clock_step_s: Annotated[float, Meta(gt=0)] = 1.0
    models: ModelSettings = msgspec.field(default_factory=ModelSettings)

    def state_dir(self) -> Path:
        """Where this device keeps its outbox, sequence and model state."""
        base = Path(self.data_dir) if self.data_dir else _config.default_data_dir()
        return base / "agent" / self.device_id


def load(path: str | Path | None, **overrides: Any) -> AgentConfig:
    """Load ``path`` (TOML) with dotted-key overrides such as ``{"mqtt.url": ...}``."""
    cfg = _config.load(path, AgentConfig, overrides)
    key = cfg.models.public_key_file
    if key and not Path(key).is_file():
        raise _config.ConfigError(str(path) if path else "command line", "models.public_key_file",
                                  f"no such file {key!r} (the model-signing public key, signing.pub)")
    return cfg


EXAMPLE = """\
# edgeloop agent configuration. Runs as it is: a simulated machine publishing to a local broker.
# With no model yet, the agent publishes telemetry and features until one arrives.

device_id = "press-01"          # unique per device: letters, digits, '_', '.', '-' (max 64)
profile = "machine"             # device profile: which models and dashboards apply
# data_dir = "/var/lib/edgeloop"  # outbox, sequence counter and model state (default: ~/.local/share/edgeloop)
# model_dir = "/var/lib/edgeloop/models/current"  # model.onnx + manifest.json to serve at start
privacy = false                 # true: raw readings stay on the device; only features, inferences, alerts go out
# threshold = 0.1               # override the model's anomaly threshold on its score
status_interval_s = 30.0        # refresh the retained status this often

[mqtt]
url = "mqtt://127.0.0.1:1883"   # mqtts://host:8883 for TLS
protocol = "auto"               # "auto" tries MQTT 5 then 3.1.1
# username = "press-01"
# password = "env:EDGELOOP_MQTT_PASSWORD"   # or password_file = "/etc/edgeloop/mqtt-password"
# ca_file = "/etc/edgeloop/ca.crt"
# cert_file = "/etc/edgeloop/press-01.crt"  # client certificate instead of a password
# key_file = "/etc/edgeloop/press-01.key"
max_inflight = 200              # unacknowledged QoS 1 messages at a time
keepalive_s = 30
max_payload = 262144            # largest payload the broker takes; bigger telemetry batches are split

[sampling]
rate_hz = 10.0                  # samples per second, on a monotonic schedule
batch_s = 1.0                   # one telemetry message per second of readings
window_s = 5.0                  # feature window; features and inference once per window

[source]
name = "simulated"              # simulated | host | ds18b20 | bme280 | csv | composite (docs/raspberry-pi.md)
options = { profile = "machine", seed = 1 }

[outbox]
max_bytes = 67108864            # 64 MB on disk; past it the drop policy removes telemetry first
max_age_s = 604800.0            # a week
resend_after_s = 10.0           # re-send what the cloud has not confirmed after this long
synchronous = "FULL"            # fsync every accepted message: a power cut never reuses a sequence number

[quality]                       # data-quality flags on every reading (counted in the status)
stuck_n = 50                    # readings without change that make a channel "stuck"
spike_k = 8.0                   # |x - rolling median| > spike_k x robust scale is a spike
[quality.ranges]                # physical limits per channel
vibration = [-50.0, 50.0]
bearing_temp = [-20.0, 120.0]
motor_current = [0.0, 60.0]
rpm = [0.0, 3000.0]

[models]                        # models pushed by the aggregator over MQTT
# public_key_file = "/etc/edgeloop/signing.pub"  # model-signing public key; without it pushed models are refused
rerequest_after_s = 10.0        # ask again for missing model chunks after this long without one

# Local rules: fire an alert (and optionally run a command) with hysteresis and cool-down.
[[rules.rules]]
name = "anomaly"
input = "score"                 # the champion model's score, a feature name, or a channel's last value
on = 0.15
off = 0.10
cooldown_s = 60.0
severity = "warning"
# command = { argv = ["/usr/local/bin/stop-line"], timeout_s = 10.0 }
"""
