"""The loop proven on the drift scenario, and the quick demo end to end.

``test_the_loop_restores_f1_after_drift_and_a_frozen_model_does_not`` runs the example
``drift.toml`` (six machines for two hours: a 40-min warm-up with bearing wear, ambient and
regime drift, sudden faults after) through :func:`simulators.story.run_story`: embedded broker, SQLite store, the real
retrainer and rollout manager, every device a real agent on the fleet runner. The scenario's own
seed (31) was not used to pick any setting (those were tried on seed offsets 1000-3000). Its bar
is the issue's: the loop's post-drift F1 >= 0.9 while the frozen first model stays below 0.9.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_the_loop_restores_f1_after_drift_and_a_frozen_model_does_not(tmp_path):
    from simulators.scenario import EXAMPLES, load
    from simulators.story import StoryOptions, run_story

    lines: list[str] = []
    # A model sees a whole load cycle (~30 min) before it is trusted: 40 min of warm-up; drift is
    # judged on 5 min by the share of rows outside the training range (PSI on 5 min of a 30-min
    # cycle reads the cycle's phase as drift) and retrained models learn from all stored clean rows.
    speed = 120.0
    result = run_story(StoryOptions(scenario=load(EXAMPLES / "drift.toml"), speed=speed, data_dir=str(tmp_path),
                                    warmup_s=2400.0, recent_s=300.0, range_threshold=0.05, train_s=7200.0,
                                    check_every_s=120.0 / speed, say=lambda m: lines.append(str(m))))
    story = "\n".join(lines)
    assert result.delivered, (result.unconfirmed, story)
    assert any(reason == "drift" for _, reason, _ in result.retrains), story
    assert "machine" in result.after, f"no retrained champion served after the drift:\n{story}"
    # "Brings F1 back after the drift": a model can only be trained on the new regime once it has
    # seen a whole operating cycle of it (~30 min), so F1 is judged from one cycle after the drift
    # settled. From the very moment it settled the loop still leads the frozen model, by less
    # (measured 0.47-0.48 vs 0.09-0.10 on this scenario): asserted too, without a bar.
    recovered, frozen = result.recovered["machine"], result.frozen_recovered["machine"]
    assert recovered.windows == frozen.windows > 0  # the same windows, scored both ways
    assert recovered.f1 >= 0.9, (recovered, frozen, story)
    assert frozen.f1 < 0.9, (recovered, frozen, story)
    after, frozen_after = result.after["machine"], result.frozen_after["machine"]
    assert after.f1 > frozen_after.f1, (after, frozen_after, story)


def test_quick_demo_names_every_phase_and_the_dashboard(tmp_path):
    result = subprocess.run([sys.executable, "-m", "edgeloop.cli", "demo", "--quick", "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/", out), out
    for phase in ("online", "warm-up", "first model", "faults", "drift", "drain"):
        assert f"[phase] {phase}" in out, f"phase {phase!r} not narrated:\n{out}"
    assert "rollout machine/" in out and "F1" in out, out
    sent = int(re.search(r"readings sent\s*│\s*([\d,]+)", out).group(1).replace(",", ""))
    stored = int(re.search(r"readings stored\s*│\s*([\d,]+)", out).group(1).replace(",", ""))
    assert sent == stored > 0
    # State went to the data directory given, nowhere near the installed package.
    assert list((tmp_path / "demo").glob("*/aggregator/store.sqlite"))
