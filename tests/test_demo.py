"""`edgeloop demo`: embedded defaults, and real servers that the plain `influx` CLI can read."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _demo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgeloop.cli", "demo", "--devices", "3", "--duration", "8", "--rate", "10", *args],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )


def _summary(out: str) -> dict[str, int]:
    rows = {}
    for name in ("devices", "readings sent", "readings stored", "messages still undelivered"):
        m = re.search(rf"{name}\s*│\s*([\d,]+)", out)
        assert m, f"no '{name}' in the demo summary:\n{out}"
        rows[name] = int(m.group(1).replace(",", ""))
    return rows


def test_demo_on_embedded_defaults(tmp_path):
    result = _demo("--data-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _summary(result.stdout)
    assert rows["devices"] == 3
    assert rows["readings sent"] >= 3 * 70
    assert rows["readings stored"] == rows["readings sent"]
    assert rows["messages still undelivered"] == 0
    assert "/api/fleet" in result.stdout  # where to watch the fleet while it runs
    # State went to the data directory given, nowhere near the installed package.
    assert list((tmp_path / "demo").glob("*/aggregator/store.sqlite"))


def test_demo_on_real_servers_is_readable_by_the_influx_cli(mosquitto, influxdb, tmp_path):
    database = influxdb.new_database("demo")
    result = _demo("--mqtt", mosquitto.url, "--influx-url", influxdb.url, "--influx-database", database,
                   "--data-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _summary(result.stdout)
    query = subprocess.run(
        ["influx", "-host", influxdb.host, "-port", str(influxdb.port), "-database", database, "-format", "csv",
         "-execute", "SELECT count(seq) FROM telemetry"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    count = int(query.stdout.strip().splitlines()[-1].split(",")[-1])
    assert count == rows["readings sent"] == rows["readings stored"]
