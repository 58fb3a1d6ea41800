"""Core benchmark: herder on 2 local agents against ``ProcessPoolExecutor(2)``.

Measures (1) durable ``map`` throughput, (2) p50/p99 of a sequential
submit -> result round trip, (3) cold start to the first result and (4) the
coordinator's peak RSS with many tasks queued and no agents. Each figure is
the median of ``--repeat`` runs. Prints a table and writes
``bench/results-core.json``. Run: ``.venv/bin/python bench/core.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import faulthandler
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import cloudpickle
import psutil
from rich.console import Console
from rich.table import Table

import herder
from herder.client import DEFAULT_RETRIES
from herder.local import LocalHerd
from herder.model import TaskSpec, new_id

HERE = Path(__file__).resolve().parent
TARGETS = {"throughput": 2000.0, "p50_ms": 5.0, "cold_s": 2.0, "rss_mb": 300.0}
PHASE_LIMIT_S = 600.0  # no single phase may take longer; then dump stacks, kill, exit 2
console = Console(width=None if sys.stdout.isatty() else 110)


def noop(x: int = 0) -> int:
    """The task: nothing but the dispatch."""
    return x


@dataclass(frozen=True)
class Sizes:
    tasks: int
    round_trips: int
    warmup: int
    queued: int
    batch: int = 5000


# ---------------------------------------------------------------------------
# Bounding and cleaning up


@contextlib.contextmanager
def bounded(phase: str, seconds: float = PHASE_LIMIT_S) -> Iterator[None]:
    """Run a phase under a watchdog: on expiry print all stacks, kill our processes, exit."""

    def expire() -> None:
        console.print(f"[red]HANG: phase {phase!r} exceeded {seconds:.0f}s[/red]")
        faulthandler.dump_traceback(all_threads=True)
        kill_descendants()
        os._exit(2)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def kill_descendants() -> None:
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()


@contextlib.contextmanager
def local_herd(nodes: int, log: IO[Any], problems: list[str]) -> Iterator[LocalHerd]:
    """A LocalHerd (not yet started) whose agents are checked for survivors after stop."""
    herd = LocalHerd(nodes=nodes, slots=1, log=log)
    seen: set[int] = set()
    try:
        yield herd
        if herd.process is not None:
            with contextlib.suppress(psutil.Error):
                seen = {p.pid for p in psutil.Process(herd.process.pid).children(recursive=True)}
    finally:
        herd.stop()
    if herd.process is not None and herd.process.returncode not in (0, None):
        problems.append(f"herder up exited with code {herd.process.returncode}")
    time.sleep(0.5)
    for pid in seen:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                problems.append(f"agent pid {pid} still alive after stop; killed it")
                proc.kill()


# ---------------------------------------------------------------------------
# Measurements


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def round_trips(call: Callable[[int], Any], sizes: Sizes) -> tuple[float, float]:
    """p50 and p99 in ms of ``call(i)`` done sequentially, after a warmup."""
    for i in range(sizes.warmup):
        call(i)
    times = []
    for i in range(sizes.round_trips):
        t0 = time.perf_counter()
        call(i)
        times.append((time.perf_counter() - t0) * 1000)
    return percentile(times, 50), percentile(times, 99)


def throughput(run_map: Callable[[range], list[Any]], n: int) -> float:
    t0 = time.perf_counter()
    results = run_map(range(n))
    elapsed = time.perf_counter() - t0
    if list(results) != list(range(n)):
        raise RuntimeError("map returned wrong results")
    return n / elapsed


def herder_run(sizes: Sizes, log: IO[Any], problems: list[str]) -> dict[str, float]:
    with bounded("herder cold start + round trips + map"), local_herd(2, log, problems) as herd:
        t0 = time.perf_counter()
        client = herd.start()
        assert client.submit(noop, 0).result(timeout=60) == 0
        out = {"cold_s": time.perf_counter() - t0}
        herd.wait_nodes(2)
        out["p50_ms"], out["p99_ms"] = round_trips(
            lambda i: client.submit(noop, i).result(timeout=60), sizes
        )
        out["throughput"] = throughput(lambda r: client.map(noop, r), sizes.tasks)
    return out


def pool_run(sizes: Sizes) -> dict[str, float]:
    with bounded("ProcessPoolExecutor"):
        t0 = time.perf_counter()
        with ProcessPoolExecutor(2) as pool:
            assert pool.submit(noop, 0).result(timeout=60) == 0
            out = {"cold_s": time.perf_counter() - t0}
            out["p50_ms"], out["p99_ms"] = round_trips(
                lambda i: pool.submit(noop, i).result(timeout=60), sizes
            )
            out["throughput"] = throughput(lambda r: list(pool.map(noop, r)), sizes.tasks)
            chunk = math.ceil(sizes.tasks / (4 * 2))  # multiprocessing.Pool's heuristic
            out["throughput_chunked"] = throughput(
                lambda r: list(pool.map(noop, r, chunksize=chunk)), sizes.tasks
            )
    return out


def queued_rss(sizes: Sizes, log: IO[Any], problems: list[str]) -> dict[str, float]:
    """Peak coordinator RSS (MB) while ``sizes.queued`` tasks sit queued with no agents."""
    with bounded("queued RSS"), local_herd(0, log, problems) as herd:
        client = herd.start()
        assert herd.process is not None
        coord = psutil.Process(herd.process.pid)
        samples = [coord.memory_info().rss]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                with contextlib.suppress(psutil.Error):
                    samples.append(coord.memory_info().rss)

        sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        sampler.start()
        job_id = new_id("j")
        t0 = time.perf_counter()
        for start in range(0, sizes.queued, sizes.batch):
            specs = [
                TaskSpec(
                    id=new_id("t"),
                    kind="call",
                    name="noop",
                    payload=cloudpickle.dumps((noop, (i,), {})),
                    max_attempts=DEFAULT_RETRIES + 1,
                )
                for i in range(start, min(start + sizes.batch, sizes.queued))
            ]
            client._run(client.aio.submit_batch(job_id, "queued", specs))
        submit_s = time.perf_counter() - t0
        queued = client.job(job_id)
        time.sleep(2.0)  # let it settle; keep sampling
        stop.set()
        sampler.join()
        hwm = vm_hwm(coord.pid)
        out = {
            "rss_mb": max([*samples, hwm]) / 2**20,
            "rss_sampled_mb": max(samples) / 2**20,
            "vmhwm_mb": hwm / 2**20,
            "submit_per_s": sizes.queued / submit_s,
        }
        if queued.get("total") != sizes.queued:
            problems.append(f"queued job reports {queued.get('total')} tasks, not {sizes.queued}")
    return out


def vm_hwm(pid: int) -> int:
    """Linux's true peak RSS in bytes (0 elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------
# Report


def verdict(ok: bool) -> str:
    return "[green]PASS[/green]" if ok else "[red]MISS[/red]"


def report(h: dict[str, float], b: dict[str, float], sizes: Sizes) -> dict[str, bool]:
    passed = {
        "throughput": h["throughput"] >= TARGETS["throughput"],
        "p50_ms": h["p50_ms"] <= TARGETS["p50_ms"],
        "cold_s": h["cold_s"] <= TARGETS["cold_s"],
        "rss_mb": h["rss_mb"] <= TARGETS["rss_mb"],
    }
    table = Table(
        title=f"herder (2 agents x 1 slot) vs ProcessPoolExecutor(2), {os.cpu_count()} CPUs"
    )
    for col in ("measure", "herder", "pool", "herder/pool", "target", ""):
        table.add_column(col, justify="left" if col == "measure" else "right")
    rows = [
        (f"1. map {sizes.tasks:,} no-ops, tasks/s", "throughput", "throughput", ">= 2,000", True),
        ("   same vs pool chunksize=N/8", "throughput", "throughput_chunked", "", False),
        ("2. round trip p50, ms", "p50_ms", "p50_ms", "<= 5", True),
        ("   round trip p99, ms", "p99_ms", "p99_ms", "", False),
        ("3. start to first result, s", "cold_s", "cold_s", "<= 2", True),
    ]
    for label, hk, bk, target, gated in rows:
        hv, bv = h[hk], b[bk]
        fmt = "{:,.0f}" if hk == "throughput" else "{:.2f}"
        table.add_row(
            label,
            fmt.format(hv),
            fmt.format(bv),
            f"{hv / bv:.3g}x",
            target,
            verdict(passed[hk]) if gated else "",
        )
    table.add_row(
        f"4. coordinator peak RSS, {sizes.queued:,} queued, MB",
        f"{h['rss_mb']:.0f}", "n/a", "n/a", "<= 300 (at 100,000)", verdict(passed["rss_mb"]),
    )  # fmt: skip
    console.print(table)
    console.print(
        f"RSS detail: sampled max {h['rss_sampled_mb']:.0f} MB, VmHWM {h['vmhwm_mb']:.0f} MB; "
        f"queued submission rate {h['submit_per_s']:,.0f} tasks/s. "
        "Ratios are herder/pool (throughput: >1 is herder faster; times: >1 is herder slower).",
        highlight=False,
    )
    return passed


def say(text: str) -> None:
    console.print(f"{time.strftime('%H:%M:%S')} {text}", highlight=False)


def herder_warnings(log_path: Path) -> list[str]:
    keys = ("WARNING", "ERROR", "CRITICAL", "Traceback", "Exception")
    lines = log_path.read_text(errors="replace").splitlines()
    return [line for line in lines if any(k in line for k in keys)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--quick", action="store_true", help="1 repeat, smaller sizes")
    parser.add_argument("--out", type=Path, default=HERE / "results-core.json")
    args = parser.parse_args()
    repeat = 1 if args.quick else max(1, args.repeat)
    sizes = Sizes(2000, 200, 20, 20_000) if args.quick else Sizes(10_000, 500, 50, 100_000)
    problems: list[str] = []
    runs: dict[str, list[dict[str, float]]] = {"herder": [], "pool": []}
    with tempfile.TemporaryDirectory(prefix="herder-bench-") as tmp:
        log_path = Path(tmp) / "herder.log"
        try:
            with log_path.open("w") as log:
                for k in range(repeat):
                    say(f"run {k + 1}/{repeat}: herder on 2 agents")
                    h = herder_run(sizes, log, problems)
                    say(f"run {k + 1}/{repeat}: herder with {sizes.queued:,} queued")
                    h |= queued_rss(sizes, log, problems)
                    say(f"run {k + 1}/{repeat}: ProcessPoolExecutor")
                    runs["herder"].append(h)
                    runs["pool"].append(pool_run(sizes))
        except BaseException:
            console.print("[red]failed; herder's log ends with:[/red]")
            console.print("\n".join(log_path.read_text().splitlines()[-40:]), highlight=False)
            for line in problems:
                console.print(f"[yellow]{line}[/yellow]", highlight=False)
            raise
        finally:
            kill_descendants()
        warnings = herder_warnings(log_path)
    med = {
        side: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for side, rs in runs.items()
    }
    passed = report(med["herder"], med["pool"], sizes)
    if warnings:
        problems.append(f"{len(warnings)} warning/error lines in herder's log, first ones:")
        problems.extend(f"  {line}" for line in warnings[:10])
    for line in problems:
        console.print(f"[yellow]{line}[/yellow]", highlight=False)
    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "herder": herder.__version__,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
        "quick": args.quick,
        "repeat": repeat,
        "sizes": sizes.__dict__,
        "targets": TARGETS,
        "median": med,
        "runs": runs,
        "passed": passed,
        "problems": problems,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
