"""Scenarios: a simulated fleet, its faults, drift, network cuts and clock steps, from TOML.

A scenario file (examples in ``simulators/scenarios/``)::

    name = "mixed-fleet"
    seed = 7                  # every device seed and fault jitter derives from it
    duration_s = 600          # simulated seconds (device time)
    rate_hz = 10.0
    window_s = 5.0
    speed = 1.0               # time acceleration (device seconds per real second)
    lead_s = 30.0             # scoring: an alarm this long before a fault still counts

    [[fleet]]                 # a group of devices of one profile
    profile = "machine"
    count = 4
    prefix = "machine"        # device ids: machine-01, machine-02, ... (default: the profile)

    [[fleet.faults]]          # faults of this group
    kind = "bearing_wear"
    start_s = 200
    duration_s = 300
    size = 1.0
    share = 0.5               # share of the group's devices that get it (the next ones in turn)
    jitter_s = 60             # each device's start moves by up to this many seconds (from the seed)

    [[fleet.drift]]           # concept drift of this group (kind, start_s, size, ramp_s, channel, share)
    kind = "ambient"
    start_s = 400
    size = 6.0

    [[cuts]]                  # network cuts: the whole fleet, one profile or named devices
    start_s = 300
    duration_s = 30
    devices = ["machine-01"]  # or profile = "machine"; neither: every device

    [[clock_steps]]           # wall-clock steps on the devices
    at_s = 120
    step_s = -5.0

:func:`load` returns a :class:`Scenario`, a plain data form: ``scenario.devices`` is a list of
:class:`DeviceSpec` (id, profile, seed, faults and drift as dicts with per-device start times,
and the cuts and clock steps that apply to that device), which the fleet runner, the demo and the
ground truth consume. Errors are :class:`ScenarioError` naming the file and the key.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from simulators import profiles

__all__ = ["ScenarioError", "Cut", "ClockStep", "DeviceSpec", "Scenario", "load", "parse", "EXAMPLES"]

#: The example scenarios shipped with edgeloop.
EXAMPLES = Path(__file__).with_name("scenarios")

_TOP = {"name", "description", "seed", "duration_s", "rate_hz", "window_s", "speed", "lead_s",
        "fleet", "cuts", "clock_steps"}
_FLEET = {"profile", "count", "prefix", "seed", "faults", "drift"}
_FAULT = {"kind", "start_s", "duration_s", "size", "ramp_s", "channel", "share", "jitter_s"}
_DRIFT = {"kind", "start_s", "size", "ramp_s", "duration_s", "channel", "share", "jitter_s"}
_CUT = {"start_s", "duration_s", "devices", "profile"}
_STEP = {"at_s", "step_s", "devices", "profile"}


class ScenarioError(ValueError):
    """A scenario that cannot be loaded; the message names the file and the key."""


@dataclass(frozen=True)
class Cut:
    """A network cut of ``duration_s`` seconds from ``start_s`` (device time since the start)."""

    start_s: float
    duration_s: float


@dataclass(frozen=True)
class ClockStep:
    """The device's wall clock jumps by ``step_s`` seconds at ``at_s``."""

    at_s: float
    step_s: float


@dataclass
class DeviceSpec:
    """One simulated device: what a runner needs to build its agent and its ground truth."""

    id: str
    profile: str
    seed: int
    faults: list[dict[str, Any]] = field(default_factory=list)
    drift: list[dict[str, Any]] = field(default_factory=list)
    cuts: list[Cut] = field(default_factory=list)
    clock_steps: list[ClockStep] = field(default_factory=list)

    def source_options(self, rate_hz: float) -> dict[str, Any]:
        """Options of the ``simulated`` source that plays this device."""
        return {"profile": self.profile, "seed": self.seed, "rate_hz": rate_hz,
                "faults": [dict(f) for f in self.faults], "drift": [dict(d) for d in self.drift]}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Scenario:
    name: str
    seed: int
    duration_s: float
    rate_hz: float
    window_s: float
    speed: float
    lead_s: float
    devices: list[DeviceSpec]
    cuts: list[Cut]
    clock_steps: list[ClockStep]
    description: str = ""
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load(path: str | Path) -> Scenario:
    """Read and check a scenario file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ScenarioError(f"scenario {path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"scenario {path}: not valid TOML: {exc}") from None
    return parse(raw, source=str(path))


def parse(raw: dict[str, Any], source: str = "<scenario>") -> Scenario:
    """Check a scenario given as a dict (what the TOML holds); ``source`` names it in errors."""
    c = _Checker(source)
    c.keys(raw, _TOP, "")
    seed = c.integer(raw, "seed", "", default=0)
    duration = c.number(raw, "duration_s", "", default=600.0, positive=True)
    rate = c.number(raw, "rate_hz", "", default=10.0, positive=True)
    scenario = Scenario(
        name=c.text(raw, "name", "", default=Path(source).stem),
        description=c.text(raw, "description", "", default=""),
        seed=seed, duration_s=duration, rate_hz=rate,
        window_s=c.number(raw, "window_s", "", default=5.0, positive=True),
        speed=c.number(raw, "speed", "", default=1.0, positive=True),
        lead_s=c.number(raw, "lead_s", "", default=0.0),
        devices=[], cuts=[], clock_steps=[], path=source if source != "<scenario>" else None,
    )
    fleet = c.table_list(raw, "fleet", "")
    if not fleet:
        raise ScenarioError(f"scenario {source}: key 'fleet': at least one [[fleet]] group is needed")
    used: set[str] = set()
    for g, group in enumerate(fleet):
        where = f"fleet[{g}]."
        c.keys(group, _FLEET, where)
        if "profile" not in group:
            raise ScenarioError(f"scenario {source}: key '{where}profile' is missing; profiles: {', '.join(profiles.names())}")
        name = c.text(group, "profile", where)
        try:
            profile = profiles.get(name)
        except ValueError as exc:
            raise ScenarioError(f"scenario {source}: key '{where}profile': {exc}") from None
        count = c.integer(group, "count", where, default=1, low=1)
        prefix = c.text(group, "prefix", where, default=profile.name)
        group_seed = c.integer(group, "seed", where, default=seed * 1000 + 100 * g)
        specs = []
        for k in range(count):
            device = f"{prefix}-{k + 1:02d}"
            if device in used:
                raise ScenarioError(f"scenario {source}: key '{where}prefix': device id {device!r} repeats; "
                                    "give each group its own prefix")
            used.add(device)
            specs.append(DeviceSpec(id=device, profile=profile.name, seed=group_seed + k))
        cursor = 0  # faults go to the next devices in turn, so that they spread over the group
        for kind_key, allowed, keys in (("faults", profile.fault_kinds + profiles.SENSOR_FAULTS, _FAULT),
                                        ("drift", profiles.DRIFT_KINDS, _DRIFT)):
            for e, item in enumerate(c.table_list(group, kind_key, where)):
                at = f"{where}{kind_key}[{e}]."
                c.keys(item, keys, at)
                event = _event(c, item, at, allowed, profile, duration, kind_key)
                share = c.number(item, "share", at, default=1.0)
                if not 0 < share <= 1:
                    raise ScenarioError(f"scenario {source}: key '{at}share' must be in (0, 1], got {share!r}")
                jitter = c.number(item, "jitter_s", at, default=0.0)
                take = max(1, math.ceil(share * count - 1e-9))
                chosen = [specs[(cursor + j) % count] for j in range(take)]
                cursor += take if kind_key == "faults" else 0
                for spec in chosen:
                    moved = dict(event)
                    if jitter:
                        moved["start_s"] = event["start_s"] + _unit(seed, spec.seed, g * 100 + e) * jitter
                    getattr(spec, kind_key).append(moved)
        scenario.devices.extend(specs)

    for kind_key, keys, cls in (("cuts", _CUT, Cut), ("clock_steps", _STEP, ClockStep)):
        for e, item in enumerate(c.table_list(raw, kind_key, "")):
            at = f"{kind_key}[{e}]."
            c.keys(item, keys, at)
            if cls is Cut:
                obj = Cut(c.number(item, "start_s", at), c.number(item, "duration_s", at, positive=True))
            else:
                obj = ClockStep(c.number(item, "at_s", at), c.number(item, "step_s", at, low=-math.inf))
            targets = _targets(c, item, at, scenario.devices)
            if len(targets) == len(scenario.devices):
                getattr(scenario, kind_key).append(obj)
            for spec in targets:
                getattr(spec, kind_key).append(obj)
    return scenario


def _event(c: "_Checker", item: dict, at: str, allowed: tuple[str, ...], profile, duration: float, what: str) -> dict:
    kind = c.text(item, "kind", at)
    if kind not in allowed:
        raise ScenarioError(f"scenario {c.source}: key '{at}kind': unknown {what[:-1] if what == 'faults' else what} "
                            f"kind {kind!r} for profile {profile.name!r}; known: {', '.join(allowed)}")
    event: dict[str, Any] = {"kind": kind, "start_s": c.number(item, "start_s", at)}
    if what == "faults":
        event["duration_s"] = c.number(item, "duration_s", at, default=duration, positive=True)
        if "ramp_s" in item:
            event["ramp_s"] = c.number(item, "ramp_s", at)
    else:
        event["ramp_s"] = c.number(item, "ramp_s", at, default=0.0)
        if "duration_s" in item:
            event["duration_s"] = c.number(item, "duration_s", at, positive=True)
    event["size"] = c.number(item, "size", at, default=1.0, low=-math.inf if what == "drift" else 0.0)
    if "channel" in item:
        channel = c.text(item, "channel", at)
        if channel not in profile.channels:
            raise ScenarioError(f"scenario {c.source}: key '{at}channel': profile {profile.name!r} has no channel "
                                f"{channel!r}; channels: {', '.join(profile.channels)}")
        event["channel"] = channel
    needs_channel = kind in profiles.SENSOR_FAULTS or kind == "recalibration"
    if needs_channel and "channel" not in event:
        raise ScenarioError(f"scenario {c.source}: key '{at}channel' is missing; {kind!r} needs one of "
                            f"{', '.join(profile.channels)}")
    return event


def _targets(c: "_Checker", item: dict, at: str, devices: list[DeviceSpec]) -> list[DeviceSpec]:
    if "devices" in item:
        names = item["devices"]
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ScenarioError(f"scenario {c.source}: key '{at}devices' must be a list of device ids")
        known = {d.id: d for d in devices}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ScenarioError(f"scenario {c.source}: key '{at}devices': no device {unknown[0]!r}; "
                                f"devices: {', '.join(known)}")
        return [known[n] for n in names]
    if "profile" in item:
        profile = c.text(item, "profile", at)
        chosen = [d for d in devices if d.profile == profile]
        if not chosen:
            raise ScenarioError(f"scenario {c.source}: key '{at}profile': no device of profile {profile!r}")
        return chosen
    return list(devices)


def _unit(*parts: int) -> float:
    """A uniform number in [0, 1) from integers (deterministic jitter)."""
    import hashlib

    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class _Checker:
    """Typed reads of scenario keys; every error names the file and the full key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, what: str) -> ScenarioError:
        return ScenarioError(f"scenario {self.source}: key '{key}' {what}")

    def keys(self, table: Any, allowed: set[str], where: str) -> None:
        if not isinstance(table, dict):
            raise self.fail(where.rstrip(".") or "(top)", "must be a table")
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise self.fail(where + unknown[0], f"is not known here; known keys: {', '.join(sorted(allowed))}")

    def text(self, table: dict, key: str, where: str, default: str | None = None) -> str:
        if key not in table:
            if default is None:
                raise self.fail(where + key, "is missing")
            return default
        value = table[key]
        if not isinstance(value, str) or not value:
            raise self.fail(where + key, f"must be a non-empty string, got {value!r}")
        return value

    def number(self, table: dict, key: str, where: str, default: float | None = None,
               positive: bool = False, low: float = 0.0) -> float:
        if key not in table:
            if default is None:
                raise self.fail(where + key, "is missing")
            return float(default)
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(where + key, f"must be a number, got {value!r}")
        if positive and not value > 0:
            raise self.fail(where + key, f"must be > 0, got {value!r}")
        if not value >= low:
            raise self.fail(where + key, f"must be >= {low:g}, got {value!r}")
        return float(value)

    def integer(self, table: dict, key: str, where: str, default: int | None = None, low: int = 0) -> int:
        if key not in table:
            if default is None:
                raise self.fail(where + key, "is missing")
            return default
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self.fail(where + key, f"must be an integer >= {low}, got {value!r}")
        return value

    def table_list(self, table: dict, key: str, where: str) -> list[dict]:
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(where + key, "must be an array of tables ([[...]])")
        return value
