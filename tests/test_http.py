"""The aggregator's HTTP port through a real Mosquitto and the embedded SQLite store.

One aggregator (HTTP on a free port) per module takes a few good and bad messages from a real
MQTT client; the tests then read ``/metrics``, the fleet API, the OpenAPI document and
``edgeloop fleet`` over real HTTP (urllib), never through an in-process test client.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import quote

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from edgeloop import wire
from edgeloop.cli import main
from edgeloop.mqtt import MqttLink
from tests.waiting import wait_until as _wait

T0 = 1_767_225_600.0
GOOD = 3  # telemetry messages of READINGS readings each
READINGS = 3
# (payload, topic kind, reason); the device id is filled in per module.
HOSTILE = [
    (b"{not json", "telemetry", "malformed"),
    (b"\xff\xfe\x00 not utf-8", "telemetry", "malformed"),
    (b"{}", "nonsense", "bad-topic"),
]


def _telemetry(device: str, seq: int) -> bytes:
    readings = [wire.Reading(T0 + seq + i / 10, [float(seq), float(i)], 0) for i in range(READINGS)]
    return wire.encode(wire.Telemetry(v=1, device=device, seq=seq, ts=T0 + seq, profile="machine",
                                      channels=["a", "b"], readings=readings))


def _get(url: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET; error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def _get_json(url: str, expect: int = 200):
    status, ctype, body = _get(url)
    assert status == expect, (url, status, body)
    assert ctype.startswith("application/json"), (url, ctype)
    return json.loads(body)


@pytest.fixture(scope="module")
def running(mosquitto, tmp_path_factory):
    """(aggregator, base URL, device id) after GOOD telemetry messages, one status and HOSTILE."""
    from aggregator.service import Aggregator, AggregatorConfig, HttpSettings, MqttSettings

    tmp = tmp_path_factory.mktemp("http")
    device = f"http-{tmp.name}"[:60]
    # A share group and client id of its own: the session-wide broker may hold other sessions.
    cfg = AggregatorConfig(
        data_dir=str(tmp),
        mqtt=MqttSettings(url=mosquitto.url, client_id=f"agg-{tmp.name}"[:60], share_group=f"g-{tmp.name}"[:60]),
        http=HttpSettings(port=0),
    )
    agg = Aggregator(cfg)
    agg.start()
    link = MqttLink(mosquitto.url, f"pub-{tmp.name}"[:60])
    try:
        assert agg.http_port and agg.http_port > 0
        link.start()
        for seq in range(GOOD):
            assert link.publish(wire.topic(device, "telemetry"), _telemetry(device, seq))
        status = wire.Status(v=1, device=device, seq=GOOD - 1, ts=T0 + GOOD, profile="machine", state="online",
                             agent_version="1.2.3", model_version="1.0.0", outbox_depth=4, dropped=[(10, 12)])
        # Not retained: a retained status would outlive this module on the shared broker.
        assert link.publish(wire.topic(device, "status"), wire.encode(status))
        for payload, kind, _ in HOSTILE:
            topic = wire.topic(device, kind) if kind in wire.UPLINK_KINDS else f"{wire.TOPIC_ROOT}/dev/{device}/{kind}"
            assert link.publish(topic, payload)
        _wait(lambda: agg.store.count("telemetry", device) == GOOD * READINGS, what="the readings to be stored")
        _wait(lambda: agg.quarantine.total() == len(HOSTILE), what="the hostile messages to be quarantined")
        _wait(lambda: (r := agg.registry.get(device)) is not None and r.state == "online", what="the status")
        _wait(lambda: agg.ingest.confirmer.sent >= 1, what="a delivery confirmation")
        yield agg, f"http://127.0.0.1:{agg.http_port}", device
    finally:
        link.stop()
        agg.stop(forget_session=True)


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_report_the_live_counters(running):
    agg, base, _ = running
    status, ctype, body = _get(base + "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    m = _samples(body.decode())
    stats = agg.ingest.stats
    # Exactly what this module sent, where only this module's traffic can count ...
    assert m[("edgeloop_ingest_readings_stored_total", ())] == GOOD * READINGS
    assert m[("edgeloop_ingest_quarantined_total", (("reason", "malformed"),))] == 2
    assert m[("edgeloop_ingest_quarantined_total", (("reason", "bad-topic"),))] == 1
    # ... and at least that where a retained status of another test's device may have come too.
    assert m[("edgeloop_ingest_messages_stored_total", ())] == stats.stored_messages >= GOOD + 1
    assert m[("edgeloop_ingest_messages_received_total", ())] == stats.received >= GOOD + 1 + len(HOSTILE)
    assert m[("edgeloop_ingest_batches_total", ())] == stats.batches >= 1
    assert m[("edgeloop_store_retries_total", ())] == 0
    assert m[("edgeloop_confirmations_sent_total", ())] >= 1
    assert m[("edgeloop_ingest_waiting_messages", ())] == 0
    assert m[("edgeloop_ingest_last_batch_seconds", ())] > 0
    assert m[("edgeloop_mqtt_connected", ())] == 1
    online = sum(r.state == "online" for r in agg.registry.devices())
    assert m[("edgeloop_devices", (("state", "online"),))] == online >= 1
    assert ("edgeloop_devices", (("state", "offline"),)) in m


def test_metrics_use_a_private_registry(running):
    from prometheus_client import REGISTRY, generate_latest

    assert b"edgeloop_" not in generate_latest(REGISTRY)


def test_health_names_the_store(running):
    _, base, _ = running
    body = _get_json(base + "/api/health")
    assert body["ok"] is True and body["mqtt_connected"] is True
    assert body["store"].startswith("sqlite")


def test_fleet_and_device_records(running):
    agg, base, device = running
    fleet = _get_json(base + "/api/fleet")
    records = {d["device"]: d for d in fleet["devices"]}
    rec = records[device]
    assert rec["state"] == "online" and rec["profile"] == "machine"
    assert rec["messages"] == GOOD + 1 and rec["max_seq"] == GOOD - 1
    assert rec["model_version"] == "1.0.0" and rec["outbox_depth"] == 4 and rec["dropped"] == [[10, 12]]
    assert 0 <= fleet["now"] - rec["last_seen"] < 60
    # Every field of the registry's record appears, whatever fields it has grown.
    import msgspec

    assert set(rec) == set(msgspec.to_builtins(agg.registry.get(device)))
    one = _get_json(f"{base}/api/devices/{device}")
    assert one["device"] == rec | {"last_seen": one["device"]["last_seen"]}


def test_device_errors_are_json_4xx(running):
    _, base, _ = running
    assert "unknown device" in _get_json(f"{base}/api/devices/no-such-device", 404)["error"]
    for bad in ("bad id!", "a/b", "-leading-dash", "x" * 65):
        assert "invalid device id" in _get_json(f"{base}/api/devices/{quote(bad, safe='')}", 400)["error"], bad
    assert "no such endpoint" in _get_json(base + "/api/nothing", 404)["error"]
    req = urllib.request.Request(base + "/api/fleet", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=5)
    assert exc.value.code == 405 and "not allowed" in json.loads(exc.value.read())["error"]


def test_quarantine_listing(running):
    _, base, device = running
    body = _get_json(base + "/api/quarantine")
    assert body["counts"] == {"malformed": 2, "bad-topic": 1}
    entries = body["entries"]
    assert [e["reason"] for e in entries] == [reason for _, _, reason in reversed(HOSTILE)]  # newest first
    by_payload = {e["payload"]: e for e in entries}
    assert by_payload["{not json"]["topic"] == wire.topic(device, "telemetry")
    assert by_payload["{not json"]["detail"]
    binary = by_payload["\ufffd\ufffd\x00 not utf-8"]  # undecodable bytes become replacement chars
    assert binary["payload_bytes"] == len(HOSTILE[1][0]) and binary["payload_truncated"] is False
    assert len(_get_json(base + "/api/quarantine?limit=1")["entries"]) == 1
    assert len(_get_json(base + "/api/quarantine?limit=1000")["entries"]) == len(HOSTILE)
    for bad in ("0", "1001", "-1", "ten", "1.5", ""):
        assert "limit must be" in _get_json(f"{base}/api/quarantine?limit={bad}", 400)["error"], bad


def test_openapi_lists_every_route(running):
    from starlette.routing import Route

    agg, base, _ = running
    doc = _get_json(base + "/openapi.json")
    app_routes = [r for r in agg._http.app.routes if isinstance(r, Route)]  # the model routes too, if mounted
    routes = {(re.sub(r"\{(\w+):\w+\}", r"{\1}", r.path), m.lower()) for r in app_routes for m in r.methods - {"HEAD"}}
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert documented == routes
    # Every documented GET without path parameters answers with a status it documents.
    for path, ops in doc["paths"].items():
        if "{" not in path and "get" in ops:
            status, _, _ = _get(base + path)
            assert str(status) in ops["get"]["responses"], (path, status)


def test_fleet_command_prints_the_registry(running):
    _, base, device = running
    result = CliRunner().invoke(main, ["fleet", "--api", base], terminal_width=250)
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if device in line)
    for cell in ("online", "machine", "1.0.0", "s ago"):
        assert cell in line, (cell, line)
    assert "dropped" in result.output and "skew" in result.output  # loss and clock columns shown


def test_fleet_command_fails_clearly_when_unreachable():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(main, ["fleet", "--api", f"http://127.0.0.1:{port}", "--timeout", "2"])
    assert result.exit_code == 1
    assert f"cannot reach the aggregator API at http://127.0.0.1:{port}/api/fleet" in result.output


def test_taken_port_is_refused_with_its_number():
    from aggregator.http import HttpServer
    from starlette.applications import Starlette

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve HTTP on 127.0.0.1:{port}"):
            HttpServer(Starlette(), "127.0.0.1", port).start()


def test_config_defaults_and_cli_override(tmp_path):
    from aggregator import service

    assert service.load(None).http == service.HttpSettings(port=8080, host="127.0.0.1")
    assert service.load(None, **{"http.port": 0}).http.port == 0
    assert service.AggregatorConfig().http is None  # built in code: no port unless asked for
    path = tmp_path / "agg.toml"
    path.write_text(service.EXAMPLE)
    assert service.load(path).http.port == 8080


def test_server_stops_and_frees_its_port():
    from aggregator.http import HttpServer
    from starlette.applications import Starlette

    server = HttpServer(Starlette(), "127.0.0.1", 0)
    port = server.start()
    assert _get(f"http://127.0.0.1:{port}/nothing")[0] == 404
    thread = server._thread
    server.stop()
    assert not thread.is_alive()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # free again


# -- /api/series, /api/fields, /api/timeline over both stores (InfluxDB: the real server) ----------

SPAN = 3000  # seconds of 1 Hz readings the store holds


@pytest.fixture(scope="module", params=["sqlite", "influx"])
def api(request, tmp_path_factory):
    """(base URL, t0) of an HTTP app over a store filled directly: SPAN readings at 1 s from t0
    (temp = k, rpm = 2k), a feature vector and a champion verdict every 10 s (model 1.0.0 for the
    first half, 1.1.0 after). The aggregator is not started: these tests need no broker."""
    from aggregator.http import HttpServer, make_app
    from aggregator.service import Aggregator, AggregatorConfig, MqttSettings
    from aggregator.stores import make_store

    tmp = tmp_path_factory.mktemp(f"api-{request.param}")
    if request.param == "influx":
        influx = request.getfixturevalue("influxdb")
        store = make_store(influx_url=influx.url, database=influx.new_database("api"))
    else:
        store = make_store(sqlite_path=str(tmp / "store.sqlite"))
    store.open()
    t0 = float(int(time.time()) - SPAN - 60)
    msgs: list = []
    seq = 0
    for k0 in range(0, SPAN, 100):
        readings = [wire.Reading(t0 + k, [float(k), 2.0 * k], 0) for k in range(k0, k0 + 100)]
        msgs.append(wire.Telemetry(v=1, device="api-dev", seq=seq, ts=t0 + k0, profile="machine",
                                   channels=["temp", "rpm"], readings=readings))
        seq += 1
    for k in range(0, SPAN, 10):
        msgs.append(wire.Features(v=1, device="api-dev", seq=seq, ts=t0 + k, profile="machine", feature_set="fs1",
                                  window_start=t0 + k - 10, window_end=t0 + k, names=["temp_mean"], values=[float(k)]))
        msgs.append(wire.Inference(v=1, device="api-dev", seq=seq + 1, ts=t0 + k, profile="machine",
                                   model_version="1.0.0" if k < SPAN // 2 else "1.1.0", feature_set="fs1",
                                   window_end=t0 + k, score=k / SPAN, anomaly=False, latency_us=10.0))
        seq += 2
    assert store.write(msgs).rejected == []
    agg = Aggregator(AggregatorConfig(data_dir=str(tmp), mqtt=MqttSettings(url="mqtt://127.0.0.1:1")), store=store)
    server = HttpServer(make_app(agg, token="secret"), port=0)
    server.start()
    try:
        yield server.url, t0
    finally:
        server.stop()
        agg.quarantine.close()
        store.close()


def _close(points, expected) -> bool:
    """Two lists of [t, v] pairs equal to within float noise (pytest.approx does not nest)."""
    return len(points) == len(expected) and all(
        p[0] == pytest.approx(e[0]) and p[1] == pytest.approx(e[1]) for p, e in zip(points, expected))


def _buckets(pairs, every: float, fn=lambda xs: sum(xs) / len(xs)) -> list[list[float]]:
    groups: dict[float, list[float]] = {}
    for t, v in pairs:
        groups.setdefault((t // every) * every, []).append(v)
    return [[t, fn(vs)] for t, vs in sorted(groups.items())]


def test_series_picks_an_interval_that_keeps_it_under_1000_points(api):
    base, t0 = api
    body = _get_json(f"{base}/api/series?device=api-dev&field=temp&since={t0}&until={t0 + SPAN}")
    assert body["every"] == 5 and body["measurement"] == "telemetry" and body["agg"] == "mean"
    assert len(body["points"]) <= 1000
    assert _close(body["points"], _buckets([(t0 + k, float(k)) for k in range(SPAN)], 5))
    short = _get_json(f"{base}/api/series?device=api-dev&field=rpm&since={t0}&until={t0 + 900}")
    assert short["every"] == 1 and _close(short["points"], [[t0 + k, 2.0 * k] for k in range(900)])


def test_series_with_an_interval_and_aggregate(api):
    base, t0 = api
    body = _get_json(f"{base}/api/series?device=api-dev&field=temp&since={t0}&until={t0 + SPAN}&every=1m&agg=max")
    assert body["every"] == 60
    assert _close(body["points"], _buckets([(t0 + k, float(k)) for k in range(SPAN)], 60, max))
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0))
    same = _get_json(f"{base}/api/series?device=api-dev&field=temp&since={iso}&until={t0 + SPAN}&every=60&agg=max")
    assert same["points"] == body["points"]
    recent = _get_json(f"{base}/api/series?device=api-dev&field=temp&since=1h")  # relative to now
    assert recent["until"] - recent["since"] == pytest.approx(3600, abs=1) and len(recent["points"]) <= 1000
    assert recent["points"][-1][1] == pytest.approx(SPAN - 1 - (SPAN - 1) % 5 + 2, abs=2.5)


def test_features_scores_fields_and_model_changes(api):
    base, t0 = api
    q = f"device=api-dev&since={t0}&until={t0 + SPAN}&every=10s"
    feats = _get_json(f"{base}/api/series?{q}&measurement=features&field=temp_mean")
    assert _close(feats["points"], [[t0 + k, float(k)] for k in range(0, SPAN, 10)])
    scores = _get_json(f"{base}/api/series?{q}&measurement=inference&field=score")
    assert _close(scores["points"], [[t0 + k, k / SPAN] for k in range(0, SPAN, 10)])
    fields = _get_json(f"{base}/api/fields?device=api-dev")
    assert fields == {"telemetry": ["rpm", "temp"], "features": ["temp_mean"], "inference": ["score", "latency_us"]}
    assert _get_json(f"{base}/api/fields?device=nobody") == {"telemetry": [], "features": [],
                                                             "inference": ["score", "latency_us"]}
    timeline = _get_json(f"{base}/api/timeline?device=api-dev&since={t0}&until={t0 + SPAN}")
    assert timeline["model_changes"] == [{"time": t0, "model_version": "1.0.0"},
                                         {"time": t0 + SPAN // 2, "model_version": "1.1.0"}]
    assert timeline["alerts"] == []


@pytest.mark.parametrize("query, reason", [
    ("field=temp", "missing query parameter 'device'"),
    ("device=api-dev", "missing query parameter 'field'"),
    ("device=bad%20id!&field=temp", "invalid device"),
    ("device=api-dev&field=1x", "invalid field"),
    ("device=api-dev&field=seq", "are not channels"),
    ("device=api-dev&field=temp&measurement=alerts", "invalid measurement"),
    ("device=api-dev&field=temp_mean&measurement=inference", "inference has score, latency_us"),
    ("device=api-dev&field=temp&agg=median", "invalid agg"),
    ("device=api-dev&field=temp&since=yesterday", "invalid since"),
    ("device=api-dev&field=temp&since=1h&until=2h", "must be before until"),
    ("device=api-dev&field=temp&since=-5", "outside 1970..2100"),
    ("device=api-dev&field=temp&since=1e300", "outside 1970..2100"),
    ("device=api-dev&field=temp&since=nan", "invalid since"),
    ("device=api-dev&field=temp&since=24h&every=1s", "more than 1000 points"),
    ("device=api-dev&field=temp&every=fast", "invalid every"),
    ("device=api-dev&field=temp&every=0s", "invalid every"),
])
def test_series_bad_parameters_are_400_with_the_reason(api, query, reason):
    base, _ = api
    body = _get_json(f"{base}/api/series?{query}", 400)
    assert reason in body["error"], body


def test_dashboard_files_are_served(api):
    base, _ = api
    status, ctype, body = _get(base + "/")
    assert status == 200 and ctype.startswith("text/html") and b"/dashboard/vendor/uPlot.iife.min.js" in body
    for path, kind in (("app.js", "javascript"), ("style.css", "text/css"), ("vendor/uPlot.iife.min.js", "javascript"),
                       ("vendor/uPlot.min.css", "text/css")):
        status, ctype, body = _get(f"{base}/dashboard/{path}")
        assert status == 200 and kind in ctype and body, path
    assert "no such endpoint" in _get_json(base + "/dashboard/nothing.js", 404)["error"]
    # Nothing the page loads comes from elsewhere.
    page = _get(base + "/")[2].decode() + _get(base + "/dashboard/app.js")[2].decode()
    assert not re.search(r"""(src|href)=["']https?://""", page) and "fetch(\"http" not in page


def test_metrics_command_plots_a_field(api):
    base, t0 = api
    result = CliRunner().invoke(main, ["metrics", "api-dev", "--field", "temp", "--since", str(t0), "--until",
                                       str(t0 + SPAN), "--rows", "3", "--api", base], terminal_width=100)
    assert result.exit_code == 0, result.output
    expected = [v for _, v in _buckets([(t0 + k, float(k)) for k in range(SPAN)], 5)]
    out = " ".join(result.output.split())  # rich may wrap long lines
    assert f"api-dev telemetry.temp: {len(expected)} intervals" in out and "mean per 5 s" in out
    spark = next(line for line in result.output.splitlines() if line and set(line) <= set("▁▂▃▄▅▆▇█"))
    assert spark[0] == "▁" and spark[-1] == "█" and list(spark) == sorted(spark)  # temp only rises
    mean = sum(expected) / len(expected)
    assert f"min {min(expected):.6g} mean {mean:.6g} max {max(expected):.6g} last {expected[-1]:.6g}" in out
    assert f"{expected[-1]:.6g}" in result.output.splitlines()[-1]  # the latest interval, last row of the table
    empty = CliRunner().invoke(main, ["metrics", "nobody", "--field", "temp", "--api", base])
    assert empty.exit_code == 0 and "no values" in empty.output
    bad = CliRunner().invoke(main, ["metrics", "api-dev", "--field", "temp", "--since", "soon", "--api", base])
    assert bad.exit_code == 1 and "answered 400: invalid since 'soon'" in bad.output
