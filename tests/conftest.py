"""Shared fixtures: real Mosquitto and InfluxDB servers, and fresh state directories.

Session fixtures (``mosquitto``, ``influxdb``) start one server per pytest process, so under
pytest-xdist every worker has its own; tests sharing them must use unique topics, client ids and
databases. Factory fixtures give a test its own server to stop, kill and restart.

A missing ``mosquitto`` or ``influxd`` binary skips the test, naming the binary and ``make
test`` (which installs both). With ``EDGELOOP_REQUIRE_SERVICES=1`` (set in CI) it fails instead,
so a broken install cannot pass as a row of skips.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.services import InfluxServer, MosquittoServer, find_executable

# Fixtures whose use marks a test, so `-m "not influxdb"` works even where a mark was forgotten.
_FIXTURE_MARKS = {
    "mosquitto": "mosquitto",
    "mosquitto_factory": "mosquitto",
    "influxdb": "influxdb",
    "influxdb_factory": "influxdb",
}
_PACKAGES = {"mosquitto": "mosquitto", "influxd": "influxdb"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            mark = _FIXTURE_MARKS.get(fixture)
            if mark and not item.get_closest_marker(mark):
                item.add_marker(mark)


def _require(binary: str) -> None:
    """Skip (or fail, under EDGELOOP_REQUIRE_SERVICES=1) when ``binary`` is not installed."""
    if find_executable(binary):
        return
    override = f"EDGELOOP_{binary.upper()}"
    if os.environ.get(override):
        pytest.fail(f"{override}={os.environ[override]} is not an executable", pytrace=False)
    reason = (
        f"{binary} is not installed (Debian package {_PACKAGES[binary]}); "
        f"`make test` installs it, or run `apt-get install {_PACKAGES[binary]}`"
    )
    if os.environ.get("EDGELOOP_REQUIRE_SERVICES") == "1":
        pytest.fail(f"EDGELOOP_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _stop_all(servers: list[Any]) -> None:
    errors = []
    for server in servers:
        try:
            server.stop()
        except Exception as exc:  # keep stopping the others; report every failure
            errors.append(f"{server!r}: {exc!r}")
    if errors:
        raise RuntimeError("could not stop test servers:\n" + "\n".join(errors))


# -- Mosquitto ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoServer]:
    """One broker with the project profile for the whole session (per xdist worker)."""
    _require("mosquitto")
    server = MosquittoServer(workdir=tmp_path_factory.mktemp("mosquitto")).start()
    yield server
    server.stop()


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., MosquittoServer]]:
    """``mosquitto_factory(**overrides)`` starts a broker of this test's own; all stopped after.

    ``overrides`` replace profile settings by name, e.g. ``max_inflight_messages=20``.
    """
    _require("mosquitto")
    servers: list[MosquittoServer] = []

    def factory(**overrides: Any) -> MosquittoServer:
        workdir = tmp_path / f"mosquitto-{len(servers)}"
        server = MosquittoServer(workdir=workdir, **overrides)
        servers.append(server)
        return server.start()

    yield factory
    _stop_all(servers)


# -- InfluxDB -------------------------------------------------------------------------------------


class FreshInflux(InfluxServer):
    """The ``influxdb_factory`` fixture: a started server of the test's own.

    Calling it starts another fresh server (stopped at test end too), so both
    ``influxdb_factory.url`` and ``influxdb_factory()`` work.
    """

    def __init__(self, tmp_path: Path, servers: list[InfluxServer]) -> None:
        super().__init__(workdir=tmp_path / f"influxd-{len(servers)}")
        self._tmp_path = tmp_path
        self._servers = servers
        servers.append(self)

    def __call__(self) -> InfluxServer:
        server = InfluxServer(workdir=self._tmp_path / f"influxd-{len(self._servers)}")
        self._servers.append(server)
        return server.start()


@pytest.fixture(scope="session")
def influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxServer]:
    """One InfluxDB for the whole session (per xdist worker); use ``new_database()`` per test."""
    _require("influxd")
    server = InfluxServer(workdir=tmp_path_factory.mktemp("influxd")).start()
    yield server
    server.stop()


@pytest.fixture
def influxdb_factory(tmp_path: Path) -> Iterator[FreshInflux]:
    """A fresh InfluxDB of this test's own, free to stop, kill and start again."""
    _require("influxd")
    servers: list[InfluxServer] = []
    try:
        yield FreshInflux(tmp_path, servers).start()
    finally:
        _stop_all(servers)


# -- State directories ------------------------------------------------------------------------------


@pytest.fixture
def tmp_data_dir(tmp_path: Path) -> Path:
    """A fresh, empty directory for agent or aggregator state (outbox, registry, sequence files)."""
    path = tmp_path / "data"
    path.mkdir()
    return path
