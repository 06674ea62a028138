"""The whole loop as one story: a simulated fleet, a model trained from the store, faults, drift,
retraining, shadow canaries, promotion, and the F1 of the loop next to a frozen model.

:func:`run_story` drives a :class:`simulators.scenario.Scenario` on the one-process fleet runner
against a real aggregator (embedded broker + SQLite store, or real servers) whose retrainer and
rollout manager do all the model work; the story only starts things and narrates:

1. **online**: every device runs the real agent with a factory model (``0.1.0``, trained on
   simulated normal data, the model a device ships with); the dashboard URL is printed at once;
2. **warm-up**: the devices' window features flow into the store;
3. **first model**: ``Retrainer.retrain_now`` trains ``1.0.0`` per profile FROM THE STORE, signs
   and registers it; the aggregator's ``on_new_model`` starts a rollout (OTA over MQTT, canary in
   shadow, gate, waves, watch), which the story follows;
4. **faults** are scored at the edge (anomalous inferences and alerts are narrated as they come);
5. **drift** sets in (the scenario's); the retrainer's own checks see it (PSI) and each retrained
   model goes through another rollout, all without the story's help;
6. **scores**: the story stops the fleet, waits for every outbox to be confirmed, and scores
   (:mod:`simulators.scoring`, event based) the loop's champions before and after the drift and
   the frozen first model offline on the stored post-drift features of the same windows;
   delivery is accounted per device and kind (sent = stored) and by outbox confirmation.

Device time runs ``speed`` times faster than real time; the aggregator's retrainer is given the
same accelerated clock. Fault labels from the simulator's ground truth go into the aggregator's
label store, so the rollout gate compares F1 where faults fall in its windows.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgeloop import config as _config
from simulators.story_scores import Follower, score_story

__all__ = ["StoryOptions", "StoryResult", "PeriodScore", "run_story", "story_policy"]

log = logging.getLogger(__name__)
FACTORY_VERSION = "0.1.0"


@dataclass
class StoryOptions:
    scenario: object  # simulators.scenario.Scenario
    speed: float = 30.0  # device seconds per real second
    warmup_s: float = 300.0  # device seconds of features stored before the first model is trained
    mqtt_url: str | None = None
    influx_url: str | None = None
    influx_database: str = "edgeloop"
    influx_org: str | None = None
    data_dir: str | None = None
    http_port: int = 0
    check_every_s: float = 2.0  # real seconds between the retrainer's drift checks
    drift_threshold: float = 0.2
    #: Device seconds of recent features the drift check looks at (None: the warm-up's length).
    recent_s: float | None = None
    #: Drift by the share of recent rows out of the training range (see models.drift) instead of
    #: PSI; needed when ``recent_s`` is shorter than a load cycle. None: PSI.
    range_threshold: float | None = None
    #: Device seconds of one normal operating cycle (the machine's slowest load swing, ~30 min):
    #: ``recovered`` scores start this long after the drift settled (reported, see story_scores).
    cycle_s: float = 2000.0
    #: Device seconds of stored features a retrained model learns from (labelled faults left out).
    #: Longer than the warm-up on purpose: a machine's load cycles over ~30 min, and a model that
    #: saw both the old and the new regime covers the whole normal range.
    train_s: float = 1200.0
    threshold_quantile: float = 0.999
    min_consecutive: int = 2  # anomalous windows in a row that make one alarm (scoring)
    drain_timeout_s: float = 120.0
    say: Callable[[str], None] = print


@dataclass
class PeriodScore:
    """Event-based scores of one model over a set of windows (see :mod:`simulators.scoring`)."""

    model: str
    start: float
    end: float
    windows: int
    faults: int
    detected: int
    alarms: int
    f1: float


@dataclass
class StoryResult:
    run_dir: Path
    dashboard: str
    devices: list[str]
    versions: dict[str, list[str]]  # profile -> versions that became champion, in order
    rollouts: list[tuple[str, str, str]]  # (profile, version, final state)
    retrains: list[tuple[str, str, str]]  # (profile, reason, version)
    edge_alarms: int
    before: dict[str, PeriodScore] = field(default_factory=dict)  # profile -> first store model, pre-drift
    after: dict[str, PeriodScore] = field(default_factory=dict)  # profile -> loop champion after drift
    frozen_after: dict[str, PeriodScore] = field(default_factory=dict)  # same windows, first model frozen
    after_onset: dict[str, PeriodScore] = field(default_factory=dict)  # loop, from the drift's onset (ramp included)
    frozen_after_onset: dict[str, PeriodScore] = field(default_factory=dict)
    recovered: dict[str, PeriodScore] = field(default_factory=dict)  # loop, from one cycle after the drift settled
    frozen_recovered: dict[str, PeriodScore] = field(default_factory=dict)
    sent: dict[tuple[str, str], int] = field(default_factory=dict)  # (device, kind) -> messages/readings
    stored: dict[tuple[str, str], int] = field(default_factory=dict)
    unconfirmed: list[str] = field(default_factory=list)  # devices whose outbox was not confirmed empty

    @property
    def delivered(self) -> bool:
        return not self.unconfirmed and self.sent == self.stored


def story_policy(window_s: float, speed: float):
    """Rollout policy for an accelerated story: small windows of evidence, time-outs in real seconds.

    The checks are the defaults: the story's labels (the simulator's ground truth) cover every
    device, so the gate and the watch judge by F1 and false alarms on windows labelled normal,
    and agreement with a drifted champion is no veto (see :mod:`aggregator.rollout_gate`).
    Only the amounts of evidence are scaled to the story's minutes.
    """
    from aggregator.rollout_gate import RolloutPolicy

    return RolloutPolicy(gate_windows=12, latency_factor=5.0, latency_slack_us=20_000.0,
                         waves=[0.5, 1.0], watch_windows=60, wave_timeout_s=30.0,
                         canary_timeout_s=max(30.0, 40 * window_s / speed), watch_timeout_s=60.0, tick_s=0.25)


def run_story(options: StoryOptions) -> StoryResult:
    """Run the story; see the module docstring. Narration goes to ``options.say``."""
    return _Story(options).run()


class _Story:
    def __init__(self, options: StoryOptions) -> None:
        self.o = options
        self.sc = options.scenario
        self.say = options.say
        self.lock = threading.Lock()
        self.rows: list[tuple[str, str, float, bool, str]] = []  # (device, version, window_end, anomaly, profile)
        self.sent: dict[tuple[str, str], int] = defaultdict(int)
        self.alarms = 0
        self.t0 = 0.0
        self.first: dict[str, str] = {}  # profile -> the first store-trained version
        self.factory = FACTORY_VERSION

    # -- time --------------------------------------------------------------------------------------

    def device_now(self) -> float:
        """Device time now: the fleet's clock, ``speed`` times faster than the wall clock."""
        return self.t0 + (time.time() - self.t0) * self.o.speed

    def wait_device(self, t: float, poll: Callable[[], None]) -> None:
        """Poll (narrate) until ``t`` device seconds since the start."""
        while (self.device_now() - self.t0) < t:
            poll()
            time.sleep(0.25)

    # -- recording (scheduler thread) ------------------------------------------------------------

    def record(self, msg) -> None:
        from edgeloop import wire

        kind = type(msg)
        with self.lock:
            if kind is wire.Telemetry:
                self.sent[(msg.device, "telemetry")] += len(msg.readings)
                return
            self.sent[(msg.device, kind.__name__.lower())] += 1
            if kind is wire.Inference and msg.role == "champion":
                self.rows.append((msg.device, msg.model_version, float(msg.window_end), bool(msg.anomaly),
                                  self.profiles[msg.device]))
            elif kind is wire.Alert:
                self.alarms += 1

    # -- the run -----------------------------------------------------------------------------------

    def run(self) -> StoryResult:
        o, sc = self.o, self.sc
        run_id = secrets.token_hex(2)
        base = Path(o.data_dir) if o.data_dir else _config.default_data_dir()
        run_dir = base / "demo" / f"{time.strftime('%Y%m%d-%H%M%S')}-{run_id}"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.profiles = {d.id: d.profile for d in sc.devices}
        profile_names = sorted(set(self.profiles.values()))
        # The aggregator's retrainer reads device_now() from its first check on: give it a sane
        # clock before the fleet starts (reset to the fleet's start below).
        self.t0 = time.time()
        with contextlib.ExitStack() as stack:
            agg, url, protocol, caps = self.start_cloud(stack, run_dir, run_id, profile_names)
            dashboard = f"http://127.0.0.1:{agg.http_port}/"
            self.say(f"dashboard: {dashboard}  (fleet API {dashboard}api/fleet, metrics {dashboard}metrics)")
            factory = self.factory_models(agg, run_dir, profile_names)
            runner, sources = self.build_fleet(run_dir, url, protocol, caps, factory, agg)
            self.say(f"[phase] online: {len(sc.devices)} devices ({', '.join(profile_names)}) at {o.speed:g}x, "
                     f"serving factory model {FACTORY_VERSION}")
            follow = Follower(agg, profile_names, self.say)
            runner.start()
            self.t0 = time.time()
            try:
                self.label_faults(agg, sources)
                self.say(f"[phase] warm-up: {o.warmup_s:g} s of device time of window features into the store")
                self.wait_device(o.warmup_s, follow.poll)
                self.say("[phase] first model: training a model per profile from the stored warm-up features")
                for profile in profile_names:
                    try:
                        version = self.first[profile] = agg.retrainer.retrain_now(profile)
                    except ValueError as exc:  # too few clean rows: the profile keeps its factory model
                        self.say(f"  {profile}: no model trained from the store ({exc}); it keeps {FACTORY_VERSION}")
                        continue
                    self.say(f"  {profile}/{version} trained from the store, signed; rollout started")
                drift_at = min((d.get("start_s", 0.0) for s in sc.devices for d in s.drift), default=None)
                fault_at = min((f["start_s"] for s in sc.devices for f in s.faults), default=None)
                for t, text in sorted(((fault_at, "[phase] faults: injected faults begin; the edge scores them"),
                                       (drift_at, "[phase] drift: the world shifts; the retrainer watches PSI")),
                                      key=lambda x: x[0] if x[0] is not None else 1e18):
                    if t is not None and t > self.device_now() - self.t0:
                        self.wait_device(t, follow.poll)
                        self.say(text + f" (device time {t:.0f} s)")
                self.wait_device(sc.duration_s, follow.poll)
                follow.poll()
            finally:
                self.say("[phase] drain: sampling stopped; waiting for the cloud to confirm every outbox")
                results = runner.stop(o.drain_timeout_s)
            follow.poll()
            unconfirmed = sorted(d for d, ok in results.items() if ok is not True)
            stored = {(d, k): agg.store.count(k, d) for (d, k) in self.sent}
            result = StoryResult(run_dir=run_dir, dashboard=dashboard, devices=[d.id for d in sc.devices],
                                 versions=follow.champions, rollouts=follow.finished(), retrains=follow.retrains,
                                 edge_alarms=self.alarms, sent=dict(self.sent), stored=stored,
                                 unconfirmed=unconfirmed)
            self.score(agg, sources, result)
        return result

    def start_cloud(self, stack, run_dir: Path, run_id: str, profiles: list[str]):
        from aggregator.service import (Aggregator, AggregatorConfig, HttpSettings, InfluxSettings, MqttSettings,
                                        RetrainSettings)
        from models.signing import generate_keypair

        o, sc = self.o, self.sc
        generate_keypair(run_dir)
        caps, url = None, o.mqtt_url
        if url is None:
            from aggregator.embedded_broker import EmbeddedBroker

            broker = stack.enter_context(EmbeddedBroker(data_dir=str(run_dir / "broker")))
            url, caps = broker.url, broker.capabilities
            self.say(f"embedded MQTT broker on {url}")
        protocol = "auto" if caps is None else ("5" if caps.mqtt5 else "3.1.1")
        shared = caps is None or caps.shared_subscriptions
        window = o.warmup_s if o.recent_s is None else o.recent_s
        cfg = AggregatorConfig(
            data_dir=str(run_dir),
            mqtt=MqttSettings(url=url, protocol=protocol, share_group=f"edgeloop-demo-{run_id}" if shared else None,
                              client_id=f"edgeloop-demo-agg-{run_id}",
                              receive_maximum=caps.receive_maximum if caps else 1000),
            influx=InfluxSettings(url=o.influx_url, database=o.influx_database, org=o.influx_org),
            http=HttpSettings(port=o.http_port),
            retrain=RetrainSettings(enabled=True, profiles=profiles, drift_threshold=o.drift_threshold,
                                    range_threshold=o.range_threshold,
                                    recent_s=window, train_s=o.train_s, check_every_s=o.check_every_s,
                                    reference_s=o.warmup_s,  # the factory model's: a whole warm-up
                                    threshold_quantile=o.threshold_quantile, label_horizon_s=2 * sc.lead_s,
                                    min_rows=self.min_rows(window)),
            rollout=story_policy(sc.window_s, o.speed),
        )
        agg = Aggregator(cfg, clock=self.device_now)
        agg.ota.coalesce_s = 0.2
        agg.start()
        stack.callback(agg.stop, forget_session=True)
        self.say(f"aggregator storing into {agg.store.name}")
        return agg, url, protocol, caps

    def min_rows(self, window_s: float) -> int:
        """Rows a model must learn from: half the windows the smallest profile's devices give in
        ``window_s`` (at most 200), so a profile with one device still trains."""
        counts: dict[str, int] = defaultdict(int)
        for d in self.sc.devices:
            counts[d.profile] += 1
        return min(200, max(10, int(min(counts.values()) * window_s / self.sc.window_s / 2)))

    def factory_models(self, agg, run_dir: Path, profiles: list[str]) -> dict[str, Path]:
        """The model each device ships with: trained on simulated normal data, registered as champion."""
        from models import training
        from models.signing import load_private_key, sign

        key = load_private_key(agg.config.signing_key_path())
        sc, dirs = self.sc, {}
        for k, profile in enumerate(profiles):
            X, names = training.simulated_training_set(
                profile, seed=sc.seed * 1000 + 700_000 + 10 * k, windows=1500,
                window_len=max(2, round(sc.window_s * sc.rate_hz)), rate_hz=sc.rate_hz, machines=4)
            onnx_bytes, manifest = training.train_isolation_forest(
                X, names, version=FACTORY_VERSION, profile=profile, seed=sc.seed, n_estimators=50,
                threshold_quantile=0.999)
            manifest = sign(manifest, onnx_bytes, key)
            agg.models.add(onnx_bytes, manifest)
            agg.models.promote(profile, FACTORY_VERSION)
            dirs[profile] = training.write_model(run_dir / "factory" / profile, onnx_bytes, manifest)
        return dirs

    def build_fleet(self, run_dir, url, protocol, caps, factory, agg):
        from simulators.fleet import FleetRunner, scenario_agents

        sc, o = self.sc, self.o
        public = agg.config.signing_key_path().with_suffix(".pub")
        configs, sources = scenario_agents(sc, url=url, protocol=protocol, caps=caps, data_dir=run_dir / "devices",
                                           model_dirs=factory, speed=o.speed, public_key_file=public)
        runner = FleetRunner(configs, [sources[c.device_id] for c in configs], speed=o.speed, on_accept=self.record,
                             drain_timeout=o.drain_timeout_s)
        return runner, sources

    def label_faults(self, agg, sources) -> None:
        """The simulator's fault windows as labels (device time), once every source has a first sample."""
        deadline = time.monotonic() + 30
        while any(s._first is None for s in sources.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for device, src in sources.items():
            if src._first is None:
                continue
            first_i, first_t = src._first
            for f in src.simulator.ground_truth()["faults"]:
                if f.get("category", "process") == "process":
                    t = first_t - first_i / src.rate_hz
                    agg.labels.add(device, t + f["start_s"], t + f["end_s"], f["kind"], "simulator ground truth")

    # -- scores ------------------------------------------------------------------------------------

    def score(self, agg, sources, result: StoryResult) -> None:
        score_story(self, agg, sources, result)
