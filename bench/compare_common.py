"""What every system's workload runner shares: the tasks, the sizes and the measuring.

Imported by ``compare_herder.py`` (herder's venv) and ``compare_peers.py``
(``bench/.venv-peers``), and by the workers of every system (they unpickle
the task functions by reference), so it needs nothing but the standard
library and psutil.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "RESULT "  # the one stdout line a runner's parent reads
FIRST_RESULT = "FIRST-RESULT"  # what a cold-start child prints the moment it has one


def noop(x: int = 0) -> int:
    """The task: nothing but the dispatch."""
    return x


def inc(x: int) -> int:
    """A map task of workload C."""
    return x + 1


def total(*values: int) -> int:
    """A reduce task of workload C (and the final one)."""
    return sum(values)


@dataclass(frozen=True)
class Sizes:
    """How big each workload is; ``quick`` ones are for development only."""

    tasks: int = 10_000  # A
    round_trips: int = 500  # B
    warmup: int = 50  # B
    maps: int = 1000  # C
    fan_in: int = 10  # C: inputs per reduce
    queued: int = 100_000  # E
    depths: tuple[int, ...] = (1000, 100_000, 1_000_000)  # F
    probe: int = 5000  # F, G: tasks whose dispatch rate is measured
    agents: int = 200  # G
    idle_s: float = 10.0  # G: the window over which coordinator CPU is measured

    @classmethod
    def pick(cls, quick: bool) -> Sizes:
        if not quick:
            return cls()
        return cls(2000, 200, 20, 1000, 10, 20_000, (1000, 10_000, 100_000), 2000, 200, 5.0)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Sizes:
        raw = json.loads(text)
        raw["depths"] = tuple(raw["depths"])
        return cls(**raw)

    @property
    def dag_expected(self) -> int:
        """The final task's value: sum of inc(i) over the maps."""
        return sum(i + 1 for i in range(self.maps))


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def round_trips(call: Callable[[int], Any], sizes: Sizes) -> dict[str, float]:
    """Workload B: p50 and p99 (ms) of ``call(i)`` done one after the other, after a warmup."""
    for i in range(sizes.warmup):
        call(i)
    times = []
    for i in range(sizes.round_trips):
        t0 = time.perf_counter()
        if call(i) != i:
            raise RuntimeError(f"round trip {i} returned a wrong value")
        times.append((time.perf_counter() - t0) * 1000)
    return {"b_p50_ms": percentile(times, 50), "b_p99_ms": percentile(times, 99)}


def throughput(run_batch: Callable[[range], Sequence[Any]], n: int) -> float:
    """Workload A: tasks/s of one batch of ``n`` no-ops, checked."""
    t0 = time.perf_counter()
    results = run_batch(range(n))
    elapsed = time.perf_counter() - t0
    if list(results) != list(range(n)):
        raise RuntimeError("the batch returned wrong results")
    return n / elapsed


def dag(run: Callable[[], int], sizes: Sizes) -> float:
    """Workload C: wall seconds of ``run()`` (the whole DAG), checked."""
    t0 = time.perf_counter()
    value = run()
    elapsed = time.perf_counter() - t0
    if value != sizes.dag_expected:
        raise RuntimeError(f"the DAG returned {value}, not {sizes.dag_expected}")
    return elapsed


def cold_start(argv: list[str], timeout: float = 120.0) -> float:
    """Workload D: seconds from spawning ``argv`` to its printing FIRST_RESULT.

    The child then shuts its cluster down (not measured) and must exit 0.
    """
    t0 = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=child_env())
    assert child.stdout is not None
    elapsed = None
    timer = threading.Timer(timeout, child.kill)
    timer.start()
    try:
        for line in child.stdout:
            if line.strip() == FIRST_RESULT and elapsed is None:
                elapsed = time.perf_counter() - t0
        code = child.wait()
    finally:
        timer.cancel()
    if elapsed is None or code != 0:
        raise RuntimeError(f"cold start {argv[2:]} exited {code} without a first result")
    return elapsed


def child_env() -> dict[str, str]:
    """The environment of workers and children: this directory importable (tasks by reference)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p)
    return env


class PeakRSS:
    """Sample the summed RSS of some processes every 50 ms; the peak in MB."""

    def __init__(self, pids: Sequence[int]) -> None:
        self._procs = [psutil.Process(pid) for pid in pids]
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        rss = 0
        for proc in self._procs:
            with contextlib.suppress(psutil.Error):
                rss += proc.memory_info().rss
        self._peak = max(self._peak, rss)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    @contextlib.contextmanager
    def sampling(self) -> Iterator[PeakRSS]:
        self._sample()
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self._sample()

    @property
    def peak_mb(self) -> float:
        return self._peak / 2**20


def emit(result: dict[str, Any]) -> None:
    """Hand the figures to the parent (``compare.py``) on one line."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def say(system: str, text: str) -> None:
    """Progress on stderr (stdout carries the result)."""
    print(f"{time.strftime('%H:%M:%S')} [{system}] {text}", file=sys.stderr, flush=True)
