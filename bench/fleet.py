"""Fleet benchmark: how fast nodes come, how fast the dead are replaced, what a
reconcile pass costs.

1. spawn -> ready of a local node (p50/p90 over ``--spawns``), from the store's
   own ``node_requested`` and ``node_ready`` events; baseline in the same run:
   the bare start of ``python -c 'import herder.agent.agent'`` (what a node
   cannot beat: the interpreter and the agent's imports).
2. kill -9 of an agent -> its replacement ready (p50/p90 over ``--kills``).
3. one reconcile pass with 1,000 nodes in the store against the same pass
   with 10 (median of 50 passes each; SQLite file store, an in-memory
   provider that owns every node, all nodes paired).

Prints a table and writes ``bench/results-fleet.json``.
Run: ``.venv/bin/python bench/fleet.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from herder.fleet import Fleet, NodeLoad
from herder.herd import Herd
from herder.local import LocalHerd
from herder.model import NodeRecord, NodeState
from herder.providers.base import LaunchSpec, NodeHandle, Provider, SpawnResult
from herder.store.sql import SqlStore

HERE = Path(__file__).resolve().parent
console = Console(width=None if sys.stdout.isatty() else 110)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def event_times(home: Path, action: str) -> dict[str, float]:
    import sqlite3

    with sqlite3.connect(home / "herd.db", timeout=10) as conn:
        rows = conn.execute("SELECT node_id, at FROM events WHERE action = ?", (action,))
        return {node_id: at for node_id, at in rows}


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"{what} did not happen within {timeout}s")


def import_baseline(repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import herder.agent.agent"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def spawn_and_replace(spawns: int, kills: int) -> dict[str, Any]:
    """Spawn -> ready one node at a time, then kill -9 -> replacement ready."""
    with tempfile.TemporaryDirectory(prefix="herder-bench-fleet-") as tmp:
        home = Path(tmp)
        local = LocalHerd(nodes=1, home=home)
        with local as client:
            local.wait_nodes(1, timeout=60)
            # spawn -> ready: scale 0 -> 1, repeatedly
            for _ in range(spawns - 1):
                client.scale(0)
                wait_until(lambda: not _ready_ids(client), 30, "scale to 0")
                client.scale(1)
                wait_until(lambda: _ready_ids(client), 30, "scale to 1")
            requested = event_times(home, "node_requested")
            ready = event_times(home, "node_ready")
            spawn_s = [ready[n] - requested[n] for n in requested if n in ready]
            # kill -9 -> replacement ready
            replace_s = []
            for _ in range(kills):
                (victim,) = _ready_ids(client)
                pid = next(n["pid"] for n in client.nodes() if n["id"] == victim)
                os.kill(pid, signal.SIGKILL)
                killed = time.time()
                new = wait_until(
                    lambda v=victim: [n for n in _ready_ids(client) if n != v], 30, "replacement"
                )
                replace_s.append(event_times(home, "node_ready")[new[0]] - killed)
    return {"spawn_s": spawn_s, "replace_s": replace_s}


def _ready_ids(client: Any) -> list[str]:
    return [n["id"] for n in client.nodes() if n["state"] in ("ready", "busy")]


class InMemoryProvider(Provider):
    """Owns whatever it is told; spawns nothing (the pass is measured, not spawns)."""

    name = "bench"

    def __init__(self, owned: list[str]) -> None:
        self.owned = owned

    async def spawn(self, node_ids: list[str], launch: LaunchSpec) -> SpawnResult:
        return SpawnResult()

    async def terminate(self, node_id: str, grace: float) -> None:
        return None

    async def list_own(self) -> list[NodeHandle]:
        return [NodeHandle(n, self.name) for n in self.owned]


class PairedAll:
    """The coordinator's side for the pass: every node paired, half of them busy."""

    def __init__(self, ids: list[str]) -> None:
        now = time.monotonic()
        self._loads = {
            n: NodeLoad(
                slots=1,
                running=i % 2,
                idle_since=None if i % 2 else now,
                ready=True,
                draining=False,
            )
            for i, n in enumerate(ids)
        }

    def loads(self) -> dict[str, NodeLoad]:
        return self._loads

    async def ready_tasks(self, labels: dict[str, str], limit: int) -> int:
        return 0

    async def drain(self, node_id: str, reason: str, *, kill: bool) -> bool:
        return True

    async def node_gone(self, node_id: str, reason: str) -> None:
        return None


async def reconcile_cost(nodes: int, passes: int) -> float:
    with tempfile.TemporaryDirectory(prefix="herder-bench-reconcile-") as tmp:
        store = SqlStore(f"sqlite:///{tmp}/herd.db")
        await store.open()
        try:
            ids = [f"bench-{i:05d}" for i in range(nodes)]
            now = time.time()
            await store.add_nodes(
                [
                    NodeRecord(
                        id=n,
                        name=n,
                        state=NodeState.REQUESTED,
                        provider="bench",
                        labels={},
                        slots=1,
                        host=None,
                        pid=None,
                        created_at=now,
                        last_seen=None,
                        reason=None,
                    )
                    for n in ids
                ]
            )
            for state in (NodeState.CONNECTED, NodeState.READY):
                await store.set_node_states([(n, state, None, None) for n in ids], now)

            class Bench(Herd):
                provider = InMemoryProvider(ids)
                target = nodes
                max_nodes = nodes
                inventory_s = 0.0  # every pass compares the inventory too: the worst case

            fleet = Fleet(Bench(), store, PairedAll(ids), join="x@https://127.0.0.1:1")
            await fleet.start(Path(tmp))
            await fleet.reconcile()  # the first pass writes busy/ready; then it is steady
            times = []
            for _ in range(passes):
                t0 = time.perf_counter()
                await fleet.reconcile()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        finally:
            await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    args = parser.parse_args()
    spawns, kills, passes = (5, 3, 10) if args.quick else (20, 10, 50)

    baseline_s = import_baseline(5)
    measured = spawn_and_replace(spawns, kills)
    small = asyncio.run(reconcile_cost(10, passes))
    large = asyncio.run(reconcile_cost(1000, passes))

    spawn_s, replace_s = measured["spawn_s"], measured["replace_s"]
    results = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "spawn_to_ready_s": {"p50": pct(spawn_s, 0.5), "p90": pct(spawn_s, 0.9), "n": len(spawn_s)},
        "agent_import_baseline_s": baseline_s,
        "kill_to_replacement_ready_s": {
            "p50": pct(replace_s, 0.5),
            "p90": pct(replace_s, 0.9),
            "n": len(replace_s),
        },
        "reconcile_pass_ms": {"nodes_10": small * 1000, "nodes_1000": large * 1000},
    }
    table = Table("figure", "value", "baseline / ratio")
    table.add_row(
        f"local spawn -> ready, p50 / p90 (n={len(spawn_s)})",
        f"{pct(spawn_s, 0.5):.2f} s / {pct(spawn_s, 0.9):.2f} s",
        f"agent import {baseline_s:.2f} s ({pct(spawn_s, 0.5) / baseline_s:.1f}x)",
    )
    table.add_row(
        f"kill -9 -> replacement ready, p50 / p90 (n={len(replace_s)})",
        f"{pct(replace_s, 0.5):.2f} s / {pct(replace_s, 0.9):.2f} s",
        f"spawn -> ready {pct(spawn_s, 0.5):.2f} s",
    )
    table.add_row(
        "reconcile pass, 1,000 nodes",
        f"{large * 1000:.1f} ms",
        f"10 nodes {small * 1000:.1f} ms ({large / small:.0f}x)",
    )
    console.print(table)
    (HERE / "results-fleet.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
