"""The aggregator's HTTP API handlers: fleet, devices, quarantine, series, alerts, silences, events.

:data:`ROUTES` is mounted by :func:`aggregator.http.make_app`. Handlers read the aggregator's live
state (ingest, quarantine, registry) or its store; the only writes are alert acks and silences,
behind :func:`require_token`, the one bearer-token check of every control action (``http_models``
too). Bad parameters answer a JSON ``{"error": reason}`` 400 (:func:`_api`; an unreachable store
503), never a 500. The OpenAPI document of these routes is :mod:`aggregator.http_openapi`.
"""

from __future__ import annotations

import hmac
import logging
import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from edgeloop import wire

if TYPE_CHECKING:
    from aggregator.service import Aggregator

__all__ = ["ROUTES", "JSONResponse", "json_error", "require_token", "parse_time", "parse_duration", "MAX_POINTS",
           "QUARANTINE_MAX_LIMIT", "QUARANTINE_DEFAULT_LIMIT", "PAYLOAD_PREVIEW_BYTES", "DASHBOARD_DIR", "MEASUREMENTS"]

log = logging.getLogger("aggregator.http")

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


def json_error(status: int, reason: str) -> JSONResponse:
    """The API's error answer: ``{"error": reason}`` with a 4xx/5xx ``status``."""
    return JSONResponse({"error": reason}, status_code=status)


# -- handlers (sync: Starlette runs them in its thread pool, off the event loop) -----------------


def _metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


def _openapi(request: Request) -> JSONResponse:
    openapi = getattr(request.app.state, "openapi", None)
    if openapi is None:
        from aggregator.http_openapi import OPENAPI as openapi
    return JSONResponse(openapi)


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
        return json_error(400, f"invalid device id {device!r}: must match {wire.DEVICE_ID_PATTERN}")
    record = agg.registry.get(device)
    if record is None:
        return json_error(404, f"unknown device {device!r}: the registry has not heard from it")
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
            return json_error(400, f"limit must be an integer from 1 to {QUARANTINE_MAX_LIMIT}, not {raw!r}")
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
            return json_error(400, str(exc))
        except StoreError as exc:
            return json_error(503, f"the store cannot answer: {exc}")

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
        return json_error(404, f"no silence {raw}")
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
