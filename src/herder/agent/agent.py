"""The agent: connect, pair, heartbeat, run assignments in slots, report results.

What the agent holds survives a reconnect: tasks queued and running, and
results not yet acknowledged. On reconnect it names them in its hello; the
coordinator adopts the leases that are still current, and the agent drops
the rest. Results are resent until acknowledged, and the coordinator
records each lease's result once. If the coordinator stays away longer than
a lease lives, the agent stops its tasks: they are being run elsewhere.
Given several coordinators sharing one store (``fallback_urls``), the agent
reconnects to the next one instead (see :mod:`herder.agent.failover`), and
pings the link so that a coordinator gone silent is noticed in time.

Shutdown order (``stop()``, e.g. on SIGTERM): stop taking tasks, hand back
the ones not started, let running ones finish (up to the grace period),
send the results, say goodbye, close the slots. With ``idle_exit_s`` the agent
also leaves by itself once it has held no work for that long: it says goodbye
with reason ``idle`` (holding nothing, and running nothing assigned after) and
exits 0.

A service (an assignment with ``service`` settings) is a command kept
running: the agent waits its ``start_delay_s`` in the slot (a crash loop's
back-off), runs it, checks its health (see :mod:`herder.agent.health`) and
kills it after too many failed checks; however a run ends, the result goes
to the coordinator, which restarts it. A service never finishes, so an agent
that leaves (drained, stopped) does not wait for it: it stops its services
at once and hands their leases back, and they start again on another node.

On a cloud machine the agent also looks after the machine. With
``metadata_url`` it watches for a spot interruption notice (see
:mod:`herder.agent.spot`); when one comes it takes nothing more, kills its
running tasks, hands every lease back at once (``Release`` with
``interrupted``: running ones included, none to be charged an attempt),
says goodbye as ``spot interruption`` and exits 0. With ``orphan_action``
``shutdown``, an agent whose coordinator stayed away for ``orphan_after_s``
runs ``shutdown_command`` after leaving, so an orphaned machine stops billing.

A task that names a release runs in that release's environment (see
:mod:`herder.agent.environments`): its slot's worker is started with the
release's Python, and keeps it while the next tasks name the same release.
The fleet's release is installed when the coordinator asks (``LoadRelease``),
before the node takes work and again on a roll-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import shlex
import socket
import ssl
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import websockets
from websockets.asyncio.client import ClientConnection

from herder import protocol, security
from herder.config import home_ca_path
from herder.errors import AuthenticationError, PinningError, ReleaseError, SecurityError
from herder.model import Reason
from herder.releases.cache import ReleaseCache

from . import telemetry
from .certcheck import certificate_refused
from .environments import Environments
from .execlog import ExecLog
from .failover import Rotation
from .health import Health, HealthCheck, watch
from .phases import attempt_dir
from .resources import detect_resources
from .runner import Slot, task_environment
from .spot import SpotNotice, SpotWatcher

log = logging.getLogger("herder.agent")

STARTED_REPORT_DELAY_S = 0.05
# Adaptive prefetch: keep about this much work queued per slot beyond what runs,
# so short tasks never wait for a round trip and long ones are not hoarded.
QUEUED_WORK_PER_SLOT_S = 0.05
MAX_PREFETCH = 512
# On a spot interruption notice: how long to wait for killed tasks to end, and
# for the last results to be acknowledged (EC2 gives about two minutes in all).
INTERRUPT_KILL_WAIT_S = 10.0
INTERRUPT_SETTLE_S = 10.0
SHUTDOWN_COMMAND_WAIT_S = 60.0
# With several coordinators to choose from: how long one may take to answer before
# the next is tried, and the pause between two of them in a round (well inside
# the lease's life, so running tasks survive a move; see herder.agent.failover).
# The link is always pinged, so a coordinator that falls silent (its machine gone,
# a network cut, no RST) is noticed within ping + pong = 3 s: the agent pairs
# elsewhere before the 5 s after which a node unheard of is lost, or, with
# nowhere to go, stops its tasks about when their leases end (see _left).
FAILOVER_ATTEMPT_TIMEOUT_S = 3.0
FAILOVER_STEP_S = 0.1
FAILOVER_PING_S = 1.0
FAILOVER_PONG_S = 2.0
FAILOVER_CLOSE_S = 1.0


@dataclass(frozen=True)
class AgentConfig:
    url: str
    secret: bytes
    fingerprint: bytes
    node_id: str
    name: str
    slots: int = 1
    prefetch: int | None = None  # tasks queued beyond the slots; None adapts to task length
    labels: dict[str, str] = field(default_factory=dict)
    # free-form facts for selectors (``--data``); resources it announces (an
    # empty dict: detected, see herder.agent.resources)
    data: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)
    provider: str = "joined"
    reconnect_max_s: float = 2.0  # between tries, x1.5 jitter: back within 5 s
    grace_s: float = 30.0
    orphan_after_s: float = 15 * 60.0
    # Leave (Bye "idle", exit 0) after this long connected with no work; None: never.
    idle_exit_s: float | None = None
    # Command tasks run in <scratch_dir>/<task>-<attempt>/; None: a herder-scratch
    # directory in the system's temporary directory.
    scratch_dir: Path | None = None
    # Instance metadata service to watch for a spot interruption notice; None: off.
    metadata_url: str | None = None
    spot_poll_s: float = 5.0
    # When no coordinator answered for orphan_after_s: just exit, or also run
    # shutdown_command (a cloud machine that shuts down is terminated: no bill).
    orphan_action: Literal["exit", "shutdown"] = "exit"
    shutdown_command: tuple[str, ...] = ("shutdown", "-h", "now")
    # Found by discovery (--discover/--tracker): waits for a coordinator and returns
    # its (url, CA fingerprint); asked again whenever a connection fails, so a
    # coordinator that moved is followed. None: ``url`` is fixed.
    locate: Callable[[], Awaitable[tuple[str, bytes]]] | None = None
    # Other coordinators sharing the store (same secret and CA): when the one paired
    # with fails, the agent moves to the next and its leases are adopted there.
    fallback_urls: tuple[str, ...] = ()
    # Where releases are installed (shared by agents on one machine: each release
    # is installed once); None: ~/.cache/herder/releases. Older ones are evicted
    # beyond release_cache_bytes. find_links / no_index: where the node's own
    # wheelhouse is, for installs without an index (offline).
    release_dir: Path | None = None
    release_cache_bytes: int = 10 * 2**30
    find_links: tuple[str, ...] = ()
    no_index: bool = False
    # Append a line per attempt started and ended here (the fault suite's checker
    # reads it, see herder.agent.execlog); None: off.
    exec_log: Path | None = None
    # Paired by an agent token (hk1.<id>.…, ``herder token create --role agent``):
    # its id, and ``secret`` is that token's secret. None: ``secret`` is the cluster's.
    token_id: str | None = None
    # A client certificate to present (a coordinator with mutual TLS asks for one).
    client_cert: Path | None = None
    client_key: Path | None = None


class Agent:
    """``await Agent(config).run()`` returns the process exit code."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        scratch = config.scratch_dir or Path(tempfile.gettempdir()) / "herder-scratch"
        # shared by every slot; "data" is filled in once the coordinator's CA is known
        self._task_context: dict[str, Any] = {"scratch_root": str(scratch), "data": None}
        self._slots = [
            Slot(i, self._task_context, on_output=self._on_output, on_bus=self._on_bus)
            for i in range(config.slots)
        ]
        self._queue: deque[protocol.Assignment] = deque()
        self._queue_event = asyncio.Event()
        self._running: dict[str, tuple[protocol.Assignment, asyncio.Task[None]]] = {}
        self._unacked: dict[str, protocol.ResultItem] = {}
        self._out_results: list[protocol.ResultItem] = []
        self._out_started: list[protocol.HeldLease] = []
        self._out_output: list[protocol.OutputChunk] = []
        self._out_bus: list[
            protocol.Send | protocol.Emit | protocol.Progress | protocol.TaskTelemetry
        ] = []
        self._flush_scheduled = False
        self._ws: ClientConnection | None = None
        self._ssl: ssl.SSLContext | None = None
        self._rotation = Rotation(
            (() if config.locate is not None else (config.url,)) + config.fallback_urls,
            discover=config.locate is not None,
        )
        self._draining = False  # told by the coordinator: take no more tasks for now
        self._stopping = asyncio.Event()
        self._changed = asyncio.Event()  # something ran to its end or was acknowledged
        self._tasks: set[asyncio.Future[Any]] = set()
        self._avg_task_s: float | None = None
        self._lost_after_s = 5.0
        self._heartbeat_s = 1.0
        self._disconnected_at: float | None = time.monotonic()
        self._last_active = time.monotonic()  # work arrived, ended or was acknowledged
        self._bye_reason = "stopped"
        self._orphaned = False  # left because no coordinator answered for orphan_after_s
        self._interrupting = False  # a spot interruption notice came
        self._interrupted: set[str] = set()  # lease ids killed for it: no result is sent
        self._to_release: list[protocol.HeldLease] = []  # killed for it, to hand back
        self._patient = False  # leaving for a drain: running tasks end on their own
        self._health: dict[str, tuple[protocol.Assignment, Health]] = {}  # running services
        self._out_releases: list[protocol.ReleaseLoaded] = []
        self._sampler = telemetry.Sampler(str(scratch))
        self._exec_log = ExecLog(config.exec_log, config.node_id) if config.exec_log else None
        self._environments = Environments(
            ReleaseCache(
                config.release_dir or Path.home() / ".cache" / "herder" / "releases",
                max_bytes=config.release_cache_bytes,
                find_links=config.find_links,
                no_index=config.no_index,
            ),
            self._task_context,
            self._release_loaded,
        )

    def _prefetch(self) -> int:
        """How many tasks to hold queued beyond the slots.

        Fixed when configured; else enough for ``QUEUED_WORK_PER_SLOT_S`` of
        work per slot at the recent average turnaround of a busy slot (an
        EWMA): the bound on how long a newly ready task waits behind the queue.
        """
        if self.config.prefetch is not None:
            return self.config.prefetch
        if self._avg_task_s is None:
            return 2 * self.config.slots
        per_slot = math.ceil(QUEUED_WORK_PER_SLOT_S / max(self._avg_task_s, 1e-5))
        return max(1, min(MAX_PREFETCH, per_slot * self.config.slots))

    def _observe(self, seconds: float) -> None:
        self._avg_task_s = (
            seconds if self._avg_task_s is None else 0.8 * self._avg_task_s + 0.2 * seconds
        )

    def stop(self) -> None:
        """Leave after finishing running tasks (idempotent)."""
        self._stopping.set()

    def _is_idle(self) -> bool:
        """Connected, holding no work, and for at least ``idle_exit_s``."""
        limit = self.config.idle_exit_s
        return (
            limit is not None
            and self._ws is not None
            and not (self._queue or self._running or self._unacked)
            and time.monotonic() - self._last_active >= limit
        )

    def _retire(self) -> None:
        """Leave for want of work: take nothing more, say goodbye as "idle", exit 0."""
        log.info(
            "no work for %.1fs (--idle-exit %g): leaving",
            time.monotonic() - self._last_active,
            self.config.idle_exit_s,
        )
        self._bye_reason = "idle"
        self._draining = True
        self.stop()

    # --- main loop ------------------------------------------------------------------

    async def run(self) -> int:
        code = 0

        async def connect_then_exit() -> None:
            nonlocal code
            code = await self._connect_loop()
            raise _Exit(code)

        try:
            async with asyncio.TaskGroup() as tg:
                for slot in self._slots:
                    tg.create_task(self._slot_loop(slot), name=f"slot-{slot.index}")
                tg.create_task(self._watchdog(), name="watchdog")
                if self.config.metadata_url is not None:
                    tg.create_task(self._watch_spot(self.config.metadata_url), name="spot")
                tg.create_task(connect_then_exit(), name="connect")
        except* _Exit:
            pass
        finally:
            for slot in self._slots:
                await slot.close()
        if self._orphaned and self.config.orphan_action == "shutdown":
            return await self._shut_down_machine()
        return code

    async def _connect_loop(self) -> int:
        """Pair, serve, and on any failure try the next coordinator (see ``Rotation``)."""
        backoff = 0.1
        several = self._rotation.choices > 1
        timeout = FAILOVER_ATTEMPT_TIMEOUT_S if several else 10.0
        while not self._stopping.is_set():
            target = self._rotation.target
            where = target or "discovery"
            try:
                if self._ssl is None:
                    # discovery is one step among others: it may not hold up the round
                    async with asyncio.timeout(timeout if several else None):
                        if not await self._aim(target):
                            return 0
                    where = self.config.url
                    # a local agent finds it in the herder home, as its coordinator left it
                    pin = self.config.fingerprint
                    ca = security.pinned_ca_at(home_ca_path(os.environ), pin)
                    if ca is None:
                        ca = await asyncio.to_thread(
                            security.fetch_pinned_ca, self.config.url, pin, timeout
                        )
                    self._ssl = security.client_ssl_context(
                        ca, self.config.client_cert, self.config.client_key
                    )
                    self._task_context["data"] = {
                        "url": self.config.url,
                        "bearer": self._bearer(),
                        "ca_pem": ca,
                    }
                ws_url = "wss://" + self.config.url.split("://", 1)[1].rstrip("/") + "/v1/agent"
                async with websockets.connect(
                    ws_url,
                    ssl=self._ssl,
                    max_size=protocol.MAX_FRAME_BYTES,
                    open_timeout=timeout,
                    ping_interval=FAILOVER_PING_S,
                    ping_timeout=FAILOVER_PONG_S,
                    close_timeout=FAILOVER_CLOSE_S,
                    compression=None,
                ) as ws:
                    await self._pair(ws)
                    self._rotation.paired()
                    backoff = 0.1
                    done = await self._session(ws)
                    if done:
                        return 0
                    if ws.state is websockets.State.CLOSED:  # e.g. "keepalive ping timeout"
                        log.info("left %s: %s", self.config.url, ws.protocol.close_exc)
                        self._disconnected_at = _left(ws)
            except (PinningError, AuthenticationError) as exc:
                if target is None or not self._rotation.drop():
                    log.error("%s", exc)
                    print(f"herder agent: {exc}", flush=True)
                    return 1
                log.error(
                    "skipping %s from now on (not this cluster's coordinator): %s",
                    where,
                    exc,
                    extra={"action": "coordinator_skipped", "node_id": self.config.node_id},
                )
            except (SecurityError, protocol.ProtocolError) as exc:
                # a peer that passed pinning but speaks nonsense: try again, as if away
                log.warning("cannot reach %s: %s", where, exc)
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                if (refused := await self._certificate_refused()) is not None:
                    log.error("%s", refused)
                    print(f"herder agent: {refused}", flush=True)
                    return 1
                log.info("coordinator %s unreachable: %s", where, exc)
            finally:
                self._ws = None
                if self._disconnected_at is None:
                    self._disconnected_at = time.monotonic()
            if self._stopping.is_set() and not self._running and not self._queue:
                return 0
            if self._rotation.advance():  # a whole round failed: back off
                delay = backoff * (0.5 + random.random())
                backoff = min(backoff * 2, self.config.reconnect_max_s)
            else:
                delay = FAILOVER_STEP_S * (0.5 + random.random())
            if self._rotation.target != self.config.url:
                self._ssl = None  # another coordinator, or discovery again: aim anew
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
        return 0

    async def _aim(self, target: str | None) -> bool:
        """Point the agent at ``target``, or at what discovery finds when it is None;
        False if asked to stop meanwhile."""
        if target is None:
            return await self._locate()
        if target != self.config.url:
            log.info(
                "trying the coordinator at %s",
                target,
                extra={"action": "coordinator_next", "node_id": self.config.node_id},
            )
        self.config = replace(self.config, url=target)
        return True

    async def _locate(self) -> bool:
        """Wait for discovery to name a coordinator and aim at it; False if asked to stop."""
        assert self.config.locate is not None
        found = asyncio.ensure_future(self.config.locate())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({found, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            found.cancel()
            stopping.cancel()
        if not found.done() or found.cancelled():
            return False
        url, fingerprint = found.result()
        if url != self.config.url:
            log.info("discovered the coordinator at %s", url)
        self.config = replace(self.config, url=url, fingerprint=fingerprint)
        return True

    async def _pair(self, ws: ClientConnection) -> None:
        nonce = security.new_nonce()
        held = [
            protocol.HeldLease(task_id=a.task_id, lease_id=a.lease_id)
            for a in [*self._queue, *(a for a, _ in self._running.values())]
        ] + [
            protocol.HeldLease(task_id=r.task_id, lease_id=r.lease_id)
            for r in self._unacked.values()
        ]
        await ws.send(
            protocol.encode(
                protocol.Hello(
                    node_id=self.config.node_id,
                    name=self.config.name,
                    slots=self.config.slots,
                    prefetch=self._prefetch(),
                    labels=self.config.labels,
                    data=self.config.data,
                    resources=self.config.resources or detect_resources(),
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    provider=self.config.provider,
                    nonce=nonce,
                    held=held,
                    token_id=self.config.token_id,
                )
            )
        )
        (challenge,) = protocol.decode_coordinator(await _recv(ws))
        if isinstance(challenge, protocol.Refuse):
            raise AuthenticationError(f"pairing refused by the coordinator: {challenge.reason}")
        if not isinstance(challenge, protocol.Challenge):
            raise protocol.ProtocolError("expected a challenge")
        key = self._pairing_key()
        expected = security.coordinator_proof(key, nonce, challenge.nonce)
        if not security.proofs_equal(challenge.mac, expected):
            await ws.send(protocol.encode(protocol.Bye(reason="coordinator proof invalid")))
            raise AuthenticationError(
                "pairing refused: the coordinator could not prove it knows the secret "
                "(wrong secret in the token?)"
            )
        mac = security.agent_proof(key, challenge.nonce, nonce)
        await ws.send(protocol.encode(protocol.Proof(mac=mac)))
        (welcome,) = protocol.decode_coordinator(await _recv(ws))
        if isinstance(welcome, protocol.Refuse):
            raise AuthenticationError(f"pairing refused by the coordinator: {welcome.reason}")
        if not isinstance(welcome, protocol.Welcome):
            raise protocol.ProtocolError("expected welcome")
        self._heartbeat_s = welcome.heartbeat_s
        self._lost_after_s = welcome.lost_after_s
        adopted = set(welcome.adopted)
        self._drop_unadopted(adopted)
        self._ws = ws
        self._disconnected_at = None
        self._last_active = time.monotonic()
        self._draining = False
        log.info("paired with %s as %s", self.config.url, self.config.node_id)

    def _pairing_key(self) -> bytes:
        """What the handshake proves knowledge of: the cluster secret, or the key of
        the agent token this node joined with (see security.pairing_key)."""
        if self.config.token_id is None:
            return self.config.secret
        return security.pairing_key(self.config.secret, self.config.token_id)

    async def _certificate_refused(self) -> str | None:
        """Why the coordinator refuses this node's client certificate, if it does (a
        connection failed: see herder.agent.certcheck)."""
        data = self._task_context["data"]
        if self.config.client_cert is None or self.config.client_key is None or not data:
            return None
        return await certificate_refused(
            self.config.url, data["ca_pem"], self.config.client_cert, self.config.client_key
        )

    def _bearer(self) -> str:
        """What tasks on this node authenticate to the datastore with: the token it
        joined with (an agent token may use the datastore and nothing else)."""
        if self.config.token_id is None:
            return security.JoinToken(self.config.secret, self.config.fingerprint).encode()
        token = security.ApiToken(self.config.token_id, self.config.secret, self.config.fingerprint)
        return token.encode()

    def _drop_unadopted(self, adopted: set[str]) -> None:
        """Forget leases the coordinator no longer honours: they run elsewhere."""
        self._queue = deque(a for a in self._queue if a.lease_id in adopted)
        for lid, (_, task) in list(self._running.items()):
            if lid not in adopted:
                task.cancel()
        for lid in list(self._unacked):
            if lid not in adopted:
                del self._unacked[lid]

    async def _session(self, ws: ClientConnection) -> bool:
        """Serve one connection; True when the agent is done and should exit."""
        if self._unacked:
            self._out_results.extend(self._unacked.values())
            self._schedule_flush()
        async with asyncio.TaskGroup() as tg:
            hb = tg.create_task(self._heartbeat_loop(ws), name="heartbeat")
            stop = tg.create_task(self._stop_when_asked(ws), name="stop")
            try:
                async for frame in ws:
                    for msg in protocol.decode_coordinator(
                        frame if isinstance(frame, bytes) else b""
                    ):
                        self._on_message(msg)
            except websockets.ConnectionClosed:
                pass
            finally:
                hb.cancel()
                stop.cancel()
        return (
            self._stopping.is_set() and not self._running and not self._queue and not self._unacked
        )

    async def _stop_when_asked(self, ws: ClientConnection) -> None:
        await self._stopping.wait()
        await self._stop_services()
        await self._hand_back(leaving=True)
        with contextlib.suppress(TimeoutError):
            grace = None if self._patient else self.config.grace_s
            if self._interrupting:
                grace = min(self.config.grace_s, INTERRUPT_SETTLE_S)
            await asyncio.wait_for(self._wait_settled(), grace)
        await self._hand_back()  # tasks killed for an interruption meanwhile: before the bye
        for _, task in list(self._running.values()):
            task.cancel()
        with contextlib.suppress(websockets.WebSocketException):
            await ws.send(protocol.encode(protocol.Bye(reason=self._bye_reason)))
            await ws.close()

    async def _wait_settled(self) -> None:
        """Until nothing runs and every result is acknowledged."""
        while self._running or self._unacked:
            self._changed.clear()
            await self._changed.wait()

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _hand_back(self, *, leaving: bool = False) -> None:
        """Release the queued leases, and those of tasks killed for an interruption
        (only once they are dead, so no task runs twice at once). ``leaving``:
        also tell the coordinator to lease nothing more here, even with nothing
        to hand back (a stopping agent's slots free up as its tasks end)."""
        queued, self._queue = list(self._queue), deque()
        killed = [h for h in self._to_release if h.lease_id not in self._running]
        self._to_release = [h for h in self._to_release if h.lease_id in self._running]
        leases = [protocol.HeldLease(task_id=a.task_id, lease_id=a.lease_id) for a in queued]
        leases += killed
        if not (leases or leaving):
            return
        if self._ws is None:
            if killed:
                log.warning(
                    "not connected: %d interrupted leases will expire at the coordinator",
                    len(killed),
                )
            return
        with contextlib.suppress(websockets.WebSocketException):
            await self._ws.send(
                protocol.encode(
                    protocol.Release(leases=leases, interrupted=bool(killed), leaving=leaving)
                )
            )

    def _on_message(self, msg: Any) -> None:
        if isinstance(msg, protocol.Assign):
            if self._stopping.is_set():
                self._queue.extend(msg.tasks)
                self._background(self._hand_back())
                return
            self._queue.extend(msg.tasks)
            self._queue_event.set()
            self._last_active = time.monotonic()
            self._release_if_blocked()
        elif isinstance(msg, protocol.Ack):
            for lid in (*msg.accepted, *msg.refused):
                self._unacked.pop(lid, None)
            self._changed.set()
            self._last_active = time.monotonic()
            if msg.refused:
                log.info("coordinator refused %d stale results", len(msg.refused))
        elif isinstance(msg, protocol.Cancel):
            gone = set(msg.leases)
            self._queue = deque(a for a in self._queue if a.lease_id not in gone)
            for lid in gone:
                entry = self._running.get(lid)
                if entry is not None:
                    entry[1].cancel()
        elif isinstance(msg, protocol.Drain):
            self._draining = True
            self._background(self._hand_back())
            if msg.kill:  # terminated: the running tasks go back to the queue now
                self._background(self._give_everything_back("drained"))
            elif msg.leave:  # the running tasks end first, however long they take
                self._bye_reason = "drained"
                self._patient = True
                self.stop()
        elif isinstance(msg, protocol.LoadRelease):
            self._background(self._load_release(msg.release))
        elif isinstance(msg, protocol.Deliver):
            # to every running task's worker: handlers live there (herder.node)
            for slot in self._slots:
                slot.deliver(msg)
        else:
            raise protocol.ProtocolError(f"unexpected {type(msg).__name__}")

    async def _load_release(self, release_id: str) -> None:
        """The coordinator asked for the release (the fleet's): install it, say how it went."""
        with contextlib.suppress(ReleaseError):  # reported to the coordinator by ensure()
            await self._environments.ensure(release_id, report=True)

    def _release_loaded(
        self, release_id: str, seconds: float, cached: bool, error: str | None
    ) -> None:
        if error is not None:
            log.warning("release %s could not be installed: %s", release_id, error)
        else:
            log.info(
                "release %s ready in %.2fs%s", release_id, seconds, " (cached)" if cached else ""
            )
        self._out_releases.append(
            protocol.ReleaseLoaded(
                release=release_id, seconds=seconds, cached=cached, error=error and error[-16_000:]
            )
        )
        self._schedule_flush()

    async def _heartbeat_loop(self, ws: ClientConnection) -> None:
        while True:
            leases = [*self._running, *(a.lease_id for a in self._queue)]
            health = [h.report(a.task_id, a.lease_id) for a, h in self._health.values()]
            beat = protocol.Heartbeat(
                leases=leases,
                prefetch=self._prefetch(),
                telemetry=self._sampler.sample(),
                health=health or None,
                releases=self._environments.installed(),
                loading=self._environments.loading,
            )
            try:
                await ws.send(protocol.encode(beat))
            except websockets.ConnectionClosed:
                return  # the reading side sees it too and ends the session: reconnect
            await asyncio.sleep(self._heartbeat_s)

    async def _watchdog(self) -> None:
        """Stop tasks whose leases expired while the coordinator was away; retire when idle."""
        while True:
            await asyncio.sleep(0.25)
            if not self._stopping.is_set() and not self._interrupting and self._is_idle():
                self._retire()
            gone = self._disconnected_at
            if gone is not None and time.monotonic() - gone > self.config.orphan_after_s:
                if not self._orphaned:
                    log.error(
                        "no coordinator for %.0fs: leaving (orphan_after, then %s)",
                        self.config.orphan_after_s,
                        self.config.orphan_action,
                    )
                self._orphaned = True
                self.stop()
            if gone is not None and time.monotonic() - gone > self._lost_after_s:
                if self._running or self._queue:
                    log.warning(
                        "coordinator away for %.1fs: stopping %d tasks",
                        time.monotonic() - gone,
                        len(self._running) + len(self._queue),
                    )
                self._queue.clear()
                for _, task in list(self._running.values()):
                    task.cancel()

    # --- the machine: spot interruption, orphan shutdown -------------------------------

    async def _watch_spot(self, url: str) -> None:
        notice = await SpotWatcher(url, poll_s=self.config.spot_poll_s).wait_notice()
        await self._interrupt(notice)

    async def _interrupt(self, notice: SpotNotice) -> None:
        """The machine is being taken away: kill the running tasks, hand every lease
        back at once, say goodbye as ``spot interruption`` and leave."""
        running = list(self._running.values())
        log.warning(
            "spot interruption notice (%s at %s): killing %d tasks, handing back %d leases",
            notice.action,
            notice.time,
            len(running),
            len(running) + len(self._queue),
            extra={"action": "spot_interruption", "node_id": self.config.node_id},
        )
        await self._give_everything_back(Reason.SPOT_INTERRUPTION.value)

    async def _give_everything_back(self, bye_reason: str) -> None:
        """Kill the running tasks, hand every lease back at once (not charged, no
        result sent for the killed), say goodbye and leave."""
        running = list(self._running.values())
        self._interrupting = True
        self._bye_reason = bye_reason
        self._draining = True  # the slots take nothing more
        self._interrupted.update(a.lease_id for a, _ in running)
        self._to_release.extend(
            protocol.HeldLease(task_id=a.task_id, lease_id=a.lease_id) for a, _ in running
        )
        for _, task in running:
            task.cancel()
        if running:
            await asyncio.wait([task for _, task in running], timeout=INTERRUPT_KILL_WAIT_S)
        await self._hand_back()
        self.stop()

    async def _stop_services(self) -> None:
        """Leaving: kill the running services and hand their leases back at once.

        A service never ends on its own, so waiting for it (as for an ordinary
        task) would hold the node forever; handed back, it starts again on
        another node now rather than when a lease expires. Not charged: the
        coordinator counts a restart.
        """
        services = [(a, task) for a, task in self._running.values() if a.service is not None]
        if not services:
            return
        log.info(
            "leaving: stopping %d services to hand them back",
            len(services),
            extra={"action": "services_handed_back", "node_id": self.config.node_id},
        )
        leases = {a.lease_id for a, _ in services}
        self._interrupted.update(leases)
        self._to_release.extend(
            protocol.HeldLease(task_id=a.task_id, lease_id=a.lease_id) for a, _ in services
        )
        for _, task in services:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wait_gone(leases), INTERRUPT_KILL_WAIT_S)

    async def _wait_gone(self, leases: set[str]) -> None:
        """Until none of ``leases`` holds a slot (their processes are dead)."""
        while leases & self._running.keys():
            self._changed.clear()
            await self._changed.wait()

    async def _shut_down_machine(self) -> int:
        """Run ``shutdown_command`` (orphaned, ``orphan_action="shutdown"``); the exit code."""
        command = self.config.shutdown_command
        log.warning(
            "orphaned: shutting the machine down: %s",
            shlex.join(command),
            extra={"action": "orphan_shutdown", "node_id": self.config.node_id},
        )
        try:
            proc = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL)
            code = await asyncio.wait_for(proc.wait(), SHUTDOWN_COMMAND_WAIT_S)
        except (OSError, TimeoutError) as exc:
            log.error("shutdown command %s failed: %s", shlex.join(command), exc)
            return 1
        if code != 0:
            log.error("shutdown command %s exited with %d", shlex.join(command), code)
            return 1
        return 0

    # --- running tasks ----------------------------------------------------------------

    async def _slot_loop(self, slot: Slot) -> None:
        await slot.warm()  # while the agent pairs
        previous_start: float | None = None
        while True:
            while not self._queue or self._draining:
                previous_start = None  # idle time is not a task's turnaround
                self._queue_event.clear()
                await self._queue_event.wait()
            now = time.monotonic()
            if previous_start is not None:
                # start to start while busy: the task plus every overhead around
                # it, i.e. how fast this slot really drains its queue
                self._observe(now - previous_start)
            previous_start = now
            assignment = self._queue.popleft()
            task = asyncio.create_task(self._execute(slot, assignment))
            self._running[assignment.lease_id] = (assignment, task)
            if assignment.service is not None:
                self._release_if_blocked()
            try:
                await asyncio.wait({task})
            finally:
                self._running.pop(assignment.lease_id, None)
                self._changed.set()
                if not task.done():
                    task.cancel()

    async def _execute(self, slot: Slot, a: protocol.Assignment) -> None:
        loop = asyncio.get_running_loop()
        if a.command is not None and a.command.secret_env:  # stored sealed: open them here
            try:
                opened = a.command.with_secrets(lambda v: security.unseal(self.config.secret, v))
            except SecurityError as exc:
                self._report(
                    a,
                    {
                        "state": "failed",
                        "reason": "error",
                        "error": {"type": "SecurityError", "message": str(exc)},
                    },
                )
                return
            a = a.model_copy(update={"command": opened})
        handle: asyncio.TimerHandle | None = None
        try:
            if a.start_delay_s > 0:  # a restarted service's back-off: not started yet
                await asyncio.sleep(a.start_delay_s)
            handle = loop.call_later(STARTED_REPORT_DELAY_S, self._report_started, a)
            if self._exec_log is not None:
                self._exec_log.write("start", a.task_id, a.attempt, a.lease_id)
            failed = await self._enter_release(slot, a)
            if failed is not None:
                out = failed
            elif a.service is not None:
                out = await self._run_service(slot, a)
            else:
                out = await slot.run(a)
        except asyncio.CancelledError:
            if a.lease_id in self._interrupted:
                self._interrupted.discard(a.lease_id)
                return  # killed to be handed back (interruption, leaving): no result
            out = {"state": "cancelled", "reason": "cancelled"}
        finally:
            if handle is not None:
                handle.cancel()
        self._report(a, out)

    def _report(self, a: protocol.Assignment, out: dict[str, Any]) -> None:
        """Queue the outcome of ``a`` for the coordinator (resent until acknowledged)."""
        item = protocol.ResultItem(
            task_id=a.task_id,
            lease_id=a.lease_id,
            state=out["state"],
            reason=out.get("reason"),
            result=out.get("result"),
            error=out.get("error"),
            error_pickle=out.get("error_pickle"),
            output=out.get("output"),
            started_at=out.get("started_at"),
            ended_at=out.get("ended_at"),
        )
        if self._exec_log is not None:
            self._exec_log.write("end", a.task_id, a.attempt, a.lease_id, state=item.state)
        self._unacked[a.lease_id] = item
        self._out_results.append(item)
        self._schedule_flush()

    async def _enter_release(self, slot: Slot, a: protocol.Assignment) -> dict[str, Any] | None:
        """Put ``slot`` in the task's release (installing it if need be); the failed
        outcome if it cannot be installed, with the installer's output."""
        if slot.release_id == a.release:
            return None
        started = time.time()
        if a.release is None:
            await slot.switch(None, None)
            return None
        try:
            installed, hold = await self._environments.acquire(a.release)
        except ReleaseError as exc:
            return {
                "state": "failed",
                "reason": Reason.RELEASE_FAILED.value,
                "error": {"type": "ReleaseError", "message": str(exc)},
                "started_at": started,
                "ended_at": time.time(),
            }
        await slot.switch(installed, hold)
        return None

    async def _run_service(self, slot: Slot, a: protocol.Assignment) -> dict[str, Any]:
        """Run a service in ``slot`` while checking its health; the outcome map.

        After too many failed checks in a row the run is killed (as a cancel
        kills a task) and the outcome says ``unhealthy``.
        """
        assert a.service is not None
        if a.service.health is None:
            return await slot.run(a)
        started = time.time()
        health = Health()
        run = asyncio.ensure_future(slot.run(a))
        checks = asyncio.ensure_future(watch(self._health_check(a), health))
        self._health[a.lease_id] = (a, health)
        try:
            await asyncio.wait({run, checks}, return_when=asyncio.FIRST_COMPLETED)
            if run.done():
                checks.cancel()
                await asyncio.wait({checks})
                return run.result()
            run.cancel()  # unhealthy (or the checks broke): kill the service
            await asyncio.wait({run})
        except asyncio.CancelledError:  # cancelled or handed back: the run dies first
            run.cancel()
            checks.cancel()
            await asyncio.wait({run, checks})
            raise
        finally:
            self._health.pop(a.lease_id, None)
        checks.result()  # a fault in the checks themselves is the agent's, not the task's
        if not run.cancelled():
            return run.result()  # it ended by itself meanwhile
        log.warning(
            "service %s unhealthy after %d failed checks: killed (%s)",
            a.task_id,
            health.failures,
            health.error,
            extra={"action": "service_unhealthy", "task_id": a.task_id, "lease_id": a.lease_id},
        )
        return {
            "state": "failed",
            "reason": Reason.UNHEALTHY.value,
            "error": {
                "type": "Unhealthy",
                "message": f"{health.failures} health checks failed in a row: {health.error}",
            },
            "started_at": started,
            "ended_at": time.time(),
        }

    def _health_check(self, a: protocol.Assignment) -> HealthCheck:
        """The check of service ``a``, run where and as its command runs."""
        assert a.service is not None
        assert a.command is not None
        root = Path(self._task_context["scratch_root"])
        work = attempt_dir(root, a.task_id, a.attempt) / "work"
        env = {
            **task_environment(),
            **a.command.env,
            "HERDER_TASK_ID": a.task_id,
            "HERDER_JOB": a.job_id,
        }
        cwd = work / a.command.cwd if a.command.cwd else work
        return HealthCheck(a.service, cwd=cwd, env=env)

    def _release_if_blocked(self) -> None:
        """Hand back the queue when services hold every slot.

        A service never ends, so what waits behind it here would wait forever;
        handed back, it runs on a node with room. The coordinator gives this
        node nothing more while its services fill its slots, so nothing
        comes straight back.
        """
        held = sum(1 for a, _ in self._running.values() if a.service is not None)
        if held >= self.config.slots and self._queue:
            log.info(
                "services hold all %d slots: handing back %d queued tasks",
                self.config.slots,
                len(self._queue),
                extra={"action": "queue_handed_back", "node_id": self.config.node_id},
            )
            self._background(self._hand_back())

    def _report_started(self, a: protocol.Assignment) -> None:
        if a.lease_id in self._running:
            self._out_started.append(protocol.HeldLease(task_id=a.task_id, lease_id=a.lease_id))
            self._schedule_flush()

    def _on_output(self, a: protocol.Assignment, stream: str, data: bytes) -> None:
        """A running command's new output: rides the next frame to the coordinator."""
        if self._ws is None:
            return  # live output is best effort; the result carries the tails
        self._out_output.append(
            protocol.OutputChunk(
                task_id=a.task_id,
                lease_id=a.lease_id,
                stream=stream,  # type: ignore[arg-type]
                data=data,
            )
        )
        self._schedule_flush()

    def _on_bus(self, a: protocol.Assignment, frame: dict[str, Any]) -> None:
        """A running task's ``herder.task`` call: rides the next frame to the coordinator.

        Best effort like live output: while disconnected they are dropped (a
        progress note or an event is stale by the time the link is back).
        A frame the protocol refuses (too big, a bad fraction) is dropped and
        logged: ``herder.task`` checks the same limits, so only a task that
        bypassed it gets here.
        """
        if self._ws is None:
            return
        msg: protocol.Send | protocol.Emit | protocol.Progress | protocol.TaskTelemetry
        try:
            if frame["event"] == "telemetry":
                msg = protocol.TaskTelemetry(
                    task_id=a.task_id, lease_id=a.lease_id, readings=frame["readings"]
                )
            elif frame["event"] == "progress":
                msg = protocol.Progress(
                    task_id=a.task_id,
                    lease_id=a.lease_id,
                    job_id=a.job_id,
                    fraction=frame["fraction"],
                    message=frame.get("message", ""),
                )
            elif frame["event"] == "emit":
                msg = protocol.Emit(topic=frame["topic"], data=frame.get("data"), task_id=a.task_id)
            else:
                msg = protocol.Send(
                    target=frame["target"],
                    topic=frame["topic"],
                    data=frame.get("data"),
                    task_id=a.task_id,
                )
        except (ValueError, KeyError) as exc:
            log.warning(
                "task %s sent a bad bus frame: %s",
                a.task_id,
                exc,
                extra={"action": "bus_refused", "task_id": a.task_id, "lease_id": a.lease_id},
            )
            return
        self._out_bus.append(msg)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Send on the next loop turn, so everything finished meanwhile shares one frame."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(lambda: self._background(self._flush()))

    async def _flush(self) -> None:
        self._flush_scheduled = False
        ws = self._ws
        if ws is None:
            return  # resent from _unacked after the next pairing
        messages: list[protocol._Msg] = []
        if self._out_started:
            messages.append(protocol.Started(leases=self._out_started, at=time.time()))
            self._out_started = []
        if self._out_output:
            messages.append(protocol.Output(chunks=self._out_output))
            self._out_output = []
        if self._out_bus:
            messages.extend(self._out_bus)
            self._out_bus = []
        if self._out_releases:
            messages.extend(self._out_releases)
            self._out_releases = []
        if self._out_results:
            messages.append(protocol.Results(items=self._out_results, prefetch=self._prefetch()))
            self._out_results = []
        if messages:
            with contextlib.suppress(websockets.WebSocketException):
                await ws.send(protocol.encode(*messages))


def _left(ws: ClientConnection) -> float:
    """When the coordinator was last heard of, as best known: for a link cut
    silently (no pong) at least the pong timeout before now, so the watchdog
    stops the tasks about when the coordinator gives their leases away."""
    sent = ws.protocol.close_sent
    if sent is not None and sent.reason == "keepalive ping timeout":
        return time.monotonic() - FAILOVER_PONG_S
    return time.monotonic()


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


async def _recv(ws: ClientConnection) -> bytes:
    frame = await asyncio.wait_for(ws.recv(), 10)
    if isinstance(frame, str):
        raise protocol.ProtocolError("expected a binary frame")
    return frame
