"""The fleet registry: sequence accounting (stored, dropped, lost, pending), presence, clock health,
persistence across restarts and loading files written before the accounting existed."""

from __future__ import annotations

import threading

import msgspec
import pytest

from aggregator.registry import DeviceRecord, Registry
from edgeloop import wire

T0 = 1_767_225_600.0
DEV = "press-01"


def telemetry(seq: int, ts: float, device: str = DEV) -> wire.Telemetry:
    return wire.Telemetry(v=1, device=device, seq=seq, ts=ts, profile="press", channels=["vib"],
                          readings=[wire.Reading(t=ts, values=[0.5])])


def status(state: str, seq: int, ts: float, dropped=(), device: str = DEV) -> wire.Status:
    return wire.Status(v=1, device=device, seq=seq, ts=ts, profile="press", state=state, agent_version="0.2.0",
                       model_version="iforest-7", outbox_depth=4, dropped=list(dropped), uptime_s=1.0)


def feed(reg: Registry, seqs, at: float, device: str = DEV) -> None:
    """Messages stored at ``at``, timestamped as made 0.1 s before by a correct clock."""
    for seq in seqs:
        reg.observe(telemetry(seq, at - 0.1, device), at)


# -- sequence accounting ------------------------------------------------------------------------


def test_sequential_stream_is_one_range_and_nothing_missing():
    reg = Registry(None)
    for seq in range(10_000):
        reg.observe(telemetry(seq, T0 + seq * 0.01), T0 + seq * 0.01 + 0.05)
    rec = reg.get(DEV, now=T0 + 1000)
    assert rec.stored == [(0, 9999)] and rec.exposed == [] and rec.max_seq == 9999
    acc = reg.gaps(DEV, now=T0 + 1000)
    assert (acc.stored, acc.dropped, acc.lost, acc.pending) == (10_000, 0, 0, 0)


def test_holes_filled_by_late_resends_are_not_lost():
    reg = Registry(None, lost_after_s=120)
    feed(reg, [0, 1, 2, 5, 6, 9], T0)  # 3, 4, 7, 8 still in flight
    acc = reg.gaps(DEV, now=T0 + 10)
    assert (acc.stored, acc.pending, acc.lost) == (6, 4, 0)
    assert acc.pending_ranges == [(3, 4), (7, 8)]
    feed(reg, [3, 4, 7, 8], T0 + 100)  # re-sent within the grace
    acc = reg.gaps(DEV, now=T0 + 1000)
    assert (acc.stored, acc.pending, acc.lost, acc.duplicates) == (10, 0, 0, 0)
    assert reg.get(DEV).stored == [(0, 9)]


def test_holes_past_the_grace_are_lost_and_a_later_fill_unlosts_them():
    reg = Registry(None, lost_after_s=120)
    feed(reg, [0, 1, 2, 5], T0)
    feed(reg, [6, 7, 12], T0 + 100)  # 8..11 exposed at T0+100
    acc = reg.gaps(DEV, now=T0 + 150)
    assert acc.lost_ranges == [(3, 4)] and acc.pending_ranges == [(8, 11)]
    assert (acc.stored, acc.lost, acc.pending) == (7, 2, 4)
    acc = reg.gaps(DEV, now=T0 + 221)
    assert acc.lost_ranges == [(3, 4), (8, 11)] and acc.pending == 0
    feed(reg, [3], T0 + 400)  # very late re-send: stored after all, no longer lost
    acc = reg.gaps(DEV, now=T0 + 400)
    assert acc.lost_ranges == [(4, 4), (8, 11)] and acc.stored == 8
    rec = reg.get(DEV, now=T0 + 400)
    assert (rec.seq_stored, rec.seq_lost, rec.seq_pending) == (8, 5, 0)


def test_reported_dropped_range_is_not_lost():
    reg = Registry(None, lost_after_s=10)
    feed(reg, [0, 1, 7, 8], T0)
    reg.observe(status("online", 9, T0, dropped=[(2, 4)]), T0 + 1)
    acc = reg.gaps(DEV, now=T0 + 100)
    assert (acc.stored, acc.dropped, acc.lost, acc.pending) == (4, 3, 2, 0)
    assert acc.lost_ranges == [(5, 6)]
    # A later status reports more drops (an outbox keeps them all; the registry unions anyway).
    reg.observe(status("online", 9, T0, dropped=[(5, 5)]), T0 + 2)
    acc = reg.gaps(DEV, now=T0 + 100)
    assert (acc.dropped, acc.lost, acc.lost_ranges) == (4, 1, [(6, 6)])
    assert acc.stored + acc.dropped + acc.lost + acc.pending == acc.max_seq + 1


def test_status_seq_announces_numbers_not_yet_stored():
    reg = Registry(None, lost_after_s=60)
    feed(reg, [0, 1], T0)
    reg.observe(status("online", 6, T0 + 1), T0 + 1)  # next is 6: 2..5 assigned, not stored
    assert reg.get(DEV).max_seq == 5
    assert reg.gaps(DEV, now=T0 + 30).pending_ranges == [(2, 5)]
    assert reg.gaps(DEV, now=T0 + 62).lost_ranges == [(2, 5)]
    # seq 0 in a status: nothing assigned yet, so it announces nothing.
    reg.observe(status("online", 0, T0, device="fresh-01"), T0)
    assert reg.gaps("fresh-01", now=T0 + 1000).max_seq == -1
    assert reg.gaps("fresh-01", now=T0 + 1000).lost == 0


def test_duplicates_are_counted_not_stored_twice():
    reg = Registry(None)
    feed(reg, [0, 1, 2, 1, 2, 0], T0)
    acc = reg.gaps(DEV, now=T0)
    assert (acc.stored, acc.duplicates) == (3, 3)


def test_fragmented_accounting_is_settled_and_stays_small():
    """Every other number (what one of two aggregators in a shared group sees) stays bounded."""
    reg = Registry(None, lost_after_s=10, max_ranges=64)
    for k in range(5000):
        reg.observe(telemetry(2 * k, T0 + k), T0 + k)  # one message a second
    rec = reg.get(DEV, now=T0 + 5000)
    assert len(rec.stored) <= 64 + 32 and len(rec.exposed) <= 12
    acc = reg.gaps(DEV, now=T0 + 5000)  # the last 10 s of holes are still within the grace
    assert acc.max_seq == 9998 and (acc.stored, acc.lost, acc.pending) == (5000, 4990, 9)
    acc = reg.gaps(DEV, now=T0 + 5010)
    assert (acc.stored, acc.lost, acc.pending) == (5000, 4999, 0)
    assert rec.seq_base > 0 and rec.settled_lost > 0


# -- persistence ----------------------------------------------------------------------------------


def test_restart_keeps_the_accounting(tmp_path):
    path = tmp_path / "registry.json"
    reg = Registry(path, lost_after_s=120)
    feed(reg, [0, 1, 2, 5, 6], T0)
    reg.observe(status("online", 10, T0 + 50, dropped=[(3, 3)]), T0 + 50)
    feed(reg, [1], T0 + 60)
    before = reg.gaps(DEV, now=T0 + 100)
    reg.save()

    again = Registry(path, lost_after_s=120)
    for now in (T0 + 100, T0 + 125, T0 + 500):
        assert again.gaps(DEV, now=now) == reg.gaps(DEV, now=now)
    assert before.pending_ranges == [(4, 4), (7, 9)] and before.dropped == 1 and before.duplicates == 1
    assert again.gaps(DEV, now=T0 + 125).lost_ranges == [(4, 4)]  # exposed at T0, 7..9 at T0+50
    feed(again, [4, 7, 8, 9], T0 + 130)  # late re-sends after the restart
    acc = again.gaps(DEV, now=T0 + 500)
    assert (acc.stored, acc.dropped, acc.lost, acc.pending) == (9, 1, 0, 0)
    rec = again.get(DEV)
    assert (rec.agent_version, rec.model_version, rec.outbox_depth) == ("0.2.0", "iforest-7", 4)


# Written by the registry before sequence accounting existed (commit 151b8c7), byte for byte.
OLD_FILE = (
    b'[{"device":"press-01","profile":"press","state":"online","first_seen":1767225590.5,'
    b'"last_seen":1767225644.2,"last_device_ts":1767225644.0,"max_seq":44,"messages":4,'
    b'"agent_version":"0.1.0","model_version":"iforest-7","outbox_depth":3,"dropped":[[5,7]],'
    b'"clock_skew_s":-0.20000004768371582},{"device":"pump-02","profile":"","state":"offline",'
    b'"first_seen":1767225601.0,"last_seen":1767225601.0,"last_device_ts":1767225600.0,"max_seq":0,'
    b'"messages":1,"agent_version":"0","model_version":null,"outbox_depth":0,"dropped":[],"clock_skew_s":-1.0}]'
)


def test_loads_a_file_written_before_the_accounting(tmp_path):
    path = tmp_path / "registry.json"
    path.write_bytes(OLD_FILE)
    reg = Registry(path, lost_after_s=120)
    rec = reg.get("press-01", now=1767225650.0)
    assert (rec.max_seq, rec.messages, rec.dropped, rec.model_version) == (44, 4, [(5, 7)], "iforest-7")
    assert rec.state == "online" and reg.get("pump-02", now=1767225650.0).state == "offline"
    # Numbers before the upgrade are unknown, so they are neither stored nor lost.
    acc = reg.gaps("press-01", now=1767229999.0)
    assert (acc.stored, acc.lost, acc.pending) == (0, 0, 0)
    feed(reg, [45, 46, 48], 1767225660.0)
    acc = reg.gaps("press-01", now=1767229999.0)
    assert (acc.stored, acc.lost_ranges) == (3, [(47, 47)])
    reg.save()
    assert Registry(path).gaps("press-01", now=1767229999.0) == acc


def test_unreadable_file_names_itself(tmp_path):
    path = tmp_path / "registry.json"
    path.write_bytes(b"{not json")
    with pytest.raises(ValueError, match="registry.json"):
        Registry(path)


def test_bad_parameters_are_refused_by_name():
    with pytest.raises(ValueError, match="lost_after_s"):
        Registry(None, lost_after_s=0)
    with pytest.raises(ValueError, match="max_ranges"):
        Registry(None, max_ranges=1)


# -- presence ----------------------------------------------------------------------------------


def test_offline_by_will_and_back_online_by_birth():
    reg = Registry(None, offline_after_s=90)
    reg.observe(status("online", 0, T0), T0)
    assert reg.state(DEV, now=T0 + 1) == "online"
    reg.observe(status("offline", 0, T0), T0 + 5)  # the will: connect-time ts, arrives later
    assert reg.state(DEV, now=T0 + 6) == "offline"
    assert reg.get(DEV, now=T0 + 6).state == "offline"
    reg.observe(status("online", 4, T0 + 30), T0 + 30)
    assert reg.state(DEV, now=T0 + 31) == "online"
    assert reg.state("nobody-01", now=T0) == "unknown"


def test_offline_by_timeout_and_online_again_by_a_new_message():
    reg = Registry(None, offline_after_s=90)
    feed(reg, [0, 1], T0)
    assert reg.state(DEV, now=T0 + 89) == "online"
    assert reg.state(DEV, now=T0 + 91) == "offline"
    assert [r.state for r in reg.devices(now=T0 + 91)] == ["offline"]
    feed(reg, [2], T0 + 200)
    assert reg.state(DEV, now=T0 + 201) == "online"


# -- clock health -------------------------------------------------------------------------------


def test_device_clock_ahead_is_flagged_at_once():
    reg = Registry(None, max_skew_s=300)
    reg.observe(telemetry(0, T0 - 0.2), T0)
    assert not reg.get(DEV).skew_flagged
    reg.observe(telemetry(1, T0 + 1000), T0 + 1)
    rec = reg.get(DEV)
    assert rec.skew_flagged and rec.skewed_messages == 1 and rec.clock_skew_s == pytest.approx(999)


def test_device_clock_behind_is_flagged_after_a_full_window():
    reg = Registry(None, max_skew_s=300, skew_window_s=60)
    for k in range(130):  # 1000 s behind, one message a second for 130 s
        reg.observe(telemetry(k, T0 + k - 1000), T0 + k)
        if k == 30:
            assert not reg.get(DEV).skew_flagged  # could still be a replayed backlog
    rec = reg.get(DEV)
    assert rec.skew_flagged and rec.skew_s == pytest.approx(-1000) and rec.skewed_messages >= 60


def test_replayed_backlog_after_an_outage_is_not_skew():
    reg = Registry(None, max_skew_s=300, skew_window_s=60)
    feed(reg, range(0, 10), T0)
    # An hour offline; then the outbox replays what it made meanwhile, old ts, and live messages follow.
    back = T0 + 3600
    for seq in range(10, 500):
        reg.observe(telemetry(seq, T0 + (seq - 10) * 7, DEV), back + seq * 0.001)
    for k in range(200):
        reg.observe(telemetry(500 + k, back + 1 + k - 0.05), back + 1 + k)
    rec = reg.get(DEV)
    assert not rec.skew_flagged and rec.skewed_messages == 0 and abs(rec.skew_s) < 1
    assert rec.clock_steps == 0


def test_clock_step_backwards_is_counted_late_resends_are_not():
    reg = Registry(None, step_s=5)
    feed(reg, range(0, 5), T0)
    reg.observe(telemetry(2, T0 - 30), T0 + 20)  # an old number (a re-send) earlier than the head: no step
    reg.observe(telemetry(5, T0 - 60), T0 + 21)  # NTP stepped the clock back a minute
    reg.observe(telemetry(6, T0 - 59), T0 + 22)
    reg.observe(telemetry(7, T0 - 62), T0 + 23)  # 3 s back: within step_s
    rec = reg.get(DEV)
    assert rec.clock_steps == 1 and rec.last_step_at == T0 + 21
    assert rec.last_step_s == pytest.approx(-59.9)


# -- concurrency --------------------------------------------------------------------------------


def test_readers_and_the_writer_run_concurrently():
    reg = Registry(None)
    stop = threading.Event()
    seen: list[int] = []

    def read():
        while not stop.is_set():
            for rec in reg.devices():
                msgspec.json.encode(rec)
                seen.append(rec.seq_stored)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for seq in range(20_000):
            reg.observe(telemetry(seq if seq % 50 else seq + 3, T0 + seq), T0 + seq)
    finally:
        stop.set()
        reader.join()
    assert seen and isinstance(reg.get(DEV), DeviceRecord)
    assert reg.gaps(DEV, now=T0 + 20_000).stored + reg.get(DEV).duplicates == 20_000
