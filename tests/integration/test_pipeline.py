"""Command tasks in four phases against a real herd and a real datastore.

fetch -> run -> upload -> cleanup, outputs feeding later tasks through the
datastore (``file://`` here, S3 through moto in test_pipeline_s3), the
history of each phase, and the ways a phase fails.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from herder.local import LocalHerd
from tests.helpers import herder, wait_for


def push(herd: LocalHerd, tmp_path: Path, text: str, name: str = "tasks.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    out = herder(herd.env(), "push", str(path), "--json")
    job_id: str = json.loads(out.stdout)["job_id"]
    return job_id


def wait_job(herd: LocalHerd, job_id: str, timeout: float = 120) -> dict[str, object]:
    assert herd.client is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        summary = herd.client.job(job_id)
        if summary["finished"]:
            return summary
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


def task_named(herd: LocalHerd, job_id: str, name: str) -> dict[str, object]:
    assert herd.client is not None
    for t in herd.client.tasks(job=job_id, limit=10_000):
        if t["name"] == name:
            return herd.client.task(t["id"])
    raise AssertionError(f"no task {name} in job {job_id}")


@pytest.fixture(scope="module")
def herd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHerd]:
    home = tmp_path_factory.mktemp("herd")
    scratch = tmp_path_factory.mktemp("scratch")
    env = {**os.environ, "HERDER_SCRATCH_DIR": str(scratch)}
    local = LocalHerd(nodes=2, slots=2, home=home, env=env)
    local.scratch = scratch  # type: ignore[attr-defined]
    local.start()
    local.wait_nodes()
    try:
        yield local
    finally:
        local.stop()


def test_fan_out_fan_in_over_the_datastore(herd: LocalHerd, tmp_path: Path) -> None:
    """200 producers, each output fetched by one summary task: the classic pipeline."""
    job = push(
        herd,
        tmp_path,
        """
        job = "squares"
        [[tasks]]
        name = "sq-{i}"
        matrix = {i = [@VALUES@]}
        run = "mkdir -p out && echo $(( {i} * {i} )) > out/value.txt"
        upload = ["out/*.txt"]

        [[tasks]]
        name = "total"
        fetch = [{from = "sq-*", path = "out/value.txt", dest = "parts"}]
        run = "cat parts/*/out/value.txt | paste -sd+ | bc > total.txt"
        upload = ["total.txt"]
        """.replace("@VALUES@", ", ".join(str(i) for i in range(200))),
    )
    summary = wait_job(herd, job, timeout=240)
    assert summary["counts"] == {"succeeded": 201}, summary
    assert herd.client is not None
    assert (
        herd.client.data.cat(f"jobs/{job}/total/total.txt").strip()
        == str(sum(i * i for i in range(200))).encode()
    )
    detail = task_named(herd, job, "total")
    attempt = detail["attempts"][-1]  # type: ignore[index]
    assert [p["phase"] for p in attempt["phases"]] == ["fetch", "run", "upload", "cleanup"]
    assert all(p["outcome"] == "ok" for p in attempt["phases"])
    assert all(p["end"] >= p["start"] for p in attempt["phases"])
    uploads = detail["task"]["output"]["uploads"]  # type: ignore[index]
    assert [u["key"] for u in uploads] == [f"jobs/{job}/total/total.txt"]
    assert len(uploads[0]["sha256"]) == 64
    # cleanup: nothing of any attempt is left in the scratch directory
    assert list(herd.scratch.iterdir()) == []  # type: ignore[attr-defined]

    out = tmp_path / "results"
    got = json.loads(herder(herd.env(), "results", job, "--out", str(out), "--json").stdout)
    assert len(got) == 201
    assert (out / "sq-7" / "out" / "value.txt").read_text().strip() == "49"


def test_a_missing_input_fails_the_fetch_naming_the_key(herd: LocalHerd, tmp_path: Path) -> None:
    job = push(
        herd,
        tmp_path,
        """
        [[tasks]]
        name = "needs-input"
        fetch = ["inputs/not-there.csv"]
        run = "true"
        retries = 0
        """,
    )
    wait_job(herd, job)
    detail = task_named(herd, job, "needs-input")
    task = detail["task"]
    assert task["state"] == "failed"  # type: ignore[index]
    assert task["reason"] == "input_missing"  # type: ignore[index]
    assert "inputs/not-there.csv" in task["error"]["message"]  # type: ignore[index]
    assert task["error"]["phase"] == "fetch"  # type: ignore[index]
    phases = detail["attempts"][-1]["phases"]  # type: ignore[index]
    assert [(p["phase"], p["outcome"]) for p in phases] == [
        ("fetch", "input_missing"),
        ("cleanup", "ok"),
    ]


def test_inputs_by_key_and_a_failing_run_shows_its_stderr(herd: LocalHerd, tmp_path: Path) -> None:
    assert herd.client is not None
    herd.client.data.put("inputs/words.txt", b"alpha\nbeta\n")
    job = push(
        herd,
        tmp_path,
        """
        [[tasks]]
        name = "count"
        fetch = ["inputs/words.txt"]
        run = "wc -l < words.txt > n.txt"
        upload = ["n.txt"]

        [[tasks]]
        name = "broken"
        run = "echo going wrong >&2; exit 3"
        retries = 0
        """,
    )
    wait_job(herd, job)
    assert herd.client.data.cat(f"jobs/{job}/count/n.txt").strip() == b"2"
    broken = task_named(herd, job, "broken")["task"]
    assert broken["reason"] == "exit code"  # type: ignore[index]
    assert broken["output"]["returncode"] == 3  # type: ignore[index]
    assert broken["error"]["phase"] == "run"  # type: ignore[index]
    assert "going wrong" in broken["output"]["stderr_tail"]  # type: ignore[index]
    shown = herder(herd.env(), "task", broken["id"]).stdout  # type: ignore[index]
    assert "run: exit code" in shown
    assert "going wrong" in shown


def test_a_timeout_kills_the_command_and_still_cleans_up(herd: LocalHerd, tmp_path: Path) -> None:
    pidfile = tmp_path / "sleeper.pid"
    job = push(
        herd,
        tmp_path,
        f"""
        [[tasks]]
        name = "slow"
        run = "sleep 60 & echo $! > {pidfile}; wait"
        timeout = 1
        retries = 0
        """,
    )
    wait_job(herd, job, timeout=30)
    task = task_named(herd, job, "slow")
    assert task["task"]["reason"] == "timeout"  # type: ignore[index]
    phases = task["attempts"][-1]["phases"]  # type: ignore[index]
    assert [(p["phase"], p["outcome"]) for p in phases] == [
        ("fetch", "ok"),
        ("run", "timeout"),
        ("cleanup", "ok"),
    ]
    sleeper = int(pidfile.read_text())
    wait_for(lambda: not psutil.pid_exists(sleeper), 5, "the command's child to be killed")
    assert list(herd.scratch.iterdir()) == []  # type: ignore[attr-defined]


def test_cancel_kills_a_running_command(herd: LocalHerd, tmp_path: Path) -> None:
    pidfile = tmp_path / "cancelled.pid"
    job = push(
        herd,
        tmp_path,
        f"""
        [[tasks]]
        name = "long"
        run = "echo $$ > {pidfile}; sleep 60"
        """,
    )
    wait_for(pidfile.exists, 20, "the command to start")
    wait_for(lambda: pidfile.read_text().strip(), 5, "the pid to be written")
    pid = int(pidfile.read_text())
    herder(herd.env(), "cancel", "--job", job)
    wait_for(lambda: not psutil.pid_exists(pid), 10, "the cancelled command to die")
    wait_job(herd, job)
    wait_for(
        lambda: list(herd.scratch.iterdir()) == [],  # type: ignore[attr-defined]
        10,
        "the cancelled task's scratch to be removed",
    )


def test_keep_scratch_and_rerun_here(herd: LocalHerd, tmp_path: Path) -> None:
    assert herd.client is not None
    herd.client.data.put("inputs/greeting.txt", b"hello")
    job = push(
        herd,
        tmp_path,
        """
        [[tasks]]
        name = "greet"
        fetch = [{key = "inputs/greeting.txt", dest = "in/g.txt"}]
        run = "cat in/g.txt > out.txt; echo ' world' >> out.txt; echo done"
        upload = ["out.txt"]
        keep_scratch = true
        """,
    )
    wait_job(herd, job)
    detail = task_named(herd, job, "greet")
    kept = Path(detail["task"]["output"]["scratch"])  # type: ignore[index]
    assert (kept / "work" / "out.txt").read_text() == "hello world\n"
    assert detail["attempts"][-1]["phases"][-1]["outcome"] == "kept"  # type: ignore[index]
    stored = herd.client.data.info(f"jobs/{job}/greet/out.txt")

    rerun = herder(herd.env(), "task", detail["task"]["id"], "--rerun-here")  # type: ignore[index]
    text = rerun.stdout
    for step in ("[fetch] start", "inputs/greeting.txt -> in/g.txt", "[run] ok", "$ sh -c"):
        assert step in text, text
    assert "would go to" in text  # listed, not uploaded
    assert "done" in text
    scratch = Path(text.split("scratch kept in ", 1)[1].split()[0])
    assert (scratch / "work" / "out.txt").read_text() == "hello world\n"
    # the rerun changed nothing stored
    assert herd.client.data.info(f"jobs/{job}/greet/out.txt") == stored


def test_upload_pattern_that_matches_nothing_fails_the_task(
    herd: LocalHerd, tmp_path: Path
) -> None:
    job = push(
        herd,
        tmp_path,
        """
        [[tasks]]
        name = "forgetful"
        run = "true"
        upload = ["result-*.csv"]
        retries = 0
        """,
    )
    wait_job(herd, job)
    task = task_named(herd, job, "forgetful")["task"]
    assert task["reason"] == "output_missing"  # type: ignore[index]
    assert "result-*.csv" in task["error"]["message"]  # type: ignore[index]


def test_output_is_streamed_while_the_command_runs(herd: LocalHerd, tmp_path: Path) -> None:
    release = tmp_path / "release"
    job = push(
        herd,
        tmp_path,
        f"""
        [[tasks]]
        name = "chatty"
        run = "echo first line; echo to stderr >&2; while [ ! -e {release} ]; do sleep 0.1; done"
        timeout = 60
        """,
    )
    assert herd.client is not None
    client = herd.client
    task_id = wait_for(
        lambda: next((t["id"] for t in client.tasks(job=job) if t["state"] == "running"), None),
        30,
        "the command to run",
    )

    def live() -> dict[str, str] | None:
        streams: dict[str, str] | None = client.task(task_id)["live"]
        if streams and "first line" in streams.get("stdout", "") and streams.get("stderr"):
            return streams
        return None

    streams = wait_for(live, 10, "the running command's output to reach the coordinator")
    assert streams["stderr"] == "to stderr\n"
    shown = herder(herd.env(), "task", task_id).stdout
    assert "stdout (live, still running)" in shown
    assert "first line" in shown
    release.touch()
    wait_job(herd, job)
    done = client.task(task_id)
    assert done["live"] is None  # dropped once the result is in
    assert done["task"]["output"]["stdout_tail"] == "first line\n"


def test_tasks_do_not_see_the_join_token(herd: LocalHerd, tmp_path: Path) -> None:
    job = push(
        herd,
        tmp_path,
        """
        [[tasks]]
        name = "nosy"
        run = "env > env.txt"
        upload = ["env.txt"]
        """,
    )
    wait_job(herd, job)
    assert herd.client is not None
    seen = herd.client.data.cat(f"jobs/{job}/nosy/env.txt").decode()
    assert "HERDER_TASK_ID=" in seen
    assert "HERDER_JOIN" not in seen
    assert "hd1." not in seen  # no join token under any name


def test_inputs_from_urls(herd: LocalHerd, tmp_path: Path) -> None:
    """http(s) inputs: fetched into the scratch directory; a 404 is input_missing."""
    import http.server
    import threading

    site = tmp_path / "site"
    site.mkdir()
    (site / "genome.fa").write_text(">chr1\nACGT\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(site), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        job = push(
            herd,
            tmp_path,
            f"""
            [[tasks]]
            name = "from-web"
            fetch = [{{url = "{base}/genome.fa"}}, {{url = "{base}/genome.fa", dest = "ref/g.fa"}}]
            run = "cmp genome.fa ref/g.fa && grep -c ACGT genome.fa > n.txt"
            upload = ["n.txt"]

            [[tasks]]
            name = "dead-link"
            fetch = [{{url = "{base}/missing.fa"}}]
            run = "true"
            retries = 0
            """,
        )
        wait_job(herd, job)
    finally:
        server.shutdown()
        server.server_close()
    assert herd.client is not None
    assert herd.client.data.cat(f"jobs/{job}/from-web/n.txt").strip() == b"1"
    dead = task_named(herd, job, "dead-link")["task"]
    assert dead["reason"] == "input_missing"  # type: ignore[index]
    assert f"{base}/missing.fa" in dead["error"]["message"]  # type: ignore[index]
