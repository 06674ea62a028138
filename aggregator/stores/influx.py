"""InfluxDB store: line protocol in, InfluxQL out, for every InfluxDB generation.

Writes go to ``/write?precision=ns`` on 1.x and through influxdb-client's synchronous v2 write API
on 2.x, 3.x and Cloud (``open()`` reads the generation from ``/ping``). Reads use InfluxQL over
``/query``, which every generation serves, with WHERE values bound through ``params`` and
identifiers only from a fixed whitelist, double-quoted.

A 1.x server that refuses part of a batch (400 ``partial write`` for a field type conflict, an
unparseable line, ...) has already stored the rest. Points are keyed by series and device time, so
writing a message again overwrites it with identical values; the store therefore bisects the
batch, re-writing halves until each refused message stands alone, and reports it with the
server's reason. "Rejected" means "not wholly stored": a telemetry message may have some of its
points stored (the ones the server did not refuse). A 1.x 204 means the points are in the
fsync'ed write-ahead log (``wal-fsync-delay`` 0, the default).

Before encoding, the time guard (``timeguard``) plans every telemetry reading's stored time so that
a device clock that steps back never replaces a stored reading. On 1.x ``open()`` also sets up the
retention policies and the downsampling continuous query (``retention``). The read queries (the
API's, the time guard's and the training set's ``feature_rows``) live in ``influx_queries``.
"""

from __future__ import annotations

import gzip
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlencode

import msgspec
import urllib3

from edgeloop.wire import DeviceMessage

from .base import Store, StoreError, StoreUnavailable, WriteOutcome
from .influx_queries import InfluxQueries
from .lineproto import EncodedBatch, encode_batch
from .retention import Retention, apply_v1
from .timeguard import TimeGuard

__all__ = ["InfluxStore", "DATABASE_PATTERN"]

DATABASE_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$"
_DATABASE_RE = re.compile(DATABASE_PATTERN)
#: HTTP statuses that refuse (part of) a body on its merits: bisect to find the culprits.
_REFUSED = frozenset({400, 413, 422})
_decode_json = msgspec.json.Decoder().decode


def _reason(body: bytes | str, status: int) -> str:
    """The server's error message from a JSON or plain-text error body."""
    if isinstance(body, str):
        body = body.encode()
    try:
        doc = _decode_json(body)
        if isinstance(doc, dict):
            return str(doc.get("error") or doc.get("message") or doc)[:500]
    except msgspec.DecodeError:
        pass
    return (body.decode("utf-8", "replace").strip() or f"HTTP {status}")[:500]


def _generation(version: str) -> int | None:
    """Major version from an ``X-Influxdb-Version`` header ("1.6.7~rc0", "v2.7.4", "3.0.1")."""
    match = re.match(r"v?(\d+)\.", version.strip())
    return int(match.group(1)) if match else None


class InfluxStore(InfluxQueries, Store):
    """Store into InfluxDB ``database`` (a bucket on 2.x/3.x/Cloud) at ``url``.

    Auth: ``username``/``password`` (1.x, sent as basic auth) or ``token`` (sent as
    ``Authorization: Token ...``; 2.x and later need it, with ``org``). Bodies of at least
    ``gzip_min_bytes`` are sent gzip-compressed (None: never). "auto" compresses bodies from 64 KiB
    up unless the server is on loopback, where compressing only costs (1.6.7 over loopback,
    8-channel readings: gzip level 1 took steady-state writes from ~110k to ~90k readings/s).
    Batches go out in requests of at most ``max_lines`` lines (whole messages). ``retention``:
    the retention policies and downsampling set up on 1.x (None: leave the database as it is).
    ``pool_size`` connections are kept open: as many as the ingest's writes in flight, so none is
    opened per write.
    """

    name = "influxdb"

    def __init__(
        self,
        url: str,
        database: str,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        org: str | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        gzip_min_bytes: int | None | str = "auto",
        max_lines: int = 5000,
        pool_size: int = 8,
        retention: Retention | None = Retention(),
    ) -> None:
        if not _DATABASE_RE.fullmatch(database or ""):  # fullmatch: "$" allows a final "\n"
            raise ValueError(f"invalid database name {database!r}: must match {DATABASE_PATTERN}")
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        if token and username:
            raise ValueError("give a token or a username/password, not both")
        self.url = url.rstrip("/")
        self.database = database
        self.org = org
        self.generation: int | None = None
        self.server_version: str | None = None
        self._username, self._password, self._token = username, password, token
        self._timeout_s = timeout_s
        if gzip_min_bytes == "auto":
            host = urllib3.util.parse_url(self.url).host or ""
            loopback = host in ("localhost", "::1", "[::1]") or host.startswith("127.")
            gzip_min_bytes = None if loopback else 64 * 1024
        self._gzip_min = gzip_min_bytes
        self._max_lines = max(1, max_lines)
        self._headers: dict[str, str] = {}
        if token:
            self._headers["Authorization"] = f"Token {token}"
        elif username is not None:
            self._headers.update(urllib3.make_headers(basic_auth=f"{username}:{password}"))
        self._http = urllib3.PoolManager(
            num_pools=2,
            maxsize=pool_size,
            retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=timeout_s),
        )
        self._v2_client: Any = None
        self._v2_write: Any = None
        self.retention = retention
        self.guard = TimeGuard(self._stored_points)
        # Writes whose readings all take the guard's monotonic path run at once (up to the ingest's
        # writes in flight); one that needs the guard to look at the store runs alone: it waits
        # for the writes in flight, and none starts until it is written (see TimeGuard.plan).
        self._write_cond = threading.Condition()
        self._writes_in_flight = 0

    # -- HTTP ---------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kw) -> urllib3.BaseHTTPResponse:
        headers = {**self._headers, **kw.pop("headers", {})}
        if "fields" in kw and method == "POST":
            kw["encode_multipart"] = False  # a form body, as InfluxDB documents /query
        try:
            resp = self._http.request(method, self.url + path, headers=headers, **kw)
        except urllib3.exceptions.HTTPError as exc:
            raise StoreUnavailable(f"InfluxDB at {self.url} unreachable: {exc}") from exc
        if resp.status >= 500:
            reason = _reason(resp.data, resp.status)  # reads (and frees) a streamed body too
            raise StoreUnavailable(f"InfluxDB at {self.url} answered {resp.status}: {reason}")
        return resp

    def _post_lines(self, body: bytes) -> tuple[int, str]:
        """POST line protocol to 1.x ``/write``: (status, reason)."""
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if self._gzip_min is not None and len(body) >= self._gzip_min:
            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        fields = {"db": self.database, "precision": "ns"}
        resp = self._request("POST", "/write?" + urlencode(fields), body=body, headers=headers)
        return resp.status, ("" if resp.status == 204 else _reason(resp.data, resp.status))

    def _post_lines_v2(self, body: bytes) -> tuple[int, str]:
        """Write through influxdb-client's synchronous v2 API: (status, reason)."""
        from influxdb_client.rest import ApiException

        try:
            self._v2_write.write(
                bucket=self.database, org=self.org, record=body, write_precision="ns"
            )
        except ApiException as exc:
            status = exc.status or 0
            if status == 0 or status >= 500:
                raise StoreUnavailable(f"InfluxDB at {self.url}: {exc.reason}") from exc
            return status, _reason(exc.body, status) if exc.body else f"{status} {exc.reason}"
        except urllib3.exceptions.HTTPError as exc:
            raise StoreUnavailable(f"InfluxDB at {self.url} unreachable: {exc}") from exc
        return 204, ""

    # -- open / close -------------------------------------------------------------------------

    def open(self) -> None:
        resp = self._request("GET", "/ping")
        self.server_version = resp.headers.get("X-Influxdb-Version", "")
        generation = _generation(self.server_version)
        if generation is None:  # no header (some proxies, Cloud): the v2 API tells them apart
            generation = 2 if self._request("GET", "/api/v2").status == 200 else 1
        self.generation = generation
        if generation == 1:
            self._create_database_v1()
            if self.retention is not None:
                apply_v1(self, self.retention)
        else:
            self._open_v2()
        self.guard.seed(self._newest_times())

    def _create_database_v1(self) -> None:
        resp = self._request("POST", "/query", fields={"q": f'CREATE DATABASE "{self.database}"'})
        if resp.status == 200 and not self._statement_errors(resp.data):
            return
        reason = _reason(resp.data, resp.status)
        if resp.status in (401, 403) and self._database_exists():
            return  # someone with the right created it for us
        who = f"user {self._username!r}" if self._username else "these credentials"
        if resp.status == 401:
            raise StoreError(
                f"InfluxDB at {self.url} refused {who} ({reason}); check the username/password"
            )
        raise StoreError(
            f"InfluxDB at {self.url}: {who} lacks the right to create database "
            f"{self.database!r} ({reason}). Ask an admin to run: CREATE DATABASE "
            f'"{self.database}" and GRANT ALL ON "{self.database}" to this user.'
        )

    def _database_exists(self) -> bool:
        resp = self._request("POST", "/query", fields={"q": "SHOW DATABASES"})
        if resp.status != 200:
            return False
        for result in _decode_json(resp.data).get("results", []):
            for series in result.get("series", []):
                if any(row and row[0] == self.database for row in series.get("values") or []):
                    return True
        return False

    def _open_v2(self) -> None:
        from influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS
        from influxdb_client.rest import ApiException

        if not self._token and self._username is not None:
            self._token = f"{self._username}:{self._password}"  # the v1-compatibility form
        if not self._token or not self.org:
            raise StoreError(
                f"InfluxDB {self.server_version} at {self.url} needs a token and an org"
            )
        self._headers["Authorization"] = f"Token {self._token}"
        self.close()  # a second open() must not leak the first client
        self._v2_client = InfluxDBClient(
            url=self.url,
            token=self._token,
            org=self.org,
            timeout=int(self._timeout_s * 1000),
            enable_gzip=self._gzip_min is not None,
            retries=False,
        )
        self._v2_write = self._v2_client.write_api(write_options=SYNCHRONOUS)
        if self.generation != 2:
            return  # InfluxDB 3 creates a database on its first write
        try:
            buckets = self._v2_client.buckets_api()
            if buckets.find_bucket_by_name(self.database) is None:
                buckets.create_bucket(bucket_name=self.database, org=self.org)
        except ApiException as exc:
            if exc.status in (401, 403):
                raise StoreError(
                    f"InfluxDB at {self.url}: the token lacks the right to create bucket "
                    f"{self.database!r} in org {self.org!r} ({exc.reason}); create it, or "
                    f"give a token allowed to"
                ) from exc
            if not exc.status or exc.status >= 500:
                raise StoreUnavailable(f"InfluxDB at {self.url}: {exc.reason}") from exc
            raise StoreError(f"InfluxDB at {self.url}: {exc.status} {exc.reason}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise StoreUnavailable(f"InfluxDB at {self.url} unreachable: {exc}") from exc

    def close(self) -> None:
        if self._v2_client is not None:
            self._v2_client.close()
            self._v2_client = self._v2_write = None
        self._http.clear()

    # -- write --------------------------------------------------------------------------------

    def write(self, messages: Sequence[DeviceMessage]) -> WriteOutcome:
        if self.generation is None:
            raise StoreError("InfluxStore.write called before open()")
        with self._write_cond:
            plan = self.guard.plan(messages, allow_lookup=False)
            while plan is None and self._writes_in_flight:
                self._write_cond.wait()
                plan = self.guard.plan(messages, allow_lookup=False)
            if plan is None:  # a repeat or a clock step: look, place and write with nothing else in flight
                return self._write_planned(messages, self.guard.plan(messages))
            self._writes_in_flight += 1
        try:
            return self._write_planned(messages, plan)
        finally:
            with self._write_cond:
                self._writes_in_flight -= 1
                self._write_cond.notify_all()

    def _write_planned(self, messages: Sequence[DeviceMessage], plan) -> WriteOutcome:
        batch = encode_batch(messages, plan.times_us, plan.adjusted)
        for i, _ in plan.rejected:
            batch.chunks[i], batch.line_counts[i] = None, 0
        return self._write_batch(batch, plan.rejected)

    def _write_batch(self, batch: EncodedBatch, refused: list[tuple[int, str]]) -> WriteOutcome:
        rejected = list(batch.rejected) + refused
        group: list[int] = []
        lines = 0
        for i in batch.indices():
            if group and lines + batch.line_counts[i] > self._max_lines:
                rejected += self._write_group(batch, group)
                group, lines = [], 0
            group.append(i)
            lines += batch.line_counts[i]
        if group:
            rejected += self._write_group(batch, group)
        return WriteOutcome(sorted(rejected))

    def _write_group(self, batch: EncodedBatch, indices: list[int]) -> list[tuple[int, str]]:
        """Write these messages; bisect a refused request down to the refused messages."""
        post = self._post_lines if self.generation == 1 else self._post_lines_v2
        status, reason = post(batch.body(indices))
        if status == 404 and self.generation == 1 and "database not found" in reason:
            self._create_database_v1()  # dropped under us: recreate once, then write again
            if self.retention is not None:
                apply_v1(self, self.retention)
            status, reason = post(batch.body(indices))
        if status in (200, 204):
            return []
        if status in (401, 403):
            raise StoreError(f"InfluxDB at {self.url} refused the write ({status}): {reason}")
        if status not in _REFUSED:
            raise StoreError(f"InfluxDB at {self.url} answered {status} to a write: {reason}")
        if len(indices) == 1:
            return [(indices[0], reason)]
        mid = len(indices) // 2
        return self._write_group(batch, indices[:mid]) + self._write_group(batch, indices[mid:])

    # -- read ---------------------------------------------------------------------------------

    def _statement_errors(self, body: bytes) -> str:
        doc = _decode_json(body)
        errors = [r["error"] for r in doc.get("results", []) if "error" in r]
        return "; ".join(errors) or str(doc.get("error", ""))

    def run(self, statement: str) -> str:
        """Run one InfluxQL statement that changes the database (POST); its error, or ""."""
        resp = self._request("POST", "/query", fields={"db": self.database, "q": statement})
        if resp.status == 200:
            return self._statement_errors(resp.data)
        return _reason(resp.data, resp.status)

    def query(
        self, influxql: str, params: dict | None = None, epoch: str = "u"
    ) -> Iterator[dict]:
        """Run one InfluxQL statement and yield its series chunks (``columns``/``values``).

        Results are streamed in chunks of 10,000 rows, so large reads never build one big JSON
        document. Only pass values through ``params``; ``influxql`` must hold no caller data.
        Times come back in ``epoch`` units (``u``: microseconds, truncated; ``ns``).
        """
        fields = {"db": self.database, "q": influxql, "epoch": epoch, "chunked": "true",
                  "chunk_size": "10000"}
        if params:
            fields["params"] = msgspec.json.encode(params).decode()
        resp = self._request("POST", "/query", fields=fields, preload_content=False)
        try:
            if resp.status != 200:
                reason = _reason(resp.read(), resp.status)
                raise StoreError(f"InfluxQL refused ({resp.status}): {reason}")
            pending = b""
            for data in resp.stream(1 << 16):
                pending += data
                *docs, pending = pending.split(b"\n")
                yield from self._series(docs)
            yield from self._series([pending])
        except urllib3.exceptions.HTTPError as exc:
            raise StoreUnavailable(f"InfluxDB at {self.url} broke off a query: {exc}") from exc
        finally:
            resp.release_conn()

    @staticmethod
    def _series(docs: list[bytes]) -> Iterator[dict]:
        for raw in docs:
            if not raw.strip():
                continue
            doc = _decode_json(raw)
            if "error" in doc:
                raise StoreError(f"InfluxQL error: {doc['error']}")
            for result in doc.get("results", []):
                if "error" in result:
                    raise StoreError(f"InfluxQL error: {result['error']}")
                yield from result.get("series", [])
