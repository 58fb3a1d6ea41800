"""Herds (fleet policies) the fleet tests run with ``herder up --herd tests.herds:Name``.

They are user code as a real user would write it: Herd subclasses, and two
small providers of their own (one that always fails, one whose nodes never
pair). Callbacks append JSON lines to the file named by ``HERDER_TEST_LOG``,
so the test reads what happened, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from typing import Any

from herder.herd import Herd
from herder.model import EventRecord, NodeRecord
from herder.providers.base import LaunchSpec, NodeHandle, Provider, SpawnResult
from herder.providers.ec2 import EC2
from herder.providers.local import LocalProvider


def note(*fields: Any) -> None:
    path = os.environ.get("HERDER_TEST_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps([time.time(), *fields]) + "\n")


class KeepFour(Herd):
    provider = LocalProvider()
    target = 4
    max_nodes = 4
    boot_timeout_s = 30.0


class Recorder(Herd):
    """Two nodes; every callback noted; ``on_node_up`` of the first node raises."""

    provider = LocalProvider()
    target = 2
    max_nodes = 3

    def __init__(self) -> None:
        super().__init__()
        self.ups = 0
        self.telemetry_seen: set[str] = set()

    async def on_node_up(self, node: NodeRecord) -> None:
        self.ups += 1
        note("up", node.id, node.state)
        if self.ups == 1:
            raise RuntimeError("on_node_up failed on purpose")

    async def on_node_down(self, node: NodeRecord, reason: str) -> None:
        note("down", node.id, reason)

    async def on_terminated(self, node: NodeRecord) -> None:
        note("terminated", node.id)

    async def on_telemetry(self, node: NodeRecord, data: dict[str, Any]) -> None:
        if node.id not in self.telemetry_seen:
            self.telemetry_seen.add(node.id)
            note("telemetry", node.id, sorted(data))

    async def on_event(self, event: EventRecord) -> None:
        if event.action.startswith("node_") and event.node_id:
            note("event", event.action, event.node_id)


class FailingProvider(Provider):
    """A provider whose cloud refuses every request."""

    name = "failing"

    async def spawn(self, node_ids: list[str], launch: LaunchSpec) -> SpawnResult:
        note("spawn", len(node_ids))
        raise RuntimeError("InsufficientInstanceCapacity: no capacity today")

    async def terminate(self, node_id: str, grace: float) -> None:
        return None

    async def list_own(self) -> list[NodeHandle]:
        return []


class Broken(Herd):
    provider = FailingProvider()
    target = 2


class NeverPairs(Provider):
    """Machines that boot but whose agent never pairs (a broken image, say):
    ``sleep`` processes standing in for them."""

    name = "neverpairs"

    def __init__(self) -> None:
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    async def spawn(self, node_ids: list[str], launch: LaunchSpec) -> SpawnResult:
        result = SpawnResult()
        for node_id in node_ids:
            proc = await asyncio.create_subprocess_exec("sleep", "600", start_new_session=True)
            self.procs[node_id] = proc
            note("spawned", node_id, proc.pid)
            result.started.append(NodeHandle(node_id, self.name, f"pid {proc.pid}"))
        return result

    async def terminate(self, node_id: str, grace: float) -> None:
        proc = self.procs.pop(node_id, None)
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
            note("killed", node_id, proc.pid)

    async def list_own(self) -> list[NodeHandle]:
        return [
            NodeHandle(n, self.name, f"pid {p.pid}")
            for n, p in self.procs.items()
            if p.returncode is None
        ]


class SlowBoot(Herd):
    provider = NeverPairs()
    target = 1
    max_nodes = 2
    boot_timeout_s = 1.5


class Autoscale(Herd):
    provider = LocalProvider()
    min_nodes, max_nodes = 0, 3
    idle_s = 1.5
    scale_up_after_s = 0.3


class PickyInit(Herd):
    """Rejects the first node it prepares; the rest are welcome."""

    provider = LocalProvider()
    target = 1
    max_nodes = 1

    def __init__(self) -> None:
        super().__init__()
        self.rejected = False

    async def init_node(self, node: NodeRecord) -> None:
        note("init", node.id)
        if not self.rejected:
            self.rejected = True
            raise RuntimeError("this node is not fit")


class OnEC2(Herd):
    """Spot instances in moto's EC2 (their agents never run: nothing boots there)."""

    provider = EC2(
        ami=os.environ.get("HERDER_TEST_AMI", "ami-unset"),
        region="us-west-1",
        instance_type="c5.large",
        spot_price=0.15,
        endpoint_url=os.environ.get("HERDER_TEST_EC2_URL"),
        install="true",
    )
    target = 2
    max_nodes = 3
    boot_timeout_s = float(os.environ.get("HERDER_TEST_BOOT_TIMEOUT", "3"))
    inventory_s = 1.0
