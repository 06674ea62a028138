"""Real Mosquitto and InfluxDB servers for tests, started on free loopback ports in a temp dir.

Plain classes with no pytest dependency, so scripts and benchmarks can use them too::

    with MosquittoServer() as broker, InfluxServer() as influx:
        ...  # broker.url == "mqtt://127.0.0.1:PORT", influx.url == "http://127.0.0.1:PORT"

A server is ready only when it really serves: Mosquitto answers an MQTT CONNECT with a CONNACK,
InfluxDB answers ``GET /ping`` with 204, and on Linux the listening socket must belong to the
process just started (under pytest-xdist another worker's server may hold a port we picked).
A start that fails to bind moves to another free port, unless the port is fixed (given by the
caller, or kept across ``stop()``/``start()`` so that clients reconnect to the same address).

Each server writes its log to ``<workdir>/<name>.log``; a failed start raises
:class:`ServiceError` quoting that log. ``stop()`` sends SIGTERM and then SIGKILL after a
time-out, ``kill()`` sends SIGKILL at once (a crash: no final save). Whatever is still running at
interpreter exit is killed by an ``atexit`` hook; servers started from the main thread also die
with a hard-killed parent (Linux parent-death signal via ``setpriv``).
"""

from __future__ import annotations

import atexit
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Self

REPO_ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO_PROFILE = REPO_ROOT / "deploy" / "mosquitto" / "edgeloop.conf"
LOOPBACK = "127.0.0.1"

__all__ = [
    "MOSQUITTO_PROFILE",
    "InfluxServer",
    "MosquittoServer",
    "ServiceError",
    "find_executable",
    "free_port",
]

_PORT_IN_USE = re.compile(r"address already in use", re.IGNORECASE)
_START_ATTEMPTS = 5
_SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"  # mosquitto lives in /usr/sbin, often not on PATH

_live: set[_Server] = set()
_live_lock = threading.Lock()


class ServiceError(RuntimeError):
    """A test server could not be found, started or reached."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` right now (it may be taken again before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def find_executable(name: str) -> str | None:
    """Path of ``name`` from ``$EDGELOOP_<NAME>``, ``PATH`` or the sbin directories, else None."""
    override = os.environ.get(f"EDGELOOP_{name.upper()}")
    if override:
        return override if os.access(override, os.X_OK) else None
    return shutil.which(name) or shutil.which(name, path=_SBIN_PATH)


def _listening_ports(pid: int) -> set[int] | None:
    """TCP ports the process listens on (Linux /proc), or None where that cannot be read."""
    try:
        fd_dir = f"/proc/{pid}/fd"
        links = (os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir))
        inodes = {link[8:-1] for link in links if link.startswith("socket:[")}
    except OSError:
        return None
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _parent_death_wrapper() -> list[str]:
    """Prefix that makes the child die with its parent thread, only used from the main thread.

    PR_SET_PDEATHSIG fires when the *thread* that forked exits, so a server started from a
    short-lived worker thread would die with that thread; the main thread lives as long as the
    interpreter, which is the lifetime we want.
    """
    setpriv = shutil.which("setpriv")
    if setpriv and sys.platform == "linux" and threading.current_thread() is threading.main_thread():
        return [setpriv, "--pdeathsig", "KILL", "--"]
    return []


class _Server:
    """One server process: temp dir, port, start/stop/kill and readiness; subclasses add the rest."""

    name = "server"
    scheme = "tcp"

    def __init__(self, *, port: int | None = None, workdir: str | os.PathLike[str] | None = None,
                 ready_timeout: float = 15.0) -> None:
        binary = find_executable(self.name)
        if binary is None:
            raise ServiceError(f"{self.name} is not installed (looked in PATH and {_SBIN_PATH})")
        self.binary = binary
        self.host = LOOPBACK
        self.port = port if port is not None else free_port()
        self._port_fixed = port is not None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"edgeloop-{self.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.ready_timeout = ready_timeout
        self.last_start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- public surface ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start (or start again, same port and data) and return once the server serves."""
        if self.running:
            return self
        attempts = 1 if self._port_fixed else _START_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                self._start_once()
            except _PortTaken as exc:
                if attempt == attempts:
                    raise ServiceError(
                        f"{self.name}: port {self.port} is in use"
                        + ("" if self._port_fixed else f" (tried {attempts} ports)")
                        + f"\n{exc}"
                    ) from None
                self.port = free_port()
            else:
                self._port_fixed = True  # clients expect the same address after stop()/start()
                return self
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 10.0) -> int | None:
        """Graceful stop: SIGTERM, then SIGKILL after ``timeout`` s. Returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._forget()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL, no chance to save or clean up: what a crash or power loss looks like."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._forget()

    def restart(self) -> Self:
        """Graceful stop, then start on the same port with the same data."""
        self.stop()
        return self.start()

    def log_text(self) -> str:
        """Everything the server logged so far, across restarts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.url} {state} in {self.workdir}>"

    # -- for subclasses ----------------------------------------------------------------------

    def _prepare(self) -> list[str]:
        """Write config files for the current port; return the command line."""
        raise NotImplementedError

    def _probe(self) -> bool:
        """True when the server answers its protocol on self.port."""
        raise NotImplementedError

    # -- internals -----------------------------------------------------------------------------

    def _start_once(self) -> None:
        command = _parent_death_wrapper() + self._prepare()
        with self.log_path.open("ab") as log:
            log.write(f"=== edgeloop tests: starting on port {self.port}: {command}\n".encode())
            log.flush()
            offset = log.tell()
            began = time.monotonic()
            self._proc = subprocess.Popen(
                command,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches pytest, which stops us in order
            )
        with _live_lock:
            _live.add(self)
        deadline = began + self.ready_timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._forget()
                output = self._log_since(offset)
                if _PORT_IN_USE.search(output):
                    raise _PortTaken(output)
                raise ServiceError(self._failure(f"exited with code {code} during start", output))
            if self._owns_port() and self._probe():
                self.last_start_seconds = time.monotonic() - began
                return
            if time.monotonic() > deadline:
                self.kill()
                raise ServiceError(
                    self._failure(f"not ready after {self.ready_timeout:.0f} s", self._log_since(offset))
                )
            time.sleep(0.01)

    def _owns_port(self) -> bool:
        ports = _listening_ports(self._proc.pid) if self._proc else None
        return ports is None or self.port in ports

    def _log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def _failure(self, what: str, output: str) -> str:
        tail = "\n".join(output.splitlines()[-60:]) or "(nothing logged)"
        return f"{self.name} on port {self.port} {what}; log {self.log_path}:\n{tail}"

    def _forget(self) -> None:
        with _live_lock:
            _live.discard(self)


class _PortTaken(Exception):
    """The server could not bind its port (someone else took it); retry on another one."""


class MosquittoServer(_Server):
    """Mosquitto running the project's broker profile (deploy/mosquitto/edgeloop.conf).

    The configuration is generated from the profile: only the listener, ``persistence_location``,
    ``user`` and ``log_dest`` lines are replaced. Keyword ``overrides`` replace or add profile
    settings by name (``max_inflight_messages=20``, ``persistence=False``); ``None`` removes a
    setting, a list repeats it.
    """

    name = "mosquitto"
    scheme = "mqtt"
    _REPLACED = frozenset({"listener", "port", "bind_address", "persistence_location", "user", "log_dest"})

    def __init__(
        self,
        *,
        port: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
        profile: str | os.PathLike[str] = MOSQUITTO_PROFILE,
        ready_timeout: float = 15.0,
        **overrides: Any,
    ) -> None:
        reserved = self._REPLACED.intersection(overrides)
        if reserved:
            raise ValueError(f"the harness sets {sorted(reserved)} itself; they cannot be overridden")
        super().__init__(port=port, workdir=workdir, ready_timeout=ready_timeout)
        self.profile = Path(profile)
        self.overrides = dict(overrides)
        self.config_path = self.workdir / "mosquitto.conf"
        self.data_dir = self.workdir / "data"

    def render_config(self) -> str:
        """The profile with this server's listener, data dir, user, log and overrides."""
        lines: list[str] = []
        listeners = 0
        for line in self.profile.read_text().splitlines():
            key = line.split(maxsplit=1)[0] if line.strip() and not line.lstrip().startswith("#") else ""
            if key == "listener":
                listeners += 1
                lines.append(f"listener {self.port} {self.host}")
            elif key in self._REPLACED or key in self.overrides:
                lines.append(f"# (replaced by tests/services.py) {line}")
            else:
                lines.append(line)
        if listeners != 1:
            raise ServiceError(f"{self.profile} must hold exactly one listener line, has {listeners}")
        lines += [
            "",
            "# --- set by tests/services.py ---",
            f"persistence_location {self.data_dir}/",
            "log_dest stderr",
        ]
        try:  # when started as root mosquitto drops to user "mosquitto", who cannot write here
            lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        except KeyError:
            pass
        for key, value in self.overrides.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            for item in values:
                if item is not None:
                    text = ("true" if item else "false") if isinstance(item, bool) else str(item)
                    lines.append(f"{key} {text}")
        return "\n".join(lines) + "\n"

    def _prepare(self) -> list[str]:
        self.data_dir.mkdir(exist_ok=True)
        self.config_path.write_text(self.render_config())
        return [self.binary, "-c", str(self.config_path)]

    def _probe(self) -> bool:
        # MQTT 3.1.1 CONNECT, clean session, keepalive 60 s, client id "edgeloop-probe".
        client_id = b"edgeloop-probe"
        body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                sock.sendall(b"\x10" + bytes([len(body)]) + body)
                connack = sock.recv(4)
                sock.sendall(b"\xe0\x00")  # DISCONNECT
        except OSError:
            return False
        return connack[:2] == b"\x20\x02"  # any CONNACK: even a refusal means it serves


class InfluxServer(_Server):
    """InfluxDB 1.x (``influxd``) with its meta, data and WAL in the temp dir.

    Only the HTTP API is on (``/write``, ``/query``, ``/ping``); the backup RPC listener takes an
    OS-chosen port; reporting, the ``_internal`` monitor store, query and HTTP logs are off, and
    the UDP/graphite/collectd/opentsdb inputs stay at their default, off.
    """

    name = "influxd"
    scheme = "http"

    def __init__(self, *, port: int | None = None, workdir: str | os.PathLike[str] | None = None,
                 ready_timeout: float = 30.0) -> None:
        super().__init__(port=port, workdir=workdir, ready_timeout=ready_timeout)
        self.config_path = self.workdir / "influxdb.conf"
        self.version: str | None = None
        # Never send loopback requests through an http_proxy from the environment.
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def new_database(self, prefix: str = "t") -> str:
        """A unique database name starting with ``prefix``; not created yet."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix):
            raise ValueError(f"prefix must be a plain identifier, got {prefix!r}")
        return f"{prefix}_{uuid.uuid4().hex[:12]}"

    def query(self, database: str | None, influxql: str, **params: str) -> dict[str, Any]:
        """Run InfluxQL through ``/query``; returns the raw JSON (statement errors included).

        SELECT and SHOW go as GET; anything else (CREATE, DROP, ...) as POST, as InfluxDB 1.x
        requires. Extra ``params`` (``epoch="ns"``) are passed on. Raises ServiceError on an
        HTTP error status.
        """
        fields = {"q": influxql, **params}
        if database:
            fields["db"] = database
        read_only = influxql.lstrip().upper().startswith(("SELECT", "SHOW"))
        if read_only:
            status, body = self._request("GET", "/query?" + urllib.parse.urlencode(fields))
        else:
            status, body = self._request("POST", "/query", urllib.parse.urlencode(fields).encode(),
                                         {"Content-Type": "application/x-www-form-urlencoded"})
        if status >= 300:
            raise ServiceError(f"influxd /query answered {status}: {body[:2000]!r}")
        return json.loads(body)

    def create_database(self, name: str) -> None:
        """CREATE DATABASE, raising ServiceError if InfluxDB reports an error."""
        result = self.query(None, f'CREATE DATABASE "{name}"')
        error = result.get("error") or next((r["error"] for r in result["results"] if "error" in r), None)
        if error:
            raise ServiceError(f"CREATE DATABASE {name}: {error}")

    def write(self, database: str, lines: str | list[str], precision: str = "ns") -> None:
        """POST line protocol to ``/write``; raises ServiceError unless InfluxDB answers 204."""
        data = lines if isinstance(lines, str) else "\n".join(lines)
        query = urllib.parse.urlencode({"db": database, "precision": precision})
        status, body = self._request("POST", f"/write?{query}", data.encode())
        if status != 204:
            raise ServiceError(f"influxd /write answered {status}: {body[:2000]!r}")

    # -- internals -----------------------------------------------------------------------------

    def _request(self, method: str, path: str, data: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with self._http.open(request, timeout=timeout) as response:
                if self.version is None:
                    self.version = response.headers.get("X-Influxdb-Version")
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def _prepare(self) -> list[str]:
        d = self.workdir
        self.config_path.write_text(
            f"""\
# Generated by tests/services.py for an InfluxDB 1.x test server.
reporting-disabled = true   # upstream key
reporting-enabled = false   # Debian's patched key
bind-address = "{self.host}:0"  # backup/restore RPC: any free port, unused by tests
[meta]
  dir = "{d}/meta"
  logging-enabled = false
[data]
  dir = "{d}/data"
  wal-dir = "{d}/wal"
  query-log-enabled = false
[monitor]
  store-enabled = false
[subscriber]
  enabled = false
[continuous_queries]
  log-enabled = false
[http]
  enabled = true
  bind-address = "{self.host}:{self.port}"
  log-enabled = false
  pprof-enabled = false
[logging]
  suppress-logo = true
"""
        )
        return [self.binary, "run", "-config", str(self.config_path)]

    def _probe(self) -> bool:
        try:
            status, _ = self._request("GET", "/ping", timeout=1.0)
        except OSError:
            return False
        return status == 204


@atexit.register
def _kill_leftovers() -> None:
    """Safety net: SIGKILL every server a test or script forgot to stop."""
    with _live_lock:
        leftovers = list(_live)
    for server in leftovers:
        try:
            server.kill()
        except OSError:
            pass
