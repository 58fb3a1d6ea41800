"""The ``herder`` command as a user runs it, against a real herd."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from herder.local import LocalHerd
from tests.helpers import agent_pids, db_rows, herder, kill_tree, wait_for


@pytest.fixture(scope="module")
def local() -> Iterator[LocalHerd]:
    herd = LocalHerd(nodes=2, slots=2)
    herd.start()
    herd.wait_nodes()
    try:
        yield herd
    finally:
        herd.stop()


def test_first_start_makes_a_private_secret_and_a_durable_store(local: LocalHerd) -> None:
    secret = local.home / "secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert len(bytes.fromhex(secret.read_text().strip())) == 32
    assert db_rows(local.home, "PRAGMA journal_mode")[0][0] == "wal"
    assert stat.S_IMODE((local.home / "tls" / "ca.key").stat().st_mode) == 0o600


def test_listing_commands_speak_json(local: LocalHerd) -> None:
    env = local.env()
    status = json.loads(herder(env, "status", "--json").stdout)
    assert status["agents"] == 2
    nodes = json.loads(herder(env, "nodes", "--json").stdout)
    assert {n["state"] for n in nodes} <= {"ready", "busy"}
    assert len(nodes) == 2
    assert "throughput" in herder(env, "status").stdout


def test_push_wait_tasks_and_task(local: LocalHerd, tmp_path: Path) -> None:
    env = local.env()
    tasks = tmp_path / "tasks.toml"
    tasks.write_text(
        textwrap.dedent(
            """
            job = "cli-test"
            [[tasks]]
            name = "hello"
            run = ["echo", "hello"]
            [[tasks]]
            name = "shout"
            run = "echo $GREETING | tr a-z A-Z"
            env = { GREETING = "loud" }
            depends_on = ["hello"]
            retries = 1
            timeout = 30
            priority = 3
            """
        )
    )
    pushed = json.loads(herder(env, "push", str(tasks), "--json").stdout)
    assert pushed["tasks"] == 2
    job = pushed["job_id"]
    waited = json.loads(herder(env, "wait", job, "--json").stdout)
    assert waited["counts"] == {"succeeded": 2}
    listed = json.loads(herder(env, "tasks", "--job", job, "--json").stdout)
    assert [t["name"] for t in listed] == ["hello", "shout"]
    shout = next(t for t in listed if t["name"] == "shout")
    detail = json.loads(herder(env, "task", shout["id"], "--json").stdout)
    assert detail["task"]["output"]["stdout_tail"] == "LOUD\n"
    assert detail["task"]["max_attempts"] == 2
    assert detail["task"]["priority"] == 3
    assert detail["attempts"][0]["outcome"] == "succeeded"
    human = herder(env, "task", shout["id"]).stdout
    assert "LOUD" in human
    assert "attempt 1 leased" in human


def test_wait_exits_1_when_a_task_failed(local: LocalHerd, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps({"tasks": [{"name": "bad", "run": "exit 4", "retries": 0}]}))
    job = json.loads(herder(local.env(), "push", str(tasks), "--json").stdout)["job_id"]
    waited = herder(local.env(), "wait", job, check=False)
    assert waited.returncode == 1
    failed = json.loads(herder(local.env(), "tasks", "--job", job, "--json").stdout)[0]
    detail = herder(local.env(), "task", failed["id"]).stdout
    assert "exited with code 4" in detail


BAD_FILES = {
    "bad.toml": ("[[tasks]]\nname = 'a'\nrun = [", "bad.toml"),
    "unknown.toml": ("[[tasks]]\nname = 'a'\nrun = ['true']\ncolour = 'red'\n", "colour"),
    "type.toml": ("[[tasks]]\nname = 'a'\nrun = ['true']\nretries = '3'\n", "retries"),
    "dup.toml": (
        "[[tasks]]\nname = 'a'\nrun = ['true']\n[[tasks]]\nname = 'a'\nrun = ['true']\n",
        "a",
    ),
    "unknown-dep.toml": ("[[tasks]]\nname = 'a'\nrun = ['true']\ndepends_on = ['zzz']\n", "zzz"),
    "cycle.toml": (
        "[[tasks]]\nname = 'a'\nrun = ['true']\ndepends_on = ['b']\n"
        "[[tasks]]\nname = 'b'\nrun = ['true']\ndepends_on = ['a']\n",
        "->",
    ),
    "empty-run.toml": ("[[tasks]]\nname = 'a'\nrun = []\n", "run"),
    "bad.json": ('{"tasks": [ {"name": "a", "run": ["true"]} ', "bad.json"),
    "bad.yaml": ("tasks:\n  - name: a\n    run: [true\n", "bad.yaml"),
    "no-name.toml": ("[[tasks]]\nrun = ['true']\n", "name"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_bad_tasks_file_is_refused_whole(local: LocalHerd, tmp_path: Path, name: str) -> None:
    content, must_mention = BAD_FILES[name]
    # a good task first: nothing of the file may be stored
    path = tmp_path / name
    path.write_text(content)
    before = db_rows(local.home, "SELECT count(*) FROM tasks")[0][0]
    done = herder(local.env(), "push", str(path), check=False)
    assert done.returncode != 0
    message = done.stdout + done.stderr
    assert name in message
    assert must_mention in message
    assert db_rows(local.home, "SELECT count(*) FROM tasks")[0][0] == before


def test_cancel_by_job(local: LocalHerd, tmp_path: Path) -> None:
    tasks = tmp_path / "slow.yaml"
    tasks.write_text(
        "tasks:\n" + "".join(f"  - name: s{i}\n    run: [sleep, '30']\n" for i in range(6))
    )
    job = json.loads(herder(local.env(), "push", str(tasks), "--json").stdout)["job_id"]
    out = json.loads(herder(local.env(), "cancel", "--job", job, "--json").stdout)
    assert len(out["cancelled"]) == 6
    waited = json.loads(herder(local.env(), "wait", job, "--json", check=False).stdout)
    assert waited["counts"] == {"cancelled": 6}


def test_down_drains_and_stops_everything(tmp_path: Path) -> None:
    herd = LocalHerd(nodes=2, home=tmp_path)
    herd.start()
    herd.wait_nodes()
    pids = agent_pids(tmp_path)
    assert len(pids) == 2
    assert herd.process is not None
    herder(herd.env(), "down")
    assert herd.process.wait(30) == 0
    wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), 10, "the agents to stop")
    nodes = dict(db_rows(tmp_path, "SELECT id, state FROM nodes"))
    assert set(nodes.values()) == {"terminated"}
    herd.stop()


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    herd = LocalHerd(nodes=1, home=tmp_path)
    herd.start()
    herd.wait_nodes()
    pids = agent_pids(tmp_path)
    assert herd.stop() == 0
    wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), 10, "the agent to stop")


def test_help_names_the_environment_variables() -> None:
    env = dict(os.environ)
    out = herder(env, "up", "--help").stdout
    assert "HERDER_STORE" in out
    assert "HERDER_LISTEN" in out


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit is reaped by init, maybe later)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_local_herd_does_not_outlive_its_program(tmp_path: Path) -> None:
    """kill -9 of the program that made a LocalHerd: coordinator and agents stop by themselves."""
    script = tmp_path / "program.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import time
            from pathlib import Path
            from herder.local import LocalHerd
            herd = LocalHerd(nodes=2, home=Path({str(tmp_path / "home")!r}))
            herd.start()
            herd.wait_nodes()
            assert herd.process is not None
            print(herd.process.pid, flush=True)
            time.sleep(600)
            """
        )
    )
    program = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert program.stdout is not None
        coordinator = int(program.stdout.readline())
        agents = agent_pids(tmp_path / "home")
        assert len(agents) == 2
        program.kill()
        program.wait(10)
        wait_for(
            lambda: not any(running(p) for p in [coordinator, *agents]),
            20,
            "the orphaned herd to stop",
        )
    finally:
        program.kill()
        program.wait(10)
        if program.stdout is not None:
            program.stdout.close()
        for pid in agent_pids(tmp_path / "home"):
            kill_tree(pid)


def test_a_stop_file_drains_and_ends_the_herd_and_the_log_file_rotates(tmp_path: Path) -> None:
    stop = tmp_path / "stop-now"
    log_file = tmp_path / "logs" / "coordinator.log"
    herd = LocalHerd(
        nodes=2,
        home=tmp_path / "home",
        extra_args=[
            "--stop-file",
            str(stop),
            "--log-file",
            str(log_file),
            "--log-file-max-mb",
            "0.0005",  # ~500 bytes: a few lines per file
        ],
    )
    herd.start()
    try:
        herd.wait_nodes()
        agents = agent_pids(herd.home)
        assert len(agents) == 2
        stop.touch()
        assert herd.process is not None
        assert herd.process.wait(30) == 0
        wait_for(lambda: not any(running(p) for p in agents), 10, "the agents to stop")
        nodes = dict(db_rows(herd.home, "SELECT id, state FROM nodes"))
        assert set(nodes.values()) == {"terminated"}
        logs = sorted(p.name for p in log_file.parent.iterdir())
        assert "coordinator.log" in logs
        assert "coordinator.log.1" in logs  # rotated
        text = "".join(p.read_text() for p in log_file.parent.iterdir())
        assert "stop file" in text
        assert "coordinator stopped" in text
    finally:
        herd.stop()


def test_a_resent_push_is_stored_once(local: LocalHerd, tmp_path: Path) -> None:
    """The answer to a push can be lost; sent again with the same job id, nothing doubles."""
    path = tmp_path / "twice.toml"
    path.write_text('[[tasks]]\nname = "once-{i}"\nmatrix = {i = [1, 2, 3]}\nrun = "true"\n')
    assert local.client is not None
    first = local.client.push_file(path, job_id="j-resent")
    again = local.client.push_file(path, job_id="j-resent")
    assert first == again == {"job_id": "j-resent", "tasks": 3}
    ids = [r[0] for r in db_rows(local.home, "SELECT id FROM tasks WHERE job_id = 'j-resent'")]
    assert sorted(ids) == ["j-resent:once-1", "j-resent:once-2", "j-resent:once-3"]
    bad = herder(local.env(), "push", str(path), check=False)  # a fresh job id each CLI push
    assert bad.returncode == 0
