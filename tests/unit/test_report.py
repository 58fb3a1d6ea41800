"""The HTML job report: one self-contained page from hand-made API data."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

from herder.report import busy_time, pack_lanes, render_report, slowest

T0 = 1_700_000_000.0
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "job.py", line 3, in boom\n'
    "    raise ValueError('<script>alert(1)</script> & \"quotes\"')\n"
    'ValueError: <script>alert(1)</script> & "quotes"\n'
)
VOID = {"meta", "br", "hr", "img", "input", "link", "area", "base", "col", "source", "wbr"}


def _task(i: int, took: float, state: str = "succeeded", node: str = "n1") -> dict[str, Any]:
    return {
        "id": f"t-{i:03d}",
        "job_id": "j-1",
        "name": f"square-{i}",
        "kind": "command",
        "state": state,
        "attempt": 1,
        "max_attempts": 1,
        "node_id": node,
        "reason": None,
        "created_at": T0,
        "started_at": T0 + i,
        "finished_at": T0 + i + took,
    }


def _data() -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    tasks = [_task(i, took=float(i), node="n1" if i % 2 else "n2") for i in range(1, 16)]
    broken = _task(20, took=0.5, state="failed", node="n3")
    broken["name"] = "boom"
    broken["reason"] = "exception"
    broken["error"] = {
        "type": "ValueError",
        "message": "<script>alert(1)</script>",
        "traceback": TRACEBACK,
    }
    tasks.append(broken)
    timeline = [
        {
            "task_id": t["id"],
            "name": t["name"],
            "job_id": "j-1",
            "node_id": t["node_id"],
            "attempt": 1,
            "start": t["started_at"],
            "end": t["finished_at"],
            "state": t["state"],
        }
        for t in tasks
    ]
    # One still running: drawn up to the end of the span, coloured "running".
    timeline.append(
        {
            "task_id": "t-099",
            "name": "still-going",
            "job_id": "j-1",
            "node_id": "n3",
            "attempt": 1,
            "start": T0 + 25,
            "end": None,
            "state": "running",
        }
    )
    job = {
        "id": "j-1",
        "name": "nightly <squares>",
        "created_at": T0,
        "counts": {"succeeded": 15, "failed": 1, "running": 1},
        "total": 17,
    }
    usage = {
        "window_s": 60.0,
        "nodes": {"n1": {"now": {}, "avg": {"cpu_percent": 41.25}, "max": {"cpu_percent": 97.0}}},
        "total": {"cpu_seconds": 12.5},
    }
    return job, tasks, timeline, usage


class _Checker(HTMLParser):
    """Collects tags, attributes and text; checks that tags nest properly."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _Checker:
    checker = _Checker()
    checker.feed(page)
    checker.close()
    return checker


def test_report_is_one_valid_html_page() -> None:
    page = render_report(*_data())
    assert page.startswith("<!doctype html>")
    checker = _parse(page)
    assert checker.errors == []
    assert checker.stack == []
    assert checker.tags.count("html") == 1
    assert checker.tags.count("style") == 1
    assert "script" not in checker.tags  # works offline and in mail clients that block scripts
    assert "nightly &lt;squares&gt;" in page


def test_report_has_no_external_urls() -> None:
    checker = _parse(render_report(*_data()))
    linked = [(t, k, v) for t, k, v in checker.attrs if k in ("src", "href") and v]
    assert [v for _, _, v in linked if "http" in v or v.startswith("//")] == []
    assert "<link" not in render_report(*_data())


def test_report_lists_the_ten_slowest_tasks() -> None:
    page = render_report(*_data())
    section = page[page.index("slowest tasks") : page.index("Failures")]
    names = re.findall(r"<td>(square-\d+)</td>", section)
    assert names == [f"square-{i}" for i in range(15, 5, -1)]
    assert "square-5<" not in section


def test_report_escapes_the_failure_traceback() -> None:
    page = render_report(*_data())
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quotes&quot;" in page
    assert "Traceback (most recent call last):" in page
    assert "reason: <code>exception</code>" in page
    failures = page[page.index("Failures (1)") :]
    assert "boom" in failures
    text = "".join(_parse(page).text)
    assert 'ValueError: <script>alert(1)</script> & "quotes"' in text


def test_report_draws_the_timeline_and_utilisation() -> None:
    page = render_report(*_data())
    bars = re.findall(r'<rect class="bar (\w+)"', page)
    assert len(bars) == 17
    assert bars.count("failed") == 1
    assert bars.count("running") == 1
    assert "Node utilisation" in page
    usage = page[page.index("Resource usage") :]
    assert "41.2" in usage
    assert "97.0" in usage
    assert "cpu_seconds" in usage


def test_an_empty_job_still_renders() -> None:
    page = render_report({"id": "j-0", "name": "empty"}, [], [], {})
    assert _parse(page).errors == []
    assert "No attempts ran." in page
    assert "Failures (0)" in page


def test_lanes_pack_greedily_per_node() -> None:
    timeline = [
        {"task_id": "a", "node_id": "n1", "start": 0.0, "end": 10.0, "state": "succeeded"},
        {"task_id": "b", "node_id": "n1", "start": 2.0, "end": 4.0, "state": "succeeded"},
        {"task_id": "c", "node_id": "n1", "start": 5.0, "end": 6.0, "state": "failed"},
        {"task_id": "d", "node_id": "n2", "start": 1.0, "end": None, "state": "running"},
    ]
    bars = {b.task_id: b for b in pack_lanes(timeline, now=20.0)}
    assert (bars["a"].lane, bars["b"].lane, bars["c"].lane) == (0, 1, 1)
    assert bars["d"].lane == 0
    assert bars["d"].end == 20.0
    assert bars["d"].outcome == "running"


def test_busy_time_is_the_union_of_intervals() -> None:
    assert busy_time([(0, 10), (2, 4), (12, 13)]) == 11
    assert busy_time([]) == 0


def test_slowest_falls_back_to_the_timeline() -> None:
    timeline = [{"task_id": "x", "name": "only-here", "start": 0.0, "end": 9.0, "attempt": 1}]
    [(took, row)] = slowest([], timeline)
    assert took == 9.0
    assert row["name"] == "only-here"
