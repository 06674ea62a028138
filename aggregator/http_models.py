"""HTTP routes for models, deployments, rollouts and fault labels, mounted by :mod:`aggregator.http`.

Read routes (no auth, like the rest of the API): ``GET /api/models``, ``GET
/api/models/{profile}/{version}``, ``GET /api/deployments``, ``GET /api/rollouts``, ``GET
/api/labels`` (``?device=&since=&until=``).

Control routes change what the fleet runs, so they need ``Authorization: Bearer <token>``:
``POST /api/rollouts`` (``{"profile", "version", "canary": N}`` or ``"share": F``), ``POST
/api/rollouts/{profile}/promote`` and ``POST /api/rollouts/{profile}/rollback`` (optional body
``{"version": V}``: refused unless it is the running rollout's version). Labels (fault windows
that supervised training and the rollout gate's F1 learn from; ``aggregator.labels``, the same
``<data_dir>/labels.sqlite`` that ``edgeloop models labels`` edits) are added with ``POST
/api/labels`` (``{"device", "start", "end", "kind", "note"?}``) and removed with ``DELETE
/api/labels/{id}``, both control routes. The token check is
:func:`aggregator.http.require_token` (``[http] token``, which may be ``env:NAME``, or
``token_file``); with none configured the control routes answer 403 saying so.

Like http.py: errors are JSON ``{"error": reason}`` with a 4xx status, never a 500 for bad input.
The aggregator provides ``models`` (ModelRegistry), ``registry`` (fleet), ``rollouts``
(RolloutManager), ``labels`` (LabelStore) and optionally ``ota`` (ModelDistributor, for the
desired models per device).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

if TYPE_CHECKING:
    from aggregator.service import Aggregator

__all__ = ["ROUTES", "OPENAPI_PATHS"]

_MAX_BODY = 64 * 1024
_json = msgspec.json.Encoder()


class _JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _json.encode(content)


def _error(status: int, reason: str) -> _JSON:
    return _JSON({"error": reason}, status_code=status)


def _part(agg: "Aggregator", name: str):
    part = getattr(agg, name, None)
    if part is None:
        raise _Refusal(503, f"this aggregator has no {name} (model registry, distribution and rollouts "
                            "need a data directory and a signing key)")
    return part


class _Refusal(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def _authorize(request: Request) -> None:
    """The one bearer-token check of the HTTP port (:func:`aggregator.http.require_token`)."""
    from aggregator.http import require_token

    require_token(request)


async def _body(request: Request) -> dict:
    raw = await request.body()
    if len(raw) > _MAX_BODY:
        raise _Refusal(413, f"body of {len(raw)} bytes; at most {_MAX_BODY}")
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise _Refusal(400, f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _Refusal(400, "body must be a JSON object")
    return data


def _handler(fn):
    """Run ``fn`` turning refusals and rollout/registry errors into JSON 4xx answers."""
    from aggregator.model_registry import RegistryError
    from aggregator.rollout import RolloutError

    async def wrapped(request: Request) -> Response:
        try:
            return await fn(request)
        except _Refusal as exc:
            return _error(exc.status, exc.reason)
        except HTTPException as exc:  # from require_token
            return _JSON({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        except RolloutError as exc:
            return _error(exc.status, str(exc))
        except RegistryError as exc:
            return _error(404 if str(exc).startswith("no model") else 400, str(exc))

    wrapped.__name__ = fn.__name__
    return wrapped


def _manifest_summary(m, champion: str | None) -> dict:
    return {"version": m.version, "champion": m.version == champion, "created": m.created,
            "signed": bool(m.signature), "sha256": m.sha256, "algorithm": m.algorithm,
            "feature_set": m.feature_set, "threshold": m.threshold, "parent_version": m.parent_version,
            "rollback_of": m.rollback_of, "metrics": dict(m.metrics)}


# -- read routes ----------------------------------------------------------------------------------


@_handler
async def _models(request: Request) -> Response:
    registry = _part(request.app.state.aggregator, "models")

    def read() -> dict:
        profiles: dict[str, dict] = {}
        for m in registry.list():
            if m.profile not in profiles:
                profiles[m.profile] = {"champion": registry.champion(m.profile),
                                       "history": registry.history(m.profile), "versions": []}
            profiles[m.profile]["versions"].append(_manifest_summary(m, profiles[m.profile]["champion"]))
        return {"profiles": profiles}

    return _JSON(await run_in_threadpool(read))


@_handler
async def _model(request: Request) -> Response:
    registry = _part(request.app.state.aggregator, "models")
    profile, version = request.path_params["profile"], request.path_params["version"]
    entry = await run_in_threadpool(registry.get, profile, version)
    champion = await run_in_threadpool(registry.champion, profile)
    return _JSON({"champion": entry.version == champion, "manifest": msgspec.to_builtins(entry.manifest)})


@_handler
async def _deployments(request: Request) -> Response:
    agg = request.app.state.aggregator
    ota = getattr(agg, "ota", None)

    def read() -> dict:
        devices = []
        for rec in agg.registry.devices():
            desired = ota.desired(rec.device) if ota is not None else None
            devices.append({
                "device": rec.device, "profile": rec.profile, "state": rec.state, "model_version": rec.model_version,
                "desired": msgspec.to_builtins(desired) if desired is not None else None,
                "versions": msgspec.to_builtins(getattr(rec, "deployments", {})),
            })
        return {"now": time.time(), "devices": devices}

    return _JSON(await run_in_threadpool(read))


@_handler
async def _rollouts(request: Request) -> Response:
    manager = _part(request.app.state.aggregator, "rollouts")
    return _JSON({"rollouts": await run_in_threadpool(manager.statuses)})


# -- control routes -------------------------------------------------------------------------------


def _text(data: dict, key: str, required: bool = True) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise _Refusal(400, f"'{key}' must be a non-empty string" + ("" if required else " when given"))
    return value


@_handler
async def _start(request: Request) -> Response:
    _authorize(request)
    manager = _part(request.app.state.aggregator, "rollouts")
    data = await _body(request)
    unknown = set(data) - {"profile", "version", "canary", "share"}
    if unknown:
        raise _Refusal(400, f"unknown field(s) {sorted(unknown)}; expected profile, version, canary or share")
    profile, version = _text(data, "profile"), _text(data, "version")
    canary, share = data.get("canary"), data.get("share")
    if canary is not None and (isinstance(canary, bool) or not isinstance(canary, int)):
        raise _Refusal(400, f"'canary' must be an integer device count, not {canary!r}")
    if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float))):
        raise _Refusal(400, f"'share' must be a number in (0, 1], not {share!r}")
    status = await run_in_threadpool(lambda: manager.start(profile, version, canary, share=share))
    return _JSON(status, status_code=201)


def _control(action: str):
    @_handler
    async def handler(request: Request) -> Response:
        _authorize(request)
        manager = _part(request.app.state.aggregator, "rollouts")
        data = await _body(request)
        version = _text(data, "version", required=False)
        profile = request.path_params["profile"]
        return _JSON(await run_in_threadpool(getattr(manager, action), profile, version))

    handler.__name__ = f"_{action}"
    return handler


# -- fault labels ---------------------------------------------------------------------------------


def _label_time(data, key: str) -> float | None:
    """Epoch seconds from a number, or from ``now`` / ``2h`` (back from now) / ISO 8601 text."""
    from aggregator.http_api import parse_time

    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise _Refusal(400, f"'{key}' is out of range: {value}") from None
    if not isinstance(value, str) or not value:
        raise _Refusal(400, f"'{key}' must be seconds since the epoch or a time such as \"2h\" or ISO 8601, "
                            f"not {value!r}")
    try:
        return parse_time(value, time.time(), key)
    except ValueError as exc:
        raise _Refusal(400, str(exc)) from None


def _label_dict(label) -> dict:
    return {"id": label.id, "device": label.device, "start": label.start, "end": label.end, "kind": label.kind,
            "note": label.note}


@_handler
async def _labels(request: Request) -> Response:
    store = _part(request.app.state.aggregator, "labels")
    query = {k: v for k, v in request.query_params.items() if v}  # ?since= is no bound
    device = query.get("device")
    since, until = _label_time(query, "since"), _label_time(query, "until")
    try:
        found = await run_in_threadpool(store.list, device, since, until)
    except ValueError as exc:
        raise _Refusal(400, str(exc)) from None
    return _JSON({"labels": [_label_dict(lb) for lb in found]})


@_handler
async def _add_label(request: Request) -> Response:
    _authorize(request)
    store = _part(request.app.state.aggregator, "labels")
    data = await _body(request)
    unknown = set(data) - {"device", "start", "end", "kind", "note"}
    if unknown:
        raise _Refusal(400, f"unknown field(s) {sorted(unknown)}; expected device, start, end, kind and note")
    missing = [k for k in ("device", "start", "end", "kind") if data.get(k) is None]
    if missing:
        raise _Refusal(400, f"missing field(s) {missing}; a label needs device, start, end and kind")
    device, kind = _text(data, "device"), _text(data, "kind")
    start, end = _label_time(data, "start"), _label_time(data, "end")
    note = data.get("note", "")
    try:
        label = await run_in_threadpool(store.add, device, start, end, kind, note)
    except ValueError as exc:  # bad device id, start not before end, kind pattern, note too long
        raise _Refusal(400, str(exc)) from None
    return _JSON(_label_dict(label), status_code=201)


@_handler
async def _delete_label(request: Request) -> Response:
    _authorize(request)
    store = _part(request.app.state.aggregator, "labels")
    raw = request.path_params["label_id"]
    if not raw.isdigit() or not raw.isascii():
        raise _Refusal(400, f"invalid label id {raw!r}: expected a positive integer")
    if not await run_in_threadpool(store.delete, int(raw)):
        raise _Refusal(404, f"no label {raw}")
    return _JSON({"deleted": int(raw)})


ROUTES = [
    Route("/api/models", _models, methods=["GET"]),
    Route("/api/models/{profile}/{version}", _model, methods=["GET"]),
    Route("/api/deployments", _deployments, methods=["GET"]),
    Route("/api/rollouts", _rollouts, methods=["GET"]),
    Route("/api/rollouts", _start, methods=["POST"]),
    Route("/api/rollouts/{profile}/promote", _control("promote"), methods=["POST"]),
    Route("/api/rollouts/{profile}/rollback", _control("rollback"), methods=["POST"]),
    Route("/api/labels", _labels, methods=["GET"]),
    Route("/api/labels", _add_label, methods=["POST"]),
    Route("/api/labels/{label_id}", _delete_label, methods=["DELETE"]),
]

# -- OpenAPI fragments for http.OPENAPI -----------------------------------------------------------

_ERR = {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_OBJ = {"application/json": {"schema": {"type": "object"}}}
_AUTH = [{"bearer": []}]  # the security scheme http.OPENAPI declares
_PROFILE = {"name": "profile", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION_BODY = {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"version": {"type": "string"}}}}}}


_WHEN = {"oneOf": [{"type": "number"}, {"type": "string"}],
         "description": "seconds since the epoch, now, a duration back from now (\"2h\") or ISO 8601"}
_KIND = r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$"
_LABEL = {"type": "object", "properties": {
    "id": {"type": "integer"}, "device": {"type": "string"}, "start": {"type": "number"}, "end": {"type": "number"},
    "kind": {"type": "string"}, "note": {"type": "string"}}}
_LABELS = {"type": "object", "properties": {"labels": {"type": "array", "items": _LABEL}}}


def _ok(text: str, schema: dict | None = None) -> dict:
    return {"description": text, "content": {"application/json": {"schema": schema}} if schema else _OBJ}


OPENAPI_PATHS: dict = {
    "/api/models": {"get": {"summary": "Stored models per profile: versions, champion, history, metrics",
                            "responses": {"200": _ok("{profiles: {profile: {champion, history, versions}}}"),
                                          "503": _ERR}}},
    "/api/models/{profile}/{version}": {"get": {
        "summary": "One stored model's manifest",
        "parameters": [_PROFILE, {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": _ok("{champion, manifest}"), "400": _ERR, "404": _ERR, "503": _ERR}}},
    "/api/deployments": {"get": {"summary": "Per device: desired models and the state reported per version",
                                 "responses": {"200": _ok("{now, devices: [{device, desired, versions}]}")}}},
    "/api/rollouts": {
        "get": {"summary": "Every profile's last rollout",
                "responses": {"200": _ok("{rollouts: [...]}"), "503": _ERR}},
        "post": {"summary": "Start a rollout: the version in shadow on canary devices", "security": _AUTH,
                 "requestBody": {"required": True, "content": {"application/json": {"schema": {
                     "type": "object", "required": ["profile", "version"],
                     "properties": {"profile": {"type": "string"}, "version": {"type": "string"},
                                    "canary": {"type": "integer", "minimum": 1},
                                    "share": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}}}}},
                 "responses": {"201": _ok("The rollout's status"), "400": _ERR, "401": _ERR, "403": _ERR,
                               "404": _ERR, "409": _ERR, "503": _ERR}}},
    "/api/rollouts/{profile}/promote": {"post": {
        "summary": "Skip the gate / the remaining waves / the watch of the running rollout", "security": _AUTH,
        "parameters": [_PROFILE], "requestBody": _VERSION_BODY,
        "responses": {"200": _ok("The rollout's status"), "400": _ERR, "401": _ERR, "403": _ERR, "409": _ERR, "503": _ERR}}},
    "/api/rollouts/{profile}/rollback": {"post": {
        "summary": "Stop the canary, or roll the promoted version back with a signed rollback entry",
        "security": _AUTH, "parameters": [_PROFILE], "requestBody": _VERSION_BODY,
        "responses": {"200": _ok("The rollout's status"), "400": _ERR, "401": _ERR, "403": _ERR, "409": _ERR, "503": _ERR}}},
    "/api/labels": {
        "get": {"summary": "Fault labels (of a device) overlapping [since, until), by device then start",
                "parameters": [{"name": n, "in": "query", "required": False, "schema": {"type": "string"},
                                "description": d} for n, d in (
                    ("device", "only this device"),
                    ("since", "now, a duration back from now (7d), seconds since the epoch, or ISO 8601"),
                    ("until", "same forms"))],
                "responses": {"200": _ok("{labels: [Label]}", _LABELS), "400": _ERR, "503": _ERR}},
        "post": {"summary": "Add a fault label: [start, end) of one device, a kind and a note", "security": _AUTH,
                 "requestBody": {"required": True, "content": {"application/json": {"schema": {
                     "type": "object", "required": ["device", "start", "end", "kind"],
                     "properties": {"device": {"type": "string"}, "start": _WHEN, "end": _WHEN,
                                    "kind": {"type": "string", "pattern": _KIND}, "note": {"type": "string",
                                                                                        "maxLength": 1000}}}}}},
                 "responses": {"201": _ok("The label with its id", _LABEL), "400": _ERR, "401": _ERR, "403": _ERR,
                               "413": _ERR, "503": _ERR}}},
    "/api/labels/{label_id}": {"delete": {
        "summary": "Delete a fault label", "security": _AUTH,
        "parameters": [{"name": "label_id", "in": "path", "required": True, "schema": {"type": "integer"}}],
        "responses": {"200": _ok("{deleted: id}"), "400": _ERR, "401": _ERR, "403": _ERR, "404": _ERR,
                      "503": _ERR}}},
}
