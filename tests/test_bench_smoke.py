"""The model-push and agent benchmarks run at a tiny size, so their code cannot rot between bench runs.

Real parts as in the full runs (the session Mosquitto, an in-process aggregator, real agents:
in-process simulated devices for ``bench.ota_push``, ``edgeloop agent`` subprocesses for
``bench.agent``). Only the structure of the results and the work done are asserted (every device
swapped, sessions shared or not, inferences recorded), never a timing: speed is what the
benchmarks report.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.mosquitto


def test_ota_push_every_device_verifies_swaps_and_acknowledges_in_both_modes(mosquitto):
    from bench import ota_push

    res = ota_push.run(mosquitto.url, devices=4, chunk_size=4096, trees=5, timeout_s=90)
    assert res["devices"] == 4 and res["model_bytes"] > 4096
    for mode, sessions in (("shared", 1), ("per_device", 4)):
        r = res[mode]
        assert r["devices"] == 4
        assert r["chunks"] == -(-r["model_bytes"] // 4096) and r["chunks"] > 1
        assert r["acked"] == r["swapped"] == 4, r
        assert r["states"] == {"active": 4}, r["states"]
        assert r["verified_installs"] == 4  # each device's own receiver checked and installed it
        assert r["sessions_built"] == sessions
        assert r["chunks_sent"] >= r["chunks"] and r["chunks_rejected"] == 0
        assert r["all_acked_s"] is not None and r["all_acked_s"] >= r["all_swapped_s"] - 0.1
        assert r["rss_peak_mb"] > 0 and r["cpu_s"] >= 0
    text = ota_push.table(res)
    assert "all swapped and acknowledged" in text and "one shared session" in text
    assert "extrapolated" not in text  # both runs had every device


def test_agent_bench_measures_the_agent_and_its_baselines(mosquitto):
    from bench import agent as agent_bench

    res = agent_bench.run(mosquitto.url, seconds=3.0, warmup_s=1.0, trees=5)
    procs = res["processes"]
    assert set(procs) == {"models", "no-model", "import floor", "bare python"}
    for name, p in procs.items():
        assert p["cpu_pct"] >= 0 and p["threads"] >= 1, (name, p)
        assert 0 < p["uss_mb"] <= p["rss_mb"] <= p["rss_max_mb"], (name, p)
        assert 0 < p["pss_mb"] <= p["pss_max_mb"] <= p["rss_max_mb"] + 0.1, (name, p)
    # The agent with two models holds more than the bare interpreter and the import floor.
    assert procs["models"]["rss_mb"] > procs["import floor"]["rss_mb"] > procs["bare python"]["rss_mb"]
    for role in ("champion", "shadow"):  # the shadow arrived over the air and scored
        lat = res["latency"][role]
        assert lat["n"] >= 1 and 0 < lat["p50_us"] <= lat["p99_us"], (role, lat)
    names = [s[0] for s in res["imports"]["stages"]]
    assert names[0] == "python" and "onnxruntime" in names and "cryptography (Ed25519)" in names
    assert res["imports"]["heavy_modules"] == []  # no sklearn / skl2onnx on the device side
    text = agent_bench.table(res)
    assert "agent, champion + shadow" in text and "Targets (issue 3)" in text
