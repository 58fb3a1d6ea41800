"""Releases benchmark: build, first install and reuse, roll-out across 4 nodes.

1. Build: seconds to build a release of a 1,000-file project (``herder.bundle.build``:
   walk with .gitignore, hash, deterministic tar.gz), against ``tar -czf`` of the
   same tree in the same run (the baseline: packing with no hashing or rules).
2. Install on a node: submit→result of the first task naming a new release (cold:
   fetch, unpack, make the environment, install one dependency from a wheelhouse,
   start a worker in it) and of the next one (warm: the slot's worker is already in
   it), against a task naming no release on the same node (the baseline round trip).
   Also ``release_ready`` seconds (the install alone) as the node reported it.
3. Roll-out: from ``herder release roll`` until all of 4 nodes report the release
   installed: (a) ``--local 4``, whose agents share one cache (one install, three
   reuses), and (b) 4 agents with a cache each (four installs at once on 2 cores).

Each figure is the median of ``--runs``. Prints a table and writes
``bench/results-releases.json``. Run: ``.venv/bin/python bench/releases.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from herder.bundle import Source, build
from herder.client import Client
from herder.local import LocalHerd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.wheels import make_versioned_package

HERE = Path(__file__).parent
console = Console()


def make_project(root: Path, files: int) -> Path:
    """``files`` Python modules of about 2 KB in packages of 50, plus ignored junk."""
    for i in range(files):
        pkg = root / f"pkg{i // 50:02d}"
        pkg.mkdir(parents=True, exist_ok=True)
        body = "".join(f"def f{j}(x):\n    return x * {i} + {j}\n\n" for j in range(50))
        (pkg / f"mod{i:04d}.py").write_text(f'"""module {i}"""\n\n{body}')
    (root / ".gitignore").write_text("__pycache__/\n*.log\n")
    (root / "build.log").write_text("x" * 100_000)
    return root


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_build(tmp: Path, runs: int) -> dict[str, Any]:
    project = make_project(tmp / "big", 1000)
    out = tmp / "out"
    out.mkdir()
    ours = [timed(lambda: build(Source(path=project), out)) for _ in range(runs)]
    tar_argv = ["tar", "-czf", str(tmp / "b.tgz"), "-C", str(project), "."]
    tar = [timed(lambda: subprocess.run(tar_argv, check=True)) for _ in range(runs)]
    return {"release_build_s": statistics.median(ours), "tar_czf_s": statistics.median(tar)}


def small_project(root: Path, version: str) -> Path:
    pkg = root / "benchpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        f"VERSION = {version!r}\n\n\ndef version():\n    import herderdep\n\n"
        "    return VERSION, herderdep.VERSION\n"
    )
    return root


def noop() -> int:
    return 1


def release_of(client: Client, project: Path, wheelhouse: Path) -> str:
    return client.release(
        project, requirements=["herderdep==1.0"], find_links=[str(wheelhouse)], no_index=True
    )


def ready_seconds(client: Client, release_id: str) -> list[float]:
    events, after = [], 0
    while page := client.event_log(after=after, limit=1000):
        events += [
            e["data"]["seconds"]
            for e in page
            if e["action"] == "release_ready"
            and e["data"]["release"] == release_id
            and not e["data"]["cached"]
        ]
        after = page[-1]["id"]
    return events


def bench_install(tmp: Path, runs: int, wheelhouse: Path) -> dict[str, Any]:
    cold, warm, base, install = [], [], [], []
    with LocalHerd(nodes=1, home=tmp / "install-home") as client:
        client.submit(noop).result(timeout=60)
        for run in range(runs):
            project = small_project(tmp / f"install-{run}", f"v{run}")
            sys.path.insert(0, str(project))
            import benchpkg  # type: ignore[import-not-found]

            rid = release_of(client, project, wheelhouse)

            def in_release(rid: str = rid) -> Any:
                return client.submit(benchpkg.version, release=rid).result(60)

            cold.append(timed(in_release))
            warm.append(timed(in_release))
            client.submit(noop).result(60)  # the slot leaves the release: baseline is fair
            base.append(timed(lambda: client.submit(noop).result(60)))
            install += ready_seconds(client, rid)
            sys.path.remove(str(project))
            sys.modules.pop("benchpkg", None)
    return {
        "cold_first_task_s": statistics.median(cold),
        "warm_task_s": statistics.median(warm),
        "no_release_task_s": statistics.median(base),
        "install_s": statistics.median(install),
    }


def wait_all_installed(client: Client, release_id: str, nodes: int, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        status = client.release_status()["nodes"]
        if len(status) >= nodes and all(release_id in n["installed"] for n in status):
            return
        time.sleep(0.02)
    raise TimeoutError(f"{release_id} not on {nodes} nodes within {limit_s}s")


def bench_rollout_shared(tmp: Path, runs: int, wheelhouse: Path) -> float:
    times = []
    herd = LocalHerd(nodes=4, home=tmp / "roll-home")
    with herd as client:
        herd.wait_nodes(4, timeout=60)
        for run in range(runs):
            rid = release_of(client, small_project(tmp / f"roll-{run}", f"r{run}"), wheelhouse)
            started = time.perf_counter()
            client.roll(rid)
            wait_all_installed(client, rid, 4, 120)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_rollout_separate(tmp: Path, runs: int, wheelhouse: Path) -> float:
    herd = LocalHerd(nodes=0, home=tmp / "sep-home")
    client = herd.start()
    env = {**herd.env(), "HERDER_JOIN": client_token(herd)}
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "herder", "agent", "--node-id", f"sep-{i}",
             "--release-dir", str(tmp / f"sep-cache-{i}")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for i in range(4)
    ]  # fmt: skip
    times = []
    try:
        herd.wait_nodes(4, timeout=60)
        for run in range(runs):
            rid = release_of(client, small_project(tmp / f"sep-{run}", f"s{run}"), wheelhouse)
            started = time.perf_counter()
            client.roll(rid)
            wait_all_installed(client, rid, 4, 120)
            times.append(time.perf_counter() - started)
    finally:
        for agent in agents:
            agent.terminate()
        for agent in agents:
            agent.wait(30)
        herd.stop()
    return statistics.median(times)


def client_token(herd: LocalHerd) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "herder", "token"],
        env=herd.env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="herder-bench-releases-") as name:
        tmp = Path(name)
        wheelhouse = tmp / "wheelhouse"
        make_versioned_package(wheelhouse, "herderdep", "1.0")
        results: dict[str, Any] = {
            "machine": f"{platform.node()} {platform.machine()} python {platform.python_version()}",
            "runs": args.runs,
            **bench_build(tmp, args.runs),
            **bench_install(tmp, args.runs, wheelhouse),
            "rollout_4_local_shared_cache_s": bench_rollout_shared(tmp, args.runs, wheelhouse),
            "rollout_4_agents_own_cache_s": bench_rollout_separate(tmp, args.runs, wheelhouse),
        }
    table = Table("figure", "median", "baseline in the same run")
    table.add_row(
        "build a 1,000-file release",
        f"{results['release_build_s']:.3f} s",
        f"tar -czf: {results['tar_czf_s']:.3f} s "
        f"(x{results['release_build_s'] / results['tar_czf_s']:.2f})",
    )
    table.add_row(
        "first task in a new release (cold)",
        f"{results['cold_first_task_s']:.3f} s",
        f"no-release task: {results['no_release_task_s'] * 1000:.1f} ms",
    )
    table.add_row("  of which the install (release_ready)", f"{results['install_s']:.3f} s", "")
    table.add_row(
        "next task in it (warm)",
        f"{results['warm_task_s'] * 1000:.1f} ms",
        f"x{results['warm_task_s'] / results['no_release_task_s']:.2f} the no-release task",
    )
    table.add_row(
        "roll-out, 4 local nodes (shared cache)",
        f"{results['rollout_4_local_shared_cache_s']:.3f} s",
        "",
    )
    table.add_row(
        "roll-out, 4 agents (own caches)",
        f"{results['rollout_4_agents_own_cache_s']:.3f} s",
        "",
    )
    console.print(table)
    (HERE / "results-releases.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
