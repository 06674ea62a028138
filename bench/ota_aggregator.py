"""The aggregator of ``bench.ota_push`` in its own process, driven from the bench over a pipe.

In production the aggregator is a separate service; issue 5's target puts the 1,000 *devices*
in one process. Running the aggregator (its model registry, :class:`aggregator.ota.
ModelDistributor`, ingest and store) inside the devices' process made every deployment report
it stores and every chunk it sends compete with the devices for one interpreter lock. So the
bench starts it here: the same :class:`aggregator.service.Aggregator`, built from the same
config, in a child started with ``spawn`` (no threads inherited from the parent).

The child answers one command at a time (tuples over a :func:`multiprocessing.Pipe`)::

    ("desired", devices, champion)    -> number of devices told (set_desired_many)
    ("offer", profile, version, ids)  -> offer figures; then the child watches its own registry
                                         and sends ("acked", {device: monotonic time}, cpu_s)
                                         once every device in ids reports ``active`` as STORED
    ("figures", profile, version, ids)-> chunks sent / re-sent, coalesced, states by device
    ("stop",)                         -> retires the offers, flushes, stops (forget_session)

Times are ``time.monotonic()``, which on Linux is one clock for every process of the machine,
so the bench compares them with its own.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback

__all__ = ["AggregatorProcess"]

_POLL_S = 0.05  # how often the child looks for newly stored ``active`` reports


class AggregatorProcess:
    """An :class:`aggregator.service.Aggregator` in a child process holding one signed model.

    ``config`` is an ``AggregatorConfig``; ``onnx`` and ``manifest`` (signed) go into its model
    registry before it starts. Use as a context manager, or :meth:`start` / :meth:`stop`.
    """

    def __init__(self, config, onnx: bytes, manifest, *, start_timeout: float = 120.0) -> None:
        import msgspec

        self._args = (msgspec.json.encode(config), bytes(onnx), manifest.to_json())
        self._start_timeout = start_timeout
        self._conn = None
        self._proc = None

    def start(self) -> "AggregatorProcess":
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, *self._args), name="ota-bench-aggregator", daemon=True)
        self._proc.start()
        child.close()
        self._reply(self._start_timeout)  # ("ready",) once connected
        return self

    def __enter__(self) -> "AggregatorProcess":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def call(self, *command, timeout: float = 120.0):
        """Send ``command`` and return the child's answer (RuntimeError with its traceback if it failed)."""
        self._conn.send(command)
        return self._reply(timeout)

    def send(self, *command) -> None:
        """Send ``command`` without waiting; take the answers with :meth:`poll`."""
        self._conn.send(command)

    def poll(self, timeout: float = 0.0):
        """The next answer if one comes within ``timeout`` seconds, else None."""
        return self._reply(timeout) if self._conn.poll(timeout) else None

    def _reply(self, timeout: float):
        if not self._conn.poll(timeout):
            raise TimeoutError(f"bench aggregator process (pid {self.pid}) gave no answer within {timeout} s")
        try:
            kind, *rest = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"bench aggregator process (pid {self.pid}) exited "
                               f"(exit code {self._proc.exitcode})") from None
        if kind == "error":
            raise RuntimeError(f"bench aggregator process failed:\n{rest[0]}")
        return rest[0] if len(rest) == 1 else tuple(rest)

    def stop(self, timeout: float = 60.0) -> None:
        """Retire the offers and stop the aggregator; the child is killed if it does not exit."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.is_alive():
                self._conn.send(("stop",))
                while self._conn.poll(timeout):  # skip answers still queued (an unread "acked")
                    if self._conn.recv()[0] in ("stopped", "error"):
                        break
        except (OSError, EOFError):
            pass
        finally:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(10)
            self._conn.close()


def _serve(conn, config_json: bytes, onnx: bytes, manifest_json: bytes) -> None:
    """The child: build, start, answer commands until ``stop`` (see the module docstring)."""
    import logging

    import msgspec

    from aggregator.service import Aggregator, AggregatorConfig
    from models.manifest import Manifest

    logging.basicConfig(level=logging.ERROR)
    try:
        agg = Aggregator(msgspec.json.decode(config_json, type=AggregatorConfig))
        agg.models.add(onnx, Manifest.from_json(manifest_json))
        agg.start()
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    try:
        while True:
            command = conn.recv()
            try:
                if command[0] == "stop":
                    break
                _answer(conn, agg, command)
            except Exception:
                conn.send(("error", traceback.format_exc()))
    except EOFError:  # the bench went away
        pass
    finally:
        for offered in agg.ota.offers():  # a shared broker keeps retained offers otherwise
            agg.ota.retire(offered.profile, offered.version)
        agg.ota.flush(10)
        agg.stop(forget_session=True)
        try:
            conn.send(("stopped", None))
        except OSError:
            pass


def _answer(conn, agg, command) -> None:
    kind = command[0]
    if kind == "desired":
        _, devices, champion = command
        conn.send(("ok", agg.ota.set_desired_many(devices, champion=champion, shadow=None)))
    elif kind == "offer":
        _, profile, version, ids = command
        cpu0 = time.process_time()
        offer = agg.ota.offer(profile, version)
        conn.send(("ok", {"size": offer.size, "chunks": offer.chunks, "chunk_size": offer.chunk_size}))
        acked = _watch_active(agg, ids, version, conn)
        conn.send(("acked", acked, time.process_time() - cpu0))
    elif kind == "figures":
        _, profile, version, ids = command
        sent, resent = agg.ota.counts(profile, version)
        states: dict[str, int] = {}
        for device in ids:
            state = _state(agg, device, version) or "none"
            states[state] = states.get(state, 0) + 1
        conn.send(("ok", {"chunks_sent": sent, "chunks_resent": resent, "coalesced": agg.ota.coalesced,
                          "states": states}))
    else:
        raise ValueError(f"unknown command {kind!r}")


def _watch_active(agg, ids, version: str, conn) -> dict[str, float]:
    """{device: when its ``active`` report was seen stored}, until all are or the bench sends
    anything (which ends the watch; the command is then answered after it)."""
    acked: dict[str, float] = {}
    waiting = list(ids)
    while waiting:
        now = time.monotonic()
        still = []
        for device in waiting:
            if _state(agg, device, version) == "active":
                acked[device] = now
            else:
                still.append(device)
        waiting = still
        if waiting and conn.poll(_POLL_S):
            break  # the bench gave up waiting (its time-out) and asks something else
    return acked


def _state(agg, device: str, version: str) -> str | None:
    rec = agg.registry.get(device)
    dep = rec.deployments.get(version) if rec is not None else None
    return dep.state if dep is not None else None
