"""Event bus benchmark: node-to-node round trips between two local agents.

A task on agent A sends ``ping`` to agent B (``herder.task.send``); a
handler that a task on B registered (``herder.node.on``) answers ``pong``
back to A; A waits for it before the next ping. Each leg is relayed by the
coordinator: worker -> agent A -> coordinator -> agent B -> worker, and
back. Latencies are taken inside A's task, so they hold the bus only.

Baseline in the same run: a plain client -> coordinator -> client echo (a
``Send`` on the session channel to a target that names no node; the
coordinator answers ``Sent``), timed inside the client's event loop.

Prints p50/p99 and writes ``bench/results-bus.json``.
Run: ``.venv/bin/python bench/bus.py [--rounds 500]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cloudpickle

from herder.local import LocalHerd

cloudpickle.register_pickle_by_value(sys.modules[__name__])

WARMUP = 20


def answer(seconds: float = 120.0) -> str:
    """On B: answer each ping to its sender until ``stop``."""
    from herder import node, task

    stop = threading.Event()
    node.on("ping", lambda msg: task.send(msg.sender, "pong", msg.data))
    node.on("stop", lambda _: stop.set())
    task.emit("ready")
    stop.wait(seconds)
    return "stopped"


def ask(target: str, rounds: int) -> list[float]:
    """On A: ``rounds`` sequential ping/pong round trips to ``target``, in seconds."""
    import queue

    from herder import node, task

    answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
    node.on("pong", lambda msg: answers.put(msg.data))
    out = []
    for i in range(rounds + WARMUP):
        t0 = time.perf_counter()
        task.send(target, "ping", i)
        if answers.get(timeout=10) != i:
            raise RuntimeError("answers out of order")
        out.append(time.perf_counter() - t0)
    return out[WARMUP:]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(pct(values, 0.50) * 1000, 3),
        "p99_ms": round(pct(values, 0.99) * 1000, 3),
        "mean_ms": round(statistics.fmean(values) * 1000, 3),
        "n": len(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=500)
    args = parser.parse_args()
    with LocalHerd(nodes=2, slots=1) as herd:
        proc_nodes = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            proc_nodes = sorted(n["id"] for n in herd.nodes() if n["state"] in ("ready", "busy"))
            if len(proc_nodes) >= 2:
                break
            time.sleep(0.05)
        if proc_nodes is None or len(proc_nodes) < 2:
            raise RuntimeError("2 nodes did not come up")
        node_a, node_b = proc_nodes[:2]
        ready = threading.Event()
        stop_listening = herd.on("emit", lambda e: e.topic == "ready" and ready.set())
        server = herd.submit(answer, select=f'node == "{node_b}"')
        if not ready.wait(30):
            raise RuntimeError("B's handler did not come up")
        stop_listening()
        bus = herd.submit(ask, node_b, args.rounds, select=f'node == "{node_a}"').result(120)
        herd.send(node_b, "stop")
        server.result(30)

        async def echo() -> list[float]:
            out = []
            for _ in range(args.rounds + WARMUP):
                t0 = time.perf_counter()
                await herd.aio.send("no-such-node", "echo")
                out.append(time.perf_counter() - t0)
            return out[WARMUP:]

        baseline = herd._run(echo())  # timed inside the client's own loop
    result = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "rounds": args.rounds,
        "node_to_node_round_trip": summary(bus),
        "client_echo_baseline": summary(baseline),
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).with_name("results-bus.json")
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
