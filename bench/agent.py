"""One real agent process: CPU, RSS/PSS and inference latency at 8 channels x 10 Hz (issue 3's targets).

``edgeloop agent --config FILE`` runs as a subprocess exactly as on a device: a composite source
of two simulated devices (machine + cold chain: 8 channels) at 10 Hz, a SQLite outbox with
``synchronous=FULL`` (a real device's default), the champion from ``model_dir`` and a shadow
challenger pushed over the air (signed, checked and installed by the agent itself), publishing
through real Mosquitto to an in-process aggregator (SQLite store) that confirms delivery, so the
outbox does its full work. In the same run, as baselines: the same agent with no model (never
given one), a process that only imports paho, numpy and onnxruntime (the import floor), and a
bare Python. Windows are 1 s (five times the example config's inference work), so that a minute
gives enough inferences for a p99 and the CPU figure errs high.

After a warm-up, over ``seconds``: CPU as a percentage of one core from ``/proc/<pid>/stat``
(utime + stime), RSS and PSS from ``/proc/<pid>/smaps_rollup`` sampled every second (the mean of
the samples and the largest), the thread count, and the inference latency p50/p99 per role from
the agent's own inference messages (``latency_us``) as stored by the aggregator. To say what
dominates, a fresh interpreter imports the agent's dependencies one by one and reports RSS/PSS
after each (numpy, onnxruntime, paho, msgspec, cryptography's Ed25519, the agent's modules), and
the running agents' ``/proc/<pid>/smaps`` is summed by mapping (each library, heap, anonymous).
The agents run with :data:`DEVICE_ENV` (what the systemd unit sets) unless ``--env`` says otherwise.

Run alone: ``.venv/bin/python -m bench.agent --seconds 60`` (starts its own Mosquitto).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.proc import cpu_s

__all__ = ["run", "table", "import_stages", "CPU_TARGET_PCT", "MEMORY_TARGET_MB"]

ROOT = Path(__file__).resolve().parent.parent
#: Issue 3: at 8 channels x 10 Hz, with champion and shadow loaded.
CPU_TARGET_PCT = 2.0
MEMORY_TARGET_MB = 64.0
#: The environment a device's agent runs with (the systemd unit's ``Environment=``), given to the
#: two agents unless ``--env`` replaces it: verify model signatures in a child process, so the agent
#: never maps cryptography (see :func:`models.signing._ed25519_verifies`), and Python's ``-OO``
#: (no docstrings or asserts in memory; the optimised byte code is compiled first, as the unit's
#: install step does, so the measured agent does not compile).
DEVICE_ENV = {"EDGELOOP_VERIFY_IN_CHILD": "1", "PYTHONOPTIMIZE": "2"}
#: What the agents import, compiled under their optimisation level before they start.
_AGENT_IMPORTS = ("import edgeloop.cli, edge_agent.agent, edge_agent.inference, edge_agent.sources.composite, "
                  "edge_agent.sources.simulated, simulators.machine, simulators.cold_chain, models.signing")
_CHAMPION, _SHADOW = "1.0.0", "1.1.0"

_IMPORT_FLOOR = ("import paho.mqtt.client, numpy, onnxruntime, sys; "
                 "sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.read()")
_BARE = "import sys; sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.read()"
# Stage by stage, in the order the agent meets them; each line: name, Rss MB, Pss MB.
_STAGES = r"""
import gc, json, sys
def smaps():
    out = {}
    for line in open("/proc/self/smaps_rollup"):
        k, _, rest = line.partition(":")
        if k in ("Rss", "Pss"):
            out[k] = int(rest.split()[0]) / 1024
    return out["Rss"], out["Pss"]
stages = [("python", *smaps())]
def mark(name):
    gc.collect(); stages.append((name, *smaps()))
import msgspec; mark("msgspec")
import numpy; mark("numpy")
import onnxruntime; mark("onnxruntime")
import paho.mqtt.client; mark("paho-mqtt")
import sqlite3; mark("sqlite3")
import edge_agent.agent, edge_agent.sources, edge_agent.sources.composite, edge_agent.sources.simulated
import simulators.machine, simulators.cold_chain, models.features
mark("edge_agent + simulators")
if len(sys.argv) > 2:  # the champion's and the shadow's model directories
    from edge_agent.inference import Model
    keep = [Model.load(sys.argv[1])]; mark("first model: onnxruntime's kernel registry + the model")
    keep.append(Model.load(sys.argv[2])); mark("second model")
from cryptography.hazmat.primitives.asymmetric import ed25519; mark("cryptography (Ed25519)")
heavy = sorted(m for m in ("sklearn", "skl2onnx", "onnx", "scipy", "pydantic", "pandas") if m in sys.modules)
print(json.dumps({"stages": stages, "heavy_modules": heavy}))
"""




def _proc_mem(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                out[key.lower()] = int(rest.split()[0]) / 1024
            elif key in ("Private_Clean", "Private_Dirty"):  # USS: pages no other process maps
                out["uss"] = out.get("uss", 0.0) + int(rest.split()[0]) / 1024
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
            elif line.startswith(("RssAnon:", "RssFile:")):  # private memory vs mapped files (code)
                out[line.split(":")[0].lower()] = int(line.split()[1]) / 1024
    return out


def _mappings(pid: int, top: int = 12) -> list[tuple[str, float, float]]:
    """``(mapping, RSS MB, Private MB)`` of the largest groups in ``/proc/<pid>/smaps``: shared
    libraries by file (a package's own under ``package:file``), the heap and anonymous memory
    (malloc arenas, onnxruntime's buffers, Python objects) as ``[heap]`` / ``[anon]``."""
    rss: dict[str, float] = {}
    private: dict[str, float] = {}
    name = "[anon]"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts[0].endswith(":"):  # a mapping's header line: range perms offset dev inode [path]
                path = parts[5] if len(parts) > 5 else "[anon]"
                if "site-packages/" in path:
                    name = path.split("site-packages/", 1)[1].split("/", 1)[0] + ":" + os.path.basename(path)
                else:
                    name = os.path.basename(path) if path.startswith("/") else path
            elif parts[0] == "Rss:":
                rss[name] = rss.get(name, 0.0) + int(parts[1]) / 1024
            elif parts[0] in ("Private_Clean:", "Private_Dirty:"):
                private[name] = private.get(name, 0.0) + int(parts[1]) / 1024
    biggest = sorted(rss.items(), key=lambda kv: -kv[1])[:top]
    return [(k, v, private.get(k, 0.0)) for k, v in biggest]


def import_stages(model_dirs: tuple[Path, Path] | None = None) -> dict:
    """RSS/PSS of a fresh interpreter after each of the agent's imports (see module doc), and after
    loading the two models in ``model_dirs`` (champion, shadow) if given."""
    argv = [str(d) for d in model_dirs] if model_dirs else []
    out = subprocess.run([sys.executable, "-c", _STAGES, *argv], capture_output=True, text=True, timeout=120,
                         cwd=str(ROOT), check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench.agent import stages failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _models(workdir: Path, profile: str, trees: int) -> dict:
    """Champion (written to a model_dir) and shadow (signed, in no directory yet) for 8 channels:
    machine then cold-chain features side by side, as the composite source orders its channels."""
    import numpy as np

    from models import features
    from models.signing import generate_keypair, sign
    from models.training import simulated_training_set, train_isolation_forest, write_model
    from simulators.cold_chain import CHANNELS as COLD
    from simulators.machine import CHANNELS as MACHINE

    Xm, names_m = simulated_training_set("machine", seed=1, windows=1000, window_len=10)
    Xc, names_c = simulated_training_set("cold-chain", seed=1, windows=1000, window_len=10)
    names = names_m + names_c
    if names != features.feature_names(MACHINE + COLD):
        raise RuntimeError("bench.agent: the composite's feature names are not machine's then cold chain's")
    X = np.hstack([Xm, Xc])
    private, public = generate_keypair(workdir)
    out = {"public": public, "features": len(names)}
    for version, seed in ((_CHAMPION, 1), (_SHADOW, 2)):
        onnx, manifest = train_isolation_forest(X, names, version=version, profile=profile, seed=seed,
                                                n_estimators=trees)
        out[version] = (onnx, sign(manifest, onnx, private))
    out["champion_dir"] = write_model(workdir / "champion", *out[_CHAMPION])
    out["bytes"] = len(out[_CHAMPION][0])
    return out


def _config(path: Path, *, device: str, profile: str, url: str, data_dir: Path, public: Path,
            model_dir: Path | None, window_s: float) -> Path:
    model_line = f'model_dir = "{model_dir}"\n' if model_dir else ""
    path.write_text(f"""\
device_id = "{device}"
profile = "{profile}"
data_dir = "{data_dir}"
{model_line}
[mqtt]
url = "{url}"

[sampling]
rate_hz = 10.0
batch_s = 1.0
window_s = {window_s}

[source]
name = "composite"
options = {{ sources = [
    {{ name = "simulated", options = {{ profile = "machine", seed = 1, rate_hz = 10.0 }} }},
    {{ name = "simulated", options = {{ profile = "cold-chain", seed = 2, rate_hz = 10.0 }} }},
] }}

[models]
public_key_file = "{public}"
""")
    return path


def _spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE if "-c" in argv else subprocess.DEVNULL,
                            stderr=open(log, "wb"), cwd=str(ROOT), text=True,
                            env={**os.environ, **env} if env else None)


def _wait(cond, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"bench.agent: a process exited ({p.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench.agent: timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50_us": None, "p99_us": None}
    import numpy as np

    return {"n": len(values), "p50_us": float(np.percentile(values, 50)), "p99_us": float(np.percentile(values, 99))}


def run(broker_url: str | None = None, seconds: float = 60.0, *, warmup_s: float = 10.0, window_s: float = 1.0,
        trees: int = 100, agent_env: dict[str, str] | None = None) -> dict:
    """Everything in the module doc; with no ``broker_url`` a Mosquitto is started for the run.

    ``agent_env``: extra environment for the two agent processes only (e.g. ``MALLOC_ARENA_MAX``,
    ``EDGELOOP_VERIFY_IN_CHILD``), to measure a device setting against the same baselines."""
    agent_env = dict(DEVICE_ENV if agent_env is None else agent_env)
    sys.path.insert(0, str(ROOT))
    if broker_url is None:
        from tests.services import MosquittoServer

        with MosquittoServer() as broker:
            return run(broker.url, seconds, warmup_s=warmup_s, window_s=window_s, trees=trees, agent_env=agent_env)
    from aggregator.service import Aggregator, AggregatorConfig, MqttSettings

    tag = f"ab{os.getpid() % 100000}x{int(time.time()) % 10000}"
    with tempfile.TemporaryDirectory(prefix="edgeloop-agent-bench-") as tmp:
        work = Path(tmp)
        m = _models(work, tag, trees)
        agg = Aggregator(AggregatorConfig(data_dir=str(work / "agg"), mqtt=MqttSettings(
            url=broker_url, client_id=f"agent-bench-{tag}", share_group=f"agent-bench-{tag}")))
        agg.models.add(*m[_SHADOW])
        agg.start()
        procs: dict[str, subprocess.Popen] = {}
        try:
            # Write the byte code the agents will load (e.g. .opt-2.pyc), so that they do not compile.
            subprocess.run([sys.executable, "-c", _AGENT_IMPORTS], cwd=str(ROOT), env={**os.environ, **agent_env},
                           check=True, timeout=300, capture_output=True)
            cli = [sys.executable, "-m", "edgeloop.cli", "agent", "--config"]
            for name, model_dir in (("models", m["champion_dir"]), ("no-model", None)):
                cfg = _config(work / f"{name}.toml", device=f"{tag}-{name}", profile=tag, url=broker_url,
                              data_dir=work / "dev", public=m["public"], model_dir=model_dir, window_s=window_s)
                procs[name] = _spawn(cli + [str(cfg)], work / f"{name}.log", agent_env)
            procs["import floor"] = _spawn([sys.executable, "-c", _IMPORT_FLOOR], work / "floor.log")
            procs["bare python"] = _spawn([sys.executable, "-c", _BARE], work / "bare.log")
            for name in ("import floor", "bare python"):
                if procs[name].stdout.readline().strip() != "ready":
                    raise RuntimeError(f"bench.agent: the {name} process did not start")
            device = f"{tag}-models"
            _wait(lambda: agg.registry.get(device) is not None and agg.registry.get(f"{tag}-no-model") is not None,
                  60, "both agents to report", procs.values())
            agg.ota.set_desired(device, champion=None, shadow=_SHADOW)
            agg.ota.offer(tag, _SHADOW)

            def shadow_state():
                rec = agg.registry.get(device)
                dep = rec.deployments.get(_SHADOW) if rec is not None else None
                return dep.state if dep is not None else None

            _wait(lambda: shadow_state() in ("shadow", "rejected"), 60, "the shadow to be installed", procs.values())
            if shadow_state() != "shadow":
                raise RuntimeError(f"bench.agent: the agent refused the shadow: {agg.registry.get(device).deployments}")
            time.sleep(warmup_s)
            pids = {k: p.pid for k, p in procs.items()}
            cpu0 = {k: cpu_s(pid) for k, pid in pids.items()}
            samples: dict[str, list[dict]] = {k: [] for k in pids}
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                for k, pid in pids.items():
                    samples[k].append(_proc_mem(pid))
                time.sleep(1.0)
            wall = time.monotonic() - t0
            mappings = {k: _mappings(pids[k]) for k in ("models", "no-model")}
            cpu = {k: (cpu_s(pid) - cpu0[k]) / wall * 100 for k, pid in pids.items()}
            for p in procs.values():
                if p.poll() is not None:
                    raise RuntimeError(f"bench.agent: a process exited ({p.returncode}) during the measurement")
        finally:
            _stop(procs)
            agg.ota.retire(tag, _SHADOW)
            agg.ota.flush(10)
            agg.stop(forget_session=True)
        from models.training import write_model

        imports = import_stages((m["champion_dir"], write_model(work / "shadow", *m[_SHADOW])))
        import sqlite3

        with sqlite3.connect(work / "agg" / "aggregator" / "store.sqlite") as db:
            lat = {role: [r[0] for r in db.execute(
                "SELECT latency_us FROM inference WHERE device = ? AND role = ?", (device, role))]
                for role in ("champion", "shadow")}
        processes = {}
        for k in pids:
            s = samples[k]
            processes[k] = {
                "cpu_pct": cpu[k],
                "rss_mb": sum(x["rss"] for x in s) / len(s), "rss_max_mb": max(x["rss"] for x in s),
                "pss_mb": sum(x["pss"] for x in s) / len(s), "pss_max_mb": max(x["pss"] for x in s),
                "uss_mb": sum(x["uss"] for x in s) / len(s),
                "anon_mb": s[-1]["rssanon"], "file_mb": s[-1]["rssfile"],
                "threads": s[-1]["threads"],
            }
    return {
        "seconds": wall, "warmup_s": warmup_s, "window_s": window_s, "channels": 8, "rate_hz": 10.0,
        "trees": trees, "agent_env": agent_env, "model_bytes": m["bytes"], "features": m["features"], "processes": processes,
        "latency": {role: _percentiles(v) for role, v in lat.items()},
        "imports": imports, "mappings": mappings, "cpu_target_pct": CPU_TARGET_PCT, "memory_target_mb": MEMORY_TARGET_MB,
    }


def _stop(procs: dict[str, subprocess.Popen]) -> None:
    for p in procs.values():
        if p.poll() is None:
            if p.stdin is not None:
                try:
                    p.stdin.close()  # the floor and bare processes end at EOF
                except OSError:
                    pass
            p.send_signal(signal.SIGTERM)  # the agents drain for up to 5 s and exit
    for p in procs.values():
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
        if p.stdout is not None:
            p.stdout.close()


def table(result: dict) -> str:
    r = result
    P = r["processes"]
    a = P["models"]
    lines = [
        f"One `edgeloop agent` process, 8 channels (composite: simulated machine + cold chain) x 10 Hz, "
        f"{r['window_s']:g} s windows, outbox synchronous=FULL, champion from `model_dir` plus a shadow pushed over "
        f"the air ({r['trees']}-tree fused isolation forests, {r['model_bytes'] / 1024:.0f} KB each, "
        f"{r['features']} features), through Mosquitto to an aggregator that confirms delivery; measured over "
        f"{r['seconds']:.0f} s after {r['warmup_s']:.0f} s of warm-up, beside baselines run at the same time. "
        f"Agents' environment: {' '.join(f'{k}={v}' for k, v in r.get('agent_env', {}).items()) or 'as inherited'}.",
        "",
        "| process | CPU % of a core | RSS mean / max MB | PSS mean / max MB | USS mean MB | RSS anon / file MB | threads |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"models": "agent, champion + shadow", "no-model": "same agent, no model", "import floor":
             "python: import paho, numpy, onnxruntime", "bare python": "bare python"}
    for k, label in names.items():
        p = P[k]
        lines.append(f"| {label} | {p['cpu_pct']:.2f} | {p['rss_mb']:.1f} / {p['rss_max_mb']:.1f} "
                     f"| {p['pss_mb']:.1f} / {p['pss_max_mb']:.1f} | {p['uss_mb']:.1f} "
                     f"| {p['anon_mb']:.1f} / {p['file_mb']:.1f} | {p['threads']} |")
    lines += ["", "PSS splits each shared page among the processes that map it; here the baselines and the bench "
              "process map the same numpy and onnxruntime libraries, so the agent's PSS reads lower than on a device "
              "where it runs alone. A device's figure lies between USS (pages only this process maps) and RSS; the "
              "target is judged on RSS and PSS as measured, the larger."]
    lat = r["latency"]
    lines += ["", "| inference (as the agent reports it) | n | p50 µs | p99 µs |", "|---|---:|---:|---:|"]
    for role, v in lat.items():
        if v["n"]:
            lines.append(f"| {role} | {v['n']} | {v['p50_us']:.0f} | {v['p99_us']:.0f} |")
        else:
            lines.append(f"| {role} | 0 | — | — |")
    lines += ["", "`latency_us` is the agent's own timing of `session.run` on one window's vector, once per window and "
              "role: a session called once a second most likely runs with cold caches, which would explain why "
              "it reads well above the hot loop of the inference benchmark."]
    st = r["imports"]["stages"]
    lines += ["", "What the memory is made of (a fresh interpreter importing the agent's dependencies in turn):", "",
              "| import | RSS MB | + RSS MB | PSS MB |", "|---|---:|---:|---:|"]
    for i, (name, rss, pss) in enumerate(st):
        lines.append(f"| {name} | {rss:.1f} | {rss - st[i - 1][1] if i else rss:+.1f} | {pss:.1f} |")
    maps = r.get("mappings", {})
    if maps:
        lines += ["", "Where the running agents' RSS sits (`/proc/<pid>/smaps` at the end of the run, largest groups; "
                  "private = pages no other process maps):", "",
                  "| mapping | champion + shadow: RSS / private MB | no model: RSS / private MB |", "|---|---:|---:|"]
        other = {k: (v, p) for k, v, p in maps.get("no-model", [])}
        for k, v, p in maps.get("models", []):
            o = other.get(k)
            lines.append(f"| {k} | {v:.1f} / {p:.1f} | " + (f"{o[0]:.1f} / {o[1]:.1f} |" if o else "— |"))
    big = sorted(((rss - st[i - 1][1], name) for i, (name, rss, _) in enumerate(st) if i), reverse=True)[:4]
    floor, bare, none = P["import floor"], P["bare python"], P["no-model"]
    lines += ["", f"What dominates: the imports. The interpreter alone holds {bare['rss_mb']:.0f} MB RSS; "
              f"importing paho, numpy and onnxruntime takes it to {floor['rss_mb']:.0f} MB (largest steps: "
              + ", ".join(f"{n} {d:+.1f} MB" for d, n in big)
              + f"); the whole agent without a model runs at {none['rss_mb']:.0f} MB, and the two models with what "
              f"installing one over the air loads add {a['rss_mb'] - none['rss_mb']:.0f} MB RSS "
              f"({a['uss_mb'] - none['uss_mb']:.0f} MB USS): mostly onnxruntime's own code, which building the first "
              "session pages in (its kernel registry spans the library: clean pages of a mapped file, shared with any "
              "other onnxruntime process and reclaimable by the kernel, but counted in RSS), and the sessions' "
              "buffers. With EDGELOOP_VERIFY_IN_CHILD (the device setting) the Ed25519 check runs in a short-lived "
              "child, so the agent never maps cryptography (measured: 9 MB less RSS than verifying in process)."]
    step = {name: rss - st[i - 1][1] for i, (name, rss, _) in enumerate(st) if i}
    first = next((v for k, v in step.items() if k.startswith("first model")), None)
    if first is not None:
        lines += ["", f"onnxruntime's fixed cost in a process: importing it {step.get('onnxruntime', 0):+.1f} MB (its "
                  "module start-up registers every operator schema), and the first model "
                  f"{first:+.1f} MB against {step.get('second model', 0):+.1f} MB for the second: building the first "
                  "session builds the CPU kernel registry once, which a one-node model costs as well (~9 MB, mostly "
                  "onnxruntime's code pages). Settings in the agents' environment and code (edge_agent/memory.py, "
                  "docs/raspberry-pi.md \"Memory\"): PYTHONOPTIMIZE=2 (the unit's -OO, measured 2.4 MB less), "
                  "only the agent's own CLI command loaded (0.9 MB less), freed heap handed back after each session "
                  "build (~7 MB per model) and every five minutes, a 512 KiB SQLite page cache for the outbox."]
    cpu_ok = a["cpu_pct"] <= r["cpu_target_pct"]
    mem_ok = max(a["rss_max_mb"], a["pss_max_mb"]) <= r["memory_target_mb"]
    lines += ["", f"Targets (issue 3): CPU <= {r['cpu_target_pct']:g} % of a core: "
              f"{'met' if cpu_ok else 'NOT met'} ({a['cpu_pct']:.2f} %); "
              f"RSS and PSS <= {r['memory_target_mb']:.0f} MB: "
              f"{'met' if mem_ok else 'NOT met'} (RSS max {a['rss_max_mb']:.1f} MB, PSS max {a['pss_max_mb']:.1f} MB). "
              f"Heavy modules in the import chain: {', '.join(r['imports']['heavy_modules']) or 'none'}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agent", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=1.0, help="feature window in seconds (default 1)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--env", action="append", metavar="KEY=VALUE",
                        help=f"environment for the agents, replacing the device default {DEVICE_ENV} "
                             "(repeat; --env '' for none)")
    args = parser.parse_args(argv)
    env = None if args.env is None else dict(kv.split("=", 1) for kv in args.env if kv)
    import logging

    logging.basicConfig(level=logging.ERROR)
    res = run(seconds=args.seconds, warmup_s=args.warmup, window_s=args.window, agent_env=env)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
