"""DS18B20 1-wire thermometers through the kernel's sysfs files (``w1-gpio`` + ``w1-therm``).

Each sensor is a directory ``/sys/bus/w1/devices/28-<serial>`` (family code 28). Its ``w1_slave``
file holds the scratchpad and the kernel's CRC verdict::

    72 01 4b 46 7f ff 0e 10 57 : crc=57 YES
    72 01 4b 46 7f ff 0e 10 57 t=23125

A reading counts only with ``YES``; ``t=85000`` (85.000 °C, the power-on value of the scratchpad,
seen after a brown-out or a conversion that never ran) and an all-zero scratchpad (its CRC is 0,
so a data line stuck low passes the check) are treated as bad: ``None``. Newer kernels also offer
a ``temperature`` file (millidegrees, an I/O error on CRC failure), used when ``w1_slave`` is absent.

A conversion takes up to 750 ms per sensor at 12-bit resolution, far longer than a 10 Hz sample.
So by default a background thread polls the sensors every ``poll_interval_s`` and :meth:`read`
returns the latest good values not older than ``max_age_s``; ``poll_interval_s = 0`` reads the
files inside ``read`` instead (for slow samplers, and the tests).

Channels: one per sensor, ``t_<serial>`` (``t_0316a2795dff``), or the name given in ``names``.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Annotated, Any

from msgspec import Meta

from edge_agent.sources.base import Source, SourceOptions, parse_options

__all__ = ["DS18B20Options", "DS18B20Source", "parse_w1_slave"]

SENSOR_ID = r"^28-[0-9a-f]{12}\Z"
POWER_ON_MILLI_C = 85000
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}\Z")


class DS18B20Options(SourceOptions):
    sys_root: str = "/sys"
    #: Sensor ids (``28-0316a2795dff``); empty: every ``28-*`` device found at start-up.
    sensors: list[Annotated[str, Meta(pattern=SENSOR_ID)]] = []
    #: Channel name per sensor id; sensors not named get ``t_<serial>``.
    names: dict[Annotated[str, Meta(pattern=SENSOR_ID)], Annotated[str, Meta(pattern=_NAME.pattern)]] = {}
    #: Seconds between background polls; 0 reads in ``read`` itself.
    poll_interval_s: Annotated[float, Meta(ge=0, le=3600)] = 1.0
    #: A polled value older than this is reported as ``None`` (a sensor that stopped answering).
    max_age_s: Annotated[float, Meta(gt=0, le=86400)] = 5.0

    def __post_init__(self) -> None:
        if len(set(self.sensors)) != len(self.sensors):
            raise ValueError("option 'sensors' lists a sensor twice")
        if self.poll_interval_s and self.max_age_s < self.poll_interval_s:
            raise ValueError("option 'max_age_s' must be at least 'poll_interval_s'")
        if len(set(self.names.values())) != len(self.names):
            raise ValueError("option 'names' gives two sensors the same channel name")


def parse_w1_slave(text: str) -> float | None:
    """°C from the text of a ``w1_slave`` file, ``None`` for a CRC failure or a known bad value."""
    lines = text.strip().splitlines()
    if len(lines) < 2 or not lines[0].rstrip().endswith("YES"):
        return None
    raw = lines[0].split(":")[0].split()
    if raw and all(b == "00" for b in raw):
        return None  # the all-zero scratchpad passes the CRC: a shorted or stuck data line
    m = re.search(r"t=(-?\d+)", lines[1])
    if m is None:
        return None
    milli = int(m[1])
    if milli == POWER_ON_MILLI_C:
        return None
    return milli / 1000.0


class DS18B20Source(Source):
    """Temperatures of the DS18B20 sensors on the 1-wire bus, one channel per sensor."""

    name = "ds18b20"
    Options = DS18B20Options

    def __init__(self, **options: Any) -> None:
        self.options = opts = parse_options(self.name, DS18B20Options, options)
        self.devices = Path(opts.sys_root) / "bus" / "w1" / "devices"
        ids = list(opts.sensors) or sorted(p.name for p in self.devices.glob("28-*") if re.match(SENSOR_ID, p.name))
        if not ids:
            raise ValueError(
                f"source 'ds18b20': no sensors under {self.devices} (is 1-wire enabled? "
                "add dtoverlay=w1-gpio to /boot/firmware/config.txt and reboot), or set option 'sensors'"
            )
        unknown = sorted(set(opts.names) - set(ids))
        if unknown:
            raise ValueError(f"source 'ds18b20' option 'names' names sensors not read: {', '.join(unknown)}")
        self.sensors = tuple(ids)
        self.channels = tuple(opts.names.get(i, "t_" + i[3:]) for i in ids)
        if len(set(self.channels)) != len(self.channels):
            raise ValueError(f"source 'ds18b20': channel names clash: {self.channels}")
        self._latest: list[tuple[float, float] | None] = [None] * len(ids)  # (monotonic time, °C)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def read_sensor(self, sensor: str) -> float | None:
        """One sensor's temperature now (blocks for the conversion on real hardware)."""
        folder = self.devices / sensor
        try:
            return parse_w1_slave((folder / "w1_slave").read_text())
        except FileNotFoundError:
            pass
        except OSError:
            return None  # the sensor vanished from the bus while being read
        try:
            milli = int((folder / "temperature").read_text().strip())
        except (OSError, ValueError):
            return None  # absent, or EIO when the kernel's CRC check failed
        return None if milli == POWER_ON_MILLI_C else milli / 1000.0

    def _poll_once(self) -> None:
        for k, sensor in enumerate(self.sensors):
            value = self.read_sensor(sensor)
            if value is not None:
                with self._lock:
                    self._latest[k] = (time.monotonic(), value)

    def _poll(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self._poll_once()
            self._stop.wait(max(0.0, self.options.poll_interval_s - (time.monotonic() - started)))

    def read(self, index: int, now: float) -> list[float | None]:
        if not self.options.poll_interval_s:
            return [self.read_sensor(s) for s in self.sensors]
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="ds18b20-poll", daemon=True)
            self._poller.start()
        oldest = time.monotonic() - self.options.max_age_s
        with self._lock:
            return [v[1] if v is not None and v[0] >= oldest else None for v in self._latest]

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=2.0)
