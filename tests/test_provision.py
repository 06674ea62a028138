"""Provisioning and broker security, proven on a real Mosquitto 2.0 with the generated config.

One TLS broker per module (per xdist worker) runs the configuration `edgeloop broker-config`
wrote, through tests/services.py (the harness swaps only the listener address, persistence
location, user and log lines). Raw paho clients are used where the test must see the broker's
PUBACK reason codes, which MqttLink does not surface.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

from aggregator import broker_config as bc
from aggregator.provision import ProvisionError, Provisioner
from edge_agent import config as agent_config
from edgeloop import wire
from edgeloop.cli_devices import broker_config, devices
from edgeloop.mqtt import MqttError, MqttLink
from tests.services import MosquittoServer, find_executable, free_port
from tests.waiting import poll as _wait

PROFILE = "machine"


class TlsMosquitto(MosquittoServer):
    """The harness's broker, probed over TLS with the generated CA (the plain probe cannot speak TLS)."""

    def __init__(self, *, ca_file: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ca_file = ca_file
        self.scheme = "mqtts"

    def _probe(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        body = b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x05probe"
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as raw, \
                    ctx.wrap_socket(raw, server_hostname=self.host) as sock:
                sock.sendall(b"\x10" + bytes([len(body)]) + body)
                return sock.recv(4)[:1] == b"\x20"  # a CONNACK, even a refusal
        except OSError:
            return False


class Client:
    """A raw paho client that records what it sees (messages, PUBACK reasons, connection)."""

    def __init__(self, broker: "Broker", name: str, *, password: str | None = None, client_id: str | None = None,
                 proto: int = paho.MQTTv5) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.pubacks: dict[int, str] = {}
        self.connack: list[str] = []
        self.disconnects: list[str] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"{name}-{uuid.uuid4().hex[:6]}",
                                  protocol=proto)
        self.client.username_pw_set(name, password if password is not None else broker.password(name))
        self.client.tls_set(ca_certs=str(broker.ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.on_message = lambda c, u, m: self.got.append((m.topic, m.payload))
        self.client.on_publish = lambda c, u, mid, rc, p: self.pubacks.__setitem__(mid, str(rc))
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.append(str(rc))
        self.client.on_disconnect = lambda c, u, f, rc, p: self.disconnects.append(str(rc))
        self.client.reconnect_delay_set(30, 60)  # no reconnect storms inside a test
        self.client.connect(broker.server.host, broker.server.port)
        self.client.loop_start()
        assert _wait(lambda: self.connack), f"{name}: no CONNACK"

    @property
    def accepted(self) -> bool:
        return self.connack[0] == "Success"

    def subscribe(self, *filters: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe([(f, 1) for f in filters])
        assert done.wait(5), "no SUBACK"

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> str | None:
        """Publish; at QoS 1 wait for the PUBACK and return its reason."""
        info = self.client.publish(topic, payload, qos=qos)
        if qos == 0:
            return None
        assert _wait(lambda: info.mid in self.pubacks), f"no PUBACK for {topic}"
        return self.pubacks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Broker:
    """The module's provisioned world: data dir, issued bundles and a running TLS broker."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.prov = Provisioner(root / "data")
        self.port = free_port()
        self.settings = self.prov.configure_broker(root / "broker", port=self.port, tls=True, hosts=["127.0.0.1"])
        self.ca = root / "broker" / "ca.crt"
        for name in ("dev-a", "dev-b", "dev-c", "dev-r", "aggregator-t"):
            self.issue(name)
        conf = root / "broker" / "mosquitto.conf"
        self.server = TlsMosquitto(ca_file=self.ca, port=self.port, profile=conf, workdir=root / "run").start()
        self.url = f"mqtts://127.0.0.1:{self.port}"

    def issue(self, name: str, profile: str = PROFILE):
        role = "aggregator" if name.startswith("aggregator-") else "device"
        return self.prov.add(name, out_dir=self.root / "issued" / name, profile=profile, role=role)

    def password(self, name: str) -> str:
        return (self.root / "issued" / name / "mqtt-password").read_text().strip()

    def link(self, name: str, **kwargs) -> MqttLink:
        address = wire_address(self.url, name, self.password(name))
        return MqttLink(address, name, ca_file=str(self.ca), **kwargs)


def wire_address(url: str, name: str, password: str):
    from edgeloop.mqtt import parse_mqtt_url

    return parse_mqtt_url(url).with_credentials(name, password)


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Broker:
    if not find_executable("mosquitto"):
        pytest.skip("mosquitto is not installed (Debian package mosquitto)")
    world = Broker(tmp_path_factory.mktemp("provision"))
    yield world
    world.server.stop()


# -- files and commands (no broker) ------------------------------------------------------------------


def _cli(*args: str):
    import click

    group = click.Group(commands=[devices, broker_config])
    return CliRunner().invoke(group, list(args), catch_exceptions=False)


def test_password_hash_matches_mosquitto_passwd(tmp_path):
    ours = bc.hash_password("s3cret")
    assert bc.verify_password("s3cret", ours) and not bc.verify_password("s3creT", ours)
    passwd_bin = shutil.which("mosquitto_passwd")
    if passwd_bin is None:
        pytest.skip("mosquitto_passwd not installed")
    path = tmp_path / "pw"
    subprocess.run([passwd_bin, "-c", "-b", str(path), "someone", "s3cret"], check=True, capture_output=True)
    theirs = path.read_text().strip().split(":", 1)[1]
    assert theirs.startswith("$7$101$")
    assert bc.verify_password("s3cret", theirs) and not bc.verify_password("other", theirs)


def test_config_keeps_every_profile_setting(tmp_path):
    profile = bc.PROFILE_PATH.read_text()
    conf = bc.render_config(profile, port=8883, bind=None, password_file=tmp_path / "passwd",
                            acl_file=tmp_path / "acl", tls=(Path("/c"), Path("/s"), Path("/k")))
    settings = {ln.strip() for ln in profile.splitlines() if bc._key(ln)}
    rendered = {ln.strip() for ln in conf.splitlines() if bc._key(ln)}
    assert settings - rendered == {"allow_anonymous true", "listener 1883 127.0.0.1"}
    assert rendered - settings == {
        "allow_anonymous false", f"password_file {tmp_path}/passwd", f"acl_file {tmp_path}/acl",
        "use_username_as_clientid true", "listener 8883", "cafile /c", "certfile /s", "keyfile /k"}
    with pytest.raises(ValueError, match="exactly one 'listener'"):
        bc.render_config(profile + "listener 1884\n", port=1, bind=None, password_file=tmp_path, acl_file=tmp_path)


def test_cli_issue_list_revoke_without_leaking_the_secret(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    data = tmp_path / "data"
    (data / "keys").mkdir(parents=True)
    (data / "keys" / "signing.pub").write_text("-----BEGIN PUBLIC KEY-----\nfake\n-----END PUBLIC KEY-----\n")
    out = _cli("devices", "add", "early", "--data-dir", str(data), "--dir", str(tmp_path / "early"))
    assert out.exit_code != 0 and "broker-config" in out.output  # nothing to add to yet
    out = _cli("broker-config", "--dir", str(tmp_path / "broker"), "--port", "18883", "--host", "broker.example",
               "--data-dir", str(data))
    assert out.exit_code == 0, out.output
    assert "mqtts://broker.example:18883" in out.output
    bundle = tmp_path / "press-01"
    out = _cli("devices", "add", "press-01", "--profile", "pump", "--data-dir", str(data), "--dir", str(bundle),
               "--install-dir", "/etc/edgeloop")
    assert out.exit_code == 0, out.output
    password = (bundle / "mqtt-password").read_text().strip()
    assert len(password) >= 40
    assert stat.S_IMODE((bundle / "mqtt-password").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "broker" / "passwd").stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "provision" / "ca.key").stat().st_mode) == 0o600
    assert (bundle / "signing.pub").read_text() == (data / "keys" / "signing.pub").read_text()
    assert (bundle / "ca.crt").read_bytes() == (tmp_path / "broker" / "ca.crt").read_bytes()
    cfg = agent_config.load(bundle / "agent.toml")
    assert (cfg.device_id, cfg.profile, cfg.mqtt.username) == ("press-01", "pump", "press-01")
    assert cfg.mqtt.url == "mqtts://broker.example:18883"
    assert (cfg.mqtt.password_file, cfg.mqtt.ca_file) == ("/etc/edgeloop/mqtt-password", "/etc/edgeloop/ca.crt")
    assert cfg.mqtt.password is None
    # The broker files: a $7$ hash of this password, the device's ACL block.
    passwd = dict(ln.split(":", 1) for ln in (tmp_path / "broker" / "passwd").read_text().splitlines())
    assert bc.verify_password(password, passwd["press-01"])
    acl = (tmp_path / "broker" / "acl").read_text()
    assert "user press-01\ntopic read edgeloop/v1/models/pump/#" in acl
    listing = _cli("devices", "list", "--data-dir", str(data))
    assert "press-01" in listing.output and "pump" in listing.output
    # Errors that say what is wrong.
    again = _cli("devices", "add", "press-01", "--data-dir", str(data), "--dir", str(tmp_path / "x"))
    assert again.exit_code != 0 and "already issued" in again.output
    bad = _cli("devices", "add", "aggregator-x", "--data-dir", str(data), "--dir", str(tmp_path / "y"))
    assert bad.exit_code != 0 and "aggregator names" in bad.output
    out = _cli("devices", "revoke", "press-01", "--data-dir", str(data))
    assert out.exit_code == 0, out.output
    assert "press-01" not in (tmp_path / "broker" / "passwd").read_text()
    assert "press-01" not in (tmp_path / "broker" / "acl").read_text()
    assert _cli("devices", "revoke", "press-01", "--data-dir", str(data)).exit_code != 0
    # The secret was never printed or logged, and the registry holds only its hash.
    everything = out.output + listing.output + caplog.text + (data / "provision" / "registry.json").read_text()
    assert password not in everything


def test_plain_listener_refuses_anonymous(tmp_path):
    if not find_executable("mosquitto"):
        pytest.skip("mosquitto is not installed")
    prov = Provisioner(tmp_path / "data")
    prov.configure_broker(tmp_path / "broker", port=1883, tls=False)
    prov.add("plain-dev", out_dir=tmp_path / "plain-dev")
    with MosquittoServer(profile=tmp_path / "broker" / "mosquitto.conf", workdir=tmp_path / "run") as server:
        with pytest.raises(MqttError, match="(?i)not authori"):
            MqttLink(server.url, "anon").start(timeout=3)
        password = (tmp_path / "plain-dev" / "mqtt-password").read_text().strip()
        link = MqttLink(wire_address(server.url, "plain-dev", password), "plain-dev")
        assert link.start(timeout=3)
        link.stop()


# -- the ACL on a real broker --------------------------------------------------------------------------


def test_device_cannot_publish_as_another(broker):
    agg = Client(broker, "aggregator-t")
    a = Client(broker, "dev-a")
    c311 = Client(broker, "dev-c", proto=paho.MQTTv311)  # another user: one client per username
    try:
        agg.subscribe("$share/prov-test/edgeloop/v1/dev/+/+")
        assert a.publish(wire.topic("dev-a", "telemetry"), b"own") == "Success"
        assert a.publish(wire.topic("dev-b", "telemetry"), b"spoof-q1") == "Not authorized"  # MQTT 5 says so
        a.publish(wire.topic("dev-b", "telemetry"), b"spoof-q0", qos=0)
        assert c311.publish(wire.topic("dev-b", "telemetry"), b"spoof-311") == "Success"  # 3.1.1 cannot say no
        assert _wait(lambda: (wire.topic("dev-a", "telemetry"), b"own") in agg.got)
        a.publish(wire.topic("dev-a", "telemetry"), b"marker")  # ordered after the spoofs
        assert _wait(lambda: (wire.topic("dev-a", "telemetry"), b"marker") in agg.got)
        assert not [t for t, _ in agg.got if "/dev-b/" in t], agg.got
    finally:
        for c in (agg, a, c311):
            c.close()


def test_only_the_aggregator_offers_models_and_writes_control(broker):
    agg, a, b = Client(broker, "aggregator-t"), Client(broker, "dev-a"), Client(broker, "dev-b")
    try:
        b.subscribe(f"edgeloop/v1/models/{PROFILE}/#", "edgeloop/v1/ctl/dev-b/#")
        a.subscribe("edgeloop/v1/ctl/#", "edgeloop/v1/ctl/dev-b/confirm")  # granted, yet filtered on delivery
        assert a.publish(f"edgeloop/v1/models/{PROFILE}/offer", b"evil model") == "Not authorized"
        assert a.publish("edgeloop/v1/ctl/dev-b/config", b"evil config") == "Not authorized"
        assert agg.publish(f"edgeloop/v1/models/{PROFILE}/offer", b"good model") == "Success"
        assert agg.publish("edgeloop/v1/ctl/dev-b/confirm", b"for b") == "Success"
        assert _wait(lambda: len(b.got) == 2)
        time.sleep(0.2)
        assert sorted(b.got) == [("edgeloop/v1/ctl/dev-b/confirm", b"for b"),
                                 (f"edgeloop/v1/models/{PROFILE}/offer", b"good model")]
        assert a.got == []  # neither b's control topic nor a model (dev-a never subscribed to models)
    finally:
        for c in (agg, a, b):
            c.close()


def test_client_id_cannot_be_borrowed(broker):
    b = Client(broker, "dev-b", client_id="dev-b")
    a = Client(broker, "dev-a", client_id="dev-b")  # becomes "dev-a" (use_username_as_clientid)
    try:
        assert a.accepted
        time.sleep(0.3)
        assert b.client.is_connected() and b.disconnects == []
    finally:
        a.close()
        b.close()


def test_tls_end_to_end_with_issued_agent_config(broker, tmp_path):
    from edge_agent.agent import Agent

    got: list[str] = []
    agg = broker.link("aggregator-t", on_message=lambda m: got.append(m.topic))
    assert agg.start(timeout=5)
    agg.subscribe("$share/prov-e2e/edgeloop/v1/dev/+/+")
    cfg = agent_config.load(broker.root / "issued" / "dev-a" / "agent.toml", data_dir=str(tmp_path),
                            **{"sampling.speed": 10.0})
    assert cfg.mqtt.url == broker.url
    agent = Agent(cfg)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), kwargs={"drain_timeout": 0})
    thread.start()
    try:
        assert _wait(lambda: wire.topic("dev-a", "telemetry") in got, timeout=10), got
        assert wire.topic("dev-a", "status") in got
    finally:
        stop.set()
        thread.join(10)
        agg.stop(forget_session=True)
    # The same TLS port refuses plain MQTT, and TLS without the private CA.
    with pytest.raises(MqttError):
        MqttLink(wire_address(f"mqtt://127.0.0.1:{broker.port}", "dev-a", broker.password("dev-a")),
                 "dev-a").start(timeout=1)
    with pytest.raises(MqttError):
        MqttLink(wire_address(broker.url, "dev-a", broker.password("dev-a")), "dev-a").start(timeout=1)


def test_revoked_device_is_cut_off_after_reload(broker):
    r = Client(broker, "dev-r")
    password = broker.password("dev-r")
    assert r.accepted
    pid = broker.prov.revoke("dev-r")  # rewrites passwd + acl, SIGHUP through the pid file
    assert pid == broker.server.pid
    # Measured on 2.0.11: the reload disconnects the revoked client at once...
    assert _wait(lambda: r.disconnects), "revoked client still connected"
    r.close()
    # ...and refuses it from then on.
    again = Client(broker, "dev-r", password=password)
    assert again.connack == ["Not authorized"]
    again.close()
    assert "dev-r" not in {c.name for c in broker.prov.clients()}
