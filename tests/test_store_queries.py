"""Store queries, the clock-step guarantee and InfluxDB retention, on SQLite and InfluxDB 1.6.7.

The query cases compare both stores against answers computed here from the messages written;
the injection case sends hostile strings through every parameter. The clock-step case writes a
device whose clock steps back onto its own stored timestamps and checks that every
(device, seq, idx) is stored once with its own values, also after re-sends and a re-open.
"""

from __future__ import annotations

import math
import random

import pytest

from aggregator.stores import FLAG_TIME_ADJUSTED, InfluxStore, Retention
from aggregator.stores.timeguard import TimeGuard
from edgeloop.wire import Alert, Reading, Telemetry
from tests.test_store_contract import (  # noqa: F401  (fixtures)
    KINDS,
    backend,
    expected_rows,
    inference,
    store,
    stored_rows,
    telemetry,
)

T0 = 1_700_000_000.0


def values_of(messages, field, profile=None, device=None, start=-math.inf, end=math.inf):
    return [
        (r.t, v)
        for m in messages
        if isinstance(m, Telemetry)
        and (profile is None or m.profile == profile)
        and (device is None or m.device == device)
        for r in m.readings
        if start <= r.t < end
        for c, v in zip(m.channels, r.values)
        if c == field and v is not None
    ]


def fleet(rng=None):
    """Two profiles, three devices, two channel orders, some None values."""
    rng = rng or random.Random(7)
    out = []
    for d, (device, profile, channels) in enumerate(
        [("p-1", "pump", ("temp", "vib")), ("p-2", "pump", ("vib", "temp", "amps")),
         ("f-1", "fan", ("temp",))]
    ):
        for seq in range(4):
            readings = [
                Reading(
                    T0 + seq * 10 + k * 0.5,
                    [None if (k + j) % 7 == 0 else round(rng.gauss(50, 10), 3)
                     for j in range(len(channels))],
                )
                for k in range(20)
            ]
            out.append(Telemetry(v=1, device=device, seq=seq, ts=T0, profile=profile,
                                 channels=list(channels), readings=readings))
    return out


@pytest.mark.parametrize("agg", ["mean", "min", "max"])
def test_series_downsamples_per_interval(store, agg):
    msgs = fleet()
    assert store.write(msgs).rejected == []
    start, end, every = T0 + 3, T0 + 33, 4.0
    buckets: dict[float, list[float]] = {}
    for t, v in values_of(msgs, "temp", device="p-2", start=start, end=end):
        buckets.setdefault(math.floor(t / every) * every, []).append(v)
    fn = {"mean": lambda xs: sum(xs) / len(xs), "min": min, "max": max}[agg]
    expected = [(b, fn(xs)) for b, xs in sorted(buckets.items())]
    got = store.series("p-2", "temp", start, end, every_s=every, agg=agg)
    assert [t for t, _ in got] == [t for t, _ in expected]  # empty intervals left out
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-12)
    assert store.series("p-2", "nothing", start, end, every) == []
    assert store.series("nobody", "temp", start, end, every) == []


def test_latest_is_the_newest_reading_by_device_time(store):
    msgs = fleet()
    store.write(msgs)
    newest = msgs[7].readings[-1]  # p-2, seq 3, idx 19
    assert store.latest("p-2") == {
        "time": newest.t,
        "seq": 3,
        "idx": 19,
        "flags": 0,
        "values": {c: v for c, v in zip(msgs[7].channels, newest.values) if v is not None},
    }
    assert store.latest("nobody") == {}


def test_fleet_aggregates_per_profile(store):
    msgs = fleet() + [telemetry("lone", 1, T0, n=5, channels=("temp",))]  # profile "pump" too
    msgs[-1].profile = ""
    store.write(msgs)
    for profile, start, end in (("pump", None, None), ("fan", T0 + 5, T0 + 25),
                                ("pump", T0, T0 + 1), ("", None, None)):
        vals = [v for _, v in values_of(msgs, "temp", profile, None, start or -math.inf,
                                        end or math.inf)]
        got = store.fleet_aggregates(profile, "temp", start, end)
        assert got["count"] == len(vals) and (got["min"], got["max"]) == (min(vals), max(vals))
        assert got["mean"] == pytest.approx(sum(vals) / len(vals), rel=1e-12)
    assert store.fleet_aggregates("nobody", "temp") == {
        "mean": None, "min": None, "max": None, "count": 0}
    assert store.fleet_aggregates("pump", "nothing")["count"] == 0


def test_anomaly_and_alert_counts_per_device(store):
    def alert(device, seq, t, severity):
        return Alert(v=1, device=device, seq=seq, ts=t, rule="hot", severity=severity,
                     value=1.0, window_end=t)

    store.write([
        inference("a", 1, T0, True), inference("a", 2, T0 + 1, True),
        inference("a", 3, T0 + 2, False), inference("a", 4, T0 + 3, True, role="shadow"),
        inference("b", 1, T0 + 5, True), inference("c", 1, T0, False),
        alert("a", 10, T0, "warning"), alert("a", 11, T0 + 1, "warning"),
        alert("a", 12, T0 + 2, "critical"), alert("b", 10, T0 + 5, "info"),
    ])
    assert store.anomaly_counts() == {"a": 2, "b": 1}
    assert store.anomaly_counts(T0 + 1, T0 + 10) == {"a": 1, "b": 1}
    assert store.anomaly_counts(start=T0 + 2) == {"b": 1}
    assert store.alert_counts() == {"a": {"warning": 2, "critical": 1}, "b": {"info": 1}}
    assert store.alert_counts(end=T0 + 1) == {"a": {"warning": 1}}


HOSTILE = [
    'x" OR 1=1 --', "temp\" FROM telemetry; DROP DATABASE x", "'; DROP MEASUREMENT telemetry",
    "a b", "$device", "/.*/", "tëmp", "x\n", None, ["temp"],
]
EXTRA = {
    "field": ["seq", "time", "", "1temp"], "device": ["", "-p"], "agg": ["sum", "MEAN", ""],
    "profile": ["pump%", "p" * 33],
}


def test_every_parameter_refuses_or_ignores_injection(backend, store):
    store.write(fleet())
    before = {kind: store.count(kind) for kind in KINDS}
    good = {"device": "p-1", "field": "temp", "start": T0, "end": T0 + 60, "every_s": 5.0,
            "agg": "mean"}
    calls = [
        ("series", good),
        ("latest", {"device": "p-1"}),
        ("fleet_aggregates", {"profile": "pump", "field": "temp", "start": T0, "end": T0 + 60}),
        ("anomaly_counts", {"start": T0, "end": T0 + 60}),
        ("alert_counts", {"start": T0, "end": T0 + 60}),
    ]
    numeric = {"start", "end", "every_s"}
    for method, args in calls:
        for param in args:
            bad = HOSTILE + (["1e9", float("nan"), float("inf"), -1.0, True] if param in numeric
                             else EXTRA[param] + [1.5])
            for value in bad:
                if param in ("start", "end") and value is None and method != "series":
                    continue  # None is an open end there
                with pytest.raises(ValueError, match=param if param != "every_s" else "every_s"):
                    getattr(store, method)(**{**args, param: value})
    # values that pass the patterns but name nothing are inert: they only match no data
    assert store.series("p-1", "DROP", T0, T0 + 60, 5.0) == []
    assert store.latest("p-1.OR.1") == {} and store.fleet_aggregates("x_OR_1", "temp")["count"] == 0
    with pytest.raises(ValueError, match="start"):
        store.series("p-1", "temp", T0 + 60, T0, 5.0)  # end before start
    with pytest.raises(ValueError, match="every_s"):
        store.series("p-1", "temp", T0, T0 + 10**6, 1e-6)  # too many intervals
    assert {kind: store.count(kind) for kind in KINDS} == before
    assert len(store.series("p-1", "temp", T0, T0 + 60, 5.0)) > 0  # and the data is still there


# -- clock steps ----------------------------------------------------------------------------------


def step_back_messages(device="clk-1", profile="press"):
    """seq 1-3 at T0.., then the clock steps back: seq 4 and 5 reuse seq 2's and 3's exact times
    (seq 5 also repeats a time inside itself)."""
    def msg(seq, times, base):
        return Telemetry(v=1, device=device, seq=seq, ts=times[0], profile=profile,
                         channels=["temp", "vib"],
                         readings=[Reading(t, [base + k, -base - k], 0) for k, t in enumerate(times)])

    first = [msg(s, [T0 + s + k * 0.1 for k in range(10)], 100.0 * s) for s in (1, 2, 3)]
    stepped = [
        msg(4, [T0 + 2 + k * 0.1 for k in range(10)], 400.0),
        msg(5, [T0 + 3 + k * 0.1 for k in range(10)] + [T0 + 3.9], 500.0),
    ]
    return first, stepped


@pytest.mark.parametrize("profile", ["press", ""])
def test_a_clock_step_back_never_replaces_stored_readings(backend, store, profile):
    first, stepped = step_back_messages(profile=profile)
    assert store.write(first).rejected == []
    assert store.write(stepped[:1]).rejected == []  # lands on stored times
    assert store.write(stepped[1:] + first[2:]).rejected == []  # on stored + a repeat, one batch
    everything = first + stepped
    expected = {k: (v[1], v[2] & ~FLAG_TIME_ADJUSTED) for k, v in expected_rows(everything).items()}
    got = stored_rows(store, "clk-1")
    assert {k: (v[1], v[2] & ~FLAG_TIME_ADJUSTED) for k, v in got.items()} == expected
    assert store.count("telemetry", "clk-1") == 51
    # reading times read back as the device sent them (the nanosecond shift is below a µs)
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in expected_rows(everything).items()}
    if isinstance(store, InfluxStore):  # moved: the readings of seq 4 and 5 that found a time taken
        moved = {k for k, v in got.items() if v[2] & FLAG_TIME_ADJUSTED}
        assert moved == {("clk-1", 4, i) for i in range(10)} | {
            ("clk-1", 5, i) for i in range(11)}
    # re-sends, in this store object and in a fresh one (the guard seeds itself from the store)
    assert store.write(everything[::-1]).rejected == []
    with backend.make() as again:
        assert again.write(everything).rejected == []
        assert stored_rows(again, "clk-1") == got
    assert stored_rows(store, "clk-1") == got and store.count("telemetry") == 51


def test_concurrent_writes_with_clock_steps_lose_and_replace_nothing(backend, store):
    """The ingest keeps several writes in flight. Monotonic batches write at once; a batch that
    needs the guard to look at the store (a clock stepped back, a repeat) waits for them and
    writes alone, so it never takes a time another batch is writing."""
    from concurrent.futures import ThreadPoolExecutor

    devices = [f"cc-{k}" for k in range(4)]
    batches = []
    for d in devices:
        first, stepped = step_back_messages(device=d)
        batches += [first[:1], first[1:2], first[2:], stepped[:1], stepped[1:], first[1:2]]
    with ThreadPoolExecutor(4) as pool:  # as many writers as the ingest's writes in flight
        outcomes = list(pool.map(store.write, batches))
    assert all(o.rejected == [] for o in outcomes)
    for d in devices:
        first, stepped = step_back_messages(device=d)
        expected = {k: (v[1], v[2] & ~FLAG_TIME_ADJUSTED) for k, v in expected_rows(first + stepped).items()}
        got = stored_rows(store, d)
        assert {k: (v[1], v[2] & ~FLAG_TIME_ADJUSTED) for k, v in got.items()} == expected, d
        assert store.count("telemetry", d) == 51


def test_a_plan_without_lookups_takes_only_the_monotonic_path():
    guard = TimeGuard(lambda *args: pytest.fail("no lookup may happen"))
    msgs = [telemetry("d", seq, T0 + seq, n=5) for seq in range(4)]
    plan = guard.plan(msgs[:2], allow_lookup=False)
    assert plan is not None and plan.checked == 0 and plan.times_us[0] and plan.adjusted == {}
    newest = guard.newest("d", msgs[0].profile)
    assert guard.plan(msgs[:1], allow_lookup=False) is None  # a repeat would need a lookup
    assert guard.plan(msgs[2:] + msgs[:1], allow_lookup=False) is None  # nothing of it remembered
    assert guard.newest("d", msgs[0].profile) == newest
    assert guard.plan(msgs[2:], allow_lookup=False) is not None


def test_the_normal_path_looks_nothing_up():
    looked_up = []
    guard = TimeGuard(lambda *args: looked_up.append(args) or [])
    msgs = [telemetry("d", seq, T0 + seq, n=50) for seq in range(20)]
    plan = guard.plan(msgs[:10])
    plan2 = guard.plan(msgs[10:])
    assert plan.checked == plan2.checked == 0 and looked_up == [] and plan.adjusted == {}
    assert guard.plan(msgs[:1]).checked == 1 and len(looked_up) == 1  # a repeat is checked
    same_time = telemetry("d", 99, T0 + 100, n=2)
    same_time.readings[1].t = same_time.readings[0].t
    plan = guard.plan([same_time])
    assert plan.adjusted == {0: {1: round((T0 + 100) * 1e6) * 1000 + 1}}


# -- retention and downsampling (InfluxDB 1.x) --------------------------------------------------


def _rows(server, database, influxql):
    result = server.query(database, influxql)["results"][0]
    assert "error" not in result, result
    return [row for s in result.get("series", []) for row in s.get("values") or []]


@pytest.mark.influxdb
def test_open_sets_up_retention_and_the_downsampling_query_idempotently(influxdb):
    database = influxdb.new_database("rp")
    try:
        with InfluxStore(influxdb.url, database):
            pass
        policies = {r[0]: (r[1], r[4]) for r in _rows(influxdb, database,
                                                       "SHOW RETENTION POLICIES")}
        assert policies["raw"] == ("720h0m0s", True) and policies["long_term"] == ("8760h0m0s", False)
        queries = {r[0]: r[1] for s in influxdb.query(None, "SHOW CONTINUOUS QUERIES")["results"][0]
                   ["series"] if s["name"] == database for r in s.get("values") or []}
        assert "RESAMPLE EVERY 1m FOR 2m" in queries["telemetry_1m"]
        assert f"INTO {database}.long_term.telemetry_1m FROM {database}.raw.telemetry" in (
            queries["telemetry_1m"])
        with InfluxStore(influxdb.url, database):  # again: nothing to do, no error
            pass
        keep = Retention(raw_duration="INF", long_duration="INF")
        with InfluxStore(influxdb.url, database, retention=keep) as store:  # altered, not refused
            policies = {r[0]: r[1] for r in _rows(influxdb, database, "SHOW RETENTION POLICIES")}
            assert policies["raw"] == policies["long_term"] == "0s"
            msgs = fleet()
            assert store.write(msgs).rejected == []
            # the continuous query's SELECT, run over past device times
            assert store.downsample(T0, T0 + 120) > 0
            rows = influxdb.query(database, 'SELECT "mean_temp", "min_temp", "max_temp" FROM '
                                  '"long_term"."telemetry_1m" WHERE "device" = \'p-2\'')
            (series,) = rows["results"][0]["series"]
            (t, mean, lo, hi), = series["values"]
            vals = [v for _, v in values_of(msgs, "temp", device="p-2")]
            assert (lo, hi) == (min(vals), max(vals))
            assert mean == pytest.approx(sum(vals) / len(vals), rel=1e-12)
        with pytest.raises(ValueError, match="raw_duration"):
            Retention(raw_duration="30 days")
    finally:
        influxdb.query(None, f'DROP DATABASE "{database}"')
