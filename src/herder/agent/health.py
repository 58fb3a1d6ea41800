"""Health checks of a running service, made by the agent that runs it.

A check is a command (exit 0 is healthy) run in the service's scratch
directory with its environment, or an http(s) URL (a 2xx answer is
healthy), each bounded by ``health_timeout_s``. The first check comes
``grace_s`` after the start, then one every ``health_s`` (start to start).
:func:`watch` returns once ``unhealthy_after`` checks in a row failed: the
agent then kills the service and reports it failed as ``unhealthy``, and
the store restarts it. Checks run in the agent, not in the slot's worker:
the worker is busy waiting for the service, and a check must go on even
when the service's own process is wedged.

The outcome of each check is kept in a :class:`Health`, which the agent
sends with its heartbeats so ``herder services`` can show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from herder import protocol
from herder.model import ServiceSpec

OUTPUT_CHARS = 200  # of a failed check's output, kept as its error text


@dataclass
class Health:
    """What the checks of one service run found so far."""

    state: protocol.HealthState = "starting"
    checked_at: float | None = None
    error: str | None = None
    failures: int = 0  # consecutive failed checks

    def record(self, error: str | None, at: float) -> None:
        self.checked_at = at
        self.error = error
        if error is None:
            self.state, self.failures = "healthy", 0
        else:
            self.state, self.failures = "unhealthy", self.failures + 1

    def report(self, task_id: str, lease_id: str) -> protocol.HealthReport:
        error = self.error
        if error is not None and len(error) > protocol.HEALTH_ERROR_CHARS:
            error = error[: protocol.HEALTH_ERROR_CHARS - 3] + "..."
        return protocol.HealthReport(
            task_id=task_id,
            lease_id=lease_id,
            state=self.state,
            checked_at=self.checked_at,
            error=error,
            failures=self.failures,
        )


class HealthCheck:
    """One service's check: ``await check()`` is None when healthy, else why not."""

    def __init__(self, spec: ServiceSpec, *, cwd: Path, env: dict[str, str]) -> None:
        self.spec = spec
        self.cwd = cwd
        self.env = env

    async def check(self) -> str | None:
        url = self.spec.health_url
        if url is not None:
            return await self._get(url)
        argv = self.spec.health_argv()
        if argv is None:
            return None
        return await self._run(argv)

    async def _get(self, url: str) -> str | None:
        # No proxy from the environment: the URL is on or near the node, and a
        # proxy would answer for it (or refuse it) instead of the service.
        import httpx  # only services with an HTTP check pay for it

        try:
            async with httpx.AsyncClient(
                trust_env=False, timeout=self.spec.health_timeout_s, follow_redirects=True
            ) as client:
                response = await client.get(url)
        except httpx.TimeoutException:
            return f"GET {url}: no answer within {self.spec.health_timeout_s:g}s"
        except httpx.HTTPError as exc:
            return f"GET {url}: {type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return None
        return f"GET {url}: HTTP {response.status_code}"

    async def _run(self, argv: list[str]) -> str | None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=self.cwd,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # a timeout kills everything the check started
            )
        except OSError as exc:
            return f"cannot run {argv[0]}: {exc.strerror or exc}"
        try:
            async with asyncio.timeout(self.spec.health_timeout_s):
                output, _ = await proc.communicate()
        except TimeoutError:
            return f"{argv[0]}: no answer within {self.spec.health_timeout_s:g}s"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.returncode is None:
                await proc.wait()
        if proc.returncode == 0:
            return None
        text = output.decode(errors="replace").strip()[-OUTPUT_CHARS:]
        return f"{argv[0]} exited with code {proc.returncode}" + (f": {text}" if text else "")


async def watch(check: HealthCheck, health: Health) -> None:
    """Check until the service is to be killed (``unhealthy_after`` failures in a row)."""
    spec = check.spec
    await asyncio.sleep(spec.first_check_s)
    while True:
        began = time.monotonic()
        health.record(await check.check(), time.time())
        if health.failures >= spec.unhealthy_after:
            return
        await asyncio.sleep(max(0.0, spec.health_s - (time.monotonic() - began)))
