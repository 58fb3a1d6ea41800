"""SSH spawn benchmark: seconds from ``SSH.spawn`` to the agent paired and ready.

Makes a network namespace running a real sshd (``tests/netns.py``; needs
root) to stand for a host, starts a coordinator listening on 0.0.0.0 and times, one spawn
at a time, from calling ``spawn`` to the node being ``ready`` in the
coordinator:

* **fresh**: each spawn into a new ``dir`` on the host, so it copies the
  wheels (herder and every dependency: ``install="offline"``) over SFTP,
  makes the venv and installs; ``--fresh`` spawns (default 5);
* **cached**: the host's venv already holds this build, so the spawn is a
  probe, a launch, and the agent's own start; ``--spawns`` spawns (default 20).

Each agent is terminated before the next spawn; that is not timed. Packing
the wheels on the coordinator (once per build, then cached) is timed apart.
Prints a table and writes ``bench/results-ssh.json``.
Run: ``.venv/bin/python bench/ssh_spawn.py [--spawns 20] [--fresh 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # for tests.netns

import herder  # noqa: E402
from herder.client import AsyncClient  # noqa: E402
from herder.local import LocalHerd  # noqa: E402
from herder.providers import bootstrap  # noqa: E402
from herder.providers.base import LaunchSpec  # noqa: E402
from herder.providers.ssh import SSH, SSHHost  # noqa: E402
from tests.helpers import herder as herder_cli  # noqa: E402
from tests.netns import SSHServer, host_namespaces, make_key, sshd  # noqa: E402

CLUSTER = "bench-ssh"
PAIR_TIMEOUT_S = 120.0
console = Console(width=None if sys.stdout.isatty() else 110)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1), linear between the closest ranks."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def wait_ready(client: AsyncClient, node_id: str) -> None:
    deadline = time.monotonic() + PAIR_TIMEOUT_S
    while time.monotonic() < deadline:
        for node in await client.nodes():
            if node["id"] == node_id and node["state"] in ("ready", "busy"):
                return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"{node_id} did not pair within {PAIR_TIMEOUT_S}s")


async def one_spawn(
    client: AsyncClient, provider: SSH, node_id: str, launch: LaunchSpec
) -> dict[str, float]:
    """Spawn one node and wait for it; then stop it (not timed)."""
    began = time.monotonic()
    result = await provider.spawn([node_id], launch)
    if not result.started:
        raise RuntimeError(f"spawn failed: {result.failed}")
    returned = time.monotonic() - began
    await wait_ready(client, node_id)
    paired = time.monotonic() - began
    await provider.terminate(node_id, grace=10)
    return {"spawn_returned_s": returned, "paired_s": paired}


def make_provider(server: SSHServer, directory: Path, home: Path) -> SSH:
    host = SSHHost(
        host=server.address,
        key=server.client_key,
        dir=str(directory),
        known_hosts=server.known_hosts,
    )
    provider = SSH([host], per_host=1, install="offline")
    provider.attach(cluster=CLUSTER, home=home)
    return provider


async def measure(
    herd: LocalHerd, server: SSHServer, join: str, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    launch = LaunchSpec(join=join, cluster=CLUSTER, orphan_after_s=60)
    began = time.monotonic()
    await asyncio.to_thread(bootstrap.bundle, herd.home / "wheels", offline=True)
    pack_s = time.monotonic() - began
    client = await AsyncClient.open(env=herd.env())
    runs: dict[str, list[dict[str, float]]] = {"fresh": [], "cached": []}
    try:
        for i in range(args.fresh):
            provider = make_provider(server, work / f"fresh{i}", herd.home)
            try:
                runs["fresh"].append(await one_spawn(client, provider, f"fresh-{i}", launch))
            finally:
                await provider.close()
            console.print(f"fresh {i + 1}/{args.fresh}: {runs['fresh'][-1]}", highlight=False)
        provider = make_provider(server, work / "cached", herd.home)
        try:
            await one_spawn(client, provider, "warm", launch)  # installs: not counted
            for i in range(args.spawns):
                runs["cached"].append(await one_spawn(client, provider, f"cached-{i}", launch))
        finally:
            await provider.close()
    finally:
        await client.close()
    return {"pack_s": pack_s, "runs": runs}


def summarize(runs: list[dict[str, float]]) -> dict[str, float]:
    paired = [r["paired_s"] for r in runs]
    returned = [r["spawn_returned_s"] for r in runs]
    return {
        "n": len(runs),
        "p50_s": statistics.median(paired),
        "p90_s": percentile(paired, 0.9),
        "max_s": max(paired),
        "spawn_returned_p50_s": statistics.median(returned),
    }


def report(summary: dict[str, dict[str, float]], pack_s: float) -> None:
    table = Table("spawns", "n", "p50 s", "p90 s", "max s", "spawn() returned, p50 s")
    for kind, s in summary.items():
        table.add_row(
            kind,
            str(int(s["n"])),
            f"{s['p50_s']:.2f}",
            f"{s['p90_s']:.2f}",
            f"{s['max_s']:.2f}",
            f"{s['spawn_returned_p50_s']:.2f}",
        )
    console.print(table)
    console.print(f"packing the wheels once (herder + dependencies): {pack_s:.1f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spawns", type=int, default=20, help="cached spawns to time")
    parser.add_argument("--fresh", type=int, default=5, help="fresh-install spawns to time")
    parser.add_argument("--out", type=Path, default=HERE / "results-ssh.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="herder-bench-ssh-"))
    key = make_key(work / "client_key")
    with host_namespaces(1) as hosts, sshd(hosts[0], work / "sshd", client_key=key) as server:
        herd = LocalHerd(nodes=0, home=work / "herd", listen="0.0.0.0:0")
        herd.start()
        try:
            url = f"https://{hosts[0].gateway}:{urlsplit(herd.url).port}"
            join = herder_cli(herd.env(), "token", "--url", url).stdout.strip()
            measured = asyncio.run(measure(herd, server, join, work, args))
        finally:
            herd.stop()
    summary = {kind: summarize(runs) for kind, runs in measured["runs"].items() if runs}
    report(summary, measured["pack_s"])
    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "herder": herder.__version__,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
        "install": "offline",
        "pack_s": measured["pack_s"],
        "summary": summary,
        "runs": measured["runs"],
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
