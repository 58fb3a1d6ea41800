"""The local fleet when its nodes cannot start: spaced retries, the coordinator stays up."""

from __future__ import annotations

import os
import time
from pathlib import Path

from herder.local import LocalHerd
from tests.helpers import herder


def test_agents_that_crash_at_start_are_retried_with_backoff(tmp_path: Path) -> None:
    # Every agent exits at once (a bad HERDER_PREFETCH fails its option parsing),
    # as a broken install would make it.
    env = {**os.environ, "HERDER_PREFETCH": "not-a-number"}
    herd = LocalHerd(nodes=2, home=tmp_path, env=env)
    herd.start()
    try:
        time.sleep(8.0)
        assert herd.process is not None
        assert herd.process.poll() is None, "the coordinator must stay up"
        spawned = len(list((tmp_path / "logs").glob("*.log")))
        # without backoff: 2 nodes every 0.5 s = 32; with it (1, 2, 4 s after the
        # first failures in a row): about 2 + 4 or 5 replacements
        assert 2 < spawned <= 10, spawned
        log = (tmp_path / "coordinator.log").read_text()
        assert "exited before it paired" in log
        assert "next spawn in 4s" in log
        status = herder(herd.env(), "status", "--json")
        assert status.returncode == 0
    finally:
        herd.stop()
