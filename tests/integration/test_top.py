"""``herder top`` against a live herd, driven by Textual's headless pilot at 80×24.

The app is the real one and so is the herd (local agents); only the terminal
is simulated. Every wait is bounded; the screenshots are kept for a look at
the layout (also in ``$HERDER_ARTIFACTS`` when set).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from textual.app import App
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from herder.client import Client
from herder.local import LocalHerd
from herder.tui import TaskScreen, TopApp

pytestmark = pytest.mark.slow

SIZE = (80, 24)


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    herd = LocalHerd(nodes=2)
    try:
        started = herd.start()
        herd.wait_nodes(2)
        yield started
    finally:
        herd.stop()


async def wait_for(pilot: Pilot[None], timeout: float, what: str, ok: Callable[[], bool]) -> None:
    """Let the app run until ``ok()`` holds; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            shown = status_text(pilot.app, "#status") or status_text(pilot.app, "#task-status")
            pytest.fail(f"not seen within {timeout:.0f} s: {what} (status line: {shown!r})")
        await pilot.pause(0.1)


def row_keys(app: TopApp, table: str) -> set[str]:
    return {str(k.value) for k in app.screen.query_one(f"#{table}", DataTable).rows}


def status_text(app: App[None], selector: str) -> str:
    """A status line's text ('' while its screen is not composed yet)."""
    return " ".join(str(s.content) for s in app.screen.query(selector).results(Static))


def keep_screenshot(app: TopApp, tmp_path: Path, name: str) -> None:
    app.save_screenshot(name, str(tmp_path))
    if artifacts := os.environ.get("HERDER_ARTIFACTS"):
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        app.save_screenshot(name, artifacts)


def task_state(client: Client, task_id: str) -> str:
    return str(client.task(task_id)["task"]["state"])


async def test_top_shows_the_herd_and_cancels_a_task(client: Client, tmp_path: Path) -> None:
    node_ids = {n["id"] for n in await asyncio.to_thread(client.nodes) if n["state"] == "ready"}
    assert len(node_ids) == 2
    app = TopApp(client, refresh_s=0.5)
    task_id: str | None = None
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, 15, "both nodes", lambda: node_ids <= row_keys(app, "nodes"))
            drawn = app.export_screenshot()
            assert all(node_id in drawn for node_id in node_ids), f"node ids not drawn at {SIZE}"

            task_id = (await asyncio.to_thread(client.submit, time.sleep, 60)).task_id
            await wait_for(pilot, 20, "the task", lambda: task_id in row_keys(app, "tasks"))
            keep_screenshot(app, tmp_path, "top.svg")

            # tab moves from the nodes pane to the running tasks; enter opens the task
            await pilot.press("tab")
            tasks = app.screen.query_one("#tasks", DataTable)
            assert app.focused is tasks
            tasks.move_cursor(row=tasks.get_row_index(task_id))
            await pilot.press("enter")
            await wait_for(pilot, 5, "the detail", lambda: isinstance(app.screen, TaskScreen))
            await wait_for(
                pilot, 10, "the task running", lambda: "running" in status_text(app, "#task-status")
            )
            keep_screenshot(app, tmp_path, "top-task.svg")
            await pilot.press("escape")
            assert not isinstance(app.screen, TaskScreen)

            await pilot.press("c")
            deadline = time.monotonic() + 20
            while (state := await asyncio.to_thread(task_state, client, task_id)) != "cancelled":
                assert time.monotonic() < deadline, f"task still {state} 20 s after c"
                await pilot.pause(0.2)
            await wait_for(pilot, 10, "task gone", lambda: task_id not in row_keys(app, "tasks"))

            app.open_task(task_id)
            await wait_for(
                pilot, 10, "the detail", lambda: "cancelled" in status_text(app, "#task-status")
            )
            await pilot.press("escape")

            await pilot.press("q")
            await wait_for(pilot, 5, "the app to quit", lambda: not app.is_running)
    finally:
        if task_id is not None:
            await asyncio.to_thread(client.cancel, task_id)


async def test_a_lost_coordinator_shows_an_error_and_keeps_the_data(tmp_path: Path) -> None:
    herd = LocalHerd(nodes=1)
    try:
        client = herd.start()
        herd.wait_nodes(1)
        job_id = client.submit(pow, 2, 10).job_id
        app = TopApp(client, refresh_s=0.3)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, 15, "the job", lambda: job_id[:12] in status_text(app, "#jobs"))

            assert herd.process is not None
            herd.process.terminate()  # the coordinator goes (orderly); the client stays open
            await asyncio.to_thread(herd.process.wait, 30)
            await wait_for(
                pilot, 15, "the error", lambda: "refresh failed" in status_text(app, "#status")
            )
            keep_screenshot(app, tmp_path, "top-lost.svg")
            assert "data from" in status_text(app, "#status")
            assert job_id[:12] in status_text(app, "#jobs"), "the last data should stay on screen"
            await pilot.press("q")
    finally:
        herd.stop()
