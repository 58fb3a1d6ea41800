"""The coordinator service: wires store, sessions, dispatch, lease expiry and the fleet.

Written shutdown order (:meth:`Coordinator.run` after :meth:`stop`):

1. stop intake: new submissions are refused with 503, nothing new is dispatched;
2. tell every agent to drain: unstarted leases come back, running tasks finish;
3. wait up to ``shutdown_grace_s`` for outstanding leases to report;
4. terminate the nodes the herd's provider started;
5. stop the HTTP server, cancel the loops, close the store.

Each step is logged. :meth:`stop` is idempotent and only sets an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import WebSocket

from herder import protocol, security
from herder.config import Settings
from herder.datastore import Datastore
from herder.discovery import DiscoveryOptions
from herder.discovery.beacon import host_urls, run_beacon
from herder.discovery.tracker import Entry
from herder.errors import InvalidTransition, SecurityError, StoreError, SubmissionError
from herder.fleet import Fleet, NodeLoad
from herder.herd import Herd
from herder.model import (
    CommandSpec,
    NodeRecord,
    NodeState,
    Reason,
    ServiceRecord,
    TaskRecord,
    TaskSpec,
    TaskState,
    constraint_key,
    labels_match,
    new_id,
)
from herder.releases.manifest import Manifest
from herder.selector import Facts, parse_key
from herder.store.base import Changes, Claimed, ClaimRequest, Final, Submission, TaskResult
from herder.store.cluster import leader_lock
from herder.store.sql import SqlStore
from herder.tls_setup import TlsSetup

from .auth import Authenticator, Principal
from .bus import Bus
from .guard import ConnectionCounter, TlsGate, TlsWebSocketProtocol, guarded_protocol
from .leader import Leadership
from .live_routes import LiveFeed
from .logs import TaskLogs
from .metrics import Metrics
from .pairing import RefusalLog, client_certificate_refusal
from .peers import Peers
from .releases import ReleaseCatalog
from .sessions import AgentSession, ClientSession
from .telemetry import TelemetrySeries

log = logging.getLogger("herder.coordinator")

# How long a node may take to install the fleet's release before it is given up on.
RELEASE_LOAD_TIMEOUT_S = 30 * 60.0
COUNTS_CACHE_S = 1.0


@dataclass(frozen=True)
class CoordinatorStats:
    """A snapshot for status displays and telemetry."""

    agents: int
    clients: int
    outstanding: int
    ready_hint: int
    dispatched: int
    completed: int
    started_at: float


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (only ``cli.py`` installs handlers), that
    says when it listens (``up``) rather than being polled for it."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.up = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self.up.set()  # listening, or (``started`` false) given up


class Coordinator:
    """One coordinator: ``async with Coordinator(settings) as c: await c.wait_stopped()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        herd: Herd | None = None,
        discovery: DiscoveryOptions | None = None,
        tls: TlsSetup | None = None,
    ) -> None:
        self.settings = settings
        # Off unless asked (``herder up`` asks by default): an embedded herd stays quiet.
        self.discovery = discovery or DiscoveryOptions(beacon=False)
        self.store = SqlStore(settings.store_url)
        self.secret = security.load_or_create_secret(settings.secret_path)
        self.tls = (tls or TlsSetup.for_settings(settings)).result()
        self.ca_pem = security.served_ca_pem(self.tls)
        self.fingerprint = security.ca_fingerprint(self.ca_pem)
        self.datastore = Datastore(settings.datastore, settings.datastore_options)
        self.releases = ReleaseCatalog(self.datastore, self.store)
        self._sock = self._bind()
        port = self._sock.getsockname()[1]
        self.url = settings.url.rsplit(":", 1)[0] + f":{port}"
        # This process among the coordinators of the store (new at each start).
        self.id = new_id("co")
        self.agents: dict[str, AgentSession] = {}
        self.clients: set[ClientSession] = set()
        # task id -> who waits for its outcome; immutable, and one set shared by all
        # the tasks a client submitted at once (a set per queued task cost ~200 bytes).
        # The only record of who watches what: a copy per session, to unwatch a
        # closed one without a walk, cost 4 MB of 17 at 100,000 queued.
        self.watchers: dict[str, frozenset[ClientSession]] = {}
        self._known_ckeys: set[str] = {""}
        self._ready_hint = 0
        self._wake = asyncio.Event()
        # After a failed store transaction, submissions are refused at once (503) while
        # the engine's retry is under way and for a second after it (as Retry-After
        # says), rather than queued behind it: a store that is down would keep each
        # waiting a busy timeout or two. Then one goes through and tries the store.
        self._store_down: tuple[float, StoreError] | None = None
        self._committing = False
        self._results: asyncio.Queue[tuple[AgentSession, list[protocol.ResultItem]]] = (
            asyncio.Queue()
        )
        self._started: list[tuple[str, str]] = []
        self._submissions: list[tuple[Submission, asyncio.Future[None]]] = []
        self._released: list[tuple[str, str]] = []
        self.logs = TaskLogs(self.datastore)
        self.telemetry = TelemetrySeries(self.store)
        self.metrics = Metrics()
        self.feed = LiveFeed()
        self.auth = Authenticator(self.secret, self.store, settings.max_auth_failures)
        self.live_sockets: dict[WebSocket, Principal] = {}
        self._counts: tuple[float, dict[str, int]] = (-COUNTS_CACHE_S, {})
        self._counts_lock = asyncio.Lock()
        self.connections = ConnectionCounter(settings.max_connections_per_source)
        self.tls_gate = TlsGate(
            security.server_context(self.tls, client_certs=settings.agent_mtls),
            self.connections,
            settings.timeouts.tls_handshake_s,
        )
        self.refusals = RefusalLog()
        self.bus = Bus(self)
        # task id -> the last health its agent reported (a cache: runs are
        # short-lived facts, the store keeps restarts and history)
        self._health: dict[str, protocol.HealthReport] = {}
        self._stopping = asyncio.Event()
        self._acked = asyncio.Event()
        self._stopped = asyncio.Event()
        self._ready = asyncio.Event()
        self._orphan_deadline: dict[str, float] = {}
        self._dispatched = 0
        self._completed = 0
        self._started_at = time.time()
        self.fleet = Fleet(
            herd or Herd(),
            self.store,
            self,
            join=self.join_token(),
            grace_s=settings.timeouts.shutdown_grace_s,
        )
        self.peers = Peers(self)
        self.leadership = Leadership(
            leader_lock(settings.store_url),
            self.store,
            coordinator_id=self.id,
            url=self.url,
            work=self._lead,
        )
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        host, port = self.settings.listen_host, self.settings.listen_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit this on Linux; without it Nagle holds a small
        # frame behind an unacknowledged one for a delayed-ACK period (40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
        return sock

    def join_token(self) -> str:
        return security.JoinToken(self.secret, self.fingerprint, self.url).encode()

    async def __aenter__(self) -> Coordinator:
        self._task = asyncio.create_task(self.run(), name="coordinator")
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            ready.cancel()
            self._task.result()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        if self._task is not None:
            await self._task

    def stop(self) -> None:
        """Ask for an orderly shutdown (idempotent)."""
        self._stopping.set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def statistics(self) -> CoordinatorStats:
        return CoordinatorStats(
            agents=len(self.agents),
            clients=len(self.clients),
            outstanding=sum(len(a.outstanding) for a in self.agents.values()),
            ready_hint=self._ready_hint,
            dispatched=self._dispatched,
            completed=self._completed,
            started_at=self._started_at,
        )

    async def run(self) -> None:
        from .app import create_app

        await self.store.open()
        try:
            await self.peers.open()
            await self._recover()
            await self.auth.load()
            await self.fleet.start(self.settings.home)
            await self.releases.start(self.declared_release)
            config = uvicorn.Config(
                create_app(self),
                log_level="warning",
                lifespan="off",
                ws_max_size=protocol.MAX_FRAME_BYTES,
                # TLS with a handshake deadline, a per-source cap from accept, slowloris
                http=guarded_protocol(self.tls_gate),
                ws=TlsWebSocketProtocol,  # the client certificate in the scope (mutual TLS)
                timeout_keep_alive=5,
                ws_ping_interval=None,
                timeout_graceful_shutdown=2,
            )
            self._server = _Server(config)
            async with asyncio.TaskGroup() as tg:
                server_task = tg.create_task(self._server.serve(sockets=[self._sock]), name="http")
                await self._server.up.wait()
                if not self._server.started:
                    await server_task  # uvicorn gave up (it logged why)
                    return
                loops = [
                    tg.create_task(self._engine_loop(), name="engine"),
                    tg.create_task(self._expiry_loop(), name="lease-expiry"),
                    tg.create_task(self.fleet.run_callbacks(), name="herd-callbacks"),
                    tg.create_task(self.leadership.run(), name="leadership"),
                    tg.create_task(self.peers.presence_loop(), name="presence"),
                    tg.create_task(self.peers.publish_loop(), name="peers-publish"),
                    tg.create_task(self.peers.finals_loop(), name="peers-finals"),
                    tg.create_task(self.peers.refresh_loop(), name="peers-refresh"),
                    tg.create_task(self._telemetry_loop(), name="telemetry"),
                ]
                loops += await self._discovery_loops(tg)
                self._write_state_file()
                log.info("coordinator ready at %s (store %s)", self.url, self.store.url)
                self._ready.set()
                await self._stopping.wait()
                await self._shutdown(loops)
                self._server.should_exit = True
        finally:
            self.tls_gate.close()
            await self.peers.close()
            await self.store.close()
            with contextlib.suppress(FileNotFoundError):
                self.settings.state_path.unlink()
            self._stopped.set()
            log.info("coordinator stopped")

    async def _discovery_loops(self, tg: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        """Start the beacon and the tracker announcements that ``self.discovery`` asks for.

        They run in the service's task group, so a loop that dies stops the
        coordinator loudly; they are cancelled with the other loops at shutdown.
        """
        options = self.discovery
        # Serving the tracker routes: announce there too, so agents asking it find us.
        tracker_url = options.tracker_url or (self.url if options.serve_tracker else None)
        if not options.beacon and tracker_url is None:
            return []
        cluster = await self.store.cluster_id()
        port = self._sock.getsockname()[1]

        def urls() -> list[str]:
            if self.settings.advertise_url:
                return [self.url]
            return host_urls(port, self.settings.listen_host)

        loops = []
        if options.beacon:
            beacon = run_beacon(
                self.secret, cluster, self.fingerprint, urls, port=options.beacon_port
            )
            loops.append(tg.create_task(beacon, name="beacon"))
            log.info("beacon on UDP port %d for cluster %s", options.beacon_port, cluster)
        if tracker_url is not None:
            # here, not at the top: httpx is 20 MB a coordinator without a tracker never uses
            from herder.discovery.tracker_client import TrackerClient, announce_loop

            tracker = TrackerClient(tracker_url, self.secret)

            def entry() -> Entry:
                return Entry(
                    kind="coordinator",
                    id=cluster,
                    urls=urls(),
                    fingerprint=self.fingerprint.hex(),
                    cluster=cluster,
                    data={"agents": len(self.agents)},
                )

            async def announce() -> None:
                async with tracker:
                    await announce_loop(tracker, entry)

            loops.append(tg.create_task(announce(), name="tracker-announce"))
            log.info("announcing to the tracker at %s", options.tracker_url)
        return loops

    def _write_state_file(self) -> None:
        path = self.settings.state_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        # the CA fingerprint too: with the user's own CA it is not the home's tls/ca.pem
        fingerprint = self.fingerprint.hex()
        tmp.write_text(json.dumps({"url": self.url, "pid": os.getpid(), "ca": fingerprint}))
        os.replace(tmp, path)

    async def _shutdown(self, loops: list[asyncio.Task[None]]) -> None:
        log.info("shutdown 1/5: intake stopped")
        log.info("shutdown 2/5: draining %d agents", len(self.agents))
        for agent in list(self.agents.values()):
            agent.draining = True
            with contextlib.suppress(Exception):
                await agent.send(protocol.Drain())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wait_drained(), self.settings.timeouts.shutdown_grace_s)
        left = sum(a.finishing() for a in self.agents.values())
        services = sum(len(a.outstanding) for a in self.agents.values()) - left
        log.info(
            "shutdown 3/5: %d leases still out after the grace period (and %d services, "
            "which run on where their node stays and are adopted again)",
            left,
            services,
        )
        if self.leadership.is_leader:
            await self.fleet.stop_all()
            log.info("shutdown 4/5: the herd's nodes terminated")
        else:  # another coordinator of the store runs the fleet: its nodes are its own
            log.info("shutdown 4/5: not the fleet's leader: the herd's nodes left running")
        for task in loops:
            task.cancel()
        for agent in list(self.agents.values()):
            agent.closed = True
            with contextlib.suppress(Exception):
                await agent.ws.close(1001, "coordinator shutting down")
        for client in list(self.clients):
            client.closed = True
            with contextlib.suppress(Exception):
                await client.ws.close(1001, "coordinator shutting down")
        await self.logs.flush()
        log.info("shutdown 5/5: connections closed, logs kept")

    async def _wait_drained(self) -> None:
        """Until the agents hold no lease but their services' (which never end)."""
        while any(a.finishing() for a in self.agents.values()):
            self._acked.clear()
            await self._acked.wait()

    async def _recover(self) -> None:
        """After a (re)start: count the queue, and requeue what dead nodes held.

        Nodes recorded alive are left alone: they may be served by another
        coordinator of the store, or be about to reconnect here. The leader's
        sweep (:meth:`Peers.sweep_loop`) declares lost those that no
        coordinator hears for ``lost_after_s`` after it took the lead.
        """
        counts = await self.store.counts()
        self._ready_hint = counts.get(TaskState.READY.value, 0)
        self._known_ckeys.update(await self.store.ready_constraint_keys())
        now = time.time()
        for node in await self.store.nodes():
            if node.paused and node.state.is_alive:
                self.bus.paused.add(node.id)
            if not node.state.is_alive:
                self._apply(await self.store.requeue_node(node.id, Reason.LOST_HEARTBEAT, now))

    async def _lead(self) -> None:
        """The leader's work: the fleet reconcile loop and the silent-node sweep."""
        since = self.leadership.since or time.monotonic()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.fleet.run_reconcile(self._stopping), name="fleet")
            tg.create_task(self.peers.sweep_loop(since), name="silent-node-sweep")

    @property
    def is_stopping(self) -> bool:
        return self._stopping.is_set()

    # --- submissions and cancel -----------------------------------------------------

    async def submit(
        self,
        job_id: str,
        job_name: str | None,
        specs: list[TaskSpec],
        watcher: ClientSession | None,
        *,
        owner: str | None = None,
    ) -> None:
        """Commit a batch, then (only then) return so the caller can acknowledge it.

        The batch rides the engine's next transaction, together with results
        and claims; so a submission can be leased in the very commit that
        stores it.
        """
        if self.is_stopping:
            raise SubmissionError("the coordinator is shutting down", status=503)
        if self._store_down is not None and (
            self._committing or time.monotonic() < self._store_down[0]
        ):
            raise SubmissionError(f"store unavailable: {self._store_down[1]}", status=503)
        await self.releases.check(specs)
        specs = [self._sealed(s) for s in specs]
        fleet_release = self.releases.fleet_release
        if fleet_release is not None:  # bound now: a later roll-out does not move it
            specs = [
                s if s.release is not None else s.model_copy(update={"release": fleet_release})
                for s in specs
            ]
        if watcher is not None:
            self.watch(watcher, [s.id for s in specs])
        self._known_ckeys.update(s.constraint_key() for s in specs)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._submissions.append((Submission(job_id, job_name, specs, owner), done))
        self._wake.set()
        try:
            await done
        except Exception:
            if watcher is not None:
                self.unwatch(watcher, [s.id for s in specs])
            raise

    async def cancel(self, task_ids: list[str] | None, job_id: str | None) -> list[str]:
        changes = await self.store.cancel(task_ids, job_id, time.time())
        by_node: dict[str, list[str]] = {}
        for node_id, lease_id in changes.cancel_leases:
            by_node.setdefault(node_id, []).append(lease_id)
        for node_id, leases in by_node.items():
            agent = self.agents.get(node_id)
            if agent is not None:
                for lease in leases:
                    agent.outstanding.pop(lease, None)
                with contextlib.suppress(Exception):
                    await agent.send(protocol.Cancel(leases=leases))
        self._apply(changes)
        return [f.task_id for f in changes.finals if f.state is TaskState.CANCELLED]

    def watch(self, client: ClientSession, task_ids: Iterable[str]) -> None:
        alone = frozenset((client,))
        for tid in task_ids:
            ws = self.watchers.get(tid)
            self.watchers[tid] = alone if ws is None or ws == alone else ws | alone

    def unwatch(self, client: ClientSession, task_ids: Iterable[str]) -> None:
        for tid in task_ids:
            ws = self.watchers.get(tid)
            if ws is not None:
                rest = ws - {client}
                if rest:
                    self.watchers[tid] = rest
                else:
                    del self.watchers[tid]

    def unwatch_all(self, client: ClientSession) -> None:
        """Forget a closed session's watches: one walk of the map (10 ms per 100,000)."""
        self.unwatch(client, [tid for tid, ws in self.watchers.items() if client in ws])

    def _apply(self, changes: Changes) -> None:
        """Act on a committed transaction: wake dispatch, tell watchers (and the
        other coordinators of the store)."""
        self.peers.note(ready=changes.newly_ready, finals=changes.finals)
        if changes.newly_ready:
            self._ready_hint += changes.newly_ready
            self._wake.set()
        if changes.finals:
            self._completed += len(changes.finals)
            self._notify(changes.finals)
            self.feed.finals(changes.finals)
            self.logs.end(f.task_id for f in changes.finals)
            self.bus.drop([f.task_id for f in changes.finals])
        if changes.requeued:
            self.logs.end(changes.requeued)
            self.bus.drop(list(changes.requeued))
            for tid in changes.requeued:
                self._health.pop(tid, None)
        for f in changes.finals:
            self._health.pop(f.task_id, None)

    def _notify(self, finals: list[Final]) -> None:
        by_client: dict[ClientSession, list[protocol.Outcome]] = {}
        for f in finals:
            clients = self.watchers.pop(f.task_id, None)
            if not clients:
                continue
            outcome = protocol.Outcome(
                task_id=f.task_id,
                state=f.state.value,  # type: ignore[arg-type]
                reason=f.reason,
                result=f.result,
                error=f.error,
                error_pickle=f.error_pickle,
                output=f.output,
            )
            for c in clients:
                by_client.setdefault(c, []).append(outcome)
        for client, items in by_client.items():
            self._spawn(client.send(protocol.Done(items=items)))

    def _spawn(self, coro: Any) -> None:
        """Fire a send whose failure only means the peer went away."""
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_log_send_failure)

    # --- agents -------------------------------------------------------------------------

    async def serve_agent(self, ws: WebSocket) -> None:
        """Pair with an agent (mutual HMAC), then serve it until it goes."""
        peer = f"{ws.client.host}:{ws.client.port}" if ws.client else "?"
        try:
            session = await asyncio.wait_for(self._pair(ws, peer), timeout=10)
        except TimeoutError:
            log.warning("pairing with %s timed out", peer)
            await ws.close(4408, "pairing timed out")
            return
        except Exception as exc:  # it went away mid-handshake: nothing to undo
            if not _is_disconnect(exc):
                raise
            log.info("agent at %s left while pairing", peer)
            return
        if session is None:
            return
        try:
            while True:
                frame = await receive_frame(ws)
                session.last_heard = time.monotonic()
                for msg in protocol.decode_agent(frame):
                    await self._on_agent_message(session, msg)
        except protocol.ProtocolError as exc:
            log.warning("agent %s sent a bad frame: %s", session.node_id, exc)
            await close_ws(ws, 4400, str(exc))
        except Exception as exc:  # the socket went away: the expiry loop decides
            if not _is_disconnect(exc):
                raise
        finally:
            session.closed = True
            if self.agents.get(session.node_id) is session:
                del self.agents[session.node_id]
                self.telemetry.forget(session.node_id)
                left = session.bye is not None and not session.outstanding
                if left:  # it said goodbye holding nothing: terminated, not lost
                    try:
                        await self._terminated(session)
                    except StoreError as exc:
                        log.error("node %s left; not recorded yet: %s", session.node_id, exc)
                        left = False
                if not left:
                    self._orphan_deadline[session.node_id] = (
                        session.last_heard + self.settings.timeouts.lost_after_s
                    )

    async def _pair(self, ws: WebSocket, peer: str) -> AgentSession | None:
        await ws.accept()
        try:
            (hello,) = protocol.decode_agent(await receive_frame(ws))
        except (ValueError, protocol.ProtocolError) as exc:
            log.warning("refused agent at %s: bad hello (%s)", peer, exc)
            await ws.close(4400, "bad hello")
            return None
        if not isinstance(hello, protocol.Hello) or hello.v != protocol.VERSION:
            log.warning("refused agent at %s: expected hello v%d", peer, protocol.VERSION)
            await ws.close(4400, "expected hello")
            return None
        key = await self._pairing_key(ws, peer, hello)
        if key is None:
            return None
        nonce = security.new_nonce()
        mac = security.coordinator_proof(key, hello.nonce, nonce)
        await ws.send_bytes(protocol.encode(protocol.Challenge(nonce=nonce, mac=mac)))
        try:
            (reply,) = protocol.decode_agent(await receive_frame(ws))
        except (ValueError, protocol.ProtocolError) as exc:
            log.warning("refused agent %s at %s: bad proof frame (%s)", hello.node_id, peer, exc)
            await ws.close(4400, "bad proof")
            return None
        if isinstance(reply, protocol.Bye):
            log.warning("agent %s at %s refused to pair: %s", hello.node_id, peer, reply.reason)
            await self.refusals.record(self.store, _host(ws), hello.node_id, "agent", reply.reason)
            await ws.close(4401, "pairing refused")
            return None
        expected = security.agent_proof(key, nonce, hello.nonce)
        if not isinstance(reply, protocol.Proof) or not security.proofs_equal(reply.mac, expected):
            log.warning("refused agent %s at %s: wrong secret", hello.node_id, peer)
            await self.refusals.record(
                self.store, _host(ws), hello.node_id, "coordinator", "wrong secret"
            )
            await ws.send_bytes(protocol.encode(protocol.Refuse(reason="authentication failed")))
            await ws.close(4401, "authentication failed")
            return None
        return await self._register(ws, hello)

    async def _pairing_key(self, ws: WebSocket, peer: str, hello: protocol.Hello) -> bytes | None:
        """What this agent must prove it knows: the cluster secret, or the key of the
        agent token it names; None (refused, with the reason sent) if it may not pair."""
        refusal = client_certificate_refusal(ws.scope, self.settings.agent_mtls)
        key = self.secret
        if refusal is None and hello.token_id is not None:
            try:
                key = self.auth.pairing_key(hello.token_id)
            except SecurityError as exc:
                refusal = str(exc)
        if refusal is None:
            return key
        log.warning("refused agent %s at %s: %s", hello.node_id, peer, refusal)
        await self.refusals.record(self.store, _host(ws), hello.node_id, "coordinator", refusal)
        await ws.send_bytes(protocol.encode(protocol.Refuse(reason=refusal)))
        await ws.close(4401, "authentication failed")
        return None

    async def _register(self, ws: WebSocket, hello: protocol.Hello) -> AgentSession:
        now = time.time()
        old = self.agents.pop(hello.node_id, None)
        if old is not None:
            old.closed = True
            with contextlib.suppress(Exception):
                await old.ws.close(4409, "replaced by a new connection")
        self._orphan_deadline.pop(hello.node_id, None)
        existing = await self.store.node(hello.node_id)
        record = NodeRecord(
            id=hello.node_id,
            name=hello.name,
            state=NodeState.CONNECTED,
            provider=existing.provider if existing else hello.provider,
            labels=hello.labels,
            slots=hello.slots,
            data=hello.data,
            resources=hello.resources,
            host=hello.host,
            pid=hello.pid,
            created_at=existing.created_at if existing else now,
            last_seen=now,
            reason=None,
            address=existing.address if existing else None,
            paused=existing.paused if existing else False,
        )
        await self.store.upsert_node(record, coordinator=self.id)
        held = [(h.task_id, h.lease_id) for h in hello.held]
        adopted = await self.store.adopt(hello.node_id, held)
        self._apply(
            await self.store.requeue_node(
                hello.node_id, Reason.LOST_HEARTBEAT, now, keep=set(adopted)
            )
        )
        session = AgentSession(
            node_id=hello.node_id,
            name=hello.name,
            slots=hello.slots,
            prefetch=hello.prefetch,
            labels=hello.labels,
            ws=ws,
            provider=record.provider,
            facts=Facts(hello.node_id, hello.labels, hello.data, hello.resources),
            token_id=hello.token_id,
        )
        task_of = dict((lid, tid) for tid, lid in held)
        session.outstanding = {lid: task_of[lid] for lid in adopted}
        session.settle()
        self.agents[hello.node_id] = session
        await session.send(
            protocol.Welcome(
                node_id=hello.node_id,
                heartbeat_s=self.settings.timeouts.heartbeat_s,
                lost_after_s=self.settings.timeouts.lost_after_s,
                adopted=adopted,
            )
        )
        if self.is_stopping:
            session.draining = True
            await session.send(protocol.Drain())
        log.info(
            "agent %s paired (%d slots, %d leases adopted)",
            hello.node_id,
            hello.slots,
            len(adopted),
        )
        self._spawn(self._prepare(session, record))
        return session

    async def _prepare(self, session: AgentSession, record: NodeRecord) -> None:
        """The herd's ``init_node`` step and the fleet's release; then the node is
        ``ready`` and takes work."""
        if not await self.fleet.prepare(record):
            return
        release = self.releases.fleet_release
        if release is not None and not await self._load_release(session, release):
            await self.fleet.terminate(session.node_id, Reason.RELEASE_FAILED)
            return
        if session.closed or self.agents.get(session.node_id) is not session:
            return
        try:
            node = await self.store.set_node_state(
                session.node_id, NodeState.READY, None, time.time()
            )
        except InvalidTransition:  # drained or terminated while it was prepared
            return
        session.ready = True
        if node is not None:
            session.record = node
            self.fleet.node_up(node)
        self.bus.node_event("node_available", session.node_id)
        self._wake.set()

    async def _load_release(self, session: AgentSession, release: str) -> bool:
        """Have the node install ``release`` and wait until it has (False: it could not,
        or it went away meanwhile)."""
        done: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        session.release_waiters.setdefault(release, []).append(done)
        await session.send(protocol.LoadRelease(release=release))
        deadline = time.monotonic() + RELEASE_LOAD_TIMEOUT_S
        while not done.done():
            if session.closed or time.monotonic() > deadline:
                return False
            await asyncio.wait({done}, timeout=1.0)
        return done.result() is None

    def _sealed(self, spec: TaskSpec) -> TaskSpec:
        """Secret variables are stored sealed (see security.seal); agents open them."""
        if spec.command is None or not spec.command.secret_env:
            return spec
        command = spec.command.with_secrets(lambda v: security.seal(self.secret, v))
        return spec.model_copy(update={"command": command})

    async def counts(self) -> dict[str, int]:
        """Tasks by state, at most ``COUNTS_CACHE_S`` old.

        A count reads every task (a million index entries take half a second
        here); the status route, each live dashboard and ``/metrics`` all ask
        every second or so, and share one count instead of each making its own.
        """
        async with self._counts_lock:
            at, counts = self._counts
            if time.monotonic() - at >= COUNTS_CACHE_S:
                counts = await self.store.counts()
                self._counts = (time.monotonic(), counts)
            return counts

    async def close_sessions_of(self, token_id: str) -> int:
        """A token was revoked: close the WebSockets it opened (clients and live feeds)."""
        closing = [c.ws for c in self.clients if c.principal.token_id == token_id]
        closing += [ws for ws, who in self.live_sockets.items() if who.token_id == token_id]
        closing += [a.ws for a in self.agents.values() if a.token_id == token_id]  # its nodes
        for ws in closing:
            with contextlib.suppress(Exception):  # gone already: nothing to close
                await ws.close(4401, "the token was revoked")
        return len(closing)

    async def roll_release(self, release_id: str) -> Manifest:
        """Make ``release_id`` the fleet's release: new tasks run in it, and every
        node starts installing it now (tasks running in the old one finish there)."""
        manifest = await self.releases.roll(release_id, self.declared_release)
        await self.store.add_event("release_rolled", time.time(), data={"release": release_id})
        for session in list(self.agents.values()):
            if not session.closed:
                await session.send(protocol.LoadRelease(release=release_id))
        return manifest

    def release_status(self) -> list[dict[str, Any]]:
        """Per connected node: the releases in its cache and those it is installing."""
        return [
            {
                "node": s.node_id,
                "name": s.name,
                "installed": s.releases,
                "loading": s.loading,
                "fleet_release_ready": self.releases.fleet_release in s.releases,
            }
            for s in sorted(self.agents.values(), key=lambda s: s.node_id)
        ]

    @property
    def declared_release(self) -> str | None:
        """The release the herd (or ``[fleet] release``) names for the fleet."""
        return self.fleet.herd.release or self.settings.fleet_release

    async def _release_loaded(self, session: AgentSession, msg: protocol.ReleaseLoaded) -> None:
        if msg.error is None:
            if msg.release not in session.releases:
                session.releases = [msg.release, *session.releases]
            await self.store.add_event(
                "release_ready",
                time.time(),
                node_id=session.node_id,
                data={"release": msg.release, "seconds": msg.seconds, "cached": msg.cached},
            )
        else:
            log.warning(
                "node %s could not install release %s: %s",
                session.node_id,
                msg.release,
                msg.error,
            )
            await self.store.add_event(
                "release_failed",
                time.time(),
                node_id=session.node_id,
                data={"release": msg.release, "seconds": msg.seconds, "error": msg.error},
            )
        for waiter in session.release_waiters.pop(msg.release, []):
            if not waiter.done():
                waiter.set_result(msg.error)

    async def _on_agent_message(self, session: AgentSession, msg: Any) -> None:
        if isinstance(msg, (protocol.Heartbeat, protocol.Results)) and msg.prefetch is not None:
            session.prefetch = msg.prefetch
        if isinstance(msg, protocol.Heartbeat):
            stale = [lid for lid in msg.leases if lid not in session.outstanding]
            if stale:
                await session.send(protocol.Cancel(leases=stale))
            if msg.telemetry:
                self.telemetry.record(session.node_id, msg.telemetry)
                if session.record is not None:
                    self.fleet.telemetry(session.record, msg.telemetry)
            for report in msg.health or ():
                if report.lease_id in session.outstanding:
                    self._health[report.task_id] = report
            if msg.releases is not None:
                session.releases = msg.releases
                session.loading = msg.loading or []
        elif isinstance(msg, protocol.ReleaseLoaded):
            await self._release_loaded(session, msg)
        elif isinstance(msg, protocol.TaskTelemetry):
            if msg.lease_id in session.outstanding:
                self.telemetry.record(session.node_id, msg.readings, task_id=msg.task_id)
        elif isinstance(msg, protocol.Started):
            self._started.extend(
                (h.task_id, h.lease_id) for h in msg.leases if h.lease_id in session.outstanding
            )
            self._wake.set()
        elif isinstance(msg, protocol.Results):
            self._results.put_nowait((session, msg.items))
            self._wake.set()
        elif isinstance(msg, protocol.Output):
            for chunk in msg.chunks:
                if chunk.lease_id in session.outstanding:
                    self.logs.add(chunk.task_id, chunk.lease_id, chunk.stream, chunk.data)
        elif isinstance(msg, protocol.Release):
            if msg.leaving:  # stopping: what it hands back must go to the others
                session.draining = True
            for h in msg.leases:
                if session.outstanding.pop(h.lease_id, None) is not None:
                    self._released.append((h.task_id, h.lease_id))
            session.settle()
            self._wake.set()
        elif isinstance(msg, (protocol.Send, protocol.Emit, protocol.Progress)):
            self.bus.on_agent(session, msg)
        elif isinstance(msg, protocol.Bye):
            session.draining = True
            self.bus.node_event("node_unavailable", session.node_id, "leaving")
            session.bye = msg.reason
            log.info("agent %s leaving: %s", session.node_id, msg.reason)
            reason = session.leave_reason()
            if reason in (Reason.IDLE, Reason.SPOT_INTERRUPTION):
                # It runs nothing more: whatever was sent its way while it decided
                # to go comes back at once (not charged an attempt).
                self._released.extend((tid, lid) for lid, tid in session.outstanding.items())
                session.outstanding.clear()
                session.settle()
                self._wake.set()
            with contextlib.suppress(InvalidTransition):  # already draining
                await self.store.set_node_state(
                    session.node_id, NodeState.DRAINING, reason, time.time()
                )
            if not session.outstanding:
                await self._terminated(session)
        else:
            raise protocol.ProtocolError(f"unexpected {type(msg).__name__} after pairing")

    # --- loops ------------------------------------------------------------------------

    async def _engine_loop(self) -> None:
        """Each turn, one transaction: record what agents reported, then lease new work.

        Results that arrive while a turn commits wait for the next turn, so
        under load a turn carries many of them: the batch grows with the load.
        """
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._engine_turn()

    async def _engine_turn(self) -> None:
        """One turn of the engine. A call of its own, so that nothing of this
        turn (a 10,000-task submission is ~20 MB of objects) outlives it while
        the engine waits for the next."""
        batch: list[tuple[AgentSession, list[protocol.ResultItem]]] = []
        while not self._results.empty():
            batch.append(self._results.get_nowait())
        started, self._started = self._started, []
        released, self._released = self._released, []
        submissions, self._submissions = self._submissions, []
        if submissions:
            self._ready_hint += sum(len(sub.specs) for sub, _ in submissions)
        finishing: dict[str, int] = {}
        for session, its in batch:
            finishing[session.node_id] = finishing.get(session.node_id, 0) + sum(
                1 for i in its if i.lease_id in session.outstanding
            )
        requests = self._claim_requests(finishing)
        items = [_task_result(i) for _, its in batch for i in its]
        if not (items or started or released or requests or submissions):
            return
        commit_started = time.perf_counter()
        self._committing = True
        try:
            changes, claimed, errors = await self.store.cycle(
                submissions=[sub for sub, _ in submissions],
                started=started,
                released=released,
                results=items,
                claims=requests,
                now=time.time(),
            )
        except StoreError as exc:
            log.error("store unavailable: %s", exc)
            self._store_down = (time.monotonic() + 1.0, exc)
            self._requeue_turn(batch, started, released, submissions, exc)
            await asyncio.sleep(0.5)
            return
        finally:
            self._committing = False
        self._store_down = None
        self.metrics.commit_latency.observe(time.perf_counter() - commit_started)
        self.metrics.observe_results(
            [
                (i.state.value, i.ended_at - i.started_at)
                for i in items
                if i.ended_at is not None and i.started_at is not None
            ]
        )
        for (sub, _), error in zip(submissions, errors, strict=True):
            if error is None:
                self.peers.note(ready=len(sub.specs), ckeys={s.constraint_key() for s in sub.specs})
            else:
                self._ready_hint -= len(sub.specs)
        outbox: dict[AgentSession, list[protocol._Msg]] = {}
        self._ack(batch, changes, outbox)
        if any(session.holding for session, _ in batch):
            self._wake.set()  # resources its results freed: claim for them next turn
        self._apply(changes)
        for req in requests:
            got = claimed.get(req.node_id, [])
            self._ready_hint = max(0, self._ready_hint - len(got))
            if not got and len(req.constraint_keys) == len(self._known_ckeys):
                self._ready_hint = 0  # this agent could take anything: nothing is ready
            if len(got) == req.limit:
                self._wake.set()
            agent = self.agents.get(req.node_id)
            if got and (agent is None or agent.draining or agent.closed):
                # it left (or said goodbye) during this turn: it never sees these
                self._released.extend((c.task_id, c.lease_id) for c in got)
                self._wake.set()
            elif got and agent is not None:
                outbox.setdefault(agent, []).append(self._assign(agent, got))
        for session, messages in outbox.items():  # one frame per agent per turn
            self._spawn(session.send(*messages))
        # Submitters last: what this turn leased is on its way to the agents first,
        # ahead of the acknowledgements (a round trip waits on the agent, not the ack).
        for (_, done), error in zip(submissions, errors, strict=True):
            if done.done():  # its request was cancelled meanwhile; the outcome stands
                continue
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    def _requeue_turn(
        self,
        batch: list[tuple[AgentSession, list[protocol.ResultItem]]],
        started: list[tuple[str, str]],
        released: list[tuple[str, str]],
        submissions: list[tuple[Submission, asyncio.Future[None]]],
        exc: StoreError,
    ) -> None:
        """A turn whose transaction failed: nothing was written, so try it all again.

        Submitters are told at once (they retry with the same ids), also those
        whose submissions came in meanwhile; results and hand-backs stay queued
        for the next turn.
        """
        for item in batch:
            self._results.put_nowait(item)
        self._started[:0] = started
        self._released[:0] = released
        for sub, _ in submissions:
            self._ready_hint -= len(sub.specs)  # queued ones were not counted yet
        refused = SubmissionError(f"store unavailable: {exc}", status=503)
        for _, done in [*submissions, *self._submissions]:
            if not done.done():  # its request may have been cancelled meanwhile
                done.set_exception(refused)
        self._submissions = []
        self._wake.set()

    def _claim_requests(self, finishing: dict[str, int]) -> list[ClaimRequest]:
        """What each agent can take, counting the slots this turn's results free up."""
        if self.is_stopping or self._ready_hint <= 0:
            return []
        requests = []
        for agent in self.agents.values():
            if agent.draining or agent.closed or not agent.ready:
                continue
            if agent.node_id in self.bus.paused:  # paused: finishes its work, takes none
                continue
            free = agent.capacity - len(agent.outstanding) + finishing.get(agent.node_id, 0)
            if free > 0:
                keys = [k for k in self._known_ckeys if agent.admit(k)]
                if any(parse_key(k).resources for k in keys):
                    # tasks that hold resources: only what fits in what is free now
                    room = agent.free_resources()
                    keys = [k for k in keys if parse_key(k).fits(room, 1)]
                    requests.append(ClaimRequest(agent.node_id, keys, free, room))
                else:
                    requests.append(ClaimRequest(agent.node_id, keys, free))
        return requests

    def waiting_reason(self, task: TaskRecord) -> str | None:
        """Why a ready task is not placed, when no paired node could ever run it.

        Checked when asked, against the nodes paired now (their labels,
        data and total resources, not their load), so the reason clears as
        soon as a matching node joins.
        """
        if task.state is not TaskState.READY:
            return None
        key = constraint_key(task.labels, task.select, task.resources)
        if not key or any(a.admit(key) for a in self.agents.values() if not a.closed):
            return None
        return "no node matches"

    def _assign(self, agent: AgentSession, claimed: list[Claimed]) -> protocol.Assign:
        self._dispatched += len(claimed)
        now = time.time()
        self.metrics.observe_dispatch([now - c.created_at for c in claimed if not c.dep_results])
        for c in claimed:
            self.logs.begin(c.task_id, c.lease_id, c.attempt)
            agent.outstanding[c.lease_id] = c.task_id
            if c.ckey and (need := parse_key(c.ckey).resources):
                agent.holding[c.lease_id] = need
            if c.service is not None:
                agent.services.add(c.lease_id)
        agent.settle()
        return protocol.Assign(
            tasks=[
                protocol.Assignment(
                    task_id=c.task_id,
                    lease_id=c.lease_id,
                    attempt=c.attempt,
                    kind=c.kind,  # type: ignore[arg-type]
                    payload=c.payload,
                    command=self._sealed_for(agent, c.command),
                    timeout_s=c.timeout_s,
                    dep_results=c.dep_results,
                    job_id=c.job_id,
                    name=c.name,
                    service=c.service,
                    start_delay_s=c.start_delay_s,
                    release=c.release,
                )
                for c in claimed
            ]
        )

    def _sealed_for(self, agent: AgentSession, command: CommandSpec | None) -> CommandSpec | None:
        """Secret variables as the node can open them: a node paired by an agent token
        does not know the cluster secret, so they are sealed again for its token."""
        if command is None or agent.token_id is None or not command.secret_env:
            return command
        key = self.auth.token_secret(agent.token_id)
        return command.with_secrets(lambda v: security.seal(key, security.unseal(self.secret, v)))

    def _ack(
        self,
        batch: list[tuple[AgentSession, list[protocol.ResultItem]]],
        changes: Changes,
        outbox: dict[AgentSession, list[protocol._Msg]],
    ) -> None:
        accepted, refused = set(changes.accepted), set(changes.refused)
        for session, its in batch:
            acc = [i.lease_id for i in its if i.lease_id in accepted]
            ref = [i.lease_id for i in its if i.lease_id in refused]
            for lid in acc + ref:
                session.outstanding.pop(lid, None)
            session.settle()
            outbox.setdefault(session, []).append(protocol.Ack(accepted=acc, refused=ref))
            self._acked.set()
            if ref:
                log.info("refused %d stale results from %s", len(ref), session.node_id)

    async def _telemetry_loop(self) -> None:
        """Write the readings of the last second in one batch; roll up older ones."""
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.telemetry.flush()
            except StoreError as exc:  # readings of this second are lost; the next come
                log.warning("telemetry not stored: %s", exc)

    async def _expiry_loop(self) -> None:
        """Declare silent agents lost and put their leases back in the queue."""
        period = min(0.5, self.settings.timeouts.lost_after_s / 4)
        while True:
            await asyncio.sleep(period)
            try:
                await self._expire()
            except StoreError as exc:  # the store is down for a while: try again next pass
                log.error("lease expiry postponed: %s", exc)

    async def _expire(self) -> None:
        now_m = time.monotonic()
        lost_after = self.settings.timeouts.lost_after_s
        for agent in list(self.agents.values()):
            if self.agents.get(agent.node_id) is not agent:
                continue  # its session ended (or it paired again) while we awaited another
            if now_m - agent.last_heard > lost_after:
                log.warning(
                    "agent %s silent for %.1fs: lost", agent.node_id, now_m - agent.last_heard
                )
                agent.closed = True
                del self.agents[agent.node_id]
                self.telemetry.forget(agent.node_id)
                with contextlib.suppress(Exception):
                    await agent.ws.close(4408, "heartbeat lost")
                await self._lose_own(agent.node_id)
        for node_id, deadline in list(self._orphan_deadline.items()):
            if now_m > deadline and node_id not in self.agents:
                del self._orphan_deadline[node_id]
                await self._lose_own(node_id)

    async def _lose_own(self, node_id: str) -> None:
        """Its session here went silent or closed: lost, unless meanwhile it paired
        with another coordinator of the store (which holds its leases now)."""
        lost = await self.lose_silent(
            silent_before=time.time() + 1.0,
            reason=Reason.LOST_HEARTBEAT,
            node_ids=[node_id],
            held_by=self.id,
        )
        if lost:
            return
        node = await self.store.node(node_id)
        if node is not None and not node.state.is_alive:  # ended (terminate): leases back
            await self._requeue_lost(node_id, None, Reason.LOST_HEARTBEAT, time.time())
        else:
            log.info("node %s went silent here but lives on elsewhere", node_id)

    async def lose_silent(
        self,
        *,
        silent_before: float,
        reason: str,
        node_ids: list[str] | None = None,
        held_by: str | None = None,
        exclude: set[str] | frozenset[str] = frozenset(),
    ) -> int:
        """Declare lost the nodes :meth:`SqlStore.lose_nodes` finds silent, and requeue
        their leases; how many."""
        now = time.time()
        nodes = await self.store.lose_nodes(
            now,
            reason,
            silent_before=silent_before,
            node_ids=node_ids,
            held_by=held_by,
            exclude=exclude,
        )
        for node in nodes:
            await self._requeue_lost(node.id, node, reason, now)
        return len(nodes)

    async def mark_lost(self, node_id: str, reason: str) -> None:
        """A node is gone: record it and requeue its leases (attempt charged; its
        services are restarted, not charged)."""
        now = time.time()
        try:
            node = await self.store.set_node_state(node_id, NodeState.LOST, reason, now)
        except InvalidTransition:  # it said goodbye first: terminated stays terminated
            node = None
        await self._requeue_lost(node_id, node, reason, now)

    async def _requeue_lost(
        self, node_id: str, node: NodeRecord | None, reason: str, now: float
    ) -> None:
        changes = await self.store.requeue_node(node_id, reason, now)
        if node is not None:
            log.info("node %s lost (%s): %d tasks requeued", node_id, reason, len(changes.requeued))
            self.fleet.node_down(node, reason)
            self.bus.node_event("node_unavailable", node_id, reason)
        self._apply(changes)

    async def _terminated(self, session: AgentSession) -> None:
        """A node that said goodbye and holds no lease: record it as terminated."""
        reason = session.leave_reason()
        node = await self.store.set_node_state(
            session.node_id, NodeState.TERMINATED, reason, time.time()
        )
        if node is not None:
            self.fleet.node_down(node, reason)

    # --- services ----------------------------------------------------------------------

    async def services(
        self, *, ended: bool = False
    ) -> list[tuple[ServiceRecord, protocol.HealthReport | None]]:
        """The services from the store, each with the health its agent last reported
        for its current run (None: no check, or none reported yet)."""
        out = []
        for record in await self.store.services(ended=ended):
            report = self._health.get(record.id)
            if report is not None and report.lease_id != record.lease_id:
                report = None  # of an earlier run
            out.append((record, report))
        return out

    # --- the fleet's view (herder.fleet.AgentLink) -----------------------------------

    def loads(self) -> dict[str, NodeLoad]:
        """Our sessions, and the nodes other coordinators of the store serve."""
        return self.peers.remote_loads() | {
            node_id: NodeLoad(
                slots=a.slots,
                running=len(a.outstanding),
                idle_since=a.idle_since,
                ready=a.ready,
                draining=a.draining,
            )
            for node_id, a in self.agents.items()
            if not a.closed
        }

    async def ready_tasks(self, labels: dict[str, str], limit: int) -> int:
        """Ready tasks a node with ``labels`` could run, counted up to ``limit``."""
        if self._ready_hint <= 0:
            return 0
        keys = [k for k in self._known_ckeys if labels_match(k, labels)]
        return await self.store.count_ready(keys, limit)

    async def drain(self, node_id: str, reason: str, *, kill: bool) -> bool:
        agent = self.agents.get(node_id)
        if agent is None and node_id in self.peers.remote_loads():
            self.peers.relay("drain", node_id=node_id, reason=reason, kill=kill)
            return True  # its coordinator drains it
        if agent is None or agent.closed:
            return False
        agent.draining = True
        agent.drain_reason = reason
        self.bus.node_event("node_unavailable", node_id, reason)
        await agent.send(protocol.Drain(leave=True, kill=kill))
        return True

    async def node_gone(self, node_id: str, reason: str) -> None:
        log.warning("node %s gone: %s", node_id, reason)
        agent = self.agents.pop(node_id, None)
        if agent is not None:
            agent.closed = True
        self.telemetry.forget(node_id)
        self._orphan_deadline.pop(node_id, None)
        await self.mark_lost(node_id, reason)


def _task_result(i: protocol.ResultItem) -> TaskResult:
    return TaskResult(
        task_id=i.task_id,
        lease_id=i.lease_id,
        state=TaskState(i.state),
        reason=i.reason,
        result=i.result,
        error=i.error,
        error_pickle=i.error_pickle,
        output=i.output,
        started_at=i.started_at,
        ended_at=i.ended_at,
    )


def _host(ws: WebSocket) -> str:
    return ws.client.host if ws.client else "?"


def _is_disconnect(exc: BaseException) -> bool:
    from starlette.websockets import WebSocketDisconnect

    return isinstance(exc, (WebSocketDisconnect, ConnectionError, RuntimeError))


async def close_ws(ws: WebSocket, code: int, reason: str) -> None:
    """Close ``ws`` after a bad frame; a peer already gone is no error.

    ``reason`` is cut to what a close frame carries, 123 bytes of UTF-8 (not
    characters: a peer's non-ASCII tag echoed in a ProtocolError made the close
    itself fail).
    """
    try:
        await ws.close(code, reason.encode(errors="replace")[:123].decode(errors="ignore"))
    except Exception as exc:
        if not _is_disconnect(exc):
            raise


async def receive_frame(ws: WebSocket) -> bytes | str:
    """The next frame as the peer sent it, binary or text.

    Decoding refuses a text frame with a ProtocolError (and a 4400 close);
    Starlette's ``receive_bytes`` would raise KeyError on one instead.
    """
    from starlette.websockets import WebSocketDisconnect

    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
    data: bytes | str | None = message.get("bytes")
    return data if data is not None else str(message.get("text") or "")


def _log_send_failure(task: asyncio.Future[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not _is_disconnect(exc):
        log.warning("send failed: %r", exc)
