"""The parts of service mode that need no herd: the back-off rule, the settings,
the agent's health checks (real commands, a real HTTP server) and the client's checks."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pydantic
import pytest

from herder import protocol
from herder.agent.health import Health, HealthCheck, watch
from herder.client import _service_spec
from herder.errors import SubmissionError
from herder.model import ServiceSpec, restart_backoff


@pytest.mark.parametrize(
    ("previous", "ran", "delay"),
    [
        (0.0, 0.5, 1.0),
        (1.0, 0.5, 2.0),
        (32.0, 9.99, 60.0),
        (60.0, 1.0, 60.0),
        (60.0, 10.0, 0.0),  # a run of 10 s resets the back-off
        (0.0, 3600.0, 0.0),
    ],
)
def test_restart_backoff(previous: float, ran: float, delay: float) -> None:
    assert restart_backoff(previous, ran) == delay


def test_service_spec_tells_a_url_from_a_command() -> None:
    url = ServiceSpec(health="https://host:8443/ready", health_s=3)
    assert (url.health_url, url.health_argv(), url.first_check_s) == (
        "https://host:8443/ready",
        None,
        3,
    )
    shell = ServiceSpec(health="curl -fs http://x/", grace_s=30)
    assert (shell.health_url, shell.health_argv(), shell.first_check_s) == (
        None,
        ["sh", "-c", "curl -fs http://x/"],
        30,
    )
    assert ServiceSpec().health_argv() is None


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"health": ""}, "must not be empty"),
        ({"health": []}, "non-empty list"),
        ({"health": ["", "x"]}, "non-empty list"),
        ({"health": "https:/x"}, "must start with http:// or https://"),
        ({"health_s": 0}, "greater than 0"),
        ({"unhealthy_after": 0}, "greater than or equal to 1"),
        ({"grace_s": -1}, "greater than or equal to 0"),
        ({"every": 3}, "Extra inputs"),
    ],
)
def test_service_spec_refuses(settings: dict[str, Any], fragment: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=fragment):
        ServiceSpec(**settings)


def test_the_client_refuses_health_options_without_a_service() -> None:
    assert _service_spec(False, {}) is None
    assert _service_spec(True, {"health_s": 2}) == ServiceSpec(health_s=2)
    with pytest.raises(SubmissionError, match="health: only for a service"):
        _service_spec(False, {"health": "true"})
    with pytest.raises(SubmissionError, match="inside the ServiceSpec"):
        _service_spec(ServiceSpec(), {"health_s": 1})


# --- health state -------------------------------------------------------------------


def test_health_counts_failures_in_a_row() -> None:
    health = Health()
    assert health.report("t", "l").state == "starting"
    health.record("down", 1.0)
    health.record("still down", 2.0)
    assert (health.state, health.failures, health.error, health.checked_at) == (
        "unhealthy",
        2,
        "still down",
        2.0,
    )
    health.record(None, 3.0)
    assert (health.state, health.failures, health.error) == ("healthy", 0, None)
    health.record("x" * 2000, 4.0)
    report = health.report("t", "l")
    assert report.error is not None
    assert len(report.error) == protocol.HEALTH_ERROR_CHARS
    assert (report.task_id, report.lease_id, report.failures) == ("t", "l", 1)


# --- command checks ---------------------------------------------------------------------


def check(tmp_path: Path, **settings: Any) -> HealthCheck:
    return HealthCheck(
        ServiceSpec(**settings), cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "MARK": "here"}
    )


def test_a_command_runs_in_the_scratch_directory_with_the_environment(tmp_path: Path) -> None:
    (tmp_path / "ready").write_text("yes")
    ok = check(tmp_path, health='test -f ready && test "$MARK" = here')
    assert asyncio.run(ok.check()) is None
    failing = check(tmp_path, health=["sh", "-c", "echo not ready; exit 7"])
    assert asyncio.run(failing.check()) == "sh exited with code 7: not ready"


def test_a_command_that_cannot_start(tmp_path: Path) -> None:
    error = asyncio.run(check(tmp_path, health=["/no/such/program"]).check())
    assert error is not None
    assert error.startswith("cannot run /no/such/program")
    gone = HealthCheck(ServiceSpec(health="true"), cwd=tmp_path / "missing", env={})
    assert asyncio.run(gone.check()) is not None


def test_a_command_past_its_timeout_is_killed_with_what_it_started(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    slow = check(tmp_path, health=f"sleep 30 & echo $! > {pidfile}; wait", health_timeout_s=0.3)
    began = time.monotonic()
    assert asyncio.run(slow.check()) == "sh: no answer within 0.3s"
    assert time.monotonic() - began < 5
    child = int(pidfile.read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"


# --- URL checks ---------------------------------------------------------------------------


class _Answer(BaseHTTPRequestHandler):
    status = 200
    delay_s = 0.0

    def do_GET(self) -> None:
        time.sleep(self.delay_s)
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[ThreadingHTTPServer, type[_Answer]]]:
    handler = type("Answer", (_Answer,), {})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd, handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_a_url_is_healthy_when_it_answers_2xx(
    tmp_path: Path, server: tuple[ThreadingHTTPServer, type[_Answer]]
) -> None:
    httpd, handler = server
    url = f"http://127.0.0.1:{httpd.server_address[1]}/health"
    probe = check(tmp_path, health=url, health_timeout_s=0.5)
    assert asyncio.run(probe.check()) is None
    handler.status = 503
    assert asyncio.run(probe.check()) == f"GET {url}: HTTP 503"
    handler.status, handler.delay_s = 200, 1.5
    assert asyncio.run(probe.check()) == f"GET {url}: no answer within 0.5s"
    handler.delay_s = 0.0
    httpd.shutdown()
    httpd.server_close()
    refused = asyncio.run(probe.check())
    assert refused is not None
    assert refused.startswith(f"GET {url}: ConnectError")


# --- the watch loop -------------------------------------------------------------------------


def test_watch_returns_after_enough_failures_in_a_row(tmp_path: Path) -> None:
    marker = tmp_path / "up"
    marker.touch()
    spec = {"health": "test -f up", "health_s": 0.05, "grace_s": 0.0, "unhealthy_after": 3}
    probe = check(tmp_path, **spec)
    health = Health()

    async def scenario() -> float:
        task = asyncio.ensure_future(watch(probe, health))
        await asyncio.sleep(0.3)
        assert not task.done()
        assert health.state == "healthy"
        marker.unlink()
        began = time.monotonic()
        await asyncio.wait_for(task, 5)
        return time.monotonic() - began

    took = asyncio.run(scenario())
    assert (health.state, health.failures) == ("unhealthy", 3)
    assert took >= 0.1  # three checks, 0.05 s apart
