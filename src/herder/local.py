"""A whole herd on this machine in one ``with`` block, like Dask's ``LocalCluster``.

``LocalHerd`` runs ``herder up --local N`` as a child process in its own
herder home, waits until the coordinator is ready (it writes its URL to
``coordinator.json``), and hands back a connected client. Leaving the
block drains and stops it. The demo, the benchmarks and the tests use it;
so can users who want a herd for a notebook.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from herder.errors import HerderError

if TYPE_CHECKING:
    from herder.client import Client

LOG_TAIL_LINES = 20


class LocalHerd:
    """``with LocalHerd(nodes=4) as herd: herd.submit(pow, 2, 10).result()``.

    ``herd="pkg.module:MyHerd"`` runs that fleet policy instead of ``nodes``
    local agents (:meth:`wait_nodes` then needs a count).
    """

    def __init__(
        self,
        nodes: int = 2,
        *,
        herd: str | None = None,
        slots: int = 1,
        home: Path | None = None,
        store: str | None = None,
        listen: str = "127.0.0.1:0",
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 30.0,
        log: IO[Any] | int | None = None,
    ) -> None:
        self._tmp = None if home is not None else tempfile.TemporaryDirectory(prefix="herder-")
        self.home = home if home is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        self.nodes = nodes
        self._args = [
            sys.executable,
            "-m",
            "herder",
            "up",
            *(["--herd", herd] if herd else ["--local", str(nodes)]),
            "--slots",
            str(slots),
            "--listen",
            listen,
            *(["--store", store] if store else []),
            "--parent-pid",  # no herd outlives the program that started it
            str(os.getpid()),
            *(extra_args or []),
        ]
        self._env = {**(env if env is not None else os.environ), "HERDER_HOME": str(self.home)}
        self._env.pop("HERDER_URL", None)
        self._env.pop("HERDER_TOKEN", None)
        self._ready_timeout = ready_timeout
        self._log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.client: Client | None = None

    @property
    def state_path(self) -> Path:
        return self.home / "coordinator.json"

    def start(self) -> Client:
        """Start the coordinator (its log goes to ``<home>/coordinator.log``) and connect."""
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / "coordinator.log", "ab") as log_file:
            out = self._log if self._log is not None else log_file
            self.process = subprocess.Popen(
                self._args, env=self._env, stdout=out, stderr=out, start_new_session=True
            )
        # imported now, not with this module: while the coordinator starts on another core
        from herder.client import Client

        self.url = self.wait_coordinator(self._ready_timeout)
        try:
            self.client = Client(env=self._env)
        except HerderError as exc:  # it recorded its URL, then stopped: say why
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
            raise HerderError(f"{exc}{self._exit_report()}") from exc
        return self.client

    def _exit_report(self) -> str:
        """How ``herder up`` ended, with the end of its log (a failure names its cause there)."""
        if self.process is None or self.process.poll() is None:
            return ""
        try:
            lines = (self.home / "coordinator.log").read_text(errors="replace").splitlines()
        except OSError as exc:
            lines = [f"(no log: {exc})"]
        tail = "\n".join(lines[-LOG_TAIL_LINES:])
        return f"\nherder up exited with code {self.process.returncode}; its log ends:\n{tail}"

    def wait_coordinator(self, timeout: float) -> str:
        """Wait until the coordinator recorded its URL; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise HerderError(f"the coordinator did not start{self._exit_report()}")
            with contextlib.suppress(OSError, ValueError, KeyError):
                state = json.loads(self.state_path.read_text())
                if self.process is None or state["pid"] == self.process.pid:
                    return str(state["url"])
            time.sleep(0.005)  # a cheap look at a small file; every ms counts at cold start
        raise HerderError(f"the coordinator was not ready within {timeout}s")

    def wait_nodes(self, count: int | None = None, timeout: float = 30.0) -> None:
        """Wait until ``count`` (default: all) nodes are paired and ready."""
        assert self.client is not None
        want = self.nodes if count is None else count
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = [n for n in self.client.nodes() if n["state"] in ("ready", "busy")]
            if len(ready) >= want:
                return
            time.sleep(0.05)
        raise HerderError(f"{want} nodes were not ready within {timeout}s")

    def env(self) -> dict[str, str]:
        """The environment that points a client or the CLI at this herd."""
        return dict(self._env)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the coordinator (an orderly drain) and wait; kill it if it hangs."""
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return self.process.returncode

    def kill(self) -> None:
        """kill -9 the coordinator (and with it nothing else: agents live on)."""
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> Client:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
