"""The outbox keeps every accepted message until confirmed, never reuses a sequence number,
re-sends on time-out, replays in order, and accounts for what its drop policy removes."""

import os
import subprocess
import sys
import textwrap

import pytest

from edge_agent.outbox import Outbox


def _payload(seq: int) -> bytes:
    return f"message {seq}".encode()


def test_sequence_numbers_survive_reopen(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    assert [ob.append("telemetry", _payload) for _ in range(3)] == [0, 1, 2]
    ob.close()
    ob = Outbox(tmp_path / "o.sqlite")
    assert ob.append("telemetry", _payload) == 3
    assert ob.depth == 4


def test_payload_is_built_with_its_own_sequence_number(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    ob.append("features", _payload)
    ob.append("inference", _payload)
    assert [(e.seq, e.kind, e.payload) for e in ob.due(10)] == [
        (0, "features", b"message 0"),
        (1, "inference", b"message 1"),
    ]


def test_entries_leave_only_when_confirmed(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", resend_after_s=5.0)
    for _ in range(6):
        ob.append("telemetry", _payload)
    for e in ob.due(10, now=100.0):
        ob.mark_sent(e.seq, now=100.0)
    assert ob.depth == 6  # sent (and PUBACKed, as far as the outbox cares) is not confirmed
    assert ob.due(10, now=101.0) == []  # nothing new, nothing timed out yet
    assert ob.confirm([(0, 1), (4, 4)]) == 3
    assert ob.depth == 3
    # The unconfirmed ones come back after the time-out, oldest first; confirmed ones never do.
    assert [e.seq for e in ob.due(10, now=106.0)] == [2, 3, 5]


def test_confirming_twice_or_unknown_ranges_is_harmless(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    ob.append("telemetry", _payload)
    assert ob.confirm([(0, 0)]) == 1
    assert ob.confirm([(0, 0), (5, 9)]) == 0
    assert ob.depth == 0 and ob.size_bytes == 0


def test_replay_resends_everything_unconfirmed_in_order(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    for _ in range(5):
        ob.append("telemetry", _payload)
    for e in ob.due(3):
        ob.mark_sent(e.seq)
    ob.confirm([(1, 1)])
    ob.replay()  # reconnected: the broker may have lost anything in flight
    assert [e.seq for e in ob.due(10)] == [0, 2, 3, 4]


def test_unconfirmed_window_bounds_what_is_sent(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", max_unconfirmed=3, resend_after_s=60)
    for _ in range(10):
        ob.append("telemetry", _payload)
    first = ob.due(10, now=0.0)
    assert [e.seq for e in first] == [0, 1, 2]
    for e in first:
        ob.mark_sent(e.seq, now=0.0)
    assert ob.due(10, now=1.0) == []  # the cloud has confirmed nothing: stop sending
    ob.confirm([(0, 1)])
    assert [e.seq for e in ob.due(10, now=1.0)] == [3, 4]


def test_size_cap_drops_telemetry_first_and_reports_ranges(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", max_bytes=64 * 1024)
    big = lambda seq: bytes(10_000)  # noqa: E731
    kinds = ["telemetry", "telemetry", "alert", "telemetry", "inference", "telemetry", "telemetry", "features"]
    for kind in kinds:
        ob.append(kind, big)
    assert ob.size_bytes <= 64 * 1024
    dropped = ob.dropped_ranges()
    assert dropped == [(0, 1)]  # the two oldest telemetry messages, as one range
    left = {e.seq: e.kind for e in ob.due(100)}
    assert left == {2: "alert", 3: "telemetry", 4: "inference", 5: "telemetry", 6: "telemetry", 7: "features"}
    assert ob.dropped_count() == 2


def test_age_limit_drops_old_entries(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", max_age_s=10)
    ob.append("telemetry", _payload, now=1000.0)
    ob.append("alert", _payload, now=1005.0)
    ob.append("telemetry", _payload, now=1020.0)
    assert [e.seq for e in ob.due(10)] == [2]
    assert ob.dropped_ranges() == [(0, 1)]


def test_kill_9_mid_append_never_reuses_a_sequence_number(tmp_path):
    """A writer killed with SIGKILL at an arbitrary point: every seq it reported as accepted is on
    disk with its own content, and the next process continues after the highest one."""
    path = tmp_path / "o.sqlite"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.getcwd()!r})
        from edge_agent.outbox import Outbox
        ob = Outbox({str(path)!r}, synchronous="FULL")
        while True:
            seq = ob.append("telemetry", lambda s: f"content {{s}}".encode())
            print(seq, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    reported = []
    for line in proc.stdout:
        reported.append(int(line))
        if len(reported) >= 200:
            proc.kill()
            break
    proc.wait()
    ob = Outbox(path)
    stored = {e.seq: e.payload for e in ob.due(100_000)}
    for seq in reported:
        assert stored[seq] == f"content {seq}".encode()
    assert sorted(stored) == list(range(len(stored)))  # no gaps
    assert ob.append("telemetry", _payload) == len(stored)


def test_unknown_kind_is_refused(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    with pytest.raises(ValueError, match="unknown outbox kind"):
        ob.append("status", _payload)


def test_agent_splits_a_telemetry_batch_to_fit_the_broker(tmp_path):
    """A broker with a small payload limit gets several messages, each under the limit, with every
    reading in exactly one of them."""
    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig, MqttSettings, SamplingSettings
    from edgeloop import wire

    accepted = []
    cfg = AgentConfig(device_id="split-1", data_dir=str(tmp_path), mqtt=MqttSettings(max_payload=4096),
                      sampling=SamplingSettings(rate_hz=100.0, batch_s=1.0))
    agent = Agent(cfg, on_accept=accepted.append)
    agent._open()
    try:
        for i in range(100):
            agent._batch.append(wire.Reading(1_700_000_000 + i / 100, [float(i), 1.5, 2.5, 3.5], 0))
        agent._flush_batch()
    finally:
        agent._close()
    assert len(accepted) > 1
    assert all(len(wire.encode(m)) <= 4096 for m in accepted)
    assert [r.values[0] for m in accepted for r in m.readings] == [float(i) for i in range(100)]
    assert [m.seq for m in accepted] == list(range(len(accepted)))


def test_repeated_resends_back_off(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", resend_after_s=10.0)
    ob.append("telemetry", _payload)
    resent_at = []
    now = 0.0
    ob.mark_sent(0, now=now)
    while now < 200:
        now += 1.0
        if ob.due(10, now=now):
            resent_at.append(now)
            ob.mark_sent(0, now=now)
    # 10 s, then 20, then every 40 s after each previous send: the cloud is down, do not hammer it.
    assert resent_at == [10.0, 30.0, 70.0, 110.0, 150.0, 190.0]
    ob.replay()  # reconnected: start again at once, then at the base interval
    assert [e.seq for e in ob.due(10, now=191.0)] == [0]
