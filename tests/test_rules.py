"""Local rules: hysteresis, cool-down, configuration, and the command and GPIO actions."""

from __future__ import annotations

import json
import sys
import textwrap

import msgspec
import pytest

from edge_agent.rules import (
    AlertEvent, CommandAction, GpioAction, RuleError, Rules, RulesSettings, ThresholdRule,
)
from edgeloop import wire
from edgeloop.config import ConfigError, convert


def states(rules: Rules, values, input_name: str = "score", start: float = 0.0, step: float = 1.0):
    """Feed a value sequence (one per ``step`` seconds); the (index, state) of each event."""
    out = []
    for i, v in enumerate(values):
        for e in rules.evaluate({input_name: v}, now=start + i * step):
            out.append((i, e.state))
    return out


def test_hysteresis_fires_at_on_and_clears_only_below_off():
    rules = Rules(RulesSettings(rules=[ThresholdRule(name="hot", input="score", on=0.8, off=0.6)]))
    values = [0.1, 0.79, 0.8, 0.7, 0.85, 0.61, 0.6, 0.59, 0.75, 0.9]
    assert states(rules, values) == [(2, "fired"), (7, "cleared"), (9, "fired")]
    assert rules.status()["hot"]["fired"] == 2 and rules.status()["hot"]["cleared"] == 1
    assert rules.status()["hot"]["active"] is True


def test_without_off_the_rule_follows_the_threshold():
    rules = Rules(RulesSettings(rules=[ThresholdRule(name="hot", input="score", on=0.8)]))
    assert states(rules, [0.8, 0.81, 0.79, 0.8]) == [(0, "fired"), (2, "cleared"), (3, "fired")]


def test_a_below_rule_mirrors_an_above_rule():
    rule = ThresholdRule(name="cold", input="bearing_temp", on=5.0, off=8.0, direction="below",
                         severity="critical")
    rules = Rules(RulesSettings(rules=[rule]))
    events = []
    for i, v in enumerate([20.0, 5.0, 7.9, 8.0, 8.1, 4.0]):
        events += rules.evaluate({"bearing_temp": v}, now=float(i))
    assert [(e.state, e.value) for e in events] == [("fired", 5.0), ("cleared", 8.1), ("fired", 4.0)]
    assert events[0] == AlertEvent(rule="cold", severity="critical", value=5.0, state="fired",
                                   input="bearing_temp", threshold=5.0, at=1.0,
                                   message="bearing_temp 5 <= 5 (fired)")
    assert events[1].message == "bearing_temp 8.1 > 8 (cleared)"


def test_cooldown_blocks_a_re_fire_then_lets_a_standing_condition_fire():
    rule = ThresholdRule(name="hot", input="score", on=1.0, off=0.5, cooldown_s=10.0)
    rules = Rules(RulesSettings(rules=[rule]))
    # t: 0 fire, 2 clear, 4 high again (cool-down), 9 still high, 10 fires, 11 clear, 12 high again
    values = {0: 2.0, 2: 0.1, 4: 2.0, 9: 2.0, 10: 2.0, 11: 0.1, 12: 3.0, 20: 3.0}
    events = [(t, e.state) for t, v in values.items() for e in rules.evaluate({"score": v}, now=float(t))]
    assert events == [(0, "fired"), (2, "cleared"), (10, "fired"), (11, "cleared"), (20, "fired")]


def test_missing_or_non_finite_inputs_leave_the_state_alone():
    rules = Rules(RulesSettings(rules=[ThresholdRule(name="hot", input="score", on=1.0)]))
    assert rules.evaluate({"score": 2.0}, now=0.0)[0].state == "fired"
    assert rules.evaluate({}, now=1.0) == []
    assert rules.evaluate({"score": None}, now=2.0) == []
    assert rules.evaluate({"score": float("nan")}, now=3.0) == []
    assert rules.status()["hot"]["active"] is True
    assert rules.status()["hot"]["missing"] == 3


def test_several_rules_on_several_inputs_in_configuration_order():
    rules = Rules(RulesSettings(rules=[
        ThresholdRule(name="score_high", input="score", on=0.5),
        ThresholdRule(name="vib_high", input="vibration_rms", on=2.0, severity="critical"),
    ]))
    events = rules.evaluate({"score": 0.9, "vibration_rms": 3.0, "other": 1.0}, now=0.0)
    assert [(e.rule, e.severity) for e in events] == [("score_high", "warning"), ("vib_high", "critical")]


def test_an_event_becomes_a_valid_wire_alert():
    rules = Rules(RulesSettings(rules=[ThresholdRule(name="vib_rms_high", input="vibration_rms", on=0.8)]))
    (event,) = rules.evaluate({"vibration_rms": 0.91}, now=5.0)
    alert = event.alert(device="press-01", seq=7, ts=1.7e9, window_end=1.7e9 - 1, profile="machine")
    back = wire.decode(wire.topic("press-01", "alert"), wire.encode(alert))
    assert (back.rule, back.severity, back.value, back.message) == (
        "vib_rms_high", "warning", 0.91, "vibration_rms 0.91 >= 0.8 (fired)")


# -- configuration --------------------------------------------------------------------------------

def test_rules_load_from_toml_shaped_data():
    data = {"rules": [{"name": "vib_high", "input": "vibration_rms", "on": 2, "off": 1.5,
                       "cooldown_s": 60, "command": {"argv": ["/bin/true"], "timeout_s": 2}}]}
    settings = convert(data, RulesSettings, "agent.toml")
    rule = settings.rules[0]
    assert rule.on == 2.0 and rule.off == 1.5 and rule.command == CommandAction(argv=["/bin/true"], timeout_s=2.0)


@pytest.mark.parametrize("rule, match", [
    ({"name": "vib high", "input": "x", "on": 1}, "name"),
    ({"name": "9lives", "input": "x", "on": 1}, "name"),
    ({"name": "ok", "input": "bad-input", "on": 1}, "input"),
    ({"name": "ok", "input": "x", "on": 1, "off": 2}, "an 'above' rule needs off <= on"),
    ({"name": "ok", "input": "x", "on": 1, "off": 0, "direction": "below"}, "a 'below' rule needs off >= on"),
    ({"name": "ok", "input": "x", "on": 1, "severity": "fatal"}, "severity"),
    ({"name": "ok", "input": "x", "on": 1, "command": {"argv": []}}, "argv"),
    ({"name": "ok", "input": "x", "on": 1, "cooldown_s": -1}, "cooldown_s"),
])
def test_bad_rules_are_refused_naming_the_key(rule, match):
    with pytest.raises(ConfigError, match=match):
        convert({"rules": [rule]}, RulesSettings, "agent.toml")


def test_rule_names_follow_the_wire_name_pattern_even_when_built_directly():
    with pytest.raises(ValueError, match=r"rule name 'x\\ny' must match"):
        ThresholdRule(name="x\ny", input="score", on=1.0)
    with pytest.raises(ConfigError, match="rule names repeat"):
        convert({"rules": [{"name": "a", "input": "x", "on": 1}, {"name": "a", "input": "y", "on": 2}]},
                RulesSettings, "agent.toml")


# -- command action -------------------------------------------------------------------------------

def python_argv(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_command_runs_in_the_background_with_the_rule_in_its_environment(tmp_path):
    release, out = tmp_path / "release", tmp_path / "env.json"
    code = f"""
        import json, os, time
        while not os.path.exists({str(release)!r}):   # waits until the test lets it go
            time.sleep(0.01)
        json.dump({{k: v for k, v in os.environ.items() if k.startswith("EDGELOOP_")}}, open({str(out)!r}, "w"))
        raise SystemExit(3)
    """
    rule = ThresholdRule(name="hot", input="score", on=1.0, command=CommandAction(argv=python_argv(code)))
    rules = Rules(RulesSettings(rules=[rule]))
    (event,) = rules.evaluate({"score": 1.25}, now=0.0)  # returns although the command is blocked
    assert event.state == "fired"
    result = rules.result("hot")
    assert result.running and result.returncode is None
    assert rules.status()["hot"]["last_command"]["running"] is True
    release.touch()
    assert rules.wait(timeout=30)
    assert (result.running, result.returncode, result.timed_out, result.error) == (False, 3, False, None)
    env = json.loads(out.read_text())
    expected = {"EDGELOOP_RULE": "hot", "EDGELOOP_VALUE": "1.25", "EDGELOOP_STATE": "fired",
                "EDGELOOP_SEVERITY": "warning"}
    # The rest of the agent's environment is inherited (make test sets EDGELOOP_REQUIRE_SERVICES).
    assert {k: env.get(k) for k in expected} == expected
    rules.close()


def test_a_busy_command_is_not_started_twice_and_clear_runs_only_when_asked(tmp_path):
    release = tmp_path / "release"
    code = f"""
        import os, time
        while not os.path.exists({str(release)!r}):
            time.sleep(0.01)
    """
    rule = ThresholdRule(name="hot", input="score", on=1.0, command=CommandAction(argv=python_argv(code)))
    rules = Rules(RulesSettings(rules=[rule]))
    states(rules, [2.0, 0.0, 2.0, 0.0, 2.0])
    status = rules.status()["hot"]
    assert (status["fired"], status["commands"], status["skipped"]) == (3, 1, 2)
    release.touch()
    assert rules.wait(timeout=30)
    assert rules.result("hot").returncode == 0


def test_command_on_clear(tmp_path):
    log = tmp_path / "log"
    code = f"""
        import os
        open({str(log)!r}, "a").write(os.environ["EDGELOOP_STATE"] + "\\n")
    """
    rule = ThresholdRule(name="hot", input="score", on=1.0,
                         command=CommandAction(argv=python_argv(code), on_clear=True))
    rules = Rules(RulesSettings(rules=[rule]))
    rules.evaluate({"score": 2.0}, now=0.0)
    assert rules.wait(timeout=30)
    rules.evaluate({"score": 0.0}, now=1.0)
    assert rules.wait(timeout=30)
    assert log.read_text().split() == ["fired", "cleared"]


def test_a_command_past_its_timeout_is_killed_and_recorded():
    rule = ThresholdRule(name="hot", input="score", on=1.0,
                         command=CommandAction(argv=python_argv("import time; time.sleep(60)"), timeout_s=0.3))
    rules = Rules(RulesSettings(rules=[rule]))
    rules.evaluate({"score": 2.0}, now=0.0)
    assert rules.wait(timeout=30)
    result = rules.result("hot")
    assert result.timed_out and result.returncode is None and "killed after 0.3 s" in result.error


def test_a_command_that_cannot_start_is_recorded_not_raised(tmp_path):
    missing = str(tmp_path / "no-such-program")
    rule = ThresholdRule(name="hot", input="score", on=1.0, command=CommandAction(argv=[missing]))
    rules = Rules(RulesSettings(rules=[rule]))
    assert rules.evaluate({"score": 2.0}, now=0.0)[0].state == "fired"
    assert rules.wait(timeout=30)
    assert rules.result("hot").error.startswith("FileNotFoundError")
    with pytest.raises(KeyError, match="no rule named 'cold'"):
        rules.result("cold")


# -- GPIO action ----------------------------------------------------------------------------------

def test_gpio_without_gpiozero_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gpiozero", None)  # makes `import gpiozero` fail
    rule = ThresholdRule(name="lamp", input="score", on=1.0, gpio=GpioAction(pin=17))
    with pytest.raises(RuleError, match=r"rule lamp: .*gpiozero.*pip install edgeloop\[gpio\]"):
        Rules(RulesSettings(rules=[rule]))


def test_gpio_output_follows_the_rule_on_a_mock_pin():
    pytest.importorskip("gpiozero", reason="gpiozero is not installed (pip install edgeloop[gpio])")
    from gpiozero.pins.mock import MockFactory

    factory = MockFactory()
    rules = Rules(RulesSettings(rules=[
        ThresholdRule(name="lamp", input="score", on=1.0, off=0.5, gpio=GpioAction(pin=17)),
        ThresholdRule(name="relay", input="score", on=2.0, gpio=GpioAction(pin=27, active_high=False)),
    ]), pin_factory=factory)
    lamp, relay = factory.pin(17), factory.pin(27)
    assert lamp.state == 0 and relay.state == 1  # both outputs off; the relay is active-low
    rules.evaluate({"score": 1.5}, now=0.0)
    assert lamp.state == 1 and relay.state == 1
    rules.evaluate({"score": 2.5}, now=1.0)
    assert lamp.state == 1 and relay.state == 0
    rules.evaluate({"score": 0.1}, now=2.0)
    assert lamp.state == 0 and relay.state == 1
    rules.evaluate({"score": 1.5}, now=3.0)
    rules.close()
    assert lamp.state == 0


def test_gpio_on_a_pin_that_cannot_be_opened_is_a_rule_error():
    pytest.importorskip("gpiozero", reason="gpiozero is not installed (pip install edgeloop[gpio])")
    from gpiozero.pins.mock import MockFactory

    with pytest.raises(RuleError, match="rule lamp: cannot open GPIO pin 'NOPE99'"):
        Rules(RulesSettings(rules=[ThresholdRule(name="lamp", input="score", on=1.0,
                                                 gpio=GpioAction(pin="NOPE99"))]), pin_factory=MockFactory())


def test_settings_round_trip():
    s = RulesSettings(rules=[ThresholdRule(name="a", input="score", on=1.0, gpio=GpioAction(pin=4))])
    assert msgspec.convert(msgspec.to_builtins(s), RulesSettings) == s
