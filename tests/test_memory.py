"""The agent's memory measures: freed heap given back (after a model load, and from the loop now and
then), a small SQLite page cache, no CLI command modules but the agent's own, and a clean run
under ``python -OO`` (the systemd unit's PYTHONOPTIMIZE=2)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edge_agent import memory
from edge_agent.config import AgentConfig, MqttSettings, SamplingSettings
from edge_agent.inference import Model, SessionCache
from edge_agent.outbox import CACHE_KIB, Outbox
from models.training import simulated_training_set, train_isolation_forest
from tests.waiting import poll

ROOT = Path(__file__).resolve().parent.parent
GLIBC = memory.release_freed_memory()  # also the first real call: True where glibc's malloc_trim exists


def _run(code: str, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONOPTIMIZE"}
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(ROOT), env=env)


@pytest.fixture(scope="module")
def small_model():
    X, names = simulated_training_set("machine", seed=1, windows=300)
    return train_isolation_forest(X, names, version="mem-1", profile="machine", seed=1, n_estimators=10,
                                  max_samples=256)


def test_release_freed_memory_calls_malloc_trim_where_there_is_glibc():
    if not GLIBC:
        pytest.skip("no glibc malloc_trim on this system")
    before = memory.trims()
    assert memory.release_freed_memory() is True
    assert memory.trims() == before + 1


def test_periodic_trim_trims_once_per_interval():
    schedule = memory.PeriodicTrim(10.0, now=100.0)
    assert schedule.maybe(105.0) is False  # not due yet
    assert schedule.maybe(110.0) is GLIBC
    assert schedule.maybe(115.0) is False  # the interval starts again from the trim
    assert schedule.maybe(120.5) is GLIBC
    assert schedule.done == (2 if GLIBC else 0)
    off = memory.PeriodicTrim(0.0)
    assert not any(off.maybe(t) for t in (0.0, 1e6, 1e9))


def test_model_load_trims_after_building_a_session_but_not_on_a_cache_hit(small_model):
    if not GLIBC:
        pytest.skip("no glibc malloc_trim on this system")
    onnx_bytes, manifest = small_model
    cache = SessionCache()
    before = memory.trims()
    first = Model.load((onnx_bytes, manifest), cache=cache)  # kept alive: the cache holds weak references
    assert memory.trims() == before + 1, "a new session was built: its scratch memory must be given back"
    second = Model.load((onnx_bytes, manifest), cache=cache)
    assert second._session is first._session
    assert cache.hits == 1
    assert memory.trims() == before + 1, "a cache hit builds nothing, so there is nothing to give back"


def test_outbox_keeps_a_small_sqlite_page_cache(tmp_path):
    ob = Outbox(tmp_path / "outbox.sqlite")
    try:
        assert ob._db.execute("PRAGMA cache_size").fetchone()[0] == -CACHE_KIB
        assert CACHE_KIB < 2000  # smaller than SQLite's default of 2000 KiB
    finally:
        ob.close()


@pytest.mark.mosquitto
def test_agent_loop_trims_on_its_schedule(mosquitto, tmp_path):
    from edge_agent.agent import Agent

    if not GLIBC:
        pytest.skip("no glibc malloc_trim on this system")
    cfg = AgentConfig(device_id=f"mem-{tmp_path.name}"[:60], data_dir=str(tmp_path), mqtt=MqttSettings(url=mosquitto.url),
                      sampling=SamplingSettings(rate_hz=10.0, batch_s=1.0, window_s=5.0))
    agent = Agent(cfg)
    agent.memory_trim = memory.PeriodicTrim(0.2)  # this agent's own schedule, not the process's
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), kwargs={"drain_timeout": 0})
    thread.start()
    try:
        assert poll(lambda: agent.memory_trim.done >= 2, timeout=30), "the loop never trimmed"
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()


def test_agent_command_loads_no_other_command_module():
    out = _run(
        "import sys\n"
        "from edgeloop.cli import main\n"
        "try:\n"
        "    main(['agent', '--example-config'], prog_name='edgeloop')\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('edgeloop.cli_'))\n"
        "sys.stderr.write(repr(loaded))\n"
        "assert not loaded, loaded\n"
    )
    assert out.returncode == 0, out.stderr
    assert "device_id" in out.stdout  # the example config was printed


def test_lazy_commands_still_run_and_are_listed():
    from click.testing import CliRunner

    from edgeloop.cli import main

    listed = CliRunner().invoke(main, ["--help"])
    assert listed.exit_code == 0, listed.output
    for name in ("agent", "models", "devices", "broker-config", "simulate", "score"):
        assert f"  {name} " in listed.output, f"{name} missing from --help"
    result = CliRunner().invoke(main, ["simulate", "--list-profiles"])
    assert result.exit_code == 0, result.output
    assert "machine" in result.output


def test_the_agent_imports_and_starts_under_python_OO():
    """PYTHONOPTIMIZE=2 (the systemd unit) drops docstrings and asserts: the agent's import chain and
    its command line must not depend on either."""
    out = _run(
        "import sys\n"
        "assert sys.flags.optimize == 2\n"
        "import edge_agent.agent, edge_agent.inference, edge_agent.memory, edge_agent.sources.composite\n"
        "import edge_agent.sources.simulated, edge_agent.sources.host\n"
        "from edgeloop.cli import main\n"
        "try:\n"
        "    main(['agent', '--example-config'], prog_name='edgeloop')\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n",
        "-OO",
    )
    assert out.returncode == 0, out.stderr
    assert "device_id" in out.stdout


def test_systemd_unit_sets_the_memory_settings():
    unit = (ROOT / "deploy" / "systemd" / "edgeloop-agent.service").read_text()
    assert "Environment=PYTHONOPTIMIZE=2" in unit
    assert "compileall" in unit  # how to give the read-only venv its optimised byte code
