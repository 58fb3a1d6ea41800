"""A coordinator that serves the tracker routes itself: an agent given only
that address (and the secret) finds it, pairs and runs work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from herder.local import LocalHerd
from tests.helpers import free_port, kill_tree, wait_for


def test_an_agent_finds_a_coordinator_through_the_tracker_it_serves(tmp_path: Path) -> None:
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    local = LocalHerd(
        nodes=0,
        home=tmp_path,
        listen=f"127.0.0.1:{port}",
        extra_args=["--no-beacon", "--serve-tracker"],
    )
    with local as herd:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
        with open(tmp_path / "agent.log", "wb") as log:
            agent = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "herder",
                    "agent",
                    "--node-id",
                    "via-tracker",
                    "--tracker",
                    url,
                    "--secret-file",
                    str(tmp_path / "secret"),
                ],
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        try:
            wait_for(
                lambda: any(
                    n["id"] == "via-tracker" and n["state"] == "ready" for n in herd.nodes()
                ),
                20,
                "the agent to pair through the tracker",
            )
            assert herd.submit(sum, [1, 2, 3]).result(timeout=20) == 6
        finally:
            kill_tree(agent.pid)
            agent.wait(10)
