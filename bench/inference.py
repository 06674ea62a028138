"""On-device scoring: the fused isolation-forest graph against skl2onnx's and scikit-learn itself.

For a 100-tree forest at 256 and at 1024 rows per tree (fitted on simulated ``basic-v1``
features), in one run: batch-1 latency p50/p99 on one thread with the agent's session options,
model bytes, session build time, parity with ``-decision_function`` on 10,000 rows, and the RSS
that loading one and two sessions (champion + shadow) adds, each measured in a fresh child
process so earlier allocations do not hide it. Then the whole agent's footprint: a child that
imports what the agent imports and loads two fused models, idle, read from
``/proc/self/smaps_rollup`` stage by stage, against the 64 MB target.

``python -m bench.inference [--quick]`` prints the tables; :func:`run` returns the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# numpy is imported inside the functions: the agent child's first RSS reading must be bare Python.

__all__ = ["run", "main", "AGENT_TARGET_MB", "LATENCY_TARGET_US"]

#: Issue-3 budget for the agent with two models loaded, and the issue-5 batch-1 target.
AGENT_TARGET_MB = 64.0
LATENCY_TARGET_US = 20.0
_TREES = 100
_PSI = (256, 1024)
_SEED = 0
_SCORERS = ("fused", "fused-v5", "stock")


def _smaps() -> dict[str, float]:
    """Rss and Pss of this process in MB (``/proc/self/smaps_rollup``)."""
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Anonymous"):
                out[key.lower()] = int(rest.split()[0]) / 1024
    return out


def _percentiles(samples_ns: list[int]) -> tuple[float, float]:
    import numpy as np

    us = np.asarray(samples_ns, dtype=np.float64) / 1000.0
    return float(np.percentile(us, 50)), float(np.percentile(us, 99))


def _time_calls(call, n: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - t0)
    return _percentiles(samples)


def _session(onnx_bytes: bytes):
    import onnxruntime as ort

    from edge_agent.inference import session_options

    return ort.InferenceSession(onnx_bytes, sess_options=session_options(), providers=["CPUExecutionProvider"])


def _case(X, names: list[str], psi: int, workdir: Path, quick: bool) -> dict:
    """Every figure for one forest size; model directories are left in ``workdir`` for the children.

    ``fused`` is what training ships (ai.onnx.ml 3, any onnxruntime >= 1.17); ``fused-v5`` the same
    forest as ai.onnx.ml 5 ``TreeEnsemble`` (smaller, needs a late-2024+ onnxruntime).
    """
    import msgspec
    import numpy as np

    from models.fused_iforest import to_fused_onnx
    from models.training import fit_isolation_forest, train_isolation_forest, write_model

    rng = np.random.default_rng(psi)
    lo, hi = X.min(axis=0), X.max(axis=0)
    rows = np.vstack([
        rng.uniform(lo, hi, size=(9000, X.shape[1])),
        rng.normal(loc=X.mean(axis=0), scale=10 * (hi - lo + 1), size=(1000, X.shape[1])),
    ]).astype(np.float32)
    reference = fit_isolation_forest(X, seed=_SEED, n_estimators=_TREES, max_samples=psi)
    want = -reference.decision_function(rows)
    row = np.ascontiguousarray(rows[:1])
    n_fast, n_slow, n_sk = (1000, 200, 50) if quick else (10_000, 2000, 300)

    result: dict = {"trees": _TREES, "max_samples": psi, "features": X.shape[1]}
    for converter in _SCORERS:
        t0 = time.perf_counter()
        if converter == "fused-v5":  # same forest and manifest as "fused", other node type
            onnx_bytes = to_fused_onnx(reference, X.shape[1], ml_opset=5).SerializeToString()
            manifest = msgspec.structs.replace(manifest, version=f"fused-v5-{psi}")
        else:
            onnx_bytes, manifest = train_isolation_forest(
                X, names, version=f"{converter}-{psi}", profile="machine", seed=_SEED,
                n_estimators=_TREES, max_samples=psi, converter=converter,
            )
        train_s = time.perf_counter() - t0
        for k in (1, 2):
            write_model(workdir / f"{converter}-{psi}-{k}", onnx_bytes, manifest)
        builds = []
        for _ in range(3 if quick else 5):
            t0 = time.perf_counter()
            sess = _session(onnx_bytes)
            builds.append((time.perf_counter() - t0) * 1000)
        got = sess.run(["score"], {"X": rows})[0].reshape(-1)
        p50, p99 = _time_calls(lambda: sess.run(["score"], {"X": row}),
                               n_slow if converter == "stock" else n_fast, warmup=100)
        result[converter] = {
            "bytes": len(onnx_bytes),
            "build_ms": float(np.median(builds)),
            "train_and_convert_s": train_s,  # fit + threshold + conversion ("fused-v5": conversion)
            "p50_us": p50,
            "p99_us": p99,
            "max_abs_diff": float(np.max(np.abs(got - want))),
        }
    p50, p99 = _time_calls(lambda: reference.decision_function(row), n_sk, warmup=10)
    result["sklearn"] = {"p50_us": p50, "p99_us": p99}
    for converter in _SCORERS:
        dirs = [str(workdir / f"{converter}-{psi}-{k}") for k in (1, 2)]
        result[converter].update(_child("sessions", dirs))
    return result


def _child(mode: str, dirs: list[str]) -> dict:
    """Run this module in a fresh interpreter and return the JSON it prints."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.inference", f"--{mode}-child", *dirs],
        capture_output=True, text=True, timeout=300, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"bench.inference child ({mode}) failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sessions_child(dirs: list[str]) -> dict:
    """RSS added by loading one model, then a second (champion + shadow), with the agent's loader."""
    import gc

    import onnxruntime  # noqa: F401  (imported before the baseline reading)

    from edge_agent.inference import Model

    gc.collect()
    base = _smaps()["rss"]
    models = [Model.load(dirs[0])]
    gc.collect()
    one = _smaps()["rss"]
    models.append(Model.load(dirs[1]))
    gc.collect()
    two = _smaps()["rss"]
    return {"rss_one_mb": one - base, "rss_two_mb": two - base, "load_ms": [m.load_ms for m in models]}


def _agent_child(dirs: list[str]) -> dict:
    """The agent's imports and two fused models, idle: Rss/Pss after each stage."""
    import gc

    stages = [("python", _smaps())]

    def mark(name: str) -> None:
        gc.collect()
        stages.append((name, _smaps()))

    import numpy as np

    mark("numpy")
    import onnxruntime  # noqa: F401

    mark("onnxruntime")
    import paho.mqtt.client  # noqa: F401

    mark("paho")
    import edge_agent.agent  # noqa: F401
    # What the agent imports lazily once it runs (sources, rules, quality, clock, features...).
    import edge_agent.clock, edge_agent.localstore, edge_agent.quality  # noqa: E401, F401
    import edge_agent.remote_config, edge_agent.rules, edge_agent.sources  # noqa: E401, F401
    import edgeloop.config, models.features  # noqa: E401, F401
    from edge_agent.inference import Model

    mark("edge_agent")
    champion = Model.load(dirs[0])
    mark("champion")
    shadow = Model.load(dirs[1])
    x = np.zeros(len(champion.feature_names), dtype=np.float32)
    for _ in range(100):
        champion.score(x)
        shadow.score(x)
    time.sleep(0.5)  # idle
    mark("shadow (idle)")
    try:  # what glibc keeps of the heap freed while parsing the models (not in the total)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        mark("after malloc_trim(0)")
    except OSError:
        pass
    heavy = sorted(m for m in ("sklearn", "skl2onnx", "onnx", "scipy", "pydantic") if m in sys.modules)
    return {"stages": [(n, s["rss"], s["pss"]) for n, s in stages], "heavy_modules": heavy}


def run(quick: bool = False) -> dict:
    """Measure everything; returns ``{"cases": [...per max_samples...], "agent": {...}}``."""
    from models.training import simulated_training_set

    X, names = simulated_training_set("machine", seed=_SEED, windows=2000 if quick else 4000, machines=4)
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-inference-") as tmp:
        workdir = Path(tmp)
        cases = [_case(X, names, psi, workdir, quick) for psi in _PSI]
        agent = _child("agent", [str(workdir / f"fused-{_PSI[-1]}-{k}") for k in (1, 2)])
    final = next(st for st in agent["stages"] if st[0] == "shadow (idle)")
    agent.update({
        "max_samples": _PSI[-1],
        "rss_mb": final[1],
        "pss_mb": final[2],
        "target_mb": AGENT_TARGET_MB,
        "within_target": final[2] <= AGENT_TARGET_MB,
    })
    return {"cases": cases, "agent": agent, "latency_target_us": LATENCY_TARGET_US}


def tables(res: dict) -> str:
    lines = ["| forest | scorer | p50 µs | p99 µs | model KB | session build ms | RSS +1 MB | RSS +2 MB | max abs diff |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in res["cases"]:
        forest = f"{c['trees']} trees, ψ={c['max_samples']}"
        for name in _SCORERS:
            r = c[name]
            lines.append(
                f"| {forest} | {name} ONNX | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {r['bytes'] / 1024:.0f} "
                f"| {r['build_ms']:.1f} | {r['rss_one_mb']:.1f} | {r['rss_two_mb']:.1f} | {r['max_abs_diff']:.1e} |"
            )
        s = c["sklearn"]
        lines.append(f"| {forest} | sklearn decision_function | {s['p50_us']:.1f} | {s['p99_us']:.1f} | | | | | |")
    a = res["agent"]
    lines += ["", f"Agent with two fused models (ψ={a['max_samples']}) loaded, idle:", "",
              "| stage | RSS MB | PSS MB |", "|---|---:|---:|"]
    lines += [f"| + {name} | {rss:.1f} | {pss:.1f} |" for name, rss, pss in a["stages"]]
    rss = max(r for _, r, _ in a["stages"])
    verdict = lambda x: "within" if x <= a["target_mb"] else "OVER"  # noqa: E731
    lines += ["", f"An idle agent's imports and models in one interpreter (the running agent is measured "
              f"under \"Agent CPU and memory\"): PSS {a['pss_mb']:.1f} MB, {verdict(a['pss_mb'])} the "
              f"{a['target_mb']:.0f} MB target; RSS {rss:.1f} MB, {verdict(rss)} it; "
              f"heavy modules loaded: {', '.join(a['heavy_modules']) or 'none'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations and rows")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--sessions-child", nargs=2, metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--agent-child", nargs=2, metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sessions_child:
        print(json.dumps(_sessions_child(args.sessions_child)))
        return 0
    if args.agent_child:
        print(json.dumps(_agent_child(args.agent_child)))
        return 0
    res = run(quick=args.quick)
    print(json.dumps(res, indent=2) if args.json else tables(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
