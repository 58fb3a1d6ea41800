"""Looking at the herd from the command line: executors, usage, logs, ``top``, reports.

The same queries as the Python client and the REST API. A failure prints
one line to stderr and exits 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from herder.cli_release import HomeOpt, JsonOpt, connected
from herder.terminal import new_table, stdout_console

if TYPE_CHECKING:
    pass

T = TypeVar("T")

REPORT_TASKS = 20_000  # finished tasks a report reads (the slowest and the failures among them)


def _print_json(data: Any) -> None:
    import json

    typer.echo(json.dumps(data, indent=2))


def register_query_commands(app: typer.Typer) -> None:
    """Add ``executors``, ``usage``, ``logs``, ``top`` and ``report`` to ``app``."""
    app.command()(executors)
    app.command()(usage)
    app.command()(logs)
    app.command()(top)
    app.command()(report)


def executors(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Nodes alive: state, slots used/free, CPU and memory now, what runs there."""
    with connected(home) as herd:
        rows = herd.executors()
    if as_json:
        _print_json(rows)
        return
    table = new_table("node", "state", "slots", "cpu", "mem", "running", "labels")
    for n in rows:
        t = n["telemetry"] or {}
        table.add_row(
            n["id"],
            n["state"],
            f"{n['used']}/{n['slots']}",
            f"{t['cpu_percent']:.0f}%" if "cpu_percent" in t else "-",
            f"{t['memory_percent']:.0f}%" if "memory_percent" in t else "-",
            ", ".join(r["name"] or r["task_id"] for r in n["running"][:3])
            + (f" +{len(n['running']) - 3}" if len(n["running"]) > 3 else ""),
            ",".join(f"{k}={v}" for k, v in n["labels"].items()),
        )
    stdout_console().print(table)


def usage(
    window: Annotated[float, typer.Option(help="Seconds to average over.")] = 60.0,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Resource use per node and in total: now, average and peak over the window."""
    with connected(home) as herd:
        data = herd.resource_usage(window)
    if as_json:
        _print_json(data)
        return
    table = new_table("node", "cpu now", "cpu avg", "cpu max", "mem now", "net in/out now")
    rows = [*data["nodes"].items(), ("total", data["total"])]
    for node, u in rows:
        now, avg, peak = u.get("now", {}), u.get("avg", {}), u.get("max", {})
        table.add_row(
            node,
            _pct(now.get("cpu_percent")),
            _pct(avg.get("cpu_percent")),
            _pct(peak.get("cpu_percent")) if node != "total" else "",
            _pct(now.get("memory_percent")),
            f"{_rate(now.get('net_recv_bps'))} / {_rate(now.get('net_sent_bps'))}",
        )
    stdout_console().print(table)


def logs(
    task: Annotated[str, typer.Argument(help="Task id.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until done.")
    ] = False,
    stderr: Annotated[bool, typer.Option("--stderr", help="The task's stderr.")] = False,
    attempt: Annotated[int | None, typer.Option(help="An earlier attempt's output.")] = None,
    home: HomeOpt = None,
) -> None:
    """A task's output: live while it runs, kept in the datastore after it ends."""
    stream = "stderr" if stderr else "stdout"
    with connected(home) as herd:
        if follow:
            for chunk in herd.follow_logs(task, stream):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        else:
            sys.stdout.write(herd.logs(task, stream, attempt))


def top(
    home: HomeOpt = None,
    refresh: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
) -> None:
    """A live terminal view of the herd (q quits; keys are shown at the bottom)."""
    from herder.tui import run_top

    with connected(home) as herd:
        run_top(herd, refresh_s=refresh)


def report(
    job: Annotated[str, typer.Argument(help="Job id.")],
    html: Annotated[Path, typer.Option("--html", help="Write the report here.")],
    home: HomeOpt = None,
) -> None:
    """One self-contained HTML page about a job: timeline, utilisation, slowest, failures."""
    from herder.report import render_report

    with connected(home) as herd:
        summary = herd.job(job)
        tasks = _all(lambda after: herd.tasks_finished(job=job, limit=5000, after=after))
        timeline = herd.timeline(job=job, limit=100_000)
        used = herd.resource_usage(max(60.0, min(86_400.0, _span(timeline))))
    html.write_text(render_report(summary, tasks, timeline, used), encoding="utf-8")
    typer.echo(f"wrote {html} ({len(tasks)} finished tasks, {len(timeline)} attempts)")


def _all(page: Callable[[str | None], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Pages of tasks until the end (or ``REPORT_TASKS``)."""
    found: list[dict[str, Any]] = []
    after: str | None = None
    while len(found) < REPORT_TASKS:
        rows = page(after)
        if not rows:
            break
        found += rows
        after = rows[-1]["id"]
    return found[:REPORT_TASKS]


def _span(timeline: list[dict[str, Any]]) -> float:
    starts = [a["start"] for a in timeline if a["start"] is not None]
    ends = [a["end"] for a in timeline if a["end"] is not None]
    return max(ends) - min(starts) if starts and ends else 60.0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B/s", "KB/s", "MB/s"):
        if value < 1024 or unit == "MB/s":
            return f"{value:.0f} {unit}"
        value /= 1024
    return f"{value:.0f} MB/s"
