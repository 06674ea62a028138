"""Describe the machine a benchmark ran on: CPU model, cores, RAM and the versions that matter."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata

__all__ = ["describe"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            kib = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
        return kib / 1024 / 1024
    except (OSError, AttributeError):
        return None


def _version(command: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    match = re.search(pattern, out.stdout + out.stderr)
    return match.group(1) if match else "unknown"


def describe(mosquitto_binary: str, influxd_binary: str) -> dict[str, str]:
    """Facts about this machine and the software under test, as display strings."""
    ram = _ram_gib()
    return {
        "CPU": _cpu_model(),
        "Cores": str(os.cpu_count()),
        "RAM": f"{ram:.1f} GiB" if ram else "unknown",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "paho-mqtt": metadata.version("paho-mqtt"),
        "msgspec": metadata.version("msgspec"),
        "urllib3": metadata.version("urllib3"),
        "Mosquitto": _version([mosquitto_binary, "-h"], r"mosquitto version (\S+)"),
        "InfluxDB": _version([influxd_binary, "version"], r"InfluxDB v?(\S+)"),
    }
