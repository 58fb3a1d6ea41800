"""Pipeline benchmark (issue 3): pushing big tasks files, releasing dependents,
moving outputs through the datastore.

1. ``herder push`` of a JSON tasks file of N command tasks with 2N dependency
   edges, into a coordinator with no agents: wall time, the coordinator's
   peak RSS (VmHWM), and the worst ``/v1/health`` latency seen meanwhile
   (is it responsive?). Baseline: ``json.load`` of the same file.
2. Release cost against queue size: in a bare SQLite store holding N other
   tasks, the time to complete one task that has 10 dependents (which
   releases them). Baseline: the same with an empty queue; flat = the cost
   follows the task's own edges, not the queue.
3. Release latency on a real herd (2 local agents x 1 slot): 5,000 pairs
   a -> b plus one task depending on every a (10,001 tasks, pushed as one
   job): b's start minus a's commit as succeeded, p50/p99, and the fan-in
   task's start minus the last a's. Baseline: an idle herd's dispatch
   (submission commit -> start).
4. Datastore upload through the coordinator (``DataClient.put_file``) of
   1 MB and 100 MB files against ``shutil.copyfile`` of the same files.

Run: ``.venv/bin/python bench/pipeline.py [--quick]`` (quick: 10k/100k only,
fewer pairs). Writes ``bench/results-pipeline.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import httpx
from rich.console import Console
from rich.table import Table

from herder.local import LocalHerd
from herder.model import CommandSpec, TaskRef, TaskSpec, TaskState, new_id
from herder.security import client_ssl_context
from herder.store.base import Changes, ClaimRequest, TaskResult
from herder.store.sql import SqlStore

HERE = Path(__file__).resolve().parent
console = Console(width=None if sys.stdout.isatty() else 120)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))]


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextlib.contextmanager
def herd_of(nodes: int, log: Any) -> Iterator[LocalHerd]:
    herd = LocalHerd(nodes=nodes, slots=1, log=log)
    herd.start()
    try:
        if nodes:
            herd.wait_nodes(nodes)
        yield herd
    finally:
        herd.stop()


# --- 1. push ------------------------------------------------------------------------


def write_tasks_file(path: Path, n: int) -> int:
    """N command tasks in layers of 1,000; each depends on two tasks of the layer
    before. The format follows the suffix: .json, .toml or .yaml."""
    layer = 1000
    edges = 0
    fmt = path.suffix
    with open(path, "w") as f:
        f.write(
            {".json": '{"job": "bench", "tasks": [\n', ".toml": 'job = "bench"\n'}.get(
                fmt, "job: bench\ntasks:\n"
            )
        )
        for i in range(n):
            deps = []
            if i >= layer:
                base = (i // layer - 1) * layer
                deps = [f"t{base + i % layer}", f"t{base + (i + 1) % layer}"]
                edges += 2
            if fmt == ".json":
                entry = {"name": f"t{i}", "run": ["true"], "depends_on": deps}
                f.write(json.dumps(entry) + (",\n" if i < n - 1 else "\n"))
            elif fmt == ".toml":
                f.write(
                    f'[[tasks]]\nname = "t{i}"\nrun = ["true"]\ndepends_on = {json.dumps(deps)}\n'
                )
            else:
                f.write(f'  - name: t{i}\n    run: ["true"]\n    depends_on: {json.dumps(deps)}\n')
        if fmt == ".json":
            f.write("]}\n")
    return edges


def push_once(n: int, log: Any, tmp: Path, fmt: str = "json") -> dict[str, Any]:
    path = tmp / f"tasks-{n}.{fmt}"
    edges = write_tasks_file(path, n)
    baseline = tmp / f"tasks-{n}-baseline.json"
    write_tasks_file(baseline, n)
    t0 = time.perf_counter()
    with open(baseline) as f:
        json.load(f)
    parse_s = time.perf_counter() - t0
    baseline.unlink()
    with herd_of(0, log) as herd:
        assert herd.process is not None
        worst = probe_health_while(
            herd,
            lambda: subprocess.run(
                [sys.executable, "-m", "herder", "push", str(path), "--json"],
                env=herd.env(),
                check=True,
                capture_output=True,
                timeout=900,
            ),
        )
        push_s = worst.pop("elapsed")
        rss = vm_hwm_mb(herd.process.pid)
    path.unlink()
    return {
        "format": fmt,
        "tasks": n,
        "edges": edges,
        "push_s": push_s,
        "json_load_s": parse_s,
        "rss_mb": rss,
        "health_max_ms": worst["max_ms"],
    }


def probe_health_while(herd: LocalHerd, action: Any) -> dict[str, float]:
    """Run ``action`` while a thread times GET /v1/health every 100 ms."""
    assert herd.url is not None
    ca = (herd.home / "tls" / "ca.pem").read_bytes()
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=herd.url, verify=client_ssl_context(ca), timeout=60) as http:
            while not stop.wait(0.1):
                t = time.perf_counter()
                http.get("/v1/health")
                latencies.append(time.perf_counter() - t)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    action()
    elapsed = time.perf_counter() - t0
    stop.set()
    thread.join(timeout=70)
    return {"elapsed": elapsed, "max_ms": max(latencies, default=0.0) * 1000}


# --- 2. release cost against queue size ----------------------------------------------


def noop_spec(task_id: str, deps: list[str] | None = None, probe: bool = False) -> TaskSpec:
    return TaskSpec(
        id=task_id,
        kind="command",
        command=CommandSpec(run=["true"]),
        depends_on=deps or [],
        labels={"bench": "probe"} if probe else {},
    )


async def release_cost(queue: int, probes: int, tmp: Path) -> dict[str, float]:
    store = SqlStore(f"sqlite:///{tmp}/release-{queue}.db")
    await store.open()
    try:
        now = time.time()
        batch = 20_000
        for start in range(0, queue, batch):
            # half ready, half waiting on a task that never finishes: a realistic queue
            anchor = f"anchor-{start}"
            specs = [noop_spec(anchor)] + [
                noop_spec(f"q{i}", [anchor] if i % 2 else [])
                for i in range(start, min(queue, start + batch))
            ]
            await store.submit("filler", None, specs, now)
        times: list[float] = []
        work: list[float] = []
        for p in range(probes):
            head = f"p{p}"
            specs = [noop_spec(head, probe=True)] + [
                noop_spec(f"{head}-d{k}", [head]) for k in range(10)
            ]
            await store.submit("probe", None, specs, now)
            lease = await lease_one(store, head)
            result = TaskResult(head, lease, TaskState.SUCCEEDED, result=b"")
            changes = Changes()

            def complete(
                conn: Any, result: TaskResult = result, changes: Changes = changes
            ) -> float:
                # timed inside the transaction: the release work without the
                # commit's fsync, whose cost is the disk's, not the queue's
                t = time.perf_counter()
                store._complete(conn, [result], 0.0, changes)
                return time.perf_counter() - t

            t0 = time.perf_counter()
            work.append(await store._write(complete))
            times.append(time.perf_counter() - t0)
            assert changes.newly_ready == 10, changes
        return {
            "queue": queue,
            "work_p50_ms": statistics.median(work) * 1000,
            "p50_ms": statistics.median(times) * 1000,
        }
    finally:
        await store.close()


async def lease_one(store: SqlStore, task_id: str) -> str:
    """Lease the probe's head: the probe job has its own label, so only it matches."""
    _, claimed, _ = await store.cycle(claims=[ClaimRequest("n1", ["bench=probe"], 1)], now=0.0)
    (got,) = claimed["n1"]
    assert got.task_id == task_id
    return got.lease_id


# --- 3. release latency on a herd ----------------------------------------------------


def noop(x: int = 0) -> int:
    return x


def release_latency(pairs: int, log: Any) -> dict[str, float]:
    """Dependents pushed with their dependencies (one job), so each is waiting
    before its dependency ends; the gap is the release alone."""
    with herd_of(2, log) as herd:
        client = herd.client
        assert client is not None
        firsts = [call_spec(noop, i) for i in range(pairs)]
        # dependents first in line once released, so the gap is the release and
        # the dispatch, not the wait behind the remaining first tasks
        seconds = [call_spec(noop, TaskRef(a.id), deps=[a.id], priority=1) for a in firsts]
        fan_in = call_spec(
            count, *(TaskRef(a.id) for a in firsts), deps=[a.id for a in firsts], priority=2
        )
        job = client.push([*firsts, *seconds, fan_in], "release latency")
        summary = wait_until_finished(client, job, 600)
        assert summary["counts"] == {"succeeded": 2 * pairs + 1}, summary
        # an idle herd's dispatch, for scale: submission commit -> start
        plain = []
        for i in range(200):
            spec = call_spec(noop, i)
            client.push([spec], "plain")
            client.future(spec.id).result(timeout=60)
            plain.append(spec.id)
        conn = sqlite3.connect(herd.home / "herd.db")
        finished = dict(conn.execute("SELECT id, finished_at FROM tasks"))
        created = dict(conn.execute("SELECT id, created_at FROM tasks"))
        started = dict(conn.execute("SELECT task_id, started_at FROM attempts"))
        conn.close()
    gaps = [started[b.id] - finished[a.id] for a, b in zip(firsts, seconds, strict=True)]
    dispatch = [started[t] - created[t] for t in plain]
    last = max(finished[a.id] for a in firsts)
    return {
        "pairs": pairs,
        "p50_ms": percentile(gaps, 50) * 1000,
        "p99_ms": percentile(gaps, 99) * 1000,
        "fan_in_ms": (started[fan_in.id] - last) * 1000,
        "plain_p50_ms": percentile(dispatch, 50) * 1000,
        "plain_p99_ms": percentile(dispatch, 99) * 1000,
    }


def count(*values: int) -> int:
    return len(values)


def call_spec(fn: Any, *args: Any, deps: list[str] | None = None, priority: int = 0) -> TaskSpec:
    return TaskSpec(
        id=new_id("t"),
        kind="call",
        payload=cloudpickle.dumps((fn, args, {})),
        depends_on=deps or [],
        priority=priority,
    )


def wait_until_finished(client: Any, job: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        summary: dict[str, Any] = client.job(job)
        if summary["finished"]:
            return summary
        time.sleep(0.2)
    raise TimeoutError(f"job {job} not finished after {timeout}s")


# --- 4. datastore upload -------------------------------------------------------------


def upload_speed(log: Any, tmp: Path, sizes_mb: list[int]) -> list[dict[str, float]]:
    out = []
    with herd_of(0, log) as herd:
        assert herd.client is not None
        data = herd.client.data
        for mb in sizes_mb:
            src = tmp / f"blob-{mb}"
            with open(src, "wb") as f:
                for _ in range(mb):
                    f.write(os.urandom(1 << 20))
            copies = max(1, 100 // mb)
            t0 = time.perf_counter()
            for i in range(copies):
                data.put_file(f"bench/blob-{mb}-{i}", src)
            put_s = (time.perf_counter() - t0) / copies
            t0 = time.perf_counter()
            for i in range(copies):
                shutil.copyfile(src, tmp / f"copy-{mb}-{i}")
                with open(tmp / f"copy-{mb}-{i}", "rb+") as f:
                    os.fsync(f.fileno())
            copy_s = (time.perf_counter() - t0) / copies
            out.append(
                {"size_mb": mb, "put_mb_s": mb / put_s, "copy_mb_s": mb / copy_s, "copies": copies}
            )
    return out


# --- report ----------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k/100k only, 1,000 pairs")
    parser.add_argument("--out", type=Path, default=HERE / "results-pipeline.json")
    args = parser.parse_args()
    push_sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    pairs = 1000 if args.quick else 5000
    results: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
        "quick": args.quick,
    }
    with tempfile.TemporaryDirectory(prefix="herder-bench-") as tmp_name:
        tmp = Path(tmp_name)
        log = open(tmp / "herd.log", "ab")  # noqa: SIM115 - closed with the directory
        stamp = lambda what: console.print(f"{time.strftime('%H:%M:%S')} {what}")  # noqa: E731
        results["push"] = []
        for n, fmt in [(n, "json") for n in push_sizes] + [(100_000, "toml"), (100_000, "yaml")]:
            stamp(f"push {n:,} tasks ({fmt})")
            results["push"].append(push_once(n, log, tmp, fmt))
        results["release_cost"] = []
        for n in push_sizes:
            stamp(f"release cost with {n:,} queued")
            results["release_cost"].append(asyncio.run(release_cost(n, 30, tmp)))
        base = asyncio.run(release_cost(0, 30, tmp))
        stamp(f"release latency, {pairs:,} pairs")
        results["release_latency"] = release_latency(pairs, log)
        stamp("datastore upload")
        results["upload"] = upload_speed(log, tmp, [1, 100])
        log.close()

    table = Table(title=f"herder pipelines, {os.cpu_count()} CPUs")
    for col in ("measure", "herder", "baseline", "ratio", "target"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    for p in results["push"]:
        target = "< 10 s" if p["tasks"] == 100_000 else ""
        table.add_row(
            f"push {p['tasks']:,} tasks / {p['edges']:,} edges ({p['format']}), s",
            f"{p['push_s']:.2f}",
            f"{p['json_load_s']:.2f} (json.load)",
            f"{p['push_s'] / p['json_load_s']:.1f}x",
            target,
        )
        table.add_row(
            "   coordinator peak RSS, MB / worst health probe, ms",
            f"{p['rss_mb']:.0f} / {p['health_max_ms']:.0f}",
            "",
            "",
            "",
        )
    for r in results["release_cost"]:
        table.add_row(
            f"complete 1 task + release 10 dependents, {r['queue']:,} queued, ms",
            f"{r['work_p50_ms']:.2f}",
            f"{base['work_p50_ms']:.2f} (empty queue)",
            f"{r['work_p50_ms'] / base['work_p50_ms']:.2f}x",
            "flat",
        )
        table.add_row(
            "   the same with the commit (fsync), ms",
            f"{r['p50_ms']:.2f}",
            f"{base['p50_ms']:.2f}",
            f"{r['p50_ms'] / base['p50_ms']:.2f}x",
            "",
        )
    lat = results["release_latency"]
    table.add_row(
        f"dependency success -> dependent start, {lat['pairs']:,} pairs, p50/p99 ms",
        f"{lat['p50_ms']:.1f} / {lat['p99_ms']:.1f}",
        f"{lat['plain_p50_ms']:.1f} / {lat['plain_p99_ms']:.1f} (idle dispatch)",
        f"{lat['p50_ms'] / lat['plain_p50_ms']:.2f}x",
        "",
    )
    table.add_row(
        f"   fan-in: last of {lat['pairs']:,} done -> the one dependent starts, ms",
        f"{lat['fan_in_ms']:.1f}",
        "",
        "",
        "",
    )
    for u in results["upload"]:
        table.add_row(
            f"datastore put {u['size_mb']} MB, MB/s",
            f"{u['put_mb_s']:.0f}",
            f"{u['copy_mb_s']:.0f} (copy+fsync)",
            f"{u['put_mb_s'] / u['copy_mb_s']:.2f}x",
            "",
        )
    console.print(table)
    results["release_cost_empty"] = base
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
