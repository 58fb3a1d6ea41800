"""The Python API: submit calls and commands, get futures, ask questions.

:class:`AsyncClient` is the implementation; :class:`Client` is a thin
synchronous wrapper that runs it on an event loop in a background thread.
Submissions made in the same loop turn travel in one frame and are
committed in one transaction; a future's submission is acknowledged only
after the coordinator committed it. Task ids are made here, so a
submission resent after a lost connection is stored once.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
import queue
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import cloudpickle
import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from herder import protocol, security
from herder.config import default_home, home_ca_path
from herder.errors import (
    ClientClosed,
    ConfigError,
    ConnectionLost,
    DependencyFailed,
    HerderError,
    ReleaseError,
    SecurityError,
    SubmissionError,
    TaskCancelled,
    TaskError,
    TaskLost,
    TaskTimeout,
)
from herder.model import (
    CommandSpec,
    Limits,
    ServiceSpec,
    TaskSpec,
    new_id,
)
from herder.selector import Facts
from herder.selector import evaluate as evaluate_selector
from herder.selector import parse as parse_selector
from herder.values import ResultRef, TaskRef

if TYPE_CHECKING:
    from herder.dataclient import DataClient

T = TypeVar("T")
DEFAULT_RETRIES = 2
MAP_BATCH = 1000
PUSH_ATTEMPTS = 3  # a push whose answer was lost is sent again (idempotent by job id)
EVENT_TTL_S = 60.0  # how long the client keeps events for listeners that come later
EVENT_KINDS = frozenset(
    {
        "node_available",
        "node_unavailable",
        "coordinator_available",
        "coordinator_unavailable",
        "emit",
    }
)


@dataclass(frozen=True)
class HerdEvent:
    """A discovery event (a node or the coordinator came or went) or a task's ``emit``.

    ``at`` is the wall-clock time it happened; ``data`` holds a reason
    (``{"reason": "paused"}``) or what the task emitted.
    """

    kind: str
    at: float
    node_id: str | None = None
    task_id: str | None = None
    topic: str | None = None
    data: Any = None


class _EventBuffer:
    """Events kept for ``ttl_s`` so that listeners added later still get them.

    Bounded by age, and by ``limit`` entries as a guard against a flood.
    Used from the client's loop only.
    """

    def __init__(self, ttl_s: float, limit: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self._events: deque[tuple[float, HerdEvent]] = deque(maxlen=limit)
        self._listeners: list[tuple[frozenset[str] | None, Callable[[HerdEvent], object]]] = []

    def _expire(self) -> None:
        horizon = time.monotonic() - self.ttl_s
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()

    def add(self, event: HerdEvent) -> None:
        self._expire()
        self._events.append((time.monotonic(), event))
        for kinds, fn in list(self._listeners):
            if kinds is None or event.kind in kinds:
                fn(event)

    def listen(
        self, kinds: frozenset[str] | None, fn: Callable[[HerdEvent], object]
    ) -> Callable[[], None]:
        """Call ``fn`` for the buffered events still young enough, then each new one;
        returns the function that stops it."""
        self._expire()
        for _, event in list(self._events):
            if kinds is None or event.kind in kinds:
                fn(event)
        entry = (kinds, fn)
        self._listeners.append(entry)

        def stop() -> None:
            if entry in self._listeners:
                self._listeners.remove(entry)

        return stop


def _kinds(types: str | Iterable[str] | None) -> frozenset[str] | None:
    if types is None:
        return None
    kinds = frozenset([types] if isinstance(types, str) else types)
    unknown = kinds - EVENT_KINDS
    if unknown:
        raise ValueError(f"unknown event types {sorted(unknown)}; known: {sorted(EVENT_KINDS)}")
    return kinds


class RemoteTraceback(Exception):
    """The traceback of an exception raised on a node, attached as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


# ---------------------------------------------------------------------------
# Futures


class TaskFuture:
    """A submitted task. ``await fut`` gives its result or raises its error."""

    def __init__(self, task_id: str, job_id: str, kind: str) -> None:
        loop = asyncio.get_running_loop()
        self.task_id = task_id
        self.job_id = job_id
        self.kind = kind
        self.submitted: asyncio.Future[None] = loop.create_future()
        self._outcome: asyncio.Future[protocol.Outcome] = loop.create_future()
        # (fraction, message) as the task last reported with herder.task.progress
        self.progress: tuple[float, str] | None = None
        # fetches a result the node put in the datastore (too big to travel inline)
        self.fetch: Callable[[str], Awaitable[bytes]] | None = None

    def __repr__(self) -> str:
        state = self._outcome.result().state if self._outcome.done() else "pending"
        return f"<TaskFuture {self.task_id} {state}>"

    def done(self) -> bool:
        return self._outcome.done()

    def _set(self, outcome: protocol.Outcome) -> None:
        if not self._outcome.done():
            self._outcome.set_result(outcome)

    def _fail_submission(self, exc: BaseException) -> None:
        if not self.submitted.done():
            self.submitted.set_exception(exc)
        if not self._outcome.done():
            self._outcome.set_exception(exc)
            self._outcome.exception()  # mark retrieved: result() raises it again
        self.submitted.exception()

    async def result(self) -> Any:
        await self.submitted
        value = decode_outcome(await self._outcome, self.kind)
        if isinstance(value, ResultRef) and self.fetch is not None:
            value = cloudpickle.loads(await self.fetch(value.key))
        return value

    async def exception(self) -> BaseException | None:
        try:
            await self.result()
        except Exception as exc:
            return exc
        return None

    def __await__(self) -> Generator[Any, None, Any]:
        return self.result().__await__()


def decode_outcome(outcome: protocol.Outcome, kind: str) -> Any:
    """A result value, or the task's exception raised with its remote traceback."""
    if outcome.state == "succeeded":
        if kind == "call":
            return cloudpickle.loads(outcome.result) if outcome.result is not None else None
        return outcome.output
    error = outcome.error or {}
    tb = error.get("traceback") or ""
    if outcome.error_pickle is not None:
        try:
            exc = cloudpickle.loads(outcome.error_pickle)
        except Exception:
            exc = None
        if isinstance(exc, BaseException):
            exc.__cause__ = RemoteTraceback(tb)
            raise exc
    message = f"task {outcome.task_id}: {error.get('message') or outcome.reason or outcome.state}"
    cls: type[TaskError] = {
        "timeout": TaskTimeout,
        "lost": TaskLost,
        "dependency failed": DependencyFailed,
        "cancelled": TaskCancelled,
    }.get(outcome.reason or "", TaskCancelled if outcome.state == "cancelled" else TaskError)
    err = cls(message, task_id=outcome.task_id, reason=outcome.reason, output=outcome.output)
    if tb:
        raise err from RemoteTraceback(tb)
    raise err


# ---------------------------------------------------------------------------
# Connection details


def resolve_target(
    url: str | None, token: str | None, env: Mapping[str, str]
) -> tuple[str, security.JoinToken | security.ApiToken]:
    """Find the coordinator: arguments, then HERDER_URL/HERDER_TOKEN, then the herder home."""
    token = token or env.get("HERDER_TOKEN")
    home = default_home(env)
    parsed: security.JoinToken | security.ApiToken
    if token is None:
        try:
            secret = security.load_secret(home / "secret")
            fingerprint = _recorded_fingerprint(home) or security.ca_fingerprint(
                (home / "tls" / "ca.pem").read_bytes()
            )
        except (OSError, HerderError) as exc:
            raise ConfigError(
                f"no HERDER_TOKEN and no coordinator credentials in {home} ({exc})"
            ) from exc
        parsed = security.JoinToken(secret, fingerprint)
    else:
        parsed = security.parse_token(token)
    url = url or env.get("HERDER_URL") or parsed.url
    if url is None:
        state = home / "coordinator.json"
        try:
            url = str(json.loads(state.read_text())["url"])
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(
                f"no HERDER_URL and no running coordinator recorded in {state}"
            ) from exc
    return url.rstrip("/"), parsed


def _recorded_fingerprint(home: Path) -> bytes | None:
    """The CA fingerprint the running coordinator recorded (it serves with the user's
    own CA when given one: then the home's ``tls/ca.pem`` is not the one to pin)."""
    try:
        return bytes.fromhex(json.loads((home / "coordinator.json").read_text())["ca"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------
# The async client


class _Futures:
    """The session's futures by task id, held weakly.

    A future its program dropped is released: the coordinator is told to stop
    watching the task (one ``Unwatch`` frame per loop turn), as Dask's client
    releases a key whose last future is gone. Without it a program that
    submits a million tasks and keeps none of their futures costs the
    coordinator ~110 bytes a task until they finish, and each outcome a
    message nobody reads. The task itself runs on and its result is stored;
    :meth:`AsyncClient.future` watches it again.

    The weakref callback runs in whatever thread dropped the future (the sync
    client's caller, often): it only queues the id and schedules one flush on
    the loop, which owns the map.
    """

    def __init__(self, on_released: Callable[[list[str]], None]) -> None:
        self._refs: dict[str, weakref.KeyedRef[str, TaskFuture]] = {}
        self._released: deque[str] = deque()
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_released = on_released

    def add(self, fut: TaskFuture) -> None:
        self._loop = asyncio.get_running_loop()
        self._refs[fut.task_id] = weakref.KeyedRef(fut, self._dropped, fut.task_id)

    def get(self, task_id: str) -> TaskFuture | None:
        ref = self._refs.get(task_id)
        return None if ref is None else ref()

    def pop(self, task_id: str) -> TaskFuture | None:
        ref = self._refs.pop(task_id, None)
        return None if ref is None else ref()

    def live(self) -> list[TaskFuture]:
        return [f for f in (r() for r in self._refs.values()) if f is not None]

    def clear(self) -> None:
        self._refs.clear()

    def _dropped(self, ref: weakref.KeyedRef[str, TaskFuture]) -> None:
        if self._refs.get(ref.key) is not ref:
            return  # its outcome came (and the coordinator forgot it then): no flush
        # append before reading the flag, and the flush clears the flag before
        # draining: so an id is either drained by a flush already under way or
        # schedules its own
        self._released.append(ref.key)
        if self._flush_scheduled or self._loop is None:
            return
        self._flush_scheduled = True
        # a closed loop is a closed client: its session, and every watch, is gone
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        gone = []
        while self._released:
            task_id = self._released.popleft()
            ref = self._refs.get(task_id)
            # absent: its outcome came meanwhile; alive: the program asked for the
            # task again (``future``) after dropping it
            if ref is not None and ref() is None:
                del self._refs[task_id]
                gone.append(task_id)
        if gone:
            self._on_released(gone)


class AsyncClient:
    """``async with await AsyncClient.open() as herd: await herd.submit(pow, 2, 10)``."""

    def __init__(
        self,
        url: str,
        token: security.JoinToken | security.ApiToken,
        ca_pem: bytes,
        *,
        event_ttl_s: float = EVENT_TTL_S,
    ) -> None:
        self.url = url
        self._events = _EventBuffer(event_ttl_s)
        self._sends: dict[int, asyncio.Future[int]] = {}
        self._token = token
        self._ssl = security.client_ssl_context(ca_pem)
        self._ca_pem = ca_pem
        self._data: DataClient | None = None
        self._bearer = token.without_url().encode()
        self._http: httpx.AsyncClient | None = None
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._futures = _Futures(on_released=self._unwatch)
        self._requests: dict[int, tuple[protocol.Submit, list[TaskFuture]]] = {}
        self._next_req = 0
        self._pending: list[tuple[str | None, TaskSpec, TaskFuture]] = []
        self._flush_scheduled = False
        self._closed = False
        self._connected = asyncio.Event()
        self._session_job: str | None = None

    @classmethod
    async def open(
        cls,
        url: str | None = None,
        token: str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        event_ttl_s: float = EVENT_TTL_S,
    ) -> AsyncClient:
        env = os.environ if env is None else env
        target, parsed = resolve_target(url, token, env)
        # beside its coordinator (LocalHerd, the CLI): the home's CA, if it is the pinned one
        ca = security.pinned_ca_at(home_ca_path(env), parsed.fingerprint)
        if ca is None:
            ca = await asyncio.to_thread(security.fetch_pinned_ca, target, parsed.fingerprint)
        client = cls(target, parsed, ca, event_ttl_s=event_ttl_s)
        await client._connect()
        client._reader = asyncio.create_task(client._read_loop(), name="herder-client-reader")
        return client

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            # a reader that gave up on an unreachable coordinator already failed every
            # future with that; closing is not the moment to raise it again
            with contextlib.suppress(asyncio.CancelledError, ConnectionLost):
                await self._reader
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.aclose()
        if self._data is not None:
            self._data.close()
        for fut in self._futures.live():
            fut._fail_submission(ClientClosed())

    @property
    def http(self) -> httpx.AsyncClient:
        """The HTTP side (queries, cancels, tokens, releases), made when first used: a
        session that only submits and waits never loads its transport (httpcore, h11:
        12 ms of a cold start)."""
        if self._http is None:
            self._http = httpx.AsyncClient(
                base_url=self.url,
                verify=self._ssl,
                headers={"Authorization": f"Bearer {self._bearer}"},
                timeout=60,
            )
        return self._http

    @property
    def data(self) -> DataClient:
        """The datastore (synchronous: from async code, call it via ``asyncio.to_thread``)."""
        if self._closed:
            raise ClientClosed()
        if self._data is None:
            from herder.dataclient import DataClient  # fsspec and friends only when used

            self._data = DataClient(self.url, self._bearer, self._ca_pem)
        return self._data

    async def _connect(self) -> None:
        ws_url = "wss://" + self.url.split("://", 1)[1] + "/v1/session"
        self._ws = await websockets.connect(
            ws_url,
            ssl=self._ssl,
            additional_headers={"Authorization": f"Bearer {self._bearer}"},
            max_size=protocol.MAX_FRAME_BYTES,
            ping_interval=None,
            compression=None,
        )
        self._connected.set()
        self._events.add(HerdEvent("coordinator_available", time.time(), data={"url": self.url}))

    async def _read_loop(self) -> None:
        """Receive acknowledgements and outcomes; reconnect and resend when the link drops."""
        while True:
            ws = self._ws
            assert ws is not None
            try:
                async for frame in ws:
                    if isinstance(frame, bytes):
                        self._on_frame(frame)
            except websockets.ConnectionClosed:
                pass
            self._connected.clear()
            lost = HerdEvent("coordinator_unavailable", time.time(), data={"url": self.url})
            self._events.add(lost)
            for req, sent in self._sends.items():  # at most once: not resent
                sent.set_exception(ConnectionLost(f"send {req}: the link dropped before an answer"))
            self._sends.clear()
            await self._reconnect()

    async def _reconnect(self, give_up_after: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + give_up_after
        delay = 0.1
        while True:
            try:
                await self._connect()
                break
            except (OSError, websockets.WebSocketException, TimeoutError) as exc:
                if loop.time() > deadline:
                    err = ConnectionLost(f"coordinator {self.url} unreachable: {exc}")
                    for fut in self._futures.live():
                        fut._fail_submission(err)
                    self._futures.clear()
                    raise err from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        # resend what was not acknowledged (same ids: stored once), re-watch the rest
        unacked = list(self._requests.values())
        self._requests.clear()
        for submit, futs in unacked:
            self._send_submit(submit.job_id, submit.job_name, list(submit.tasks), futs)
        watched = [f.task_id for f in self._futures.live() if f.submitted.done()]
        if watched and self._ws is not None:
            await self._ws.send(protocol.encode(protocol.Watch(task_ids=watched)))

    def _on_frame(self, frame: bytes) -> None:
        for msg in protocol.decode_server(frame):
            if isinstance(msg, protocol.Submitted):
                entry = self._requests.pop(msg.req, None)
                if entry is None:
                    continue
                for fut in entry[1]:
                    if msg.error is None:
                        if not fut.submitted.done():
                            fut.submitted.set_result(None)
                    else:
                        self._futures.pop(fut.task_id)
                        fut._fail_submission(SubmissionError(msg.error))
            elif isinstance(msg, protocol.Done):
                for outcome in msg.items:
                    waiting = self._futures.pop(outcome.task_id)
                    if waiting is not None:
                        waiting._set(outcome)
            elif isinstance(msg, protocol.Sent):
                sent = self._sends.pop(msg.req, None)
                if sent is None or sent.done():
                    continue
                if msg.error is None:
                    sent.set_result(msg.delivered)
                else:
                    sent.set_exception(SubmissionError(f"send refused: {msg.error}"))
            elif isinstance(msg, protocol.Event):
                self._on_event(msg)

    def _on_event(self, msg: protocol.Event) -> None:
        if msg.kind == "progress":
            fut = self._futures.get(msg.task_id or "")
            if fut is not None and isinstance(msg.data, dict):
                fut.progress = (float(msg.data["fraction"]), str(msg.data.get("message", "")))
            return
        self._events.add(HerdEvent(msg.kind, msg.at, msg.node_id, msg.task_id, msg.topic, msg.data))

    # --- the event bus ------------------------------------------------------------------

    async def send(self, target: str, topic: str, data: Any = None) -> int:
        """Send to the ``herder.node.on(topic, ...)`` handlers of ``target``: a node
        id, ``"all"`` or a selector; returns on how many nodes it was delivered.

        At most once, to nodes connected now; ``data`` is JSON-like, at most 64 KB.
        """
        if self._closed:
            raise ClientClosed()
        msg = protocol.Send(target=target, topic=topic, data=data, req=self._next_req)
        self._next_req += 1
        await self._connected.wait()
        assert self._ws is not None
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._sends[msg.req] = answer
        await self._ws.send(protocol.encode(msg))
        return await answer

    def on(
        self, types: str | Iterable[str], fn: Callable[[HerdEvent], object]
    ) -> Callable[[], None]:
        """Call ``fn(event)`` for events of ``types``, starting with those still buffered
        (younger than the TTL); returns a function that stops it. ``fn`` runs in the
        client's loop and must not block."""
        return self._events.listen(_kinds(types), fn)

    async def events(
        self,
        types: str | Iterable[str] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (how long to iterate, not one await)
    ) -> AsyncIterator[HerdEvent]:
        """``async for ev in herd.events("node_available", timeout=5)``: buffered events
        younger than the TTL, then new ones, until ``timeout`` seconds have passed
        (None: until the loop is left)."""
        box: asyncio.Queue[HerdEvent] = asyncio.Queue()
        stop = self._events.listen(_kinds(types), box.put_nowait)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while True:
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    return
                try:
                    yield await asyncio.wait_for(box.get(), left)
                except TimeoutError:
                    return
        finally:
            stop()

    async def set_available(self, node_id: str, available: bool) -> None:
        """Pause a node (``False``: it takes no new tasks, finishes what it runs and
        stays paired) or resume it."""
        await self._post(f"/v1/nodes/{node_id}/{'resume' if available else 'pause'}", {})

    # --- submitting ---------------------------------------------------------------------

    def _job(self, job: str | None) -> str:
        if job is not None:
            return job
        if self._session_job is None:
            self._session_job = new_id("j")
        return self._session_job

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        retries: int = DEFAULT_RETRIES,
        timeout: float | None = None,
        priority: int = 0,
        labels: Mapping[str, str] | None = None,
        depends_on: Iterable[TaskFuture | Future | str] = (),
        name: str | None = None,
        job: str | None = None,
        run_on_failure: bool = False,
        service: bool | ServiceSpec | None = None,
        select: str | None = None,
        resources: Mapping[str, float] | None = None,
        release: str | None = None,
        **kwargs: Any,
    ) -> TaskFuture:
        """Run ``fn(*args, **kwargs)`` on a node. Futures among the arguments are dependencies.

        The keyword names above are herder's options; pass a function keyword
        of the same name through ``functools.partial``. ``service`` is refused:
        a call returns once, only a command can be kept running.
        """
        if service:
            raise SubmissionError(
                "service: only a command task can be a service (a Python call returns a "
                "value once); use herd.command([...], service=True)"
            )
        deps: list[str] = []
        args = _swap_futures(args, deps)
        kwargs = _swap_futures(kwargs, deps)
        deps.extend(_task_id(d) for d in depends_on)
        spec = TaskSpec(
            id=new_id("t"),
            kind="call",
            name=name or getattr(fn, "__name__", None),
            payload=cloudpickle.dumps((fn, args, kwargs)),
            depends_on=list(dict.fromkeys(deps)),
            priority=priority,
            max_attempts=retries + 1,
            timeout_s=timeout,
            labels=dict(labels or {}),
            run_on_failure=run_on_failure,
            release=release,
            **_placement(select, resources),
        )
        return self._enqueue(self._job(job), None, spec)

    def command(
        self,
        run: Sequence[str] | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        retries: int = DEFAULT_RETRIES,
        timeout: float | None = None,
        priority: int = 0,
        labels: Mapping[str, str] | None = None,
        depends_on: Iterable[TaskFuture | Future | str] = (),
        name: str | None = None,
        job: str | None = None,
        service: bool | ServiceSpec = False,
        health: Sequence[str] | str | None = None,
        health_s: float | None = None,
        health_timeout_s: float | None = None,
        unhealthy_after: int | None = None,
        grace_s: float | None = None,
        select: str | None = None,
        resources: Mapping[str, float] | None = None,
        release: str | None = None,
        limits: Mapping[str, int] | None = None,
        run_as: str | None = None,
        secret_env: Iterable[str] = (),
    ) -> TaskFuture:
        """Run a program (argv, no shell) or a ``sh -c`` string; the result is its output.

        ``limits`` (``memory_mb``, ``cpu_s``, ``open_files``, ``processes``) cap
        it, ``run_as`` runs it as that user (an agent running as root), and the
        ``env`` names in ``secret_env`` are never shown.

        ``service=True`` keeps it running instead: restarted whenever it exits
        (``retries`` does not apply), on any node, until cancelled; its future
        resolves only then. ``health`` (a command, or an http(s) URL) is checked
        every ``health_s`` seconds, see :class:`~herder.model.ServiceSpec`.
        """
        checks = {
            "health": health if health is None or isinstance(health, str) else list(health),
            "health_s": health_s,
            "health_timeout_s": health_timeout_s,
            "unhealthy_after": unhealthy_after,
            "grace_s": grace_s,
        }
        spec = TaskSpec(
            id=new_id("t"),
            kind="command",
            name=name,
            command=CommandSpec(
                run=run if isinstance(run, str) else list(run),
                env=dict(env or {}),
                cwd=cwd,
                limits=Limits(**limits) if limits else None,
                run_as=run_as,
                secret_env=list(secret_env),
            ),
            depends_on=list(dict.fromkeys(_task_id(d) for d in depends_on)),
            priority=priority,
            max_attempts=retries + 1,
            timeout_s=timeout,
            labels=dict(labels or {}),
            service=_service_spec(service, {k: v for k, v in checks.items() if v is not None}),
            release=release,
            **_placement(select, resources),
        )
        return self._enqueue(self._job(job), None, spec)

    def _future(self, task_id: str, job_id: str, kind: str) -> TaskFuture:
        fut = TaskFuture(task_id, job_id, kind)
        fut.fetch = self._fetch_result
        return fut

    async def _fetch_result(self, key: str) -> bytes:
        return await asyncio.to_thread(self.data.cat, key)

    def _enqueue(self, job_id: str, job_name: str | None, spec: TaskSpec) -> TaskFuture:
        if self._closed:
            raise ClientClosed()
        fut = self._future(spec.id, job_id, spec.kind)
        self._futures.add(fut)
        self._pending.append((job_name, spec, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        """Send everything submitted in this loop turn, one Submit per job."""
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        by_job: dict[str, tuple[str | None, list[TaskSpec], list[TaskFuture]]] = {}
        for job_name, spec, fut in pending:
            entry = by_job.setdefault(fut.job_id, (job_name, [], []))
            entry[1].append(spec)
            entry[2].append(fut)
        for job_id, (job_name, specs, futs) in by_job.items():
            self._send_submit(job_id, job_name, specs, futs)

    def _send_submit(
        self, job_id: str, job_name: str | None, specs: list[TaskSpec], futs: list[TaskFuture]
    ) -> None:
        self._next_req += 1
        msg = protocol.Submit(req=self._next_req, job_id=job_id, job_name=job_name, tasks=specs)
        self._requests[msg.req] = (msg, futs)
        if self._ws is not None and self._connected.is_set():
            task = asyncio.ensure_future(self._ws.send(protocol.encode(msg)))
            task.add_done_callback(_ignore_closed)

    async def submit_batch(
        self, job_id: str, job_name: str | None, specs: list[TaskSpec]
    ) -> list[TaskFuture]:
        """Submit prepared specs as one transaction; returns once committed."""
        futs = []
        for spec in specs:
            fut = self._future(spec.id, job_id, spec.kind)
            self._futures.add(fut)
            futs.append(fut)
        self._send_submit(job_id, job_name, specs, futs)
        if futs:
            await futs[0].submitted
        return futs

    async def map(
        self,
        fn: Callable[..., T],
        iterable: Iterable[Any],
        *,
        batch_size: int = MAP_BATCH,
        job: str | None = None,
        retries: int = DEFAULT_RETRIES,
        timeout: float | None = None,  # noqa: ASYNC109 - each task's timeout, not this call's
        priority: int = 0,
        select: str | None = None,
        resources: Mapping[str, float] | None = None,
        release: str | None = None,
    ) -> list[T]:
        """``[fn(x) for x in iterable]`` on the herd, results in order; one job."""
        placement = {**_placement(select, resources), "release": release}
        job_id = job or new_id("j")
        fn_name = getattr(fn, "__name__", None)
        futs: list[TaskFuture] = []
        items = list(iterable)
        pickled_fn = cloudpickle.dumps(fn)
        for start in range(0, len(items), batch_size):
            specs = [
                TaskSpec(
                    id=new_id("t"),
                    kind="call",
                    name=fn_name,
                    payload=_payload_with(pickled_fn, item),
                    priority=priority,
                    max_attempts=retries + 1,
                    timeout_s=timeout,
                    **placement,
                )
                for item in items[start : start + batch_size]
            ]
            futs.extend(await self.submit_batch(job_id, f"map {fn_name}", specs))
        return [await f for f in futs]

    def run_on(self, node_id: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> TaskFuture:
        """:meth:`submit` pinned to one node (a selector on its built-in fact ``node``)."""
        pin = f"node == {json.dumps(node_id)}"
        extra = kwargs.pop("select", None)
        return self.submit(fn, *args, select=f"{pin} and ({extra})" if extra else pin, **kwargs)

    async def run_on_all(
        self, fn: Callable[..., T], *args: Any, select: str | None = None, **kwargs: Any
    ) -> dict[str, T]:
        """One copy of ``fn(*args)`` on each ready node matching ``select``: ``{node: result}``.

        The nodes are those paired and ready now; each copy is pinned to its
        node, so a node that leaves takes its copy's result with it (the
        call then raises that task's error).
        """
        tree = parse_selector(select) if select else None
        targets = []
        for n in await self.nodes():
            if n["state"] not in ("ready", "busy"):
                continue
            facts = Facts(n["id"], n["labels"], n.get("data") or {}, n.get("resources") or {})
            if tree is None or evaluate_selector(tree, facts):
                targets.append(n["id"])
        futs = {node: self.run_on(node, fn, *args, **kwargs) for node in targets}
        return {node: await fut for node, fut in futs.items()}

    def _unwatch(self, task_ids: list[str]) -> None:
        """Tell the coordinator these futures are gone (see :class:`_Futures`). Between
        sessions nothing is sent: a new session watches only the futures still held."""
        if self._ws is None or not self._connected.is_set():
            return
        frame = protocol.encode(protocol.Unwatch(task_ids=task_ids))
        asyncio.ensure_future(self._ws.send(frame)).add_done_callback(_ignore_closed)

    def future(self, task_id: str, kind: str = "call") -> TaskFuture:
        """A future for a task submitted elsewhere (e.g. by ``herder push``), or for one
        whose future this program dropped (the coordinator stopped sending its outcome)."""
        fut = self._futures.get(task_id)
        if fut is None:
            fut = self._future(task_id, "", kind)
            fut.submitted.set_result(None)
            self._futures.add(fut)
            if self._ws is not None:
                t = asyncio.ensure_future(
                    self._ws.send(protocol.encode(protocol.Watch(task_ids=[task_id])))
                )
                t.add_done_callback(_ignore_closed)
        return fut

    # --- control and queries --------------------------------------------------------------

    async def _get(self, path: str, **params: Any) -> Any:
        response = await self.http.get(
            path, params={k: v for k, v in params.items() if v is not None}
        )
        return _json(response)

    async def _post(self, path: str, body: Any) -> Any:
        return _json(await self.http.post(path, json=body))

    async def _post_raw(self, path: str, body: str, *, read_timeout_s: float) -> Any:
        """POST JSON already serialised (large bodies are made off the event loop)."""
        response = await self.http.post(
            path,
            content=body,
            headers={"content-type": "application/json"},
            timeout=httpx.Timeout(60, read=read_timeout_s),
        )
        return _json(response)

    async def cancel(
        self, *targets: TaskFuture | Future | str, job: str | None = None
    ) -> list[str]:
        """Cancel tasks (running ones are killed) or a whole job; returns the cancelled ids."""
        ids = [_task_id(t) for t in targets]
        body = {"task_ids": ids or None, "job_id": job}
        result: list[str] = (await self._post("/v1/cancel", body))["cancelled"]
        return result

    async def wait(self, job: str | None = None, *, poll_s: float = 0.2) -> dict[str, Any]:
        """Wait until every task of ``job`` (default: this client's session job) is final."""
        job_id = job or self._session_job
        if job_id is None:
            raise HerderError("nothing submitted yet: name a job")
        while True:
            summary: dict[str, Any] = await self._get(f"/v1/jobs/{job_id}")
            if summary["finished"]:
                return summary
            await asyncio.sleep(poll_s)

    async def push(self, specs: list[TaskSpec], job_name: str | None = None) -> str:
        """Submit a parsed tasks file as one job, in one transaction; returns the job id."""
        job_id = new_id("j")
        body = protocol.JobSubmission(job_id=job_id, job_name=job_name, tasks=specs)
        # The coordinator answers once the whole job is committed: a million
        # tasks take minutes, so the wait grows with the job (60 s + 1 ms a task).
        await self._post_raw(
            "/v1/tasks",
            await asyncio.to_thread(body.model_dump_json),
            read_timeout_s=60 + len(specs) / 1000,
        )
        return job_id

    async def push_file(
        self, path: str | os.PathLike[str], *, job_id: str | None = None
    ) -> dict[str, Any]:
        """Push a tasks file (TOML, JSON or YAML) as one job; the coordinator checks it.

        Returns ``{"job_id": ..., "tasks": n}``; a mistake in the file raises
        SubmissionError naming the file, the task and the field, and nothing
        of the file is stored. A push whose answer is lost (connection reset,
        timeout) is sent again, up to 3 times: the job id makes it idempotent.
        """
        from herder.taskfile import read_tasks_file

        text, fmt = await asyncio.to_thread(read_tasks_file, path)
        job_id = job_id or new_id("j")
        body = text.encode()
        for attempt in range(PUSH_ATTEMPTS):
            try:
                response = await self.http.post(
                    "/v1/push",
                    params={"format": fmt, "source": os.fspath(path), "job_id": job_id},
                    content=body,
                    timeout=httpx.Timeout(60, read=60 + len(body) / 1_000_000),  # + 1 s a MB
                )
                break
            except httpx.TransportError:
                if attempt == PUSH_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.5 * 2**attempt)
        result: dict[str, Any] = _json(response)
        return result

    async def status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._get("/v1/status")
        return result

    async def nodes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._get("/v1/nodes")
        return result

    async def fleet(self) -> dict[str, Any]:
        """The fleet's policy, target and node counts by state."""
        result: dict[str, Any] = await self._get("/v1/fleet")
        return result

    # --- releases ---------------------------------------------------------------------

    async def release(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        requirements: Iterable[str] = (),
        requirements_file: str | os.PathLike[str] | None = None,
        python: str | None = None,
        exclude: Iterable[str] = (),
        find_links: Iterable[str] = (),
        no_index: bool = False,
        git: str | None = None,
        rev: str | None = None,
        wheel: str | os.PathLike[str] | None = None,
    ) -> str:
        """Build a release (a directory, ``git``+``rev``, or a ``wheel``) and store it;
        returns its id. The same input gives the same id, and is stored once.

        A local ``find_links`` directory is bundled (nodes install offline from
        it with ``no_index``); URLs are passed to the installer as they are.
        """
        from herder.bundle import Source, build  # pathspec and tar only when used

        source = Source(
            path=Path(path) if path is not None else None,
            git=git,
            rev=rev,
            wheel=Path(wheel) if wheel is not None else None,
            requirements=tuple(requirements),
            requirements_file=Path(requirements_file) if requirements_file else None,
            python=python,
            exclude=tuple(exclude),
            find_links=tuple(find_links),
            no_index=no_index,
        )
        with tempfile.TemporaryDirectory(prefix="herder-release-") as out:
            built = await asyncio.to_thread(build, source, Path(out))
            await asyncio.to_thread(self.data.put_file, built.key, built.bundle)
        response = await self.http.post(
            "/v1/releases",
            content=built.manifest.model_dump_json(),
            headers={"content-type": "application/json"},
        )
        registered: dict[str, Any] = _json(response, refused=ReleaseError)
        return str(registered["id"])

    async def releases(self) -> list[dict[str, Any]]:
        """Every release, newest first; ``fleet`` marks the fleet's."""
        result: list[dict[str, Any]] = await self._get("/v1/releases")
        return result

    async def release_info(self, release_id: str) -> dict[str, Any]:
        """A release's manifest, what still uses it, and the nodes that have it installed."""
        response = await self.http.get(f"/v1/releases/{release_id}")
        result: dict[str, Any] = _json(response, refused=ReleaseError)
        return result

    async def remove_release(self, release_id: str) -> None:
        """Delete a release; ReleaseError (nothing changed) while tasks or the fleet use it."""
        response = await self.http.delete(f"/v1/releases/{release_id}")
        if response.status_code != 204:
            _json(response, refused=ReleaseError)

    async def roll(self, release_id: str) -> dict[str, Any]:
        """Make ``release_id`` the fleet's release: new tasks run in it, nodes load it now."""
        response = await self.http.post(f"/v1/releases/{release_id}/roll")
        result: dict[str, Any] = _json(response, refused=ReleaseError)
        return result

    async def release_status(self) -> dict[str, Any]:
        """The fleet's release and, per node, the releases installed and loading."""
        result: dict[str, Any] = await self._get("/v1/releases/status")
        return result

    # --- API tokens (admin) ----------------------------------------------------------------

    async def create_token(
        self, role: str, *, name: str | None = None, ttl_s: float | None = None
    ) -> dict[str, Any]:
        """A new API token with ``role`` (read, submit, admin, agent); ``token`` in the
        answer is its text, shown this once."""
        result: dict[str, Any] = await self._post(
            "/v1/tokens", {"role": role, "name": name, "ttl_s": ttl_s}
        )
        return result

    async def tokens(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._get("/v1/tokens")
        return result

    async def revoke_token(self, token_id: str) -> dict[str, Any]:
        """Revoke now: requests with it are refused, its open sessions closed."""
        response = await self.http.delete(f"/v1/tokens/{token_id}")
        result: dict[str, Any] = _json(response, refused=SecurityError)
        return result

    async def scale(self, target: int | None) -> int | None:
        """Keep ``target`` nodes (None: back to the herd's own policy)."""
        result: int | None = (await self._post("/v1/fleet/scale", {"target": target}))["target"]
        return result

    async def drain(self, node_id: str) -> None:
        """The node takes no more work and leaves once its running tasks are done."""
        await self._post(f"/v1/nodes/{node_id}/drain", {})

    async def terminate(self, node_id: str) -> None:
        """End the node now; its running tasks go back to the queue."""
        await self._post(f"/v1/nodes/{node_id}/terminate", {})

    async def tasks(
        self,
        *,
        state: str | None = None,
        states: str | None = None,
        job: str | None = None,
        node: str | None = None,
        name: str | None = None,
        limit: int = 100,
        after: str | None = None,
        order: str = "asc",
    ) -> list[dict[str, Any]]:
        """A page of tasks in submission order (``order="desc"``: newest first).

        Filters: ``state`` (one), ``states`` (``pending``, ``running`` or
        ``finished``), ``job``, ``node``, ``name`` (a glob). The next page:
        ``after=`` the last id of this one, same filters and order.
        """
        result: list[dict[str, Any]] = await self._get(
            "/v1/tasks",
            state=state,
            states=states,
            job=job,
            node=node,
            name=name,
            limit=limit,
            after=after,
            order=order,
        )
        return result

    async def tasks_pending(self, **filters: Any) -> list[dict[str, Any]]:
        """Tasks waiting on dependencies or ready for a slot (filters as :meth:`tasks`)."""
        return await self.tasks(states="pending", **filters)

    async def tasks_running(self, **filters: Any) -> list[dict[str, Any]]:
        """Tasks leased to a node or running there."""
        return await self.tasks(states="running", **filters)

    async def tasks_finished(self, **filters: Any) -> list[dict[str, Any]]:
        """Tasks that succeeded, failed or were cancelled."""
        return await self.tasks(states="finished", **filters)

    async def finished(self, job: str, **filters: Any) -> list[dict[str, Any]]:
        """The finished tasks of ``job`` (a page; ``after=`` for the next)."""
        return await self.tasks(states="finished", job=job, **filters)

    async def executors(self) -> list[dict[str, Any]]:
        """Nodes alive: state, labels, slots used and free, running tasks, last telemetry."""
        result: list[dict[str, Any]] = await self._get("/v1/executors")
        return result

    async def resource_usage(self, window_s: float = 60.0) -> dict[str, Any]:
        """Per node and in total: resource use now, and average and peak over the window."""
        result: dict[str, Any] = await self._get("/v1/usage", window_s=window_s)
        return result

    async def telemetry(
        self, node: str, window_s: float = 600.0, task: str | None = None
    ) -> dict[str, Any]:
        """A node's readings over the window (1 s points up to 10 min, 1 min beyond);
        with ``task``, that task's own readings (``herder.task.telemetry``)."""
        result: dict[str, Any] = await self._get(
            "/v1/telemetry", node=node, window_s=window_s, task=task
        )
        return result

    async def timeline(
        self, job: str | None = None, since: float | None = None, limit: int = 5000
    ) -> list[dict[str, Any]]:
        """Attempts as (node, start, end, state), oldest first: a task stream."""
        result: list[dict[str, Any]] = await self._get(
            "/v1/timeline", job=job, since=since, limit=limit
        )
        return result

    async def logs(
        self, task: TaskFuture | Future | str, stream: str = "stdout", attempt: int | None = None
    ) -> str:
        """What the task wrote to ``stream`` so far (all of it once it finished)."""
        page = await self._get(f"/v1/tasks/{_task_id(task)}/logs", stream=stream, attempt=attempt)
        return str(page["data"])

    async def follow_logs(
        self, task: TaskFuture | Future | str, stream: str = "stdout", every_s: float = 0.5
    ) -> AsyncIterator[str]:
        """The task's output as it is written, until the task is done (``herder logs -f``)."""
        offset = 0
        while True:
            page = await self._get(f"/v1/tasks/{_task_id(task)}/logs", stream=stream, offset=offset)
            if page["data"]:
                yield page["data"]
            offset = page["offset"]
            if page["done"]:
                return
            await asyncio.sleep(every_s)

    async def task(self, task_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._get(f"/v1/tasks/{task_id}")
        return result

    async def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._get(f"/v1/jobs/{job_id}")
        return result

    async def jobs(self, limit: int = 100) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._get("/v1/jobs", limit=limit)
        return result

    async def event_log(self, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """The store's event log (every state change, oldest first, ids after ``after``)."""
        result: list[dict[str, Any]] = await self._get("/v1/events", after=after, limit=limit)
        return result

    async def services(self, *, ended: bool = False) -> list[dict[str, Any]]:
        """The services kept running (``ended``: cancelled ones too): where each runs,
        its restarts, its health as last checked, how its last run ended."""
        result: list[dict[str, Any]] = await self._get(
            "/v1/services", ended="true" if ended else None
        )
        return result

    async def shutdown(self) -> None:
        await self._post("/v1/shutdown", {})


def _json(response: httpx.Response, refused: type[HerderError] = SubmissionError) -> Any:
    """The answer's JSON; a refusal (400, 404, 409, 422) raises ``refused`` with the reason."""
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        if response.status_code in (400, 409, 422) or (
            response.status_code == 404 and refused is not SubmissionError
        ):
            raise refused(f"{detail}")
        raise HerderError(f"coordinator answered {response.status_code}: {detail}")
    return response.json()


def _service_spec(service: bool | ServiceSpec | None, checks: dict[str, Any]) -> ServiceSpec | None:
    """The service settings of ``command()``; health options without a service are refused."""
    if isinstance(service, ServiceSpec):
        if checks:
            raise SubmissionError(
                f"give {', '.join(checks)} inside the ServiceSpec, or service=True with them"
            )
        return service
    if not service:
        if checks:
            raise SubmissionError(f"{', '.join(checks)}: only for a service (add service=True)")
        return None
    return ServiceSpec(**checks)


def _payload_with(pickled_fn: bytes, item: Any) -> bytes:
    """Pickle ``(fn, (item,), {})`` reusing the already pickled function's bytes."""
    payload: bytes = cloudpickle.dumps((_Pickled(pickled_fn), (item,), {}))
    return payload


class _Pickled:
    """A function pickled once and embedded in many payloads (cheap ``map``)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Callable[[bytes], Any], tuple[bytes]]:
        return (cloudpickle.loads, (self.data,))


def _task_id(target: TaskFuture | Future | str) -> str:
    if isinstance(target, str):
        return target
    return target.task_id


def _swap_futures(value: Any, deps: list[str]) -> Any:
    if isinstance(value, (TaskFuture, Future)):
        deps.append(value.task_id)
        return TaskRef(value.task_id)
    if type(value) in (list, tuple):
        return type(value)(_swap_futures(v, deps) for v in value)
    if type(value) is dict:
        return {k: _swap_futures(v, deps) for k, v in value.items()}
    return value


def _ignore_closed(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        exc = task.exception()
        if exc is not None and not isinstance(exc, websockets.ConnectionClosed):
            raise exc


# ---------------------------------------------------------------------------
# The sync wrapper


class Future:
    """The synchronous view of a :class:`TaskFuture`."""

    def __init__(self, inner: TaskFuture, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = inner
        self._loop = loop
        self.task_id = inner.task_id
        self.job_id = inner.job_id

    def __repr__(self) -> str:
        return repr(self._inner)

    def result(self, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(self._inner.result(), self._loop).result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return asyncio.run_coroutine_threadsafe(self._inner.exception(), self._loop).result(timeout)

    def done(self) -> bool:
        return self._inner.done()

    @property
    def progress(self) -> tuple[float, str] | None:
        """(fraction, message) as the task last reported it, while it is watched."""
        return self._inner.progress


class Client:
    """``herd = herder.connect(); herd.submit(pow, 2, 10).result() == 1024``."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        event_ttl_s: float = EVENT_TTL_S,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="herder-client", daemon=True
        )
        self._thread.start()
        try:
            self._async: AsyncClient = self._run(
                AsyncClient.open(url, token, env=env, event_ttl_s=event_ttl_s)
            )
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        async def call() -> T:
            return await fn()

        return self._run(call())

    @property
    def data(self) -> DataClient:
        """The datastore: ``herd.data.put_file("inputs/a.csv", "a.csv")``."""
        return self._async.data

    @property
    def aio(self) -> AsyncClient:
        """The async client underneath (use it from the client's own loop only)."""
        return self._async

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            self._run(self._async.close())
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _submitted(self, make: Callable[[], TaskFuture]) -> Future:
        async def go() -> TaskFuture:
            fut = make()
            await fut.submitted
            return fut

        return Future(self._run(go()), self._loop)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """As :meth:`AsyncClient.submit`; returns once the submission is committed."""
        return self._submitted(lambda: self._async.submit(fn, *args, **kwargs))

    def command(self, run: Sequence[str] | str, **options: Any) -> Future:
        return self._submitted(lambda: self._async.command(run, **options))

    def map(
        self, fn: Callable[..., T], iterable: Iterable[Any], **options: Any
    ) -> builtins.list[T]:
        return self._run(self._async.map(fn, iterable, **options))

    def run_on(self, node_id: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """As :meth:`AsyncClient.run_on`; returns once the submission is committed."""
        return self._submitted(lambda: self._async.run_on(node_id, fn, *args, **kwargs))

    def run_on_all(
        self, fn: Callable[..., T], *args: Any, select: str | None = None, **kwargs: Any
    ) -> dict[str, T]:
        return self._run(self._async.run_on_all(fn, *args, select=select, **kwargs))

    def future(self, task_id: str, kind: str = "call") -> Future:
        async def make() -> TaskFuture:
            return self._async.future(task_id, kind)

        return Future(self._run(make()), self._loop)

    def cancel(self, *targets: Future | str, job: str | None = None) -> builtins.list[str]:
        return self._run(self._async.cancel(*targets, job=job))

    def wait(self, job: str | None = None) -> dict[str, Any]:
        return self._run(self._async.wait(job))

    def push(self, specs: builtins.list[TaskSpec], job_name: str | None = None) -> str:
        return self._run(self._async.push(specs, job_name))

    def push_file(
        self, path: str | os.PathLike[str], *, job_id: str | None = None
    ) -> dict[str, Any]:
        return self._run(self._async.push_file(path, job_id=job_id))

    def status(self) -> dict[str, Any]:
        return self._run(self._async.status())

    def nodes(self) -> builtins.list[dict[str, Any]]:
        return self._run(self._async.nodes())

    def fleet(self) -> dict[str, Any]:
        return self._run(self._async.fleet())

    def scale(self, target: int | None) -> int | None:
        return self._run(self._async.scale(target))

    def create_token(
        self, role: str, *, name: str | None = None, ttl_s: float | None = None
    ) -> dict[str, Any]:
        return self._run(self._async.create_token(role, name=name, ttl_s=ttl_s))

    def tokens(self) -> builtins.list[dict[str, Any]]:
        return self._run(self._async.tokens())

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return self._run(self._async.revoke_token(token_id))

    def release(self, path: str | os.PathLike[str] | None = None, **options: Any) -> str:
        """As :meth:`AsyncClient.release`."""
        return self._run(self._async.release(path, **options))

    def releases(self) -> builtins.list[dict[str, Any]]:
        return self._run(self._async.releases())

    def release_info(self, release_id: str) -> dict[str, Any]:
        return self._run(self._async.release_info(release_id))

    def remove_release(self, release_id: str) -> None:
        self._run(self._async.remove_release(release_id))

    def roll(self, release_id: str) -> dict[str, Any]:
        return self._run(self._async.roll(release_id))

    def release_status(self) -> dict[str, Any]:
        return self._run(self._async.release_status())

    def drain(self, node_id: str) -> None:
        self._run(self._async.drain(node_id))

    def send(self, target: str, topic: str, data: Any = None) -> int:
        return self._run(self._async.send(target, topic, data))

    def set_available(self, node_id: str, available: bool) -> None:
        self._run(self._async.set_available(node_id, available))

    def on(
        self, types: str | Iterable[str], fn: Callable[[HerdEvent], object]
    ) -> Callable[[], None]:
        """As :meth:`AsyncClient.on`; ``fn`` runs in the client's loop thread."""

        async def add() -> Callable[[], None]:
            return self._async.on(types, fn)

        stop = self._run(add())

        def stop_soon() -> None:
            self._loop.call_soon_threadsafe(stop)

        return stop_soon

    def events(
        self, types: str | Iterable[str] | None = None, *, timeout: float
    ) -> Iterator[HerdEvent]:
        """Blocking: buffered then new events of ``types`` for ``timeout`` seconds."""
        kinds = _kinds(types)
        box: queue.SimpleQueue[HerdEvent] = queue.SimpleQueue()
        stop = self.on(kinds if kinds is not None else EVENT_KINDS, box.put)
        deadline = time.monotonic() + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    yield box.get(timeout=left)
                except queue.Empty:
                    return
        finally:
            stop()

    def terminate(self, node_id: str) -> None:
        self._run(self._async.terminate(node_id))

    def tasks(self, **filters: Any) -> builtins.list[dict[str, Any]]:
        return self._run(self._async.tasks(**filters))

    def tasks_pending(self, **filters: Any) -> builtins.list[dict[str, Any]]:
        return self._run(self._async.tasks_pending(**filters))

    def tasks_running(self, **filters: Any) -> builtins.list[dict[str, Any]]:
        return self._run(self._async.tasks_running(**filters))

    def tasks_finished(self, **filters: Any) -> builtins.list[dict[str, Any]]:
        return self._run(self._async.tasks_finished(**filters))

    def finished(self, job: str, **filters: Any) -> builtins.list[dict[str, Any]]:
        return self._run(self._async.finished(job, **filters))

    def executors(self) -> builtins.list[dict[str, Any]]:
        return self._run(self._async.executors())

    def resource_usage(self, window_s: float = 60.0) -> dict[str, Any]:
        return self._run(self._async.resource_usage(window_s))

    def telemetry(
        self, node: str, window_s: float = 600.0, task: str | None = None
    ) -> dict[str, Any]:
        return self._run(self._async.telemetry(node, window_s, task))

    def timeline(
        self, job: str | None = None, since: float | None = None, limit: int = 5000
    ) -> builtins.list[dict[str, Any]]:
        return self._run(self._async.timeline(job, since, limit))

    def logs(self, task: Future | str, stream: str = "stdout", attempt: int | None = None) -> str:
        """As :meth:`AsyncClient.logs`."""
        return self._run(self._async.logs(task, stream, attempt))

    def follow_logs(self, task: Future | str, stream: str = "stdout") -> Iterator[str]:
        """Blocking: the task's output as it is written, until the task is done."""
        pages = self._async.follow_logs(task, stream)

        async def next_page() -> str | None:
            try:
                return await anext(pages)
            except StopAsyncIteration:
                return None

        while (chunk := self._run(next_page())) is not None:
            yield chunk

    def task(self, task_id: str) -> dict[str, Any]:
        return self._run(self._async.task(task_id))

    def job(self, job_id: str) -> dict[str, Any]:
        return self._run(self._async.job(job_id))

    def jobs(self, limit: int = 100) -> builtins.list[dict[str, Any]]:
        return self._run(self._async.jobs(limit))

    def event_log(self, after: int = 0, limit: int = 100) -> builtins.list[dict[str, Any]]:
        return self._run(self._async.event_log(after, limit))

    def services(self, *, ended: bool = False) -> builtins.list[dict[str, Any]]:
        return self._run(self._async.services(ended=ended))

    def shutdown(self) -> None:
        self._run(self._async.shutdown())


def connect(
    url: str | None = None, token: str | None = None, *, env: Mapping[str, str] | None = None
) -> Client:
    """Connect to a coordinator: arguments, else HERDER_URL / HERDER_TOKEN, else ~/.herder."""
    return Client(url, token, env=env)


def credentials_path(home: Path) -> Path:
    return home / "coordinator.json"


def _placement(select: str | None, resources: Mapping[str, float] | None) -> dict[str, Any]:
    """TaskSpec fields for a selector and resources; a bad selector raises SelectorError
    (with its caret line) here, before anything is sent."""
    if select is not None:
        parse_selector(select)
    return {"select": select, "resources": dict(resources or {})}
