"""Devices in and out: the registry of issued credentials and the broker files derived from it.

The registry (``<data_dir>/provision/registry.json``, mode 0600) is the one source of truth:
which clients exist, their role (device or aggregator), a device's profile, and each one's
password *hash*. The broker's password and ACL files are rendered from it on every change, so
they can always be regenerated. The private CA key lives next to it (``ca.key``, 0600) and
never goes into the broker directory or a device bundle.

A device's password exists in clear only in its bundle (``mqtt-password``, 0600); nothing here
logs or returns it. After a change the broker must re-read its files: :meth:`reload_broker`
sends SIGHUP to the pid in the broker's ``pid_file`` (measured on 2.0.11: the reload also
disconnects a connected client that was revoked, and refuses its next CONNECT).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from aggregator import broker_config as bc
from edgeloop import config as _config
from edgeloop.wire import DEVICE_ID_PATTERN

__all__ = ["ProvisionError", "Client", "BrokerSettings", "Issued", "Provisioner", "AGGREGATOR_PREFIX"]

log = logging.getLogger(__name__)

AGGREGATOR_PREFIX = "aggregator-"
_PROFILE_RE = r"^[A-Za-z0-9_\-]{1,32}$"  # the agent config's profile pattern, minus the empty one


class ProvisionError(Exception):
    """A provisioning request that cannot be done; the message says what and how to fix it."""


@dataclass
class Client:
    """One issued credential. ``password_hash`` is Mosquitto's ``$7$`` form, never the secret."""

    name: str
    role: str  # "device" | "aggregator"
    profile: str | None
    issued_at: float
    password_hash: str


@dataclass
class BrokerSettings:
    """Where the broker's files are and how clients reach it."""

    dir: str
    port: int
    tls: bool
    host: str  # what issued configs put in their URL
    pid_file: str

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass
class Issued:
    """What :meth:`Provisioner.add` wrote (paths only: the password stays in its file)."""

    name: str
    role: str
    dir: Path
    files: list[Path]
    reloaded_pid: int | None


class Provisioner:
    """Issue and revoke broker credentials, and write the broker's security files."""

    def __init__(self, data_dir: str | os.PathLike[str] | None = None) -> None:
        self.data_dir = Path(data_dir) if data_dir else _config.default_data_dir()
        self.root = self.data_dir / "provision"
        self.registry_path = self.root / "registry.json"
        self.ca_key_path = self.root / "ca.key"
        self.ca_cert_path = self.root / "ca.crt"
        self.signing_key_path = self.data_dir / "keys" / "signing.pub"

    # -- registry ---------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[dict]:
        """The registry under an exclusive lock; saved on a clean exit (two `add`s never race)."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            yield data
            bc.write_private(self.registry_path, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def _read(self) -> dict:
        try:
            data = json.loads(self.registry_path.read_text())
        except FileNotFoundError:
            return {"version": 1, "broker": None, "clients": {}}
        except (OSError, ValueError) as exc:
            raise ProvisionError(f"{self.registry_path}: unreadable registry: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != 1:
            raise ProvisionError(f"{self.registry_path}: not an edgeloop device registry (version 1)")
        return data

    def clients(self) -> list[Client]:
        """Every issued credential, aggregators first, then by name."""
        data = self._read()
        items = [Client(**c) for c in data["clients"].values()]
        return sorted(items, key=lambda c: (c.role != "aggregator", c.name))

    def broker(self) -> BrokerSettings | None:
        raw = self._read()["broker"]
        return BrokerSettings(**raw) if raw else None

    # -- broker ------------------------------------------------------------------------------

    def configure_broker(
        self,
        out_dir: str | os.PathLike[str],
        *,
        port: int = 8883,
        tls: bool = True,
        hosts: Sequence[str] = (),
        bind: str | None = None,
        profile: str | os.PathLike[str] = bc.PROFILE_PATH,
    ) -> BrokerSettings:
        """Write mosquitto.conf, passwd, acl (and ca.crt, server.crt, server.key) into ``out_dir``.

        ``hosts`` are the names devices use to reach the broker: the first goes into issued
        URLs (default 127.0.0.1), all of them plus localhost and 127.0.0.1 into the server
        certificate. ``bind`` defaults to every interface with TLS and to loopback without it
        (passwords in clear text must not cross a network). The CA is made once and reused, so
        devices already issued keep trusting a regenerated broker.
        """
        profile_path = Path(profile)
        if not profile_path.is_file():
            raise ProvisionError(f"broker profile {profile_path} not found; pass --profile deploy/mosquitto/edgeloop.conf")
        out = Path(out_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        hosts = list(hosts) or ["127.0.0.1"]
        settings = BrokerSettings(dir=str(out), port=port, tls=tls, host=hosts[0],
                                  pid_file=str(out / "mosquitto.pid"))
        with self._locked() as data:
            tls_files = None
            if tls:
                ca_key, ca_cert = self._ca()
                key_pem, cert_pem = bc.make_server_cert(ca_key, ca_cert, [*hosts, "localhost", "127.0.0.1"])
                (out / "ca.crt").write_bytes(ca_cert)
                (out / "server.crt").write_bytes(cert_pem)
                bc.write_private(out / "server.key", key_pem)
                tls_files = (out / "ca.crt", out / "server.crt", out / "server.key")
            conf = bc.render_config(
                profile_path.read_text(), port=port, bind=bind if bind is not None else (None if tls else "127.0.0.1"),
                password_file=out / "passwd", acl_file=out / "acl", pid_file=Path(settings.pid_file),
                tls=tls_files, source=str(profile_path),
            )
            (out / "mosquitto.conf").write_text(conf)
            data["broker"] = asdict(settings)
            self._write_broker_files(data)
        log.info("broker configuration written to %s (%s)", out, settings.url)
        return settings

    def _ca(self) -> tuple[bytes, bytes]:
        if self.ca_key_path.exists() and self.ca_cert_path.exists():
            return self.ca_key_path.read_bytes(), self.ca_cert_path.read_bytes()
        key_pem, cert_pem = bc.make_ca()
        bc.write_private(self.ca_key_path, key_pem)
        self.ca_cert_path.write_bytes(cert_pem)
        return key_pem, cert_pem

    def _write_broker_files(self, data: dict) -> None:
        broker = data["broker"]
        if not broker:
            return
        out = Path(broker["dir"])
        clients = [Client(**c) for c in data["clients"].values()]
        bc.write_private(out / "passwd", bc.render_password_file({c.name: c.password_hash for c in clients}))
        acl = bc.render_acl((bc.AclEntry(c.name, c.role, c.profile) for c in clients), source=str(self.registry_path))
        bc.write_private(out / "acl", acl, mode=0o644)

    def reload_broker(self) -> int | None:
        """SIGHUP the broker named by its pid file; the pid, or None if none runs (or not ours)."""
        broker = self.broker()
        if broker is None:
            return None
        try:
            pid = int(Path(broker.pid_file).read_text().split()[0])
            comm = Path(f"/proc/{pid}/comm").read_text().strip() if Path("/proc").is_dir() else "mosquitto"
        except (OSError, ValueError, IndexError):
            return None
        if comm != "mosquitto":  # a stale pid file: never signal a stranger
            return None
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as exc:
            log.warning("cannot signal broker pid %s: %s", pid, exc)
            return None
        return pid

    # -- devices -----------------------------------------------------------------------------

    def add(
        self,
        name: str,
        *,
        out_dir: str | os.PathLike[str],
        profile: str = "machine",
        role: str = "device",
        install_dir: str | None = None,
        reload: bool = True,
    ) -> Issued:
        """Issue credentials into ``out_dir`` and grant them on the broker.

        The bundle holds ``agent.toml`` (or ``aggregator.toml``), ``mqtt-password`` (0600),
        ``ca.crt`` with TLS, and ``signing.pub`` when ``<data_dir>/keys/signing.pub`` exists.
        Paths inside the config point into ``install_dir`` (where the bundle will live on the
        device; default: ``out_dir`` itself).
        """
        _check_name(name, role)
        if role == "device" and not _matches(_PROFILE_RE, profile):
            raise ProvisionError(f"profile {profile!r} must be 1-32 letters, digits, '_' or '-'")
        out = Path(out_dir).resolve()
        if out.exists() and any(out.iterdir()):
            raise ProvisionError(f"{out} exists and is not empty; give a new --dir")
        password = secrets.token_urlsafe(32)
        with self._locked() as data:
            if not data["broker"]:
                raise ProvisionError(f"no broker configured in {self.data_dir}; run `edgeloop broker-config --dir DIR` first")
            if name in data["clients"]:
                raise ProvisionError(f"{name!r} is already issued; `edgeloop devices revoke {name}` first to re-issue")
            broker = BrokerSettings(**data["broker"])
            out.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(out, 0o700)  # the bundle holds a secret until it is copied to the device
            files = self._write_bundle(out, Path(install_dir) if install_dir else out, name, role, profile, password, broker)
            data["clients"][name] = asdict(Client(name, role, profile if role == "device" else None, time.time(),
                                                  bc.hash_password(password)))
            self._write_broker_files(data)
        del password
        pid = self.reload_broker() if reload else None
        log.info("issued %s %s into %s%s", role, name, out, f"; broker pid {pid} reloaded" if pid else "")
        return Issued(name, role, out, files, pid)

    def _write_bundle(self, out: Path, install: Path, name: str, role: str, profile: str, password: str,
                      broker: BrokerSettings) -> list[Path]:
        files = [out / "mqtt-password"]
        bc.write_private(files[0], password + "\n")
        ca_line = ""
        if broker.tls:
            shutil.copyfile(self.ca_cert_path, out / "ca.crt")
            files.append(out / "ca.crt")
            ca_line = f"ca_file = {_q(install / 'ca.crt')}\n"
        if self.signing_key_path.exists():
            shutil.copyfile(self.signing_key_path, out / "signing.pub")
            files.append(out / "signing.pub")
        common = (f"url = {_q(broker.url)}\nusername = {_q(name)}\n"
                  f"password_file = {_q(install / 'mqtt-password')}\n")
        if role == "device":
            text = (f"# Issued by `edgeloop devices add` for device {name}. Other settings: see\n"
                    f"# `edgeloop agent --example-config`.\n"
                    f"device_id = {_q(name)}\nprofile = {_q(profile)}\n\n[mqtt]\n{common}{ca_line}")
            files.append(out / "agent.toml")
        else:
            text = (f"# Issued by `edgeloop devices add --role aggregator` for {name}. Other settings: see\n"
                    f"# `edgeloop aggregator --example-config`.\n"
                    f"[mqtt]\n{common}{ca_line}client_id = {_q(name)}\n")
            files.append(out / "aggregator.toml")
        files[-1].write_text(text)
        return files

    def revoke(self, name: str, *, reload: bool = True) -> int | None:
        """Remove ``name`` from the registry and the broker's files; returns the reloaded pid."""
        with self._locked() as data:
            if name not in data["clients"]:
                raise ProvisionError(f"{name!r} is not issued (see `edgeloop devices list`)")
            del data["clients"][name]
            self._write_broker_files(data)
        pid = self.reload_broker() if reload else None
        log.info("revoked %s%s", name, f"; broker pid {pid} reloaded" if pid else "")
        return pid


def _matches(pattern: str, value: str) -> bool:
    import re

    return re.match(pattern, value) is not None


def _check_name(name: str, role: str) -> None:
    if role not in ("device", "aggregator"):
        raise ProvisionError(f"role must be 'device' or 'aggregator', not {role!r}")
    if not _matches(DEVICE_ID_PATTERN, name):
        raise ProvisionError(f"{name!r} is not a valid id: letters, digits, '_', '.', '-' (max 64, starts alphanumeric)")
    if (role == "aggregator") != name.startswith(AGGREGATOR_PREFIX):
        raise ProvisionError(f"{name!r}: aggregator names start with {AGGREGATOR_PREFIX!r} and device ids do not")


def _q(value: object) -> str:
    """A TOML basic string (JSON's escaping is a subset TOML reads)."""
    return json.dumps(str(value))
