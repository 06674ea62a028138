"""Scenario files (simulators/scenario.py), the shipped examples, and `edgeloop simulate --list-profiles`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgeloop.cli import main
from simulators import profiles
from simulators.scenario import EXAMPLES, ScenarioError, load, parse

SHIPPED = sorted(EXAMPLES.glob("*.toml"))


def test_examples_cover_every_profile_a_mix_and_drift():
    names = {p.stem for p in SHIPPED}
    assert {"machine", "cold-chain", "wearable", "mixed-fleet", "drift"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_scenarios_load_and_build_their_simulators(path):
    s = load(path)
    assert s.devices and len({d.id for d in s.devices}) == len(s.devices)
    assert any(d.faults for d in s.devices)
    for d in s.devices:
        sim = profiles.create(d.profile, seed=d.seed, rate_hz=s.rate_hz, faults=d.faults, drift=d.drift)
        assert sim.block(0, 10).shape == (10, len(profiles.get(d.profile).channels))
    json.dumps(s.to_dict())  # a plain data form


def test_plain_data_form(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("""
seed = 5
duration_s = 100
[[fleet]]
profile = "cold-chain"
count = 4
prefix = "fridge"
[[fleet.faults]]
kind = "door_left_open"
start_s = 10
duration_s = 20
share = 0.5
jitter_s = 5
[[fleet.drift]]
kind = "recalibration"
channel = "cabinet_temp"
start_s = 50
size = 0.5
[[cuts]]
devices = ["fridge-02"]
start_s = 30
duration_s = 5
[[clock_steps]]
at_s = 40
step_s = -2.5
""")
    s = load(path)
    assert [d.id for d in s.devices] == ["fridge-01", "fridge-02", "fridge-03", "fridge-04"]
    with_fault = [d for d in s.devices if d.faults]
    assert len(with_fault) == 2 and all(10 <= d.faults[0]["start_s"] <= 15 for d in with_fault)
    assert all(d.drift == [{"kind": "recalibration", "start_s": 50.0, "ramp_s": 0.0, "size": 0.5,
                            "channel": "cabinet_temp"}] for d in s.devices)
    assert [len(d.cuts) for d in s.devices] == [0, 1, 0, 0] and s.cuts == []
    assert all(len(d.clock_steps) == 1 for d in s.devices) and s.clock_steps[0].step_s == -2.5
    assert load(path).to_dict() == s.to_dict()  # same seed, same fleet
    opts = s.devices[0].source_options(10.0)
    assert opts["profile"] == "cold-chain" and opts["faults"] == s.devices[0].faults


@pytest.mark.parametrize(
    "text, key, match",
    [
        ("[[fleet]]\nprofile = 'pump'", "fleet[0].profile", "unknown simulator profile 'pump'"),
        ("[[fleet]]\nprofile = 'machine'\ncont = 2", "fleet[0].cont", "not known here"),
        ("[[fleet]]\nprofile = 'machine'\n[[fleet.faults]]\nkind = 'melt'\nstart_s = 1",
         "fleet[0].faults[0].kind", "unknown fault kind 'melt'.*bearing_wear"),
        ("[[fleet]]\nprofile = 'machine'\n[[fleet.faults]]\nkind = 'sudden'", "fleet[0].faults[0].start_s", "missing"),
        ("[[fleet]]\nprofile = 'machine'\n[[fleet.faults]]\nkind = 'stuck'\nstart_s = 1",
         "fleet[0].faults[0].channel", "missing"),
        ("[[fleet]]\nprofile = 'wearable'\n[[fleet.drift]]\nkind = 'ambient'\nstart_s = 'soon'",
         "fleet[0].drift[0].start_s", "must be a number"),
        ("duration_s = -5\n[[fleet]]\nprofile = 'machine'", "duration_s", "> 0"),
        ("seed = 1", "fleet", "at least one"),
        ("[[fleet]]\nprofile = 'machine'\n[[cuts]]\ndevices = ['nope']\nstart_s = 1\nduration_s = 1",
         "cuts[0].devices", "no device 'nope'"),
    ],
)
def test_bad_scenarios_name_the_file_and_the_key(tmp_path, text, key, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError, match=match) as err:
        load(path)
    assert str(path) in str(err.value) and f"key '{key}'" in str(err.value)


def test_unreadable_scenarios(tmp_path):
    with pytest.raises(ScenarioError, match="not valid TOML"):
        (tmp_path / "x.toml").write_text("[[fleet")
        load(tmp_path / "x.toml")
    with pytest.raises(ScenarioError, match="cannot read"):
        load(tmp_path / "missing.toml")
    with pytest.raises(ScenarioError, match="repeats"):
        parse({"fleet": [{"profile": "machine"}, {"profile": "machine"}]})


def test_simulate_list_profiles():
    out = CliRunner().invoke(main, ["simulate", "--list-profiles"])
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["machine", "cold-chain", "wearable"]
    assert all(len(line.split(maxsplit=1)[1]) > 20 for line in lines)  # a description each
    as_json = json.loads(CliRunner().invoke(main, ["simulate", "--list-profiles", "--json"]).output)
    assert [p["name"] for p in as_json] == ["machine", "cold-chain", "wearable"]
    assert {"stuck", "spike", "dropout"} == set(as_json[0]["sensor_faults"])


def test_simulate_names_a_bad_scenario(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[[fleet]]\nprofile = 'pump'")
    out = CliRunner().invoke(main, ["simulate", "--scenario", str(path)])
    assert out.exit_code != 0 and "fleet[0].profile" in out.output and str(path) in out.output
    usage = CliRunner().invoke(main, ["simulate"])
    assert usage.exit_code == 2 and "--scenario" in usage.output
