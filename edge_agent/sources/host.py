"""Linux host metrics read straight from /proc and /sys: the device watching itself, no psutil.

Channels (``metrics`` selects a subset, in this order):

- ``cpu_percent``: busy share of all CPUs since the previous read, from ``/proc/stat`` deltas
  (idle and iowait count as idle; the first read compares with the state at start-up);
- ``load1``: the one-minute load average, ``/proc/loadavg``;
- ``mem_used_percent``: ``100 * (1 - MemAvailable / MemTotal)``, ``/proc/meminfo``;
- ``disk_used_percent``: ``os.statvfs(disk_path)``, computed like ``df`` (used / (used + available));
- ``net_rx_bytes_per_s`` / ``net_tx_bytes_per_s``: ``/proc/net/dev`` byte counter deltas over
  monotonic time, summed over ``interfaces`` (default: every interface except ``lo``);
- ``cpu_temp_c``: ``/sys/class/thermal/thermal_zone*/temp`` (millidegrees), ``None`` without one.

``proc_root`` and ``sys_root`` move the whole tree, so tests read fixture trees with the same code
that reads the real files. A metric that cannot be read this time (a missing interface, a counter
that went backwards after an interface reset) is ``None`` for that sample, not an error.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from edge_agent.sources.base import Source, SourceOptions, parse_options

__all__ = ["HostOptions", "HostSource", "METRICS"]

Metric = Literal[
    "cpu_percent", "load1", "mem_used_percent", "disk_used_percent",
    "net_rx_bytes_per_s", "net_tx_bytes_per_s", "cpu_temp_c",
]
METRICS: tuple[str, ...] = Metric.__args__  # type: ignore[attr-defined]
#: Thermal zone types that are the CPU, by preference (Raspberry Pi, x86, other ARM boards).
CPU_ZONE_TYPES = ("cpu-thermal", "cpu_thermal", "x86_pkg_temp", "soc-thermal", "soc_thermal", "cpu")


class HostOptions(SourceOptions):
    proc_root: str = "/proc"
    sys_root: str = "/sys"
    #: The file system whose use is reported (the data directory's is the useful one on a Pi).
    disk_path: str = "/"
    #: Interfaces summed for the network rates; empty: every interface except ``lo``.
    interfaces: list[Annotated[str, Meta(min_length=1, max_length=64)]] = []
    #: Thermal zone number for ``cpu_temp_c``; unset: the zone whose type names the CPU, else zone 0.
    thermal_zone: Annotated[int, Meta(ge=0)] | None = None
    metrics: Annotated[list[Metric], Meta(min_length=1)] = msgspec.field(default_factory=lambda: list(METRICS))

    def __post_init__(self) -> None:
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError("option 'metrics' lists a metric twice")


class HostSource(Source):
    """Host metrics of this Linux machine (see the module docstring for the channels)."""

    name = "host"
    Options = HostOptions

    def __init__(self, **options: Any) -> None:
        self.options = opts = parse_options(self.name, HostOptions, options)
        self.proc = Path(opts.proc_root)
        self.sys = Path(opts.sys_root)
        if not (self.proc / "stat").is_file():
            raise ValueError(f"source 'host' option 'proc_root': {self.proc / 'stat'} does not exist (not Linux?)")
        self.channels = tuple(opts.metrics)
        self._want = set(opts.metrics)
        self._cpu = self._cpu_times()
        self._net = self._net_bytes()
        self._net_t = time.monotonic()
        self._temp_file = self._find_thermal_zone()

    # -- one reader per file -------------------------------------------------------------------

    def _cpu_times(self) -> tuple[int, int] | None:
        """(busy, total) jiffies of all CPUs; guest time is already inside user time."""
        try:
            with open(self.proc / "stat") as f:
                fields = f.readline().split()
        except OSError:
            return None
        if not fields or fields[0] != "cpu":
            return None
        ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        total = sum(ticks)
        return total - idle, total

    def _cpu_percent(self) -> float | None:
        now = self._cpu_times()
        before, self._cpu = self._cpu, now
        if now is None or before is None:
            return None
        busy, total = now[0] - before[0], now[1] - before[1]
        if total <= 0 or busy < 0:
            return None  # no tick has passed since the last read
        return 100.0 * busy / total

    def _load1(self) -> float | None:
        try:
            return float((self.proc / "loadavg").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _mem_used_percent(self) -> float | None:
        info: dict[str, int] = {}
        try:
            with open(self.proc / "meminfo") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    parts = rest.split()
                    if parts:
                        info[key] = int(parts[0])
        except (OSError, ValueError):
            return None
        total = info.get("MemTotal")
        if not total:
            return None
        available = info.get("MemAvailable")
        if available is None:  # kernels before 3.14
            available = info.get("MemFree", 0) + info.get("Buffers", 0) + info.get("Cached", 0)
        return 100.0 * (1.0 - available / total)

    def _disk_used_percent(self) -> float | None:
        try:
            st = os.statvfs(self.options.disk_path)
        except OSError:
            return None
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        usable = used + st.f_bavail * st.f_frsize  # what df divides by: root's reserve excluded
        return 100.0 * used / usable if usable > 0 else None

    def _net_bytes(self) -> tuple[int, int] | None:
        """Summed (rx, tx) byte counters of the chosen interfaces; None if one is missing."""
        wanted = set(self.options.interfaces)
        rx = tx = 0
        found: set[str] = set()
        try:
            with open(self.proc / "net" / "dev") as f:
                lines = f.readlines()[2:]
        except OSError:
            return None
        for line in lines:
            iface, _, counters = line.partition(":")
            iface = iface.strip()
            if (iface in wanted) if wanted else iface != "lo":
                fields = counters.split()
                try:
                    rx += int(fields[0])
                    tx += int(fields[8])
                except (IndexError, ValueError):
                    return None
                found.add(iface)
        if wanted and found != wanted:
            return None
        return rx, tx

    def _net_rates(self) -> tuple[float | None, float | None]:
        now, t = self._net_bytes(), time.monotonic()
        before, before_t = self._net, self._net_t
        self._net, self._net_t = now, t
        if now is None or before is None or t <= before_t:
            return None, None
        dt = t - before_t
        drx, dtx = now[0] - before[0], now[1] - before[1]
        # A counter that went backwards (interface re-created, 32-bit wrap) gives no rate this time.
        return (drx / dt if drx >= 0 else None), (dtx / dt if dtx >= 0 else None)

    def _find_thermal_zone(self) -> Path | None:
        base = self.sys / "class" / "thermal"
        if self.options.thermal_zone is not None:
            return base / f"thermal_zone{self.options.thermal_zone}" / "temp"
        zones = sorted(base.glob("thermal_zone*"), key=lambda p: int(p.name[12:] or 0))
        if not zones:
            return None
        types = {}
        for zone in zones:
            try:
                types[(zone / "type").read_text().strip()] = zone
            except OSError:
                pass
        for kind in CPU_ZONE_TYPES:
            if kind in types:
                return types[kind] / "temp"
        return zones[0] / "temp"

    def _cpu_temp_c(self) -> float | None:
        if self._temp_file is None:
            return None
        try:
            return int(self._temp_file.read_text().strip()) / 1000.0
        except (OSError, ValueError):
            return None  # some zones answer EINVAL or EAGAIN while the sensor is busy

    # -- the sample ------------------------------------------------------------------------------

    def read(self, index: int, now: float) -> list[float | None]:
        got: dict[str, float | None] = {}
        want = self._want
        if "cpu_percent" in want:
            got["cpu_percent"] = self._cpu_percent()
        if "load1" in want:
            got["load1"] = self._load1()
        if "mem_used_percent" in want:
            got["mem_used_percent"] = self._mem_used_percent()
        if "disk_used_percent" in want:
            got["disk_used_percent"] = self._disk_used_percent()
        if "net_rx_bytes_per_s" in want or "net_tx_bytes_per_s" in want:
            got["net_rx_bytes_per_s"], got["net_tx_bytes_per_s"] = self._net_rates()
        if "cpu_temp_c" in want:
            got["cpu_temp_c"] = self._cpu_temp_c()
        return [got[ch] for ch in self.channels]
