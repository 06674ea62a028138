"""`edgeloop demo` on real servers: what it stored is readable by the plain `influx` CLI."""

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
        [sys.executable, "-m", "edgeloop.cli", "demo", "--quick", "--devices", "3", *args],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )


def _summary(out: str) -> dict[str, int]:
    rows = {}
    for name in ("devices", "readings sent", "readings stored", "messages still undelivered"):
        m = re.search(rf"{name}\s*│\s*([\d,]+)", out)
        assert m, f"no '{name}' in the demo summary:\n{out}"
        rows[name] = int(m.group(1).replace(",", ""))
    return rows


# The embedded-defaults run (phases, dashboard URL, sent = stored, state in --data-dir) is
# tests/test_story.py::test_quick_demo_names_every_phase_and_the_dashboard.


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
