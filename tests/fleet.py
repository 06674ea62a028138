"""A small simulated fleet of real agents, and the check that everything it sent was stored once.

The end-to-end and chaos tests share this: :class:`Fleet` runs each :class:`~edge_agent.agent.Agent`
in its own thread and records, through ``on_accept``, every message the agents made durable in
their outboxes. :func:`check_delivery` then compares that record with the rows read straight from
the store, keyed by (device, sequence, reading index): none missing, none doubled, none altered,
none invented, and every features and inference message stored exactly once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Self

from edgeloop import wire

__all__ = [
    "Fleet",
    "Row",
    "check_delivery",
    "expected_readings",
    "influx_counts",
    "influx_rows",
    "train_model",
]


def train_model(directory: Path) -> Path:
    """Train a small isolation forest on simulated machine data and write it to ``directory``."""
    from models import training

    X, names = training.simulated_training_set("machine", seed=7, windows=600, window_len=50, rate_hz=10.0)
    onnx_bytes, manifest = training.train_isolation_forest(
        X, names, version="0.1.0", profile="machine", seed=7, n_estimators=50
    )
    return training.write_model(directory, onnx_bytes, manifest)


class Fleet:
    """``devices`` simulated agents publishing to ``mqtt_url``, each in a thread of its own.

    Each device runs a 10 Hz clock 20x faster than real time (200 readings per second). Use as a
    context manager: leaving the block stops the agents even when the test failed half-way.
    """

    def __init__(
        self,
        mqtt_url: str,
        data_dir: Path,
        model_dir: Path | None,
        *,
        devices: int = 3,
        protocol: str = "auto",
        prefix: str = "e2e",
        outbox: Any = None,
        drain_timeout: float = 30.0,
    ) -> None:
        from edge_agent.agent import Agent
        from edge_agent.config import AgentConfig, MqttSettings, OutboxSettings, SamplingSettings, SourceSettings
        from edge_agent.inference import Model

        model = Model.load(model_dir) if model_dir is not None else None
        self.accepted: list[wire.Struct] = []
        self.drained: dict[str, Any] = {}
        self.drain_timeout = drain_timeout
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.agents = []
        for k in range(devices):
            cfg = AgentConfig(
                device_id=f"{prefix}-{k}",
                data_dir=str(data_dir),
                mqtt=MqttSettings(url=mqtt_url, protocol=protocol),
                sampling=SamplingSettings(rate_hz=10.0, batch_s=1.0, window_s=5.0, speed=20.0),
                source=SourceSettings(name="simulated", options={"profile": "machine", "seed": k, "rate_hz": 10.0}),
                outbox=outbox if outbox is not None else OutboxSettings(),
            )
            self.agents.append(Agent(cfg, model=model, on_accept=self._record))
        self._threads = [
            threading.Thread(target=self._run, args=(a,), name=f"agent-{a.device}", daemon=True)
            for a in self.agents
        ]

    def _record(self, msg: wire.Struct) -> None:
        with self._lock:
            self.accepted.append(msg)

    def _run(self, agent) -> None:
        try:
            self.drained[agent.device] = agent.run(self._stop, drain_timeout=self.drain_timeout)
        except BaseException as exc:  # shown in the assertion, not lost in a thread
            self.drained[agent.device] = exc

    def start(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def wait_connected(self, timeout: float = 15.0) -> None:
        """Block until every agent's MQTT link is up (raises TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout
        for agent in self.agents:
            while agent._link is None or not agent._link.connected:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{agent.device} did not connect within {timeout} s: {self.drained}")
                time.sleep(0.02)

    def stop(self) -> dict[str, Any]:
        """Stop sampling, wait for the agents' drains; returns device -> run() result (or exception)."""
        self._stop.set()
        for t in self._threads:
            t.join(self.drain_timeout + 30)
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            raise RuntimeError(f"agent threads still running after their drain: {stuck}")
        return self.drained

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        if any(t.is_alive() for t in self._threads):
            self.stop()


class Row:
    """One stored reading, as read back from the store."""

    __slots__ = ("device", "seq", "idx", "t", "values")

    @classmethod
    def from_influx(cls, row: dict[str, Any], channels) -> Row:
        self = cls()
        self.device = row["device"]
        self.seq = row["seq"]
        self.idx = row["idx"]
        self.t = row["time"] / 1e6
        self.values = {c: row.get(c) for c in channels}
        return self


def influx_rows(influxdb, database: str, agents) -> list[Row]:
    """Every telemetry reading of ``agents`` read with plain InfluxQL, not through our store."""
    rows = []
    for a in agents:
        result = influxdb.query(database, f"SELECT * FROM telemetry WHERE device = '{a.device}'", epoch="u")
        for s in result["results"][0].get("series", []):
            cols = s["columns"]
            rows.extend(Row.from_influx(dict(zip(cols, values)), a.source.channels) for values in s["values"])
    return rows


def influx_counts(influxdb, database: str) -> dict[str, int]:
    """How many features and inference points InfluxDB holds."""
    counts = {}
    for kind in ("features", "inference"):
        res = influxdb.query(database, f"SELECT count(seq) FROM {kind}")
        series = res["results"][0].get("series")
        counts[kind] = series[0]["values"][0][1] if series else 0
    return counts


def expected_readings(accepted) -> dict[tuple[str, int, int], tuple[int, dict[str, float]]]:
    """(device, seq, idx) -> (time in µs, channel values) for every accepted telemetry reading."""
    expected = {}
    for msg in accepted:
        if isinstance(msg, wire.Telemetry):
            for idx, r in enumerate(msg.readings):
                values = {c: v for c, v in zip(msg.channels, r.values) if v is not None}
                expected[(msg.device, msg.seq, idx)] = (round(r.t * 1e6), values)
    return expected


def check_delivery(agents, accepted, drained, stored_rows, stored_counts, *, min_readings: int = 1000) -> None:
    """Assert the store holds exactly what the agents accepted, and that every outbox drained."""
    assert len(drained) == len(agents) and all(v is True for v in drained.values()), f"not drained: {drained}"
    assert all(a.outbox_depth == 0 for a in agents)
    expected = expected_readings(accepted)
    assert len(expected) > min_readings
    keys = Counter((r.device, r.seq, r.idx) for r in stored_rows)
    doubled = [k for k, n in keys.items() if n > 1]
    assert not doubled, f"doubled readings: {doubled[:5]}"
    missing = set(expected) - set(keys)
    extra = set(keys) - set(expected)
    assert not missing, f"{len(missing)} readings missing, e.g. {sorted(missing)[:5]}"
    assert not extra, f"{len(extra)} readings nobody sent, e.g. {sorted(extra)[:5]}"
    altered = [
        (r.device, r.seq, r.idx)
        for r in stored_rows
        if (round(r.t * 1e6), {k: v for k, v in r.values.items() if v is not None})
        != expected[(r.device, r.seq, r.idx)]
    ]
    assert not altered, f"{len(altered)} readings altered, e.g. {altered[:5]}"
    for kind in ("features", "inference"):
        sent = sum(1 for m in accepted if type(m).__name__.lower() == kind)
        assert sent > 0, f"no {kind} messages were sent"
        assert stored_counts[kind] == sent, f"{kind}: {stored_counts[kind]} stored, {sent} sent"
