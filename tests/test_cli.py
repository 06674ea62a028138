"""The CLI: lazy imports keep the agent light, configs fail with file and key, packaging extras."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeloop.cli import main

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("sklearn", "skl2onnx", "starlette", "uvicorn", "fastapi", "influxdb_client", "rich")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_agent_side_never_imports_training_or_web_stack():
    loaded = _modules_after(
        "from edge_agent.agent import Agent\n"
        "from edge_agent import config, outbox, inference\n"
        "from edge_agent.sources import create_source\n"
        "src = create_source('simulated', {'profile': 'machine', 'seed': 1})\n"
        "src.read(0, 0.0)\n"
        "from models import features, manifest\n"
        "from edgeloop.cli import main\n"
    )
    assert not {m.split(".")[0] for m in loaded} & set(HEAVY)


def test_agent_help_runs_without_heavy_imports():
    loaded = _modules_after(
        "from click.testing import CliRunner\nfrom edgeloop.cli import main\n"
        "r = CliRunner().invoke(main, ['agent', '--help'])\nassert r.exit_code == 0, r.output\n"
    )
    assert not {m.split(".")[0] for m in loaded} & set(HEAVY)


def test_example_configs_load_as_they_are(tmp_path):
    from aggregator import service
    from edge_agent import config as agent_config

    runner = CliRunner()
    for command, loader in (("agent", agent_config.load), ("aggregator", service.load)):
        result = runner.invoke(main, [command, "--example-config"])
        assert result.exit_code == 0, result.output
        path = tmp_path / f"{command}.toml"
        path.write_text(result.output)
        loader(path)  # raises ConfigError if the example were wrong


def test_bad_config_names_file_and_key(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "d1"\n[sampling]\nrate_hz = "fast"\n')
    result = CliRunner().invoke(main, ["agent", "--config", str(path)])
    assert result.exit_code != 0
    assert str(path) in result.output and "sampling.rate_hz" in result.output


def test_unknown_key_and_bad_device_id_are_named(tmp_path):
    from edge_agent import config as agent_config
    from edgeloop.config import ConfigError

    path = tmp_path / "agent.toml"
    path.write_text('device_id = "d1"\n[mqtt]\nurll = "mqtt://x"\n')
    with pytest.raises(ConfigError, match=r"agent.toml.*urll"):
        agent_config.load(path)
    path.write_text('device_id = "bad id,with=comma"\n')
    with pytest.raises(ConfigError, match=r"key 'device_id'"):
        agent_config.load(path)


def test_bad_command_line_value_is_named():
    result = CliRunner().invoke(main, ["demo", "--devices", "0"])
    assert result.exit_code == 2 and "--devices" in result.output


@pytest.mark.slow
def test_agent_extra_does_not_pull_scikit_learn(tmp_path):
    """Resolve `pip install .[agent]` from scratch (a dry run: nothing is installed)."""
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), f"{REPO}[agent]"],
        check=True, cwd=tmp_path, timeout=600,
    )
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"onnxruntime", "paho-mqtt", "msgspec", "numpy"} <= names
    assert not names & {"scikit-learn", "skl2onnx", "starlette", "uvicorn", "fastapi", "influxdb-client"}
