"""The web dashboard in a real browser (chromium through playwright) against a live herd.

Chromium missing is a skip, or a failure with ``HERDER_REQUIRE_BROWSER=1``.
Screenshots go to ``tmp_path/artifacts`` and, when set, ``$HERDER_ARTIFACTS``.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
from fastapi import FastAPI

from herder.coordinator.dashboard_routes import dashboard_router
from herder.local import LocalHerd
from tests.netns import network_quiet

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 30_000  # the longest any browser wait may take
QUICK_TASKS = 20


def explode() -> None:
    raise ValueError("dashboard-test-explosion")


# ---------------------------------------------------------------------------
# The routes alone: no browser needed


async def test_dashboard_routes_serve_the_files_and_refuse_others() -> None:
    app = FastAPI()
    app.include_router(dashboard_router())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://dash") as http:
        index = await http.get("/")
        assert index.status_code == 200
        assert index.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/static/app.js">' in index.text
        script = await http.get("/static/app.js")
        assert script.headers["content-type"].startswith("text/javascript")
        assert (await http.get("/static/app.css")).headers["content-type"].startswith("text/css")
        plotly = await http.get("/static/plotly.min.js")
        assert plotly.status_code == 200
        assert len(plotly.content) > 1_000_000
        assert "max-age" in plotly.headers["cache-control"]
        assert plotly.headers["content-encoding"] == "gzip"  # httpx asks for it, and unpacks
        assert int(plotly.headers["content-length"]) < len(plotly.content) / 2
        plain = await http.get("/static/plotly.min.js", headers={"accept-encoding": "identity"})
        assert "content-encoding" not in plain.headers
        assert plain.content == plotly.content
        for bad in ("/static/nope.js", "/static/..%2Fapp.js", "/static/__init__.py", "/static/"):
            assert (await http.get(bad)).status_code == 404, bad
        # A name with a slash never reaches the handler at all.
        assert (await http.get("/static/../report.py")).status_code == 404


# ---------------------------------------------------------------------------
# The dashboard in chromium


@pytest.fixture
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError as exc:  # pragma: no cover - depends on the machine
        _no_browser(f"playwright is not installed ({exc})")
    if not Path(CHROMIUM).exists():
        _no_browser(f"{CHROMIUM} is missing")
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(
                executable_path=CHROMIUM,
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                ],
                timeout=WAIT_MS,
            )
        except Error as exc:
            _no_browser(f"chromium does not start: {exc}")
        try:
            with network_quiet():  # no veth made or cut meanwhile: see tests.netns
                yield launched
        finally:
            launched.close()


def _no_browser(why: str) -> NoReturn:
    if os.environ.get("HERDER_REQUIRE_BROWSER") == "1":
        pytest.fail(f"a browser is required (HERDER_REQUIRE_BROWSER=1): {why}")
    pytest.skip(why)


@pytest.fixture
def live_herd() -> Iterator[LocalHerd]:
    herd = LocalHerd(nodes=3)
    herd.start()
    try:
        herd.wait_nodes(3)
        yield herd
    finally:
        herd.stop()


class Shots:
    """Screenshots, kept in the test's directory and in $HERDER_ARTIFACTS when set."""

    def __init__(self, tmp_path: Path) -> None:
        self.dirs = [tmp_path / "artifacts"]
        if os.environ.get("HERDER_ARTIFACTS"):
            self.dirs.append(Path(os.environ["HERDER_ARTIFACTS"]))
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)

    def take(self, page: Any, name: str) -> None:
        first = self.dirs[0] / f"dashboard-{name}.png"
        page.screenshot(path=str(first), full_page=True)
        for d in self.dirs[1:]:
            shutil.copy(first, d / first.name)


def _token(herd: LocalHerd) -> str:
    """The API token, as the Python client sends it."""
    assert herd.client is not None
    header: str = herd.client.aio.http.headers["authorization"]
    scheme, _, token = header.partition(" ")
    assert scheme.lower() == "bearer"
    return token


def _row_ids(page: Any) -> list[str]:
    ids: list[str] = page.eval_on_selector_all(
        "#tasks-table tr.task-row", "rows => rows.map(r => r.dataset.task)"
    )
    return ids


def _wait_rows(page: Any, count: int, after: list[str]) -> list[str]:
    """The task ids of the table once it shows ``count`` rows other than those of ``after``."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline:
        ids = _row_ids(page)
        if len(ids) == count and ids != after:
            return ids
        page.wait_for_timeout(100)
    raise AssertionError(f"the task table did not show {count} new rows: {_row_ids(page)}")


@pytest.mark.slow
def test_dashboard_shows_a_live_herd(browser: Any, live_herd: LocalHerd, tmp_path: Path) -> None:
    client = live_herd.client
    assert client is not None
    shots = Shots(tmp_path)
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(f"{live_herd.url}/")

        # A wrong token is refused and the page stays on sign-in.
        page.fill("#token", "not-the-token")
        page.click("#signin-button")
        page.wait_for_selector("#signin-error:has-text('refused')")
        assert page.is_visible("#signin")
        assert not page.is_visible("#app")
        shots.take(page, "refused")

        # The right one shows the herd: three nodes.
        page.fill("#token", _token(live_herd))
        page.click("#signin-button")
        page.wait_for_selector("#app:not([hidden])")
        page.wait_for_function(
            "document.querySelectorAll('#nodes-table tr.node-row').length >= 3", timeout=WAIT_MS
        )
        assert page.evaluate("sessionStorage.getItem('herder.token')") == _token(live_herd)

        # A job of quick tasks and one that raises; its progress reaches 100%.
        quick = [
            client.command(["sh", "-c", f"echo quick-{i}"], name=f"quick-{i}", retries=0)
            for i in range(QUICK_TASKS)
        ]
        boom = client.submit(explode, name="explode", retries=0)
        job = boom.job_id
        assert {f.job_id for f in quick} == {job}
        for f in quick:
            f.result(timeout=60)
        assert isinstance(boom.exception(timeout=60), ValueError)
        page.wait_for_selector(f"#jobs-table tr.job-row[data-job='{job}'][data-pct='100']")
        page.wait_for_timeout(1500)  # let the CPU charts draw a few live points
        shots.take(page, "overview")

        # The task table, filtered by job: all 21 tasks on one page.
        page.goto(f"{live_herd.url}/#/tasks?job={job}")
        page.wait_for_function(
            f"document.querySelectorAll('#tasks-table tr.task-row').length === {QUICK_TASKS + 1}"
        )
        assert page.is_disabled("#page-next")
        everything = _row_ids(page)
        shots.take(page, "tasks")

        # Pages of 8 by keyset cursors: 8, 8, 5, and back again.
        page.goto(f"{live_herd.url}/#/tasks?job={job}&limit=8")
        pages = [_wait_rows(page, 8, after=everything[:0])]
        assert page.is_disabled("#page-prev")
        page.click("#page-next")
        pages.append(_wait_rows(page, 8, after=pages[-1]))
        page.click("#page-next")
        pages.append(_wait_rows(page, QUICK_TASKS + 1 - 16, after=pages[-1]))
        assert page.is_disabled("#page-next")
        assert [i for p in pages for i in p] == everything  # submission order, no gap, no repeat
        page.click("#page-prev")
        assert _wait_rows(page, 8, after=pages[-1]) == pages[1]

        # The failed task, opened from the failures filter, shows its traceback.
        page.goto(f"{live_herd.url}/#/tasks?job={job}&state=failed")
        page.wait_for_selector("#tasks-table tr.task-row[data-state='failed'] a")
        assert page.locator("#tasks-table tr.task-row").count() == 1
        page.click("#tasks-table tr.task-row[data-state='failed'] a")
        traceback = page.wait_for_selector("#task-traceback")
        text = traceback.inner_text()
        assert "dashboard-test-explosion" in text
        assert "Traceback" in text
        assert page.inner_text("#task-name") == "explode"
        shots.take(page, "task")

        # The timeline draws bars: one per attempt.
        page.goto(f"{live_herd.url}/#/timeline?job={job}")
        page.wait_for_function(
            "document.querySelectorAll('#timeline-chart .barlayer .point').length > 0"
        )
        bars = page.locator("#timeline-chart .barlayer .point").count()
        assert bars >= QUICK_TASKS + 1
        shots.take(page, "timeline")

        # The live socket refuses a wrong token with code 4401.
        code = page.evaluate(
            """() => new Promise((resolve) => {
                const ws = new WebSocket(`wss://${location.host}/v1/live`);
                ws.onopen = () => ws.send(JSON.stringify({token: "wrong"}));
                ws.onclose = (event) => resolve(event.code);
                setTimeout(() => resolve(-1), 10000);
            })"""
        )
        assert code == 4401

        # Signing out forgets the token.
        page.click("#signout")
        page.wait_for_selector("#signin:not([hidden])")
        assert page.evaluate("sessionStorage.getItem('herder.token')") is None
    except Exception:
        shots.take(page, f"failure-{int(time.time())}")
        raise
    finally:
        context.close()
    assert errors == []
