"""herder's side of ``bench/compare.py``: workloads A-G on 2 local agents x 1 slot.

Run by ``compare.py`` in herder's venv, one process per repeat; prints one
``RESULT {json}`` line. The child of workload D (a fresh process: start a
herd, first result, stop) is ``compare_herder_cold.py``. Progress goes to
stderr, the coordinators' logs to ``--log``.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import cloudpickle
import psutil
from compare_common import (
    HERE,
    PeakRSS,
    Sizes,
    child_env,
    cold_start,
    dag,
    emit,
    inc,
    noop,
    round_trips,
    say,
    throughput,
    total,
)

from herder.client import DEFAULT_RETRIES, MAP_BATCH, AsyncClient, Client
from herder.local import LocalHerd
from herder.model import TaskSpec, new_id

# What ``client.map`` sends per frame and commit: E and F queue the way the
# batch API does, as the peers' E uses theirs (``client.map``, a ``group``).
# (Until 2026-12-07 this was 10,000: each frame's decoded specs then added
# about 20 MB to the coordinator's peak.)
SUBMIT_BATCH = MAP_BATCH


@contextlib.contextmanager
def herd_of(nodes: int, log: IO[Any]) -> Iterator[tuple[LocalHerd, Client]]:
    """A started LocalHerd with ``nodes`` agents paired and ready."""
    herd = LocalHerd(nodes=nodes, slots=1, log=log)
    try:
        client = herd.start()
        if nodes:
            herd.wait_nodes(nodes, timeout=60)
        yield herd, client
    finally:
        herd.stop()


def abc(sizes: Sizes, log: IO[Any]) -> dict[str, float]:
    """Workloads B, A and C on one herd (B first: its warmup warms the agents)."""
    with herd_of(2, log) as (_, client):
        out = round_trips(lambda i: client.submit(noop, i).result(timeout=60), sizes)
        out["a_tasks_per_s"] = throughput(lambda r: client.map(noop, r), sizes.tasks)
        out["c_wall_s"] = dag(lambda: client._run(_dag(client.aio, sizes)), sizes)
    return out


async def _dag(aio: AsyncClient, sizes: Sizes) -> int:
    """All of C's tasks submitted in one loop turn (one Submit frame); the final's value."""
    maps = [aio.submit(inc, i) for i in range(sizes.maps)]
    step = sizes.fan_in
    reduces = [aio.submit(total, *maps[i : i + step]) for i in range(0, len(maps), step)]
    value: int = await aio.submit(total, *reduces)
    return value


def specs(count: int, priority: int = 0) -> list[TaskSpec]:
    """``count`` prepared no-op tasks (one payload pickled once)."""
    payload = cloudpickle.dumps((noop, (0,), {}))
    return [
        TaskSpec(
            id=new_id("t"),
            kind="call",
            name="noop",
            payload=payload,
            priority=priority,
            max_attempts=DEFAULT_RETRIES + 1,
        )
        for _ in range(count)
    ]


def queue(client: Client, count: int, priority: int = 0) -> str:
    """Submit ``count`` no-ops as one job, committed batch by batch; the job id.

    Their futures are dropped (nobody waits for them): the client releases them
    and the coordinator stops watching those tasks, so that a million weigh on
    neither process.
    """
    job_id = new_id("j")
    for start in range(0, count, SUBMIT_BATCH):
        batch = specs(min(SUBMIT_BATCH, count - start), priority)
        client._run(client.aio.submit_batch(job_id, "backlog", batch))
    return job_id


def memory(sizes: Sizes, log: IO[Any]) -> dict[str, float]:
    """Workload E: the coordinator's peak RSS, ``sizes.queued`` tasks queued and no agents."""
    with herd_of(0, log) as (herd, client):
        assert herd.process is not None
        rss = PeakRSS([herd.process.pid])
        with rss.sampling():
            job_id = queue(client, sizes.queued)
            time.sleep(2.0)  # let it settle; keep sampling
        queued = client.job(job_id).get("total")
    if queued != sizes.queued:
        raise RuntimeError(f"the queued job reports {queued} tasks, not {sizes.queued}")
    return {"e_rss_mb": rss.peak_mb}


def depth(sizes: Sizes, log: IO[Any]) -> dict[str, float]:
    """Workload F: the dispatch rate of ``probe`` tasks with 1,000 .. 1,000,000 queued behind.

    The agents are paused while the backlog (priority 0) and the probe
    (priority 1) are committed; the clock runs from resuming them to the
    probe's last result, so the backlog stays queued while it is measured.
    """
    out = {}
    for queued in sizes.depths:
        with herd_of(2, log) as (_, client):
            nodes = [n["id"] for n in client.nodes()]
            for node in nodes:
                client.set_available(node, False)
            queue(client, queued)
            probe = client._run(
                client.aio.submit_batch(new_id("j"), "probe", specs(sizes.probe, 1))
            )
            t0 = time.perf_counter()
            for node in nodes:
                client.set_available(node, True)
            client._run(_all(probe))
            out[f"f_tasks_per_s_{queued}"] = sizes.probe / (time.perf_counter() - t0)
        say("herder", f"F with {queued:,} queued: {out[f'f_tasks_per_s_{queued}']:,.0f} tasks/s")
    return out


async def _all(futs: list[Any]) -> None:
    for fut in futs:
        await fut


def many_nodes(sizes: Sizes, log: IO[Any]) -> dict[str, float]:
    """Workload G: ``agents`` simulated nodes (bench/simnodes.py, one process) paired and
    heartbeating beside the 2 real agents: coordinator CPU while idle, then a map's rate."""
    with herd_of(2, log) as (herd, client):
        assert herd.process is not None
        join = subprocess.run(
            [sys.executable, "-m", "herder", "token"], env=herd.env(),
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        seconds = 300 + sizes.idle_s  # outlives the measuring; killed after it
        sim = subprocess.Popen(
            [sys.executable, "-c", _SIM, join, str(sizes.agents), str(seconds)],
            env=child_env(),
            stdout=subprocess.DEVNULL,
        )
        try:
            herd.wait_nodes(2 + sizes.agents, timeout=120)
            for node in client.nodes():  # they run nothing: paused, they are offered nothing
                if node["id"].startswith("sim-"):
                    client.set_available(node["id"], False)
            time.sleep(2.0)  # pairing is not what is measured
            coordinator = psutil.Process(herd.process.pid)
            before, started = coordinator.cpu_times(), time.monotonic()
            time.sleep(sizes.idle_s)
            after, wall = coordinator.cpu_times(), time.monotonic() - started
            cpu = (after.user - before.user) + (after.system - before.system)
            paired = sum(1 for n in client.nodes() if n["state"] in ("ready", "busy"))
            rate = throughput(lambda r: client.map(noop, r), sizes.probe)
        finally:
            sim.kill()
            sim.wait()
    if paired < 2 + sizes.agents:
        raise RuntimeError(f"only {paired} nodes stayed paired through the idle window")
    return {"g_cpu_percent": 100 * cpu / wall, "g_tasks_per_s": rate}


_SIM = """
import asyncio, sys
from simnodes import simulate
asyncio.run(simulate(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), telemetry=False))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["run"])
    parser.add_argument("--sizes", default=Sizes().to_json())
    parser.add_argument("--log", type=Path, default=HERE / "artifacts" / "herder.log")
    parser.add_argument(
        "--only",
        default="ABCDEFG",
        help="the workloads to run, e.g. E (A, B and C run together); all by default",
    )
    args = parser.parse_args()
    sizes = Sizes.from_json(args.sizes)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    only = set(args.only.upper())
    out: dict[str, float] = {}
    with args.log.open("a") as log:
        if only & set("ABC"):
            say("herder", "B, A, C")
            out |= abc(sizes, log)
        if "D" in only:
            say("herder", "D")
            out["d_cold_s"] = cold_start([sys.executable, str(HERE / "compare_herder_cold.py")])
        if "E" in only:
            say("herder", "E")
            out |= memory(sizes, log)
        if "F" in only:
            say("herder", "F")
            out |= depth(sizes, log)
        if "G" in only:
            say("herder", "G")
            out |= many_nodes(sizes, log)
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
