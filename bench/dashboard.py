"""Dashboard speed with 1,000,000 tasks in the store, against an empty store in the same run.

For each store (empty, then 1,000,000 tasks of which half finished, in
one job and 100 small ones), with a coordinator and no agents:

- first paint: chromium's first-contentful-paint of the dashboard page;
- signed in: from the sign-in click until the overview shows its jobs;
- task table: from opening ``#/tasks`` until its first page of rows shows,
  then each "next" page, then a page filtered by state and job;
- the REST call behind a page (``GET /v1/tasks?limit=50``), as the baseline
  a page cannot beat.

Medians of ``--runs``. Chromium is Debian's (``/usr/bin/chromium``).
Writes ``bench/results-dashboard.json``. Run: ``.venv/bin/python bench/dashboard.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Page, sync_playwright
from rich.console import Console
from rich.table import Table

from herder.local import LocalHerd
from herder.model import TaskSpec
from herder.store.sql import SqlStore

HERE = Path(__file__).parent
CHROMIUM = "/usr/bin/chromium"
BIG_JOB = "j-big"
console = Console()


async def fill(url: str, tasks: int) -> None:
    """``tasks`` call tasks in one job plus 100 small jobs; then half of them finished."""
    store = SqlStore(url)
    await store.open()
    batch = 20_000
    for start in range(0, tasks, batch):
        specs = [
            TaskSpec(id=f"t-{i:08d}", kind="call", name=f"step-{i % 1000}", payload=b"x")
            for i in range(start, min(tasks, start + batch))
        ]
        await store.submit(BIG_JOB, "big", specs, time.time())
    for j in range(100):
        specs = [TaskSpec(id=f"s-{j:03d}-{i}", kind="call", payload=b"x") for i in range(10)]
        await store.submit(f"j-small-{j:03d}", f"small {j}", specs, time.time())
    await store.close()
    db = sqlite3.connect(url.removeprefix("sqlite:///"))
    with db:  # half of the big job finished (what the table's filters will find)
        db.execute(
            "UPDATE tasks SET state = 'succeeded', finished_at = created_at + 1 "
            "WHERE job_id = ? AND (seq % 2) = 0",
            (BIG_JOB,),
        )
    db.close()


def token_of(herd: LocalHerd) -> str:
    assert herd.client is not None
    header: str = herd.client.aio.http.headers["authorization"]
    return header.split(" ", 1)[1]


def timed_rows(page: Page, action: Any, before: list[str]) -> float:
    started = time.perf_counter()
    action()
    page.wait_for_function(
        """before => {
            const ids = [...document.querySelectorAll('#tasks-table tr.task-row')]
                .map(r => r.dataset.task);
            return ids.length > 0 && ids.join() !== before.join();
        }""",
        arg=before,
        timeout=60_000,
    )
    return time.perf_counter() - started


def rows(page: Page) -> list[str]:
    found: list[str] = page.eval_on_selector_all(
        "#tasks-table tr.task-row", "rows => rows.map(r => r.dataset.task)"
    )
    return found


FIGURES = ("first_paint_s", "signed_in_s", "table_s", "next_page_s", "filtered_s")


def browse_once(herd: LocalHerd, browser: Any, token: str) -> dict[str, float]:
    """One visit in a fresh browser context (nothing cached): sign in, overview, tasks."""
    context = browser.new_context(ignore_https_errors=True)
    page = context.new_page()
    got: dict[str, float] = {}
    page.goto(herd.url + "/")
    page.wait_for_selector("#token")
    paint = page.evaluate(
        "() => performance.getEntriesByName('first-contentful-paint')[0]?.startTime ?? null"
    )
    got["first_paint_s"] = (paint or 0) / 1000
    page.fill("#token", token)
    started = time.perf_counter()
    page.click("#signin-button")
    page.wait_for_selector("#jobs-table tr.job-row", timeout=60_000)
    got["signed_in_s"] = time.perf_counter() - started
    got["table_s"] = timed_rows(page, lambda: page.goto(herd.url + "/#/tasks?limit=50"), [])
    first = rows(page)
    got["next_page_s"] = timed_rows(page, lambda: page.click("#page-next"), first)
    shown = rows(page)
    filtered = f"{herd.url}/#/tasks?job={BIG_JOB}&state=succeeded&limit=50"
    got["filtered_s"] = timed_rows(page, lambda: page.goto(filtered), shown)
    context.close()
    return got


def measure(herd: LocalHerd, browser: Any, runs: int) -> dict[str, float]:
    token = token_of(herd)
    rest = []
    with httpx.Client(verify=False, headers={"authorization": f"Bearer {token}"}) as http:
        for _ in range(runs):
            started = time.perf_counter()
            http.get(f"{herd.url}/v1/tasks", params={"limit": 50}).raise_for_status()
            rest.append(time.perf_counter() - started)
    visits = [browse_once(herd, browser, token) for _ in range(runs)]
    medians = {k: statistics.median(v[k] for v in visits) for k in FIGURES}
    return {**medians, "rest_page_s": statistics.median(rest)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} python {platform.python_version()}",
        "tasks": args.tasks,
        "runs": args.runs,
    }
    with tempfile.TemporaryDirectory(prefix="herder-bench-dash-") as name:
        stores = {}
        for label, count in (("empty", 200), ("full", args.tasks)):
            stores[label] = url = f"sqlite:///{name}/{label}.db"
            started = time.perf_counter()
            asyncio.run(fill(url, count))  # before playwright: it runs a loop of its own
            console.print(
                f"{label}: store of {count:,} tasks in {time.perf_counter() - started:.0f} s"
            )
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM,
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                ],
            )
            for label, url in stores.items():
                herd = LocalHerd(nodes=0, home=Path(name) / label, store=url)
                herd.start()
                try:
                    results[label] = measure(herd, browser, args.runs)
                finally:
                    herd.stop()
            browser.close()
    table = Table("median", "store of 200 tasks", f"store of {args.tasks:,} tasks", "ratio")
    for key, what in (
        ("first_paint_s", "first contentful paint"),
        ("signed_in_s", "sign-in to overview with jobs"),
        ("table_s", "task table, first page"),
        ("next_page_s", "task table, next page"),
        ("filtered_s", "task table, job + state filter"),
        ("rest_page_s", "GET /v1/tasks?limit=50 (baseline)"),
    ):
        empty, full = results["empty"][key], results["full"][key]
        table.add_row(
            what, f"{empty * 1000:.0f} ms", f"{full * 1000:.0f} ms", f"x{full / empty:.2f}"
        )
    console.print(table)
    (HERE / "results-dashboard.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
