"""Rollout gate and state machine, driven by hand-made verdicts (no broker, no agents).

The distributor is a recording stand-in (it only remembers what it was asked to publish); the
model registry, the fleet registry, the signing and the persisted state are the real ones. The
same flow with real agents over real Mosquitto is in tests/test_rollout_e2e.py.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from aggregator.model_registry import ModelRegistry
from aggregator.registry import Registry
from aggregator.rollout import RolloutError, RolloutManager
from aggregator.rollout_gate import (Pair, RolloutPolicy, evaluate_gate, evaluate_watch, f1_score, false_alarm_rate,
                                     label_windows)
from edgeloop import wire
from models.manifest import Manifest
from models.signing import generate_keypair, sign, verify

T0 = 1_700_000_000.0
PROFILE = "machine"
DEVICES = ["d1", "d2", "d3", "d4", "d5", "d6"]


class RecordingDistributor:
    """Remembers offers, desired models and retirements, in order (stands in for aggregator.ota)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.wanted: dict[str, tuple[str | None, str | None]] = {}
        self.offered: set[tuple[str, str]] = set()

    def offer(self, profile, version):
        self.calls.append(("offer", profile, version))
        self.offered.add((profile, version))

    def set_desired(self, device, *, champion, shadow):
        self.calls.append(("desired", device, champion, shadow))
        self.wanted[device] = (champion, shadow)
        return len(self.calls)

    def retire(self, profile, version):
        self.calls.append(("retire", profile, version))
        self.offered.discard((profile, version))

    def desired(self, device):
        return None  # the real distributor answers its retained DesiredModels


def _add_model(models: ModelRegistry, key, version: str) -> None:
    onnx = f"onnx bytes of {version}".encode()
    manifest = Manifest(version=version, profile=PROFILE, feature_set="fs1", feature_names=["a", "b"],
                        input_shape=[1, 2], opset=17, threshold=0.5, sha256=hashlib.sha256(onnx).hexdigest())
    models.add(onnx, sign(manifest, onnx, key))


class World:
    """A model registry holding champion 1.0 and challenger 2.0, six online devices, a manager."""

    def __init__(self, tmp_path, policy: RolloutPolicy | None = None, labels=None, offline=()) -> None:
        self.tmp = tmp_path
        self.key, self.pub = generate_keypair(tmp_path)
        self.models = ModelRegistry(tmp_path / "models")
        for version in ("1.0", "2.0"):
            _add_model(self.models, self.key, version)
        self.models.promote(PROFILE, "1.0")
        self.fleet = Registry(None, offline_after_s=1e6)  # presence from births and wills only
        for i, device in enumerate(DEVICES):
            state = "offline" if device in offline else "online"
            self.fleet.observe(wire.Status(v=1, device=device, seq=0, ts=T0, profile=PROFILE, state=state), T0 + i)
        self.dist = RecordingDistributor()
        self.policy = policy or RolloutPolicy(gate_windows=20, watch_windows=30, waves=[0.5, 1.0])
        self.labels = labels
        self.mgr = self.manager()
        self.seq = 1

    def manager(self) -> RolloutManager:
        return RolloutManager(self.dist, self.models, self.fleet, state_dir=self.tmp / "agg", policy=self.policy,
                              labels=self.labels, signing_key=self.key)

    def feed(self, msg, t):
        """What the ingest does after a durable write: the fleet registry, then the observers."""
        self.fleet.observe(msg, t)
        self.mgr.observe(msg, t)

    def infer(self, device, version, role, t, anomaly, latency_us=20.0):
        self.seq += 1
        self.feed(wire.Inference(v=1, device=device, seq=self.seq, ts=t, profile=PROFILE, model_version=version,
                                 feature_set="fs1", window_end=t, score=0.0, anomaly=anomaly,
                                 latency_us=latency_us, role=role), t)

    def deploy(self, device, version, state, reason=""):
        self.seq += 1
        self.feed(wire.Deployment(v=1, device=device, seq=self.seq, ts=T0, profile=PROFILE,
                                  model_version=version, state=state, reason=reason), T0)

    def canary_windows(self, devices, n, *, shadow_anomaly=lambda i: False, champ_anomaly=lambda i: False,
                       shadow_us=20.0, start=0):
        for device in devices:
            for i in range(start, start + n):
                t = T0 + 10 + i * 5
                self.infer(device, "1.0", "champion", t, champ_anomaly(i))
                self.infer(device, "2.0", "shadow", t, shadow_anomaly(i), latency_us=shadow_us)

    def activate(self, devices, version="2.0"):
        for device in devices:
            self.deploy(device, version, "active")

    def watch_windows(self, n, anomaly=lambda i: False, version="2.0"):
        for i in range(n):
            self.infer(DEVICES[i % len(DEVICES)], version, "champion", T0 + 1000 + i, anomaly(i))

    def promote_through_waves(self, now):
        """Tick and activate until the rollout leaves ``promoting``; returns the wave sizes."""
        sizes = []
        while self.mgr.status(PROFILE)["state"] == "promoting":
            status = self.mgr.status(PROFILE)
            wave = status["waves"][status["wave"]]
            sizes.append(len(wave))
            self.activate(wave)
            self.mgr.tick(now)
        return sizes


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


# -- the gate as pure statistics ---------------------------------------------------------------------

POLICY = RolloutPolicy(gate_windows=10)


def _pairs(n, champ=False, shadow=False, cus=20.0, sus=20.0):
    return [Pair(float(i), champ(i) if callable(champ) else champ, shadow(i) if callable(shadow) else shadow, cus, sus)
            for i in range(n)]


def test_gate_passes_an_equal_challenger_and_waits_for_enough_windows():
    assert not evaluate_gate({"d1": _pairs(9)}, POLICY).ready
    verdict = evaluate_gate({"d1": _pairs(10), "d2": _pairs(12)}, POLICY)
    assert verdict.ready and verdict.passed and verdict.reasons == []
    assert verdict.stats["all"]["windows"] == 20 and verdict.stats["all"]["agreement"] == 1.0


@pytest.mark.parametrize("pairs, needle", [
    (_pairs(10, shadow=lambda i: i < 3), "exceeds the champion's"),  # 30 % vs 0 %
    (_pairs(10, shadow=True, champ=True), "above the cap"),  # equal, but 100 % flagged
    (_pairs(10, shadow=lambda i: i % 2 == 0, champ=lambda i: i % 2 == 1), "agreement"),
    (_pairs(10, sus=5000.0), "latency p95"),
])
def test_gate_fails_a_worse_challenger_naming_why(pairs, needle):
    verdict = evaluate_gate({"d1": pairs}, POLICY)
    assert verdict.ready and not verdict.passed
    assert any(needle in r for r in verdict.reasons), verdict.reasons


def test_gate_latency_slack_keeps_microsecond_noise_from_failing():
    assert evaluate_gate({"d1": _pairs(10, cus=10.0, sus=150.0)}, POLICY).passed


def test_gate_compares_f1_where_labels_exist():
    truth = {"d1": [i >= 6 for i in range(10)]}
    good = evaluate_gate({"d1": _pairs(10, champ=lambda i: i >= 6, shadow=lambda i: i >= 6)},
                         RolloutPolicy(gate_windows=10, max_anomaly_rate=1.0, max_rate_increase=1.0), truth=truth)
    assert good.passed and good.stats["all"]["shadow_f1"] == 1.0
    misses = evaluate_gate({"d1": _pairs(10, champ=lambda i: i >= 6, shadow=lambda i: i >= 9)},
                           RolloutPolicy(gate_windows=10, min_agreement=0.5, max_anomaly_rate=1.0), truth=truth)
    assert not misses.passed and any(r.startswith("F1 0.400 below") for r in misses.reasons), misses.reasons


def test_gate_fails_on_rejection_and_on_timeout():
    assert evaluate_gate({"d1": []}, POLICY, rejections=["d1 reported 2.0 rejected: bad_signature"]).reasons == [
        "d1 reported 2.0 rejected: bad_signature"]
    late = evaluate_gate({"d1": _pairs(3)}, POLICY, final=True)
    assert late.ready and not late.passed and "d1 gave 3" in late.reasons[0]


def test_watch_and_labels_helpers():
    assert not evaluate_watch([False] * 5, 0.0, RolloutPolicy(watch_windows=10)).ready
    assert evaluate_watch([False] * 10, 0.0, RolloutPolicy(watch_windows=10)).passed
    worse = evaluate_watch([i < 3 for i in range(10)], 0.05, RolloutPolicy(watch_windows=10))
    assert worse.ready and not worse.passed and "exceeds the previous champion's" in worse.reasons[0]
    assert label_windows([1, 5, 9], [(4, 6), {"start": 9, "end": 10}]) == [False, True, True]
    assert f1_score([True, False], [True, True]) == pytest.approx(2 / 3)
    assert f1_score([False, False], [True, False]) is None
    with pytest.raises(ValueError, match="waves"):
        RolloutPolicy(waves=[0.5])


# -- the state machine ---------------------------------------------------------------------------------


def test_better_challenger_goes_canary_gate_waves_watch_done(world):
    status = world.mgr.start(PROFILE, "2.0", canary=2, now=T0)
    assert status["state"] == "canary" and status["canaries"] == ["d1", "d2"] and status["previous"] == "1.0"
    assert world.dist.calls[:3] == [("desired", "d1", "1.0", "2.0"), ("desired", "d2", "1.0", "2.0"),
                                    ("offer", PROFILE, "2.0")]
    world.canary_windows(["d1", "d2"], 19, champ_anomaly=lambda i: i == 3)  # the challenger flags less
    world.mgr.tick(T0 + 100)
    assert world.mgr.status(PROFILE)["state"] == "canary"  # 19 of 20 windows: no verdict yet
    world.canary_windows(["d1", "d2"], 1, start=19)
    world.mgr.tick(T0 + 101)
    status = world.mgr.status(PROFILE)
    assert status["state"] == "promoting" and status["gate"]["passed"]
    assert status["waves"] == [["d1", "d2"], ["d3"], ["d4", "d5", "d6"]]
    assert world.dist.wanted["d1"] == world.dist.wanted["d2"] == ("2.0", None)
    assert "d3" not in world.dist.wanted  # the next wave waits for the canaries' "active"
    world.activate(["d1"])
    world.mgr.tick(T0 + 102)
    assert world.mgr.status(PROFILE)["wave"] == 0  # d2 is online and has not reported yet
    assert world.promote_through_waves(T0 + 103) == [2, 1, 3]
    assert {d: world.dist.wanted[d] for d in DEVICES} == {d: ("2.0", None) for d in DEVICES}
    assert world.models.champion(PROFILE) == "2.0"
    status = world.mgr.status(PROFILE)
    assert status["state"] == "watching"
    world.watch_windows(30)
    world.mgr.tick(T0 + 200)
    assert world.mgr.status(PROFILE)["state"] == "done"
    assert world.models.champion(PROFILE) == "2.0"


@pytest.mark.parametrize("how, needle", [
    ("rate", "anomaly rate"),
    ("slow", "latency p95"),
    ("rejected", "d1 reported 2.0 rejected: feature_set"),
])
def test_worse_challenger_is_rejected_and_removed_from_canaries(world, how, needle):
    world.mgr.start(PROFILE, "2.0", canary=2, now=T0)
    if how == "rejected":
        world.deploy("d1", "2.0", "rejected", "feature_set: fs9 not served")
    else:
        world.canary_windows(["d1", "d2"], 20, shadow_anomaly=(lambda i: i % 3 == 0) if how == "rate" else (lambda i: False),
                             shadow_us=5000.0 if how == "slow" else 20.0)
    world.mgr.tick(T0 + 100)
    status = world.mgr.status(PROFILE)
    assert status["state"] == "rejected"
    assert any(needle in r for r in status["reasons"]), status["reasons"]
    assert world.dist.wanted == {"d1": ("1.0", None), "d2": ("1.0", None)}
    assert world.dist.calls[-1] == ("retire", PROFILE, "2.0")
    assert world.models.champion(PROFILE) == "1.0"


def test_lower_f1_on_labelled_faults_is_rejected(tmp_path):
    # Faults cover the second half of each canary's windows; the champion finds them, the shadow does not.
    def labels(device, t0, t1):
        return [(T0 + 10 + 10 * 5, T0 + 10 + 19 * 5)]

    w = World(tmp_path, RolloutPolicy(gate_windows=20, watch_windows=30, min_agreement=0.0, max_anomaly_rate=1.0),
              labels=labels)
    w.mgr.start(PROFILE, "2.0", canary=1, now=T0)
    w.canary_windows(["d1"], 20, champ_anomaly=lambda i: i >= 10, shadow_anomaly=lambda i: i >= 17)
    w.mgr.tick(T0 + 100)
    status = w.mgr.status(PROFILE)
    assert status["state"] == "rejected" and status["gate"]["stats"]["all"]["champion_f1"] == 1.0
    assert any(r.startswith("F1 0.462 below the champion's 1.000") for r in status["reasons"]), status["reasons"]


def _promoted(w: World, baseline_anomaly=lambda i: False):
    w.mgr.start(PROFILE, "2.0", canary=1, now=T0)
    w.canary_windows(["d1"], 20, champ_anomaly=baseline_anomaly, shadow_anomaly=baseline_anomaly)
    w.mgr.tick(T0 + 100)
    w.promote_through_waves(T0 + 101)
    assert w.mgr.status(PROFILE)["state"] == "watching"


def test_degradation_after_promotion_rolls_back_within_watch_windows(world):
    _promoted(world)
    world.watch_windows(29, anomaly=lambda i: i % 4 == 0)  # 25 % against a 0 % baseline
    world.mgr.tick(T0 + 300)
    assert world.mgr.status(PROFILE)["state"] == "watching"  # 29 of 30 windows: not judged yet
    world.watch_windows(1)
    world.mgr.tick(T0 + 301)
    status = world.mgr.status(PROFILE)
    assert status["state"] == "rolled_back" and status["rollback_version"] == "1.0+rollback.1"
    assert "exceeds the previous champion's 0.000" in status["reasons"][0]
    assert world.models.champion(PROFILE) == "1.0+rollback.1"
    assert world.models.history(PROFILE) == ["1.0+rollback.1"]  # 2.0 popped, the signed copy in 1.0's place
    entry = world.models.get(PROFILE, "1.0+rollback.1")
    assert entry.manifest.rollback_of == "2.0" and entry.manifest.parent_version == "1.0"
    verify(entry.manifest, entry.onnx_bytes(), world.pub.read_bytes())
    assert ("offer", PROFILE, "1.0+rollback.1") in world.dist.calls
    assert {d: world.dist.wanted[d] for d in DEVICES} == {d: ("1.0+rollback.1", None) for d in DEVICES}
    assert world.dist.calls[-1] == ("retire", PROFILE, "2.0")


def test_rejection_during_promotion_rolls_back(world):
    world.mgr.start(PROFILE, "2.0", canary=1, now=T0)
    world.canary_windows(["d1"], 20)
    world.mgr.tick(T0 + 100)
    world.activate(["d1"])
    world.mgr.tick(T0 + 101)
    world.deploy("d2", "2.0", "rejected", "smoke: onnxruntime failed")
    world.mgr.tick(T0 + 102)
    status = world.mgr.status(PROFILE)
    assert status["state"] == "rolled_back" and "d2 reported 2.0 rejected" in status["reasons"][0]
    assert world.models.history(PROFILE) == ["1.0+rollback.1"]


def test_wave_does_not_wait_for_offline_devices_and_times_out_on_silent_ones(tmp_path):
    w = World(tmp_path, offline={"d6"})
    w.mgr.start(PROFILE, "2.0", canary=1, now=T0)
    assert w.mgr.status(PROFILE)["canaries"] == ["d1"]
    w.canary_windows(["d1"], 20)
    w.mgr.tick(T0 + 100)
    assert w.mgr.status(PROFILE)["waves"][-1][-1] == "d6"  # offline devices come last
    w.activate(["d1"])
    w.mgr.tick(T0 + 101)
    w.activate(["d2"])  # d3 stays silent
    w.mgr.tick(T0 + 102)
    assert w.mgr.status(PROFILE)["wave"] == 1
    w.mgr.tick(T0 + 102 + w.policy.wave_timeout_s)
    status = w.mgr.status(PROFILE)
    assert status["wave"] == 2 and status["laggards"] == ["d3"]
    w.activate(["d4", "d5"])  # d6 is offline: it gets its retained desired models when it returns
    w.mgr.tick(T0 + 2000)
    assert w.mgr.status(PROFILE)["state"] == "watching"


def test_canary_share_timeout_and_bad_requests(world):
    with pytest.raises(RolloutError, match="no model machine/9.9") as exc:
        world.mgr.start(PROFILE, "9.9")
    assert exc.value.status == 404
    with pytest.raises(RolloutError, match="already the champion"):
        world.mgr.start(PROFILE, "1.0")
    with pytest.raises(RolloutError, match="share must be"):
        world.mgr.start(PROFILE, "2.0", share=1.5)
    with pytest.raises(RolloutError, match="no devices of profile 'other'"):
        _add_model_other(world)
    status = world.mgr.start(PROFILE, "2.0", share=0.5, now=T0)
    assert status["canaries"] == ["d1", "d2", "d3"]
    with pytest.raises(RolloutError, match="is canary") as exc:
        world.mgr.start(PROFILE, "2.0")
    assert exc.value.status == 409
    world.canary_windows(["d1", "d2", "d3"], 5)
    world.mgr.tick(T0 + world.policy.canary_timeout_s + 1)
    status = world.mgr.status(PROFILE)
    assert status["state"] == "rejected" and "too few paired windows" in status["reasons"][0]


def _add_model_other(world):
    onnx = b"other"
    manifest = Manifest(version="1.0", profile="other", feature_set="fs1", feature_names=["a"], input_shape=[1, 1],
                        opset=17, threshold=0.5, sha256=hashlib.sha256(onnx).hexdigest())
    world.models.add(onnx, sign(manifest, onnx, world.key))
    _add_model_other_v2(world)
    world.models.promote("other", "1.0")
    world.mgr.start("other", "2.0")


def _add_model_other_v2(world):
    onnx = b"other2"
    manifest = Manifest(version="2.0", profile="other", feature_set="fs1", feature_names=["a"], input_shape=[1, 1],
                        opset=17, threshold=0.5, sha256=hashlib.sha256(onnx).hexdigest())
    world.models.add(onnx, sign(manifest, onnx, world.key))


def test_operator_promote_and_rollback(world):
    world.mgr.start(PROFILE, "2.0", canary=1, now=T0)
    with pytest.raises(RolloutError, match="is of 2.0, not 3.0"):
        world.mgr.promote(PROFILE, "3.0")
    status = world.mgr.promote(PROFILE, "2.0", now=T0 + 1)
    assert status["state"] == "promoting" and "gate skipped" in status["events"][-1][1]
    status = world.mgr.promote(PROFILE, now=T0 + 2)  # every remaining device at once
    assert len(status["waves"]) == status["wave"] + 1 and set(world.dist.wanted) == set(DEVICES)
    status = world.mgr.rollback(PROFILE, now=T0 + 3)
    assert status["state"] == "rolled_back" and status["reasons"] == ["rolled back by the operator"]
    with pytest.raises(RolloutError, match="no rollout of profile 'machine' is running"):
        world.mgr.rollback(PROFILE)


def test_restart_resumes_a_rollout_where_it_was(world):
    world.mgr.start(PROFILE, "2.0", canary=2, now=T0)
    world.canary_windows(["d1", "d2"], 12)
    world.mgr.tick(T0 + 50)  # saves the evidence so far
    world.mgr.close()
    world.mgr = world.manager()  # a new aggregator process, same state_dir
    status = world.mgr.status(PROFILE)
    assert status["state"] == "canary" and status["pairs"] == {"d1": 12, "d2": 12}
    world.canary_windows(["d1", "d2"], 8, start=12)
    world.mgr.tick(T0 + 60)
    assert world.mgr.status(PROFILE)["state"] == "promoting"
    world.mgr.close()
    world.mgr = world.manager()
    world.promote_through_waves(T0 + 70)
    world.watch_windows(30)
    world.mgr.tick(T0 + 80)
    world.mgr.close()
    saved = json.loads((world.tmp / "agg" / "rollouts" / f"{PROFILE}.json").read_bytes())
    assert saved["state"] == "done" and world.manager().status(PROFILE)["state"] == "done"


def test_observer_ignores_unrelated_messages_and_unpaired_halves(world):
    world.infer("d1", "1.0", "champion", T0, True)  # no rollout running: nothing recorded, nothing raised
    world.mgr.observe(wire.Alert(v=1, device="d1", seq=1, ts=T0, rule="r", severity="info", value=1.0,
                                 window_end=T0), T0)
    world.mgr.start(PROFILE, "2.0", canary=1, now=T0)
    world.infer("d1", "1.0", "champion", T0 + 1, False)
    world.infer("d1", "1.9", "shadow", T0 + 1, False)  # a shadow of another version does not pair
    world.infer("d2", "2.0", "shadow", T0 + 1, False)  # d2 is no canary
    world.mgr.tick(T0 + 2)
    assert world.mgr.status(PROFILE)["pairs"] == {}
    world.infer("d1", "2.0", "shadow", T0 + 1, False)
    world.mgr.tick(T0 + 3)
    assert world.mgr.status(PROFILE)["pairs"] == {"d1": 1}


# -- HTTP routes and CLI over a real uvicorn server ------------------------------------------------------


@pytest.fixture
def served(world, tmp_path):
    """The model/rollout routes over ``world`` on a free port; yields (world, base URL, token file)."""
    from types import SimpleNamespace

    from starlette.applications import Starlette

    from aggregator.http import HttpServer
    from aggregator.http_models import ROUTES

    token_file = tmp_path / "api.token"  # what the CLI reads
    token_file.write_text("s3cret-token\n")
    app = Starlette(routes=ROUTES)
    app.state.token = "s3cret-token"  # http.make_app resolves [http] token into this
    app.state.aggregator = SimpleNamespace(models=world.models, registry=world.fleet, rollouts=world.mgr, ota=world.dist)
    server = HttpServer(app, "127.0.0.1", 0)
    server.start()
    try:
        yield world, server.url, token_file, app.state
    finally:
        server.stop()


def _call(url, method="GET", body=None, token=None):
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method, headers=headers),
                                    timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_read_routes(served):
    world, url, _, _ = served
    status, body = _call(url + "/api/models")
    assert status == 200 and body["profiles"][PROFILE]["champion"] == "1.0"
    assert [v["version"] for v in body["profiles"][PROFILE]["versions"]] == ["1.0", "2.0"]
    status, body = _call(url + f"/api/models/{PROFILE}/2.0")
    assert status == 200 and body["manifest"]["version"] == "2.0" and body["champion"] is False
    assert _call(url + f"/api/models/{PROFILE}/9.9")[0] == 404
    assert _call(url + f"/api/models/{PROFILE}/..")[0] in (400, 404)
    world.deploy("d1", "2.0", "downloading")
    status, body = _call(url + "/api/deployments")
    d1 = next(d for d in body["devices"] if d["device"] == "d1")
    assert status == 200 and d1["versions"]["2.0"]["state"] == "downloading" and d1["desired"] is None
    assert _call(url + "/api/rollouts") == (200, {"rollouts": []})


def test_http_control_routes_need_the_token_and_refuse_bad_input(served):
    world, url, token_file, state = served
    body = {"profile": PROFILE, "version": "2.0", "canary": 2}
    assert _call(url + "/api/rollouts", "POST", body)[0] == 401
    status, answer = _call(url + "/api/rollouts", "POST", body, token="wrong")
    assert status == 403 and answer == {"error": "wrong bearer token"}
    for bad, needle in [({"profile": PROFILE}, "'version'"), ({**body, "canary": "two"}, "'canary'"),
                        ({"profile": PROFILE, "version": "2.0", "share": 3}, "share must be"), ({**body, "extra": 1}, "unknown field"),
                        ({**body, "version": "9.9"}, "no model")]:
        status, answer = _call(url + "/api/rollouts", "POST", bad, token="s3cret-token")
        assert 400 <= status < 500 and needle in answer["error"], (bad, status, answer)
    status, answer = _call(url + "/api/rollouts", "POST", body, token="s3cret-token")
    assert status == 201 and answer["state"] == "canary" and answer["canaries"] == ["d1", "d2"]
    assert world.dist.wanted["d2"] == ("1.0", "2.0")
    status, answer = _call(url + "/api/rollouts", "POST", body, token="s3cret-token")
    assert status == 409 and "is canary" in answer["error"]
    status, answer = _call(url + f"/api/rollouts/{PROFILE}/promote", "POST", {"version": "3.0"}, token="s3cret-token")
    assert status == 409 and "not 3.0" in answer["error"]
    state.token = None  # no token configured: control routes are off, and say why
    status, answer = _call(url + f"/api/rollouts/{PROFILE}/rollback", "POST", {}, token="s3cret-token")
    assert status == 403 and "control actions are disabled" in answer["error"]


def test_cli_push_status_promote_rollback_through_the_api(served):
    from click.testing import CliRunner

    from edgeloop.cli_models import models

    world, url, token_file, _ = served
    run = CliRunner().invoke
    result = run(models, ["push", PROFILE, "2.0", "--canary", "1", "--api", url, "--token-file", str(token_file)])
    assert result.exit_code == 0, result.output
    assert "2.0 (replacing 1.0)  CANARY" in result.output and "d1 0/20 paired windows" in result.output
    result = run(models, ["rollout", "status", "--api", url])
    assert result.exit_code == 0 and "CANARY" in result.output
    result = run(models, ["promote", PROFILE, "2.0", "--api", url, "--token-file", str(token_file)])
    assert result.exit_code == 0 and "PROMOTING" in result.output, result.output
    result = run(models, ["rollback", PROFILE, "--api", url, "--token-file", str(token_file)])
    assert result.exit_code == 0 and "ROLLED_BACK" in result.output and "1.0+rollback.1" in result.output
    result = run(models, ["rollback", PROFILE, "--api", url, "--token-file", str(token_file)])
    assert result.exit_code == 1 and "answered 409: no rollout of profile 'machine' is running" in result.output
    result = run(models, ["push", PROFILE, "2.0", "--api", url], env={"EDGELOOP_API_TOKEN": ""})
    assert result.exit_code == 1 and "no API token" in result.output


def test_cli_offline_rollback_uses_the_shared_signed_rollback(tmp_path):
    from click.testing import CliRunner

    from edgeloop.cli_models import models

    w = World(tmp_path)
    run = CliRunner().invoke
    assert run(models, ["rollback", PROFILE, "--data-dir", str(tmp_path)]).exit_code == 1  # no previous champion
    assert run(models, ["promote", PROFILE, "2.0", "--data-dir", str(tmp_path)]).exit_code == 0
    result = run(models, ["rollback", PROFILE, "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "champion 2.0 -> 1.0+rollback.1 (signed rollback to 1.0)" in result.output
    entry = w.models.get(PROFILE, "1.0+rollback.1")
    verify(entry.manifest, entry.onnx_bytes(), w.pub.read_bytes())


# -- labels decide when they cover the evidence ----------------------------------------------------


def test_with_labels_agreement_and_raw_rate_are_no_veto_but_false_alarms_are():
    # After a drift the champion flags every normal window; the challenger flags only the fault.
    truth = {"d1": [i >= 8 for i in range(10)]}
    better = evaluate_gate({"d1": _pairs(10, champ=True, shadow=lambda i: i >= 8)}, POLICY, truth=truth)
    assert better.passed, better.reasons
    assert better.stats["all"]["agreement"] == 0.2 and better.stats["all"]["by_labels"] == 1
    assert better.stats["all"]["shadow_false_rate"] == 0.0 and better.stats["all"]["champion_false_rate"] == 1.0
    # Unlabelled, the same evidence fails on agreement: rates are all there is.
    assert any("agreement" in r for r in evaluate_gate({"d1": _pairs(10, champ=True, shadow=lambda i: i >= 8)},
                                                       POLICY).reasons)
    # Catching a real fault raises the anomaly rate: no veto with labels ...
    catches = evaluate_gate({"d1": _pairs(10, shadow=lambda i: i >= 8)}, POLICY, truth=truth)
    assert catches.passed and catches.stats["all"]["shadow_f1"] == 1.0
    # ... but false alarms on windows labelled normal are.
    noisy = evaluate_gate({"d1": _pairs(10, shadow=lambda i: i in (0, 1, 8, 9))}, POLICY, truth=truth)
    assert not noisy.passed and any(r.startswith("false-alarm rate 0.250 on windows labelled normal")
                                    for r in noisy.reasons), noisy.reasons
    # Only some canaries labelled: the rate checks still apply.
    partial = evaluate_gate({"d1": _pairs(10, shadow=lambda i: i >= 8), "d2": _pairs(10)}, POLICY, truth=truth)
    assert not partial.passed and partial.stats["all"]["by_labels"] == 0


def test_windows_near_a_fault_are_not_judged():
    assert label_windows([50, 95, 105, 150, 230, 400], [(100, 140)], lead_s=10, after_s=60) == [
        False, None, True, None, False, False]
    assert f1_score([None, True, False], [True, True, False]) == 1.0
    assert false_alarm_rate([None, True, False, False], [True, True, True, False]) == 0.5
    assert false_alarm_rate([None, True], [True, True]) is None


def test_watch_with_labels_judges_false_alarms_not_the_anomaly_rate():
    policy = RolloutPolicy(watch_windows=10)
    truth = [i >= 5 for i in range(10)]
    # Half the windows flagged (every fault window) against a 0 % baseline: healthy with labels.
    catches = evaluate_watch([i >= 5 for i in range(10)], 0.0, policy, truth=truth, baseline_false_rate=0.0)
    assert catches.passed and catches.stats["watch"]["false_rate"] == 0.0
    assert not evaluate_watch([i >= 5 for i in range(10)], 0.0, policy).passed  # unlabelled: too many
    noisy = evaluate_watch([i in (0, 1) for i in range(10)], 0.0, policy, truth=truth, baseline_false_rate=0.0)
    assert not noisy.passed and "false-alarm rate 0.400" in noisy.reasons[0]
    # The baseline is the old champion's false-alarm rate when known.
    assert evaluate_watch([i in (0, 1) for i in range(10)], 0.0, policy, truth=truth,
                          baseline_false_rate=0.4).passed is False  # 0.4 is over the 0.25 cap
    assert evaluate_watch([i == 0 for i in range(10)], 0.0, policy, truth=truth, baseline_false_rate=0.2).passed


def test_watch_compares_false_alarms_with_the_old_champions_labelled_windows(tmp_path):
    # The old champion's canary-time windows (the baseline) false-alarm on 20 %; the new champion's
    # watch windows on 10 %: healthy, judged on windows the labels call normal.
    def labels(device, t0, t1):
        return [(T0 + 2000, T0 + 2100)]

    w = World(tmp_path, RolloutPolicy(gate_windows=20, watch_windows=30, label_after_s=0, label_lead_s=0),
              labels=labels)
    _promoted(w, baseline_anomaly=lambda i: i % 5 == 0)
    w.watch_windows(30, anomaly=lambda i: i % 10 == 0)
    w.mgr.tick(T0 + 300)
    status = w.mgr.status(PROFILE)
    assert status["state"] == "done", status["events"]
    watch = status["watch_verdict"]["stats"]["watch"]
    assert watch["false_rate"] == pytest.approx(0.1) and watch["baseline_false_rate"] == pytest.approx(0.2)


def test_drift_ends_the_watch_unjudged_and_a_rejection_still_rolls_back(world):
    """A drift the retrainer found ends the watch ``done`` (the new champion is not judged on a
    regime it was not trained for against the old champion's earlier windows); the gate,
    like-for-like on the same windows, goes on; a device refusing the model still rolls back."""
    assert not world.mgr.note_drift(PROFILE, "nothing running", now=T0)
    world.mgr.start(PROFILE, "2.0", canary=1, now=T0)
    assert world.mgr.note_drift(PROFILE, "bearing_temp__mean (100% out of range)", now=T0 + 1)
    assert not world.mgr.note_drift(PROFILE, "again", now=T0 + 2)  # noted once
    assert world.mgr.status(PROFILE)["state"] == "canary"  # the gate still decides
    world.canary_windows(["d1"], 20)
    world.mgr.tick(T0 + 100)
    world.promote_through_waves(T0 + 101)
    world.watch_windows(30, anomaly=lambda i: True)  # every window flagged: would roll back
    world.mgr.tick(T0 + 300)
    status = world.mgr.status(PROFILE)
    assert status["state"] == "done" and "watch not judged: the world drifted" in status["events"][-1][1]
    assert status["drift"] == "bearing_temp__mean (100% out of range)"
    assert world.models.champion(PROFILE) == "2.0"
    assert status["watch_verdict"] is None


def test_drift_noted_while_watching_ends_it_at_once_and_survives_a_restart(world):
    _promoted(world)
    world.watch_windows(10)
    assert world.mgr.note_drift(PROFILE, "ambient shift", now=T0 + 200)
    status = world.mgr.status(PROFILE)
    assert status["state"] == "done" and world.models.champion(PROFILE) == "2.0"
    assert world.manager().status(PROFILE)["drift"] == "ambient shift"  # persisted


def test_rejection_wins_over_drift_in_the_watch(world):
    _promoted(world)
    world.deploy("d3", "2.0", "rejected", "smoke: onnxruntime failed")
    with world.mgr._act:  # the report and the drift arrive before the next tick
        world.mgr._rollouts[PROFILE].drift = "ambient shift"
    world.mgr.tick(T0 + 300)
    assert world.mgr.status(PROFILE)["state"] == "rolled_back"
