"""Wall-clock step detection against synthetic clocks."""

from __future__ import annotations

import random

import pytest

from edge_agent.clock import ClockStep, ClockWatch

EPOCH = 1.7e9


def feed(watch: ClockWatch, pairs) -> list[tuple[int, float]]:
    """Observe every (mono, wall) pair; the (index, step) of each reported step."""
    return [(i, s) for i, (m, w) in enumerate(pairs) if (s := watch.observe(m, w)) is not None]


def ticking(n: int, period: float = 0.1, jitter: float = 0.0, seed: int = 0):
    """Monotonic times of a sampler at ``period`` with scheduling jitter (the sampler is late)."""
    rng = random.Random(seed)
    return [100.0 + i * period + rng.uniform(0, jitter) for i in range(n)]


def test_a_steady_clock_with_scheduling_jitter_reports_nothing():
    watch = ClockWatch(1.0)
    mono = ticking(5000, jitter=0.08)
    assert feed(watch, [(m, EPOCH + m) for m in mono]) == []
    assert watch.status() == {"observations": 5000, "steps": 0, "total_step_s": 0.0, "max_abs_step_s": 0.0,
                              "last_step_s": None, "last_step_wall": None}


@pytest.mark.parametrize("size", [5.0, -3600.0, 1.5, -1.5])
def test_forward_and_backward_steps_are_reported_once_with_their_size(size):
    watch = ClockWatch(1.0)
    mono = ticking(1000)
    pairs = [(m, EPOCH + m + (size if i >= 600 else 0.0)) for i, m in enumerate(mono)]
    steps = feed(watch, pairs)
    assert len(steps) == 1
    i, step = steps[0]
    assert i == 600 and step == pytest.approx(size, abs=1e-6)
    assert watch.steps == 1
    assert watch.last == ClockStep(step_s=step, wall=pairs[600][1], mono=pairs[600][0])
    status = watch.status()
    assert status["last_step_s"] == step and status["last_step_wall"] == pairs[600][1]
    assert status["max_abs_step_s"] == pytest.approx(abs(size))


def test_several_steps_add_up():
    watch = ClockWatch(1.0)
    mono = ticking(300)
    offsets = [0.0] * 100 + [30.0] * 100 + [20.0] * 100
    steps = feed(watch, [(m, EPOCH + m + o) for m, o in zip(mono, offsets)])
    assert [i for i, _ in steps] == [100, 200]
    assert watch.total_step_s == pytest.approx(20.0)
    assert watch.max_abs_step_s == pytest.approx(30.0)


def test_steps_at_or_below_the_threshold_are_not_reported():
    watch = ClockWatch(1.0)
    mono = ticking(200)
    pairs = [(m, EPOCH + m + (0.9 if i >= 50 else 0.0) + (-0.9 if i >= 150 else 0.0)) for i, m in enumerate(mono)]
    assert feed(watch, pairs) == []
    tight = ClockWatch(0.5)
    assert [i for i, _ in feed(tight, pairs)] == [50, 150]


def test_ntp_slew_is_not_a_step():
    """500 ppm (the kernel's maximum slew) for 10,000 samples moves the wall clock 0.5 s in all."""
    watch = ClockWatch(1.0)
    mono = ticking(10_000)
    pairs = [(m, EPOCH + m + 500e-6 * (m - mono[0])) for m in mono]
    assert feed(watch, pairs) == []
    assert pairs[-1][1] - pairs[0][1] - (mono[-1] - mono[0]) == pytest.approx(0.5, rel=1e-3)


def test_slew_over_a_long_interval_between_observations_is_tolerated():
    """An hour between two observations at 400 ppm is 1.44 s of drift: slew, not a step."""
    watch = ClockWatch(1.0)
    assert watch.observe(0.0, EPOCH) is None
    assert watch.observe(3600.0, EPOCH + 3600.0 * (1 + 400e-6)) is None
    strict = ClockWatch(1.0, slew_ppm=0)
    strict.observe(0.0, EPOCH)
    assert strict.observe(3600.0, EPOCH + 3600.0 * (1 + 400e-6)) == pytest.approx(1.44)


def test_bad_arguments_are_refused():
    watch = ClockWatch()
    watch.observe(10.0, EPOCH)
    with pytest.raises(ValueError, match="monotonic time went backwards"):
        watch.observe(9.0, EPOCH)
    with pytest.raises(ValueError, match="threshold_s must be > 0"):
        ClockWatch(0)
    with pytest.raises(ValueError, match="slew_ppm must be >= 0"):
        ClockWatch(1.0, slew_ppm=-1)


def test_the_real_clocks_do_not_step_in_a_short_run():
    import time

    watch = ClockWatch(1.0)
    for _ in range(100):
        assert watch.observe(time.monotonic(), time.time()) is None


@pytest.mark.parametrize("speed, simulated_clock", [(50.0, False), (1.0, True)])
def test_an_agent_on_a_simulated_clock_flags_offset_steps_not_its_speed(tmp_path, speed, simulated_clock):
    """A simulated device clock runs on the sampling schedule (at speed 50, fifty times faster
    than the monotonic clock): that is no step. Moving ``clock_offset_s`` (what
    :meth:`simulators.fleet.FleetRunner.clock_step` does) is, flagged on one reading each time.
    The agent is stepped with synthetic monotonic times; no broker is needed."""
    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig, MqttSettings, SamplingSettings
    from edge_agent.quality import CLOCK_STEP
    from edgeloop import wire
    from tests.services import free_port

    accepted: list = []
    cfg = AgentConfig(device_id="clock-sim", data_dir=str(tmp_path),
                      mqtt=MqttSettings(url=f"mqtt://127.0.0.1:{free_port()}", protocol="5"),
                      sampling=SamplingSettings(rate_hz=10.0, batch_s=1.0, window_s=5.0, speed=speed))
    agent = Agent(cfg, on_accept=accepted.append)
    agent.simulated_clock, agent.catch_up_s = simulated_clock, 5.0
    agent.open(connect_timeout=0.1)
    try:
        start, real_step = 1000.0, 20.0 / speed  # 20 device seconds (200 samples) per phase
        for phase, offset in enumerate((0.0, 3600.0, 3600.0 - 2.5)):
            agent.clock_offset_s = offset
            for k in range(1, 11):
                agent.step(start + (phase + k / 10) * real_step)
        agent.finish_sampling()
    finally:
        agent.close(0)
    readings = [r for m in accepted if isinstance(m, wire.Telemetry) for r in m.readings]
    assert len(readings) >= 550
    flagged = [i for i, r in enumerate(readings) if r.flags & CLOCK_STEP]
    assert len(flagged) == 2, [readings[i - 1:i + 1] for i in flagged]
    for i, size in zip(flagged, (3600.0, -2.5)):
        assert readings[i].t - readings[i - 1].t == pytest.approx(0.1 + size, abs=1e-6)
    assert agent._clock.steps == 2 and agent._clock.last.step_s == pytest.approx(-2.5, abs=1e-6)
