"""Fault labels by hand: ``edgeloop models labels add|list|delete`` and ``/api/labels``.

The CLI runs through click's runner on a temporary data directory; the API runs on a real
uvicorn server (urllib, no test client) over an aggregator that is built but not started (no
broker needed), whose ``labels`` is the LabelStore in that same data directory, so the two
paths are checked against each other as well as on their own. Label arithmetic
(``window_labels``) is tested with training, in tests/test_training.py.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from click.testing import CliRunner

from aggregator.labels import LabelStore
from edgeloop.cli import main

TOKEN = "label-token"
START, END = "2026-01-01T00:00:00", "2026-01-01T02:00:00"
T_START, T_END = 1_767_225_600.0, 1_767_232_800.0  # the same two times in seconds since the epoch


def _cli(*args: str, data_dir) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["models", "labels", *args, "--data-dir", str(data_dir)])
    return result.exit_code, result.output


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_adds_lists_and_deletes_labels_in_the_data_dir(tmp_path):
    code, out = _cli("add", "pump-1", "--start", START, "--end", END, "--kind", "bearing_wear",
                     "--note", "replaced the bearing", data_dir=tmp_path)
    assert code == 0, out
    assert "label 1: pump-1 2026-01-01 00:00:00Z .. 2026-01-01 02:00:00Z bearing_wear (replaced the bearing)" in out
    code, out = _cli("add", "pump-2", "--start", str(T_START), "--end", str(T_END + 60), "--kind", "maintenance",
                     data_dir=tmp_path)
    assert code == 0 and "label 2: pump-2" in out, out

    with LabelStore.in_data_dir(tmp_path) as store:  # where the aggregator and `train --supervised` read
        assert [(lb.id, lb.device, lb.start, lb.end, lb.kind) for lb in store.list()] == [
            (1, "pump-1", T_START, T_END, "bearing_wear"), (2, "pump-2", T_START, T_END + 60, "maintenance")]

    code, out = _cli("list", data_dir=tmp_path)
    assert code == 0 and out.splitlines()[0].split() == ["ID", "DEVICE", "START", "END", "KIND", "NOTE"]
    assert "bearing_wear" in out and "replaced the bearing" in out and "pump-2" in out
    code, out = _cli("list", "--device", "pump-1", "--json", data_dir=tmp_path)
    assert code == 0 and json.loads(out) == [{"id": 1, "device": "pump-1", "start": T_START, "end": T_END,
                                              "kind": "bearing_wear", "note": "replaced the bearing"}]

    code, out = _cli("delete", "1", data_dir=tmp_path)
    assert (code, out.strip()) == (0, "deleted label 1")
    code, out = _cli("delete", "1", data_dir=tmp_path)
    assert code == 1 and "no label 1 in" in out
    code, out = _cli("list", "--device", "pump-1", data_dir=tmp_path)
    assert code == 0 and "no labels of pump-1" in out


def test_cli_accepts_ages_for_recent_windows(tmp_path):
    before = time.time()
    code, out = _cli("add", "pump-1", "--start", "3h", "--end", "1h", "--kind", "overheat", data_dir=tmp_path)
    assert code == 0, out
    with LabelStore.in_data_dir(tmp_path) as store:
        (label,) = store.list()
    assert before - 3 * 3600 - 1 <= label.start <= time.time() - 3 * 3600
    assert label.end - label.start == pytest.approx(7200, abs=1)


@pytest.mark.parametrize("args, code, needle", [
    (["pump-1", "--start", END, "--end", START, "--kind", "x"], 1, "must be before end"),
    (["pump-1", "--start", START, "--end", END, "--kind", "9lives"], 1, "invalid label kind '9lives'"),
    (["bad id,x", "--start", START, "--end", END, "--kind", "x"], 1, "bad id,x"),
    (["pump-1", "--start", "yesterday", "--end", END, "--kind", "x"], 2, "--start"),
    (["pump-1", "--start", START, "--end", END], 2, "--kind"),
])
def test_cli_refuses_bad_labels_naming_what_is_wrong(tmp_path, args, code, needle):
    got, out = _cli("add", *args, data_dir=tmp_path)
    assert got == code and needle in out, out
    with LabelStore.in_data_dir(tmp_path) as store:
        assert store.list() == []


def test_cli_list_refuses_a_bad_device_and_delete_a_bad_id(tmp_path):
    code, out = _cli("list", "--device", "bad id", data_dir=tmp_path)
    assert code == 1 and "bad id" in out
    code, out = _cli("delete", "zero", data_dir=tmp_path)
    assert code == 2 and "ID" in out


# -- HTTP API -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """(base URL, data dir) of the HTTP app of an unstarted aggregator with token TOKEN."""
    from aggregator.http import HttpServer, make_app
    from aggregator.service import Aggregator, AggregatorConfig, MqttSettings
    from aggregator.stores import make_store

    tmp = tmp_path_factory.mktemp("labels-api")
    store = make_store(sqlite_path=str(tmp / "store.sqlite"))
    store.open()
    agg = Aggregator(AggregatorConfig(data_dir=str(tmp), mqtt=MqttSettings(url="mqtt://127.0.0.1:1")), store=store)
    server = HttpServer(make_app(agg, token=TOKEN), port=0)
    server.start()
    try:
        yield server.url, tmp
    finally:
        server.stop()
        agg.quarantine.close()
        agg.labels.close()
        store.close()


def _call(url: str, method: str = "GET", body=None, token: str | None = TOKEN) -> tuple[int, dict]:
    """(status, JSON body); ``body`` bytes go as they are, anything else as JSON."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        assert exc.headers.get("Content-Type", "").startswith("application/json"), (url, exc.code)
        return exc.code, json.loads(exc.read())


def test_api_adds_lists_and_deletes_labels_shared_with_the_cli(api):
    base, data_dir = api
    status, label = _call(base + "/api/labels", "POST", {"device": "api-1", "start": T_START, "end": T_END,
                                                         "kind": "bearing_wear", "note": "from the API"})
    assert status == 201, label
    assert {k: label[k] for k in ("device", "start", "end", "kind", "note")} == {
        "device": "api-1", "start": T_START, "end": T_END, "kind": "bearing_wear", "note": "from the API"}
    status, other = _call(base + "/api/labels", "POST", {"device": "api-2", "start": START + "Z", "end": "now",
                                                         "kind": "maintenance"})
    assert status == 201 and other["start"] == T_START and abs(other["end"] - time.time()) < 60, other

    status, body = _call(base + "/api/labels", token=None)  # reading needs no token
    assert status == 200 and [lb["id"] for lb in body["labels"]] == [label["id"], other["id"]]
    assert _call(base + "/api/labels?device=api-2")[1]["labels"] == [other]
    # Overlapping [since, until): api-1's window ends at T_END, api-2's runs on to now.
    assert _call(base + f"/api/labels?since={T_END}")[1]["labels"] == [other]
    assert _call(base + f"/api/labels?until={T_START + 1}&since=")[1]["labels"] == [label, other]

    code, out = _cli("list", "--json", data_dir=data_dir)  # the CLI reads the same file ...
    assert code == 0 and [lb["device"] for lb in json.loads(out)] == ["api-1", "api-2"]
    assert _cli("delete", str(other["id"]), data_dir=data_dir)[0] == 0  # ... and its deletes show in the API
    assert _call(base + "/api/labels")[1]["labels"] == [label]

    assert _call(base + f"/api/labels/{label['id']}", "DELETE") == (200, {"deleted": label["id"]})
    status, body = _call(base + f"/api/labels/{label['id']}", "DELETE")
    assert status == 404 and body["error"] == f"no label {label['id']}"
    assert _call(base + "/api/labels")[1]["labels"] == []


def test_api_control_routes_need_the_token(api):
    base, _ = api
    good = {"device": "api-3", "start": T_START, "end": T_END, "kind": "x"}
    status, body = _call(base + "/api/labels", "POST", good, token=None)
    assert status == 401 and "Authorization: Bearer" in body["error"]
    assert _call(base + "/api/labels", "POST", good, token="wrong")[0] == 403
    assert _call(base + "/api/labels/1", "DELETE", token=None)[0] == 401
    assert _call(base + "/api/labels/1", "DELETE", token="wrong")[0] == 403
    assert _call(base + "/api/labels?device=api-3")[1]["labels"] == []


@pytest.mark.parametrize("body, needle", [
    (b"{not json", "body is not JSON"),
    ([1, 2], "body must be a JSON object"),
    ({}, "missing field(s) ['device', 'start', 'end', 'kind']"),
    ({"device": "d", "start": 1, "end": 2, "kind": "x", "colour": "red"}, "unknown field(s) ['colour']"),
    ({"device": "d", "start": 2, "end": 1, "kind": "x"}, "must be before end"),
    ({"device": "d", "start": 1, "end": 2, "kind": "9lives"}, "invalid label kind"),
    ({"device": "bad id,x", "start": 1, "end": 2, "kind": "x"}, "bad id,x"),
    ({"device": 7, "start": 1, "end": 2, "kind": "x"}, "'device' must be a non-empty string"),
    ({"device": "d", "start": "yesterday", "end": 2, "kind": "x"}, "invalid start 'yesterday'"),
    ({"device": "d", "start": True, "end": 2, "kind": "x"}, "'start' must be seconds since the epoch"),
    ({"device": "d", "start": 1, "end": 2, "kind": "x", "note": 5}, "invalid label note"),
    ({"device": "d", "start": 1, "end": 2, "kind": "x", "note": "n" * 1001}, "invalid label note"),
    (b'{"device": "d", "start": 1, "end": 1e400, "kind": "x"}', "invalid label end inf"),
    (b'{"device": "d", "start": 1, "end": 1' + b"0" * 400 + b', "kind": "x"}', "'end' is out of range"),
    (b'{"device": "d", "start": NaN, "end": 2, "kind": "x"}', "invalid label start nan"),
])
def test_api_refuses_bad_labels_with_a_400_naming_why(api, body, needle):
    base, _ = api
    status, answer = _call(base + "/api/labels", "POST", body)
    assert status == 400 and needle in answer["error"], answer
    assert _call(base + "/api/labels?device=d")[1]["labels"] == []


def test_api_bad_queries_ids_and_bodies_are_4xx(api):
    base, _ = api
    assert "bad id" in _call(base + "/api/labels?device=bad%20id")[1]["error"]
    status, body = _call(base + "/api/labels?since=soon")
    assert status == 400 and "invalid since 'soon'" in body["error"]
    assert _call(base + f"/api/labels?since={T_END}&until={T_START}")[0] == 400
    for bad in ("x", "-1", "1.5", "%C2%B2"):  # "²" is a digit to str.isdigit, not to int()
        status, body = _call(base + f"/api/labels/{bad}", "DELETE")
        assert status == 400 and "invalid label id" in body["error"], (bad, body)
    assert _call(base + "/api/labels", "POST", b"{" + b" " * 70_000 + b"}")[0] == 413
    assert _call(base + "/api/labels", "PUT", {})[0] == 405


def test_openapi_documents_the_label_routes(api):
    base, _ = api
    paths = _call(base + "/openapi.json")[1]["paths"]
    assert set(paths["/api/labels"]) == {"get", "post"} and set(paths["/api/labels/{label_id}"]) == {"delete"}
    assert paths["/api/labels"]["post"]["security"] == [{"bearer": []}]
    assert {"400", "401", "403", "404"} <= set(paths["/api/labels/{label_id}"]["delete"]["responses"])
