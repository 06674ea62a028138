"""docs/protocol.md stays true: its examples pass the real decoder and run against real Mosquitto.

Every ``mosquitto_pub`` in a ```` ```sh ```` block of the document is read with shlex. Accepted
examples must decode and re-encode to equivalent JSON; examples in a block whose info string says
``refused=<reason>`` must be refused with exactly that reason. The field tables, the refusal
reasons and the limits the document quotes are compared with edgeloop/wire.py, so the page cannot
lose a kind or keep a field the code dropped. The ``mosquitto`` test runs the commands themselves.
"""

from __future__ import annotations

import inspect
import json
import queue
import re
import shlex
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgspec
import paho.mqtt.client as mqtt
import pytest

from edgeloop import wire, wire_models

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
DOC = DOC_PATH.read_text(encoding="utf-8")
CLASSES: dict[str, type] = {
    "telemetry": wire.Telemetry, "features": wire.Features, "inference": wire.Inference,
    "alert": wire.Alert, "status": wire.Status, "deployment": wire.Deployment, "confirm": wire.Confirm,
    "config": wire.DesiredConfig,
}
#: Model distribution (edgeloop/wire_models.py): documented and tested like the rest.
MODEL_CLASSES: dict[str, type] = {
    "offer": wire_models.ModelOffer, "chunkreq": wire_models.ChunkRequest,
    "models": wire_models.DesiredModels, "key": wire_models.KeyRotation,
}
CLASSES.update(MODEL_CLASSES)
RETAINED = {"status", "config", "offer", "models", "key"}
_FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
_WITH_VALUE = {"-h", "-p", "-q", "-t", "-m", "-i", "-C", "-W", "-V", "-F", "-k"}
_FLAGS = {"-r", "-v", "-n", "-d", "-N", "-R"}


@dataclass(frozen=True)
class Command:
    """One mosquitto_pub / mosquitto_sub command of the document."""

    argv: tuple[str, ...]
    refused: str | None  # the reason a refused example states; None for accepted ones
    line: int

    @property
    def tool(self) -> str:
        return self.argv[0]

    @property
    def options(self) -> dict[str, str | bool]:
        opts: dict[str, str | bool] = {}
        words = iter(self.argv[1:])
        for word in words:
            if word in _WITH_VALUE:
                opts[word] = next(words, "")
            elif word in _FLAGS:
                opts[word] = True
            else:
                raise AssertionError(f"docs/protocol.md:{self.line}: unexpected argument {word!r}")
        return opts

    @property
    def topic(self) -> str:
        return str(self.options["-t"])

    @property
    def payload(self) -> bytes:
        return b"" if self.options.get("-n") else str(self.options["-m"]).encode()

    @property
    def kind(self) -> str:
        return self.topic.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"line{self.line}-{self.kind if self.tool == 'mosquitto_pub' else 'sub'}"


def parse_commands(text: str) -> list[Command]:
    """Every mosquitto command in the ```sh blocks of ``text``, with the block's refused reason."""
    commands = []
    for block in _FENCE.finditer(text):
        info = block.group(1).split()
        if not info or info[0] != "sh":
            continue
        refused = dict(a.split("=", 1) for a in info[1:] if "=" in a).get("refused")
        line = text.count("\n", 0, block.start()) + 1
        argv: list[str] = []
        for word in shlex.split(block.group(2).replace("\\\n", " "), comments=True):
            if word in ("mosquitto_pub", "mosquitto_sub"):
                if argv:
                    commands.append(Command(tuple(argv), refused, line))
                argv = [word]
            else:
                assert argv, f"docs/protocol.md:{line}: {word!r} outside a mosquitto command"
                argv.append(word)
        if argv:
            commands.append(Command(tuple(argv), refused, line))
    return commands


COMMANDS = parse_commands(DOC)
PUBS = [c for c in COMMANDS if c.tool == "mosquitto_pub"]
ACCEPTED = [c for c in PUBS if c.refused is None]
REFUSED = [c for c in PUBS if c.refused is not None]
SUBS = [c for c in COMMANDS if c.tool == "mosquitto_sub"]


def decode(topic: str, payload: bytes) -> msgspec.Struct:
    """Decode like the receiving side would: ``decode`` uplink, ``decode_confirm`` downlink."""
    kind = topic.rsplit("/", 1)[-1]
    if kind == "offer":
        return wire_models.decode_offer(payload)
    if kind == "key":
        return wire_models.decode_key_rotation(payload)
    if kind == "chunkreq":
        return wire_models.decode_chunk_request(payload, topic)
    if kind == "models":
        return wire_models.decode_desired_models(payload, topic)
    where = wire.parse_topic(topic)
    if where.direction == "dev":
        return wire.decode(topic, payload)
    if where.kind == "config":
        return wire.decode_config(payload, topic)
    return wire.decode_confirm(payload, topic)


def section(title: str) -> str:
    """The prose under heading ``title`` up to the next heading of its level or higher (no code)."""
    prose = _FENCE.sub("", DOC)  # a shell comment in a code block is not a heading
    heading = re.search(rf"^(#+) {re.escape(title)}[ \t]*$", prose, re.M)
    assert heading, f"docs/protocol.md has no section {title!r}"
    rest = prose[heading.end():]
    end = re.search(rf"^#{{1,{len(heading.group(1))}}} ", rest, re.M)
    return rest[:end.start()] if end else rest


def table_names(text: str) -> set[str]:
    """The backquoted names in the first column of the tables in ``text``."""
    return {m.group(1) for m in re.finditer(r"^\|\s*`([^`]+)`\s*\|", text, re.M)}


def same_json(sent, back, where: str) -> None:
    if isinstance(sent, bool) or isinstance(back, bool):
        assert type(sent) is type(back) and sent == back, where
    elif isinstance(sent, (int, float)) and isinstance(back, (int, float)):
        assert sent == back, where
    elif isinstance(sent, list) and isinstance(back, list):
        assert len(sent) == len(back), where
        for i, (a, b) in enumerate(zip(sent, back)):
            same_json(a, b, f"{where}[{i}]")
    else:
        assert sent == back, where


# --- the examples through the decoder --------------------------------------------------------


def test_document_has_commands_with_the_documented_flags():
    assert PUBS and SUBS and REFUSED
    for command in COMMANDS:
        opts = command.options
        assert opts.get("-h") == "localhost" and opts.get("-p") == "1883", str(command)
        assert opts.get("-q") == "1", f"{command}: every topic of the protocol uses QoS 1"
    for command in PUBS:
        retained = command.kind in RETAINED
        assert bool(command.options.get("-r")) == retained, f"{command}: only {RETAINED} are retained"


@pytest.mark.parametrize("command", ACCEPTED, ids=str)
def test_accepted_example_decodes_and_re_encodes_to_the_same_json(command):
    message = decode(command.topic, command.payload)
    cls = CLASSES[command.kind]
    assert type(message) is cls
    sent = json.loads(command.payload)
    back = json.loads(wire.encode(message))
    assert sent.get("type") == command.kind, f"{command}: give the example its \"type\""
    for key, value in sent.items():
        assert key in back, f"{command}: the decoder ignores field {key!r} (misspelt?)"
        same_json(value, back[key], f"{command}: {key}")
    for info in msgspec.structs.fields(cls):
        if info.encode_name not in sent:
            default = info.default_factory() if info.default is msgspec.NODEFAULT else info.default
            assert back[info.encode_name] == msgspec.to_builtins(default), f"{command}: {info.name}"
    assert decode(command.topic, wire.encode(message)) == message


@pytest.mark.parametrize("command", REFUSED, ids=str)
def test_refused_example_is_refused_for_the_stated_reason(command):
    with pytest.raises(wire.WireError) as info:
        decode(command.topic, command.payload)
    assert info.value.reason == command.refused, f"{command}: {info.value}"


def test_every_kind_has_an_accepted_example():
    kinds = {c.kind for c in ACCEPTED}
    assert set(wire.UPLINK_KINDS) | set(wire.DOWNLINK_KINDS) | set(MODEL_CLASSES) <= kinds
    states = {json.loads(c.payload)["state"] for c in ACCEPTED if c.kind == "status"}
    assert states == {"online", "offline"}, "show both the birth and the last will"


def test_watch_examples_cover_uplink_and_confirmations():
    filters = [c.topic for c in SUBS]
    for probe in (wire.topic("press-01", "telemetry"), wire.confirm_topic("press-01")):
        assert any(mqtt.topic_matches_sub(f, probe) for f in filters), probe


# --- the prose against the code --------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CLASSES))
def test_field_table_lists_exactly_the_fields_of_the_kind(kind):
    header = set.intersection(*({f.encode_name for f in msgspec.structs.fields(CLASSES[k])}
                                for k in wire.UPLINK_KINDS))
    fields = {f.encode_name for f in msgspec.structs.fields(CLASSES[kind])}
    downlink = kind in wire.DOWNLINK_KINDS or kind in MODEL_CLASSES
    expected = fields | {"type"} if downlink else fields - header
    assert table_names(section(kind)) == expected
    assert table_names(section("Common header")) == header | {"type"}


def test_reason_table_lists_every_reason_decode_can_give():
    in_code = set(re.findall(r'WireError\(\s*"([a-z-]+)"', inspect.getsource(wire)))
    assert table_names(section("Refused messages")) == in_code
    assert {c.refused for c in REFUSED} <= in_code


def _patterns(type_info, found: set[str]) -> set[str]:
    """Every string pattern reachable from a msgspec.inspect type."""
    if isinstance(type_info, msgspec.inspect.StrType) and type_info.pattern:
        found.add(type_info.pattern)
    for child in ([f.type for f in getattr(type_info, "fields", ())]
                  + list(getattr(type_info, "types", ()))
                  + [getattr(type_info, a) for a in ("item_type", "cls") if hasattr(type_info, a)]):
        if isinstance(child, msgspec.inspect.Type):
            _patterns(child, found)
    return found


def test_limits_in_the_document_are_the_code_s():
    limits = section("Limits and identifiers")
    for cls in CLASSES.values():
        for pattern in _patterns(msgspec.inspect.type_info(cls), set()):
            assert f"`{pattern}`" in limits, f"pattern {pattern} is not in the limits table"
    assert f"{wire.MAX_PAYLOAD_BYTES} bytes" in limits
    reserved = re.search(r"Reserved names.*?\n\n", limits, re.S).group(0)
    assert set(re.findall(r"`(\w+)`", reserved)) == wire.RESERVED_NAMES
    accepted = "{" + ", ".join(map(str, sorted(wire.ACCEPTED_SCHEMA_VERSIONS))) + "}"
    assert f"`{accepted}`" in section("Schema versions")
    assert wire.uplink_filter("edgeloop") in DOC and wire.uplink_filter() in DOC


# --- the commands against a real broker ------------------------------------------------------


def _local(argv: tuple[str, ...], broker) -> list[str]:
    """``argv`` with the document's -h/-p pointed at the test broker."""
    out = list(argv)
    out[out.index("-h") + 1] = broker.host
    out[out.index("-p") + 1] = str(broker.port)
    return out


def _subscriber(broker, *filters: str) -> tuple[mqtt.Client, queue.Queue]:
    """A connected paho client whose subscriptions are acknowledged, and its message queue."""
    inbox: queue.Queue = queue.Queue()
    acked = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"doc-test-{uuid.uuid4().hex[:12]}")
    client.on_message = lambda _c, _u, msg: inbox.put(msg)
    client.on_subscribe = lambda _c, _u, mid, codes, _p: acked.put(codes)
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.subscribe([(f, 1) for f in filters])
    codes = acked.get(timeout=10)
    assert all(not code.is_failure for code in codes), codes
    return client, inbox


def _receive(inbox: queue.Queue, topic: str, payload: bytes, *, retained: bool) -> mqtt.MQTTMessage:
    """The first message with this topic, payload and retain flag (others, e.g. stale, skipped)."""
    deadline = time.monotonic() + 10
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = inbox.get(timeout=left)
        except queue.Empty:
            break
        if msg.topic == topic and msg.payload == payload and msg.retain == retained:
            return msg
    raise AssertionError(f"{topic} {payload[:80]!r} did not arrive within 10 s")


def _stop(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


@pytest.mark.mosquitto
def test_examples_run_against_mosquitto(mosquitto):
    status_topics = {c.topic for c in ACCEPTED if c.kind in RETAINED}
    client, inbox = _subscriber(mosquitto, wire.uplink_filter(), f"{wire.TOPIC_ROOT}/ctl/+/+",
                                f"{wire.TOPIC_ROOT}/models/#")
    try:
        for command in ACCEPTED:
            run = subprocess.run(_local(command.argv, mosquitto), timeout=15, capture_output=True, text=True)
            assert run.returncode == 0, f"{command}: {run.stderr}"
            msg = _receive(inbox, command.topic, command.payload, retained=False)
            assert msg.qos == 1
            assert decode(msg.topic, msg.payload) == decode(command.topic, command.payload)

        # The last status published is what a newcomer gets at once, flagged retained.
        last_status = [c for c in ACCEPTED if c.kind == "status"][-1]
        late, late_inbox = _subscriber(mosquitto, last_status.topic)
        try:
            assert _receive(late_inbox, last_status.topic, last_status.payload, retained=True).qos == 1
        finally:
            _stop(late)

        for sub in SUBS:
            samples = [c for c in ACCEPTED if mqtt.topic_matches_sub(sub.topic, c.topic)]
            proc = subprocess.Popen(_local(sub.argv, mosquitto) + ["-C", "1", "-W", "15"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                while proc.poll() is None:  # publish until the watcher, once subscribed, sees one
                    client.publish(samples[0].topic, samples[0].payload, qos=1)
                    time.sleep(0.2)
                out, err = proc.communicate(timeout=5)
            finally:
                proc.kill()
                proc.wait()
            assert proc.returncode == 0, err
            topic, _, payload = out.decode().rstrip("\n").partition(" ")
            assert (topic, payload.encode()) in {(c.topic, c.payload) for c in samples}
            decode(topic, payload.encode())
    finally:
        for topic in status_topics:  # leave no retained message behind in the shared broker
            client.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)
        _stop(client)


def test_flag_table_is_the_agent_s():
    from edge_agent import quality

    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*`([a-z_]+)`\s*\|", section("Data-quality flags"), re.M)
    documented = {name: int(value) for _, value, name in rows}
    assert all(int(value) == 1 << int(bit) for bit, value, _ in rows)
    device_flags = {name: bit for name, bit in quality.FLAGS.items() if bit < 256}
    assert documented == device_flags
