"""herder side by side with Dask, Ray, Celery and a process pool (issue 11): ``make bench``.

Installs the peers into ``bench/.venv-peers`` (none is a dependency of
herder), starts a throwaway redis-server for Celery, and runs every system's
workloads (A throughput, B latency, C DAG, D cold start, E queue memory;
herder also F queue depth and G 200 nodes) as one subprocess per system and
repeat: herder and nothing else in herder's venv, the peers in theirs.
Every system gets 2 workers x 1 slot. Each figure is the median of
``--repeat`` runs; ratios are taken within a run (herder against the best
peer of that same run), then their median. Writes ``bench/RESULTS.md``,
``bench/results.png`` and ``bench/results-compare.json``.

Run: ``.venv/bin/python bench/compare.py [--quick] [--repeat 3] [--only herder,dask]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_common import HERE, RESULT_PREFIX, Sizes, child_env

import herder

PEERS_VENV = HERE / ".venv-peers"
PEERS_PYTHON = PEERS_VENV / "bin" / "python"
PEER_PACKAGES = ["dask[distributed]", "celery[redis]", "ray", "matplotlib", "psutil", "cloudpickle"]
REDIS_SERVER = "/usr/bin/redis-server"
SYSTEMS = ("herder", "pool", "dask", "dask-inf", "ray", "celery")
NAMES = {
    "herder": "herder",
    "pool": "process pool",
    "dask": "Dask (defaults)",
    "dask-inf": "Dask (saturation inf)",
    "ray": "Ray",
    "celery": "Celery + Redis",
}
PEERS = ("dask", "ray", "celery")  # "best peer" is the best of these (dask: the better setting)
RUN_LIMIT_S = 1800.0  # one system's run; beyond that it is killed and counted as failed

# metric: (label, unit, higher is better)
METRICS: dict[str, tuple[str, str, bool]] = {
    "a_tasks_per_s": ("A throughput, 10,000 no-ops", "tasks/s", True),
    "b_p50_ms": ("B round trip p50", "ms", False),
    "b_p99_ms": ("B round trip p99", "ms", False),
    "c_wall_s": ("C DAG 1,000 -> 100 -> 1", "s", False),
    "d_cold_s": ("D cold start to first result", "s", False),
    "e_rss_mb": ("E queue holder peak RSS, 100,000 queued", "MB", False),
}
# Herder only: F (dispatch rate by queue depth) and G (200 nodes).
HERDER_ONLY = ("f_tasks_per_s_", "g_cpu_percent", "g_tasks_per_s")


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


# ---------------------------------------------------------------------------
# The peers' environment and Redis


def ensure_peers_venv() -> dict[str, str]:
    """Create ``bench/.venv-peers`` once; the installed versions (absent ones: why)."""
    if not PEERS_PYTHON.exists():
        say(f"creating {PEERS_VENV} (dask, celery, ray, matplotlib)")
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
        pip = [str(PEERS_PYTHON), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, *PEER_PACKAGES[:2], *PEER_PACKAGES[3:]], check=True)
        ray = subprocess.run([*pip, "ray"], capture_output=True, text=True)
        if ray.returncode != 0:
            say(f"ray did not install on this machine:\n{ray.stderr[-2000:]}")
    probe = (
        "import importlib.metadata as m, json\n"
        "out = {}\n"
        "for name in ('dask', 'distributed', 'celery', 'redis', 'ray', 'matplotlib'):\n"
        "    try: out[name] = m.version(name)\n"
        "    except m.PackageNotFoundError: out[name] = 'not installed'\n"
        "print(json.dumps(out))\n"
    )
    found = subprocess.run([str(PEERS_PYTHON), "-c", probe], capture_output=True, text=True)
    versions: dict[str, str] = json.loads(found.stdout)
    return versions


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, int]]:
    """A redis-server on a free loopback port keeping nothing on disk; (url, pid)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        server = subprocess.Popen(
            [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"redis-server did not listen on port {port}")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0", server.pid
        finally:
            server.terminate()
            server.wait(10)


def redis_version() -> str:
    out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("v=")), out.strip())


# ---------------------------------------------------------------------------
# Running one system once


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_system(system: str, sizes: Sizes, log_dir: Path) -> dict[str, Any]:
    """One run of one system's workloads in a subprocess: its figures, or its error."""
    env = child_env()
    if system == "herder":
        argv = [sys.executable, str(HERE / "compare_herder.py"), "run",
                "--log", str(log_dir / "herder-coordinators.log")]  # fmt: skip
    else:
        argv = [str(PEERS_PYTHON), str(HERE / "compare_peers.py"), "run", system]
    argv += ["--sizes", sizes.to_json()]
    record: dict[str, Any] = {"load_before": load(), "started": time.strftime("%H:%M:%S")}
    with contextlib.ExitStack() as stack:
        if system == "celery":
            url, pid = stack.enter_context(redis_server())
            env |= {"BENCH_REDIS_URL": url, "BENCH_REDIS_PID": str(pid)}
        with (log_dir / f"{system}.stderr").open("a") as err:
            try:
                done = subprocess.run(
                    argv, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                    timeout=RUN_LIMIT_S, start_new_session=True,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                record["error"] = f"killed after {RUN_LIMIT_S:.0f}s"
                return record
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        record["error"] = f"exited {done.returncode}; see {log_dir / (system + '.stderr')}"
    else:
        record["figures"] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    return record


# ---------------------------------------------------------------------------
# Medians, ratios and targets


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r["figures"][key] for r in runs if key in r.get("figures", {})]
    return statistics.median(values) if values else None


def best(values: dict[str, float | None], higher: bool) -> tuple[str, float] | None:
    known = {k: v for k, v in values.items() if v is not None}
    if not known:
        return None
    pick = max if higher else min
    name = pick(known, key=lambda k: known[k])
    return name, known[name]


def peer_values(run: dict[str, dict[str, Any]], key: str, higher: bool) -> dict[str, float | None]:
    """Each peer's figure in one run; Dask as the better of its two settings."""
    raw = {s: run.get(s, {}).get("figures", {}).get(key) for s in ("dask", "dask-inf", *PEERS)}
    dask_best = best({"dask": raw["dask"], "dask-inf": raw["dask-inf"]}, higher)
    return {
        "dask": dask_best[1] if dask_best else None,
        "ray": raw["ray"],
        "celery": raw["celery"],
    }


def ratios(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per metric: median over runs of herder / best peer and herder / pool (same run)."""
    out: dict[str, dict[str, float]] = {}
    for key, (_, _, higher) in METRICS.items():
        vs_peer, vs_pool = [], []
        for run in runs:
            mine = run.get("herder", {}).get("figures", {}).get(key)
            if mine is None:
                continue
            top = best(peer_values(run, key, higher), higher)
            if top is not None:
                vs_peer.append(mine / top[1])
            pool = run.get("pool", {}).get("figures", {}).get(key)
            if pool is not None:
                vs_pool.append(mine / pool)
        out[key] = {}
        if vs_peer:
            out[key]["best_peer"] = statistics.median(vs_peer)
        if vs_pool:
            out[key]["pool"] = statistics.median(vs_pool)
    return out


def targets(
    med: dict[str, dict[str, float | None]], rat: dict[str, dict[str, float]], sizes: Sizes
) -> list[dict[str, Any]]:
    """The issue's targets, each with the figure it was judged on and met or not."""
    h = med["herder"]

    def row(name: str, goal: str, value: float | None, ok: Callable[[float], bool]) -> dict:
        return {"target": name, "goal": goal, "value": value,
                "met": None if value is None else bool(ok(value))}  # fmt: skip

    a = rat["a_tasks_per_s"]
    f_lo, f_hi = (h.get(f"f_tasks_per_s_{d}") for d in (sizes.depths[0], sizes.depths[-1]))
    return [
        row("A vs best peer", "herder/best >= 1", a.get("best_peer"), lambda v: v >= 1),
        row("A vs process pool", "herder/pool >= 0.3", a.get("pool"), lambda v: v >= 0.3),
        row("B p50", "herder/best <= 1", rat["b_p50_ms"].get("best_peer"), lambda v: v <= 1),
        row("C DAG", "herder/best <= 1", rat["c_wall_s"].get("best_peer"), lambda v: v <= 1),
        row("D cold start", "herder/best <= 1", rat["d_cold_s"].get("best_peer"), lambda v: v <= 1),
        row("E queue RSS", "herder/best <= 0.5", rat["e_rss_mb"].get("best_peer"),
            lambda v: v <= 0.5),
        row(
            f"F {sizes.depths[-1]:,} vs {sizes.depths[0]:,} queued",
            "rate ratio >= 0.8",
            None if not (f_lo and f_hi) else f_hi / f_lo,
            lambda v: v >= 0.8,
        ),
        row("G 200 nodes", "coordinator CPU < 10 %", h.get("g_cpu_percent"), lambda v: v < 10),
    ]  # fmt: skip


# ---------------------------------------------------------------------------
# Output


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if unit == "tasks/s" or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def markdown(result: dict[str, Any]) -> str:
    med, rat, sizes = result["median"], result["ratios"], result["sizes"]
    m, planned = result["machine"], result["planned_repeats"]
    lines = [
        "# herder side by side with Dask, Ray, Celery and a process pool",
        "",
        f"Written by `{result['command']}` at {m['date']} (issue 11). "
        f"Median of {result['repeat']} runs"
        f"{'' if result['repeat'] == planned else f' (of {planned} planned)'}"
        f"{' (--quick sizes)' if result['quick'] else ''}; "
        "ratios are taken within each run (herder against the best peer of that run) and "
        "their median shown. Every system has 2 workers x 1 slot.",
        "",
        f"Machine: {m['cpus']} CPUs, {m['memory_gb']} GB, {m['platform']}, Python {m['python']}. "
        "Other engineers' tests share the machine: the load average before each run is in "
        "`results-compare.json`.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        "",
        "| workload | " + " | ".join(NAMES[s] for s in SYSTEMS) + " | herder / best peer "
        "| herder / pool |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, (label, unit, higher) in METRICS.items():
        cells = [fmt(med[s].get(key), unit) for s in SYSTEMS]
        r = rat.get(key, {})
        lines.append(
            f"| {label} ({unit}, {'higher' if higher else 'lower'} is better) | "
            + " | ".join(cells)
            + f" | {fmt(r.get('best_peer'))} | {fmt(r.get('pool'))} |"
        )
    h = med["herder"]
    lines += ["", "herder only:", "", "| workload | herder |", "|---|---:|"]
    for d in sizes["depths"]:
        rate = fmt(h.get(f"f_tasks_per_s_{d}"), "tasks/s")
        lines.append(f"| F dispatch rate with {d:,} queued (tasks/s) | {rate} |")
    lines += [
        f"| G {sizes['agents']} nodes: coordinator CPU while they heartbeat (% of one core) "
        f"| {fmt(h.get('g_cpu_percent'))} |",
        f"| G {sizes['agents']} nodes: dispatch rate of {sizes['probe']:,} tasks (tasks/s) "
        f"| {fmt(h.get('g_tasks_per_s'), 'tasks/s')} |",
        "",
        "## Targets",
        "",
        "| target | goal | measured | |",
        "|---|---|---:|---|",
    ]
    for t in result["targets"]:
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['goal']} | {fmt(t['value'])} | {verdict} |")
    lines += ["", "Load average (1 min) before each system's run, run by run:", ""]
    for k, run in enumerate(result["runs"], 1):
        loads = ", ".join(f"{s} {r['load_before'][0]:.1f}" for s, r in run.items())
        lines.append(f"- run {k}: {loads}")
    lines += ["", "## How each figure is taken", "", *HOW, ""]
    if result["errors"]:
        lines += ["## Runs that failed", ""]
        lines += [f"- {e}" for e in result["errors"]] + [""]
    return "\n".join(lines)


HOW = [
    "- A: one batch of no-op tasks through each system's batch API (`Client.map`, "
    "`client.map` + `gather`, a list of `.remote()` + `ray.get`, a Celery `group`, "
    "`Executor.map`) until every result is back. herder acknowledges a submission only "
    "once it is committed to SQLite.",
    "- B: one no-op submitted and its result awaited, 500 times one after the other, "
    "after 50 unmeasured.",
    "- C: 1,000 map tasks, 100 reduce tasks of 10 map results each, 1 final task over the "
    "100 reduces, all submitted up front (dependencies as futures/refs; Celery as a chord "
    "of chords; the process pool has no dependencies, so its caller waits per group).",
    "- D: from spawning a fresh Python process to its first result: imports, starting the "
    "cluster (herder: coordinator and 2 agents; Celery: 2 workers, Redis already up), one "
    "no-op. Every system's code is byte-compiled beforehand (herder's by `make bench`: it is "
    "installed editable; the peers' by pip).",
    "- E: peak RSS, sampled every 50 ms, of what holds the queue while 100,000 no-ops wait "
    "with no worker: herder's coordinator, Dask's scheduler (its own process), Ray's driver "
    "(the tasks' owner) + raylet + GCS, Celery's redis-server. Each queues through its batch "
    "API: herder in frames of 1,000 committed one by one, as `client.map` sends them.",
    "- F: herder with 2 agents paused, a backlog of N no-ops (priority 0) and a probe "
    "of no-ops (priority 1) committed; the rate is the probe's, from resuming the agents to "
    "its last result.",
    "- G: 200 simulated nodes in one process (bench/simnodes.py: each a real TLS "
    "WebSocket that pairs with the real handshake and heartbeats every second) beside 2 "
    "real agents: the coordinator's CPU (user + system) over an idle window, then the "
    "dispatch rate of a map.",
]


def plot(result_path: Path, png: Path) -> None:
    """The chart is drawn by matplotlib in the peers' venv (not a herder dependency)."""
    done = subprocess.run(
        [str(PEERS_PYTHON), str(HERE / "compare_plot.py"), str(result_path), str(png)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        say(f"the chart failed:\n{done.stderr[-2000:]}")


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--quick", action="store_true", help="1 run and smaller sizes")
    parser.add_argument("--only", default=",".join(SYSTEMS), help="comma-separated systems")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    repeat = 1 if args.quick else max(1, args.repeat)
    sizes = Sizes.pick(args.quick)
    systems = [s for s in SYSTEMS if s in args.only.split(",")]
    versions = {"herder": herder.__version__}
    if set(systems) - {"herder"}:
        versions |= ensure_peers_venv()
    versions["redis-server"] = redis_version()
    log_dir = HERE / "artifacts" / "compare"
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    runs: list[dict[str, dict[str, Any]]] = []
    errors = []
    for k in range(repeat):
        run: dict[str, dict[str, Any]] = {}
        for system in systems:
            say(f"run {k + 1}/{repeat}: {system} (load {load()})")
            record = run_system(system, sizes, log_dir)
            run[system] = record
            if "error" in record:
                errors.append(f"run {k + 1}, {system}: {record['error']}")
                say(f"  {system} failed: {record['error']}")
            else:
                say("  " + ", ".join(f"{k2} {v:,.3g}" for k2, v in record["figures"].items()))
        runs.append(run)
        json_path = write_outputs(args, sizes, versions, runs, errors, repeat)
    print((args.out / "RESULTS.md").read_text())
    say(f"wrote {args.out / 'RESULTS.md'}, results.png and {json_path.name}")
    return 1 if errors else 0


def write_outputs(
    args: argparse.Namespace,
    sizes: Sizes,
    versions: dict[str, str],
    runs: list[dict[str, dict[str, Any]]],
    errors: list[str],
    planned: int,
) -> Path:
    """RESULTS.md, results-compare.json and results.png from the runs done so far
    (written after every run, so a run cut short still leaves its figures)."""
    keys = [*METRICS, *(f"f_tasks_per_s_{d}" for d in sizes.depths), *HERDER_ONLY[1:]]
    med = {
        s: {key: median_of([r[s] for r in runs if s in r], key) for key in keys} for s in SYSTEMS
    }
    rat = ratios(runs)
    result = {
        "command": " ".join(["bench/compare.py", *sys.argv[1:]]),
        "machine": machine(),
        "versions": versions,
        "quick": args.quick,
        "repeat": len(runs),
        "planned_repeats": planned,
        "sizes": json.loads(sizes.to_json()),
        "median": med,
        "ratios": rat,
        "targets": targets(med, rat, sizes),
        "runs": runs,
        "errors": errors,
    }
    json_path = args.out / "results-compare.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "RESULTS.md").write_text(markdown(result))
    plot(json_path, args.out / "results.png")
    return json_path


if __name__ == "__main__":
    sys.exit(main())
