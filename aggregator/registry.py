"""The fleet registry: what the aggregator knows about each device, kept across restarts.

Fed by the ingest: retained status messages (birth and last will) and every stored message
(last seen, highest sequence). Saved as JSON in the data directory after changes, at most
every ``save_every_s`` seconds, and on close.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import msgspec

from edgeloop import wire

__all__ = ["DeviceRecord", "Registry"]


class DeviceRecord(msgspec.Struct, kw_only=True):
    device: str
    profile: str = ""
    state: str = "unknown"  # online | offline | unknown
    first_seen: float = 0.0
    last_seen: float = 0.0  # aggregator clock
    last_device_ts: float = 0.0  # device clock
    max_seq: int = -1
    messages: int = 0
    agent_version: str | None = None
    model_version: str | None = None
    outbox_depth: int = 0
    dropped: list[tuple[int, int]] = []
    clock_skew_s: float = 0.0  # device clock minus receive time, last seen


class Registry:
    def __init__(self, path: str | Path | None, save_every_s: float = 2.0) -> None:
        self.path = Path(path) if path else None
        self.save_every_s = save_every_s
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceRecord] = {}
        self._dirty = False
        self._saved_at = 0.0
        if self.path and self.path.exists():
            records = msgspec.json.decode(self.path.read_bytes(), type=list[DeviceRecord])
            self._devices = {r.device: r for r in records}

    def observe(self, msg: wire.DeviceMessage, received_at: float) -> None:
        with self._lock:
            rec = self._devices.get(msg.device)
            if rec is None:
                rec = self._devices[msg.device] = DeviceRecord(device=msg.device, first_seen=received_at)
            rec.profile = msg.profile or rec.profile
            rec.last_seen = max(rec.last_seen, received_at)
            rec.last_device_ts = max(rec.last_device_ts, msg.ts)
            rec.clock_skew_s = msg.ts - received_at
            rec.messages += 1
            if isinstance(msg, wire.Status):
                rec.state = msg.state
                rec.agent_version = msg.agent_version
                rec.model_version = msg.model_version
                rec.outbox_depth = msg.outbox_depth
                rec.dropped = [tuple(r) for r in msg.dropped]
                rec.max_seq = max(rec.max_seq, msg.seq)
            else:
                rec.max_seq = max(rec.max_seq, msg.seq)
                if rec.state != "online" and isinstance(msg, (wire.Telemetry, wire.Features, wire.Inference)):
                    rec.state = "online"
                if isinstance(msg, wire.Inference) and msg.role == "champion":
                    rec.model_version = msg.model_version
            self._dirty = True

    def get(self, device: str) -> DeviceRecord | None:
        with self._lock:
            return self._devices.get(device)

    def devices(self) -> list[DeviceRecord]:
        with self._lock:
            return sorted(self._devices.values(), key=lambda r: r.device)

    def maybe_save(self) -> None:
        if self._dirty and time.monotonic() - self._saved_at >= self.save_every_s:
            self.save()

    def save(self) -> None:
        if not self.path:
            return
        with self._lock:
            data = msgspec.json.encode(list(self._devices.values()))
            self._dirty = False
        self._saved_at = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)

    def as_json(self) -> str:
        return json.dumps([msgspec.to_builtins(r) for r in self.devices()])
