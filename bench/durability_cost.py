"""What durability costs workload B: round trips with the store on disk against the
same on tmpfs (``/dev/shm``, where fsync returns at once), in alternating runs.

Each run is a fresh herd of 2 agents x 1 slot in a process of its own, 50
unmeasured round trips, then ``--round-trips`` measured; the herder home (and
so the SQLite file) is made under ``TMPDIR``. Prints the p50 of each run and
the medians, and writes ``bench/results-durability-cost.json``.
Run: ``.venv/bin/python bench/durability_cost.py [--pairs 3] [--round-trips 500]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
PLACES = {"disk": "/tmp", "tmpfs": "/dev/shm"}

ONE_RUN = """
import operator, sys, time
from herder.local import LocalHerd
n = int(sys.argv[1])
herd = LocalHerd(nodes=2, slots=1)
client = herd.start()
try:
    herd.wait_nodes(2, timeout=60)
    for i in range(50):
        client.submit(operator.pos, i).result(timeout=60)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        client.submit(operator.pos, i).result(timeout=60)
        times.append((time.perf_counter() - t0) * 1000)
finally:
    herd.stop()
times.sort()
print(times[len(times) // 2])
"""


def p50_ms(place: str, round_trips: int) -> float:
    """B's p50 in a fresh process whose herder home is under ``place``."""
    env = {**os.environ, "TMPDIR": place}
    done = subprocess.run(
        [sys.executable, "-c", ONE_RUN, str(round_trips)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--round-trips", type=int, default=500)
    args = parser.parse_args()
    runs: dict[str, list[float]] = {name: [] for name in PLACES}
    for pair in range(args.pairs):
        order = list(PLACES) if pair % 2 == 0 else list(reversed(PLACES))
        for name in order:
            runs[name].append(p50_ms(PLACES[name], args.round_trips))
            print(f"pair {pair + 1}: {name:5} p50 {runs[name][-1]:.2f} ms", flush=True)
    medians = {name: statistics.median(values) for name, values in runs.items()}
    result = {
        "round_trips": args.round_trips,
        "runs_p50_ms": runs,
        "median_p50_ms": medians,
        "tmpfs/disk": medians["tmpfs"] / medians["disk"],
    }
    path = HERE / "results-durability-cost.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"medians: disk {medians['disk']:.2f} ms, tmpfs {medians['tmpfs']:.2f} ms")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
