"""Service mode with a real coordinator and real agents: programs kept running.

A service is restarted whenever it exits (backing off when it keeps
crashing), killed and restarted when its health check keeps failing, moved
when its node dies or drains, and ended only by a cancel. Each test checks
the processes themselves (pid files) and the store's history (attempts,
events), not only the API's answers.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import herder
from herder.local import LocalHerd
from tests.helpers import agent_pids, db_rows, free_port, kill_tree, recorded_agents, wait_for
from tests.helpers import herder as run_cli

KEEP_RUNNING = "echo $$ > {pidfile}; exec sleep 600"


@pytest.fixture(scope="module")
def herd_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHerd]:
    local = LocalHerd(nodes=2, slots=2, home=tmp_path_factory.mktemp("services-herd"))
    local.start()
    local.wait_nodes()
    try:
        yield local
    finally:
        local.stop()
        for pid in agent_pids(local.home):
            kill_tree(pid)


@pytest.fixture
def herd(herd_proc: LocalHerd) -> Iterator[herder.Client]:
    """The shared herd; the services a test started are cancelled after it (slots free)."""
    assert herd_proc.client is not None
    yield herd_proc.client
    running = [s["id"] for s in herd_proc.client.services()]
    if running:
        herd_proc.client.cancel(*running)


@pytest.fixture
def own_herd(tmp_path: Path) -> Iterator[LocalHerd]:
    """A herd of its own, for tests that kill or drain its nodes."""
    local = LocalHerd(nodes=2, slots=1, home=tmp_path / "home")
    local.start()
    local.wait_nodes()
    try:
        yield local
    finally:
        local.stop()
        for pid in agent_pids(local.home):
            kill_tree(pid)


def service_of(herd: herder.Client, task_id: str) -> dict[str, Any]:
    [found] = [s for s in herd.services(ended=True) if s["id"] == task_id]
    return found


def pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def running_on(herd: herder.Client, task_id: str, pidfile: Path) -> dict[str, Any] | None:
    """The service once it runs and its program wrote its pid, else None."""
    s = service_of(herd, task_id)
    return s if s["state"] == "running" and alive(pid_in(pidfile)) else None


# --- restarts --------------------------------------------------------------------------


def test_a_service_that_exits_is_restarted_with_growing_delays(herd: herder.Client) -> None:
    svc = herd.command("sleep 0.5; exit 3", service=True, name="crashy", retries=0)
    wait_for(lambda: service_of(herd, svc.task_id)["restarts"] >= 3, 20, "three restarts")
    detail = herd.task(svc.task_id)
    task = detail["task"]
    assert task["state"] in ("ready", "leased", "running")  # never failed
    assert task["attempt"] <= 1  # never charged, though retries=0
    assert task["service"] == {
        "health": None,
        "health_s": 10.0,
        "health_timeout_s": 5.0,
        "unhealthy_after": 3,
        "grace_s": None,
    }
    logged = [e["data"] for e in detail["events"] if e["action"] == "service_restarted"]
    assert [(d["reason"], d["exit_code"], d["delay_s"]) for d in logged[:3]] == [
        ("exit code", 3, 1.0),
        ("exit code", 3, 2.0),
        ("exit code", 3, 4.0),
    ]
    assert not [e for e in detail["events"] if e["action"] == "task_failed"]
    runs = [a for a in detail["attempts"] if a["ended_at"] is not None]
    assert [(a["attempt"], a["outcome"], a["reason"]) for a in runs[:3]] == [
        (1, "failed", "exit code")
    ] * 3
    # each run starts the back-off after the one before ended
    gaps = [b["started_at"] - a["ended_at"] for a, b in itertools.pairwise(runs)]
    assert 0.9 <= gaps[0] < 1.9
    assert 1.9 <= gaps[1] < 2.9
    listed = service_of(herd, svc.task_id)
    assert listed["last_exit"]["reason"] == "exit code"
    assert listed["last_exit"]["exit_code"] == 3


def test_cancel_ends_a_service_for_good(herd: herder.Client, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    svc = herd.command(KEEP_RUNNING.format(pidfile=pidfile), service=True)
    listed = wait_for(lambda: running_on(herd, svc.task_id, pidfile), 15, "the service running")
    pid = pid_in(pidfile)
    assert herd.cancel(svc) == [svc.task_id]
    with pytest.raises(herder.TaskCancelled):
        svc.result(timeout=10)
    wait_for(lambda: not alive(pid), 5, "the service's process to be killed")
    time.sleep(1.5)  # a restart would come at once (the run was long enough for no delay)
    after = herd.task(svc.task_id)
    assert after["task"]["state"] == "cancelled"
    assert after["task"]["restarts"] == listed["restarts"] == 0
    assert [a["outcome"] for a in after["attempts"]] == ["cancelled"]
    assert pid_in(pidfile) == pid  # nothing started it again
    assert svc.task_id not in [s["id"] for s in herd.services()]


def test_refused_with_a_clear_error(herd: herder.Client, tmp_path: Path) -> None:
    with pytest.raises(herder.SubmissionError, match="only a command task can be a service"):
        herd.submit(pow, 2, 3, service=True)
    with pytest.raises(herder.SubmissionError, match="health: only for a service"):
        herd.command(["true"], health="true")
    svc = herd.command(KEEP_RUNNING.format(pidfile=tmp_path / "pid"), service=True)
    with pytest.raises(herder.SubmissionError, match=f"names service {svc.task_id}, which never"):
        herd.command(["true"], depends_on=[svc])


# --- health ----------------------------------------------------------------------------


def test_a_failing_health_command_kills_and_restarts_the_service(
    herd: herder.Client, herd_proc: LocalHerd, tmp_path: Path
) -> None:
    marker, pidfile = tmp_path / "healthy", tmp_path / "pid"
    marker.touch()
    svc = herd.command(
        KEEP_RUNNING.format(pidfile=pidfile),
        service=True,
        health=["test", "-f", str(marker)],
        health_s=0.4,
        grace_s=0.2,
        unhealthy_after=5,
    )
    wait_for(
        lambda: (service_of(herd, svc.task_id)["health"] or {}).get("state") == "healthy",
        15,
        "a passing check",
    )
    shown = json.loads(run_cli(herd_proc.env(), "services", "--json").stdout)
    [row] = [s for s in shown if s["id"] == svc.task_id]
    assert row["state"] == "running"
    assert row["health"]["state"] == "healthy"
    assert row["health"]["failures"] == 0
    assert row["health"]["checked_at"] > time.time() - 5
    first_pid = pid_in(pidfile)
    assert alive(first_pid)

    marker.unlink()
    failing = wait_for(
        lambda: (
            (service_of(herd, svc.task_id)["health"] or {}).get("state") == "unhealthy"
            and service_of(herd, svc.task_id)
        ),
        10,
        "a failed check reported",
        every=0.1,
    )
    assert failing["health"]["failures"] >= 1
    assert "test exited with code 1" in failing["health"]["error"]
    wait_for(lambda: service_of(herd, svc.task_id)["restarts"] >= 1, 10, "the unhealthy restart")
    assert not alive(first_pid)
    listed = service_of(herd, svc.task_id)
    assert listed["last_exit"]["reason"] == "unhealthy"
    [run] = [a for a in herd.task(svc.task_id)["attempts"] if a["ended_at"]][:1]
    assert (run["outcome"], run["reason"]) == ("failed", "unhealthy")

    marker.touch()  # healthy again: it stays up in its new run
    wait_for(
        lambda: (service_of(herd, svc.task_id)["health"] or {}).get("state") == "healthy",
        15,
        "the restarted service healthy",
    )
    assert alive(pid_in(pidfile))
    assert pid_in(pidfile) != first_pid


def test_an_http_health_url(herd: herder.Client, tmp_path: Path) -> None:
    """The service serves HTTP itself; the check GETs /ok, a file the test removes."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "ok").write_text("fine")
    port = free_port()
    svc = herd.command(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=str(site),
        service=True,
        health=f"http://127.0.0.1:{port}/ok",
        health_s=0.4,
        grace_s=0.5,
        unhealthy_after=5,
    )
    wait_for(
        lambda: (service_of(herd, svc.task_id)["health"] or {}).get("state") == "healthy",
        15,
        "the URL answering 200",
    )
    (site / "ok").unlink()
    failing = wait_for(
        lambda: (
            (service_of(herd, svc.task_id)["health"] or {}).get("state") == "unhealthy"
            and service_of(herd, svc.task_id)
        ),
        10,
        "a failed check reported",
        every=0.1,
    )
    assert "HTTP 404" in failing["health"]["error"]
    wait_for(lambda: service_of(herd, svc.task_id)["restarts"] >= 1, 10, "the unhealthy restart")
    assert service_of(herd, svc.task_id)["last_exit"]["reason"] == "unhealthy"


# --- replicas -------------------------------------------------------------------------


def test_replicas_in_a_tasks_file_run_as_separate_services(
    herd: herder.Client, herd_proc: LocalHerd, tmp_path: Path
) -> None:
    out = tmp_path / "replicas"
    out.mkdir()
    tasks = tmp_path / "web.toml"
    tasks.write_text(
        "[[tasks]]\n"
        'name = "web"\n'
        f'run = "echo $$ > {out}/$HERDER_REPLICA; exec sleep 600"\n'
        "service = true\n"
        "replicas = 3\n"
    )
    pushed = json.loads(run_cli(herd_proc.env(), "push", str(tasks), "--json").stdout)
    assert pushed["tasks"] == 3

    def all_running() -> list[dict[str, Any]] | None:
        mine = [s for s in herd.services() if s["job"] == pushed["job_id"]]
        ok = len(mine) == 3 and all(s["state"] == "running" for s in mine)
        return mine if ok and all(alive(pid_in(out / str(i))) for i in range(3)) else None

    mine = wait_for(all_running, 15, "three replicas running")
    assert sorted(s["name"] for s in mine) == ["web-0", "web-1", "web-2"]
    assert len({pid_in(out / str(i)) for i in range(3)}) == 3


# --- nodes that die or leave ----------------------------------------------------------


def agent_of(local: LocalHerd, node_id: str) -> int:
    return recorded_agents(local.home)[node_id]


def test_kill_9_of_its_agent_moves_a_service_to_the_other_node(
    own_herd: LocalHerd, tmp_path: Path
) -> None:
    herd = own_herd.client
    assert herd is not None
    pidfile = tmp_path / "pid"
    svc = herd.command(KEEP_RUNNING.format(pidfile=pidfile), service=True)
    first = wait_for(lambda: running_on(herd, svc.task_id, pidfile), 15, "the service running")
    first_pid = pid_in(pidfile)

    psutil.Process(agent_of(own_herd, first["node"])).kill()  # the agent only, kill -9
    # its worker sees the agent gone and takes the service down with it
    wait_for(lambda: not alive(first_pid), 5, "the orphaned service to be killed")
    moved = wait_for(
        lambda: (s := running_on(herd, svc.task_id, pidfile)) and s["node"] != first["node"] and s,
        20,
        "the service running on another node",
    )
    assert moved["restarts"] == 1
    task = herd.task(svc.task_id)["task"]
    assert task["attempt"] == 1  # not charged
    runs = db_rows(
        own_herd.home, "SELECT node_id, outcome FROM attempts WHERE task_id = ?", svc.task_id
    )
    assert runs == [(first["node"], "lost")]


def test_drain_hands_a_service_over_at_once_and_the_node_leaves(
    own_herd: LocalHerd, tmp_path: Path
) -> None:
    herd = own_herd.client
    assert herd is not None
    pidfile = tmp_path / "pid"
    svc = herd.command(KEEP_RUNNING.format(pidfile=pidfile), service=True)
    first = wait_for(lambda: running_on(herd, svc.task_id, pidfile), 15, "the service running")
    first_pid = pid_in(pidfile)

    run_cli(own_herd.env(), "drain", first["node"])
    asked = time.monotonic()
    moved = wait_for(
        lambda: (s := running_on(herd, svc.task_id, pidfile)) and s["node"] != first["node"] and s,
        10,
        "the service running on another node",
    )
    took = time.monotonic() - asked
    assert took < 2.5  # handed back at once, not left to expire (5 s without a heartbeat)
    assert not alive(first_pid)
    assert moved["restarts"] == 1
    assert moved["last_exit"]["reason"] == "handed back"
    wait_for(
        lambda: {n["id"]: n for n in herd.nodes()}[first["node"]]["state"] == "terminated",
        10,
        "the drained node to leave",
    )
    assert herd.task(svc.task_id)["task"]["attempt"] == 1
    runs = db_rows(
        own_herd.home, "SELECT node_id, outcome FROM attempts WHERE task_id = ?", svc.task_id
    )
    assert runs == [(first["node"], "released")]
