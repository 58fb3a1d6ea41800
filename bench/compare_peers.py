"""The peers' side of ``bench/compare.py``: workloads A-E on Dask, Ray, Celery and a process pool.

Run by ``compare.py`` in ``bench/.venv-peers`` (none of these is a
dependency of herder), one process per system and repeat; prints one
``RESULT {json}`` line. Every system gets 2 workers x 1 slot. ``cold SYSTEM``
is the child of workload D. Celery needs ``BENCH_REDIS_URL`` and
``BENCH_REDIS_PID`` (the redis-server that compare.py started).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import psutil
from compare_common import (
    FIRST_RESULT,
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

SYSTEMS = ("pool", "dask", "dask-inf", "ray", "celery")
SATURATION_INF = {"distributed.scheduler.worker-saturation": "inf"}


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout}s")
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# concurrent.futures.ProcessPoolExecutor: no scheduler, nothing durable


def pool_run(sizes: Sizes) -> dict[str, float]:
    with ProcessPoolExecutor(2) as pool:
        out = round_trips(lambda i: pool.submit(noop, i).result(timeout=60), sizes)
        out["a_tasks_per_s"] = throughput(lambda r: list(pool.map(noop, r)), sizes.tasks)

        def run_dag() -> int:  # a pool has no dependencies: the caller waits for each group
            maps = [pool.submit(inc, i) for i in range(sizes.maps)]
            step = sizes.fan_in
            reduces = [
                pool.submit(total, *(f.result() for f in maps[i : i + step]))
                for i in range(0, len(maps), step)
            ]
            value: int = pool.submit(total, *(r.result() for r in reduces)).result()
            return value

        out["c_wall_s"] = dag(run_dag, sizes)
    return out


def pool_cold() -> None:
    with ProcessPoolExecutor(2) as pool:
        assert pool.submit(noop, 7).result(timeout=60) == 7
        print(FIRST_RESULT, flush=True)


# ---------------------------------------------------------------------------
# Dask distributed: LocalCluster, 2 worker processes x 1 thread


@contextlib.contextmanager
def dask_client(tuned: bool) -> Iterator[Any]:
    import dask
    from distributed import Client, LocalCluster

    with (
        dask.config.set(SATURATION_INF if tuned else {}),
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        yield client


def dask_run(sizes: Sizes, tuned: bool) -> dict[str, float]:
    with dask_client(tuned) as client:
        out = round_trips(lambda i: client.submit(noop, i, pure=False).result(timeout=60), sizes)
        out["a_tasks_per_s"] = throughput(
            lambda r: client.gather(client.map(noop, r, pure=False)), sizes.tasks
        )

        def run_dag() -> int:
            maps = client.map(inc, range(sizes.maps), pure=False)
            step = sizes.fan_in
            reduces = [
                client.submit(total, *maps[i : i + step], pure=False)
                for i in range(0, len(maps), step)
            ]
            value: int = client.submit(total, *reduces, pure=False).result(timeout=120)
            return value

        out["c_wall_s"] = dag(run_dag, sizes)
    out["e_rss_mb"] = dask_memory(sizes, tuned)
    return out


def dask_memory(sizes: Sizes, tuned: bool) -> float:
    """The scheduler in its own process (no workers), ``queued`` tasks submitted to it."""
    from distributed import Client

    env = child_env()
    if tuned:
        env["DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION"] = "inf"
    with tempfile.TemporaryDirectory(prefix="bench-dask-") as tmp:
        file = Path(tmp) / "scheduler.json"
        scheduler = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", "0", "--no-dashboard", "--scheduler-file", str(file)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_until(file.exists, "the dask scheduler's file")
            time.sleep(0.2)  # written, maybe not yet flushed
            with Client(scheduler_file=str(file)) as client:
                rss = PeakRSS([scheduler.pid])
                with rss.sampling():
                    futures = client.map(noop, range(sizes.queued), pure=False)
                    wait_until(
                        lambda: client.run_on_scheduler(_count_tasks) >= sizes.queued,
                        "the queued tasks reaching the scheduler",
                        timeout=300,
                    )
                    time.sleep(2.0)
                del futures
        finally:
            scheduler.terminate()
            scheduler.wait(30)
    return rss.peak_mb


def _count_tasks(dask_scheduler: Any) -> int:
    return len(dask_scheduler.tasks)


def dask_cold(tuned: bool) -> None:
    with dask_client(tuned) as client:
        assert client.submit(noop, 7).result(timeout=60) == 7
        print(FIRST_RESULT, flush=True)


# ---------------------------------------------------------------------------
# Ray: one local node with 2 CPUs (2 tasks at a time)


def ray_run(sizes: Sizes) -> dict[str, float]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        r_noop, r_inc, r_total = ray.remote(noop), ray.remote(inc), ray.remote(total)
        out = round_trips(lambda i: ray.get(r_noop.remote(i), timeout=60), sizes)
        out["a_tasks_per_s"] = throughput(
            lambda r: ray.get([r_noop.remote(i) for i in r]), sizes.tasks
        )

        def run_dag() -> int:
            maps = [r_inc.remote(i) for i in range(sizes.maps)]
            step = sizes.fan_in
            reduces = [r_total.remote(*maps[i : i + step]) for i in range(0, len(maps), step)]
            value: int = ray.get(r_total.remote(*reduces), timeout=120)
            return value

        out["c_wall_s"] = dag(run_dag, sizes)
    finally:
        ray.shutdown()
    out["e_rss_mb"] = ray_memory(sizes)
    return out


def ray_memory(sizes: Sizes) -> float:
    """No CPUs, so nothing runs: the driver (the tasks' owner, which queues them), the
    raylet and the GCS hold the queue; their summed peak RSS."""
    import ray

    ray.init(num_cpus=0, include_dashboard=False, log_to_driver=False)
    try:
        holders = [os.getpid()] + [
            p.pid
            for p in psutil.Process().children(recursive=True)
            if any(name in p.name() for name in ("raylet", "gcs_server"))
        ]
        r_noop = ray.remote(noop)
        rss = PeakRSS(holders)
        with rss.sampling():
            refs = [r_noop.remote(i) for i in range(sizes.queued)]
            time.sleep(2.0)
        del refs
    finally:
        ray.shutdown()
    if len(holders) < 3:
        raise RuntimeError(f"found {len(holders) - 1} of Ray's raylet and GCS processes, not 2")
    return rss.peak_mb


def ray_cold() -> None:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert ray.get(ray.remote(noop).remote(7), timeout=60) == 7
        print(FIRST_RESULT, flush=True)
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------
# Celery 5 with Redis: 2 workers x 1 slot (the solo pool)


@contextlib.contextmanager
def celery_workers() -> Iterator[None]:
    argv = [
        *(sys.executable, "-m", "celery", "-A", "compare_celery", "worker"),
        *("--pool", "solo", "--concurrency", "1", "--loglevel", "WARNING"),
        *("--without-gossip", "--without-mingle"),
    ]
    workers = [
        subprocess.Popen(
            [*argv, "-n", f"bench{i}@%h"],
            env=child_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(2)
    ]
    try:
        yield
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def celery_run(sizes: Sizes) -> dict[str, float]:
    from celery import chord, group
    from compare_celery import app, sum_list
    from compare_celery import inc as c_inc
    from compare_celery import noop as c_noop

    out = {"e_rss_mb": celery_memory(sizes)}  # first: no workers may be running
    with celery_workers():
        wait_until(lambda: len(app.control.ping(timeout=0.5)) >= 2, "2 celery workers")
        out |= round_trips(lambda i: c_noop.delay(i).get(timeout=60), sizes)
        out["a_tasks_per_s"] = throughput(
            lambda r: group(c_noop.s(i) for i in r).apply_async().get(timeout=600),
            sizes.tasks,
        )

        def run_dag() -> int:
            step = sizes.fan_in
            reduces = [
                chord([c_inc.s(j) for j in range(i, i + step)], sum_list.s())
                for i in range(0, sizes.maps, step)
            ]
            value: int = chord(reduces, sum_list.s()).apply_async().get(timeout=300)
            return value

        out["c_wall_s"] = dag(run_dag, sizes)
    return out


def celery_memory(sizes: Sizes) -> float:
    """No workers: ``queued`` messages wait in Redis; redis-server's peak RSS. Purged after."""
    from celery import group
    from compare_celery import app
    from compare_celery import noop as c_noop

    rss = PeakRSS([int(os.environ["BENCH_REDIS_PID"])])
    with rss.sampling():
        group(c_noop.s(i) for i in range(sizes.queued)).apply_async()
        with app.connection_for_write() as conn:
            waiting = conn.default_channel.client.llen("celery")
        time.sleep(2.0)
    app.control.purge()
    if waiting != sizes.queued:
        raise RuntimeError(f"{waiting} messages waited in Redis, not {sizes.queued}")
    return rss.peak_mb


def celery_cold() -> None:
    from compare_celery import noop as c_noop

    with celery_workers():
        assert c_noop.delay(7).get(timeout=60) == 7
        print(FIRST_RESULT, flush=True)


# ---------------------------------------------------------------------------


def run(system: str, sizes: Sizes) -> dict[str, float]:
    if system == "pool":
        out = pool_run(sizes)
    elif system in ("dask", "dask-inf"):
        out = dask_run(sizes, tuned=system == "dask-inf")
    elif system == "ray":
        out = ray_run(sizes)
    else:
        out = celery_run(sizes)
    say(system, "D")
    out["d_cold_s"] = cold_start([sys.executable, __file__, "cold", system])
    return out


def cold(system: str) -> None:
    if system == "pool":
        pool_cold()
    elif system in ("dask", "dask-inf"):
        dask_cold(tuned=system == "dask-inf")
    elif system == "ray":
        ray_cold()
    else:
        celery_cold()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["run", "cold"])
    parser.add_argument("system", choices=SYSTEMS)
    parser.add_argument("--sizes", default=Sizes().to_json())
    args = parser.parse_args()
    if args.what == "cold":
        cold(args.system)
    else:
        say(args.system, "workloads")
        emit(run(args.system, Sizes.from_json(args.sizes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
