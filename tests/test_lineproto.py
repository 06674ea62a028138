"""Line-protocol encoding: exact layout, escaping, exact float round trip, per-message refusal.

A small reference parser below reads the encoder's output back following the line-protocol
rules (escaped commas, equals signs and spaces in identifiers; quoted strings with ``\\"`` and
``\\\\``; ``i`` integers; newlines allowed inside quoted strings), so the round-trip properties
do not trust the encoder's own view of the format. tests/test_store_contract.py repeats the
hostile-string round trip through a real InfluxDB 1.6.7.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.stores.lineproto import encode_batch, encode_message
from edgeloop.wire import Alert, Features, Inference, Reading, Status, Telemetry

_ESCAPABLE = ",= "


def parse(text: str) -> list[tuple[str, dict, dict, int]]:
    """Points in ``text``: (measurement, tags, fields, timestamp)."""
    points, i, n = [], 0, len(text)

    def ident(i: int, stops: str) -> tuple[str, int]:
        out = []
        while i < n and text[i] not in stops:
            if text[i] == "\\" and i + 1 < n and text[i + 1] in _ESCAPABLE:
                i += 1
            out.append(text[i])
            i += 1
        return "".join(out), i

    while i < n:
        measurement, i = ident(i, ", ")
        tags, fields = {}, {}
        while text[i] == ",":
            key, i = ident(i + 1, "=")
            tags[key], i = ident(i + 1, ", ")
        i += 1  # the space before the fields
        while True:
            key, i = ident(i, "=")
            i += 1
            if text[i] == '"':
                out, i = [], i + 1
                while text[i] != '"':
                    if text[i] == "\\" and text[i + 1] in '"\\':
                        i += 1
                    out.append(text[i])
                    i += 1
                fields[key], i = "".join(out), i + 1
            else:
                j = i
                while text[j] not in ", ":
                    j += 1
                raw, i = text[i:j], j
                if raw in ("true", "false"):
                    fields[key] = raw == "true"
                else:
                    fields[key] = int(raw[:-1]) if raw.endswith("i") else float(raw)
            if text[i] != ",":
                break
            i += 1
        end = text.index("\n", i)
        points.append((measurement, tags, fields, int(text[i + 1 : end])))
        i = end + 1
    return points


def telemetry(values_rows, channels=("a", "b"), profile="", device="d1", seq=7, t0=1000.0):
    readings = [Reading(t0 + k * 0.01, list(vals), k % 3) for k, vals in enumerate(values_rows)]
    return Telemetry(
        v=1,
        device=device,
        seq=seq,
        ts=t0,
        profile=profile,
        channels=list(channels),
        readings=readings,
    )


def test_telemetry_lines_are_exactly_the_schema():
    chunk, n = encode_message(telemetry([[1.5, -2.0], [None, 3.25]], profile="pump"))
    assert n == 2
    assert chunk == (
        b"telemetry,device=d1,profile=pump seq=7i,idx=0i,flags=0i,a=1.5,b=-2.0 1000000000000\n"
        b"telemetry,device=d1,profile=pump seq=7i,idx=1i,flags=1i,b=3.25 1000010000000\n"
    )


def test_profile_tag_omitted_when_empty_and_all_none_reading_keeps_its_identity():
    (point,) = parse(encode_message(telemetry([[None, None]]))[0].decode())
    assert point == ("telemetry", {"device": "d1"}, {"seq": 7, "idx": 0, "flags": 0}, 10**12)


def test_repeat_encodes_byte_identical():
    m = telemetry([[0.1, 0.2], [1e300, -5e-324]])
    assert encode_message(m) == encode_message(m)


finite = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.one_of(finite, st.none()), min_size=3, max_size=3), min_size=1, max_size=20
    ),
    t0=st.floats(min_value=0, max_value=4.1e9),
)
def test_telemetry_values_and_times_round_trip_exactly(rows, t0):
    m = telemetry(rows, channels=("x", "y", "z"), t0=t0)
    points = parse(encode_message(m)[0].decode())
    assert len(points) == len(rows)
    for k, (measurement, tags, fields, ts) in enumerate(points):
        assert measurement == "telemetry" and tags == {"device": "d1"}
        assert ts == round(m.readings[k].t * 1e6) * 1000  # µs, written in ns
        assert (fields.pop("seq"), fields.pop("idx"), fields.pop("flags")) == (7, k, k % 3)
        expected = {c: v for c, v in zip("xyz", rows[k]) if v is not None}
        assert fields == expected  # float equality: exact, not approximate


def test_other_kinds_follow_the_schema():
    msgs = [
        Features(
            v=1,
            device="d1",
            seq=1,
            ts=5.0,
            profile="p",
            feature_set="fs1",
            window_start=4.0,
            window_end=5.0,
            names=["mean_a", "std_a"],
            values=[0.5, 2.0],
            flags=4,
        ),
        Inference(
            v=1,
            device="d1",
            seq=2,
            ts=5.0,
            model_version="m-1.2",
            feature_set="fs1",
            window_end=5.0,
            score=-0.25,
            anomaly=True,
            latency_us=12.5,
            role="shadow",
        ),
        Alert(
            v=1,
            device="d1",
            seq=3,
            ts=5.0,
            rule="too_hot",
            severity="critical",
            value=99.5,
            window_end=5.0,
            message="hot",
        ),
        Status(
            v=1,
            device="d1",
            seq=4,
            ts=6.0,
            state="online",
            agent_version="0.1.0",
            model_version="m-1.2",
            outbox_depth=3,
            uptime_s=12.0,
        ),
        Status(v=1, device="d1", seq=5, ts=7.0, state="offline"),
    ]
    batch = encode_batch(msgs)
    assert batch.rejected == [] and batch.line_counts == [1, 1, 1, 1, 1]
    assert parse(batch.body().decode()) == [
        (
            "features",
            {"device": "d1", "profile": "p", "feature_set": "fs1"},
            {"seq": 1, "flags": 4, "mean_a": 0.5, "std_a": 2.0},
            5_000_000_000,
        ),
        (
            "inference",
            {"device": "d1", "model_version": "m-1.2", "role": "shadow"},
            {"score": -0.25, "anomaly": True, "latency_us": 12.5, "seq": 2},
            5_000_000_000,
        ),
        (
            "alerts",
            {"device": "d1", "rule": "too_hot", "severity": "critical"},
            {"value": 99.5, "message": "hot", "seq": 3},
            5_000_000_000,
        ),
        (
            "agent_health",
            {"device": "d1"},
            {
                "state": "online",
                "outbox_depth": 3,
                "uptime_s": 12.0,
                "seq": 4,
                "agent_version": "0.1.0",
                "model_version": "m-1.2",
            },
            6_000_000_000,
        ),
        (
            "agent_health",
            {"device": "d1"},
            {
                "state": "offline",
                "outbox_depth": 0,
                "uptime_s": 0.0,
                "seq": 5,
                "agent_version": "0",
            },
            7_000_000_000,
        ),
    ]


def alert(message: str, seq: int = 1, **kw) -> Alert:
    fields = dict(
        v=1,
        device="d1",
        seq=seq,
        ts=5.0,
        rule="r",
        severity="info",
        value=1.0,
        window_end=5.0,
        message=message,
    )
    return Alert(**{**fields, **kw})


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=200)
    | st.sampled_from(
        [
            '"',
            "\\",
            '\\"',
            'x" injected=1i',
            "a\nb c=d,e",
            '\\\n"',
            "end\\",
            'x",seq=99i 0\nalerts a=1',
        ]
    )
)
def test_hostile_alert_message_is_one_string_field(message):
    (point,) = parse(encode_message(alert(message))[0].decode())
    assert point[1] == {"device": "d1", "rule": "r", "severity": "info"}
    assert point[2] == {"value": 1.0, "message": message, "seq": 1}


def test_identifiers_are_escaped():
    # The wire patterns forbid these characters; the encoder must still keep them in place.
    m = telemetry([[1.0, 2.0]], channels=("a b", "c,d=e"), device="dev 1,x=y", profile="")
    (point,) = parse(encode_message(m)[0].decode())
    assert point[1] == {"device": "dev 1,x=y"}
    assert point[2]["a b"] == 1.0 and point[2]["c,d=e"] == 2.0
    m = telemetry([[1.0, 2.0]], channels=("pct%d", "pct%s"))  # the fast path %-formats
    assert parse(encode_message(m)[0].decode())[0][2]["pct%d"] == 1.0


def test_unrepresentable_messages_are_refused_by_index_and_the_rest_encoded():
    good = telemetry([[1.0, 2.0]])
    msgs = [
        good,
        telemetry([[1.0, 2.0]], device="bad\\"),  # a trailing backslash would escape the comma
        telemetry([[1.0, 2.0]], channels=("a", "b\nc")),
        telemetry([[float("nan"), 2.0]]),  # fast path: msgspec writes null, exact check follows
        telemetry([[None, float("inf")]]),  # slow path
        Features(
            v=1,
            device="d1",
            seq=1,
            ts=5.0,
            feature_set="f",
            window_start=4.0,
            window_end=5.0,
            names=["m"],
            values=[-math.inf],
        ),
        alert("lone surrogate \ud800"),
        good,
    ]
    batch = encode_batch(msgs)
    assert [i for i, _ in batch.rejected] == [1, 2, 3, 4, 5, 6]
    assert all(reason.startswith("unencodable: ") for _, reason in batch.rejected)
    assert "non-finite" in dict(batch.rejected)[3]
    assert batch.indices() == [0, 7]
    assert batch.body() == batch.chunks[0] * 2
    assert batch.body([7]) == batch.chunks[7] and batch.line_counts[1] == 0


def test_adjusted_readings_take_their_nanosecond_time_and_the_flag():
    """The time guard's rewrite: only the named readings move, in ns, with FLAG_TIME_ADJUSTED."""
    from aggregator.stores.base import FLAG_TIME_ADJUSTED

    for rows in ([[1.5, -2.0], [0.5, 3.25], [1.0, 2.0]], [[1.5, None], [None, 3.25], [1.0, 2.0]]):
        m = telemetry(rows)
        plain = parse(encode_message(m)[0].decode())
        moved = parse(encode_message(m, adjusted={1: 1_000_010_000_007})[0].decode())
        assert [p[3] for p in moved] == [1_000_000_000_000, 1_000_010_000_007, 1_000_020_000_000]
        assert moved[1][2]["flags"] == plain[1][2]["flags"] | FLAG_TIME_ADJUSTED
        assert [p for k, p in enumerate(moved) if k != 1] == [
            p for k, p in enumerate(plain) if k != 1
        ]
        given_times = encode_message(m, times_us=[round(r.t * 1e6) for r in m.readings])
        assert given_times == encode_message(m)
