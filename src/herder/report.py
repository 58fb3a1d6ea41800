"""A job's report as one self-contained HTML page: ``herder report JOB --html out.html``.

``render_report`` is a pure function of data the REST API returns (the job,
its tasks, its timeline of attempts and a usage summary): no network, no
clock, no files. The page has inline CSS and inline SVG charts and nothing
else, so it opens offline, survives being mailed, prints, and stays small: a
plotly chart would carry 4.8 MB of JavaScript that many mail clients refuse
to run anyway.

Sections: a summary, the timeline (a Gantt chart with one lane per node
slot, attempts packed greedily, coloured by outcome), each node's
utilisation over the job's span, the ten slowest tasks, and the failures
with their reason, error and traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Any

COLOURS = {
    "succeeded": "#16a34a",
    "failed": "#dc2626",
    "running": "#2563eb",
    "cancelled": "#9ca3af",
}
FINAL_STATES = ("succeeded", "failed", "cancelled")
SLOWEST = 10
MAX_FAILURES = 100  # shown in full; the rest are counted
MAX_TRACEBACK = 20_000  # characters of one traceback kept in the page
LANE_HEIGHT = 18
CHART_WIDTH = 1000
LABEL_WIDTH = 170

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; font-size: 14px;
       color: #1d2330; margin: 24px; max-width: 1200px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.muted { color: #6b7280; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #e5e7eb;
         vertical-align: top; }
th { color: #6b7280; font-weight: 600; font-size: 12px; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f3f4f6; padding: 8px; border-radius: 4px; white-space: pre-wrap;
      word-break: break-word; font-size: 12px; max-height: 420px; overflow: auto; }
.state { font-weight: 600; }
.succeeded { color: #16a34a; } .failed { color: #dc2626; } .running { color: #2563eb; }
.cancelled { color: #6b7280; }
.bar { background: #e5e7eb; width: 240px; height: 10px; display: inline-block; border-radius: 5px;
       overflow: hidden; vertical-align: middle; margin-right: 6px; }
.bar span { display: block; height: 100%; background: #2563eb; }
.failure { border-left: 3px solid #dc2626; padding-left: 12px; margin: 14px 0; }
.legend span { margin-right: 14px; } .legend i { display: inline-block; width: 11px; height: 11px;
       margin-right: 4px; vertical-align: middle; border-radius: 2px; }
svg text { font-family: inherit; font-size: 11px; fill: #374151; }
"""


@dataclass(frozen=True)
class Bar:
    """One attempt placed in a lane of the timeline."""

    task_id: str
    name: str
    node: str
    lane: int
    attempt: int
    start: float
    end: float
    outcome: str
    running: bool


def render_report(
    job: dict[str, Any],
    tasks: list[dict[str, Any]],
    timeline: list[dict[str, Any]],
    usage: dict[str, Any],
) -> str:
    """The whole report page as a string (UTF-8 HTML, no external resources).

    ``job`` is ``GET /v1/jobs/{id}``, ``tasks`` the job's tasks as ``GET
    /v1/tasks`` lists them (with ``error`` where the API gives it),
    ``timeline`` is ``GET /v1/timeline?job=``, and ``usage`` any summary of
    resources used (shown as a table; may be empty).
    """
    span = _span(timeline, tasks)
    bars = pack_lanes(timeline, span[1] if span else 0.0)
    title = f"herder report: {job.get('name') or job.get('id', '')}"
    sections = [
        f"<h1>{_e(title)}</h1>",
        _summary(job, tasks, span),
        _timeline_section(bars, span),
        _utilisation_section(bars, span),
        _slowest_section(tasks, timeline),
        _failures_section(tasks),
        _usage_section(usage),
    ]
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(s for s in sections if s)
        + "\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------------------
# Data shaping (no HTML)


def _span(
    timeline: Sequence[Mapping[str, Any]], tasks: Sequence[Mapping[str, Any]]
) -> tuple[float, float] | None:
    """The job's span: from its first start to its last end (or last start while running)."""
    starts = [float(a["start"]) for a in timeline if a.get("start") is not None]
    starts += [float(t["started_at"]) for t in tasks if t.get("started_at") is not None]
    if not starts:
        return None
    ends = [float(a["end"]) for a in timeline if a.get("end") is not None]
    ends += [float(t["finished_at"]) for t in tasks if t.get("finished_at") is not None]
    first = min(starts)
    last = max([*ends, *starts])
    return first, max(last, first)


def _outcome(attempt: Mapping[str, Any]) -> str:
    state = str(attempt.get("state") or "")
    if state in FINAL_STATES:
        return state
    if attempt.get("end") is None or state in ("running", "leased"):
        return "running"
    return "failed"  # ended any other way (node lost, timed out): it did not succeed


def pack_lanes(timeline: Iterable[Mapping[str, Any]], now: float) -> list[Bar]:
    """Place each attempt in the first lane of its node free at its start (greedy).

    A node thus gets as many lanes as it ever had attempts at once: its busy
    slots. Attempts still running end at ``now``.
    """
    by_node: dict[str, list[Mapping[str, Any]]] = {}
    for attempt in timeline:
        if attempt.get("start") is None:
            continue
        by_node.setdefault(str(attempt.get("node_id") or "?"), []).append(attempt)
    bars: list[Bar] = []
    for node in sorted(by_node):
        lane_ends: list[float] = []
        for a in sorted(by_node[node], key=lambda a: float(a["start"])):
            start = float(a["start"])
            end = float(a["end"]) if a.get("end") is not None else max(now, start)
            lane = next((i for i, e in enumerate(lane_ends) if e <= start), len(lane_ends))
            if lane == len(lane_ends):
                lane_ends.append(end)
            else:
                lane_ends[lane] = end
            bars.append(
                Bar(
                    task_id=str(a.get("task_id", "")),
                    name=str(a.get("name") or a.get("task_id", "")),
                    node=node,
                    lane=lane,
                    attempt=int(a.get("attempt") or 0),
                    start=start,
                    end=end,
                    outcome=_outcome(a),
                    running=a.get("end") is None,
                )
            )
    return bars


def busy_time(intervals: Iterable[tuple[float, float]]) -> float:
    """The length of the union of intervals: time with at least one attempt running."""
    total = 0.0
    current: tuple[float, float] | None = None
    for start, end in sorted(intervals):
        if current is None or start > current[1]:
            if current is not None:
                total += current[1] - current[0]
            current = (start, end)
        else:
            current = (current[0], max(current[1], end))
    if current is not None:
        total += current[1] - current[0]
    return total


def _duration(task: Mapping[str, Any]) -> float | None:
    if task.get("started_at") is None or task.get("finished_at") is None:
        return None
    return float(task["finished_at"]) - float(task["started_at"])


def slowest(
    tasks: Sequence[Mapping[str, Any]], timeline: Sequence[Mapping[str, Any]], n: int = SLOWEST
) -> list[tuple[float, Mapping[str, Any]]]:
    """The ``n`` slowest finished tasks, by their last run (from the tasks, else the timeline)."""
    timed: dict[str, tuple[float, Mapping[str, Any]]] = {}
    for task in tasks:
        took = _duration(task)
        if took is not None:
            timed[str(task.get("id"))] = (took, task)
    # Tasks not in the list (a partial page of a big job) are timed by their last attempt.
    listed = {str(t.get("id")) for t in tasks}
    for a in timeline:
        tid = str(a.get("task_id"))
        if tid in listed or a.get("start") is None or a.get("end") is None:
            continue
        took = float(a["end"]) - float(a["start"])
        if tid not in timed or int(a.get("attempt") or 0) >= int(timed[tid][1]["attempt"] or 0):
            row = {k: a.get(k) for k in ("name", "node_id", "state", "attempt")} | {"id": tid}
            timed[tid] = (took, row)
    return sorted(timed.values(), key=lambda pair: pair[0], reverse=True)[:n]


# ---------------------------------------------------------------------------
# HTML


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _time(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(float(epoch), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{int(value // 60)} min {value % 60:.0f} s"
    return f"{value / 3600:.1f} h"


def _summary(
    job: Mapping[str, Any], tasks: Sequence[Mapping[str, Any]], span: tuple[float, float] | None
) -> str:
    counts: dict[str, int] = dict(job.get("counts") or {})
    if not counts:
        for t in tasks:
            counts[str(t.get("state"))] = counts.get(str(t.get("state")), 0) + 1
    total = job.get("total") or sum(counts.values())
    states = " · ".join(
        f'<span class="state {_e(s)}">{_e(s)}</span> {n}' for s, n in sorted(counts.items()) if n
    )
    rows = [
        ("job", f"{_e(job.get('name') or '')} <span class='muted'>{_e(job.get('id'))}</span>"),
        ("created", _e(_time(job.get("created_at")))),
        ("tasks", f"{_e(total)} &nbsp; {states}"),
    ]
    if span is not None:
        rows.append(("ran", f"{_e(_time(span[0]))} → {_e(_time(span[1]))}"))
        rows.append(("span", _e(_seconds(span[1] - span[0]))))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="summary">{body}</table>'


def _timeline_section(bars: Sequence[Bar], span: tuple[float, float] | None) -> str:
    head = "<h2>Timeline</h2>"
    if not bars or span is None:
        return head + '<p class="muted">No attempts ran.</p>'
    legend = "".join(
        f'<span><i style="background:{c}"></i>{_e(k)}</span>' for k, c in COLOURS.items()
    )
    return (
        f'{head}<p class="legend">{legend}</p>'
        + gantt_svg(bars, span)
        + '<p class="muted">One lane per node slot; hover a bar for the task.</p>'
    )


def gantt_svg(bars: Sequence[Bar], span: tuple[float, float]) -> str:
    """The timeline as inline SVG: lanes top to bottom, time left to right."""
    lanes = sorted({(b.node, b.lane) for b in bars})
    row = {lane: i for i, lane in enumerate(lanes)}
    start, end = span
    width = CHART_WIDTH - LABEL_WIDTH
    scale = width / max(end - start, 1e-9)
    height = len(lanes) * LANE_HEIGHT + 30
    parts = [
        f'<svg role="img" class="gantt" '
        f'width="{CHART_WIDTH}" height="{height}" viewBox="0 0 {CHART_WIDTH} {height}">'
    ]
    for (node, lane), i in row.items():
        y = i * LANE_HEIGHT
        if i % 2:
            parts.append(
                f'<rect x="{LABEL_WIDTH}" y="{y}" width="{width}" height="{LANE_HEIGHT}" '
                'fill="#f9fafb"/>'
            )
        label = node if len(node) <= 22 else node[:21] + "…"
        parts.append(f'<text x="4" y="{y + 13}">{_e(label)} · {lane + 1}</text>')
    for b in bars:
        x = LABEL_WIDTH + (b.start - start) * scale
        w = max((b.end - b.start) * scale, 1.0)
        y = row[(b.node, b.lane)] * LANE_HEIGHT + 2
        tip = f"{b.name} (attempt {b.attempt}) {b.outcome}, {_seconds(b.end - b.start)} on {b.node}"
        parts.append(
            f'<rect class="bar {_e(b.outcome)}" x="{x:.1f}" y="{y}" width="{w:.1f}" '
            f'height="{LANE_HEIGHT - 4}" fill="{COLOURS[b.outcome]}">'
            f"<title>{_e(tip)}</title></rect>"
        )
    axis_y = len(lanes) * LANE_HEIGHT
    parts.append(
        f'<line x1="{LABEL_WIDTH}" y1="{axis_y}" x2="{CHART_WIDTH}" y2="{axis_y}" '
        'stroke="#9ca3af"/>'
    )
    for k in range(6):  # six ticks, in seconds since the job's first start
        x = LABEL_WIDTH + width * k / 5
        anchor = "end" if k == 5 else "start" if k == 0 else "middle"
        parts.append(
            f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="{anchor}">'
            f"{_e(_seconds((end - start) * k / 5))}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _utilisation_section(bars: Sequence[Bar], span: tuple[float, float] | None) -> str:
    head = "<h2>Node utilisation</h2>"
    if not bars or span is None:
        return head + '<p class="muted">No attempts ran.</p>'
    length = max(span[1] - span[0], 1e-9)
    rows = []
    for node in sorted({b.node for b in bars}):
        mine = [b for b in bars if b.node == node]
        busy = busy_time((b.start, b.end) for b in mine)
        task_seconds = sum(b.end - b.start for b in mine)
        fraction = min(busy / length, 1.0)
        rows.append(
            f"<tr><td>{_e(node)}</td>"
            f'<td><span class="bar"><span style="width:{fraction * 100:.1f}%"></span></span>'
            f"{fraction * 100:.0f}%</td>"
            f'<td class="num">{_e(_seconds(busy))}</td>'
            f'<td class="num">{len(mine)}</td>'
            f'<td class="num">{max(b.lane for b in mine) + 1}</td>'
            f'<td class="num">{task_seconds / length:.2f}</td></tr>'
        )
    return (
        head + '<p class="muted">Busy: at least one attempt running on the node, over the '
        f"job's span of {_e(_seconds(length))}. Parallelism: attempt-seconds per second.</p>"
        "<table><tr><th>node</th><th>busy</th><th class='num'>busy time</th>"
        "<th class='num'>attempts</th><th class='num'>slots used</th>"
        "<th class='num'>mean parallelism</th></tr>" + "".join(rows) + "</table>"
    )


def _slowest_section(
    tasks: Sequence[Mapping[str, Any]], timeline: Sequence[Mapping[str, Any]]
) -> str:
    head = f"<h2>The {SLOWEST} slowest tasks</h2>"
    top = slowest(tasks, timeline)
    if not top:
        return head + '<p class="muted">No task finished.</p>'
    rows = "".join(
        f"<tr><td>{_e(t.get('name') or t.get('id'))}</td>"
        f"<td class='muted'>{_e(t.get('id'))}</td>"
        f"<td>{_e(t.get('node_id') or '')}</td>"
        f"<td class='state {_e(t.get('state'))}'>{_e(t.get('state'))}</td>"
        f"<td class='num'>{_e(_seconds(took))}</td></tr>"
        for took, t in top
    )
    return (
        head + "<table><tr><th>task</th><th>id</th><th>node</th><th>state</th>"
        f"<th class='num'>took</th></tr>{rows}</table>"
    )


def _failures_section(tasks: Sequence[Mapping[str, Any]]) -> str:
    failed = [t for t in tasks if t.get("state") == "failed"]
    head = f"<h2>Failures ({len(failed)})</h2>"
    if not failed:
        return head + '<p class="muted">None.</p>'
    blocks = [_failure(t) for t in failed[:MAX_FAILURES]]
    if len(failed) > MAX_FAILURES:
        blocks.append(
            f'<p class="muted">… and {len(failed) - MAX_FAILURES} more '
            "(<code>herder tasks --state failed</code>).</p>"
        )
    return head + "".join(blocks)


def _failure(task: Mapping[str, Any]) -> str:
    error: Mapping[str, Any] = task.get("error") or {}
    traceback = str(error.get("traceback") or "")
    if len(traceback) > MAX_TRACEBACK:
        traceback = "…" + traceback[-MAX_TRACEBACK:]  # the end of a traceback says the most
    message = f"{error.get('type') or 'Error'}: {error.get('message') or ''}" if error else ""
    return (
        '<div class="failure">'
        f"<strong>{_e(task.get('name') or task.get('id'))}</strong> "
        f"<span class='muted'>{_e(task.get('id'))} · attempt {_e(task.get('attempt'))}"
        f" · node {_e(task.get('node_id') or '–')}</span>"
        f"<div>reason: <code>{_e(task.get('reason') or 'unknown')}</code></div>"
        + (f"<div class='failed'>{_e(message)}</div>" if message else "")
        + (f"<pre>{_e(traceback)}</pre>" if traceback else "")
        + "</div>"
    )


USAGE_COLUMNS = (("cpu_percent", "CPU %"), ("memory_percent", "memory %"), ("load1", "load"))


def _usage_section(usage: Mapping[str, Any]) -> str:
    """``GET /v1/usage``: average and peak per node when it has that shape; else key/value."""
    if not usage:
        return ""
    parts = ["<h2>Resource usage</h2>"]
    nodes = usage.get("nodes")
    rest = dict(usage)
    if isinstance(nodes, Mapping) and nodes and all(isinstance(v, Mapping) for v in nodes.values()):
        rest.pop("nodes")
        head = "".join(
            f"<th class='num'>avg {label}</th><th class='num'>peak {label}</th>"
            for _, label in USAGE_COLUMNS
        )
        rows = []
        for node, figures in sorted(nodes.items()):
            cells = "".join(
                f"<td class='num'>{_e(_number((figures.get(kind) or {}).get(key)))}</td>"
                for key, _ in USAGE_COLUMNS
                for kind in ("avg", "max")
            )
            rows.append(f"<tr><td>{_e(node)}</td>{cells}</tr>")
        parts.append(f"<table><tr><th>node</th>{head}</tr>{''.join(rows)}</table>")
    if rest:
        body = "".join(
            f"<tr><th>{_e(k)}</th><td class='num'>{_e(_plain(v))}</td></tr>" for k, v in _flat(rest)
        )
        parts.append(f"<table>{body}</table>")
    return "".join(parts)


def _number(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    return f"{value:.1f}"


def _flat(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as ``("total · avg · cpu_percent", 77.6)`` rows, sorted by key."""
    rows: list[tuple[str, Any]] = []
    for key, value in sorted(values.items()):
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows += _flat(value, f"{name} · ")
        else:
            rows.append((name, value))
    return rows


def _plain(value: object) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)
