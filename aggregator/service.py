"""The aggregator service: configuration, and wiring store + quarantine + registry + ingest
+ model distribution (``Aggregator.models``, the model registry; ``Aggregator.ota``, the
distributor that offers its models to the devices over the ingest's MQTT link).

``edgeloop aggregator --config FILE`` builds an :class:`Aggregator` from
:class:`AggregatorConfig` and runs it until SIGINT/SIGTERM. With no InfluxDB configured it
stores into the embedded SQLite store in the data directory.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from aggregator.alerts import AlertSettings
from aggregator.rollout_gate import RolloutPolicy
from edgeloop import config as _config
from edgeloop.mqtt import parse_mqtt_url

__all__ = ["AggregatorConfig", "Aggregator", "HttpSettings", "ModelsSettings", "RetrainSettings", "load", "EXAMPLE"]

log = logging.getLogger(__name__)


class MqttSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    url: str = "mqtt://127.0.0.1:1883"
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    client_id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")] = "edgeloop-aggregator-1"
    share_group: str | None = "edgeloop"  # "" or none when the broker lacks shared subscriptions
    receive_maximum: Annotated[int, Meta(ge=1, le=65535)] = 1000
    #: How long the broker keeps this aggregator's session (and queues its share of a $share
    #: group's traffic) while it is away: long enough for a restart, short enough that a member
    #: gone for good stops taking a share (the devices' re-sends cover what it held).
    session_expiry_s: Annotated[int, Meta(ge=0, le=7 * 86400)] = 300
    username: str | None = None
    password: str | None = None  # "env:NAME" or password_file
    password_file: str | None = None
    ca_file: str | None = None  # the CA that signed the broker's certificate (mqtts://)
    cert_file: str | None = None  # client certificate instead of a password
    key_file: str | None = None


class InfluxSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    url: str | None = None  # unset: the embedded SQLite store
    database: str = "edgeloop"  # the bucket on InfluxDB 2.x / 3.x
    org: str | None = None
    username: str | None = None
    password: str | None = None  # "env:NAME" or password_file
    password_file: str | None = None
    token: str | None = None  # "env:NAME" or token_file
    token_file: str | None = None


class IngestSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    batch_lines: Annotated[int, Meta(ge=1)] = 5000
    max_delay_s: Annotated[float, Meta(gt=0, le=10)] = 0.05
    ack_threshold: Annotated[int, Meta(ge=1)] = 500
    confirm_interval_s: Annotated[float, Meta(gt=0, le=60)] = 1.0


class HttpSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    """The HTTP port for ``/metrics`` and the fleet API (aggregator/http.py)."""

    port: Annotated[int, Meta(ge=0, le=65535)] = 8080  # 0: any free port (see Aggregator.http_port)
    host: str = "127.0.0.1"
    #: Bearer token for control actions (rollouts, alert acks, silences): "env:NAME" or a literal;
    #: or ``token_file``. Unset: control actions answer 403 and the API is read-only.
    token: str | None = None
    token_file: str | None = None


class ModelsSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    """The model registry and model distribution (aggregator/ota.py)."""

    registry: str | None = None  # unset: <data_dir>/models, where ``edgeloop models`` keeps them
    #: Bytes per broadcast chunk: with topic and headers it must fit the broker's payload limit
    #: and the devices' ``mqtt.max_payload`` (default 64 KiB fits both by far).
    chunk_size: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    signing_key_file: str | None = None  # unset: <data_dir>/keys/signing.key (``edgeloop models keygen``)


class RetrainSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    """Drift-triggered and scheduled retraining (:class:`aggregator.retrain.Retrainer`).

    Off unless ``enabled``: training needs scikit-learn and the model signing key. Each new model
    starts a rollout (canaries in shadow, gate, waves) through ``Aggregator.rollouts``. The
    windows are device time counted back from now; the checks run every ``check_every_s``.
    """

    enabled: bool = False
    profiles: list[str] = msgspec.field(default_factory=lambda: ["machine"])
    schedule_s: Annotated[float, Meta(gt=0)] | None = None  # retrain on time alone (None: only on drift)
    drift_threshold: Annotated[float, Meta(gt=0)] = 0.2  # PSI of the most drifted feature
    #: Drift by the share of recent rows outside the training range instead of PSI (None: PSI);
    #: for a ``recent_s`` shorter than the data's slowest normal cycle (see models.drift).
    range_threshold: Annotated[float, Meta(ge=0, lt=1)] | None = None
    recent_s: Annotated[float, Meta(gt=0)] = 3600.0  # recent window compared with the training window
    #: For a champion with no training window in the store (a factory model, a rollback to one):
    #: the oldest this-long of stored features is its reference (None: ``recent_s``). Make it a
    #: whole operating cycle when ``range_threshold`` is set.
    reference_s: Annotated[float, Meta(gt=0)] | None = None
    train_s: Annotated[float, Meta(gt=0)] = 86400.0  # stored features a new model learns from
    check_every_s: Annotated[float, Meta(gt=0)] = 300.0
    min_rows: Annotated[int, Meta(ge=10)] = 200
    n_estimators: Annotated[int, Meta(ge=1, le=1000)] = 100
    canary: Annotated[int, Meta(ge=1)] = 1  # devices that shadow each new model first
    #: Share of the training windows' scores below the alarm threshold.
    threshold_quantile: Annotated[float, Meta(ge=0.5, lt=1.0)] = 0.995
    #: Left out of drift checks and training: from this long before each labelled fault ...
    label_horizon_s: Annotated[float, Meta(ge=0)] = 60.0
    #: ... to this long after it (the machine settling back).
    label_margin_s: Annotated[float, Meta(ge=0)] = 120.0


class AggregatorConfig(Struct, kw_only=True, forbid_unknown_fields=True):
    """The whole aggregator configuration.

    ``http`` is None for an aggregator built in code (tests, the demo): no HTTP port unless
    asked for. :func:`load` (the config file and the command line) fills in the default
    :class:`HttpSettings`, so ``edgeloop aggregator`` serves on 127.0.0.1:8080 out of the box.
    """

    data_dir: str | None = None
    mqtt: MqttSettings = msgspec.field(default_factory=MqttSettings)
    influx: InfluxSettings = msgspec.field(default_factory=InfluxSettings)
    ingest: IngestSettings = msgspec.field(default_factory=IngestSettings)
    http: HttpSettings | None = None
    models: ModelsSettings = msgspec.field(default_factory=ModelsSettings)
    alerts: AlertSettings = msgspec.field(default_factory=AlertSettings)
    retrain: RetrainSettings = msgspec.field(default_factory=RetrainSettings)
    rollout: RolloutPolicy = msgspec.field(default_factory=RolloutPolicy)

    def base_dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir else _config.default_data_dir()

    def state_dir(self) -> Path:
        return self.base_dir() / "aggregator"

    def models_dir(self) -> Path:
        return Path(self.models.registry) if self.models.registry else self.base_dir() / "models"

    def signing_key_path(self) -> Path:
        from models.signing import key_paths

        return Path(self.models.signing_key_file) if self.models.signing_key_file else key_paths(self.base_dir())[0]


def load(path: str | Path | None, **overrides: Any) -> AggregatorConfig:
    cfg = _config.load(path, AggregatorConfig, overrides)
    key = cfg.models.signing_key_file
    if key and not Path(key).is_file():
        raise _config.ConfigError(str(path) if path else "command line", "models.signing_key_file",
                                  f"no such file {key!r} (create a key pair with `edgeloop models keygen`)")
    if cfg.http is None:  # the service always has its HTTP port; see AggregatorConfig
        cfg.http = HttpSettings()
    return cfg


def open_store(cfg: AggregatorConfig):
    """The configured store, opened (database created if missing)."""
    from aggregator.stores import make_store

    inf = cfg.influx
    if inf.url:
        store = make_store(
            influx_url=inf.url,
            database=inf.database,
            org=inf.org,
            token=_config.resolve_secret(inf.token or _env_default("EDGELOOP_INFLUX_TOKEN"), inf.token_file, "InfluxDB token"),
            username=inf.username or _config.resolve_secret(_env_default("EDGELOOP_INFLUX_USERNAME")),
            password=_config.resolve_secret(inf.password or _env_default("EDGELOOP_INFLUX_PASSWORD"), inf.password_file, "InfluxDB password"),
        )
    else:
        state = cfg.state_dir()
        state.mkdir(parents=True, exist_ok=True)
        store = make_store(sqlite_path=str(state / "store.sqlite"))
    store.open()
    return store


def _env_default(name: str) -> str | None:
    import os

    return f"env:{name}" if name in os.environ else None


class Aggregator:
    """Store, quarantine, registry, ingest and (if configured) the HTTP port, started and
    stopped together. :attr:`http_port` is the bound HTTP port while running, else None.

    ``clock`` gives the device time "now" that the retrainer counts its windows back from
    (default ``time.time``; a time-accelerated simulation passes its own)."""

    def __init__(self, cfg: AggregatorConfig, store=None, *, clock=None) -> None:
        from aggregator.ingest import Ingest
        from aggregator.model_registry import ModelRegistry
        from aggregator.ota import ModelDistributor
        from aggregator.quarantine import Quarantine
        from aggregator.registry import Registry

        self.config = cfg
        state = cfg.state_dir()
        state.mkdir(parents=True, exist_ok=True)
        self.store = store if store is not None else open_store(cfg)
        self.quarantine = Quarantine(state / "quarantine.sqlite")
        self.registry = Registry(state / "registry.json")
        m = cfg.mqtt
        password = _config.resolve_secret(m.password, m.password_file, "MQTT password")
        address = parse_mqtt_url(m.url).with_credentials(m.username, password)
        self.ingest = Ingest(
            self.store,
            address,
            client_id=m.client_id,
            protocol=m.protocol,
            receive_maximum=m.receive_maximum,
            session_expiry_s=m.session_expiry_s,
            ca_file=m.ca_file,
            cert_file=m.cert_file,
            key_file=m.key_file,
            quarantine=self.quarantine,
            registry=self.registry,
            share_group=m.share_group or None,
            batch_lines=cfg.ingest.batch_lines,
            max_delay_s=cfg.ingest.max_delay_s,
            ack_threshold=min(cfg.ingest.ack_threshold, max(1, m.receive_maximum // 2)),
            confirm_interval_s=cfg.ingest.confirm_interval_s,
        )
        self.models = ModelRegistry(cfg.models_dir())
        self.ota = ModelDistributor(self.ingest.link, self.models, state_dir=state, chunk_size=cfg.models.chunk_size)
        self.ingest.chunk_requests = self.ota.handle_chunk_request
        self.ingest.on_connect_hooks.append(self.ota.on_connect)
        from aggregator.rollout import RolloutManager

        key = cfg.signing_key_path()
        from aggregator.labels import LabelStore

        # Fault labels (maintenance records, simulator ground truth) let the gate compare F1.
        self.labels = LabelStore.in_data_dir(cfg.base_dir())
        # Rollouts watch every stored inference and deployment report through the ingest.
        self.rollouts = RolloutManager(self.ota, self.models, self.registry, state_dir=state,
                                       policy=cfg.rollout, labels=self._labels_of,
                                       signing_key=key if key.is_file() else None)
        self.ingest.observers.append(self.rollouts.observe)
        self.retrainer = self._make_retrainer(cfg, key, clock) if cfg.retrain.enabled else None
        self._http = None

    def _labels_of(self, device: str, start: float, end: float) -> list:
        """The gate's labels provider: the device's labelled fault windows overlapping [start, end]."""
        return self.labels.list(device, start, end + 1e-6)

    def _make_retrainer(self, cfg: AggregatorConfig, key: Path, clock):
        from aggregator.retrain import Retrainer

        if not key.is_file():
            raise _config.ConfigError("config", "retrain.enabled", f"retraining signs its models but there is "
                                      f"no signing key {key} (create one with `edgeloop models keygen`)")
        r = cfg.retrain
        kw = {"clock": clock} if clock is not None else {}
        rollouts = self.rollouts

        class _Retrainer(Retrainer):
            """While a rollout of a profile runs, trains nothing (the champion it would compare
            with is about to change, and a model trained now could not be rolled out), but keeps
            checking drift against the rolled-out version's training data and tells the rollout
            (:meth:`RolloutManager.note_drift`: a drift ends its watch unjudged). Every rollout
            state times out, so a check is skipped for a bounded time; each skip is logged once."""

            def __init__(self, *args, **kw) -> None:
                super().__init__(*args, **kw)
                self._skipped: dict[str, tuple[str, str]] = {}  # profile -> (version, state) last logged

            def check(self, profile: str):
                from aggregator.retrain import RetrainDecision
                from aggregator.rollout import ACTIVE_STATES

                status = rollouts.status(profile) or {}
                if status.get("state") not in ACTIVE_STATES:
                    return super().check(profile)
                report = None
                if not status.get("drift"):
                    report = self.monitor.check(profile, status["version"])
                    if report is not None and report.drifted:
                        rollouts.note_drift(profile, report.verdict)
                running = (status["version"], status["state"])
                if self._skipped.get(profile) != running:
                    self._skipped[profile] = running
                    log.info("retrain check of %s skipped while its rollout of %s is %s (since %s)", profile,
                             running[0], running[1], status.get("started_at"))
                decision = self.last[profile] = RetrainDecision(profile, "rollout running", report)
                return decision

        return _Retrainer(self.store, self.models, key, profiles=r.profiles, schedule_s=r.schedule_s,
                         drift_threshold=r.drift_threshold, range_threshold=r.range_threshold, on_new_model=self._roll_out, check_every_s=r.check_every_s,
                         recent_s=r.recent_s, train_s=r.train_s, min_rows=r.min_rows, n_estimators=r.n_estimators,
                         labels=lambda start, end: self.labels.list(start=start, end=end),
                         label_horizon_s=r.label_horizon_s, label_margin_s=r.label_margin_s,
                         threshold_quantile=r.threshold_quantile, reference_s=r.reference_s, **kw)

    def _roll_out(self, profile: str, version: str) -> None:
        """A retrained model goes to canaries in shadow; with none running yet it cannot (said why)."""
        from aggregator.rollout import RolloutError

        try:
            self.rollouts.start(profile, version, canary=self.config.retrain.canary)
        except RolloutError as exc:
            log.warning("retrained %s/%s is in the registry but not rolled out: %s", profile, version, exc)

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http is not None else None

    def start(self) -> None:
        # HTTP first: a taken port is a config error, found before any broker session exists.
        if self.config.http is not None:
            from aggregator.http import HttpServer, make_app

            self._http = HttpServer(make_app(self), self.config.http.host, self.config.http.port)
            self._http.start()
        try:
            self.ota.start()
            self.ingest.start()
            self.rollouts.serve(self.config.rollout.tick_s)
            if self.retrainer is not None:
                self.retrainer.start()
        except BaseException:
            if self.retrainer is not None:
                self.retrainer.stop()
            self.rollouts.close()
            self.ota.stop()
            self._stop_http()
            raise
        log.info("aggregator ingesting from %s into %s", self.ingest.link.address, self.store.name)

    def _stop_http(self) -> None:
        if self._http is not None:
            self._http.stop()
            self._http = None

    def stop(self, forget_session: bool = False) -> None:
        """Stop ingesting. A member leaving its shared group for good should ``forget_session``:
        Mosquitto keeps queueing a share of the group's messages for a persistent session that
        is gone, and only the devices' re-sends would get those stored."""
        try:
            self._stop_http()  # before the quarantine closes: no request may read a closed database
            if self.retrainer is not None:
                self.retrainer.stop()
            self.rollouts.close()
            self.ota.stop()
            self.ingest.stop(forget_session=forget_session)
        finally:
            self.quarantine.close()
            self.labels.close()
            self.store.close()

    def run_until(self, stop: threading.Event) -> None:
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()


EXAMPLE = """\
# edgeloop aggregator configuration. Runs as it is against a local Mosquitto, storing into the
# embedded SQLite store; set [influx] url to use InfluxDB.

# data_dir = "/var/lib/edgeloop"   # registry, quarantine, embedded store (default ~/.local/share/edgeloop)

[mqtt]
url = "mqtt://127.0.0.1:1883"
protocol = "auto"                  # MQTT 5 where the broker has it, else 3.1.1
client_id = "edgeloop-aggregator-1"  # stable: the broker keeps this session's messages across restarts
share_group = "edgeloop"           # aggregators in one group split the devices' traffic
receive_maximum = 1000             # unacknowledged messages the broker may send us
session_expiry_s = 300             # the broker keeps our session this long while we restart
# username = "aggregator"
# password = "env:EDGELOOP_MQTT_PASSWORD"

[influx]
# url = "http://127.0.0.1:8086"    # unset: embedded SQLite store
database = "edgeloop"              # the bucket on InfluxDB 2.x / 3.x
# org = "my-org"                   # 2.x / 3.x only
# token = "env:EDGELOOP_INFLUX_TOKEN"       # or EDGELOOP_INFLUX_USERNAME / EDGELOOP_INFLUX_PASSWORD on 1.x

[ingest]
batch_lines = 5000                 # flush at this many points ...
max_delay_s = 0.05                 # ... or when the oldest message waited this long ...
ack_threshold = 500                # ... or when this many messages wait for their acknowledgement
confirm_interval_s = 1.0           # how often devices hear what is stored

[models]
# registry = "/var/lib/edgeloop/models"  # model registry (default: <data_dir>/models, as `edgeloop models`)
chunk_size = 65536                 # bytes per broadcast model chunk; must fit the broker's payload limit
# signing_key_file = "/var/lib/edgeloop/keys/signing.key"  # default: <data_dir>/keys/signing.key

[http]                             # Prometheus /metrics, fleet API (/api/fleet ...), /openapi.json
port = 8080                        # 0: any free port (logged at start)
host = "127.0.0.1"                 # "0.0.0.0" to serve beyond this machine
# token = "env:EDGELOOP_API_TOKEN"  # bearer token for control actions (rollouts, alert acks); or token_file

[retrain]                          # drift-triggered retraining; each new model starts a rollout
enabled = false                    # needs scikit-learn (the "train" extra) and the signing key
profiles = ["machine"]
# schedule_s = 604800              # also retrain weekly, drift or not
drift_threshold = 0.2              # PSI of the most drifted feature that triggers a retrain
recent_s = 3600                    # recent features compared with the champion's training window
train_s = 86400                    # stored features a new model learns from
check_every_s = 300
canary = 1                         # devices that run each new model in shadow first

[rollout]                          # the gate and the waves (aggregator/rollout_gate.py RolloutPolicy)
gate_windows = 60                  # paired windows per canary before the gate decides
min_agreement = 0.9
waves = [0.5, 1.0]
watch_windows = 120

[alerts]
# webhook_url = "https://hooks.example.com/edgeloop"  # POST every new alert as JSON (retried with backoff)
retries = 5
"""
