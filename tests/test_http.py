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
    from aggregator.http import ROUTES

    _, base, _ = running
    doc = _get_json(base + "/openapi.json")
    routes = {(re.sub(r"\{(\w+):\w+\}", r"{\1}", r.path), m.lower()) for r in ROUTES for m in r.methods - {"HEAD"}}
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert documented == routes
    # Every documented GET without path parameters answers with a status it documents.
    for path, ops in doc["paths"].items():
        if "{" not in path:
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
