"""The aggregator's HTTP port: Prometheus ``/metrics``, the fleet API and the web dashboard.

:func:`make_app` builds a Starlette app over one running :class:`~aggregator.service.Aggregator`;
:class:`HttpServer` serves it with uvicorn on a background thread so the aggregator keeps its
own threads and signal handling, and stops it cleanly (``should_exit``) on shutdown.

Reads come from the aggregator's live public state (ingest stats, quarantine, registry) and its
store (``/api/series``, ``/api/timeline``, ``/api/alerts``). The only writes are alert
acknowledgements and silences (``aggregator.alerts``), which need the bearer token of
``[http] token``: :func:`require_token` is the one check every control action uses (the model
routes of ``aggregator.http_models`` too, mounted here when that module exists). Errors are JSON
``{"error": reason}`` with a 4xx status; bad input is never a 500. The OpenAPI document at
``/openapi.json`` is the hand-kept :data:`OPENAPI`, which a test keeps equal to the routes. The
dashboard (``aggregator/dashboard/``: static HTML, JavaScript and the vendored uPlot, no build
step) is served at ``/`` and ``/dashboard/``; see docs/dashboard.md.
"""

from __future__ import annotations

import hmac
import logging
import math
import re
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from edgeloop import wire

if TYPE_CHECKING:
    from aggregator.service import Aggregator

__all__ = ["HttpServer", "make_app", "close_app", "require_token", "parse_time", "OPENAPI", "QUARANTINE_MAX_LIMIT",
           "PAYLOAD_PREVIEW_BYTES", "MAX_POINTS", "DASHBOARD_DIR"]

log = logging.getLogger(__name__)

QUARANTINE_MAX_LIMIT = 1000
QUARANTINE_DEFAULT_LIMIT = 100
# Quarantined payloads may be far over the wire limit (that is one reason to quarantine them):
# the API shows the head of each, as text, and says how long the whole was.
PAYLOAD_PREVIEW_BYTES = 4096
#: ``/api/series`` answers at most this many points: it picks the interval so that they fit.
MAX_POINTS = 1000
#: The dashboard's static files.
DASHBOARD_DIR = Path(__file__).with_name("dashboard")
MEASUREMENTS = ("telemetry", "features", "inference")
#: ``/api/fleet`` counts each device's champion anomalies over this many recent seconds.
ANOMALY_WINDOW_S = 3600.0

_json = msgspec.json.Encoder()


class JSONResponse(Response):
    """JSON through msgspec, so registry structs (and any field added to them) encode as they are."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _json.encode(content)


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


# -- handlers (sync: Starlette runs them in its thread pool, off the event loop) -----------------


def _metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


def _openapi(request: Request) -> JSONResponse:
    return JSONResponse(getattr(request.app.state, "openapi", OPENAPI))


def _health(request: Request) -> JSONResponse:
    agg: Aggregator = request.app.state.aggregator
    diag = agg.ingest.diagnostics()
    connected, writer = bool(diag.get("connected")), bool(diag.get("writer_alive"))
    body = {"ok": connected and writer, "store": agg.store.name, "mqtt_connected": connected,
            "writer_alive": writer, "waiting": diag.get("waiting", 0)}
    return JSONResponse(body, status_code=200 if body["ok"] else 503)


def _fleet(request: Request) -> JSONResponse:
    agg: Aggregator = request.app.state.aggregator
    from aggregator.stores.base import StoreError

    # ``now`` is the aggregator's clock, the one ``last_seen`` is on: clients compute ages from it.
    now = time.time()
    try:  # champion anomalies per device in the last hour (by window end); None if the store is down
        anomalies = agg.store.anomaly_counts(now - ANOMALY_WINDOW_S, None)
    except StoreError as exc:
        log.warning("fleet: no anomaly counts: %s", exc)
        anomalies = None
    return JSONResponse({"now": now, "devices": msgspec.to_builtins(agg.registry.devices()),
                         "anomalies": {"window_s": ANOMALY_WINDOW_S, "counts": anomalies}})


def _device(request: Request) -> JSONResponse:
    agg: Aggregator = request.app.state.aggregator
    device = request.path_params["device"]
    if not wire.valid_device_id(device):
        return _error(400, f"invalid device id {device!r}: must match {wire.DEVICE_ID_PATTERN}")
    record = agg.registry.get(device)
    if record is None:
        return _error(404, f"unknown device {device!r}: the registry has not heard from it")
    return JSONResponse({"now": time.time(), "device": msgspec.to_builtins(record)})


def _quarantine(request: Request) -> JSONResponse:
    agg: Aggregator = request.app.state.aggregator
    raw = request.query_params.get("limit")
    limit = QUARANTINE_DEFAULT_LIMIT
    if raw is not None:
        try:
            limit = int(raw)
        except ValueError:
            limit = 0
        if not 1 <= limit <= QUARANTINE_MAX_LIMIT:
            return _error(400, f"limit must be an integer from 1 to {QUARANTINE_MAX_LIMIT}, not {raw!r}")
    entries = []
    for row in agg.quarantine.recent(limit):
        payload: bytes = row["payload"]
        entries.append({
            "at": row["at"], "topic": row["topic"], "reason": row["reason"], "detail": row["detail"],
            "payload": payload[:PAYLOAD_PREVIEW_BYTES].decode("utf-8", errors="replace"),
            "payload_bytes": len(payload), "payload_truncated": len(payload) > PAYLOAD_PREVIEW_BYTES,
        })
    return JSONResponse({"counts": dict(agg.quarantine.counts), "entries": entries})


# -- parameters, the control-action check and store reads -----------------------------------------

#: The intervals ``/api/series`` picks from when none is asked for: the smallest that fits.
_STEPS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
          43200, 86400)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d|w)\Z")
_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str, name: str) -> float:
    """Seconds in ``90s``, ``15m``, ``1h``, ``7d``, ``2w`` (or a bare number of seconds)."""
    t = text.strip()
    m = _DURATION.match(t)
    try:
        value = float(m[1]) * _UNITS[m[2]] if m else float(t)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 100 * 365 * 86400):
        raise ValueError(f"invalid {name} {text!r}: expected a positive duration such as 90s, 15m, 1h or 7d")
    return value


def parse_time(text: str, now: float, name: str) -> float:
    """``now``, a duration back from now (``1h``), seconds since the epoch, or ISO 8601 (UTC if no zone)."""
    from datetime import datetime, timezone

    from aggregator.stores.queries import MAX_TIME_S

    t = text.strip()
    if t == "now":
        return now
    if _DURATION.match(t):
        return now - parse_duration(t, name)
    try:
        value = float(t)
    except ValueError:
        try:
            dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"invalid {name} {text!r}: expected now, a duration back from now (1h), "
                             "seconds since the epoch or an ISO 8601 time") from None
        value = (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()
    if not (math.isfinite(value) and 0 <= value <= MAX_TIME_S):
        raise ValueError(f"invalid {name} {text!r}: outside 1970..2100")
    return value


def _need(request: Request, name: str) -> str:
    value = request.query_params.get(name)
    if not value:
        raise ValueError(f"missing query parameter {name!r}")
    return value


def _range(request: Request, default_since: str) -> tuple[float, float]:
    now = time.time()
    since = parse_time(request.query_params.get("since") or default_since, now, "since")
    until = parse_time(request.query_params.get("until") or "now", now, "until")
    if not since < until:
        raise ValueError(f"since ({since:.3f}) must be before until ({until:.3f})")
    return since, until


def _limit(request: Request, default: int, maximum: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= maximum:
        raise ValueError(f"limit must be an integer from 1 to {maximum}, not {raw!r}")
    return limit


def require_token(request: Request) -> None:
    """Refuse a control action unless it carries ``Authorization: Bearer <[http] token>``.

    Raises HTTPException: 401 without a bearer token, 403 with a wrong one or when the aggregator
    has no token configured (control actions are then off). Every control route calls this first.
    """
    expected = getattr(request.app.state, "token", None)
    if not expected:
        raise HTTPException(403, "control actions are disabled: set [http] token in the aggregator configuration")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise HTTPException(401, "this action needs the header 'Authorization: Bearer <token>' ([http] token)",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), str(expected).encode()):
        raise HTTPException(403, "wrong bearer token")


def _api(handler):
    """Bad parameters (ValueError, from here or the store's checks) become 400, an unreachable
    store 503, each with the reason."""
    from aggregator.stores.base import StoreError

    def wrapped(request: Request, *args) -> Response:
        try:
            return handler(request, *args)
        except ValueError as exc:
            return _error(400, str(exc))
        except StoreError as exc:
            return _error(503, f"the store cannot answer: {exc}")

    wrapped.__name__ = handler.__name__
    return wrapped


@_api
def _series(request: Request) -> JSONResponse:
    from aggregator.stores.queries import AGGREGATES

    agg: Aggregator = request.app.state.aggregator
    device, field = _need(request, "device"), _need(request, "field")
    measurement = request.query_params.get("measurement") or "telemetry"
    if measurement not in MEASUREMENTS:
        raise ValueError(f"invalid measurement {measurement!r}: expected one of {', '.join(MEASUREMENTS)}")
    fn = request.query_params.get("agg") or "mean"
    if fn not in AGGREGATES:
        raise ValueError(f"invalid agg {fn!r}: expected one of {', '.join(AGGREGATES)}")
    since, until = _range(request, "1h")
    span = until - since
    raw_every = request.query_params.get("every")
    # Buckets are aligned to multiples of ``every``: span / every <= MAX_POINTS - 1 keeps them <= MAX_POINTS.
    least = span / (MAX_POINTS - 1)
    if raw_every:
        every = parse_duration(raw_every, "every")
        if every < least:
            raise ValueError(f"every {raw_every!r} gives more than {MAX_POINTS} points over {span:.0f}s: "
                             f"use at least {math.ceil(least)}s, or omit it")
    else:
        every = next((step for step in _STEPS if step >= least), math.ceil(least))
    if measurement == "telemetry":
        points = agg.store.series(device, field, since, until, every, fn)
    else:
        points = agg.store.window_series(measurement, device, field, since, until, every, fn)
    return JSONResponse({"device": device, "field": field, "measurement": measurement, "agg": fn,
                         "since": since, "until": until, "every": every, "points": points})


@_api
def _fields(request: Request) -> JSONResponse:
    from aggregator.stores.queries import INFERENCE_FIELDS

    agg: Aggregator = request.app.state.aggregator
    fields = agg.store.device_fields(_need(request, "device"))
    return JSONResponse({**fields, "inference": list(INFERENCE_FIELDS)})


@_api
def _timeline(request: Request) -> JSONResponse:
    from aggregator.alerts import feed

    agg: Aggregator = request.app.state.aggregator
    device = _need(request, "device")
    since, until = _range(request, "1h")
    changes = [{"time": t, "model_version": v} for t, v in agg.store.model_changes(device, since, until)]
    alerts = feed(agg.store, request.app.state.alerts, since, until, device=device, limit=500)
    return JSONResponse({"device": device, "since": since, "until": until, "model_changes": changes,
                         "alerts": alerts})


@_api
def _alerts(request: Request) -> JSONResponse:
    from aggregator.alerts import feed

    agg: Aggregator = request.app.state.aggregator
    since, until = _range(request, "7d")
    device = request.query_params.get("device") or None
    book = request.app.state.alerts
    now = time.time()
    alerts = feed(agg.store, book, since, until, device=device, limit=_limit(request, 100, 1000), now=now)
    return JSONResponse({"now": now, "alerts": alerts, "silences": book.silences(now)})


@_api
def _ack(request: Request) -> JSONResponse:
    from aggregator.alerts import alert_id, parse_alert_id

    require_token(request)
    device, seq = parse_alert_id(request.path_params["alert_id"])
    at = request.app.state.alerts.ack(device, seq)
    return JSONResponse({"id": alert_id(device, seq), "acked_at": at})


@_api
def _silences(request: Request) -> JSONResponse:
    return JSONResponse({"now": time.time(), "silences": request.app.state.alerts.silences()})


async def _add_silence(request: Request) -> Response:
    from starlette.concurrency import run_in_threadpool

    require_token(request)
    body = await request.body()  # read on the event loop; the SQLite write runs in the thread pool
    return await run_in_threadpool(_create_silence, request, body)


@_api
def _create_silence(request: Request, body: bytes) -> JSONResponse:
    try:
        spec = msgspec.json.decode(body or b"null")
    except msgspec.DecodeError as exc:
        raise ValueError(f"the body must be JSON: {exc}") from None
    if not isinstance(spec, dict) or set(spec) - {"device", "rule", "until"} or "until" not in spec:
        raise ValueError('expected a JSON object {"device"?, "rule"?, "until"}: until in seconds since the epoch '
                         'or a duration from now such as "1h"')
    until = spec["until"]
    if isinstance(until, str):
        until = time.time() + parse_duration(until, "until")
    silence = request.app.state.alerts.silence(spec.get("device"), spec.get("rule"), until)
    return JSONResponse(silence, status_code=201)


@_api
def _delete_silence(request: Request) -> JSONResponse:
    require_token(request)
    raw = request.path_params["silence_id"]
    if not raw.isdigit():
        raise ValueError(f"invalid silence id {raw!r}: expected an integer")
    if not request.app.state.alerts.unsilence(int(raw)):
        return _error(404, f"no silence {raw}")
    return JSONResponse({"deleted": int(raw)})


@_api
def _events(request: Request) -> JSONResponse:
    """What changed lately, for a polling client: device presence and alerts since ``since``."""
    from aggregator.alerts import feed

    agg: Aggregator = request.app.state.aggregator
    now = time.time()
    since = parse_time(request.query_params.get("since") or "60s", now, "since")
    devices = [{"device": r.device, "state": r.state, "last_seen": r.last_seen, "model_version": r.model_version}
               for r in agg.registry.devices()]
    alerts = feed(agg.store, request.app.state.alerts, since, None, limit=100, now=now) if since < now else []
    return JSONResponse({"now": now, "since": since, "devices": devices, "alerts": alerts})


def _index(request: Request) -> Response:
    return FileResponse(DASHBOARD_DIR / "index.html", media_type="text/html")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    reason = exc.detail
    if exc.status_code == 404:
        reason = f"no such endpoint {request.url.path!r}; see /openapi.json"
    elif exc.status_code == 405:
        reason = f"method {request.method} not allowed on {request.url.path!r}"
    return JSONResponse({"error": reason}, status_code=exc.status_code, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(500, f"internal error: {type(exc).__name__}")


ROUTES = [
    Route("/metrics", _metrics, methods=["GET"]),
    Route("/openapi.json", _openapi, methods=["GET"]),
    Route("/api/health", _health, methods=["GET"]),
    Route("/api/fleet", _fleet, methods=["GET"]),
    Route("/api/devices/{device:path}", _device, methods=["GET"]),
    Route("/api/quarantine", _quarantine, methods=["GET"]),
    Route("/api/series", _series, methods=["GET"]),
    Route("/api/fields", _fields, methods=["GET"]),
    Route("/api/timeline", _timeline, methods=["GET"]),
    Route("/api/alerts", _alerts, methods=["GET"]),
    Route("/api/alerts/{alert_id}/ack", _ack, methods=["POST"]),
    Route("/api/silences", _silences, methods=["GET"]),
    Route("/api/silences", _add_silence, methods=["POST"]),
    Route("/api/silences/{silence_id}", _delete_silence, methods=["DELETE"]),
    Route("/api/events", _events, methods=["GET"]),
    Route("/", _index, methods=["GET"]),
]


def _model_api() -> tuple[list, dict]:
    """Routes and OpenAPI paths of ``aggregator.http_models`` (models, deployments, rollouts),
    if that module exists: it exports ``ROUTES`` and ``OPENAPI_PATHS``."""
    try:
        from aggregator import http_models
    except ModuleNotFoundError as exc:
        if exc.name != "aggregator.http_models":
            raise
        return [], {}
    return list(http_models.ROUTES), dict(getattr(http_models, "OPENAPI_PATHS", {}))


def make_app(aggregator: "Aggregator", metrics_registry=None, *, token: str | None = None,
             alert_settings=None) -> Starlette:
    """The HTTP app over ``aggregator``; metrics from ``metrics_registry`` or a private new one.

    ``token`` (default: ``[http] token`` of the aggregator's config) guards the control actions.
    The alert book opens ``alerts.sqlite`` in the aggregator's state directory; with a webhook in
    ``alert_settings`` (default: the config's ``[alerts]``) an alert watcher delivers new alerts.
    :func:`close_app` (called by :meth:`HttpServer.stop`) closes them.
    """
    from aggregator.alerts import AlertBook, AlertWatcher, WebhookSender
    from aggregator.metrics import make_registry
    from edgeloop.config import resolve_secret

    model_routes, model_paths = _model_api()
    static = Mount("/dashboard", StaticFiles(directory=DASHBOARD_DIR), name="dashboard")
    app = Starlette(routes=[*ROUTES, *model_routes, static],
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.aggregator = aggregator
    app.state.metrics = metrics_registry if metrics_registry is not None else make_registry(aggregator)
    app.state.openapi = {**OPENAPI, "paths": {**OPENAPI["paths"], **model_paths}}
    config = getattr(aggregator, "config", None)
    http_cfg = getattr(config, "http", None)
    if token is None and http_cfg is not None:
        token = resolve_secret(getattr(http_cfg, "token", None), getattr(http_cfg, "token_file", None),
                               "HTTP API token")
    app.state.token = token
    state_dir = config.state_dir()
    state_dir.mkdir(parents=True, exist_ok=True)
    app.state.alerts = book = AlertBook(state_dir / "alerts.sqlite")
    app.state.closers = [book.close]
    app.state.webhook = None
    settings = alert_settings if alert_settings is not None else getattr(config, "alerts", None)
    if settings is not None and settings.webhook_url:
        sender = WebhookSender(settings.webhook_url, timeout_s=settings.webhook_timeout_s, retries=settings.retries,
                               backoff_s=settings.backoff_s, queue_size=settings.queue_size)
        watcher = AlertWatcher(aggregator.store, book, sender, poll_s=settings.poll_s,
                               lookback_s=settings.lookback_s).start()
        app.state.webhook = sender
        app.state.closers[:0] = [watcher.close, sender.close]  # the watcher first: it feeds the sender
    return app


def close_app(app) -> None:
    """Stop what :func:`make_app` started (alert watcher, webhook sender) and close the alert book."""
    state = getattr(app, "state", None)
    for close in getattr(state, "closers", ()):
        try:
            close()
        except Exception:  # one failing closer must not keep the others open
            log.exception("closing the HTTP app's %s failed", close)
    if state is not None:
        state.closers = []


# -- OpenAPI (hand-kept; tests/test_http.py checks it lists exactly the routes above) -------------

_ERROR = {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _ok(description: str, schema: dict | None = None) -> dict:
    content = {"application/json": {"schema": schema or {"type": "object"}}}
    return {"description": description, "content": content}


def _q(name: str, required: bool, schema: dict, description: str = "") -> dict:
    p = {"name": name, "in": "query", "required": required, "schema": schema}
    return p | ({"description": description} if description else {})


def _TIME(name: str, default: str) -> dict:
    return _q(name, False, {"type": "string", "default": default},
              "now, a duration back from now (15m, 1h, 7d), seconds since the epoch, or ISO 8601")


OPENAPI: dict = {
    "openapi": "3.0.3",
    "info": {"title": "edgeloop aggregator", "version": "1",
             "description": "Prometheus metrics, the fleet registry, time series, alerts and the dashboard."},
    "paths": {
        "/metrics": {"get": {"summary": "Prometheus metrics (text exposition format)", "responses": {
            "200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _ok("OpenAPI 3 document")}}},
        "/api/health": {"get": {"summary": "Whether ingest is connected and its writer alive", "responses": {
            "200": _ok("Healthy", {"$ref": "#/components/schemas/Health"}),
            "503": _ok("Unhealthy (broker unreachable or writer stopped)", {"$ref": "#/components/schemas/Health"})}}},
        "/api/fleet": {"get": {"summary": "Every device in the registry", "responses": {
            "200": _ok("Registry records, sorted by device id", {"$ref": "#/components/schemas/Fleet"})}}},
        "/api/devices/{device}": {"get": {
            "summary": "One device's registry record",
            "parameters": [{"name": "device", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": wire.DEVICE_ID_PATTERN}}],
            "responses": {"200": _ok("The record", {"type": "object", "properties": {
                              "now": {"type": "number"}, "device": {"$ref": "#/components/schemas/DeviceRecord"}}}),
                          "400": _ERROR, "404": _ERROR}}},
        "/api/quarantine": {"get": {
            "summary": "The most recent quarantined messages, newest first",
            "parameters": [{"name": "limit", "in": "query", "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": QUARANTINE_MAX_LIMIT,
                                       "default": QUARANTINE_DEFAULT_LIMIT}}],
            "responses": {"200": _ok("Entries and counts by reason", {"$ref": "#/components/schemas/Quarantine"}),
                          "400": _ERROR}}},
    "/api/series": {"get": {
        "summary": f"One field of one device over time, downsampled to at most {MAX_POINTS} points",
        "parameters": [_q("device", True, {"type": "string", "pattern": wire.DEVICE_ID_PATTERN}),
                       _q("field", True, {"type": "string", "pattern": wire.NAME_PATTERN},
                          "a telemetry channel, a feature name, or score / latency_us of inference"),
                       _q("measurement", False, {"type": "string", "enum": list(MEASUREMENTS), "default": "telemetry"}),
                       _q("agg", False, {"type": "string", "enum": ["mean", "min", "max"], "default": "mean"}),
                       _TIME("since", "1h"), _TIME("until", "now"),
                       _q("every", False, {"type": "string"}, "interval (500ms, 90s, 1m, or seconds); default: "
                          f"the smallest of 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30 s, 1, 2, 5, 10, 15, 30 min, 1 h ... "
                          f"giving at most {MAX_POINTS} points")],
        "responses": {"200": _ok("Points [time, value] by time, time the interval's start",
                                 {"$ref": "#/components/schemas/Series"}), "400": _ERROR, "503": _ERROR}}},
    "/api/fields": {"get": {
        "summary": "What can be charted for a device: channels, features, inference fields",
        "parameters": [_q("device", True, {"type": "string", "pattern": wire.DEVICE_ID_PATTERN})],
        "responses": {"200": _ok("Field names per measurement"), "400": _ERROR, "503": _ERROR}}},
    "/api/timeline": {"get": {
        "summary": "Model-version changes and alerts of a device, to mark on its charts",
        "parameters": [_q("device", True, {"type": "string", "pattern": wire.DEVICE_ID_PATTERN}),
                       _TIME("since", "1h"), _TIME("until", "now")],
        "responses": {"200": _ok("First champion verdict of each model version, and alerts"),
                      "400": _ERROR, "503": _ERROR}}},
    "/api/alerts": {"get": {
        "summary": "The alert feed, newest first, with acknowledgement and silence state",
        "parameters": [_q("device", False, {"type": "string", "pattern": wire.DEVICE_ID_PATTERN}),
                       _TIME("since", "7d"), _TIME("until", "now"),
                       _q("limit", False, {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100})],
        "responses": {"200": _ok("Alerts and the silences in force", {"type": "object", "properties": {
            "now": {"type": "number"}, "alerts": {"type": "array", "items": {"$ref": "#/components/schemas/Alert"}},
            "silences": {"type": "array", "items": {"$ref": "#/components/schemas/Silence"}}}}),
            "400": _ERROR, "503": _ERROR}}},
    "/api/alerts/{alert_id}/ack": {"post": {
        "summary": "Acknowledge an alert (needs the bearer token)", "security": [{"bearer": []}],
        "parameters": [{"name": "alert_id", "in": "path", "required": True, "schema": {"type": "string"},
                        "description": "DEVICE:SEQ"}],
        "responses": {"200": _ok("When it was first acknowledged"), "400": _ERROR, "401": _ERROR, "403": _ERROR}}},
    "/api/silences": {
        "get": {"summary": "The silences in force", "responses": {"200": _ok("Silences")}},
        "post": {"summary": "Mute a device, a rule, or a rule on a device until a time (needs the bearer token)",
                 "security": [{"bearer": []}],
                 "requestBody": {"required": True, "content": {"application/json": {"schema": {
                     "type": "object", "required": ["until"], "properties": {
                         "device": {"type": "string"}, "rule": {"type": "string"},
                         "until": {"oneOf": [{"type": "number"}, {"type": "string"}],
                                   "description": "seconds since the epoch, or a duration from now (\"2h\")"}}}}}},
                 "responses": {"201": _ok("The silence", {"$ref": "#/components/schemas/Silence"}),
                               "400": _ERROR, "401": _ERROR, "403": _ERROR}}},
    "/api/silences/{silence_id}": {"delete": {
        "summary": "End a silence (needs the bearer token)", "security": [{"bearer": []}],
        "parameters": [{"name": "silence_id", "in": "path", "required": True, "schema": {"type": "integer"}}],
        "responses": {"200": _ok("Deleted"), "400": _ERROR, "401": _ERROR, "403": _ERROR, "404": _ERROR}}},
    "/api/events": {"get": {
        "summary": "For polling clients: device presence now, and alerts since a time",
        "parameters": [_TIME("since", "60s")],
        "responses": {"200": _ok("Devices and new alerts"), "400": _ERROR, "503": _ERROR}}},
    "/": {"get": {"summary": "The web dashboard (static; its files under /dashboard/)", "responses": {
        "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
    },
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                   "description": "[http] token of the aggregator configuration"}},
                   "schemas": {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "Health": {"type": "object", "properties": {
            "ok": {"type": "boolean"}, "store": {"type": "string"}, "mqtt_connected": {"type": "boolean"},
            "writer_alive": {"type": "boolean"}, "waiting": {"type": "integer"}}},
        "DeviceRecord": {"type": "object", "additionalProperties": True, "required": ["device", "state"],
                         "description": "aggregator.registry.DeviceRecord, every field as stored",
                         "properties": {"device": {"type": "string"}, "state": {"type": "string"},
                                        "profile": {"type": "string"}, "last_seen": {"type": "number"}}},
        "Fleet": {"type": "object", "properties": {
            "now": {"type": "number", "description": "aggregator clock, the one last_seen is on"},
            "anomalies": {"type": "object", "description": "champion anomalies per device over the last window_s "
                          "seconds (counts null when the store cannot answer)", "properties": {
                              "window_s": {"type": "number"},
                              "counts": {"type": "object", "nullable": True,
                                         "additionalProperties": {"type": "integer"}}}},
            "devices": {"type": "array", "items": {"$ref": "#/components/schemas/DeviceRecord"}}}},
        "Series": {"type": "object", "properties": {
            "device": {"type": "string"}, "field": {"type": "string"}, "measurement": {"type": "string"},
            "agg": {"type": "string"}, "since": {"type": "number"}, "until": {"type": "number"},
            "every": {"type": "number"},
            "points": {"type": "array", "maxItems": MAX_POINTS,
                       "items": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}}}},
        "Alert": {"type": "object", "properties": {
            "id": {"type": "string"}, "device": {"type": "string"}, "seq": {"type": "integer"},
            "time": {"type": "number"}, "profile": {"type": "string"}, "rule": {"type": "string"},
            "severity": {"type": "string"}, "value": {"type": "number"}, "message": {"type": "string"},
            "acked_at": {"type": "number", "nullable": True}, "silenced_by": {"type": "integer", "nullable": True}}},
        "Silence": {"type": "object", "properties": {
            "id": {"type": "integer"}, "device": {"type": "string", "nullable": True},
            "rule": {"type": "string", "nullable": True}, "until": {"type": "number"}, "created": {"type": "number"}}},
        "Quarantine": {"type": "object", "properties": {
            "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
            "entries": {"type": "array", "items": {"type": "object", "properties": {
                "at": {"type": "number"}, "topic": {"type": "string"}, "reason": {"type": "string"},
                "detail": {"type": "string"},
                "payload": {"type": "string", "description": f"first {PAYLOAD_PREVIEW_BYTES} bytes as UTF-8, "
                            "invalid bytes replaced by U+FFFD"},
                "payload_bytes": {"type": "integer"}, "payload_truncated": {"type": "boolean"}}}}}},
    }},
}


# -- serving --------------------------------------------------------------------------------------


class HttpServer:
    """uvicorn serving ``app`` on ``host:port`` from a daemon thread; ``port=0`` picks a free port.

    The socket is bound in :meth:`start` (so a taken port fails there, naming it) and handed to
    uvicorn; :attr:`port` is the bound port.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 8080) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def start(self, timeout: float = 10.0) -> int:
        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this: without it a response written as headers + body waits
        # for the client's delayed ACK (40 ms on Linux) before the body goes out (measured: bench/api.py).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as exc:
            sock.close()
            close_app(self.app)
            raise OSError(exc.errno, f"cannot serve HTTP on {self.host}:{self.requested_port}: {exc.strerror}"
                          " (set [http] port, or 0 for any free port)") from None
        sock.listen(128)
        sock.set_inheritable(True)
        self._sock = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name=f"http-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server on {self.host}:{self.port} did not start")
            time.sleep(0.01)
        log.info("HTTP on http://%s:%d (metrics, fleet API)", self.host, self.port)
        return self.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        """Ask uvicorn to finish (open requests get ``timeout_graceful_shutdown``) and join it."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("HTTP server thread did not stop within %.1fs", timeout)
        if self._sock is not None:
            self._sock.close()
        close_app(self.app)  # after the last request: none may read a closed alert book
        self._server = self._thread = self._sock = None
