"""The MQTT broker `edgeloop demo` runs when no Mosquitto is at hand, and what brokers can do.

Chosen by measurement (``bench/embedded_broker_probe.py``, edgeloop's own traffic: windowed QoS 1
publishers, one persistent subscriber acknowledging in batches): rumqttd 0.20, the Rust broker
inside the ``iotcore`` wheel, was the only candidate from PyPI that lost nothing and also did
MQTT 5, ``$share`` groups, offline sessions, redelivery of unacknowledged messages, retained
messages, last wills and 1 MB payloads. amqtt 0.12 lost offline-session messages and ignored
``$share``; moat-lib-mqtt and mqttools granted QoS 0 only.

rumqttd has no shutdown call, so it runs in a child process this module owns. The child exits
when its stdin pipe closes, so it dies with the Python process even after a SIGKILL, and it is in
its own session, so a Ctrl+C reaches the demo (which then stops the broker in order) and not the
broker first. The broker keeps everything in memory; the data directory only holds its
configuration and log.

What rumqttd 0.20 does differently from Mosquitto, measured, and carried in
:data:`EMBEDDED_CAPABILITIES` so that callers adapt:

- it sends at most 100 unacknowledged QoS 1 messages to one client (a constant in its source,
  not configurable), so a subscriber must acknowledge before it holds 100;
- it disconnects a client that acknowledges out of order: acknowledge in arrival order;
- MQTT 5 and MQTT 3.1.1 need separate listeners (each refuses the other's CONNECT): ``url`` is
  the MQTT 5 listener, ``url_v311`` the 3.1.1 one; both reach the same topics and sessions;
- its MQTT 5 CONNACK announces no Receive Maximum (so 65535): size windows from the capabilities;
- a publish above ``max_payload`` makes the broker drop the publisher's connection.
"""

from __future__ import annotations

import atexit
import errno
import importlib.util
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = [
    "BrokerCapabilities",
    "MOSQUITTO_CAPABILITIES",
    "EMBEDDED_CAPABILITIES",
    "EmbeddedBroker",
    "EmbeddedBrokerError",
]

log = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass(frozen=True)
class BrokerCapabilities:
    """What a broker really does, so that clients size what they send to it.

    ``mqtt5``: the broker's URL speaks MQTT 5 (reason codes, session expiry).
    ``shared_subscriptions``: ``$share/{group}/{filter}`` splits messages between the members.
    ``max_payload``: largest publish payload, in bytes, that the broker delivers.
    ``receive_maximum``: most unacknowledged QoS 1 messages to have in flight with the broker, in
    either direction: a publisher's window and the bound on a subscriber's pending acks.
    ``ordered_acks``: the broker needs PUBACKs in the order it sent the messages.
    """

    mqtt5: bool
    shared_subscriptions: bool
    max_payload: int
    receive_maximum: int
    ordered_acks: bool = False


#: The deploy profile, deploy/mosquitto/edgeloop.conf (max_packet_size, max_inflight_messages).
MOSQUITTO_CAPABILITIES = BrokerCapabilities(
    mqtt5=True, shared_subscriptions=True, max_payload=1 * MIB, receive_maximum=1000
)

#: rumqttd 0.20 as EmbeddedBroker configures it; tests/test_embedded_broker.py checks each field.
EMBEDDED_CAPABILITIES = BrokerCapabilities(
    mqtt5=True, shared_subscriptions=True, max_payload=1 * MIB, receive_maximum=100,
    ordered_acks=True,
)

# rumqttd counts topic and headers into its limit: leave room above the payload we promise.
_PACKET_HEADROOM = 64 * 1024
# The log is kept per topic filter in segments; past max_segment_count the oldest segment is
# dropped even if a slow subscriber has not read it. 16 x 32 MiB bounds memory at 512 MiB per
# filter, like max_queued_bytes in the Mosquitto profile.
_SEGMENT_SIZE = 32 * MIB
_SEGMENT_COUNT = 16
_MAX_INFLIGHT = EMBEDDED_CAPABILITIES.receive_maximum

_CONFIG = """\
id = 0

[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = {segment_size}
max_segment_count = {segment_count}
{listeners}"""

_LISTENER = """
[{v}.1]
name = "{v}-1"
listen = "{address}"
next_connection_delay_ms = 1
[{v}.1.connections]
connection_timeout_ms = 60000
max_payload_size = {max_packet}
max_inflight_count = {inflight}
dynamic_filters = true
"""

# The child: exit as soon as the parent's end of stdin closes (stop() or the parent died), log
# warnings only. rumqttd reports each routed packet through tracing spans at ERROR level, so its
# own logger stays silent unless EDGELOOP_BROKER_DEBUG is set.
_CHILD_MAIN = """\
import logging, os, sys, threading
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
debug = bool(os.environ.get("EDGELOOP_BROKER_DEBUG"))
logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.getLogger("rumqttd").setLevel(logging.DEBUG if debug else logging.CRITICAL)

def _exit_with_parent():
    try:
        sys.stdin.buffer.read()
    finally:
        os._exit(0)

threading.Thread(target=_exit_with_parent, daemon=True).start()
try:
    from iotcore.iotcore import IotCoreBroker
    IotCoreBroker(config_path=sys.argv[1]).run_forever()
except BaseException:
    import traceback
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
"""


class EmbeddedBrokerError(RuntimeError):
    """The embedded broker could not start (not installed, port taken, child died)."""


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _check_bindable(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        # As the broker binds: TIME_WAIT leftovers of a previous run do not count as taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise EmbeddedBrokerError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


class EmbeddedBroker:
    """An MQTT broker (rumqttd) in a child process on loopback, for demos and tests.

    ::

        with EmbeddedBroker() as broker:      # free ports on 127.0.0.1
            run_demo(broker.url, broker.capabilities)

    ``port=0`` picks a free port (``port_v311`` likewise for the MQTT 3.1.1 listener).
    ``data_dir`` receives the broker's configuration and log (``broker.log``); without one a
    temporary directory is used and removed on stop. :meth:`start` may follow :meth:`stop`: the
    broker comes back on the same ports, so clients can reconnect, but with no sessions or
    retained messages (rumqttd keeps them in memory only). Set ``EDGELOOP_BROKER_DEBUG=1`` to
    have rumqttd's own tracing written to ``broker.log``.
    """

    capabilities: BrokerCapabilities = EMBEDDED_CAPABILITIES

    def __init__(self, host: str = "127.0.0.1", port: int = 0, data_dir: str | Path | None = None,
                 *, port_v311: int = 0, startup_timeout: float = 10.0) -> None:
        self.host = host
        self._want_port, self._want_port_v311 = port, port_v311
        self._data_dir_arg = Path(data_dir) if data_dir is not None else None
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._data_dir: Path | None = None
        self._port: int | None = None
        self._port_v311: int | None = None

    # --- addresses -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """Port of the MQTT 5 listener (the one ``url`` names)."""
        return self._require(self._port)

    @property
    def port_v311(self) -> int:
        """Port of the MQTT 3.1.1 listener, for clients that cannot speak MQTT 5."""
        return self._require(self._port_v311)

    @property
    def url(self) -> str:
        """``mqtt://HOST:PORT`` of the MQTT 5 listener."""
        return f"mqtt://{self._netloc(self.port)}"

    @property
    def url_v311(self) -> str:
        return f"mqtt://{self._netloc(self.port_v311)}"

    @property
    def data_dir(self) -> Path:
        """Where the configuration and ``broker.log`` are, while running."""
        if self._data_dir is None:
            raise EmbeddedBrokerError("the embedded broker is not running")
        return self._data_dir

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _netloc(self, port: int) -> str:
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"

    def _require(self, port: int | None) -> int:
        if port is None:
            raise EmbeddedBrokerError("the embedded broker is not running")
        return port

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> EmbeddedBroker:
        """Start the broker and return once both listeners accept connections."""
        if self.running:
            return self
        if importlib.util.find_spec("iotcore") is None:
            raise EmbeddedBrokerError(
                "the embedded MQTT broker needs the 'iotcore' package: "
                "pip install 'edgeloop[aggregator]'"
            )
        if self._data_dir_arg is not None:
            self._data_dir_arg.mkdir(parents=True, exist_ok=True)
            self._data_dir = self._data_dir_arg
        else:
            self._data_dir = Path(tempfile.mkdtemp(prefix="edgeloop-broker-"))
        # Ports we pick ourselves may be taken between choosing and binding: try again then.
        attempts = 1 if (self._want_port and self._want_port_v311) else 3
        for attempt in range(attempts):
            try:
                self._launch()
                break
            except _PortRace:
                if attempt == attempts - 1:
                    self._cleanup_dir()
                    raise EmbeddedBrokerError(
                        "could not find free ports for the embedded broker") from None
            except BaseException:
                self._cleanup_dir()
                raise
        atexit.register(self.stop)
        log.info("embedded MQTT broker (rumqttd) at %s (MQTT 5), %s (MQTT 3.1.1)",
                 self.url, self.url_v311)
        return self

    def _launch(self) -> None:
        assert self._data_dir is not None
        for wanted in {self._want_port, self._want_port_v311} - {0}:
            _check_bindable(self.host, wanted)
        port = self._want_port or _free_port(self.host)
        port_v311 = self._want_port_v311 or _free_port(self.host)
        while port_v311 == port:
            port_v311 = _free_port(self.host)
        config = self._data_dir / "rumqttd.toml"
        config.write_text(self._config_text(port, port_v311))
        logfile = self._data_dir / "broker.log"
        with open(logfile, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-c", _CHILD_MAIN, str(config)],
                stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                cwd=self._data_dir, start_new_session=True,
            )
        self._process = process
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = logfile.read_text(errors="replace")[-2000:]
                self._reap()
                if "in use" in tail or f"os error {errno.EADDRINUSE}" in tail:
                    raise _PortRace()
                raise EmbeddedBrokerError(
                    f"embedded broker exited with code {process.returncode}:\n{tail}")
            if _accepts(self.host, port) and _accepts(self.host, port_v311):
                self._port, self._port_v311 = port, port_v311
                # A restart comes back on these ports.
                self._want_port, self._want_port_v311 = port, port_v311
                return
            time.sleep(0.02)
        self._reap()
        raise EmbeddedBrokerError(
            f"embedded broker did not listen within {self.startup_timeout}s; see {logfile}")

    def _config_text(self, port: int, port_v311: int) -> str:
        max_packet = self.capabilities.max_payload + _PACKET_HEADROOM
        listeners = "".join(
            _LISTENER.format(v=v, address=self._netloc(p), max_packet=max_packet,
                             inflight=_MAX_INFLIGHT)
            for v, p in (("v5", port), ("v4", port_v311))
        )
        return _CONFIG.format(segment_size=_SEGMENT_SIZE, segment_count=_SEGMENT_COUNT,
                              listeners=listeners)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker and wait for its process to exit. Safe to call twice."""
        atexit.unregister(self.stop)
        if self._process is not None:
            self._reap(timeout)
            log.info("embedded MQTT broker stopped")
        self._port = self._port_v311 = None
        self._cleanup_dir()

    def _reap(self, timeout: float = 5.0) -> None:
        """End the child: closing its stdin asks it to exit; SIGTERM, then SIGKILL if it lingers."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            try:
                process.stdin.close()
            except OSError:
                pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _cleanup_dir(self) -> None:
        if self._data_dir is not None and self._data_dir_arg is None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
        self._data_dir = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self.running else "stopped"
        return f"<EmbeddedBroker {where}>"


class _PortRace(Exception):
    """A port chosen as free was taken before the broker bound it."""
