"""The aggregator's HTTP port: the app, its error handling and the server thread.

:func:`make_app` builds a Starlette app over one running :class:`~aggregator.service.Aggregator`:
the API routes of :mod:`aggregator.http_api` (``/metrics``, fleet, devices, quarantine, series,
alerts, silences, events), the model, deployment, rollout and label routes of
:mod:`aggregator.http_models` (mounted when that module exists), the OpenAPI document of
:mod:`aggregator.http_openapi` at ``/openapi.json`` (a test keeps it equal to the routes) and the
dashboard (``aggregator/dashboard/``: static HTML, JavaScript and the vendored uPlot, no build
step) at ``/`` and ``/dashboard/``; see docs/dashboard.md. :class:`HttpServer` serves it with
uvicorn on a background thread so the aggregator keeps its own threads and signal handling, and
stops it cleanly (``should_exit``) on shutdown.

Every control action needs the bearer token of ``[http] token``: :func:`require_token` (defined in
``http_api``, importable from here) is the one check. Errors are JSON ``{"error": reason}`` with a
4xx status; bad input is never a 500, and an unknown path or method answers so, in JSON too.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from aggregator.http_api import (DASHBOARD_DIR, MAX_POINTS, PAYLOAD_PREVIEW_BYTES, QUARANTINE_MAX_LIMIT, ROUTES,
                                 JSONResponse, json_error, parse_time, require_token)
from aggregator.http_openapi import OPENAPI

if TYPE_CHECKING:
    from aggregator.service import Aggregator

__all__ = ["HttpServer", "make_app", "close_app", "require_token", "parse_time", "OPENAPI", "QUARANTINE_MAX_LIMIT",
           "PAYLOAD_PREVIEW_BYTES", "MAX_POINTS", "DASHBOARD_DIR"]

log = logging.getLogger(__name__)


# -- error handling -------------------------------------------------------------------------------


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
    return json_error(500, f"internal error: {type(exc).__name__}")


# -- the app --------------------------------------------------------------------------------------


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
