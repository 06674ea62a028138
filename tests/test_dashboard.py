"""The web dashboard in a real headless Chromium, after a short run of real agents.

Two simulated agents (real clock, a trained model) publish through the session's Mosquitto to an
aggregator with its HTTP port on a free port; the first has a local rule that fires one alert on
its first score (threshold far below any score, long cool-down). Selenium
then drives Debian's ``chromium`` with ``chromedriver`` (``make test`` installs both; nothing is
installed or downloaded here): the fleet table must list both devices with their model version,
a device page must draw points (read from the uPlot instances the page exposes, and from the
canvas pixels), the alert must be marked, and the models page must say what it has. Screenshots
go to ``test-artifacts/`` at the repository root (git-ignored).

Without chromium the test skips, naming the packages, unless ``EDGELOOP_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.waiting import wait_until

CHROMIUM = os.environ.get("EDGELOOP_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("EDGELOOP_CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1400")
TOKEN = "dashboard-test-token"


def _require_chromium() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if not missing:
        return
    reason = (f"{', '.join(missing)} not installed (Debian packages chromium chromium-driver); "
              "`make test` installs them, or run `apt-get install chromium chromium-driver`")
    if os.environ.get("EDGELOOP_REQUIRE_SERVICES") == "1":
        pytest.fail(f"EDGELOOP_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def fleet_run(mosquitto, tmp_path_factory):
    """(base URL, devices, model version) after two agents ran a few seconds; the aggregator stays up."""
    from aggregator.service import Aggregator, AggregatorConfig, HttpSettings, MqttSettings
    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig, MqttSettings as AgentMqtt, SamplingSettings, SourceSettings
    from edge_agent.inference import Model
    from edge_agent.rules import RulesSettings, ThresholdRule
    from tests.fleet import train_model

    _require_chromium()
    tmp = tmp_path_factory.mktemp("dash")
    tag = tmp.name[-12:].replace("_", "-")
    model = Model.load(train_model(tmp / "model"))
    agg = Aggregator(AggregatorConfig(
        data_dir=str(tmp / "agg"), http=HttpSettings(port=0),
        mqtt=MqttSettings(url=mosquitto.url, client_id=f"agg-dash-{tag}", share_group=f"dash-{tag}")))
    agg.start()
    devices = [f"dash-{tag}-{k}" for k in range(2)]
    agents = [Agent(AgentConfig(
        device_id=d, profile="machine", data_dir=str(tmp / "devices"), mqtt=AgentMqtt(url=mosquitto.url),
        sampling=SamplingSettings(rate_hz=10.0, batch_s=0.5, window_s=1.0),
        source=SourceSettings(name="simulated", options={"profile": "machine", "seed": k, "rate_hz": 10.0}),
        rules=RulesSettings(rules=[ThresholdRule(name="score_seen", input="score", on=-1e9, cooldown_s=3600.0,
                                                 severity="warning")] if k == 0 else [])),
        model=model) for k, d in enumerate(devices)]
    stop = threading.Event()
    threads = [threading.Thread(target=a.run, args=(stop,), kwargs={"drain_timeout": 20.0}, daemon=True)
               for a in agents]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: all(agg.store.count("telemetry", d) >= 40 and agg.store.count("inference", d) >= 3
                               for d in devices), timeout=60, what="readings and verdicts from both agents")
        wait_until(lambda: agg.store.count("alert", devices[0]) == 1, what="the rule's alert to be stored")
        yield f"http://127.0.0.1:{agg.http_port}", devices, model.manifest.version
    finally:
        stop.set()
        for t in threads:
            t.join(40)
        agg.stop(forget_session=True)


@pytest.fixture(scope="module")
def browser(fleet_run, tmp_path_factory):
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


def _wait_js(driver, script: str, what: str, timeout: float = 30.0):
    """Poll a JS expression until it is truthy; returns its value."""
    box: dict = {}

    def check():
        box["v"] = driver.execute_script(f"return ({script});")
        return box["v"]

    wait_until(check, timeout=timeout, what=what)
    return box["v"]


def _screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"dashboard-{name}.png"
    assert driver.save_screenshot(str(path)), path
    print(f"screenshot: {path}")
    return path


def _severe_console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def test_fleet_table_lists_the_devices(fleet_run, browser):
    base, devices, version = fleet_run
    browser.get(base + "/")
    rows = _wait_js(browser, f"document.querySelectorAll('#fleet-table tbody tr[data-device]').length >= {len(devices)}"
                    " && [...document.querySelectorAll('#fleet-table tbody tr[data-device]')].map(r =>"
                    " [r.dataset.device, ...[...r.cells].map(c => c.textContent)])", "the fleet table to fill")
    by_device = {r[0]: r[1:] for r in rows}
    for d in devices:
        cells = by_device[d]
        assert cells[0] == d and cells[1] == "online" and cells[3] == version, cells
        assert "ago" in cells[4], cells
        assert cells[6] == "0" and cells[7] == "0", cells  # nothing dropped or lost
    assert _wait_js(browser, "document.querySelector('#fleet-alerts').textContent.includes('score_seen')",
                    "the alert in the recent-alerts list")
    _screenshot(browser, "fleet")
    assert _severe_console_errors(browser) == []


def test_device_page_draws_points_and_marks_the_alert(fleet_run, browser):
    base, devices, _ = fleet_run
    browser.get(f"{base}/#/device/{devices[0]}")
    # The last 5 minutes: half-second intervals, so a few seconds of readings make several points.
    _wait_js(browser, "document.querySelectorAll('#feature option').length > 0", "the feature list")
    browser.execute_script("const r = document.getElementById('range'); r.value = '5m';"
                           " r.dispatchEvent(new Event('change'));")
    # Every channel chart, the score chart and a feature chart, each with points in its uPlot data.
    charts = _wait_js(browser, "(() => { const c = window.edgeloop.charts; const k = Object.keys(c);"
                      " return k.length >= 3 && k.every(n => c[n].data[0].length >= (n.startsWith('t') ? 6 : 1))"
                      " && Object.fromEntries(k.map(n => [n, c[n].data[0].length])); })()",
                      "every chart to hold points (6 or more per channel)")
    assert "inference:score" in charts and "feature" in charts, charts
    channels = [k for k in charts if k.startswith("telemetry:")]
    assert channels and all(charts[k] >= 6 for k in channels), charts
    # The canvas really has ink in the plot area: count non-transparent pixels of the first channel.
    inked = browser.execute_script(
        "const u = window.edgeloop.charts[arguments[0]]; const b = u.bbox;"
        "const px = u.ctx.getImageData(b.left, b.top, b.width, b.height).data; let n = 0;"
        "for (let i = 3; i < px.length; i += 4) if (px[i] > 0) n++; return n;", channels[0])
    assert inked > 100, inked
    assert browser.execute_script("return window.edgeloop.marks.alerts.length") == 1
    assert browser.execute_script("return window.edgeloop.marks.models.length") >= 1
    assert "score_seen" in browser.find_element("id", "device-alerts").text
    _screenshot(browser, "device")
    assert _severe_console_errors(browser) == []


def test_models_page_shows_what_the_api_has(fleet_run, browser):
    base, _, _ = fleet_run
    browser.get(f"{base}/#/models")
    text = _wait_js(browser, "document.querySelector('#models-list').textContent", "the models page")
    # Without the model routes (404) or a model registry (503) the page says so instead of failing.
    assert text.startswith("No models yet") or "version" in text, text
    assert "cannot reach" not in browser.find_element("id", "status").text
    _screenshot(browser, "models")


def test_grafana_dashboard_queries_run_on_influxdb(influxdb):
    """Every InfluxQL query of deploy/grafana/edgeloop-dashboard.json, with Grafana's macros and
    variables filled in, runs on a real InfluxDB holding each kind of message, and the panels
    find data."""
    import json
    import re
    import time

    from aggregator.stores import make_store
    from edgeloop import wire

    doc = json.loads((Path(__file__).resolve().parent.parent / "deploy/grafana/edgeloop-dashboard.json").read_text())
    database = influxdb.new_database("grafana")
    t = time.time() - 60
    h = dict(v=1, device="graf-1", ts=t, profile="machine")
    with make_store(influx_url=influxdb.url, database=database) as store:
        assert store.write([
            wire.Telemetry(**h, seq=0, channels=["temp"], readings=[wire.Reading(t, [21.5], 0)]),
            wire.Features(**h, seq=1, feature_set="fs1", window_start=t - 5, window_end=t, names=["temp_mean"],
                          values=[21.0]),
            wire.Inference(**h, seq=2, model_version="1.0.0", feature_set="fs1", window_end=t, score=0.7, anomaly=True,
                           latency_us=12.0),
            wire.Alert(**h, seq=3, rule="hot", severity="warning", value=30.0, window_end=t, message="too hot"),
            wire.Status(**h, seq=4, state="online", outbox_depth=2),
        ]).rejected == []
    values = {"$timeFilter": "time > now() - 1h", "$__interval": "1m", "$device": "graf-1", "$field": "temp",
              "$feature": "temp_mean"}

    def fill(q: str) -> str:
        return re.sub(r"\$\w+", lambda m: values.get(m[0], m[0]), q)

    queries = [t["query"] for p in doc["panels"] for t in p["targets"]]
    queries += [a["query"] for a in doc["annotations"]["list"]]
    queries += [v["query"] for v in doc["templating"]["list"]]
    assert len(queries) >= 10
    for q in queries:
        result = influxdb.query(database, fill(q))["results"][0]
        assert "error" not in result, (q, result)
        assert result.get("series"), ("no data", fill(q))
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    for name, expected in (("field", ["temp"]), ("feature", ["temp_mean"])):  # seq, idx, flags are not
        rows = influxdb.query(database, variables[name]["query"])["results"][0]["series"][0]["values"]
        regex = re.compile(variables[name]["regex"].strip("/"))
        assert [row[0] for row in rows if regex.match(row[0])] == expected
