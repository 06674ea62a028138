"""Local rules: threshold alerts on the device, with hysteresis, cool-down and optional actions.

A rule watches one named input (the model's ``score``, a channel, or a feature name) and fires
when the value crosses ``on`` (``direction = "above"``: value >= on; ``"below"``: value <= on). It
clears only once the value is back past ``off`` (above: value < off; below: value > off), so a
value hovering at the threshold does not flap; ``off`` defaults to ``on`` (no hysteresis). After a
fire, the rule does not fire again for ``cooldown_s`` seconds, even if it cleared in between.
``now`` should be ``time.monotonic()`` so that a wall-clock step cannot cut a cool-down short.

A fired rule may act locally, without waiting for the cloud:

* ``command``: an argv list run without a shell, in a background thread (the agent loop never
  waits on it), with ``EDGELOOP_RULE``, ``EDGELOOP_VALUE``, ``EDGELOOP_STATE`` and
  ``EDGELOOP_SEVERITY`` in its environment, killed after ``timeout_s``. While a rule's command
  still runs, a new event of that rule does not start another one (it is counted as skipped).
* ``gpio``: a digital output through gpiozero (``pip install edgeloop[gpio]``), on while the rule
  is fired and off once it clears.

Use::

    from edge_agent.rules import Rules, RulesSettings
    rules = Rules(config.rules)               # RulesSettings; raises RuleError on a bad action
    for event in rules.evaluate({"score": score, **features}, now=time.monotonic()):
        outbox.append(event.alert(device=..., seq=..., ts=time.time(), window_end=t))
    rules.status()   # {"vib_high": {"active": True, "fired": 3, "cleared": 2, "action": {...}}}
    rules.close()    # on shutdown: waits briefly for commands, turns GPIO outputs off

Configuration (TOML)::

    [[rules.rules]]
    name = "vib_rms_high"           # goes into the Alert message: ^[A-Za-z][A-Za-z0-9_]{0,63}$
    input = "vibration_rms"
    on = 0.8
    off = 0.6
    cooldown_s = 60.0
    severity = "warning"
    command = { argv = ["/usr/local/bin/stop-conveyor"], timeout_s = 5.0 }
    gpio = { pin = 17 }
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Mapping

from msgspec import Meta, Struct

from edgeloop import wire
from edgeloop.wire import NAME_PATTERN

__all__ = [
    "RuleError",
    "CommandAction",
    "GpioAction",
    "ThresholdRule",
    "RulesSettings",
    "AlertEvent",
    "ActionResult",
    "Rules",
]

_NAME_RE = re.compile(NAME_PATTERN)
_Name = Annotated[str, Meta(pattern=NAME_PATTERN)]
GPIO_HINT = "pip install edgeloop[gpio]"


class RuleError(ValueError):
    """A rule that cannot be set up (bad configuration or a missing optional dependency)."""


class CommandAction(Struct, kw_only=True, forbid_unknown_fields=True):
    """Run ``argv`` (no shell) when the rule fires, and also when it clears if ``on_clear``."""

    argv: Annotated[list[str], Meta(min_length=1)]
    timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    on_clear: bool = False


class GpioAction(Struct, kw_only=True, forbid_unknown_fields=True):
    """Drive a digital output while the rule is fired (pin: BCM number or gpiozero name)."""

    pin: int | str
    active_high: bool = True


class ThresholdRule(Struct, kw_only=True, forbid_unknown_fields=True):
    """Fire when ``input`` reaches ``on``, clear once it is back past ``off``."""

    name: _Name
    input: _Name
    on: float
    off: float | None = None
    direction: Literal["above", "below"] = "above"
    cooldown_s: Annotated[float, Meta(ge=0)] = 0.0
    severity: Literal["info", "warning", "critical"] = "warning"
    command: CommandAction | None = None
    gpio: GpioAction | None = None

    def __post_init__(self) -> None:
        # Checked here too: constructing a Struct directly skips the Meta pattern.
        for key in ("name", "input"):
            if not _NAME_RE.match(getattr(self, key)):
                raise ValueError(f"rule {key} {getattr(self, key)!r} must match {NAME_PATTERN}")
        if not math.isfinite(self.on):
            raise ValueError(f"rule {self.name}: 'on' must be finite, got {self.on}")
        if self.off is None:
            self.off = self.on
        elif not math.isfinite(self.off):
            raise ValueError(f"rule {self.name}: 'off' must be finite, got {self.off}")
        if self.direction == "above" and self.off > self.on:
            raise ValueError(f"rule {self.name}: an 'above' rule needs off <= on, got on={self.on} off={self.off}")
        if self.direction == "below" and self.off < self.on:
            raise ValueError(f"rule {self.name}: a 'below' rule needs off >= on, got on={self.on} off={self.off}")


class RulesSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    rules: list[ThresholdRule] = []

    def __post_init__(self) -> None:
        names = [r.name for r in self.rules]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"rule names repeat: {repeated}")


@dataclass(frozen=True)
class AlertEvent:
    """A rule changed state: ``state`` is ``"fired"`` or ``"cleared"``; ``at`` is the ``now`` given."""

    rule: str
    severity: str
    value: float
    state: Literal["fired", "cleared"]
    input: str
    threshold: float
    at: float
    message: str  # e.g. "vibration_rms 0.91 >= 0.8 (fired)"

    def alert(self, *, device: str, seq: int, ts: float, window_end: float, profile: str = "") -> wire.Alert:
        """The wire ``Alert`` for this event (the state is in the message; the contract has no field)."""
        return wire.Alert(v=wire.SCHEMA_VERSION, device=device, seq=seq, ts=ts, profile=profile,
                          rule=self.rule, severity=self.severity, value=self.value,
                          window_end=window_end, message=self.message)


@dataclass
class ActionResult:
    """How a rule's last command went; ``returncode`` is None while it runs or when it failed to start."""

    argv: list[str]
    state: str
    started: float  # time.monotonic()
    running: bool = True
    returncode: int | None = None
    timed_out: bool = False
    error: str | None = None
    duration_s: float | None = None


class _RuleState:
    __slots__ = ("rule", "active", "last_fire", "fired", "cleared", "missing", "last_value",
                 "device", "thread", "result", "commands", "skipped", "gpio_errors")

    def __init__(self, rule: ThresholdRule) -> None:
        self.rule = rule
        self.active = False
        self.last_fire: float | None = None
        self.fired = self.cleared = self.missing = 0
        self.last_value: float | None = None
        self.device: Any = None  # gpiozero output
        self.thread: threading.Thread | None = None
        self.result: ActionResult | None = None
        self.commands = self.skipped = self.gpio_errors = 0


_OPS = {("above", "fired"): ">=", ("above", "cleared"): "<", ("below", "fired"): "<=", ("below", "cleared"): ">"}


def _event(rule: ThresholdRule, value: float, state: str, now: float) -> AlertEvent:
    threshold = rule.on if state == "fired" else rule.off
    op = _OPS[rule.direction, state]
    return AlertEvent(rule=rule.name, severity=rule.severity, value=value, state=state, input=rule.input,
                      threshold=threshold, at=now, message=f"{rule.input} {value:.6g} {op} {threshold:.6g} ({state})")


def _gpio_output(action: GpioAction, pin_factory: Any) -> Any:
    try:
        import gpiozero
    except ImportError as exc:
        raise RuleError(f"a gpio action needs gpiozero, which is not installed: {GPIO_HINT}") from exc
    try:
        return gpiozero.DigitalOutputDevice(action.pin, active_high=action.active_high,
                                            initial_value=False, pin_factory=pin_factory)
    except Exception as exc:  # gpiozero raises many kinds: bad pin, pin in use, no pin library
        raise RuleError(f"cannot open GPIO pin {action.pin!r}: {exc}") from exc


class Rules:
    """Evaluates a set of threshold rules and runs their actions (one caller thread)."""

    def __init__(self, settings: RulesSettings | None = None, *, pin_factory: Any = None) -> None:
        self.settings = settings if settings is not None else RulesSettings()
        self._states = [_RuleState(r) for r in self.settings.rules]
        try:
            for st in self._states:
                if st.rule.gpio is not None:
                    try:
                        st.device = _gpio_output(st.rule.gpio, pin_factory)
                    except RuleError as exc:
                        raise RuleError(f"rule {st.rule.name}: {exc}") from exc.__cause__
        except BaseException:
            self.close(timeout=0)
            raise

    def evaluate(self, inputs: Mapping[str, float | None], now: float) -> list[AlertEvent]:
        """Feed the latest values; the rules that fired or cleared, in configuration order.

        An input that is absent, None or not finite leaves its rules as they are (counted as missing).
        """
        events: list[AlertEvent] = []
        for st in self._states:
            rule = st.rule
            value = inputs.get(rule.input)
            if value is None or not math.isfinite(value):
                st.missing += 1
                continue
            value = float(value)
            st.last_value = value
            above = rule.direction == "above"
            if not st.active:
                hit = value >= rule.on if above else value <= rule.on
                if hit and (st.last_fire is None or now - st.last_fire >= rule.cooldown_s):
                    st.active, st.last_fire = True, now
                    st.fired += 1
                    event = _event(rule, value, "fired", now)
                    events.append(event)
                    self._act(st, event)
            else:
                back = value < rule.off if above else value > rule.off
                if back:
                    st.active = False
                    st.cleared += 1
                    event = _event(rule, value, "cleared", now)
                    events.append(event)
                    self._act(st, event)
        return events

    # -- actions ----------------------------------------------------------------------------------

    def _act(self, st: _RuleState, event: AlertEvent) -> None:
        if st.device is not None:
            try:
                st.device.on() if event.state == "fired" else st.device.off()
            except Exception:  # a flaky pin must not stop the agent; counted for status
                st.gpio_errors += 1
        cmd = st.rule.command
        if cmd is None or (event.state == "cleared" and not cmd.on_clear):
            return
        if st.thread is not None and st.thread.is_alive():
            st.skipped += 1
            return
        st.commands += 1
        result = ActionResult(argv=list(cmd.argv), state=event.state, started=time.monotonic())
        st.result = result
        env = dict(os.environ, EDGELOOP_RULE=event.rule, EDGELOOP_VALUE=repr(event.value),
                   EDGELOOP_STATE=event.state, EDGELOOP_SEVERITY=event.severity)
        st.thread = threading.Thread(target=_run_command, args=(cmd, env, result),
                                     name=f"rule-{event.rule}", daemon=True)
        st.thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for running commands; True if none is still running (for tests and shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for st in self._states:
            if st.thread is not None:
                st.thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(st.thread is not None and st.thread.is_alive() for st in self._states)

    def close(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` for commands, then turn GPIO outputs off and release them."""
        self.wait(timeout)
        for st in self._states:
            if st.device is not None:
                try:
                    st.device.off()
                    st.device.close()
                except Exception:
                    pass
                st.device = None

    def status(self) -> dict[str, dict]:
        """Per rule: state, counters, the last value and the last command's outcome."""
        out = {}
        for st in self._states:
            r = st.result
            out[st.rule.name] = {
                "active": st.active, "fired": st.fired, "cleared": st.cleared, "missing": st.missing,
                "last_value": st.last_value, "commands": st.commands, "skipped": st.skipped,
                "gpio_errors": st.gpio_errors,
                "last_command": None if r is None else {
                    "running": r.running, "returncode": r.returncode, "timed_out": r.timed_out,
                    "error": r.error, "duration_s": r.duration_s, "state": r.state},
            }
        return out

    def result(self, name: str) -> ActionResult | None:
        """The last command outcome of rule ``name``."""
        for st in self._states:
            if st.rule.name == name:
                return st.result
        raise KeyError(f"no rule named {name!r}")


def _run_command(cmd: CommandAction, env: dict[str, str], result: ActionResult) -> None:
    """Runs in a rule's thread: the command's output is discarded, its outcome recorded."""
    try:
        done = subprocess.run(cmd.argv, env=env, timeout=cmd.timeout_s, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        result.returncode = done.returncode
    except subprocess.TimeoutExpired:
        result.timed_out = True  # subprocess.run killed it
        result.error = f"killed after {cmd.timeout_s} s"
    except OSError as exc:  # not found, not executable
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.duration_s = time.monotonic() - result.started
        result.running = False
