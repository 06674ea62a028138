"""The aggregator's HTTP port: Prometheus ``/metrics`` and a small read-only fleet API.

:func:`make_app` builds a Starlette app over one running :class:`~aggregator.service.Aggregator`;
:class:`HttpServer` serves it with uvicorn on a background thread so the aggregator keeps its
own threads and signal handling, and stops it cleanly (``should_exit``) on shutdown.

Every handler reads the aggregator's live public state (ingest stats, quarantine, registry)
and never writes. Errors are JSON ``{"error": reason}`` with a 4xx status; bad input is
never a 500. The OpenAPI document at ``/openapi.json`` is the hand-kept :data:`OPENAPI`,
which a test keeps equal to the routes.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeloop import wire

if TYPE_CHECKING:
    from aggregator.service import Aggregator

__all__ = ["HttpServer", "make_app", "OPENAPI", "QUARANTINE_MAX_LIMIT", "PAYLOAD_PREVIEW_BYTES"]

log = logging.getLogger(__name__)

QUARANTINE_MAX_LIMIT = 1000
QUARANTINE_DEFAULT_LIMIT = 100
# Quarantined payloads may be far over the wire limit (that is one reason to quarantine them):
# the API shows the head of each, as text, and says how long the whole was.
PAYLOAD_PREVIEW_BYTES = 4096

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
    return JSONResponse(OPENAPI)


def _health(request: Request) -> JSONResponse:
    agg: Aggregator = request.app.state.aggregator
    diag = agg.ingest.diagnostics()
    connected, writer = bool(diag.get("connected")), bool(diag.get("writer_alive"))
    body = {"ok": connected and writer, "store": agg.store.name, "mqtt_connected": connected,
            "writer_alive": writer, "waiting": diag.get("waiting", 0)}
    return JSONResponse(body, status_code=200 if body["ok"] else 503)


def _fleet(request: Request) -> JSONResponse:
    agg: Aggregator = request.app.state.aggregator
    # ``now`` is the aggregator's clock, the one ``last_seen`` is on: clients compute ages from it.
    return JSONResponse({"now": time.time(), "devices": msgspec.to_builtins(agg.registry.devices())})


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
]


def make_app(aggregator: "Aggregator", metrics_registry=None) -> Starlette:
    """The HTTP app over ``aggregator``; metrics from ``metrics_registry`` or a private new one."""
    from aggregator.metrics import make_registry

    app = Starlette(routes=ROUTES, exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.aggregator = aggregator
    app.state.metrics = metrics_registry if metrics_registry is not None else make_registry(aggregator)
    return app


# -- OpenAPI (hand-kept; tests/test_http.py checks it lists exactly the routes above) -------------

_ERROR = {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _ok(description: str, schema: dict | None = None) -> dict:
    content = {"application/json": {"schema": schema or {"type": "object"}}}
    return {"description": description, "content": content}


OPENAPI: dict = {
    "openapi": "3.0.3",
    "info": {"title": "edgeloop aggregator", "version": "1",
             "description": "Prometheus metrics and a read-only view of the fleet registry and quarantine."},
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
    },
    "components": {"schemas": {
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
            "devices": {"type": "array", "items": {"$ref": "#/components/schemas/DeviceRecord"}}}},
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
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as exc:
            sock.close()
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
        self._server = self._thread = self._sock = None
