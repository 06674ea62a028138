"""`edgeloop simulate --scenario` end to end: a small mixed scenario through the real agents, the
embedded broker and store (no servers), with a network cut; its files say what happened."""

from __future__ import annotations

import json

import pytest

from edgeloop.cli_simulate import run_scenario
from simulators.scenario import parse

pytestmark = pytest.mark.slow


def test_a_scenario_runs_and_writes_ground_truth_events_and_scores(tmp_path):
    scenario = parse({
        "name": "tiny", "seed": 5, "duration_s": 600, "speed": 30, "lead_s": 30,
        "fleet": [
            {"profile": "machine", "count": 1,
             "faults": [{"kind": "sudden", "start_s": 300, "duration_s": 200, "size": 1.0}]},
            {"profile": "cold-chain", "count": 1},
        ],
        "cuts": [{"start_s": 120, "duration_s": 60}],
    }, "tiny")
    lines: list[str] = []
    run_dir = run_scenario(scenario, out_dir=tmp_path / "run", say=lines.append, drain_timeout_s=60)
    truth = json.loads((run_dir / "ground-truth.json").read_text())
    assert json.dumps(truth).count("sudden") >= 1, truth
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    devices = {e["device"] for e in events}
    assert len(devices) == 2, devices  # both profiles scored their windows
    assert any(e["type"] == "inference" for e in events)
    scores = json.loads((run_dir / "scores.json").read_text())
    assert scores, "scores.json is empty"
    assert any("inference rows stored" in line for line in lines), lines
