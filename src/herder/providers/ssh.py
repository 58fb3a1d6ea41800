"""The ``ssh`` provider: agents on machines reached over SSH (with asyncssh).

``SSH(hosts=[...], per_host=1, install="wheel")``. For new nodes it picks
hosts with room (at most ``per_host`` agents of this cluster on each, the
least loaded first), makes sure this exact build of herder is installed in
``<dir>/venv`` there, starts ``herder agent`` detached, and returns without
waiting for the agents to pair (the fleet watches that, with its boot
timeout).

Installing, by ``install``:

* ``"wheel"``: copy a wheel of the running herder (see :mod:`.bootstrap`)
  and ``pip install`` it into the venv; the dependencies come from the
  host's own package index.
* ``"offline"``: also copy a wheel of every dependency as installed here and
  install with no index at all, with the uv those wheels carry (pip if it
  cannot run there). The host needs the same python version and platform
  as the coordinator.
* ``"none"``: herder is already importable by the host's ``python``.

A marker in the venv names the build in it, so a later spawn on the host
installs nothing (it costs one command); a file lock on the host keeps two
installers (two coordinators, two spawns) from working at once. The wheels
are packed once per build under ``<home>/wheels`` on the coordinator.

What the provider leaves behind on a host: ``terminate`` stops the agent
and removes its pid record only. The venv, the copied wheels and the logs
stay in ``dir``, to be reused by the next spawn and read by people;
removing them is the user's call.

Security:

* The join token (it holds the cluster's secret) goes over the SSH channel
  on the stdin of the launcher and reaches the agent in its environment: it
  is in no argv and no file on the host.
* Host keys: give ``known_hosts`` (an OpenSSH known_hosts file) to have
  each host's key checked. With ``known_hosts=None`` any host key is
  accepted and a warning is logged once per host. That is convenient on a
  private network and unsafe elsewhere: a man in the middle would receive
  the join token.

Failures are per host: a host that cannot be reached (refused, timed out,
authentication failed) fails the nodes that would have gone to it with a
reason naming it, is logged once, and is skipped by :meth:`SSH.list_own`.
Connections are kept per host and made again when one breaks; every
operation on a host is idempotent, so one that met a broken connection is
retried once on a fresh one.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import logging
import posixpath
import re
import secrets
import shlex
import sys
import sysconfig
import warnings
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

with warnings.catch_warnings():
    # asyncssh names cryptography's DSA classes at import, which cryptography 47+
    # deprecates on access; the warning is about asyncssh, not about anything a
    # user of herder did or can change (herder makes ed25519 keys).
    warnings.filterwarnings("ignore", message="DSA is deprecated")
    import asyncssh

from herder.errors import ProviderError

from . import bootstrap
from .base import LaunchSpec, NodeHandle, Provider, SpawnResult

log = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
Install = Literal["wheel", "offline", "none"]

REQUIRES_PYTHON = (3, 11)
# Seconds for the quick operations (probe, launch); installs have their own limit.
OP_TIMEOUT_S = 30.0
# Seconds a terminate may take beyond its grace period (SIGKILL and the reaping).
KILL_MARGIN_S = 15.0
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_HOST_TEXT = re.compile(
    r"(?:(?P<user>[^@\s]+)@)?(?P<host>\[[^\]\s]+\]|[^:@\s\[\]]+)(?::(?P<port>\d+))?"
)
# Failures of the connection itself (not of the work done over it): worth one retry.
_CONNECTION_ERRORS = (
    asyncssh.DisconnectError,
    asyncssh.ChannelOpenError,
    asyncssh.SFTPConnectionLost,
    ConnectionError,
)


@dataclass(frozen=True)
class SSHHost:
    """One machine to run agents on: how to reach it and where herder lives there.

    ``key``: a private key file (None: the SSH agent and ``~/.ssh/id_*``).
    ``python``: makes the venv, or runs the agent itself with
    ``install="none"``; a command on the remote PATH or a path (``~/`` works).
    ``dir``: everything herder puts on the host; hosts that share a
    filesystem need different dirs. ``known_hosts``: None accepts any host
    key (see the module docstring).
    """

    host: str
    user: str = "root"
    port: int = 22
    key: Path | None = None
    python: str = "python3"
    dir: str = "~/.herder-agent"
    known_hosts: Path | None = None

    @classmethod
    def parse(cls, text: str) -> SSHHost:
        """``host``, ``user@host``, ``user@host:port``, ``user@[v6 address]:port``."""
        match = _HOST_TEXT.fullmatch(text.strip())
        if match is None:
            raise ProviderError(
                f"ssh host {text!r} must look like user@host:port", provider="ssh", field="hosts"
            )
        return cls(
            host=match["host"].strip("[]"),
            user=match["user"] or "root",
            port=int(match["port"] or 22),
        )

    @property
    def label(self) -> str:
        """``user@host:port``, the name a host goes by in messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"


@dataclass(frozen=True)
class _HostState:
    """What a probe found on a host."""

    dir: str  # ``dir``, absolute
    python: tuple[int, ...]
    executable: str  # the host's python, resolved
    platform: str
    herder: str | None  # herder's version importable by that python, if any
    installed: dict[str, Any] | None  # {"build", "python"} of the venv
    running: dict[str, int]  # node id -> pid, this cluster's live agents


@dataclass(eq=False)
class _Slot:
    """A host with its connection and the bookkeeping that keeps its work in order."""

    host: SSHHost
    conn: asyncssh.SSHClientConnection | None = None
    connect_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    install_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    reserved: int = 0  # nodes being started there right now
    down: str | None = None  # why it could not be reached last time
    warned_key: bool = False


class SSH(Provider):
    """Agents on SSH hosts.

    ``hosts``: :class:`SSHHost` or ``"user@host:port"`` strings. ``per_host``:
    agents of this cluster one host may run. ``install``: how herder gets
    there (module docstring). ``connect_timeout``: seconds to reach a host
    (hosts are tried in parallel); ``install_timeout``: seconds for copying
    the wheels, and again for installing them, on one host.
    """

    name = "ssh"

    def __init__(
        self,
        hosts: Sequence[SSHHost | str],
        *,
        per_host: int = 1,
        install: Install = "wheel",
        connect_timeout: float = 10.0,
        install_timeout: float = 600.0,
    ) -> None:
        parsed = [h if isinstance(h, SSHHost) else SSHHost.parse(h) for h in hosts]
        _check_options(parsed, per_host, install)
        self.hosts = tuple(parsed)
        self.per_host = per_host
        self.install = install
        self.connect_timeout = connect_timeout
        self.install_timeout = install_timeout
        self._slots = [_Slot(h) for h in parsed]
        self._where: dict[str, _Slot] = {}  # node id -> the host it runs on
        self._plan_lock = asyncio.Lock()
        self._bundle: bootstrap.Bundle | None = None
        self._bundle_lock = asyncio.Lock()
        self._closed = False

    def capacity(self) -> int:
        return self.per_host * len(self._slots)

    # -- the Provider interface ---------------------------------------------

    async def spawn(self, node_ids: list[str], launch: LaunchSpec) -> SpawnResult:
        """Place the nodes on hosts with room, install where needed, launch.

        Each node that cannot start fails alone, with a reason naming the
        host ("host u@h:p unreachable: ...", "no free host (...)"). Raises
        only when nothing could start anywhere: the wheels cannot be packed.
        """
        result = SpawnResult()
        for node_id in node_ids:
            if not NODE_ID.fullmatch(node_id):
                result.failed[node_id] = f"node id {node_id!r} is not [A-Za-z0-9._-]{{1,100}}"
        wanted = [n for n in node_ids if n not in result.failed]
        if not wanted:
            return result
        if self.install != "none":
            await self._get_bundle()  # a failure here is everyone's: raise
        async with self._plan_lock:
            states = await self._survey(launch.cluster)
            plan = self._plan(wanted, states, result.failed)
            for slot, (_, ids) in plan.items():
                slot.reserved += len(ids)
        try:
            outcomes = await asyncio.gather(
                *(self._start_on(slot, state, ids, launch) for slot, (state, ids) in plan.items())
            )
        finally:
            async with self._plan_lock:
                for slot, (_, ids) in plan.items():
                    slot.reserved -= len(ids)
        for started, failed in outcomes:
            result.started.extend(started)
            result.failed.update(failed)
        return result

    async def terminate(self, node_id: str, grace: float) -> None:
        """SIGTERM the agent's process group, SIGKILL after ``grace``; its
        venv and log stay. A node started here whose host cannot be reached
        raises ProviderError (it may still run); a node this provider never
        saw is looked for on every host, and unreachable hosts are only
        logged: the node shows up in :meth:`list_own` once they are back.
        """
        slot = self._where.get(node_id)
        if slot is not None:
            await self._terminate_on(slot, node_id, grace)  # an unreachable host raises
            self._where.pop(node_id, None)
            return
        # A node this provider did not start (an earlier coordinator did): ask every host.
        outcomes = await _settled(self._terminate_on(s, node_id, grace) for s in self._slots)
        missed = [str(o) for o in outcomes if isinstance(o, ProviderError)]
        if missed and not any(o is True for o in outcomes):
            log.warning(
                "node %s not found on the reachable hosts; not asked: %s",
                node_id,
                "; ".join(missed),
                extra={"action": "ssh.terminate", "node_id": node_id},
            )

    async def list_own(self) -> list[NodeHandle]:
        """The live agents of this cluster on the hosts that answer (a host
        that does not is logged and skipped)."""
        handles = []
        for slot, state in (await self._survey(self.cluster)).items():
            if isinstance(state, ProviderError):
                continue  # logged by _survey; its nodes are listed once it is back
            gone = [n for n, s in self._where.items() if s is slot and n not in state.running]
            for node_id in gone:  # agents that exited by themselves
                del self._where[node_id]
            for node_id in state.running:
                self._where[node_id] = slot
                handles.append(
                    NodeHandle(node_id=node_id, provider=self.name, address=slot.host.label)
                )
        return handles

    async def close(self) -> None:
        """Close the connections (the agents keep running); the provider is then done."""
        self._closed = True
        conns = [s.conn for s in self._slots if s.conn is not None]
        for slot in self._slots:
            slot.conn = None
        for conn in conns:
            conn.close()
        await asyncio.gather(*(conn.wait_closed() for conn in conns))

    # -- choosing hosts -------------------------------------------------------

    async def _survey(self, cluster: str) -> dict[_Slot, _HostState | ProviderError]:
        """Probe every host at once; a host that fails is logged when it goes
        down (once, not on every survey) and when it comes back."""
        states = await _settled(self._probe(slot, cluster) for slot in self._slots)
        for slot, state in zip(self._slots, states, strict=True):
            self._note_reachable(slot, state)
        return dict(zip(self._slots, states, strict=True))

    def _note_reachable(self, slot: _Slot, state: _HostState | ProviderError) -> None:
        problem = str(state) if isinstance(state, ProviderError) else None
        extra = {"action": "ssh.host", "host": slot.host.label}
        if problem is not None and problem != slot.down:
            log.warning("%s", problem, extra=extra)
        elif problem is None and slot.down is not None:
            log.info("host %s is reachable again", slot.host.label, extra=extra)
        slot.down = problem

    def _plan(
        self,
        node_ids: list[str],
        states: dict[_Slot, _HostState | ProviderError],
        failed: dict[str, str],
    ) -> dict[_Slot, tuple[_HostState, list[str]]]:
        """Spread ``node_ids`` over the usable hosts, least loaded first; the
        nodes that find no room fail with the reasons hosts were unusable."""
        usable: dict[_Slot, _HostState] = {}
        problems: list[str] = []
        for slot, state in states.items():
            problem = (
                str(state) if isinstance(state, ProviderError) else self._unusable(slot, state)
            )
            if problem is not None:
                problems.append(problem)
            elif isinstance(state, _HostState):
                usable[slot] = state
        load = {slot: len(state.running) + slot.reserved for slot, state in usable.items()}
        placed, unplaced = spread(node_ids, load, self.per_host, problems)
        failed.update(unplaced)
        return {slot: (usable[slot], ids) for slot, ids in placed.items()}

    def _unusable(self, slot: _Slot, state: _HostState) -> str | None:
        """Why agents of this build cannot run on this host, if they cannot."""
        label = slot.host.label
        have = ".".join(map(str, state.python))
        if state.python[:2] < REQUIRES_PYTHON:
            need = ".".join(map(str, REQUIRES_PYTHON))
            return f"host {label}: {slot.host.python} is python {have}; herder needs {need}+"
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        if self.install == "offline" and (
            tuple(state.python[:2]) != sys.version_info[:2]
            or state.platform != sysconfig.get_platform()
        ):
            return (
                f"host {label}: install='offline' copies wheels for python {here} on "
                f"{sysconfig.get_platform()}; the host has python {have} on {state.platform}"
            )
        if self.install == "none" and state.herder is None:
            return f"host {label}: herder is not importable by {slot.host.python} (install='none')"
        return None

    # -- starting agents on one host ----------------------------------------

    async def _start_on(
        self, slot: _Slot, state: _HostState, ids: list[str], launch: LaunchSpec
    ) -> tuple[list[NodeHandle], dict[str, str]]:
        """Install if needed and launch ``ids`` there; a failure fails them all."""
        try:
            python = await self._ensure_installed(slot, state)
            answer = await self._call(
                slot,
                "launch",
                {
                    "dir": slot.host.dir,
                    "cluster": launch.cluster,
                    "build": self._bundle.build_id if self._bundle else None,
                    "join": launch.join,
                    "nodes": [
                        {
                            "node_id": node_id,
                            "argv": bootstrap.agent_command(
                                python, node_id=node_id, provider=self.name, launch=launch
                            ),
                        }
                        for node_id in ids
                    ],
                },
                OP_TIMEOUT_S,
            )
        except ProviderError as exc:
            log.warning("%s", exc, extra={"action": "ssh.spawn", "host": slot.host.label})
            return [], {node_id: str(exc) for node_id in ids}
        handles = []
        for item in answer["started"]:
            self._where[item["node_id"]] = slot
            log.info(
                "agent %s %s on %s (pid %d)",
                item["node_id"],
                "already running" if item["existed"] else "started",
                slot.host.label,
                item["pid"],
                extra={"action": "ssh.spawn", "node_id": item["node_id"], "host": slot.host.label},
            )
            handles.append(
                NodeHandle(node_id=item["node_id"], provider=self.name, address=slot.host.label)
            )
        return handles, {}

    async def _ensure_installed(self, slot: _Slot, state: _HostState) -> str:
        """Install this build in the host's venv unless it is there; returns
        the python that runs the agent."""
        if self.install == "none":
            return state.executable
        bundle = await self._get_bundle()
        want = {"build": bundle.build_id, "python": state.executable}
        # One install per host at a time from here (the host's flock covers
        # other coordinators); a spawn that waited finds the marker and returns.
        async with slot.install_lock:
            if want != state.installed:
                await self._upload(slot, state.dir, bundle)
                answer = await self._call(
                    slot,
                    "install",
                    {
                        "dir": slot.host.dir,
                        "build": bundle.build_id,
                        "offline": self.install == "offline",
                        "herder_wheel": _herder_wheel_path(bundle),
                        "dependencies": [p.name for p in bundle.dependencies],
                    },
                    self.install_timeout,
                )
                if "uv_failed" in answer:
                    log.warning(
                        "host %s: uv could not install (pip did, slower): %s",
                        slot.host.label,
                        answer["uv_failed"],
                        extra={"action": "ssh.install", "host": slot.host.label},
                    )
                log.info(
                    "host %s: build %s %s in %.1fs",
                    slot.host.label,
                    bundle.build_id,
                    f"installed with {answer['installer']}"
                    if answer["installed"]
                    else "was already installed",
                    answer["seconds"],
                    extra={"action": "ssh.install", "host": slot.host.label},
                )
        return posixpath.join(state.dir, "venv", "bin", "python")

    async def _get_bundle(self) -> bootstrap.Bundle:
        """The wheels to ship, packed (or found in the cache) once per provider."""
        async with self._bundle_lock:
            if self._bundle is None:
                if self.home is None:
                    raise ProviderError(
                        "the ssh provider is not attached to a coordinator (attach() gives "
                        "it the home where wheels are cached)",
                        provider=self.name,
                    )
                self._bundle = await asyncio.to_thread(
                    bootstrap.bundle, self.home / "wheels", offline=self.install == "offline"
                )
            return self._bundle

    async def _upload(self, slot: _Slot, root: str, bundle: bootstrap.Bundle) -> None:
        """Copy the wheels the host lacks to ``<dir>/wheels`` (same name and size: kept)."""
        files = [(p, posixpath.join(root, "wheels", p.name)) for p in bundle.dependencies]
        files.append((bundle.herder, posixpath.join(root, "wheels", _herder_wheel_path(bundle))))
        sizes = await asyncio.to_thread(lambda: [local.stat().st_size for local, _ in files])

        async def copy(conn: asyncssh.SSHClientConnection) -> int:
            copied = 0
            try:
                async with asyncio.timeout(self.install_timeout), conn.start_sftp_client() as sftp:
                    for (local, remote), size in zip(files, sizes, strict=True):
                        copied += await _put(sftp, local, remote, size)
            except TimeoutError as exc:
                raise ProviderError(
                    f"host {slot.host.label}: copying wheels took longer than "
                    f"{self.install_timeout:g}s",
                    host=slot.host.label,
                    provider=self.name,
                ) from exc
            return copied

        copied = await self._with_connection(slot, copy, "copying wheels")
        log.info(
            "host %s: %d of %d wheels copied",
            slot.host.label,
            copied,
            len(files),
            extra={"action": "ssh.upload", "host": slot.host.label},
        )

    async def _terminate_on(self, slot: _Slot, node_id: str, grace: float) -> bool:
        answer = await self._call(
            slot,
            "terminate",
            {"dir": slot.host.dir, "node_id": node_id, "grace": grace},
            grace + KILL_MARGIN_S,
        )
        if answer["found"]:
            log.info(
                "agent %s on %s stopped%s",
                node_id,
                slot.host.label,
                " by SIGKILL after the grace period" if answer["forced"] else "",
                extra={"action": "ssh.terminate", "node_id": node_id, "host": slot.host.label},
            )
        return bool(answer["found"])

    async def _probe(self, slot: _Slot, cluster: str) -> _HostState:
        answer = await self._call(
            slot, "probe", {"dir": slot.host.dir, "cluster": cluster}, OP_TIMEOUT_S
        )
        return _HostState(
            dir=answer["dir"],
            python=tuple(answer["python"]),
            executable=answer["executable"],
            platform=answer["platform"],
            herder=answer["herder"],
            installed=answer["installed"],
            running={r["node_id"]: int(r["pid"]) for r in answer["running"]},
        )

    # -- talking to a host ------------------------------------------------------

    async def _call(
        self, slot: _Slot, op: str, request: dict[str, Any], limit_s: float
    ) -> dict[str, Any]:
        """Run one operation of :mod:`.ssh_remote` on the host; its answer, or
        a ProviderError naming the host and what failed."""
        label = slot.host.label
        command = _remote_command(slot.host.python, op)
        payload = json.dumps({"source": _REMOTE_SOURCE, "request": request})

        async def run(conn: asyncssh.SSHClientConnection) -> asyncssh.SSHCompletedProcess:
            try:
                return await conn.run(command, input=payload, timeout=limit_s)
            except asyncssh.TimeoutError as exc:
                raise ProviderError(
                    f"host {label}: {op} took longer than {limit_s:g}s", host=label, provider="ssh"
                ) from exc

        done = await self._with_connection(slot, run, op)
        return _answer(label, op, done)

    async def _with_connection(
        self,
        slot: _Slot,
        work: Callable[[asyncssh.SSHClientConnection], Awaitable[T]],
        what: str,
    ) -> T:
        """``work(conn)`` on the host's connection, retried once on a new
        connection if the old one broke (every operation is idempotent)."""
        label = slot.host.label
        for attempt in (1, 2):
            conn = await self._connection(slot)
            try:
                return await work(conn)
            except _CONNECTION_ERRORS as exc:
                self._forget(slot, conn)
                if attempt == 2:
                    raise ProviderError(
                        f"host {label} unreachable: the connection broke while {what}: {exc}",
                        host=label,
                        provider="ssh",
                    ) from exc
                log.info("host %s: connection broke (%s); reconnecting", label, exc)
            except (asyncssh.Error, OSError) as exc:
                raise ProviderError(
                    f"host {label}: {what} failed: {exc}", host=label, provider="ssh"
                ) from exc
        raise AssertionError("not reached")

    async def _connection(self, slot: _Slot) -> asyncssh.SSHClientConnection:
        """The host's cached connection, or a new one (within ``connect_timeout``)."""
        if self._closed:
            raise ProviderError("the ssh provider is closed", provider=self.name)
        host = slot.host
        async with slot.connect_lock:
            if slot.conn is not None and not slot.conn.is_closed():
                return slot.conn
            if host.known_hosts is None and not slot.warned_key:
                slot.warned_key = True
                log.warning(
                    "host %s: its host key is not checked (known_hosts=None); "
                    "give known_hosts= to pin it",
                    host.label,
                    extra={"action": "ssh.host_key", "host": host.label},
                )
            options: dict[str, Any] = {
                "port": host.port,
                "username": host.user,
                "known_hosts": None if host.known_hosts is None else str(host.known_hosts),
                "keepalive_interval": 15,
                "keepalive_count_max": 3,
            }
            if host.key is not None:
                options["client_keys"] = [str(host.key)]
            try:
                async with asyncio.timeout(self.connect_timeout):
                    slot.conn = await asyncssh.connect(host.host, **options)
            except TimeoutError as exc:
                raise ProviderError(
                    f"host {host.label} unreachable: no answer within {self.connect_timeout:g}s",
                    host=host.label,
                    provider="ssh",
                ) from exc
            except (OSError, ValueError, asyncssh.Error) as exc:  # ValueError: a bad key file
                raise ProviderError(
                    f"host {host.label} unreachable: {exc}", host=host.label, provider="ssh"
                ) from exc
            return slot.conn

    def _forget(self, slot: _Slot, conn: asyncssh.SSHClientConnection) -> None:
        if slot.conn is conn:
            slot.conn = None
        conn.abort()


# ---------------------------------------------------------------------------
# helpers


def spread(
    node_ids: Sequence[str], load: Mapping[K, int], per_host: int, problems: Sequence[str] = ()
) -> tuple[dict[K, list[str]], dict[str, str]]:
    """Place nodes on hosts: each on the least loaded host with room (ties go
    to the host listed first), so agents spread out. ``load`` counts what
    each usable host runs already. Returns the placements, and a reason for
    each node left over: "no free host", with the ``problems`` that made
    other hosts unusable."""
    load = dict(load)
    placed: dict[K, list[str]] = {}
    failed: dict[str, str] = {}
    reason = "no free host" + (f" ({'; '.join(problems)})" if problems else "")
    for node_id in node_ids:
        free = [host for host, n in load.items() if n < per_host]
        if not free:
            failed[node_id] = reason
            continue
        host = min(free, key=load.__getitem__)
        load[host] += 1
        placed.setdefault(host, []).append(node_id)
    return placed, failed


def _check_options(hosts: list[SSHHost], per_host: int, install: str) -> None:
    if not hosts:
        raise ProviderError("the ssh provider needs at least one host", provider="ssh")
    places = [(h.label, h.dir) for h in hosts]
    if len(set(places)) != len(places):
        raise ProviderError("an ssh host is listed twice with the same dir", provider="ssh")
    if per_host < 1:
        raise ProviderError(f"per_host must be at least 1, not {per_host}", provider="ssh")
    if install not in ("wheel", "offline", "none"):
        raise ProviderError(
            f"install must be 'wheel', 'offline' or 'none', not {install!r}", provider="ssh"
        )


def _herder_wheel_path(bundle: bootstrap.Bundle) -> str:
    """Where herder's wheel goes under ``<dir>/wheels``: one directory per
    build, since every build of one version has the same file name."""
    return f"{bundle.herder.parent.name}/{bundle.herder.name}"


# The command line on the host: it reads {"source", "request"} from stdin, runs
# the source as a module (not as __main__) and calls its main(op, request).
LOADER = (
    "import json,sys;m=json.load(sys.stdin);g={'__name__':'herder_ssh_remote'};"
    "exec(compile(m['source'],'herder_ssh_remote','exec'),g);g['main'](sys.argv[1],m['request'])"
)
_REMOTE_SOURCE = (
    importlib.resources.files(__package__).joinpath("ssh_remote.py").read_text(encoding="utf-8")
)


def _remote_command(python: str, op: str) -> str:
    """The shell command that runs ``op`` with the host's ``python``."""
    if python.startswith("~/"):
        program = '"$HOME"/' + shlex.quote(python[2:])
    else:
        program = shlex.quote(python)
    return f"{program} -c {shlex.quote(LOADER)} {op}"


def _answer(label: str, op: str, done: asyncssh.SSHCompletedProcess) -> dict[str, Any]:
    """The operation's JSON answer, or a ProviderError with the host's words."""
    out = done.stdout if isinstance(done.stdout, str) else ""
    err = done.stderr if isinstance(done.stderr, str) else ""
    if done.exit_status == 0:
        try:
            answer: dict[str, Any] = json.loads(out)
        except ValueError as exc:
            raise ProviderError(
                f"host {label}: {op} answered with something that is not JSON: {out[-300:]!r}",
                host=label,
                provider="ssh",
            ) from exc
        return answer
    if done.exit_status == 2:
        try:
            reason = str(json.loads(out)["error"])
        except (ValueError, KeyError, TypeError):
            reason = out.strip()[-300:]
        raise ProviderError(f"host {label}: {op} failed: {reason}", host=label, provider="ssh")
    tail = "\n".join(err.strip().splitlines()[-10:])
    status = done.exit_status if done.exit_signal is None else done.exit_signal[0]
    raise ProviderError(
        f"host {label}: {op} failed (exit {status}): {tail}", host=label, provider="ssh"
    )


async def _put(sftp: asyncssh.SFTPClient, local: Path, remote: str, size: int) -> bool:
    """Copy one file unless the host has it (same size); atomically, so a
    copy cut short never passes for a whole one."""
    try:
        if (await sftp.stat(remote)).size == size:
            return False
    except asyncssh.SFTPNoSuchFile:
        pass
    await sftp.makedirs(posixpath.dirname(remote), exist_ok=True)
    part = f"{remote}.part-{secrets.token_hex(4)}"
    await sftp.put(str(local), part)
    await sftp.posix_rename(part, remote)
    return True


async def _settled(coros: Iterable[Awaitable[T]]) -> list[T | ProviderError]:
    """Await all at once; a ProviderError becomes that one's result, anything else raises."""

    async def one(coro: Awaitable[T]) -> T | ProviderError:
        try:
            return await coro
        except ProviderError as exc:
            return exc

    return list(await asyncio.gather(*(one(c) for c in coros)))
