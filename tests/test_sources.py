"""Sensor source plug-ins: registry conformance, host, ds18b20, bme280, csv, guard and composite.

Sysfs and procfs ARE files, so fixture trees of files are the real interface for ``host`` and
``ds18b20``; ``host`` also runs against this machine's own /proc. The BME280's math is checked
against the Bosch datasheet's worked example; reading a real chip needs one (skipped here).
"""

from __future__ import annotations

import importlib
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_agent.sources import SOURCES, CompositeSource, GuardedSource, Source, create_source, source_class
from edge_agent.sources import bme280
from edge_agent.sources.ds18b20 import parse_w1_slave
from edgeloop.wire import NAME_PATTERN

# -- fixture trees ---------------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def proc_tree(root: Path, *, busy=1000, idle=9000, rx=(0, 0), tx=(0, 0)) -> Path:
    """A /proc with stat, loadavg, meminfo and net/dev; ``rx``/``tx``: (eth0, wlan0) byte counters."""
    # user nice system idle iowait irq softirq steal guest guest_nice
    _write(root / "stat", f"cpu  {busy - 100} 0 100 {idle - 50} 50 0 0 0 7 0\ncpu0 1 0 0 1 0 0 0 0 0 0\n")
    _write(root / "loadavg", "0.42 0.30 0.20 1/123 4567\n")
    _write(root / "meminfo", "MemTotal:        4000000 kB\nMemFree:          500000 kB\nMemAvailable:    3000000 kB\n")
    head = ("Inter-|   Receive                                                |  Transmit\n"
            " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n")
    lines = [("lo", 999_999, 999_999), ("eth0", rx[0], tx[0]), ("wlan0", rx[1], tx[1])]
    _write(root / "net" / "dev", head + "".join(
        f"{name:>6}: {r} 10 0 0 0 0 0 0 {t} 10 0 0 0 0 0 0\n" for name, r, t in lines))
    return root


def sys_tree(root: Path, zones=(("acpitz", 41000), ("cpu-thermal", 52312))) -> Path:
    for i, (kind, milli) in enumerate(zones):
        _write(root / "class" / "thermal" / f"thermal_zone{i}" / "type", kind + "\n")
        _write(root / "class" / "thermal" / f"thermal_zone{i}" / "temp", f"{milli}\n")
    return root


def crc8_maxim(data: bytes) -> int:
    """Dallas/Maxim 1-wire CRC-8 (polynomial x^8 + x^5 + x^4 + 1), as the DS18B20 computes it."""
    crc = 0
    for byte in data:
        for _ in range(8):
            mix = (crc ^ byte) & 1
            crc >>= 1
            if mix:
                crc ^= 0x8C
            byte >>= 1
    return crc


def w1_slave_text(celsius: float | None, *, crc_ok: bool = True, milli: int | None = None) -> str:
    """A ``w1_slave`` file as w1-therm writes it, with a scratchpad whose CRC is really computed."""
    raw = round(celsius * 16) & 0xFFFF if celsius is not None else 0
    pad = bytes([raw & 0xFF, raw >> 8, 0x4B, 0x46, 0x7F, 0xFF, 0x0C, 0x10])
    pad += bytes([crc8_maxim(pad) ^ (0 if crc_ok else 0x5A)])
    hexes = " ".join(f"{b:02x}" for b in pad)
    verdict = "YES" if crc8_maxim(pad[:8]) == pad[8] else "NO"
    t = milli if milli is not None else round(raw if raw < 0x8000 else raw - 0x10000) * 1000 // 16
    return f"{hexes} : crc={pad[8]:02x} {verdict}\n{hexes} t={t}\n"


def w1_tree(root: Path, sensors: dict[str, str]) -> Path:
    for serial, text in sensors.items():
        _write(root / "bus" / "w1" / "devices" / f"28-{serial}" / "w1_slave", text)
    return root


def write_csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


#: Options that build each registered source on this machine (its sample config).
def _samples(tmp: Path) -> dict[str, dict | None]:
    return {
        "simulated": {"seed": 1},
        "host": {},  # this machine's /proc
        "ds18b20": {"sys_root": str(w1_tree(tmp / "sys", {"0316a2795dff": w1_slave_text(21.5)})),
                    "poll_interval_s": 0},
        "bme280": None,  # needs a chip on an I2C bus
        "csv": {"path": write_csv(tmp / "r.csv", "time,a,b\n0,1,2\n1,3,\n2,5,6\n")},
        "composite": {"sources": [{"name": "host"}, {"name": "simulated"}], "timeout_s": 2.0},
    }


# -- registry and conformance ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_registered_name_is_module_and_class_name(name):
    module, _, cls_name = SOURCES[name].partition(":")
    assert module == f"edge_agent.sources.{name}"  # one module per source, named as registered
    assert source_class(name).name == name


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_registered_source_conforms_with_its_sample(name, tmp_path):
    samples = _samples(tmp_path)
    assert name in samples, f"give source {name!r} a sample configuration in this test"
    if samples[name] is None:
        pytest.skip(f"{name} needs hardware that this machine lacks")
    source = create_source(name, samples[name])
    try:
        assert isinstance(source, Source) and type(source).name == name
        assert source.channels and len(set(source.channels)) == len(source.channels)
        assert all(re.match(NAME_PATTERN, ch) for ch in source.channels)
        for index in range(3):
            values = source.read(index, time.time() + index * 0.1)
            assert len(values) == len(source.channels)
            assert all(v is None or (isinstance(v, float) and math.isfinite(v)) for v in values)
    finally:
        source.close()
        source.close()  # idempotent


def test_option_errors_name_the_source_and_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"source 'host' has no option 'proc'; its options are: proc_root, "):
        create_source("host", {"proc": "/proc"})
    with pytest.raises(ValueError, match=r"source 'csv' needs option 'path'"):
        create_source("csv", {})
    with pytest.raises(ValueError, match=r"source 'csv' option 'speed': Expected `float` > 0"):
        create_source("csv", {"path": "x", "speed": 0})
    with pytest.raises(ValueError, match=r"source 'csv' option 'pace': Invalid enum value 'live'; allowed: 'recorded', 'sampler'"):
        create_source("csv", {"path": "x", "pace": "live"})
    with pytest.raises(ValueError, match=r"source 'ds18b20' option 'sensors\[0\]'.*28-"):
        create_source("ds18b20", {"sensors": ["10-000"]})
    with pytest.raises(ValueError, match=r"source 'bme280' option 'address'.*allowed: 118, 119"):
        create_source("bme280", {"address": 0x40})
    with pytest.raises(ValueError, match=r"source 'composite' part 1 \('csv'\): source 'csv' needs option 'path'"):
        create_source("composite", {"sources": [{"name": "simulated"}, {"name": "csv"}]})


def test_sources_load_lazily():
    """Importing the registry loads no source module and no driver: a Pi loads only what it uses."""
    code = ("import sys, edge_agent.sources as s; "
            "print(sorted(m for m in sys.modules if m.startswith('edge_agent.sources.') or m == 'smbus2'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['edge_agent.sources.base', 'edge_agent.sources.guard']"


# -- host ----------------------------------------------------------------------------------------


def test_host_reads_a_fixture_tree_exactly(tmp_path):
    proc = proc_tree(tmp_path / "proc", busy=1000, idle=9000, rx=(1000, 500), tx=(2000, 0))
    sys_root = sys_tree(tmp_path / "sys")
    built = time.monotonic()
    source = create_source("host", {"proc_root": str(proc), "sys_root": str(sys_root), "disk_path": str(tmp_path)})
    assert source.channels == ("cpu_percent", "load1", "mem_used_percent", "disk_used_percent",
                               "net_rx_bytes_per_s", "net_tx_bytes_per_s", "cpu_temp_c")
    proc_tree(proc, busy=1300, idle=9700, rx=(1000 + 50_000, 500 + 10_000), tx=(2000 + 4000, 0))
    v = dict(zip(source.channels, source.read(0, 0.0)))
    after = time.monotonic()
    assert v["cpu_percent"] == pytest.approx(100 * 300 / 1000)  # 300 busy of 1000 ticks
    assert v["load1"] == 0.42
    assert v["mem_used_percent"] == pytest.approx(25.0)  # 1 - 3000000 / 4000000
    assert v["cpu_temp_c"] == 52.312  # the zone whose type is cpu-thermal, not zone 0
    # Rates: 60,000 rx and 4,000 tx bytes (lo excluded) over the same elapsed time.
    assert v["net_rx_bytes_per_s"] / v["net_tx_bytes_per_s"] == pytest.approx(15.0)
    assert v["net_rx_bytes_per_s"] >= 60_000 / (after - built)
    # A second read with no change: no CPU ticks passed (None), no bytes moved (0/s).
    v = dict(zip(source.channels, source.read(1, 0.0)))
    assert v["cpu_percent"] is None and v["net_rx_bytes_per_s"] == 0.0


def test_host_rates_are_bytes_over_elapsed_time(tmp_path):
    proc = proc_tree(tmp_path / "proc", rx=(0, 0), tx=(0, 0))
    t0 = time.monotonic()
    source = create_source("host", {"proc_root": str(proc), "metrics": ["net_rx_bytes_per_s"], "interfaces": ["eth0"]})
    t1 = time.monotonic()
    time.sleep(0.05)
    proc_tree(proc, rx=(100_000, 7), tx=(0, 0))
    t2 = time.monotonic()
    (rate,) = source.read(0, 0.0)
    t3 = time.monotonic()
    assert 100_000 / (t3 - t0) <= rate <= 100_000 / (t2 - t1)  # only eth0 counted


def test_host_missing_interface_reset_counter_and_no_thermal_zone(tmp_path):
    proc = proc_tree(tmp_path / "proc", rx=(5000, 0), tx=(5000, 0))
    source = create_source("host", {"proc_root": str(proc), "sys_root": str(tmp_path / "nosys"),
                                    "interfaces": ["eth0"], "metrics": ["net_rx_bytes_per_s", "cpu_temp_c"]})
    proc_tree(proc, rx=(10, 0), tx=(10, 0))  # eth0 re-created: counters start again
    assert source.read(0, 0.0) == [None, None]
    absent = create_source("host", {"proc_root": str(proc), "interfaces": ["eth9"], "metrics": ["net_tx_bytes_per_s"]})
    assert absent.read(0, 0.0) == [None]
    zone = create_source("host", {"sys_root": str(sys_tree(tmp_path / "sys")), "thermal_zone": 0, "metrics": ["cpu_temp_c"]})
    assert zone.read(0, 0.0) == [41.0]
    with pytest.raises(ValueError, match=r"option 'proc_root'.*stat does not exist"):
        create_source("host", {"proc_root": str(tmp_path / "nothing")})


def test_host_on_this_machine(tmp_path):
    source = create_source("host", {"disk_path": str(tmp_path)})
    busy_until = time.monotonic() + 0.3
    while time.monotonic() < busy_until:  # burn CPU so that some ticks are busy
        pass
    v = dict(zip(source.channels, source.read(0, time.time())))
    assert 0.0 < v["cpu_percent"] <= 100.0
    assert v["load1"] == pytest.approx(float(Path("/proc/loadavg").read_text().split()[0]), abs=0.5)
    assert 0.0 < v["mem_used_percent"] < 100.0
    df = subprocess.run(["df", "--output=pcent", str(tmp_path)], capture_output=True, text=True, check=True)
    df_percent = int(df.stdout.splitlines()[1].strip().rstrip("%"))  # df rounds up
    assert abs(math.ceil(v["disk_used_percent"]) - df_percent) <= 1
    assert v["net_rx_bytes_per_s"] >= 0.0 and v["net_tx_bytes_per_s"] >= 0.0
    has_zone = any(Path("/sys/class/thermal").glob("thermal_zone*/temp"))
    assert (v["cpu_temp_c"] is not None) or not has_zone


# -- ds18b20 ---------------------------------------------------------------------------------------


def test_w1_slave_parsing_crc_power_on_and_zero_scratchpad():
    assert parse_w1_slave(w1_slave_text(23.125)) == 23.125
    assert parse_w1_slave(w1_slave_text(-10.5)) == -10.5
    assert parse_w1_slave(w1_slave_text(23.125, crc_ok=False)) is None  # crc=.. NO
    assert parse_w1_slave(w1_slave_text(85.0)) is None  # the power-on value
    zero = "00 00 00 00 00 00 00 00 00 : crc=00 YES\n00 00 00 00 00 00 00 00 00 t=0\n"
    assert parse_w1_slave(zero) is None  # a data line stuck low passes the CRC
    assert parse_w1_slave("") is None and parse_w1_slave("garbage\n") is None


def test_ds18b20_discovers_sensors_and_reads_each(tmp_path):
    root = w1_tree(tmp_path, {"0316a2795dff": w1_slave_text(21.5), "0416b0c1d2e3": w1_slave_text(30.0, crc_ok=False),
                              "01144fe7a8aa": w1_slave_text(85.0)})
    other = root / "bus" / "w1" / "devices" / "28-00000000beef"
    _write(other / "temperature", "-1250\n")  # a newer kernel's file, without w1_slave
    (root / "bus" / "w1" / "devices" / "w1_bus_master1").mkdir()  # not a sensor
    source = create_source("ds18b20", {"sys_root": str(root), "poll_interval_s": 0,
                                       "names": {"28-0316a2795dff": "boiler"}})
    assert source.sensors == ("28-00000000beef", "28-01144fe7a8aa", "28-0316a2795dff", "28-0416b0c1d2e3")
    assert source.channels == ("t_00000000beef", "t_01144fe7a8aa", "boiler", "t_0416b0c1d2e3")
    assert source.read(0, 0.0) == [-1.25, None, 21.5, None]
    only = create_source("ds18b20", {"sys_root": str(root), "poll_interval_s": 0, "sensors": ["28-0316a2795dff"]})
    assert only.read(0, 0.0) == [21.5]
    shutil.rmtree(root / "bus" / "w1" / "devices" / "28-0316a2795dff")  # unplugged
    assert only.read(1, 0.0) == [None]


def test_ds18b20_errors(tmp_path):
    with pytest.raises(ValueError, match=r"no sensors under .*w1/devices.*dtoverlay=w1-gpio"):
        create_source("ds18b20", {"sys_root": str(tmp_path)})
    root = w1_tree(tmp_path, {"0316a2795dff": w1_slave_text(20.0)})
    with pytest.raises(ValueError, match=r"option 'names' names sensors not read: 28-0000000000ff"):
        create_source("ds18b20", {"sys_root": str(root), "names": {"28-0000000000ff": "x"}})
    with pytest.raises(ValueError, match=r"'max_age_s' must be at least 'poll_interval_s'"):
        create_source("ds18b20", {"sys_root": str(root), "poll_interval_s": 10, "max_age_s": 1})


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def test_ds18b20_background_poll_serves_latest_and_ages_out(tmp_path):
    root = w1_tree(tmp_path, {"0316a2795dff": w1_slave_text(20.0)})
    source = create_source("ds18b20", {"sys_root": str(root), "poll_interval_s": 0.02, "max_age_s": 0.3})
    try:
        _wait_for(lambda: source.read(0, 0.0) == [20.0])
        w1_tree(root, {"0316a2795dff": w1_slave_text(22.5)})
        _wait_for(lambda: source.read(1, 0.0) == [22.5])
        w1_tree(root, {"0316a2795dff": w1_slave_text(22.5, crc_ok=False)})  # bad reads from now on
        _wait_for(lambda: source.read(2, 0.0) == [None])  # the last good value aged out
    finally:
        source.close()
    assert not source._poller.is_alive()


# -- bme280 ----------------------------------------------------------------------------------------

#: The worked example of the BMP280 datasheet (BST-BMP280-DS001, section 3.12); the BME280 uses
#: the same temperature and pressure compensation. H1..H6 are typical values of a real chip.
EXAMPLE = bme280.Calibration(27504, 26435, -1000, 36477, -10685, 3024, 2855, 140, -7, 15500, -14600, 6000,
                             75, 362, 0, 313, 50, 30)


def test_bme280_compensation_matches_the_datasheet_example():
    t, p, _ = bme280.compensate(EXAMPLE, 519888, 415148, 30000)
    assert t == pytest.approx(25.08, abs=0.005)
    assert p == pytest.approx(100653.27, abs=0.05)  # Pa
    t_fine, t_int, p_int, _ = bme280.compensate_int(EXAMPLE, 519888, 415148, 30000)
    assert (t_fine, t_int) == (128422, 2508)
    assert p_int / 256 == pytest.approx(100653.27, abs=0.05)  # "the integer result may deviate slightly"


def test_bme280_humidity_float_and_integer_formulas_agree():
    """No datasheet example for humidity: the two independent datasheet formulas must agree."""
    for adc_t in (480000, 519888, 560000):  # about 19, 25 and 31 degC
        previous = -1.0
        for adc_h in range(20000, 40001, 500):
            _, _, h = bme280.compensate(EXAMPLE, adc_t, 415148, adc_h)
            _, _, _, h_int = bme280.compensate_int(EXAMPLE, adc_t, 415148, adc_h)
            assert h == pytest.approx(h_int / 1024, abs=0.02)
            assert previous < h <= 100.0 or h == previous == 100.0  # more counts, more humidity, clamped
            previous = h
    assert bme280.compensate(EXAMPLE, 519888, 415148, 0)[2] == 0.0  # clamped
    assert bme280.compensate(EXAMPLE, 519888, 415148, 65535)[2] == 100.0


def test_bme280_calibration_and_data_registers_decode():
    h = EXAMPLE
    tp = b"".join(v.to_bytes(2, "little", signed=i > 0 and i != 3) for i, v in enumerate(
        [h.T1, h.T2, h.T3, h.P1, h.P2, h.P3, h.P4, h.P5, h.P6, h.P7, h.P8, h.P9]))
    for h4, h5 in [(313, 50), (-300, -1000), (2047, -2048)]:
        e = h.H2.to_bytes(2, "little", signed=True) + bytes(
            [h.H3, (h4 >> 4) & 0xFF, (h4 & 0x0F) | ((h5 & 0x0F) << 4), (h5 >> 4) & 0xFF, h.H6 & 0xFF])
        cal = bme280.Calibration.from_registers(tp, h.H1, e)
        assert cal == bme280.Calibration(*[*list(vars(EXAMPLE).values())[:15], h4, h5, h.H6])
    # 0xF7..0xFE for adc_P 415148, adc_T 519888, adc_H 30000
    data = bytes([415148 >> 12, (415148 >> 4) & 0xFF, (415148 & 0xF) << 4,
                  519888 >> 12, (519888 >> 4) & 0xFF, (519888 & 0xF) << 4, 30000 >> 8, 30000 & 0xFF])
    assert bme280.raw_adc(data) == (519888, 415148, 30000)


def test_bme280_without_smbus2_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "smbus2", None)  # makes `import smbus2` fail as if not installed
    with pytest.raises(ValueError, match=re.escape("pip install 'edgeloop[sensors]'")):
        create_source("bme280", {})


def test_bme280_without_an_i2c_bus_says_how_to_enable_it():
    pytest.importorskip("smbus2", reason="the sensors extra is not installed")
    if Path("/dev/i2c-7").exists():
        pytest.skip("this machine has /dev/i2c-7")
    with pytest.raises(ValueError, match=r"cannot open I2C bus 7 \(/dev/i2c-7\).*raspi-config"):
        create_source("bme280", {"bus": 7})


@pytest.mark.skipif(not os.environ.get("EDGELOOP_TEST_BME280_BUS"),
                    reason="hardware only: set EDGELOOP_TEST_BME280_BUS to a bus with a BME280")
def test_bme280_reads_a_real_chip():
    source = create_source("bme280", {"bus": int(os.environ["EDGELOOP_TEST_BME280_BUS"])})
    try:
        time.sleep(0.2)
        t, p, h = source.read(0, time.time())
        assert -40 <= t <= 85 and 300 <= p <= 1100 and 0 <= h <= 100
    finally:
        source.close()


# -- csv -------------------------------------------------------------------------------------------

RECORDING = "time,temp,rpm\n0,20.0,1000\n1,,1100\n2,NaN,oops\n4,23.0,1300\n"


def test_csv_sampler_pace_missing_cells_and_end(tmp_path):
    source = create_source("csv", {"path": write_csv(tmp_path / "r.csv", RECORDING)})
    assert source.channels == ("temp", "rpm")
    assert [source.read(i, 0.0) for i in range(4)] == [[20.0, 1000.0], [None, 1100.0], [None, None], [23.0, 1300.0]]
    assert source.bad_cells == 1 and not source.finished
    assert source.read(4, 0.0) == [None, None] and source.finished
    assert source.read(1, 0.0) == [None, 1100.0]  # a restarted sampler rewinds


def test_csv_sampler_pace_loops(tmp_path):
    source = create_source("csv", {"path": write_csv(tmp_path / "r.csv", RECORDING), "loop": True, "columns": ["rpm"]})
    assert [source.read(i, 0.0)[0] for i in range(9)] == [1000.0, 1100.0, None, 1300.0] * 2 + [1000.0]


def test_csv_recorded_pace_keeps_the_recording_timing(tmp_path):
    path = write_csv(tmp_path / "r.csv", RECORDING)
    source = create_source("csv", {"path": path, "pace": "recorded", "columns": ["rpm"]})
    got = [source.read(i, 100.0 + dt)[0] for i, dt in enumerate([0, 0.5, 1.0, 1.9, 3.99, 4.0, 5.9])]
    assert got == [1000.0, 1000.0, 1100.0, 1100.0, None, 1300.0, 1300.0]  # rows held between times
    assert source.period == 6.0  # 4 s span + the last spacing (2 s)
    assert source.read(7, 106.0) == [None] and source.finished
    fast = create_source("csv", {"path": path, "pace": "recorded", "speed": 2.0, "loop": True, "columns": ["rpm"]})
    got = [fast.read(i, 50.0 + dt)[0] for i, dt in enumerate([0, 0.5, 2.0, 3.0, 3.5, 5.0])]
    assert got == [1000.0, 1100.0, 1300.0, 1000.0, 1100.0, 1300.0]  # offsets 0, 1, 4, 6 = 0, 7 = 1, 10 = 4


def test_csv_iso_times_rename_and_errors(tmp_path):
    iso = "when;Temp (C)\n2024-05-01T12:00:00Z;20.5\n2024-05-01T12:00:02+00:00;21\n2024-05-01T12:00:03;22\n"
    source = create_source("csv", {"path": write_csv(tmp_path / "iso.csv", iso), "time_column": "when",
                                   "delimiter": ";", "rename": {"Temp (C)": "temp_c"}, "pace": "recorded"})
    assert source.channels == ("temp_c",) and source.period == 4.0
    assert [source.read(i, 10.0 + dt) for i, dt in enumerate([0, 1.5, 2.0, 3.5])] == [[20.5], [20.5], [21.0], [22.0]]

    def error(text, **options):
        with pytest.raises(ValueError) as info:
            create_source("csv", {"path": write_csv(tmp_path / "e.csv", text), **options})
        return str(info.value)

    assert "no column 'time' in" in error("t,a\n0,1\n") and "its columns are: t, a" in error("t,a\n0,1\n")
    assert re.search(r"line 3: bad time 'noon'", error("time,a\n0,1\nnoon,2\n"))
    assert re.search(r"line 3: time goes backwards", error("time,a\n5,1\n4,2\n"))
    assert "column 'Temp (C)' is not a valid channel name" in error("time,Temp (C)\n0,1\n")
    assert "has a header but no rows" in error("time,a\n")
    assert "no column 'b'" in error("time,a\n0,1\n", columns=["b"])
    assert "option 'speed' only applies with pace" in error("time,a\n0,1\n", speed=2.0)
    with pytest.raises(ValueError, match=r"option 'path': cannot open .*missing.csv"):
        create_source("csv", {"path": str(tmp_path / "missing.csv")})


# -- guard and composite ---------------------------------------------------------------------------


class Counting(Source):
    """Reads its index into every channel."""

    name = "counting"

    def __init__(self, channels=("a", "b")):
        self.channels = tuple(channels)
        self.closed = False

    def read(self, index, now):
        return [float(index)] * len(self.channels)

    def close(self):
        self.closed = True


class Hanging(Counting):
    """Blocks in ``read`` for the indices in ``hang_on`` until ``release`` is set, like a stuck bus."""

    name = "hanging"

    def __init__(self, hang_on, channels=("x",)):
        super().__init__(channels)
        self.hang_on, self.release = set(hang_on), threading.Event()

    def read(self, index, now):
        if index in self.hang_on:
            self.release.wait(30)
        return super().read(index, now)


class Failing(Counting):
    name = "failing"

    def read(self, index, now):
        if index % 2:
            raise OSError(5, "Input/output error")
        if index == 2:
            return [float("nan")] * len(self.channels)
        if index == 4:
            return ["12"] * len(self.channels)  # a source bug: text instead of numbers
        return super().read(index, now)


def test_guarded_source_reports_errors_and_bad_values():
    guarded = GuardedSource(Failing(), timeout_s=2.0)
    assert guarded.read(0, 0.0) == [0.0, 0.0]
    assert guarded.read(1, 0.0) == [None, None]
    status = guarded.status()
    assert status.last_error == "OSError: [Errno 5] Input/output error" and status.last_error_at
    assert guarded.read(2, 0.0) == [None, None]  # NaN is no reading, but the read itself went fine
    assert guarded.read(4, 0.0) == [None, None]
    status = guarded.status()
    assert (status.source, status.reads, status.ok, status.errors, status.timeouts) == ("failing", 4, 2, 2, 0)
    assert "non-number" in status.last_error
    short = GuardedSource(Counting(), 1.0)
    short.channels = ("only",)  # a source that changed its mind about its channels
    assert short.read(0, 0.0) == [None] and "2 values for 1 channels" in short.status().last_error
    guarded.close()
    assert guarded.source.closed
    with pytest.raises(RuntimeError, match="closed"):
        guarded.read(3, 0.0)
    with pytest.raises(ValueError, match="timeout_s"):
        GuardedSource(Counting(), 0)


def test_guarded_source_times_out_skips_while_hung_and_recovers():
    hanging = Hanging(hang_on={1})
    guarded = GuardedSource(hanging, timeout_s=0.1)
    assert guarded.read(0, 0.0) == [0.0]
    started = time.monotonic()
    assert guarded.read(1, 0.0) == [None]  # hangs for up to 30 s: the budget ends the wait
    assert guarded.read(2, 0.0) == [None]  # still hung: not started, answered at once
    assert time.monotonic() - started < 5.0
    status = guarded.status()
    assert (status.reads, status.ok, status.timeouts, status.skipped) == (3, 1, 1, 1)
    assert "took longer than 0.1 s" in status.last_error
    hanging.release.set()
    _wait_for(lambda: guarded.read(3, 0.0) == [3.0])
    assert guarded.status().max_read_s > 0.1
    guarded.close()


def test_composite_prefixes_clashing_channels_and_keeps_reading_around_a_hung_source():
    hanging = Hanging(hang_on=range(1, 1000), channels=("x", "a"))
    composite = CompositeSource.of([Counting(), hanging, Failing(("c",)), Counting()], timeout_s=0.2)
    assert composite.channels == ("counting_a", "counting_b", "x", "hanging_a", "c", "counting2_a", "counting2_b")
    assert composite.read(0, 0.0) == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    started = time.monotonic()
    for i in range(1, 6):
        values = composite.read(i, 0.0)
        assert values[:2] == [float(i)] * 2 and values[5:] == [float(i)] * 2  # the others keep producing
        assert values[2:4] == [None, None]  # the hung one gives None for its own channels
        assert values[4] is None  # the failing one: errors, NaN, text
    assert time.monotonic() - started < 5 * 0.2 + 3.0  # one budget per sample at most, not one per source
    by_name = {s.source: s for s in composite.status()}
    assert (by_name["hanging"].timeouts, by_name["hanging"].skipped) == (1, 4)
    assert (by_name["failing"].errors, by_name["failing"].ok) == (4, 2) and by_name["counting2"].ok == 6
    hanging.release.set()
    composite.close()
    assert all(part.source.closed for part in composite.parts)


def test_composite_from_configuration(tmp_path):
    csv_path = write_csv(tmp_path / "r.csv", "time,temp\n0,1\n1,2\n")
    root = w1_tree(tmp_path / "sys", {"0316a2795dff": w1_slave_text(21.5)})
    source = create_source("composite", {"timeout_s": 1.0, "sources": [
        {"name": "csv", "options": {"path": csv_path}},
        {"name": "csv", "options": {"path": csv_path}, "prefix": "replay"},
        {"name": "ds18b20", "options": {"sys_root": str(root), "poll_interval_s": 0}},
    ]})
    assert source.channels == ("csv_temp", "replay_temp", "t_0316a2795dff")
    assert source.read(1, 0.0) == [2.0, 2.0, 21.5]
    source.close()
    with pytest.raises(ValueError, match=r"source 'composite' option 'sources': Expected `array` of length >= 1"):
        create_source("composite", {"sources": []})


def test_raspberry_pi_doc_configuration_is_valid():
    """The TOML in docs/raspberry-pi.md loads as an agent configuration with valid source options."""
    import tomllib

    import msgspec

    from edge_agent.config import AgentConfig
    from edge_agent.sources.base import parse_options
    from edge_agent.sources.composite import CompositeOptions

    doc = (Path(__file__).parent.parent / "docs" / "raspberry-pi.md").read_text()
    config = msgspec.convert(tomllib.loads(re.search(r"```toml\n(.*?)```", doc, re.S)[1]), AgentConfig)
    options = parse_options("composite", CompositeOptions, config.source.options)
    for part in options.sources:  # each part's options against its own schema, without hardware
        parse_options(part.name, source_class(part.name).Options, part.options)
