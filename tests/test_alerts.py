"""aggregator.alerts: acknowledgements and silences that persist, the feed over a real store, and
webhook delivery (retries, back-off, a bounded queue) against a real local HTTP server."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from aggregator.alerts import AlertBook, AlertWatcher, WebhookSender, alert_id, feed, parse_alert_id
from aggregator.stores import make_store
from edgeloop import wire
from tests.waiting import wait_until


class Hook:
    """A real HTTP server on a free loopback port that records POSTed JSON bodies; the first
    ``fail_first`` requests get a 500, and while ``gate`` is clear every request waits for it."""

    def __init__(self, fail_first: int = 0) -> None:
        self.bodies: list[dict] = []
        self.requests = 0
        self.fail_first = fail_first
        self.gate = threading.Event()
        self.gate.set()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                hook.gate.wait(30)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.requests += 1
                if hook.requests <= hook.fail_first:
                    self.send_response(500)
                else:
                    hook.bodies.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


@pytest.fixture
def book(tmp_path):
    b = AlertBook(tmp_path / "alerts.sqlite")
    yield b
    b.close()


@pytest.fixture
def store(tmp_path):
    with make_store(sqlite_path=str(tmp_path / "store.sqlite")) as s:
        yield s


def _alert(device: str, seq: int, rule: str = "hot", t: float | None = None) -> wire.Alert:
    t = time.time() - 5 if t is None else t
    return wire.Alert(v=1, device=device, seq=seq, ts=t, profile="machine", rule=rule, severity="warning",
                      value=1.5, window_end=t, message=f"{rule} on {device}")


def test_alert_ids_round_trip_and_bad_ones_are_named():
    assert parse_alert_id(alert_id("press-7", 42)) == ("press-7", 42)
    for bad in ("press-7", "press-7:", "press-7:x", ":3", "bad id!:3", "a:-1"):
        with pytest.raises(ValueError, match="alert id"):
            parse_alert_id(bad)


def test_acks_keep_the_first_time_and_survive_reopening(tmp_path):
    path = tmp_path / "alerts.sqlite"
    book = AlertBook(path)
    first = book.ack("d1", 3, at=1000.0)
    assert book.ack("d1", 3, at=2000.0) == first == 1000.0
    book.close()
    book = AlertBook(path)
    try:
        assert book.acks([("d1", 3), ("d1", 4)]) == {("d1", 3): 1000.0}
    finally:
        book.close()


def test_silences_match_device_rule_or_both_and_expire(book):
    now = time.time()
    by_device = book.silence("d1", None, now + 60)
    by_rule = book.silence(None, "cold", now + 60)
    both = book.silence("d2", "hot", now + 1)
    active = book.silences(now)
    assert [s["id"] for s in active] == [by_device["id"], by_rule["id"], both["id"]]
    assert book.silenced_by({"device": "d1", "rule": "any"}, active) == by_device["id"]
    assert book.silenced_by({"device": "d9", "rule": "cold"}, active) == by_rule["id"]
    assert book.silenced_by({"device": "d2", "rule": "hot"}, active) == both["id"]
    assert book.silenced_by({"device": "d2", "rule": "warm"}, active) is None
    assert [s["id"] for s in book.silences(now + 30)] == [by_device["id"], by_rule["id"]]  # expired
    assert book.unsilence(by_rule["id"]) is True and book.unsilence(by_rule["id"]) is False
    assert [s["id"] for s in book.silences(now)] == [by_device["id"], both["id"]]


@pytest.mark.parametrize("device, rule, until, match", [
    (None, None, "+60", "needs a device, a rule or both"),
    ("bad id!", None, "+60", "invalid device"),
    (None, "9lives", "+60", "invalid rule"),
    ("d1", None, "-60", "future time"),
    ("d1", None, "nan", "future time"),
])
def test_bad_silences_are_refused_with_the_reason(book, device, rule, until, match):
    value = float("nan") if until == "nan" else time.time() + float(until)
    with pytest.raises(ValueError, match=match):
        book.silence(device, rule, value)


def test_feed_joins_the_store_with_acks_and_silences(store, book):
    store.write([_alert("d1", 1, "hot"), _alert("d1", 2, "cold"), _alert("d2", 1, "hot")])
    book.ack("d1", 1)
    silence = book.silence(None, "cold", time.time() + 60)
    alerts = {a["id"]: a for a in feed(store, book)}
    assert set(alerts) == {"d1:1", "d1:2", "d2:1"}
    assert alerts["d1:1"]["acked_at"] is not None and alerts["d1:1"]["silenced_by"] is None
    assert alerts["d1:2"]["acked_at"] is None and alerts["d1:2"]["silenced_by"] == silence["id"]
    assert alerts["d2:1"]["message"] == "hot on d2"
    assert [a["id"] for a in feed(store, book, device="d2")] == ["d2:1"]
    with pytest.raises(ValueError, match="limit"):
        feed(store, book, limit=0)


def test_webhook_retries_with_backoff_until_delivered():
    hook = Hook(fail_first=2)
    sender = WebhookSender(hook.url, retries=3, backoff_s=0.05)
    try:
        assert sender.submit({"id": "d1:1", "rule": "hot"})
        wait_until(lambda: sender.delivered == 1, what="the delivery after two 500s")
        assert hook.requests == 3 and sender.attempts == 3 and sender.failed == 0
        assert hook.bodies == [{"kind": "edgeloop.alert", "alert": {"id": "d1:1", "rule": "hot"}}]
    finally:
        sender.close()
        hook.close()


def test_webhook_gives_up_after_its_retries():
    hook = Hook(fail_first=100)
    sender = WebhookSender(hook.url, retries=2, backoff_s=0.02)
    try:
        sender.submit({"id": "d1:1"})
        wait_until(lambda: sender.failed == 1, what="the sender to give up")
        assert hook.requests == 3 and sender.delivered == 0
    finally:
        sender.close()
        hook.close()


def test_a_stuck_webhook_never_blocks_submit(hook):
    hook.gate.clear()  # the server holds every request
    sender = WebhookSender(hook.url, queue_size=3, timeout_s=10)
    try:
        sender.submit({"id": "first"})
        wait_until(lambda: sender.attempts == 1, what="the first request to be in flight")
        started = time.monotonic()
        results = [sender.submit({"id": f"a{k}"}) for k in range(10)]
        assert time.monotonic() - started < 1.0  # put_nowait: no waiting on the stuck server
        assert results == [True] * 3 + [False] * 7 and sender.dropped == 7
        hook.gate.set()
        wait_until(lambda: sender.delivered == 4, what="the queued alerts once the server answers")
        assert [b["alert"]["id"] for b in hook.bodies] == ["first", "a0", "a1", "a2"]
    finally:
        sender.close()


def test_webhook_url_must_be_http():
    with pytest.raises(ValueError, match="webhook url"):
        WebhookSender("ftp://example.invalid/")


def test_watcher_notifies_each_unsilenced_alert_once(tmp_path, store, hook):
    store.write([_alert("d1", 1, "hot"), _alert("d1", 2, "cold"), _alert("d2", 1, "hot", t=time.time() - 3600)])
    book = AlertBook(tmp_path / "alerts.sqlite")
    book.silence(None, "cold", time.time() + 60)
    sender = WebhookSender(hook.url, backoff_s=0.05)
    watcher = AlertWatcher(store, book, sender, lookback_s=600)
    try:
        assert watcher.poll_once() == 1  # d1:2 silenced; d2:1 older than the look-back
        assert watcher.poll_once() == 0
        wait_until(lambda: sender.delivered == 1, what="the webhook delivery")
        assert hook.bodies[0]["alert"]["id"] == "d1:1" and hook.bodies[0]["alert"]["device"] == "d1"
        store.write([_alert("d1", 3, "hot")])
        assert watcher.poll_once() == 1
        wait_until(lambda: sender.delivered == 2, what="the second delivery")
    finally:
        sender.close()
        book.close()
    # A restart (a new book on the same file) does not notify again, even once the silence is gone.
    book = AlertBook(tmp_path / "alerts.sqlite")
    for s in book.silences():
        book.unsilence(s["id"])
    sender = WebhookSender(hook.url)
    try:
        assert AlertWatcher(store, book, sender, lookback_s=600).poll_once() == 0
    finally:
        sender.close()
        book.close()


def test_watcher_thread_polls_on_its_own(tmp_path, store, hook, book):
    sender = WebhookSender(hook.url, backoff_s=0.05)
    watcher = AlertWatcher(store, book, sender, poll_s=0.05).start()
    try:
        store.write([_alert("d1", 7)])
        wait_until(lambda: sender.delivered == 1, what="the watcher to deliver the new alert")
    finally:
        watcher.close()
        sender.close()
    assert not watcher._thread.is_alive()


# -- the HTTP side: feed, ack, silences, the token, and webhook delivery from the app ---------------

TOKEN = "s3cret-token"


def _call(url: str, method: str = "GET", body: dict | bytes | None = None, token: str | None = None):
    """(status, JSON body) of a request; error statuses are returned, not raised."""
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(params=["sqlite", "influx"])
def alert_api(request, tmp_path, hook):
    """(base URL, store, hook) of an HTTP app with token and webhook over a store with 3 alerts."""
    from aggregator.alerts import AlertSettings
    from aggregator.http import HttpServer, make_app
    from aggregator.service import Aggregator, AggregatorConfig, MqttSettings

    if request.param == "influx":
        influx = request.getfixturevalue("influxdb")
        store = make_store(influx_url=influx.url, database=influx.new_database("alerts"))
    else:
        store = make_store(sqlite_path=str(tmp_path / "store.sqlite"))
    store.open()
    store.write([_alert("d1", 1, "hot"), _alert("d1", 2, "cold"), _alert("d2", 1, "hot")])
    agg = Aggregator(AggregatorConfig(data_dir=str(tmp_path), mqtt=MqttSettings(url="mqtt://127.0.0.1:1")), store=store)
    settings = AlertSettings(webhook_url=hook.url, poll_s=0.05, backoff_s=0.05)
    server = HttpServer(make_app(agg, token=TOKEN, alert_settings=settings), port=0)
    server.start()
    try:
        yield server.url, store, hook
    finally:
        server.stop()
        agg.quarantine.close()
        store.close()


def test_feed_ack_and_silence_over_http(alert_api):
    base, _, _ = alert_api
    status, body = _call(f"{base}/api/alerts")
    assert status == 200 and [a["id"] for a in body["alerts"]][:1] and body["silences"] == []
    assert {a["id"] for a in body["alerts"]} == {"d1:1", "d1:2", "d2:1"}
    assert _call(f"{base}/api/alerts?device=d2")[1]["alerts"][0]["id"] == "d2:1"
    status, events = _call(f"{base}/api/events?since=1h")
    assert status == 200 and events["devices"] == [] and len(events["alerts"]) == 3  # registry empty: no ingest
    assert _call(f"{base}/api/events?since={time.time() + 1}")[1]["alerts"] == []
    assert "invalid since" in _call(f"{base}/api/events?since=later")[1]["error"]

    assert _call(f"{base}/api/alerts/d1:1/ack", "POST")[0] == 401
    assert _call(f"{base}/api/alerts/d1:1/ack", "POST", token="wrong") == (403, {"error": "wrong bearer token"})
    status, acked = _call(f"{base}/api/alerts/d1:1/ack", "POST", token=TOKEN)
    assert status == 200 and acked["id"] == "d1:1" and acked["acked_at"] > 0
    assert _call(f"{base}/api/alerts/nonsense/ack", "POST", token=TOKEN)[0] == 400

    status, silence = _call(f"{base}/api/silences", "POST", {"rule": "cold", "until": "1h"}, token=TOKEN)
    assert status == 201 and silence["rule"] == "cold" and silence["until"] > time.time() + 3500
    alerts = {a["id"]: a for a in _call(f"{base}/api/alerts")[1]["alerts"]}
    assert alerts["d1:1"]["acked_at"] == acked["acked_at"] and alerts["d1:1"]["silenced_by"] is None
    assert alerts["d1:2"]["silenced_by"] == silence["id"] and alerts["d1:2"]["acked_at"] is None
    assert [s["id"] for s in _call(f"{base}/api/silences")[1]["silences"]] == [silence["id"]]

    assert _call(f"{base}/api/silences/{silence['id']}", "DELETE")[0] == 401
    assert _call(f"{base}/api/silences/{silence['id']}", "DELETE", token=TOKEN) == (200, {"deleted": silence["id"]})
    assert _call(f"{base}/api/silences/{silence['id']}", "DELETE", token=TOKEN)[0] == 404
    assert "expected an integer" in _call(f"{base}/api/silences/x", "DELETE", token=TOKEN)[1]["error"]


@pytest.mark.parametrize("body, reason", [
    (b"{nope", "must be JSON"),
    ({"device": "d1"}, "expected a JSON object"),
    ({"device": "d1", "until": "1h", "extra": 1}, "expected a JSON object"),
    ({"until": "1h"}, "needs a device, a rule or both"),
    ({"device": "d1", "until": 5}, "future time"),
    ({"device": "d1", "until": "soon"}, "invalid until"),
    ({"device": "bad id", "until": "1h"}, "invalid device"),
])
def test_bad_silences_over_http_are_400(alert_api, body, reason):
    base, _, _ = alert_api
    status, answer = _call(f"{base}/api/silences", "POST", body, token=TOKEN)
    assert status == 400 and reason in answer["error"], answer


def test_the_app_delivers_new_alerts_to_the_webhook(alert_api):
    _, store, hook = alert_api
    wait_until(lambda: len(hook.bodies) == 3, what="the three stored alerts at the webhook")
    store.write([_alert("d3", 9, "smoke")])
    wait_until(lambda: len(hook.bodies) == 4, what="the new alert at the webhook")
    assert hook.bodies[-1]["alert"]["id"] == "d3:9" and hook.bodies[-1]["alert"]["message"] == "smoke on d3"


def test_control_actions_are_off_without_a_token(tmp_path):
    from aggregator.http import HttpServer, make_app
    from aggregator.service import Aggregator, AggregatorConfig, MqttSettings

    with make_store(sqlite_path=str(tmp_path / "store.sqlite")) as store:
        agg = Aggregator(AggregatorConfig(data_dir=str(tmp_path), mqtt=MqttSettings(url="mqtt://127.0.0.1:1")),
                         store=store)
        server = HttpServer(make_app(agg), port=0)
        server.start()
        try:
            status, body = _call(f"{server.url}/api/alerts/d1:1/ack", "POST", token="anything")
            assert status == 403 and "set [http] token" in body["error"]
            assert _call(f"{server.url}/api/events")[0] == 200
        finally:
            server.stop()
            agg.quarantine.close()
