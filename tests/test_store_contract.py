"""The store contract (aggregator/stores/base.py), run against every store that runs here.

One set of cases, parametrised over the embedded SQLite store (in a tmp dir) and InfluxDB 1.6.7
(the session ``influxdb`` server, a fresh database per test, marked ``influxdb``). Store-specific
behaviour (InfluxDB partial writes, outages, auth and the v2 write path; SQLite durability,
retention and size cap) follows the contract cases.
"""

from __future__ import annotations

import json
import random
import socket
import sqlite3
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import urllib3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.stores import InfluxStore, Retention, SQLiteStore, Store, StoreError
from aggregator.stores import StoreUnavailable
from aggregator.stores.lineproto import encode_batch
from edgeloop.wire import Alert, Features, Inference, Reading, Status, Telemetry
from tests.services import InfluxServer

KINDS = ("telemetry", "features", "inference", "alert", "status")
#: The test data is from 2023: keep it, whatever the default retention.
KEEP = Retention(raw_duration="INF", long_duration="INF")


class SQLiteBackend:
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "store.sqlite"

    def make(self, **kw) -> Store:
        return SQLiteStore(str(self.path), **kw)

    def exists(self) -> bool:
        if not self.path.exists():
            return False
        with sqlite3.connect(self.path) as db:
            tables = db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
        return ("telemetry",) in tables

    def alert_messages(self, device: str) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        with sqlite3.connect(self.path) as db:
            for seq, message in db.execute(
                "SELECT seq, message FROM alerts WHERE device=?", (device,)
            ):
                out.setdefault(seq, []).append(message)
        return out

    def schema(self) -> set[str]:
        with sqlite3.connect(self.path) as db:
            return {
                f"{t}.{c}"
                for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
                for c in (r[1] for r in db.execute(f"PRAGMA table_info({t})"))
            }

    def cleanup(self) -> None:
        pass


class InfluxBackend:
    def __init__(self, server) -> None:
        self.server = server
        self.database = server.new_database("store")

    def make(self, **kw) -> Store:
        return InfluxStore(self.server.url, self.database, **{"retention": KEEP, **kw})

    def exists(self) -> bool:
        result = self.server.query(None, "SHOW DATABASES")["results"][0]
        return [self.database] in result["series"][0].get("values", [])

    def _rows(self, influxql: str) -> list[list]:
        result = self.server.query(self.database, influxql)["results"][0]
        assert "error" not in result, result
        return [row for s in result.get("series", []) for row in s.get("values") or []]

    def alert_messages(self, device: str) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for _, seq, message in self._rows(
            f"SELECT seq, message FROM alerts WHERE device='{device}'"
        ):
            out.setdefault(seq, []).append(message)
        return out

    def schema(self) -> set[str]:
        names = {r[0] for r in self._rows("SHOW MEASUREMENTS")}
        fields = {f"alerts.{r[0]}:{r[1]}" for r in self._rows("SHOW FIELD KEYS FROM alerts")}
        tags = {f"alerts.tag.{r[0]}" for r in self._rows("SHOW TAG KEYS FROM alerts")}
        return names | fields | tags

    def cleanup(self) -> None:
        self.server.query(None, f'DROP DATABASE "{self.database}"')


@pytest.fixture(params=["sqlite", pytest.param("influxdb", marks=pytest.mark.influxdb)])
def backend(request, tmp_path):
    b = (
        SQLiteBackend(tmp_path)
        if request.param == "sqlite"
        else InfluxBackend(request.getfixturevalue("influxdb"))
    )
    yield b
    b.cleanup()


@pytest.fixture
def store(backend):
    s = backend.make()
    s.open()
    yield s
    s.close()


def telemetry(
    device, seq, t0, n=50, channels=("temp", "vib", "rpm", "amps"), rng=None, none_every=0
):
    rng = rng or random.Random(seq)
    readings = []
    for k in range(n):
        values = [
            rng.choice([rng.gauss(0, 50), 1e300, -5e-324, 0.1, 123456789.123]) for _ in channels
        ]
        if none_every and k % none_every == 0:
            values[k % len(channels)] = None
        readings.append(Reading(t0 + k * 0.01, values, k % 4))
    return Telemetry(
        v=1,
        device=device,
        seq=seq,
        ts=t0,
        profile="pump",
        channels=list(channels),
        readings=readings,
    )


def inference(device, seq, t, anomaly, role="champion"):
    return Inference(
        v=1,
        device=device,
        seq=seq,
        ts=t,
        model_version="m1",
        feature_set="fs1",
        window_end=t,
        score=-0.5 if anomaly else 0.5,
        anomaly=anomaly,
        latency_us=15.0,
        role=role,
    )


def mixed_batch(device, seq0=1, t0=1_700_000_000.0):
    return [
        telemetry(device, seq0, t0, none_every=7),
        telemetry(device, seq0 + 1, t0 + 1),
        Features(
            v=1,
            device=device,
            seq=seq0 + 2,
            ts=t0 + 1,
            feature_set="fs1",
            window_start=t0,
            window_end=t0 + 1,
            names=["temp_mean", "temp_std"],
            values=[20.5, 0.25],
        ),
        inference(device, seq0 + 3, t0 + 1, anomaly=True),
        inference(device, seq0 + 4, t0 + 1, anomaly=True, role="shadow"),
        inference(device, seq0 + 5, t0 + 2, anomaly=False),
        Alert(
            v=1,
            device=device,
            seq=seq0 + 6,
            ts=t0 + 1,
            rule="too_hot",
            severity="warning",
            value=80.0,
            window_end=t0 + 1,
            message="temp 80 > 75",
        ),
        Status(v=1, device=device, seq=seq0 + 6, ts=t0 + 3, state="online", model_version="m1"),
    ]


def expected_rows(messages):
    return {
        (m.device, m.seq, k): (
            round(r.t * 1e6),
            {c: v for c, v in zip(m.channels, r.values) if v is not None},
            r.flags,
        )
        for m in messages
        if isinstance(m, Telemetry)
        for k, r in enumerate(m.readings)
    }


def stored_rows(store, device, start=None, end=None):
    rows = store.telemetry(device, start, end)
    assert [r.t for r in rows] == sorted(r.t for r in rows), "telemetry must come back by time"
    assert all(r.device == device for r in rows)
    return {(r.device, r.seq, r.idx): (round(r.t * 1e6), r.values, r.flags) for r in rows}


# -- the contract -------------------------------------------------------------------------------


def test_open_creates_the_database_and_can_repeat(backend):
    assert not backend.exists()
    with backend.make() as first:
        assert backend.exists()
        assert first.count("telemetry") == 0
    with backend.make() as again:
        assert again.write(mixed_batch("d1")).rejected == []


def test_write_then_read_back_every_reading_exactly(store):
    batch = mixed_batch("pump-1")
    assert store.write(batch).rejected == []
    assert stored_rows(store, "pump-1") == expected_rows(batch)  # floats compared exactly


def test_repeated_batch_leaves_one_copy_with_the_same_values(store):
    batch = mixed_batch("pump-1")
    store.write(batch)
    first = stored_rows(store, "pump-1")
    counts = {kind: store.count(kind) for kind in KINDS}
    assert store.write(batch).rejected == []
    assert store.write(batch[1:3] + batch[:1]).rejected == []
    assert stored_rows(store, "pump-1") == first
    assert {kind: store.count(kind) for kind in KINDS} == counts


def test_counts_per_kind_and_device(store):
    store.write(
        mixed_batch("a")
        + mixed_batch("b", seq0=100, t0=1_700_000_100.0)
        + mixed_batch("b", seq0=200, t0=1_700_000_200.0)
    )
    per_batch = {"telemetry": 100, "features": 1, "inference": 3, "alert": 1, "status": 1}
    for kind, n in per_batch.items():
        got = (store.count(kind), store.count(kind, "a"), store.count(kind, "b"))
        assert got == (3 * n, n, 2 * n), kind
    assert store.count("telemetry", "nobody") == 0
    with pytest.raises(ValueError, match="unknown kind"):
        store.count("readings")


def test_anomaly_count_counts_champion_anomalies_only(store):
    t = 1_700_000_000.0
    store.write(
        [
            inference("a", 1, t, True),
            inference("a", 2, t + 1, True),
            inference("a", 3, t + 2, False),
            inference("a", 4, t + 3, True, role="shadow"),
            inference("b", 1, t, True),
        ]
    )
    assert (
        store.anomaly_count(),
        store.anomaly_count("a"),
        store.anomaly_count("b"),
        store.anomaly_count("c"),
    ) == (3, 2, 1, 0)


def test_time_range_is_start_inclusive_end_exclusive(store):
    t0 = 1_700_000_000.0
    batch = [telemetry("d1", 1, t0, n=100)]
    store.write(batch)
    got = stored_rows(store, "d1", t0 + 0.25, t0 + 0.5)
    assert sorted(k[2] for k in got) == list(range(25, 50))
    assert got == {k: v for k, v in expected_rows(batch).items() if 25 <= k[2] < 50}
    assert len(stored_rows(store, "d1", start=t0 + 0.9)) == 10
    assert len(stored_rows(store, "d1", end=t0 + 0.1)) == 10


def test_two_devices_do_not_mix(store):
    t0 = 1_700_000_000.0  # same seqs, same timestamps, same profile: only the device differs
    a, b = (
        telemetry("dev-a", 1, t0, rng=random.Random(1)),
        telemetry("dev-b", 1, t0, rng=random.Random(2)),
    )
    store.write([a, b])
    assert stored_rows(store, "dev-a") == expected_rows([a])
    assert stored_rows(store, "dev-b") == expected_rows([b])


def test_none_values_are_omitted(store):
    m = Telemetry(
        v=1,
        device="d1",
        seq=1,
        ts=10.0,
        channels=["x", "y"],
        readings=[
            Reading(10.0, [1.0, None]),
            Reading(10.5, [None, None]),
            Reading(11.0, [None, 2.5]),
        ],
    )
    store.write([m])
    assert [r.values for r in store.telemetry("d1")] == [{"x": 1.0}, {}, {"y": 2.5}]


def test_a_refused_message_is_reported_and_the_rest_stored(store):
    t0 = 1_700_000_000.0
    bad = telemetry("d1", 2, t0 + 1, n=3)
    bad.readings[1].values[0] = float("nan")  # a built message; the wire decoder refuses NaN
    batch = [telemetry("d1", 1, t0, n=3), bad, telemetry("d1", 3, t0 + 2, n=3)]
    outcome = store.write(batch)
    assert [i for i, _ in outcome.rejected] == [1] and "non-finite" in outcome.rejected[0][1]
    assert {k[1] for k in stored_rows(store, "d1")} == {1, 3}


hostile = st.text(max_size=300) | st.sampled_from(
    [
        '"',
        "\\",
        '\\"',
        "end\\",
        'x",seq=99i 0\nalerts,device=evil value=1 0',
        "a\nb c=d,e",
        "\x00\x01\x7f",
        "DROP DATABASE x; --",
        "'; DELETE FROM alerts; --",
        "\u202e\U0001f4a5",
    ]
)


def test_hostile_alert_messages_round_trip_without_injection(backend, store):
    store.write(mixed_batch("d1"))
    schema = backend.schema()
    written: dict[int, str] = {}

    @settings(
        max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(messages=st.lists(hostile, min_size=1, max_size=5))
    def write_some(messages):
        batch = []
        for message in messages:
            seq = 1000 + len(written)
            written[seq] = message
            batch.append(
                Alert(
                    v=1,
                    device="d1",
                    seq=seq,
                    ts=1.0,
                    rule="r",
                    severity="info",
                    value=1.0,
                    window_end=1_700_000_000.0 + seq,
                    message=message,
                )
            )
        assert store.write(batch).rejected == []

    write_some()
    stored = backend.alert_messages("d1")
    assert {seq: stored.get(seq) for seq in written} == {seq: [m] for seq, m in written.items()}
    assert store.count("alert") == len(written) + 1
    assert backend.schema() == schema, "a message created a measurement, field, tag or column"


# -- InfluxDB: partial writes, outages, auth ----------------------------------------------------


@pytest.fixture
def influx_db(influxdb):
    database = influxdb.new_database("store")
    yield database
    influxdb.query(None, f'DROP DATABASE "{database}"')


@pytest.mark.influxdb
def test_field_type_conflict_rejects_only_the_conflicting_messages(influxdb, influx_db):
    """A real 1.6.7 partial write: it stores the good points and answers 400 ``partial write``."""
    t0 = 1_700_000_000.0
    with InfluxStore(influxdb.url, influx_db, retention=KEEP) as store:
        assert store.write([telemetry("d1", 1, t0, n=5, channels=("temp",))]).rejected == []
        influxdb.write(
            influx_db,
            f'telemetry,device=d0 pressure=1i,level="high",seq=0i {round(t0 * 1e6)}',
            precision="u",
        )
        # Field types are per shard (7 days here): the conflict needs a time in the same shard.
        probe = f"telemetry,device=d9 pressure=1.5 {round(t0 * 1e6) * 1000}\n".encode()
        status, reason = store._post_lines(probe)
        assert status == 400 and "field type conflict" in reason  # pressure is an integer now
        answers = []  # every (status, reason) the server gave, to see the partial write happen
        post = store._post_lines
        store._post_lines = lambda body: answers.append(post(body)) or answers[-1]
        batch = [telemetry("d1", seq, t0 + seq, n=5, channels=("temp",)) for seq in range(2, 8)]
        batch[1] = telemetry("d1", 3, t0 + 3, n=5, channels=("temp", "pressure"))  # float: refused
        batch[4] = telemetry("d1", 6, t0 + 6, n=5, channels=("level", "temp"))  # a string field
        outcome = store.write(batch)
        assert [i for i, _ in outcome.rejected] == [1, 4]
        status, reason = answers[0]  # the whole batch: 1.6.7 stored all but 2 x 5 points
        assert status == 400 and "partial write" in reason and "dropped=10" in reason
        pressure, level = (reason for _, reason in outcome.rejected)
        assert "partial write" in pressure and "field type conflict" in pressure
        assert 'input field "level"' in level and "already exists as type string" in level
        assert {k[1] for k in stored_rows(store, "d1")} == {1, 2, 4, 5, 7}
        assert stored_rows(store, "d1") == expected_rows(
            [batch[0], batch[2], batch[3], batch[5]]
            + [telemetry("d1", 1, t0, n=5, channels=("temp",))]
        )


@pytest.mark.influxdb
def test_unavailable_while_down_then_the_same_batch_succeeds(influxdb_factory):
    database = influxdb_factory.new_database()
    batch = mixed_batch("d1")
    with InfluxStore(influxdb_factory.url, database, timeout_s=5, retention=KEEP) as store:
        influxdb_factory.stop()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            store.write(batch)
        with pytest.raises(StoreUnavailable):
            InfluxStore(influxdb_factory.url, database).open()
        influxdb_factory.start()
        assert store.write(batch).rejected == []
        assert stored_rows(store, "d1") == expected_rows(batch)


def test_a_server_that_never_answers_times_out_as_unavailable():
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody answers
        store = InfluxStore(f"http://127.0.0.1:{silent.getsockname()[1]}", "db", timeout_s=0.3)
        with pytest.raises(StoreUnavailable):
            store.open()


@pytest.mark.influxdb
def test_gzip_bodies_large_results_and_a_dropped_database(influxdb, influx_db):
    batch = [
        telemetry("d1", seq, 1_700_000_000.0 + 10 * seq, n=1000, channels=("a", "b"))
        for seq in range(12)
    ]
    gzipped = InfluxStore(influxdb.url, influx_db, gzip_min_bytes=1, retention=KEEP)
    with gzipped as store:  # Content-Encoding: gzip
        assert store.write(batch).rejected == []
        # 12,000 rows come back as two chunks of at most 10,000
        assert stored_rows(store, "d1") == expected_rows(batch)
        influxdb.query(None, f'DROP DATABASE "{influx_db}"')
        assert store.write(batch[:1]).rejected == []  # recreated
        assert store.count("telemetry") == 1000


class AuthInflux(InfluxServer):
    """InfluxDB 1.6.7 with ``auth-enabled``; the test servers of tests/services.py run without."""

    def _prepare(self) -> list[str]:
        command = super()._prepare()
        config = self.config_path.read_text()
        self.config_path.write_text(
            config.replace("[http]\n", "[http]\n  auth-enabled = true\n", 1)
        )
        return command


@pytest.mark.influxdb
def test_missing_rights_and_bad_credentials_are_plain_store_errors(influxdb, tmp_path):
    # ``influxdb`` only for its install check (skip or fail); this test runs its own server.
    with AuthInflux(workdir=tmp_path / "influxd") as server:
        http = urllib3.PoolManager(retries=False)

        def admin(q: str) -> None:
            headers = urllib3.make_headers(basic_auth="admin:admin-pw")
            resp = http.request(
                "POST",
                server.url + "/query",
                fields={"q": q},
                encode_multipart=False,
                headers=headers,
            )
            assert resp.status == 200 and b"error" not in resp.data, resp.data

        admin("CREATE USER admin WITH PASSWORD 'admin-pw' WITH ALL PRIVILEGES")
        admin("CREATE USER writer WITH PASSWORD 'writer-pw'")
        with pytest.raises(
            StoreError,
            match=r"'writer' lacks the right to create database 'fresh'.*CREATE DATABASE \"fresh\"",
        ):
            InfluxStore(server.url, "fresh", username="writer", password="writer-pw").open()
        with pytest.raises(StoreError, match="refused user 'writer'.*check the username/password"):
            InfluxStore(server.url, "fresh", username="writer", password="wrong").open()
        admin('CREATE DATABASE "granted"')
        admin('GRANT ALL ON "granted" TO "writer"')
        writer = {"username": "writer", "password": "writer-pw", "retention": KEEP}
        with InfluxStore(server.url, "granted", **writer) as store:
            assert store.write(mixed_batch("d1")).rejected == []
            assert store.count("telemetry") == 100


# -- InfluxDB 2.x/3.x: request shape against a stand-in ----------------------------------------


class StandIn(ThreadingHTTPServer):
    """A loopback HTTP server answering as InfluxDB 2.x documents its API; records requests."""

    def __init__(self, version: str = "v2.7.4", write_status: int = 204) -> None:
        self.version, self.write_status, self.requests = version, write_status, []
        super().__init__(("127.0.0.1", 0), _StandInHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.shutdown()
        super().__exit__(*exc)


class _StandInHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _answer(
        self, status: int, body: bytes = b"", content_type: str = "application/json"
    ) -> None:
        self.send_response(status)
        self.send_header("X-Influxdb-Version", self.server.version)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        query = dict(urllib.parse.parse_qsl(url.query))
        self.server.requests.append((self.command, url.path, query, dict(self.headers), body))
        if url.path == "/ping":
            return self._answer(204)
        if self.headers.get("Authorization") != "Token tok":
            return self._answer(401, b'{"code":"unauthorized","message":"unauthorized access"}')
        if url.path == "/api/v2/buckets":
            bucket = {"id": "b1", "orgID": "o1", "name": query["name"], "retentionRules": []}
            return self._answer(200, json.dumps({"buckets": [bucket]}).encode())
        if url.path == "/api/v2/write":
            if b"device=refused" in body:
                return self._answer(
                    400, b'{"code":"invalid","message":"partial write error (1 written): refused"}'
                )
            return self._answer(
                self.server.write_status,
                b"" if self.server.write_status == 204 else b'{"message":"busy"}',
            )
        if url.path == "/query":
            result = {
                "results": [
                    {
                        "statement_id": 0,
                        "series": [
                            {"name": "alerts", "columns": ["time", "count"], "values": [[0, 4]]}
                        ],
                    }
                ]
            }
            return self._answer(200, json.dumps(result).encode())
        self._answer(404, b'{"code":"not found"}')

    do_GET = do_POST = _handle


def test_v2_writes_go_through_the_v2_api_and_reads_through_influxql():
    """No InfluxDB 2.x server can run here: this checks the requests against the documented
    contract (POST /api/v2/write?org=&bucket=&precision=ns, Token auth, line protocol, 204)."""
    with (
        StandIn() as server,
        InfluxStore(server.url, "telemetry_bucket", token="tok", org="acme") as store,
    ):
        assert store.generation == 2
        batch = mixed_batch("d1") + [mixed_batch("refused")[0]]
        outcome = store.write(batch)
        assert [i for i, _ in outcome.rejected] == [
            len(batch) - 1
        ] and "partial write" in outcome.rejected[0][1]
        writes = [r for r in server.requests if r[1] == "/api/v2/write"]
        method, _, query, headers, body = writes[0]
        assert (method, query) == (
            "POST",
            {"org": "acme", "bucket": "telemetry_bucket", "precision": "ns"},
        )
        assert headers["Authorization"] == "Token tok" and headers["Content-Type"].startswith(
            "text/plain"
        )
        assert body == encode_batch(batch).body()
        assert store.count("alert") == 4
        method, path, query, headers, _ = server.requests[-1]
        assert (method, path, headers["Authorization"]) == ("POST", "/query", "Token tok")
        assert "params" not in query and "db=telemetry_bucket" in server.requests[-1][4].decode()


def test_5xx_is_unavailable_and_generation_comes_from_ping():
    with (
        StandIn(version="3.0.1", write_status=503) as server,
        InfluxStore(server.url, "db", token="tok", org="o") as store,
    ):
        assert store.generation == 3 and not any(r[1] == "/api/v2/buckets" for r in server.requests)
        with pytest.raises(StoreUnavailable):
            store.write(mixed_batch("d1"))
    with StandIn(version="1.8.10") as server, pytest.raises(StoreError):
        InfluxStore(server.url, "db").open()  # 1.x: CREATE DATABASE over /query, unauthorized here


# -- SQLite: durability, retention, size cap ----------------------------------------------------


def test_sqlite_is_wal_with_full_sync(tmp_path):
    with SQLiteStore(str(tmp_path / "s.sqlite")) as store:
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_sqlite_retention_deletes_old_rows(tmp_path):
    now = time.time()
    with SQLiteStore(str(tmp_path / "s.sqlite"), retention_s=3600) as store:
        store.write(mixed_batch("d1", t0=now - 7200) + mixed_batch("d1", seq0=100, t0=now - 60))
        assert store.count("telemetry") == 100 and store.count("status") == 1
        assert {r.seq for r in store.telemetry("d1")} == {100, 101}


def test_sqlite_size_cap_deletes_oldest_telemetry_first(tmp_path):
    with SQLiteStore(str(tmp_path / "s.sqlite"), max_bytes=300_000) as store:
        t0 = 1_700_000_000.0
        for k in range(40):
            assert store.write(mixed_batch("d1", seq0=10 * k, t0=t0 + 10 * k)).rejected == []
        assert store._used_bytes(store._db) <= 300_000
        kept = store.telemetry("d1")
        assert 0 < len(kept) < 40 * 100 and kept[-1].seq == 391  # the newest survive
        assert (store.count("features"), store.count("inference"), store.count("alert")) == (
            40,
            120,
            40,
        )


# -- feature_rows: what training reads (same answers on every store) ----------------------------


def feature_msg(device, seq, t, values, *, flags=0, profile="pump", feature_set="fs1", names=None):
    return Features(
        v=1, device=device, seq=seq, ts=t, profile=profile, feature_set=feature_set,
        window_start=t - 5.0, window_end=t, names=names or ["b_mean", "a_std"], values=values,
        flags=flags,
    )


def test_feature_rows_leave_out_flagged_windows_and_other_profiles(store):
    t0 = 1_700_000_000.0
    batch = [
        feature_msg("d1", 1, t0 + 5, [1.5, 0.25]),
        feature_msg("d2", 1, t0 + 10, [2.5, 0.125]),
        feature_msg("d1", 2, t0 + 15, [99.0, 99.0], flags=4),  # a flagged window
        feature_msg("d1", 3, t0 + 20, [3.5, 1e-300]),
        feature_msg("d3", 1, t0 + 12, [7.0, 7.0], profile="fan"),
        feature_msg("d3", 2, t0 + 13, [8.0, 8.0], feature_set="fs2"),
    ]
    assert store.write(batch).rejected == []
    times, devices, names, X = store.feature_rows("pump", t0, t0 + 100, feature_set="fs1")
    assert names == ["a_std", "b_mean"]  # no names asked for: sorted
    assert devices == ["d1", "d2", "d1"]
    assert times.tolist() == [t0 + 5, t0 + 10, t0 + 20]
    assert X.tolist() == [[0.25, 1.5], [0.125, 2.5], [1e-300, 3.5]]  # exact floats
    assert 99.0 not in X
    rows = store.feature_rows("pump", None, None, feature_set="fs1", exclude_flagged=False,
                              names=["b_mean", "a_std"])
    assert rows.names == ["b_mean", "a_std"] and rows.matrix[:, 0].tolist() == [1.5, 2.5, 99.0, 3.5]
    assert store.feature_rows("fan", None, None, feature_set="fs1").matrix.tolist() == [[7.0, 7.0]]
    assert store.feature_rows("fan", None, None, feature_set="fs2").devices == []


def test_feature_rows_range_limit_and_missing_columns(store):
    t0 = 1_700_000_000.0
    batch = [feature_msg("d1", k, t0 + k, [float(k), -float(k)]) for k in range(1, 11)]
    batch.append(feature_msg("d2", 1, t0 + 4.5, [1.0], names=["b_mean"]))  # lacks a_std
    assert store.write(batch).rejected == []
    rows = store.feature_rows("pump", t0 + 3, t0 + 8, feature_set="fs1", names=["b_mean", "a_std"])
    assert rows.times.tolist() == [t0 + k for k in range(3, 8)]  # [start, end), d2 left out
    newest = store.feature_rows("pump", None, None, feature_set="fs1", names=["b_mean"], limit=3)
    assert newest.matrix[:, 0].tolist() == [8.0, 9.0, 10.0]
    assert newest.matrix.shape == (3, 1)
    empty = store.feature_rows("pump", t0 + 50, t0 + 60, feature_set="fs1")
    assert empty.matrix.shape == (0, 0) and empty.names == [] and empty.times.size == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"profile": "a b"}, "invalid profile"),
        ({"feature_set": "x'; DROP"}, "invalid feature_set"),
        ({"names": ['a" FROM x']}, "invalid feature name"),
        ({"names": ["seq"]}, "invalid feature name"),
        ({"names": ["a", "a"]}, "repeats"),
        ({"limit": 0}, "invalid limit"),
        ({"start": 10.0, "end": 5.0}, "invalid range"),
    ],
)
def test_feature_rows_refuse_bad_arguments(store, kwargs, message):
    args = {"profile": "pump", "start": None, "end": None, "feature_set": "fs1", **kwargs}
    with pytest.raises(ValueError, match=message):
        store.feature_rows(args.pop("profile"), args.pop("start"), args.pop("end"), **args)
