"""The herder demo: a real herd on this machine doing real work.

A coordinator and 4 local agents (SQLite store, TLS, paired agents), then
one job: 200 map tasks feeding 10 reduce tasks feeding one final task, plus
a few command tasks; a live progress bar, the result, a summary and a clean
shutdown. Run it with ``make demo``.
"""

from __future__ import annotations

import collections
import math
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from herder.local import LocalHerd

console = Console()


def square_root_sum(n: int) -> float:
    """A map task: a little real arithmetic."""
    return sum(math.sqrt(i) for i in range(n * 100, n * 100 + 1000))


def add_up(*parts: float) -> float:
    """A reduce task: its arguments are the results of the tasks it depends on."""
    return sum(parts)


def main() -> int:
    started = time.perf_counter()
    console.print("[bold]herder demo[/bold]: starting a coordinator and 4 local agents")
    with LocalHerd(nodes=4) as herd:
        herd_ready = time.perf_counter()
        maps = [herd.submit(square_root_sum, i, name=f"map-{i}") for i in range(200)]
        reduces = [
            herd.submit(add_up, *maps[k * 20 : (k + 1) * 20], name=f"reduce-{k}") for k in range(10)
        ]
        final = herd.submit(add_up, *reduces, name="final")
        commands = [
            herd.command(
                ["sh", "-c", f"echo chunk {k} from $(hostname); sleep 0.2"], name=f"cmd-{k}"
            )
            for k in range(4)
        ]
        everything = [*maps, *reduces, final, *commands]
        with Progress(
            TextColumn("[bold]tasks"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            bar = progress.add_task("tasks", total=len(everything))
            while True:
                done = sum(f.done() for f in everything)
                progress.update(bar, completed=done)
                if done == len(everything):
                    break
                time.sleep(0.05)
        result = final.result()
        expected = sum(square_root_sum(i) for i in range(200))
        console.print(
            f"final result: [bold]{result:,.3f}[/bold] (checked locally: {expected:,.3f})"
        )
        for cmd in commands:
            console.print(f"  command says: {cmd.result()['stdout_tail'].strip()}", highlight=False)
        per_node = collections.Counter(
            t["node_id"] for t in herd.tasks(job=final.job_id, limit=10_000)
        )
        elapsed = time.perf_counter() - herd_ready
        console.print(
            f"{len(everything)} tasks in {elapsed:.2f}s = {len(everything) / elapsed:.0f} tasks/s; "
            "tasks per node: " + ", ".join(f"{node}: {n}" for node, n in sorted(per_node.items())),
            highlight=False,
        )
        if not math.isclose(result, expected, rel_tol=1e-9):
            console.print("[red]the result is wrong[/red]")
            return 1
        console.print("shutting down (drain, stop agents, close the store)")
    console.print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
