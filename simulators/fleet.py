"""Run hundreds to thousands of real agents in one process with a fixed number of threads.

Each simulated device is a real :class:`edge_agent.agent.Agent` (its own config, source, SQLite
outbox, MQTT connection and sequence numbers). What is shared is the machinery around them:

* **one scheduler thread** steps the agents in order of their next due time (a heap of
  :meth:`Agent.step` results): it opens them, samples, services outboxes and finally drains and
  closes them, so every agent's SQLite outbox stays on the thread that opened it;
* **one network thread**, a :class:`edgeloop.netloop.NetworkLoop`, drives every agent's MQTT
  connection through a selector instead of one paho thread per device.

So the thread count does not grow with the fleet (``threading.active_count()`` rises by two).
Time runs ``speed`` times faster through ``sampling.speed`` (readings are stamped on the device
schedule, ``start + k / rate``); a scheduler that falls behind lets an agent take up to
``catch_up_s`` real seconds of missed samples in one step (a simulated source can be read in the
past), beyond that the samples count as missed, as on a real device.

Faults of the network and the clock, per device or fleet-wide, at any time from any thread or
planned with :meth:`FleetRunner.at`:

* :meth:`FleetRunner.cut` drops the devices' connections and makes their reconnects fail for a
  while (the broker sends their last will; outboxes keep everything; the usual backoff reconnects);
* :meth:`FleetRunner.clock_step` moves the devices' wall clocks (every later reading's time).

Outboxes: each device keeps its own SQLite database in WAL mode. With ``synchronous=FULL`` every
accepted message costs an fsync; a thousand devices each writing a message per second make that
a thousand fsyncs a second on one disk. A simulated fleet therefore defaults to
``outbox_synchronous="NORMAL"`` (WAL: no fsync per commit; a power cut of the *simulating* machine
may lose the last commits, which a simulation can afford). A real device keeps FULL, its default.
``bench/fleet.py`` measures both.

Models pushed over the air: every device keeps its own :class:`edge_agent.ota.ModelReceiver` (it
checks signature and hashes and installs into its own directory). For the same reason as the
outboxes, a simulated fleet's receivers skip fsync (``durable_models=False``), and devices that
install identical bytes may share one onnxruntime session through ``session_cache`` (an
:class:`edge_agent.inference.SessionCache`; a thousand sessions of a 1 MB model cost seconds and
GBs; ``bench/ota_push.py`` measures both ways). Their download progress is recorded every
``model_save_every_s`` seconds (30 s; a device's 2 s would make a fleet-wide push write two
files per device every 2 s while the chunks queue up): a kill of the simulating process then
re-requests at most that much, which a simulation can afford.

Use::

    runner = FleetRunner(configs, sources, speed=10, on_accept=record)
    with runner:                      # opens and connects every agent, starts stepping
        runner.at(5.0, lambda f: f.cut(3.0))
        time.sleep(20)
    runner.results                    # device -> True when its outbox was confirmed empty
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import msgspec

from edge_agent.config import AgentConfig
from edgeloop.netloop import NetworkLoop

__all__ = ["FleetRunner", "FleetStats", "scenario_agents"]

log = logging.getLogger(__name__)


@dataclass
class FleetStats:
    """What the scheduler did; read from any thread."""

    opened: int = 0
    steps: int = 0
    #: Steps taken later than their due time by more than 0.1 s of real time, and the worst delay.
    late_steps: int = 0
    max_lateness_s: float = 0.0
    open_s: float = 0.0  # time to open and connect the whole fleet
    drain_s: float = 0.0  # time from stop to every outbox confirmed (or the drain time-out)


def scenario_agents(scenario, *, url: str, protocol: str, caps, data_dir, model_dirs: dict, speed: float,
                    public_key_file=None) -> tuple[list, dict]:
    """Agent configs and simulated sources for every device of ``scenario`` (``simulators.scenario``):
    ``(configs, {device: source})``. ``caps`` (the embedded broker's limits, or None) bounds the
    payload and in-flight window; each profile's model starts from ``model_dirs[profile]`` and gets
    the profile's data-quality settings; ``public_key_file`` turns on signed model updates."""
    from edge_agent.config import AgentConfig, ModelSettings, MqttSettings, SamplingSettings, SourceSettings
    from edge_agent.sources import create_source
    from simulators import profiles

    mqtt = MqttSettings(url=url, protocol=protocol) if caps is None else MqttSettings(
        url=url, protocol=protocol, max_payload=caps.max_payload, max_inflight=min(200, caps.receive_maximum))
    extra = {} if public_key_file is None else {
        "models": ModelSettings(public_key_file=str(public_key_file), rerequest_after_s=1.0)}
    configs, sources = [], {}
    for spec in scenario.devices:
        options = spec.source_options(scenario.rate_hz)
        sources[spec.id] = create_source("simulated", options)
        configs.append(AgentConfig(
            device_id=spec.id, profile=spec.profile, data_dir=str(data_dir), mqtt=mqtt,
            model_dir=str(model_dirs[spec.profile]),
            sampling=SamplingSettings(rate_hz=scenario.rate_hz, batch_s=1.0, window_s=scenario.window_s, speed=speed),
            source=SourceSettings(name="simulated", options=options),
            quality=profiles.get(spec.profile).quality_settings(), **extra))
    return configs, sources


class FleetRunner:
    """Steps many agents from one thread; see the module docstring.

    ``configs`` are the devices' :class:`AgentConfig` (each with its own ``device_id`` and, as a
    rule, the same ``data_dir``); ``sources`` the matching sources (None: built from the config).
    ``speed`` overrides every config's ``sampling.speed``; ``outbox_synchronous`` their outbox's
    (None: keep the configs'). ``model`` is one model object served by every agent (stepped on
    one thread, so sharing a session is safe). ``network_loop``: a running loop to share, or None
    for one of the runner's own. ``session_cache`` (a ``SessionCache``) lets devices that install
    the same pushed model bytes share one session; ``durable_models`` keeps fsync in their model
    receivers (off by default in a simulation) and ``model_save_every_s`` sets how often their
    download progress is recorded (see the module docstring).
    """

    def __init__(
        self,
        configs: Sequence[AgentConfig],
        sources: Sequence[object | None] | None = None,
        *,
        network_loop: NetworkLoop | None = None,
        speed: float | None = None,
        model=None,
        on_accept: Callable | None = None,
        outbox_synchronous: str | None = "NORMAL",
        session_cache=None,
        durable_models: bool = False,
        model_save_every_s: float = 30.0,
        catch_up_s: float = 2.0,
        max_idle_s: float = 0.2,
        connect_timeout: float = 10.0,
        drain_timeout: float = 60.0,
    ) -> None:
        from edge_agent.agent import Agent

        if sources is not None and len(sources) != len(configs):
            raise ValueError(f"{len(configs)} configs but {len(sources)} sources: give one source per config")
        ids = [c.device_id for c in configs]
        if len(set(ids)) != len(ids):
            dup = sorted({d for d in ids if ids.count(d) > 1})
            raise ValueError(f"device ids must be unique in a fleet; repeated: {dup[:5]}")
        self._own_loop = network_loop is None
        self.network_loop = network_loop or NetworkLoop(name="fleet-network")
        self.connect_timeout = connect_timeout
        self.drain_timeout = drain_timeout
        self.max_idle_s = max_idle_s
        self.agents: list[Agent] = []
        for k, cfg in enumerate(configs):
            cfg = self._adjust(cfg, speed, outbox_synchronous)
            agent = Agent(cfg, source=sources[k] if sources is not None else None, model=model, on_accept=on_accept)
            agent.network_loop = self.network_loop
            agent.simulated_clock = True
            agent.catch_up_s = catch_up_s
            receiver = getattr(getattr(agent, "updates", None), "receiver", None)
            if receiver is not None:  # a device with a profile: models pushed over MQTT
                receiver.durable = durable_models
                receiver.session_cache = session_cache
                receiver.save_every = (receiver.save_every[0], float(model_save_every_s))
            self.agents.append(agent)
        self.by_device = {a.device: a for a in self.agents}
        self.stats = FleetStats()
        #: device -> True (outbox confirmed empty), False (not), or the exception that stopped it.
        self.results: dict[str, object] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._opened = threading.Event()
        self._open_error: BaseException | None = None
        self._lock = threading.Lock()
        self._plans: list[tuple[float, int, Callable[["FleetRunner"], None]]] = []
        self._tie = itertools.count()
        self._started = 0.0
        self._thread: threading.Thread | None = None

    @staticmethod
    def _adjust(cfg: AgentConfig, speed: float | None, synchronous: str | None) -> AgentConfig:
        if speed is not None and cfg.sampling.speed != speed:
            cfg = msgspec.structs.replace(cfg, sampling=msgspec.structs.replace(cfg.sampling, speed=float(speed)))
        if synchronous is not None and cfg.outbox.synchronous != synchronous:
            cfg = msgspec.structs.replace(cfg, outbox=msgspec.structs.replace(cfg.outbox, synchronous=synchronous))
        return cfg

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> "FleetRunner":
        """Open every agent and connect it (on the scheduler thread), then start stepping. Raises
        what opening raised (a broker refusing a device); the devices opened so far are closed."""
        if self._thread is not None:
            raise RuntimeError("this fleet was started already")
        self.network_loop.start()
        self._thread = threading.Thread(target=self._run, name="fleet-scheduler", daemon=True)
        self._thread.start()
        self._opened.wait()
        if self._open_error is not None:
            self._thread.join()
            if self._own_loop:
                self.network_loop.stop()
            raise self._open_error
        return self

    def stop(self, drain_timeout: float | None = None) -> dict[str, object]:
        """Stop sampling, wait until every outbox is confirmed (or ``drain_timeout``), close every
        agent; returns :attr:`results`."""
        if drain_timeout is not None:
            self.drain_timeout = drain_timeout
        thread = self._thread
        if thread is None:
            return self.results
        self._stop.set()
        self._wake.set()
        thread.join(self.drain_timeout + 60 + 0.01 * len(self.agents))
        if thread.is_alive():
            raise RuntimeError("the fleet scheduler did not stop after its drain time-out")
        if self._own_loop:
            self.network_loop.stop()
        return self.results

    def __enter__(self) -> "FleetRunner":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def elapsed_s(self) -> float:
        """Real seconds since the fleet began stepping."""
        return time.monotonic() - self._started if self._started else 0.0

    def wait_connected(self, timeout: float = 30.0) -> None:
        """Block until every agent's link is up (TimeoutError names those that are not)."""
        deadline = time.monotonic() + timeout
        while True:
            down = [a.device for a in self.agents if a._link is None or not a._link.connected]
            if not down:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(down)} devices not connected after {timeout} s, e.g. {down[:5]}")
            time.sleep(0.05)

    # -- faults ----------------------------------------------------------------------------------

    def _select(self, devices: Iterable[str] | None):
        if devices is None:
            return self.agents
        try:
            return [self.by_device[d] for d in devices]
        except KeyError as exc:
            raise ValueError(f"no device {exc.args[0]!r} in this fleet") from None

    def cut(self, duration_s: float, devices: Iterable[str] | None = None) -> None:
        """Cut the network of ``devices`` (default: the whole fleet) for ``duration_s`` real seconds."""
        for agent in self._select(devices):
            if agent._link is not None:
                agent._link.cut(duration_s)

    def clock_step(self, step_s: float, devices: Iterable[str] | None = None) -> None:
        """Step the wall clock of ``devices`` (default: all) by ``step_s`` seconds (negative: back)."""
        for agent in self._select(devices):
            agent.clock_offset_s += step_s

    def at(self, seconds: float, action: Callable[["FleetRunner"], None]) -> None:
        """Run ``action(fleet)`` on the scheduler thread ``seconds`` real seconds after the start."""
        with self._lock:
            heapq.heappush(self._plans, (seconds, next(self._tie), action))
        self._wake.set()

    # -- the scheduler thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._open_all()
        except BaseException as exc:
            self._open_error = exc
            self._opened.set()
            return
        self._opened.set()
        try:
            self._step_until_stopped()
        except BaseException:
            log.exception("fleet scheduler failed; draining what it can")
        finally:
            self._drain_and_close()

    def _open_all(self) -> None:
        began = time.monotonic()
        opened = []
        try:
            for agent in self.agents:
                agent.open(connect_timeout=self.connect_timeout)
                opened.append(agent)
                self.stats.opened += 1
        except BaseException:
            for agent in opened:
                try:
                    agent.close(0.0)
                except Exception:
                    log.exception("closing %s failed", agent.device)
            raise
        self.stats.open_s = time.monotonic() - began

    def _step_until_stopped(self) -> None:
        self._started = now = time.monotonic()
        heap = [(now, k) for k in range(len(self.agents))]
        agents, stats, max_idle = self.agents, self.stats, self.max_idle_s
        while not self._stop.is_set():
            now = time.monotonic()
            self._run_plans(now)
            due, k = heap[0]
            if due > now:
                self._wake.wait(min(due - now, 0.05))
                self._wake.clear()
                continue
            if now - due > 0.1:
                stats.late_steps += 1
                stats.max_lateness_s = max(stats.max_lateness_s, now - due)
            try:
                nxt = agents[k].step(now, max_idle=max_idle)
            except Exception:  # one device's failure is its own; the fleet goes on
                log.exception("%s: step failed; retrying in 1 s", agents[k].device)
                nxt = now + 1.0
            heapq.heapreplace(heap, (nxt, k))
            stats.steps += 1

    def _run_plans(self, now: float) -> None:
        if not self._plans:
            return
        ready = []
        with self._lock:
            while self._plans and self._plans[0][0] <= now - self._started:
                ready.append(heapq.heappop(self._plans)[2])
        for action in ready:
            try:
                action(self)
            except Exception:
                log.exception("a planned fleet action failed")

    def _drain_and_close(self) -> None:
        began = time.monotonic()
        for agent in self.agents:
            agent.finish_sampling()
        deadline = began + self.drain_timeout
        # Service EVERY agent on each pass until all outboxes are empty at once: an agent whose
        # outbox emptied can still take a message (the cloud may change its models meanwhile, and
        # it reports that through the outbox), so none is set aside once it looked done.
        while time.monotonic() < deadline and not all([a.deliver() for a in self.agents]):
            time.sleep(0.02)
        self.stats.drain_s = time.monotonic() - began
        for agent in self.agents:
            try:  # waits only if a last message came in after the final pass
                self.results[agent.device] = agent.close(max(0.0, min(5.0, deadline - time.monotonic())))
            except Exception as exc:
                self.results[agent.device] = exc
