"""The event bus, progress, discovery events and availability against a real herd."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest

import herder
from herder.client import Client, HerdEvent
from herder.local import LocalHerd
from tests.helpers import free_port, started_herd, wait_for
from tests.helpers import herder as run_cli

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the tasks below travel by value


@pytest.fixture(scope="module")
def herd_proc() -> Iterator[LocalHerd]:
    with started_herd(2, slots=1) as proc:
        yield proc


@pytest.fixture
def herd(herd_proc: LocalHerd) -> herder.Client:
    assert herd_proc.client is not None
    return herd_proc.client


class Collector:
    """Events from ``herd.on``, kept for the test to wait on (from the client's thread)."""

    def __init__(self) -> None:
        self.events: list[HerdEvent] = []
        self._lock = threading.Lock()

    def __call__(self, event: HerdEvent) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, topic: str) -> list[HerdEvent]:
        with self._lock:
            return [e for e in self.events if e.topic == topic]


# --- tasks (run in the agents' workers) -------------------------------------------------


def serve(seconds: float = 20.0) -> str:
    """Answer ``ping`` (emit ``pong``, and reply to a sending node) until ``stop``."""
    from herder import node, task

    stop = threading.Event()

    def ping(msg: node.Message) -> None:
        task.emit("pong", {"got": msg.data, "sender": msg.sender})
        if msg.sender != "client":
            task.send(msg.sender, "pong", msg.data)

    node.on("ping", ping)
    node.on("stop", lambda _: stop.set())
    task.emit("ready")
    if not stop.wait(seconds):
        raise TimeoutError("nobody said stop")
    return "stopped"


def ask(target: str, rounds: int) -> list[Any]:
    """Send ``ping`` to ``target`` ``rounds`` times, one at a time; the answers."""
    import queue

    from herder import node, task

    answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
    node.on("pong", lambda msg: answers.put(msg.data))
    out = []
    for i in range(rounds):
        task.send(target, "ping", {"i": i})
        out.append(answers.get(timeout=10))
    return out


def slow_progress() -> int:
    from herder import node, task

    go = threading.Event()
    node.on("go", lambda _: go.set())
    task.progress(0.4, "aligning")
    if not go.wait(20):
        raise TimeoutError("nobody said go")
    return 1


def whoami() -> int:
    return os.getpid()


# --- helpers -------------------------------------------------------------------------


def two_nodes(herd: Client) -> tuple[str, str]:
    a, b = sorted(n["id"] for n in herd.nodes() if n["state"] in ("ready", "busy"))[:2]
    return a, b


def pin(node_id: str) -> str:
    return f'node == "{node_id}"'


def start_server(herd: Client, seen: Collector, node_id: str) -> herder.Future:
    """A running ``serve`` task on ``node_id``, its handlers registered."""
    before = len(seen.of("ready"))
    fut = herd.submit(serve, select=pin(node_id))
    ready = wait_for(
        lambda: [e for e in seen.of("ready")[before:] if e.task_id == fut.task_id],
        20,
        "the server to register its handlers",
    )
    assert ready[0].node_id == node_id
    return fut


def node_of(herd: Client, task_id: str) -> str:
    attempts = herd.task(task_id)["attempts"]
    return str(attempts[-1]["node_id"])


# --- tests ---------------------------------------------------------------------------


def test_progress_shows_in_the_future_and_the_cli(
    herd: herder.Client, herd_proc: LocalHerd
) -> None:
    fut = herd.submit(slow_progress)
    wait_for(lambda: fut.progress == (0.4, "aligning"), 20, "progress in the future")
    shown = subprocess.run(
        [sys.executable, "-m", "herder", "task", fut.task_id],
        env=herd_proc.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "progress 40% aligning" in shown
    assert herd.task(fut.task_id)["progress"]["fraction"] == 0.4
    assert herd.send(node_of(herd, fut.task_id), "go") == 1
    assert fut.result(timeout=20) == 1
    assert herd.task(fut.task_id)["progress"] is None  # ended: the cache forgot it


def test_send_to_all_and_to_one_node_reaches_handlers(herd: herder.Client) -> None:
    seen = Collector()
    stop_listening = herd.on("emit", seen)
    try:
        node_a, node_b = two_nodes(herd)
        a = start_server(herd, seen, node_a)
        b = start_server(herd, seen, node_b)
        assert herd.send("all", "ping", {"n": 1}) == 2
        pongs = wait_for(lambda: len(seen.of("pong")) >= 2 and seen.of("pong"), 10, "2 pongs")
        assert {e.node_id for e in pongs} == {node_a, node_b}
        assert all(e.data == {"got": {"n": 1}, "sender": "client"} for e in pongs)
        assert herd.send(node_b, "ping", {"n": 2}) == 1
        wait_for(lambda: len(seen.of("pong")) >= 3, 10, "the third pong")
        third = seen.of("pong")[2]
        assert (third.node_id, third.data["got"]) == (node_b, {"n": 2})
        assert herd.send("no-such-node", "ping") == 0
        with pytest.raises(ValueError, match="at most 65536"):
            herd.send("all", "ping", "x" * 70_000)
        assert herd.send("all", "stop") == 2
        assert a.result(timeout=20) == b.result(timeout=20) == "stopped"
    finally:
        stop_listening()


def test_node_to_node_round_trip(herd: herder.Client) -> None:
    seen = Collector()
    stop_listening = herd.on("emit", seen)
    try:
        node_a, node_b = two_nodes(herd)
        server = start_server(herd, seen, node_b)
        asker = herd.submit(ask, node_b, 5, select=pin(node_a))
        assert asker.result(timeout=30) == [{"i": i} for i in range(5)]
        assert node_of(herd, asker.task_id) == node_a
        assert herd.send(node_b, "stop") == 1
        assert server.result(timeout=20) == "stopped"
    finally:
        stop_listening()


def pause_resume(herd: Client, node_id: str) -> None:
    herd.set_available(node_id, False)
    herd.set_available(node_id, True)


def test_late_listener_gets_buffered_node_events(herd: herder.Client) -> None:
    node_id = herd.nodes()[0]["id"]
    pause_resume(herd, node_id)
    time.sleep(0.3)  # the events have come and gone; nobody listened
    late = list(herd.events(["node_available", "node_unavailable"], timeout=1.0))
    mine = [(e.kind, (e.data or {}).get("reason")) for e in late if e.node_id == node_id]
    assert ("node_unavailable", "paused") in mine
    assert mine[-1] == ("node_available", None)
    assert any(e.kind == "coordinator_available" for e in herd.events(timeout=0.2))


def test_expired_events_are_not_delivered(herd_proc: LocalHerd) -> None:
    with Client(env=herd_proc.env(), event_ttl_s=0.5) as herd:
        node_id = herd.nodes()[0]["id"]
        pause_resume(herd, node_id)
        time.sleep(1.0)  # twice the TTL
        assert list(herd.events(["node_available", "node_unavailable"], timeout=0.3)) == []
        pause_resume(herd, node_id)
        fresh = list(herd.events(["node_available", "node_unavailable"], timeout=0.3))
        assert [e.kind for e in fresh if e.node_id == node_id] == [
            "node_unavailable",
            "node_available",
        ]


def test_paused_node_finishes_its_work_and_takes_no_new(herd: herder.Client) -> None:
    seen = Collector()
    stop_listening = herd.on("emit", seen)
    try:
        busy, other = two_nodes(herd)
        server = start_server(herd, seen, busy)
        herd.set_available(busy, False)
        assert next(n for n in herd.nodes() if n["id"] == busy)["available"] is False
        assert herd.send(busy, "stop") == 1  # still paired: the bus reaches it
        assert server.result(timeout=20) == "stopped"  # the running task finished
        futs = [herd.submit(whoami) for _ in range(6)]
        for f in futs:
            f.result(timeout=30)
        assert {node_of(herd, f.task_id) for f in futs} == {other}
        herd.set_available(busy, True)
        herd.set_available(other, False)
        try:
            back = [herd.submit(whoami) for _ in range(3)]
            for f in back:
                f.result(timeout=30)
            assert {node_of(herd, f.task_id) for f in back} == {busy}
        finally:
            herd.set_available(other, True)
    finally:
        stop_listening()


def test_a_pause_survives_a_coordinator_kill_9(tmp_path: Any) -> None:
    """The flag is in the store: a restarted coordinator still holds the node back."""
    listen = f"127.0.0.1:{free_port()}"  # the agents come back to the same address
    first = LocalHerd(nodes=2, home=tmp_path, listen=listen)
    herd = first.start()
    try:
        first.wait_nodes(2)
        paused = herd.nodes()[0]["id"]
        run_cli(first.env(), "agent", "pause", paused)
        herd.close()
        first.kill()  # kill -9: its agents stay, and come back to the next coordinator
        second = LocalHerd(nodes=2, home=tmp_path, listen=listen)
        with second as herd:
            second.wait_nodes(2)
            nodes = {n["id"]: n for n in herd.nodes() if n["state"] in ("ready", "busy")}
            assert paused in nodes  # the same agent, adopted
            assert nodes[paused]["available"] is False
            futs = [herd.submit(os.getpid) for _ in range(4)]
            for f in futs:
                f.result(timeout=30)
            ran_on = {herd.task(f.task_id)["task"]["node_id"] for f in futs}
            assert ran_on == set(nodes) - {paused}
    finally:
        first.stop()
