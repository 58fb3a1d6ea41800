"""The ssh provider against real sshd servers in network namespaces and a real coordinator.

Three namespaces stand for three hosts. sshd runs in the first two; the
third has none (a host that is down). The coordinator listens on 0.0.0.0 and
the agents reach it at the root side of their veth pair. The namespaces have
no route to a package index, so the provider installs offline: herder and
every dependency are copied as wheels into one venv per host. Those venvs
live as long as this module, so only the first spawn on a host installs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest

from herder.local import LocalHerd
from herder.providers.base import LaunchSpec, NodeHandle
from herder.providers.ssh import SSH, SSHHost
from tests.helpers import free_port, herder, wait_for
from tests.netns import Namespace, SSHServer, host_namespaces, make_key, sshd

pytestmark = pytest.mark.slow

CLUSTER = "ssh-test"
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Site:
    """The herd and the hosts every test here shares."""

    herd: LocalHerd
    join: str  # TOKEN@URL with the address the namespaces reach
    hosts: list[Namespace]
    servers: list[SSHServer]
    dirs: list[Path]  # each host's herder dir (the namespaces share this filesystem)

    def host(self, i: int, **options: Any) -> SSHHost:
        """Host ``i`` as the provider sees it; the first checks its host key."""
        known = self.servers[0].known_hosts if i == 0 else None
        return SSHHost(
            host=self.hosts[i].address,
            key=self.servers[0].client_key,
            dir=str(self.dirs[i]),
            known_hosts=known,
            **options,
        )

    def provider(self, *indexes: int, **options: Any) -> SSH:
        options = {"per_host": 1, "install": "offline", "connect_timeout": 5.0, **options}
        provider = SSH([self.host(i) for i in indexes], **options)
        provider.attach(cluster=CLUSTER, home=self.herd.home)
        return provider

    def launch(self, **options: Any) -> LaunchSpec:
        return LaunchSpec(join=self.join, cluster=CLUSTER, orphan_after_s=60, **options)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("ssh")
    key = make_key(base / "client_key")
    with (
        host_namespaces(3) as hosts,
        sshd(hosts[0], base / "sshd0", client_key=key) as s0,
        sshd(hosts[1], base / "sshd1", client_key=key) as s1,
    ):
        herd = LocalHerd(nodes=0, home=base / "herd", listen="0.0.0.0:0")
        herd.start()
        try:
            port = urlsplit(herd.url).port
            url = f"https://{hosts[0].gateway}:{port}"
            join = herder(herd.env(), "token", "--url", url).stdout.strip()
            dirs = [base / f"host{i}" for i in range(3)]
            yield Site(herd, join, hosts, [s0, s1], dirs)
        finally:
            herd.stop()


def nodes(site: Site) -> dict[str, dict[str, Any]]:
    return {n["id"]: n for n in json.loads(herder(site.herd.env(), "nodes", "--json").stdout)}


def wait_paired(site: Site, node_ids: list[str], timeout: float = 60) -> None:
    def paired() -> bool:
        known = nodes(site)
        return all(known.get(n, {}).get("state") in ("ready", "busy") for n in node_ids)

    wait_for(paired, timeout, f"{node_ids} to pair", every=0.2)


def agent_processes(node_id: str) -> list[psutil.Process]:
    """Live (not zombie) processes that are the agent of ``node_id``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        alive = proc.info["status"] != psutil.STATUS_ZOMBIE
        if alive and "agent" in cmdline and node_id in cmdline:
            found.append(proc)
    return found


async def terminate_all(provider: SSH, handles: list[NodeHandle]) -> None:
    await asyncio.gather(*(provider.terminate(h.node_id, grace=10) for h in handles))


async def test_agents_boot_pair_run_tasks_and_are_terminated(site: Site, tmp_path: Path) -> None:
    provider = site.provider(0, 1, 2)
    assert provider.capacity() == 3
    try:
        result = await provider.spawn(["ssh-a", "ssh-b", "ssh-c"], site.launch())
        where = {h.node_id: str(h.address) for h in result.started}  # node id -> host label
        assert set(where) == {"ssh-a", "ssh-b"}, result
        assert set(where.values()) == {provider.hosts[0].label, provider.hosts[1].label}
        # The third node had nowhere to go: the down host is named, with why.
        assert list(result.failed) == ["ssh-c"]
        assert "no free host" in result.failed["ssh-c"]
        assert f"host {provider.hosts[2].label} unreachable" in result.failed["ssh-c"]

        await asyncio.to_thread(wait_paired, site, list(where))
        assert {nodes(site)[n]["provider"] for n in where} == {"ssh"}
        check_agents_run_on_their_hosts(site, provider, where)
        check_token_is_in_no_argv_and_no_log(site)
        await asyncio.to_thread(run_tasks_on_both, site, tmp_path, where)

        owned = await provider.list_own()  # the down host is skipped, not an error
        assert {h.node_id for h in owned} == set(where)

        pids = {n: agent_processes(n)[0].pid for n in where}
        await terminate_all(provider, result.started)
        for node_id, pid in pids.items():
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
            assert agent_processes(node_id) == []
        assert await provider.list_own() == []
        await terminate_all(provider, result.started)  # idempotent
        check_only_pid_records_removed(site, provider, where)
        await asyncio.to_thread(
            wait_for,
            lambda: all(nodes(site)[n]["state"] == "terminated" for n in where),
            30,
            "the coordinator to see the agents leave",
        )
    finally:
        await provider.close()


def host_index(provider: SSH, label: str) -> int:
    return [h.label for h in provider.hosts].index(label)


def check_agents_run_on_their_hosts(site: Site, provider: SSH, where: dict[str, str]) -> None:
    for node_id, label in where.items():
        (proc,) = agent_processes(node_id)
        assert proc.pid in site.hosts[host_index(provider, label)].pids()
        assert "HERDER_JOIN" in proc.environ()  # how the token reached it


def check_token_is_in_no_argv_and_no_log(site: Site) -> None:
    secret = site.join.split("@")[0].split(".")[1]
    for proc in psutil.process_iter(["cmdline"]):
        assert secret not in " ".join(proc.info["cmdline"] or [])
    for log in [*site.dirs[0].glob("logs/*"), *site.dirs[1].glob("logs/*")]:
        assert secret not in log.read_text()


def check_only_pid_records_removed(site: Site, provider: SSH, where: dict[str, str]) -> None:
    """The venvs and the logs stay on the hosts; the pid records go."""
    for i in (0, 1):
        assert (site.dirs[i] / "venv" / "bin" / "python").exists()
        assert list((site.dirs[i] / "run").glob("*.json")) == []
    for node_id, label in where.items():
        log = site.dirs[host_index(provider, label)] / "logs" / f"{node_id}.log"
        assert log.stat().st_size > 0
    assert not site.dirs[2].exists()


def run_tasks_on_both(site: Site, tmp_path: Path, where: dict[str, str]) -> None:
    """Push a tasks file; each task reports the addresses of the host it ran on."""
    tasks = tmp_path / "tasks.toml"
    tasks.write_text(
        textwrap.dedent(
            """
            job = "where"
            [[tasks]]
            name = "where-{i}"
            run = "sleep 0.5; ip -4 -o addr show"
            matrix = { i = ["1", "2", "3", "4", "5", "6", "7", "8"] }
            """
        )
    )
    env = site.herd.env()
    job = json.loads(herder(env, "push", str(tasks), "--json").stdout)["job_id"]
    herder(env, "wait", job, "--json")
    client = site.herd.client
    assert client is not None
    ran_on: dict[str, set[str]] = {}
    for task in client.tasks(job=job, limit=100):
        assert task["state"] == "succeeded", task
        out = client.task(task["id"])["task"]["output"]["stdout_tail"]
        ran_on.setdefault(task["node_id"], set()).add(out)
    assert set(ran_on) == set(where)  # both agents ran tasks
    for node_id, label in where.items():
        address = label.split("@")[1].rsplit(":", 1)[0]
        assert all(f" {address}/24 " in out for out in ran_on[node_id])


async def test_later_spawns_reuse_the_venv_and_hosts_fill_up(site: Site) -> None:
    provider = site.provider(0, 1)
    try:
        first = await provider.spawn(["ssh-d", "ssh-e"], site.launch())
        assert sorted(h.node_id for h in first.started) == ["ssh-d", "ssh-e"], first
        marker = site.dirs[0] / "venv" / "herder-build"
        installed_at = marker.stat().st_mtime
        # Both hosts hold per_host agents: no room for more.
        full = await provider.spawn(["ssh-f"], site.launch())
        assert full.started == []
        assert full.failed == {"ssh-f": "no free host"}
        await asyncio.to_thread(wait_paired, site, ["ssh-d", "ssh-e"])
        assert marker.stat().st_mtime == installed_at  # nothing was reinstalled
    finally:
        await provider.close()

    # A new provider (a restarted coordinator) finds the agents, and stops
    # them without having started them.
    later = site.provider(0, 1)
    try:
        assert {h.node_id for h in await later.list_own()} == {"ssh-d", "ssh-e"}
        # A connection that breaks is made again.
        kill_ssh_sessions(site.servers[0])
        assert {h.node_id for h in await later.list_own()} == {"ssh-d", "ssh-e"}
        fresh = site.provider(0, 1)
        try:
            await fresh.terminate("ssh-d", grace=10)
            await fresh.terminate("ssh-e", grace=10)
        finally:
            await fresh.close()
        assert await later.list_own() == []
        assert agent_processes("ssh-d") == agent_processes("ssh-e") == []
    finally:
        await later.close()


def kill_ssh_sessions(server: SSHServer) -> None:
    """Kill sshd's per-connection processes; the listener stays."""
    for child in psutil.Process(server.pid).children(recursive=True):
        child.send_signal(signal.SIGKILL)


async def test_install_none_runs_the_hosts_own_herder(site: Site, tmp_path: Path) -> None:
    """``install="none"``: the agent runs on the host's python as it is; a
    python without herder makes the host unusable, and says so."""
    venv_python = site.dirs[0] / "venv" / "bin" / "python"  # the first test installed it
    has_herder = SSHHost(
        host=site.hosts[0].address,
        key=site.servers[0].client_key,
        python=str(venv_python),
        dir=str(tmp_path / "none0"),
    )
    lacks_herder = dataclasses.replace(
        has_herder, host=site.hosts[1].address, python="/usr/bin/python3", dir=str(tmp_path)
    )
    provider = SSH([lacks_herder, has_herder], install="none", connect_timeout=5)
    provider.attach(cluster=CLUSTER, home=site.herd.home)
    try:
        result = await provider.spawn(["ssh-n1", "ssh-n2"], site.launch())
        assert [h.node_id for h in result.started] == ["ssh-n1"]
        assert result.started[0].address == has_herder.label
        assert "herder is not importable by /usr/bin/python3" in result.failed["ssh-n2"]
        await asyncio.to_thread(wait_paired, site, ["ssh-n1"])
        (proc,) = agent_processes("ssh-n1")
        assert proc.cmdline()[0] == str(venv_python)
        await provider.terminate("ssh-n1", grace=10)
        assert agent_processes("ssh-n1") == []
        assert not (tmp_path / "none0" / "venv").exists()  # nothing installed
    finally:
        await provider.close()


async def test_a_down_host_is_reported_and_skipped(site: Site) -> None:
    provider = site.provider(2)
    label = provider.hosts[0].label
    try:
        began = time.monotonic()
        result = await provider.spawn(["ssh-x"], site.launch())
        assert time.monotonic() - began < 10
        assert result.started == []
        assert f"host {label} unreachable" in result.failed["ssh-x"]
        assert await provider.list_own() == []
        await provider.terminate("ssh-x", grace=1)  # unknown node, unreachable host: no error
    finally:
        await provider.close()


async def test_a_host_whose_key_does_not_match_is_refused(site: Site) -> None:
    wrong = SSHHost(
        host=site.hosts[1].address,
        key=site.servers[0].client_key,
        dir=str(site.dirs[1]),
        known_hosts=site.servers[0].known_hosts,  # lists host 0's key, not host 1's
    )
    provider = SSH([wrong], install="offline", connect_timeout=5)
    provider.attach(cluster=CLUSTER, home=site.herd.home)
    try:
        result = await provider.spawn(["ssh-y"], site.launch())
        assert result.started == []
        assert f"host {wrong.label} unreachable" in result.failed["ssh-y"]
    finally:
        await provider.close()


def test_the_fleet_keeps_two_ssh_nodes_replaces_a_dead_one_and_stops_them(
    site: Site, tmp_path: Path
) -> None:
    """The whole path: ``herder up --herd`` with the ssh provider."""
    port = free_port()
    hosts = [dataclasses.asdict(site.host(i)) for i in (0, 1)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HERDER_TEST_SSH_HOSTS": json.dumps(hosts, default=str),
        "HERDER_ADVERTISE_URL": f"https://{site.hosts[0].gateway}:{port}",
    }
    herd = LocalHerd(
        nodes=0,
        herd="tests.ssh_herds:KeepTwoOverSSH",
        home=tmp_path / "home",
        env=env,
        listen=f"0.0.0.0:{port}",
    )
    herd.start()
    try:
        first = wait_for(lambda: serving_ssh(herd, 2), 90, "two ssh nodes")
        (victim,) = agent_processes(first[0])
        victim.kill()
        replaced = wait_for(
            lambda: replaced_once(herd, first[0]), 60, "a replacement for the killed agent"
        )
    finally:
        herd.stop()
    for node_id in {*first, *replaced}:
        assert agent_processes(node_id) == []


def serving_ssh(herd: LocalHerd, count: int) -> list[str] | None:
    assert herd.client is not None
    up = [
        n["id"]
        for n in herd.client.nodes()
        if n["provider"] == "ssh" and n["state"] in ("ready", "busy")
    ]
    return sorted(up) if len(up) == count else None


def replaced_once(herd: LocalHerd, dead: str) -> list[str] | None:
    """Two ssh nodes serve again, and the dead one is not among them."""
    up = serving_ssh(herd, 2)
    return up if up and dead not in up else None
