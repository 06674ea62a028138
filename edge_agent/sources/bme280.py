"""Bosch BME280 temperature, pressure and humidity over I2C (smbus2, the ``sensors`` extra).

The sensor reports raw ADC counts; the temperature, pressure and humidity come from the
compensation formulas of the datasheet (BST-BME280-DS002, section 8.1, double precision) and the
factory calibration read from the chip at start-up. :func:`compensate` and :class:`Calibration`
are pure functions of bytes and numbers, so they are tested without hardware; the integer
versions of section 4.2.3 are here too, as an independent check of the same math.

The chip runs in normal mode (it measures continuously every ``standby_ms``), so :meth:`read` only
fetches the latest result: 8 bytes over I2C, well under a millisecond, no waiting for a conversion.

smbus2 is imported when the source is built, never before: a device without this sensor does not
need it, and one that does gets an error that says ``pip install 'edgeloop[sensors]'``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Literal

from edge_agent.sources.base import Source, SourceOptions, parse_options

__all__ = ["BME280Options", "BME280Source", "Calibration", "compensate", "compensate_int"]

CHIP_ID = 0x60  # a BMP280 (no humidity) answers 0x56..0x58
REG_CALIB_TP, REG_CALIB_H1, REG_CALIB_H = 0x88, 0xA1, 0xE1
REG_ID, REG_RESET, REG_CTRL_HUM, REG_STATUS, REG_CTRL_MEAS, REG_CONFIG, REG_DATA = (
    0xD0, 0xE0, 0xF2, 0xF3, 0xF4, 0xF5, 0xF7)
OVERSAMPLING = {1: 1, 2: 2, 4: 3, 8: 4, 16: 5}  # factor -> register code
STANDBY_MS = {0.5: 0, 62.5: 1, 125: 2, 250: 3, 500: 4, 1000: 5, 10: 6, 20: 7}
FILTER = {0: 0, 2: 1, 4: 2, 8: 3, 16: 4}
MISSING_SMBUS2 = "the bme280 source needs smbus2: pip install 'edgeloop[sensors]'"


class BME280Options(SourceOptions):
    #: I2C bus number: /dev/i2c-<bus> (1 on a Raspberry Pi's GPIO header).
    bus: int = 1
    #: 0x76 (SDO to GND, most breakout boards) or 0x77 (SDO to VDDIO).
    address: Literal[0x76, 0x77] = 0x76
    oversampling: Literal[1, 2, 4, 8, 16] = 1
    #: Pause between measurements in normal mode: 0.5, 10, 20, 62.5, 125, 250, 500 or 1000 ms.
    standby_ms: float = 62.5
    #: IIR filter coefficient for temperature and pressure (0: off).
    iir_filter: Literal[0, 2, 4, 8, 16] = 0

    def __post_init__(self) -> None:
        if self.standby_ms not in STANDBY_MS:
            allowed = ", ".join(f"{v:g}" for v in sorted(STANDBY_MS))
            raise ValueError(f"option 'standby_ms' must be one of {allowed}, got {self.standby_ms!r}")


@dataclass(frozen=True)
class Calibration:
    """The factory trimming parameters ``dig_T1`` ... ``dig_H6`` of one chip."""

    T1: int; T2: int; T3: int  # noqa: E702
    P1: int; P2: int; P3: int; P4: int; P5: int; P6: int; P7: int; P8: int; P9: int  # noqa: E702
    H1: int; H2: int; H3: int; H4: int; H5: int; H6: int  # noqa: E702

    @classmethod
    def from_registers(cls, tp: bytes, h1: int, h: bytes) -> Calibration:
        """From 0x88..0x9F (24 bytes), 0xA1 and 0xE1..0xE7 (7 bytes), as the datasheet lays them out."""
        if len(tp) != 24 or len(h) != 7:
            raise ValueError(f"calibration blocks of 24 and 7 bytes expected, got {len(tp)} and {len(h)}")
        t1, t2, t3, p1, *p = struct.unpack("<HhhH8h", tp)
        h2, h3, e4, e5, e6, h6 = struct.unpack("<hBbBbb", h)
        # H4 and H5 are signed 12-bit numbers sharing the nibbles of 0xE5.
        h4 = (e4 << 4) | (e5 & 0x0F)
        h5 = (e6 << 4) | (e5 >> 4)
        return cls(t1, t2, t3, p1, *p, h1, h2, h3, h4, h5, h6)


def raw_adc(data: bytes) -> tuple[int, int, int]:
    """(adc_T, adc_P, adc_H) from the 8 data bytes at 0xF7 (pressure, temperature: 20 bit; humidity: 16)."""
    adc_p = (data[0] << 12) | (data[1] << 4) | (data[2] >> 4)
    adc_t = (data[3] << 12) | (data[4] << 4) | (data[5] >> 4)
    adc_h = (data[6] << 8) | data[7]
    return adc_t, adc_p, adc_h


def compensate(cal: Calibration, adc_t: int, adc_p: int, adc_h: int) -> tuple[float, float, float]:
    """(°C, Pa, %RH) by the datasheet's double-precision formulas (section 8.1)."""
    var1 = (adc_t / 16384.0 - cal.T1 / 1024.0) * cal.T2
    var2 = (adc_t / 131072.0 - cal.T1 / 8192.0) ** 2 * cal.T3
    t_fine = int(var1 + var2)  # BME280_S32_t in the datasheet: truncated
    temperature = (var1 + var2) / 5120.0

    var1 = t_fine / 2.0 - 64000.0
    var2 = var1 * var1 * cal.P6 / 32768.0
    var2 = var2 + var1 * cal.P5 * 2.0
    var2 = var2 / 4.0 + cal.P4 * 65536.0
    var1 = (cal.P3 * var1 * var1 / 524288.0 + cal.P2 * var1) / 524288.0
    var1 = (1.0 + var1 / 32768.0) * cal.P1
    if var1 == 0.0:
        pressure = 0.0  # avoid division by zero, as the datasheet does
    else:
        p = 1048576.0 - adc_p
        p = (p - var2 / 4096.0) * 6250.0 / var1
        var1 = cal.P9 * p * p / 2147483648.0
        var2 = p * cal.P8 / 32768.0
        pressure = p + (var1 + var2 + cal.P7) / 16.0

    h = t_fine - 76800.0
    h = (adc_h - (cal.H4 * 64.0 + cal.H5 / 16384.0 * h)) * (
        cal.H2 / 65536.0 * (1.0 + cal.H6 / 67108864.0 * h * (1.0 + cal.H3 / 67108864.0 * h)))
    h = h * (1.0 - cal.H1 * h / 524288.0)
    humidity = min(100.0, max(0.0, h))
    return temperature, pressure, humidity


def compensate_int(cal: Calibration, adc_t: int, adc_p: int, adc_h: int) -> tuple[int, int, int, int]:
    """(t_fine, T in 0.01 °C, P in Pa/256, H in %RH/1024): the integer formulas of section 4.2.3."""
    var1 = (((adc_t >> 3) - (cal.T1 << 1)) * cal.T2) >> 11
    var2 = (((((adc_t >> 4) - cal.T1) * ((adc_t >> 4) - cal.T1)) >> 12) * cal.T3) >> 14
    t_fine = var1 + var2
    t = (t_fine * 5 + 128) >> 8

    var1 = t_fine - 128000
    var2 = var1 * var1 * cal.P6
    var2 = var2 + ((var1 * cal.P5) << 17)
    var2 = var2 + (cal.P4 << 35)
    var1 = ((var1 * var1 * cal.P3) >> 8) + ((var1 * cal.P2) << 12)
    var1 = (((1 << 47) + var1) * cal.P1) >> 33
    if var1 == 0:
        p = 0
    else:
        p = 1048576 - adc_p
        num = ((p << 31) - var2) * 3125
        p = abs(num) // abs(var1) * (1 if (num >= 0) == (var1 > 0) else -1)  # C division truncates
        var1 = (cal.P9 * (p >> 13) * (p >> 13)) >> 25
        var2 = (cal.P8 * p) >> 19
        p = ((p + var1 + var2) >> 8) + (cal.P7 << 4)

    v = t_fine - 76800
    v = (((((adc_h << 14) - (cal.H4 << 20) - (cal.H5 * v)) + 16384) >> 15) * (
        ((((((v * cal.H6) >> 10) * (((v * cal.H3) >> 11) + 32768)) >> 10) + 2097152) * cal.H2 + 8192) >> 14))
    v = v - (((((v >> 15) * (v >> 15)) >> 7) * cal.H1) >> 4)
    v = min(max(v, 0), 419430400)
    return t_fine, t, p, v >> 12


class BME280Source(Source):
    """Channels ``temperature_c``, ``pressure_hpa`` and ``humidity_percent`` of one BME280."""

    name = "bme280"
    Options = BME280Options
    channels = ("temperature_c", "pressure_hpa", "humidity_percent")

    def __init__(self, **options: Any) -> None:
        self.options = opts = parse_options(self.name, BME280Options, options)
        try:
            import smbus2
        except ImportError:
            raise ValueError(MISSING_SMBUS2) from None
        where = f"I2C bus {opts.bus} (/dev/i2c-{opts.bus}) address {opts.address:#04x}"
        try:
            self._bus = smbus2.SMBus(opts.bus)
        except (FileNotFoundError, PermissionError) as exc:
            hint = ("enable I2C with `sudo raspi-config nonint do_i2c 0` (or dtparam=i2c_arm=on) and reboot"
                    if isinstance(exc, FileNotFoundError) else "add the service user to the i2c group")
            raise ValueError(f"source 'bme280': cannot open {where}: {exc.strerror}; {hint}") from None
        try:
            self._setup(where)
        except BaseException:
            self._bus.close()
            raise

    def _setup(self, where: str) -> None:
        opts, bus, addr = self.options, self._bus, self.options.address
        try:
            chip = bus.read_byte_data(addr, REG_ID)
        except OSError as exc:
            raise ValueError(f"source 'bme280': no answer on {where}: {exc}; check wiring and 'address'") from None
        if chip != CHIP_ID:
            kind = "a BMP280, which has no humidity sensor" if chip in (0x56, 0x57, 0x58) else f"chip id {chip:#04x}"
            raise ValueError(f"source 'bme280': {where} is {kind}, not a BME280 (id 0x60)")
        self.calibration = Calibration.from_registers(
            bytes(bus.read_i2c_block_data(addr, REG_CALIB_TP, 24)),
            bus.read_byte_data(addr, REG_CALIB_H1),
            bytes(bus.read_i2c_block_data(addr, REG_CALIB_H, 7)),
        )
        osrs = OVERSAMPLING[opts.oversampling]
        bus.write_byte_data(addr, REG_CTRL_MEAS, 0)  # sleep: config is only written reliably in sleep mode
        bus.write_byte_data(addr, REG_CONFIG, (STANDBY_MS[opts.standby_ms] << 5) | (FILTER[opts.iir_filter] << 2))
        bus.write_byte_data(addr, REG_CTRL_HUM, osrs)  # takes effect with the next ctrl_meas write
        bus.write_byte_data(addr, REG_CTRL_MEAS, (osrs << 5) | (osrs << 2) | 0b11)  # normal mode

    def read(self, index: int, now: float) -> list[float | None]:
        data = bytes(self._bus.read_i2c_block_data(self.options.address, REG_DATA, 8))
        adc_t, adc_p, adc_h = raw_adc(data)
        if adc_t == 0x80000:
            return [None, None, None]  # the reset value: no conversion has finished yet
        t, p, h = compensate(self.calibration, adc_t, adc_p, adc_h)
        return [t, p / 100.0, None if adc_h == 0x8000 else h]

    def close(self) -> None:
        bus = getattr(self, "_bus", None)
        if bus is not None:
            self._bus = None
            try:
                bus.write_byte_data(self.options.address, REG_CTRL_MEAS, 0)  # back to sleep: 0.1 µA
            except OSError:
                pass
            bus.close()
