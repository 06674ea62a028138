"""Scoring arithmetic on hand-made cases (simulators/scoring.py) and the `edgeloop score` command."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgeloop.cli import main
from simulators.scoring import Alarm, FaultWindow, alarm_episodes, evaluate, score


def test_precision_recall_f1_false_alarms_and_delay():
    faults = [FaultWindow("a", "wear", 100.0, 200.0), FaultWindow("a", "jam", 500.0, 510.0),
              FaultWindow("b", "wear", 100.0, 200.0)]
    alarms = [Alarm("a", 95.0),    # in the 10 s lead time of a/wear: a hit, delay 0
              Alarm("a", 150.0),   # a second hit on the same fault
              Alarm("a", 300.0),   # false
              Alarm("b", 250.0),   # after b/wear ended: false
              Alarm("b", 80.0)]    # before the lead time: false
    s = score(faults, alarms, device_hours=2.0, lead_s=10.0)
    assert (s.faults, s.detected, s.alarms, s.true_alarms, s.false_alarms) == (3, 1, 5, 2, 3)
    assert s.precision == pytest.approx(2 / 5) and s.recall == pytest.approx(1 / 3)
    assert s.f1 == pytest.approx(2 * 0.4 * (1 / 3) / (0.4 + 1 / 3))
    assert s.false_alarms_per_device_hour == pytest.approx(1.5)
    assert s.delays_s == [0.0]
    # Without a lead time the 95 s alarm is false and the fault is found 50 s late.
    s0 = score(faults, alarms, device_hours=2.0)
    assert (s0.true_alarms, s0.delays_s) == (1, [50.0])


def test_end_of_a_fault_window_is_exclusive_and_devices_are_kept_apart():
    f = [FaultWindow("a", "x", 10.0, 20.0)]
    assert score(f, [Alarm("a", 20.0)], device_hours=1).true_alarms == 0
    assert score(f, [Alarm("a", 19.9)], device_hours=1).true_alarms == 1
    assert score(f, [Alarm("b", 15.0)], device_hours=1).true_alarms == 0


def test_empty_cases_are_zero_not_errors():
    s = score([], [], device_hours=0.0)
    assert (s.precision, s.recall, s.f1, s.false_alarms_per_device_hour, s.mean_delay_s) == (0, 0, 0, 0, None)
    with pytest.raises(ValueError, match="lead_s"):
        score([], [], device_hours=1, lead_s=-1)


def test_alarm_episodes_merge_runs_and_debounce():
    rows = [("a", t, a) for t, a in [(5, False), (10, True), (15, True), (20, True), (25, False), (30, True),
                                     (60, True), (65, True)]]
    assert [x.t for x in alarm_episodes(rows, merge_gap_s=12.0)] == [10, 30, 60]
    assert [x.t for x in alarm_episodes(rows, merge_gap_s=12.0, min_consecutive=2)] == [15, 65]
    assert [x.t for x in alarm_episodes(rows, merge_gap_s=12.0, min_consecutive=3)] == [20]


def _truth():
    return {"lead_s": 0.0, "devices": [
        {"device": "m1", "profile": "machine", "start": 0.0, "end": 3600.0,
         "faults": [{"kind": "sudden", "category": "process", "start": 100.0, "end": 200.0},
                    {"kind": "stuck", "category": "sensor", "start": 1000.0, "end": 1100.0}]},
        {"device": "w1", "profile": "wearable", "start": 0.0, "end": 3600.0, "faults": []}]}


def _inference(device, t, anomaly, version="1.0.0", role="champion"):
    return {"type": "inference", "device": device, "window_end": t, "anomaly": anomaly, "model_version": version,
            "role": role, "score": 0.0}


def test_evaluate_groups_by_model_version_and_profile():
    events = [_inference("m1", t, 100 <= t < 200) for t in range(5, 3600, 5)]
    events += [_inference("m1", t, True, role="shadow") for t in range(5, 3600, 5)]  # ignored
    events += [_inference("w1", t, t == 500) for t in range(5, 3600, 5)]
    events += [{"type": "alert", "device": "m1", "rule": "hot", "window_end": 150.0, "state": "fired"},
               {"type": "alert", "device": "m1", "rule": "hot", "window_end": 160.0, "state": "cleared"}]
    r = evaluate(_truth(), events)
    m, w = r[("1.0.0", "machine")], r[("1.0.0", "wearable")]
    assert (m.faults, m.detected, m.alarms, m.false_alarms) == (1, 1, 1, 0)  # the sensor fault is left out
    assert m.device_hours == pytest.approx((3595 - 5) / 3600)
    assert (w.faults, w.alarms, w.false_alarms) == (0, 1, 1)
    hot = r[("rule:hot", "machine")]
    assert (hot.alarms, hot.detected, hot.device_hours) == (1, 1, 1.0)
    with_sensor = evaluate(_truth(), events, categories=("process", "sensor"))[("1.0.0", "machine")]
    assert with_sensor.faults == 2 and with_sensor.recall == 0.5


def test_score_command(tmp_path):
    truth = tmp_path / "ground-truth.json"
    truth.write_text(json.dumps(_truth()))
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps(_inference("m1", t, 100 <= t < 200)) + "\n" for t in range(5, 3600, 5)))
    out = CliRunner().invoke(main, ["score", "--ground-truth", str(truth), "--alerts", str(events), "--json"])
    assert out.exit_code == 0, out.output
    (row,) = json.loads(out.output)
    assert (row["group"], row["profile"], row["f1"], row["false_alarms"]) == ("1.0.0", "machine", 1.0, 0)
    events.write_text("{not json\n")
    bad = CliRunner().invoke(main, ["score", "--ground-truth", str(truth), "--alerts", str(events)])
    assert bad.exit_code != 0 and "events.jsonl:1" in bad.output
