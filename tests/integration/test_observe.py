"""Seeing the herd on a real one: executors with telemetry, task telemetry, usage, task
queries with filters and keyset paging, logs (live, followed, and kept after the node
is gone), the timeline, Prometheus metrics and the live WebSocket."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

import herder.task
from herder.client import Client
from herder.local import LocalHerd
from tests.helpers import herder as run_cli
from tests.helpers import wait_for


def chatty(lines: int, pause: float = 0.0) -> int:
    for i in range(lines):
        print(f"line {i}", flush=True)
        time.sleep(pause)
    print("to stderr", file=sys.stderr)
    return lines


def square(x: int) -> int:
    return x * x


def learns(steps: int) -> str:
    for step in range(steps):
        herder.task.telemetry({"loss": 1.0 / (step + 1), "step": step})
        time.sleep(0.3)
    return "done"


def fails() -> None:
    raise ValueError("observed failure")


@pytest.fixture(scope="module")
def herd() -> Iterator[tuple[LocalHerd, Client]]:
    h = LocalHerd(nodes=2, slots=2)
    client = h.start()
    try:
        h.wait_nodes(2)
        yield h, client
    finally:
        h.stop()


def test_executors_carry_slots_running_tasks_and_telemetry(herd: tuple[LocalHerd, Client]) -> None:
    _, client = herd
    slow = client.submit(time.sleep, 3)

    def running_it() -> list[dict[str, Any]]:
        return [
            e
            for e in client.executors()
            if e["telemetry"]
            and any(r["task_id"] == slow.task_id and r["state"] == "running" for r in e["running"])
        ]

    found = wait_for(running_it, 20, "an executor running the task with a reading")
    [node] = found
    assert node["slots"] == 2
    assert (node["used"], node["free"]) == (1, 1)
    for key in ("cpu_percent", "memory_percent", "mem_used_mb", "disk_free_gb", "load1"):
        assert key in node["telemetry"]
    assert "net_recv_bps" in node["telemetry"]
    slow.result(timeout=30)
    usage = client.resource_usage(60)
    assert set(usage["nodes"]) == {e["id"] for e in client.executors()}
    assert usage["total"]["nodes"] == 2
    assert 0 <= usage["total"]["avg"]["cpu_percent"] <= 100
    series = client.telemetry(node["id"], window_s=120)
    assert series["resolution_s"] == 1
    assert len(series["points"]) >= 2
    assert all("cpu_percent" in p for p in series["points"])


def test_a_task_adds_its_own_telemetry(herd: tuple[LocalHerd, Client]) -> None:
    _, client = herd
    fut = client.submit(learns, 4)
    assert fut.result(timeout=30) == "done"
    node = client.task(fut.task_id)["task"]["node_id"]

    def last_step() -> float | None:
        points = client.telemetry(node, 120, task=fut.task_id)["points"]
        return points[-1]["step"] if points and points[-1]["step"] == 3 else None

    wait_for(last_step, 10, "the task's last reading stored")
    points = client.telemetry(node, 120, task=fut.task_id)["points"]
    assert {"loss", "step"} <= points[-1].keys()
    assert points[-1]["loss"] == pytest.approx(0.25)


def test_queries_filter_page_and_order(herd: tuple[LocalHerd, Client]) -> None:
    _, client = herd
    job = f"j-q{time.monotonic_ns()}"
    futs = [client.submit(square, i, name=f"sq-{i:02d}", job=job) for i in range(30)]
    bad = client.submit(fails, job=job, name="broken", retries=0)
    assert [f.result(timeout=60) for f in futs] == [i * i for i in range(30)]
    with pytest.raises(Exception, match="observed failure"):
        bad.result(timeout=60)
    summary = client.job(job)
    assert summary["counts"] == {"succeeded": 30, "failed": 1}
    assert summary["started_at"] is not None
    assert summary["eta_s"] == 0.0
    finished = client.finished(job, limit=1000)
    assert len(finished) == 31
    assert [t["name"] for t in client.tasks_finished(job=job, name="sq-1*")] == [
        f"sq-1{i}" for i in range(10)
    ]
    assert client.tasks_pending(job=job) == []
    assert client.tasks_running(job=job) == []
    # keyset pages, oldest first and newest first, add up to the whole job
    pages: list[str] = []
    after = None
    while page := client.tasks(job=job, limit=7, after=after):
        pages += [t["id"] for t in page]
        after = page[-1]["id"]
    assert pages == [f.task_id for f in futs] + [bad.task_id]
    newest = client.tasks(job=job, limit=5, order="desc")
    assert [t["id"] for t in newest] == pages[::-1][:5]
    [failed] = client.tasks(job=job, state="failed")
    assert failed["error"]["message"] == "observed failure"
    rows = client.timeline(job=job)
    assert len(rows) == 31
    assert {r["state"] for r in rows} == {"succeeded", "failed"}
    assert all(r["end"] >= r["start"] for r in rows)
    listed = run_cli(
        client_env(herd), "tasks", "--finished", "--job", job, "--name", "sq-0*", "--json"
    )
    assert len(json.loads(listed.stdout)) == 10


def client_env(herd: tuple[LocalHerd, Client]) -> dict[str, str]:
    return herd[0].env()


def test_logs_live_followed_and_kept_after_the_node_is_gone(
    herd: tuple[LocalHerd, Client],
) -> None:
    h, client = herd
    env = h.env()
    fut = client.submit(chatty, 8, 0.4)
    wait_for(lambda: "line 1" in client.logs(fut), 20, "output while it runs")
    assert client.task(fut.task_id)["task"]["state"] == "running"
    followed = subprocess.run(
        [sys.executable, "-m", "herder", "logs", fut.task_id, "-f"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert followed.splitlines() == [f"line {i}" for i in range(8)]
    assert fut.result(timeout=30) == 8
    assert client.logs(fut, stream="stderr") == "to stderr\n"
    command = client.command(["sh", "-c", "echo from a command; echo oops >&2"])
    command.result(timeout=30)
    node = client.task(command.task_id)["task"]["node_id"]
    client.terminate(node)  # the node goes; the logs stay (in the datastore)
    wait_for(lambda: node not in {e["id"] for e in client.executors()}, 30, "the node to be gone")
    assert client.logs(command) == "from a command\n"
    assert run_cli(env, "logs", command.task_id, "--stderr").stdout == "oops\n"
    h.wait_nodes(2, timeout=60)  # replaced by the fleet


def test_metrics_parse_and_move(herd: tuple[LocalHerd, Client]) -> None:
    h, client = herd

    headers = {"authorization": client.aio.http.headers["authorization"]}

    def scrape() -> dict[str, Any]:
        text = httpx.get(f"{h.url}/metrics", headers=headers, verify=False).text
        found: dict[str, Any] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                found[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
        return found

    before = scrape()
    assert client.submit(square, 3).result(timeout=30) == 9
    time.sleep(2.1)  # the gauges from the store are cached for 2 s
    after = scrape()
    key = 'herder_tasks{"state": "succeeded"}'
    assert after[key] == before.get(key, 0) + 1
    for name in (
        "herder_queue_depth{}",
        "herder_dispatch_latency_seconds_count{}",
        "herder_store_commit_seconds_count{}",
        "herder_agents_connected{}",
    ):
        assert name in after, name
    assert any(k.startswith("herder_task_duration_seconds_count") for k in after)
    assert any(k.startswith("herder_nodes{") for k in after)
    assert any(k.startswith("herder_heartbeat_lag_seconds{") for k in after)
    assert after["herder_store_commit_seconds_count{}"] > before.get(
        "herder_store_commit_seconds_count{}", 0
    )
    anonymous = httpx.get(f"{h.url}/metrics", verify=False)
    assert anonymous.status_code == 401


def test_the_live_socket_wants_a_token_then_pushes_snapshots_and_events(
    herd: tuple[LocalHerd, Client],
) -> None:
    h, client = herd
    token = client.aio.http.headers["authorization"].split(" ", 1)[1]
    url = "wss://" + h.url.split("://", 1)[1] + "/v1/live"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    async def refused() -> int | None:
        async with websockets.connect(url, ssl=context) as ws:
            await ws.send(json.dumps({"token": "nope"}))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            return closed.value.rcvd.code if closed.value.rcvd else None

    async def watch() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        async with websockets.connect(url, ssl=context) as ws:
            await ws.send(json.dumps({"token": token}))
            # a success is not an event (they are counted); a failure is
            failing = client.submit(fails, retries=0)
            await asyncio.to_thread(lambda: failing.exception(timeout=30))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                got.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
                if any(m["type"] == "event" and m["event"]["action"] == "task_failed" for m in got):
                    break
        return got

    assert asyncio.run(refused()) == 4401
    messages = asyncio.run(watch())
    snapshot = messages[0]
    assert snapshot["type"] == "snapshot"
    assert len(snapshot["executors"]) == 2
    assert "succeeded" in snapshot["status"]["counts"]
    assert any(m["type"] == "event" and m["event"]["action"] == "task_failed" for m in messages)


def test_herder_report_writes_one_self_contained_page(
    herd: tuple[LocalHerd, Client], tmp_path: Any
) -> None:
    h, client = herd
    job = f"j-r{time.monotonic_ns()}"
    futs = [client.submit(square, i, name=f"rep-{i}", job=job) for i in range(6)]
    broken = client.submit(fails, job=job, name="rep-broken", retries=0)
    for f in futs:
        f.result(timeout=60)
    broken.exception(timeout=60)
    out = tmp_path / "report.html"
    run_cli(h.env(), "report", job, "--html", str(out))
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") or page.lower().startswith("<!doctype html>")
    assert job in page
    assert "rep-broken" in page
    assert "observed failure" in page
    assert "<svg" in page
    assert "http://" not in page
    assert "https://" not in page


def test_logs_of_coordinator_and_agents_are_json_lines_with_their_fields(tmp_path: Any) -> None:
    h = LocalHerd(nodes=1, home=tmp_path / "home", extra_args=["--log-format", "json"])
    client = h.start()
    try:
        h.wait_nodes(1)
        client.submit(square, 2).result(timeout=30)
    finally:
        h.stop()
    lines = (tmp_path / "home" / "coordinator.log").read_text().splitlines()
    coordinator = [json.loads(line) for line in lines if line.startswith("{")]
    # the one line for a person at the terminal is the banner
    assert [line for line in lines if not line.startswith("{")] == [
        f"herder coordinator at {h.url}"
    ]
    assert {"at", "level", "logger", "message"} <= coordinator[0].keys()
    assert any(line["message"].startswith("coordinator ready") for line in coordinator)
    [agent_log] = (tmp_path / "home" / "logs").glob("*.log")
    agent_lines = agent_log.read_text().splitlines()
    agent = [json.loads(line) for line in agent_lines if line.startswith("{")]
    assert any("paired with" in line["message"] for line in agent)
