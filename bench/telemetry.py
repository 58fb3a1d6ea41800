"""Telemetry overhead: what 200 nodes heartbeating cost the wire and the coordinator.

200 simulated nodes (``bench/simnodes.py``: one process, a real connection
each, paired with the real handshake) heartbeat every second for
``--seconds``: first without telemetry (the baseline: what keeping 200
nodes alive costs anyway), then with a full reading per heartbeat. Reported:
bytes per node per second on the wire (frames as sent, before TLS), and the
coordinator's CPU (psutil user+system over wall time), with the ratio of the
two runs. The coordinator stores every reading (one batch a second).
Writes ``bench/results-telemetry.json``. Run: ``.venv/bin/python bench/telemetry.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simnodes import Traffic, simulate

from herder.local import LocalHerd

HERE = Path(__file__).parent
WARMUP_S = 4.0
console = Console()


def measure(
    herd: LocalHerd, join: str, nodes: int, seconds: float, telemetry: bool
) -> dict[str, Any]:
    """Steady state: the coordinator's CPU over ``seconds`` once all nodes paired."""
    assert herd.process is not None
    coordinator = psutil.Process(herd.process.pid)
    box: dict[str, Traffic] = {}
    run = threading.Thread(
        target=lambda: box.setdefault(
            "traffic",
            asyncio.run(simulate(join, nodes, WARMUP_S + seconds + 1, telemetry=telemetry)),
        )
    )
    run.start()
    time.sleep(WARMUP_S)  # pairing of 200 nodes is not what is measured
    before, started = coordinator.cpu_times(), time.monotonic()
    time.sleep(seconds)
    after, wall = coordinator.cpu_times(), time.monotonic() - started
    run.join()
    traffic = box["traffic"]
    cpu = (after.user - before.user) + (after.system - before.system)
    return {
        "frames": traffic.frames,
        # one heartbeat a second per node: the frame's size is its bytes per second
        "bytes_per_node_s": traffic.bytes / traffic.frames,
        "coordinator_cpu_percent": 100 * cpu / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="herder-bench-telemetry-") as home:
        herd = LocalHerd(nodes=0, home=Path(home))
        herd.start()
        try:
            join = subprocess.run(
                [sys.executable, "-m", "herder", "token"], env=herd.env(),
                capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
            base = measure(herd, join, args.nodes, args.seconds, telemetry=False)
            tele = measure(herd, join, args.nodes, args.seconds, telemetry=True)
            stored = herd.client.telemetry("sim-0000", window_s=600) if herd.client else {}
        finally:
            herd.stop()
    results = {
        "machine": f"{platform.node()} {platform.machine()} python {platform.python_version()}",
        "nodes": args.nodes,
        "seconds": args.seconds,
        "without_telemetry": base,
        "with_telemetry": tele,
        "stored_points_of_one_node": len(stored.get("points", [])),
    }
    table = Table("heartbeats of 200 nodes", "bytes/node/s", "coordinator CPU")
    table.add_row(
        "without telemetry (baseline)",
        f"{base['bytes_per_node_s']:.0f}",
        f"{base['coordinator_cpu_percent']:.1f} %",
    )
    table.add_row(
        "with telemetry",
        f"{tele['bytes_per_node_s']:.0f}",
        f"{tele['coordinator_cpu_percent']:.1f} %",
    )
    table.add_row(
        "ratio",
        f"x{tele['bytes_per_node_s'] / base['bytes_per_node_s']:.2f}",
        f"x{tele['coordinator_cpu_percent'] / max(base['coordinator_cpu_percent'], 0.01):.2f}",
    )
    console.print(table)
    console.print(
        f"points stored for one node over the run: {results['stored_points_of_one_node']}"
    )
    (HERE / "results-telemetry.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
