"""Where a no-op's CPU goes: each process of a local herd, and the coordinator's threads.

For workload B (sequential submit -> result round trips) and workload A (one
batch of no-ops) of ``bench/compare.py``, on a herd of 2 agents x 1 slot:
CPU time (user + system) per task of the client, the coordinator (split by
thread: the event loop and the SQLite writer are the two that work), each
agent and each task worker. It says which process to make cheaper before a
profiler says which function. Prints a table and writes
``bench/results-cpu-split.json``. Run: ``.venv/bin/python bench/cpu_split.py``.
"""

from __future__ import annotations

import argparse
import json
import operator
import time
from pathlib import Path
from typing import Any

import psutil

from herder.local import LocalHerd

HERE = Path(__file__).parent


def cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def threads(proc: psutil.Process) -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in proc.threads()}


def split(herd: LocalHerd, run: Any, tasks: int) -> dict[str, Any]:
    """CPU microseconds per task of each process while ``run()`` does ``tasks`` tasks."""
    assert herd.process is not None
    coordinator = psutil.Process(herd.process.pid)
    procs = {"client": psutil.Process(), "coordinator": coordinator}
    for child in coordinator.children(recursive=True):
        line = child.cmdline()
        if "herder.agent.worker" in line:
            procs[f"task worker {child.pid}"] = child
        elif "herder.forkserver" in line and child.ppid() == coordinator.pid:
            continue  # the fork server (the agents it forked share its command line)
        else:
            procs[f"agent {child.pid}"] = child
    before = {name: cpu(p) for name, p in procs.items()}
    threads_before = threads(coordinator)
    started = time.perf_counter()
    run()
    wall = time.perf_counter() - started
    out: dict[str, Any] = {"wall": round(1e6 * wall / tasks, 1)}
    for name, p in procs.items():
        out[name] = round(1e6 * (cpu(p) - before[name]) / tasks, 1)
    # the main thread (its id is the pid) runs the event loop; of the others, the
    # store's SQLite writer is the one that works
    for tid, seconds in sorted(threads(coordinator).items()):
        spent = 1e6 * (seconds - threads_before.get(tid, 0.0)) / tasks
        if spent >= 1:
            role = "event loop" if tid == coordinator.pid else f"thread {tid}"
            out[f"coordinator: {role}"] = round(spent, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=10_000)
    args = parser.parse_args()
    noop = operator.pos  # by reference: the workers import nothing of this script
    herd = LocalHerd(nodes=2, slots=1)
    client = herd.start()
    try:
        herd.wait_nodes(2, timeout=60)
        for i in range(50):  # warm: the workers started, the first leases done
            client.submit(noop, i).result(timeout=60)
        client.map(noop, range(2000))

        def round_trips() -> None:
            for i in range(args.round_trips):
                client.submit(noop, i).result(timeout=60)

        results = {
            "B round trip": split(herd, round_trips, args.round_trips),
            "A batch": split(herd, lambda: client.map(noop, range(args.batch)), args.batch),
        }
    finally:
        herd.stop()
    path = HERE / "results-cpu-split.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    for workload, figures in results.items():
        print(f"{workload}: CPU microseconds per task")
        for name, value in figures.items():
            print(f"  {name:32} {value:10,.1f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
