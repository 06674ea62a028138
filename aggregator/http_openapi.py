"""The OpenAPI 3 document of the aggregator's HTTP API, served at ``/openapi.json``.

Hand-kept next to the handlers of :mod:`aggregator.http_api`; ``make_app`` merges in the paths of
``aggregator.http_models`` (``OPENAPI_PATHS``), and tests/test_http.py checks that the document
lists exactly the app's routes, and that each GET answers with a status it documents.
"""

from __future__ import annotations

from edgeloop import wire
from aggregator.http_api import (MAX_POINTS, MEASUREMENTS, PAYLOAD_PREVIEW_BYTES, QUARANTINE_DEFAULT_LIMIT,
                                 QUARANTINE_MAX_LIMIT)

__all__ = ["OPENAPI"]

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


