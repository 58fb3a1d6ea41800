"""Hypothesis against the WebSocket protocol of one real coordinator.

One ``herder up --local 1`` serves the whole module; its own agent keeps
running as the peer the coordinator must go on serving. Raw connections to
``/v1/agent`` and ``/v1/session`` send malformed, oversized, early, replayed
and out-of-order frames. After each case the fuzzing connection must have
been closed by the server with a close code (not dropped, not left hanging)
or the frame refused without effect; every few cases, and at the end, the
coordinator still runs a task, its node is still ``ready``, its log holds
no traceback, and its memory stayed bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import ssl
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgpack
import psutil
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection

from herder import protocol, security
from herder.agent.agent import Agent, AgentConfig
from herder.client import Client
from herder.errors import AuthenticationError, SecurityError
from herder.local import LocalHerd

IO_TIMEOUT_S = 5.0
CHECK_EVERY = 25  # cases between two "does it still serve?" checks
RSS_BUDGET = 100 * 2**20

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

Frame = bytes | str


@dataclass
class Closed:
    """How a fuzzing connection ended: the server's close code (None: no close frame,
    the TCP connection was dropped) and what it sent before."""

    code: int | None
    reason: str
    received: list[Frame] = field(default_factory=list)


@dataclass
class Target:
    herd: LocalHerd
    client: Client
    node_id: str  # the real agent's node
    wss: str
    ssl: ssl.SSLContext
    secret: bytes
    bearer: str
    log: Path
    loop: asyncio.Runner
    rss_before: int
    cases: int = 0
    fuzz_ids: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def pid(self) -> int:
        assert self.herd.process is not None
        return self.herd.process.pid

    def run(self, coro: Any) -> Any:
        return self.loop.run(coro)

    def case_done(self) -> None:
        """Count a case; every CHECK_EVERY, check that the coordinator still serves."""
        self.cases += 1
        if self.cases % CHECK_EVERY == 0:
            self.still_serves()

    def wait_fuzz_agents_gone(self) -> None:
        """Only the real agent is connected: no task can be leased to a fuzzing peer."""
        deadline = time.monotonic() + IO_TIMEOUT_S
        while self.client.status()["agents"] != 1:
            assert time.monotonic() < deadline, "a fuzzing connection is still registered"
            time.sleep(0.02)

    def still_serves(self) -> None:
        assert self.herd.process is not None
        assert self.herd.process.poll() is None
        self.wait_fuzz_agents_gone()
        assert self.client.submit(pow, 2, 5).result(timeout=10) == 32
        states = {n["id"]: n["state"] for n in self.client.nodes()}
        assert states[self.node_id] in ("ready", "busy")


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    herd = LocalHerd(nodes=1)
    client = herd.start()
    runner = asyncio.Runner()
    try:
        herd.wait_nodes(1)
        ca = httpx.get(f"{herd.url}/v1/ca", verify=False, timeout=IO_TIMEOUT_S).content
        secret = security.load_secret(herd.home / "secret")
        assert herd.process is not None
        (node,) = client.nodes()
        t = Target(
            herd=herd,
            client=client,
            node_id=node["id"],
            wss="wss://" + herd.url.split("://", 1)[1],
            ssl=security.client_ssl_context(ca),
            secret=secret,
            bearer=str(client.aio.http.headers["authorization"]),
            log=herd.home / "coordinator.log",
            loop=runner,
            rss_before=0,
        )
        t.still_serves()  # warm: the first task, the first connections
        t.rss_before = psutil.Process(herd.process.pid).memory_info().rss
        yield t
    finally:
        runner.close()
        herd.stop()


@pytest.fixture(autouse=True)
def no_traceback(target: Target) -> Iterator[None]:
    """Whatever a test sends, the coordinator logs no traceback for it."""
    start = target.log.stat().st_size
    yield
    with target.log.open("rb") as f:
        f.seek(start)
        new = f.read().decode(errors="replace")
    at = min(
        (i for i in (new.find("Traceback"), new.find("Exception in ASGI")) if i >= 0), default=-1
    )
    assert at < 0, new[at : at + 6000]


# --- talking to the coordinator ------------------------------------------------------------


async def _connect(t: Target, path: str, headers: dict[str, str] | None = None) -> ClientConnection:
    return await asyncio.wait_for(
        websockets.connect(
            t.wss + path,
            ssl=t.ssl,
            additional_headers=headers,
            open_timeout=IO_TIMEOUT_S,
            max_size=None,
            ping_interval=None,
            compression=None,
        ),
        IO_TIMEOUT_S,
    )


async def _recv(ws: ClientConnection) -> Frame:
    return await asyncio.wait_for(ws.recv(), IO_TIMEOUT_S)


async def _until_closed(ws: ClientConnection, received: list[Frame] | None = None) -> Closed:
    """Read until the server closes; a connection it leaves open fails (TimeoutError)."""
    got = received if received is not None else []
    try:
        while True:
            got.append(await _recv(ws))
    except websockets.ConnectionClosed as exc:
        rcvd = exc.rcvd
        return Closed(rcvd.code if rcvd else None, rcvd.reason if rcvd else "", got)


async def _send_all(ws: ClientConnection, frames: list[Frame]) -> bool:
    """Send ``frames`` in order; False once the server has closed the connection."""
    try:
        for frame in frames:
            await ws.send(frame)
    except websockets.ConnectionClosed:
        return False
    return True


def _hello(nonce: bytes, node_id: str = "fuzz-hello") -> bytes:
    """A hello frame, not validated here (so it may carry a nonce of the wrong length)."""
    hello = protocol.Hello.model_construct(
        node_id=node_id, name="fuzz", slots=1, prefetch=0, nonce=nonce
    )
    return protocol.encode(hello)


@dataclass
class Pairing:
    hello: bytes
    nonce: bytes
    challenge: protocol.Challenge
    proof: bytes


async def _pair(
    t: Target, ws: ClientConnection, node_id: str, labels: dict[str, str] | None = None
) -> Pairing:
    """A correct handshake, as herder.agent.Agent._pair does it."""
    nonce = security.new_nonce()
    hello = protocol.encode(
        protocol.Hello(
            node_id=node_id, name="fuzz", slots=1, prefetch=0, nonce=nonce, labels=labels or {}
        )
    )
    await ws.send(hello)
    (challenge,) = protocol.decode_coordinator(await _recv(ws))
    assert isinstance(challenge, protocol.Challenge)
    expected = security.coordinator_proof(t.secret, nonce, challenge.nonce)
    assert security.proofs_equal(challenge.mac, expected)
    proof = protocol.encode(
        protocol.Proof(mac=security.agent_proof(t.secret, challenge.nonce, nonce))
    )
    await ws.send(proof)
    (welcome,) = protocol.decode_coordinator(await _recv(ws))
    assert isinstance(welcome, protocol.Welcome)
    assert welcome.node_id == node_id
    return Pairing(hello, nonce, challenge, proof)


def _assert_refused(closed: Closed, *codes: int) -> None:
    assert closed.code in codes, closed
    for frame in closed.received:  # only protocol messages: never a traceback or text
        assert isinstance(frame, bytes), closed
        for msg in protocol.decode_coordinator(frame):
            assert not isinstance(msg, protocol.Welcome), closed


# --- strategies ------------------------------------------------------------------------------

_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=16)
    | st.binary(max_size=16)
)
_key = st.text(max_size=8) | st.integers(-5, 5) | st.binary(max_size=4) | st.booleans()
junk = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_key, inner, max_size=4),
    max_leaves=12,
)

_lease = protocol.HeldLease(task_id="t-fuzz", lease_id="l-fuzz")
_release_id = "r-" + "0" * 20
# one valid message of every type, each side's: mutated into wrong shapes below
SAMPLES: list[protocol._Msg] = [
    protocol.Hello(node_id="fuzz-sample", name="f", slots=1, prefetch=0, nonce=b"n" * 32),
    protocol.Proof(mac=b"m" * 32),
    protocol.Heartbeat(leases=["l-fuzz"], telemetry={"cpu": 1.0}),
    protocol.Started(leases=[_lease], at=1.0),
    protocol.Results(
        items=[protocol.ResultItem(task_id="t-fuzz", lease_id="l-fuzz", state="succeeded")]
    ),
    protocol.Output(
        chunks=[
            protocol.OutputChunk(task_id="t-fuzz", lease_id="l-fuzz", stream="stdout", data=b"x")
        ]
    ),
    protocol.Release(leases=[_lease]),
    protocol.Bye(reason="fuzz"),
    protocol.Send(target="fuzz-nobody", topic="fuzz"),
    protocol.Emit(topic="fuzz", data={"a": 1}),
    protocol.Progress(task_id="t-fuzz", lease_id="l-fuzz", fraction=0.5),
    protocol.ReleaseLoaded(release=_release_id, seconds=1.0, error="no"),
    protocol.TaskTelemetry(task_id="t-fuzz", lease_id="l-fuzz", readings={"x": 1.0}),
    # the coordinator's and the client channel's: never valid from an agent
    protocol.Challenge(nonce=b"n" * 32, mac=b"m" * 32),
    protocol.Welcome(node_id="fuzz-sample", heartbeat_s=1.0, lost_after_s=5.0),
    protocol.Refuse(reason="fuzz"),
    protocol.Assign(tasks=[]),
    protocol.Ack(accepted=["l-fuzz"]),
    protocol.Cancel(leases=["l-fuzz"]),
    protocol.Drain(),
    protocol.LoadRelease(release=_release_id),
    protocol.Deliver(topic="fuzz", sender="client"),
    protocol.Watch(task_ids=["t-fuzz"]),
    protocol.Unwatch(task_ids=["t-fuzz"]),
    protocol.Submitted(req=1),
    protocol.Sent(req=1),
    protocol.Event(kind="emit", at=1.0),
]
TAGS = sorted({str(m.model_dump()["t"]) for m in SAMPLES})


@st.composite
def messages(draw: st.DrawFn) -> Any:
    """A message map: valid, or with a field of the wrong type, missing, extra, or an
    unknown ``t`` tag."""
    msg = dict(draw(st.sampled_from(SAMPLES)).model_dump(mode="python"))
    keys = sorted(msg)
    how = draw(st.sampled_from(["valid", "wrong_type", "missing", "extra", "tag"]))
    if how == "wrong_type":
        msg[draw(st.sampled_from(keys))] = draw(junk)
    elif how == "missing":
        del msg[draw(st.sampled_from(keys))]
    elif how == "extra":
        msg[draw(st.text(min_size=1, max_size=8))] = draw(junk)
    elif how == "tag":
        msg["t"] = draw(st.sampled_from(TAGS) | st.text(max_size=12) | junk)
    return msg


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


frames: st.SearchStrategy[Frame] = st.one_of(
    st.binary(max_size=256),  # random bytes
    junk.map(_pack),  # valid msgpack of the wrong shape
    st.lists(messages(), max_size=3).map(_pack),  # arrays of (mostly) wrong messages
    messages().map(_pack),  # a message not in an array
    st.text(max_size=64),  # a text frame
    st.lists(messages(), min_size=1, max_size=2).map(lambda ms: _pack(ms).decode("latin-1")),
)


# --- 1, 3: malformed frames, and any frame before pairing ---------------------------------


@FUZZ
@given(first=frames, then=frames)
def test_garbage_before_pairing_is_closed(target: Target, first: Frame, then: Frame) -> None:
    async def case() -> Closed:
        async with await _connect(target, "/v1/agent") as ws:
            received: list[Frame] = []
            if await _send_all(ws, [first]):
                try:  # a frame that happened to be a valid Hello: a challenge comes
                    received.append(await _recv(ws))
                except websockets.ConnectionClosed:
                    pass
                else:
                    await _send_all(ws, [then])
            return await _until_closed(ws, received)

    closed = target.run(case())
    _assert_refused(closed, 4400, 4401)
    target.case_done()


@FUZZ
@given(reply=frames)
def test_a_hello_then_anything_but_a_proof_is_refused(target: Target, reply: Frame) -> None:
    async def case() -> Closed:
        async with await _connect(target, "/v1/agent") as ws:
            await ws.send(_hello(security.new_nonce()))
            (challenge,) = protocol.decode_coordinator(await _recv(ws))
            assert isinstance(challenge, protocol.Challenge)
            await _send_all(ws, [reply])
            return await _until_closed(ws)

    _assert_refused(target.run(case()), 4400, 4401)
    target.case_done()


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(protocol.encode(protocol.Results(items=[])), id="results"),
        pytest.param(protocol.encode(protocol.Heartbeat()), id="heartbeat"),
        pytest.param(protocol.encode(protocol.Proof(mac=b"m" * 32)), id="proof-without-hello"),
        pytest.param(protocol.encode(protocol.Bye(reason="x")), id="bye"),
        pytest.param(b"\x90", id="empty-array"),
        pytest.param(_hello(b"n" * 32) + b"\x90", id="trailing-bytes"),
        pytest.param(_pack([{"t": "hello"}] * 2), id="two-hellos"),
        pytest.param("hello", id="text-frame"),  # regression: KeyError 'bytes', no close
        pytest.param(_hello(b"n" * 16), id="short-nonce"),  # regression: SecurityError
        pytest.param(_hello(b"n" * 64), id="long-nonce"),  # regression: SecurityError
        pytest.param(b"\x91" * 10_000 + b"\xc0", id="10000-nested-arrays"),
        pytest.param(b"\x91" + b"\x81\xa1k" * 10_000 + b"\xc0", id="10000-nested-maps"),
        pytest.param(b"\xdd\xff\xff\xff\xff", id="array-claiming-4g-items"),
        pytest.param(b"\x91\xc6\x7f\xff\xff\xff", id="bin-claiming-2gb"),
    ],
)
def test_each_early_frame_is_refused(target: Target, first: Frame) -> None:
    async def case() -> Closed:
        async with await _connect(target, "/v1/agent") as ws:
            await ws.send(first)
            return await _until_closed(ws)

    closed = target.run(case())
    _assert_refused(closed, 4400)
    assert closed.received == []


def test_peers_that_leave_mid_handshake_leave_nothing(target: Target) -> None:
    async def case() -> None:
        async with await _connect(target, "/v1/agent"):
            pass  # gone before the hello
        async with await _connect(target, "/v1/agent") as ws:
            await ws.send(_hello(security.new_nonce()))
            await _recv(ws)  # the challenge; gone before the proof
        async with await _connect(target, "/v1/agent") as ws:
            await ws.send(_hello(security.new_nonce()))
            ws.transport.abort()  # no close frame at all

    target.run(case())
    target.still_serves()


# --- 2: huge frames and deep nesting ---------------------------------------------------------


def test_a_frame_announcing_more_than_the_limit_is_closed_before_its_payload(
    target: Target,
) -> None:
    """The limit is checked on the frame header (websockets' parser, from uvicorn's
    ``ws_max_size``): 1009 comes back without the payload ever being sent, so nothing
    of that size is allocated."""

    async def case(announced: int) -> Closed:
        async with await _connect(target, "/v1/agent") as ws:
            mask = os.urandom(4)
            ws.transport.write(b"\x82\xff" + struct.pack("!Q", announced) + mask + b"\x00" * 16)
            return await _until_closed(ws)

    for announced in (protocol.MAX_FRAME_BYTES + 1, 2**63 - 1):
        closed = target.run(case(announced))
        assert closed.code == 1009, closed
    target.still_serves()


@pytest.mark.slow
def test_frames_over_the_limit_are_closed_whole_or_fragmented(target: Target) -> None:
    """Once for real: a 64 MB + 1 frame, and a message of small fragments adding up
    to more than the limit (the limit counts the whole message)."""
    big = b"\x00" * (protocol.MAX_FRAME_BYTES + 1)

    async def case(fragmented: bool) -> Closed:
        async with await _connect(target, "/v1/agent") as ws:
            chunk = 1 << 20
            pieces = [big[i : i + chunk] for i in range(0, len(big), chunk)]
            await _send_all(ws, [pieces] if fragmented else [big])  # type: ignore[list-item]
            return await _until_closed(ws)

    for fragmented in (False, True):
        closed = target.run(case(fragmented))
        assert closed.code == 1009, closed
    target.still_serves()


def test_deep_nesting_inside_a_paired_session_is_refused(target: Target) -> None:
    """Nesting as deep as msgpack decodes, inside fields that are stored as JSON."""

    def nested(depth: int) -> Any:
        value: Any = "x"
        for _ in range(depth):
            value = {"k": value}
        return value

    item = {"task_id": "t-fuzz", "lease_id": "l-fuzz", "state": "failed"}
    frames_ = [
        b"\x91" * 10_000 + b"\xc0",
        _pack([{"t": "results", "items": [{**item, "error": nested(1000)}]}]),
        _pack([{"t": "results", "items": [{**item, "output": nested(1000)}]}]),
        _pack([{"t": "emit", "topic": "fuzz", "data": nested(1000)}]),
        _pack([{"t": "send", "target": "all", "topic": "fuzz", "data": nested(1000)}]),
    ]

    async def case(frame: bytes) -> Closed:
        async with await _connect(target, "/v1/agent") as ws:
            await _pair(target, ws, f"fuzz-{next(target.fuzz_ids) % 4}")
            if await _send_all(ws, [frame]):
                await asyncio.sleep(0.2)
                await ws.close()
            return await _until_closed(ws)

    for frame in frames_:
        closed = target.run(case(frame))
        assert closed.code in (1000, 4400), closed
        target.still_serves()


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize("field_", ["error", "output"])
@pytest.mark.parametrize("depth", [protocol.MAX_NESTING - 1, 1010])
def test_deep_nesting_in_the_result_of_a_real_lease(
    target: Target, field_: str, depth: int
) -> None:
    """A paired peer that really holds a lease reports a result nested deep, in a
    field the store keeps as JSON. Regression: 1,010 levels (msgpack decodes up to
    1,024) raised RecursionError in json.dumps inside the engine loop, which stopped
    the coordinator. Now: refused past MAX_NESTING (4400), stored below it."""
    labels = {"fuzz": f"lease-{field_}-{depth}"}

    async def case() -> tuple[str, Closed]:
        async with await _connect(target, "/v1/agent") as ws:
            await _pair(target, ws, f"fuzz-lease-{field_}", labels)
            future = target.client.submit(pow, 2, 5, labels=labels, retries=0)
            assignment = None
            while assignment is None:
                for msg in protocol.decode_coordinator(await _recv(ws)):
                    if isinstance(msg, protocol.Assign) and msg.tasks:
                        assignment = msg.tasks[0]
            item = {
                "task_id": assignment.task_id,
                "lease_id": assignment.lease_id,
                "state": "failed",
                field_: _nested(depth),
            }
            if await _send_all(ws, [_pack([{"t": "results", "items": [item]}])]):
                with contextlib.suppress(TimeoutError, websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 2)  # the ack if stored, a close if not
                await ws.close()
            return future.task_id, await _until_closed(ws)

    task_id, closed = target.run(case())
    target.still_serves()
    state = target.client.task(task_id)["task"]["state"]
    if depth < protocol.MAX_NESTING:
        assert closed.code == 1000, closed
        assert state == "failed"
    else:
        assert closed.code == 4400, closed
        assert "nested deeper" in closed.reason
        assert state != "failed"
        target.client.cancel(task_id)  # it waits for a node with its labels


# --- 4: replayed handshakes and a rogue coordinator ----------------------------------------


def test_a_recorded_proof_is_refused_on_a_new_connection(target: Target) -> None:
    async def case() -> tuple[Pairing, protocol.Challenge, Closed]:
        async with await _connect(target, "/v1/agent") as ws:
            recorded = await _pair(target, ws, "fuzz-replay")
        async with await _connect(target, "/v1/agent") as ws:
            await ws.send(recorded.hello)  # the same hello, the same agent nonce
            (challenge,) = protocol.decode_coordinator(await _recv(ws))
            assert isinstance(challenge, protocol.Challenge)
            await ws.send(recorded.proof)
            return recorded, challenge, await _until_closed(ws)

    recorded, challenge, closed = target.run(case())
    assert challenge.nonce != recorded.challenge.nonce
    assert (closed.code, closed.reason) == (4401, "authentication failed")
    assert [protocol.decode_coordinator(f) for f in closed.received] == [
        [protocol.Refuse(reason="authentication failed")]
    ]
    target.still_serves()


def test_a_reflected_challenge_is_not_a_proof(target: Target) -> None:
    """The coordinator's own mac sent back (the roles are in the HMAC) is refused."""

    async def case() -> Closed:
        async with await _connect(target, "/v1/agent") as ws:
            await ws.send(_hello(security.new_nonce()))
            (challenge,) = protocol.decode_coordinator(await _recv(ws))
            assert isinstance(challenge, protocol.Challenge)
            await ws.send(protocol.encode(protocol.Proof(mac=challenge.mac)))
            return await _until_closed(ws)

    closed = target.run(case())
    assert (closed.code, closed.reason) == (4401, "authentication failed")


def _rogue_agent(tmp: Path, secret: bytes) -> Agent:
    return Agent(
        AgentConfig(
            url="wss://rogue.invalid",
            secret=secret,
            fingerprint=b"\x00" * 32,
            node_id="fuzz-rogue",
            name="rogue",
            scratch_dir=tmp / "scratch",
            release_dir=tmp / "releases",
        )
    )


async def _against_rogue(agent: Agent, answer: Any) -> tuple[BaseException | None, list[Any]]:
    """Run the agent's handshake against a plain-ws server that answers its hello
    with ``answer(hello)``; returns what the handshake raised and what the agent sent."""
    heard: list[Any] = []

    async def rogue(conn: Any) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            (hello,) = protocol.decode_agent(await conn.recv())
            heard.append(hello)
            await conn.send(answer(hello))
            async for frame in conn:
                heard.extend(protocol.decode_agent(frame))

    async with websockets.serve(rogue, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
            try:
                await asyncio.wait_for(agent._pair(ws), IO_TIMEOUT_S)
            except (AuthenticationError, SecurityError, ValueError) as exc:
                return exc, heard
    return None, heard


def test_a_rogue_coordinator_without_the_secret_is_refused_by_the_agent(
    target: Target, tmp_path: Path
) -> None:
    """The agent checks the coordinator's mac before it proves anything: a wrong mac,
    or a real coordinator's challenge replayed from another handshake, gets a Bye and
    an AuthenticationError, never a Proof."""

    async def recorded_challenge() -> protocol.Challenge:
        async with await _connect(target, "/v1/agent") as ws:
            return (await _pair(target, ws, "fuzz-recorded")).challenge

    replayed = target.run(recorded_challenge())
    agent = _rogue_agent(tmp_path, target.secret)
    for answer in (
        lambda _h: protocol.encode(
            protocol.Challenge(nonce=security.new_nonce(), mac=os.urandom(32))
        ),
        lambda _h: protocol.encode(replayed),
        # the right construction with the wrong secret
        lambda h: protocol.encode(
            protocol.Challenge(
                nonce=(n := security.new_nonce()),
                mac=security.coordinator_proof(os.urandom(32), h.nonce, n),
            )
        ),
    ):
        error, heard = target.run(_against_rogue(agent, answer))
        assert isinstance(error, AuthenticationError), error
        assert isinstance(heard[0], protocol.Hello)
        assert heard[1:] == [protocol.Bye(reason="coordinator proof invalid")]
    target.still_serves()


@settings(FUZZ, max_examples=60)
@given(answer=frames)
def test_a_rogue_coordinator_sending_garbage_gets_no_proof(
    target: Target, tmp_path_factory: pytest.TempPathFactory, answer: Frame
) -> None:
    """Whatever a server answers a hello with, the agent's handshake fails with an
    error (never succeeds) and the agent never sends a Proof."""
    agent = _rogue_agent(tmp_path_factory.mktemp("rogue"), target.secret)
    error, heard = target.run(_against_rogue(agent, lambda _h: answer))
    assert error is not None
    assert not any(isinstance(m, protocol.Proof) for m in heard)


# --- 5: out-of-order and unexpected messages after a correct pairing ------------------------


@pytest.mark.parametrize(
    ("extra", "closes"),
    [
        pytest.param(lambda p: p.hello, True, id="second-hello"),
        pytest.param(lambda p: p.proof, True, id="proof-again"),
        pytest.param(lambda p: protocol.encode(protocol.Ack(accepted=["x"])), True, id="ack"),
        pytest.param(lambda p: protocol.encode(p.challenge), True, id="challenge"),
        pytest.param(lambda p: "text", True, id="text-frame"),  # regression: KeyError
        pytest.param(lambda p: b"\xc1", True, id="never-used-byte"),
        # regression: the error echoes the tag; 120 characters made a close reason over
        # 123 bytes, so the close itself raised and the connection was dropped
        pytest.param(lambda p: _pack([{"t": "\u00e9" * 100}]), True, id="non-ascii-tag"),
        pytest.param(
            lambda p: protocol.encode(
                protocol.Results(
                    items=[protocol.ResultItem(task_id="t-x", lease_id="l-x", state="succeeded")]
                )
            ),
            False,
            id="results-for-leases-never-given",
        ),
        pytest.param(
            lambda p: protocol.encode(protocol.Started(leases=[_lease], at=1.0)),
            False,
            id="started-never-given",
        ),
        pytest.param(
            lambda p: protocol.encode(protocol.Release(leases=[_lease], interrupted=True)),
            False,
            id="release-never-given",
        ),
    ],
)
def test_out_of_order_after_pairing(target: Target, extra: Any, closes: bool) -> None:
    async def case() -> Closed:
        async with await _connect(target, "/v1/agent") as ws:
            pairing = await _pair(target, ws, f"fuzz-{next(target.fuzz_ids) % 4}")
            if await _send_all(ws, [extra(pairing)]) and not closes:
                await asyncio.sleep(0.3)  # an engine turn
                await ws.close()
            return await _until_closed(ws)

    closed = target.run(case())
    assert closed.code == (4400 if closes else 1000), closed
    target.still_serves()


@FUZZ
@given(sent=st.lists(frames, min_size=1, max_size=3))
def test_anything_after_pairing_is_refused_or_harmless(target: Target, sent: list[Frame]) -> None:
    async def case() -> Closed:
        async with await _connect(target, "/v1/agent") as ws:
            await _pair(target, ws, f"fuzz-{next(target.fuzz_ids) % 4}")
            if await _send_all(ws, sent):
                await ws.close()  # all of it was accepted: valid messages, no effect
            return await _until_closed(ws)

    closed = target.run(case())
    assert closed.code in (1000, 4400), closed
    for frame in closed.received:
        assert isinstance(frame, bytes)
        protocol.decode_coordinator(frame)
    target.wait_fuzz_agents_gone()
    target.case_done()


# --- the client channel ------------------------------------------------------------------------


session_frames: st.SearchStrategy[Frame] = st.one_of(
    frames,
    st.builds(
        lambda m: _pack([m]),
        st.sampled_from(
            [
                protocol.Watch(task_ids=["t-fuzz"]).model_dump(),
                protocol.Unwatch(task_ids=["t-fuzz"]).model_dump(),
                protocol.Send(target="fuzz-nobody", topic="fuzz", req=3).model_dump(),
                {"t": "submit", "req": 1, "job_id": "fuzz", "tasks": [{"id": 1}]},
                {"t": "submit", "req": 1, "job_id": "fuzz", "tasks": "x"},
            ]
        ),
    ),
)


def test_the_session_channel_needs_the_bearer(target: Target) -> None:
    async def case(headers: dict[str, str] | None) -> int:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await _connect(target, "/v1/session", headers)
        return refused.value.response.status_code

    for headers in (None, {"authorization": "Bearer nope"}, {"authorization": target.bearer[:-2]}):
        assert target.run(case(headers)) == 403


@settings(FUZZ, max_examples=100)
@given(sent=st.lists(session_frames, min_size=1, max_size=3))
def test_garbage_on_the_session_channel_closes_that_connection_only(
    target: Target, sent: list[Frame]
) -> None:
    """A second, well-behaved session stays connected and answered while another
    sends garbage (and the herd's own client keeps working, see still_serves)."""
    auth = {"authorization": target.bearer}

    async def case() -> Closed:
        async with await _connect(target, "/v1/session", auth) as good:
            async with await _connect(target, "/v1/session", auth) as ws:
                if await _send_all(ws, sent):
                    await ws.close()
                closed = await _until_closed(ws)
            await good.send(protocol.encode(protocol.Send(target="fuzz-nobody", topic="t", req=7)))
            while True:  # events (nodes coming and going, emits) may come first
                answers = protocol.decode_server(await _recv(good))
                if any(isinstance(m, protocol.Sent) and m.req == 7 for m in answers):
                    return closed

    closed = target.run(case())
    assert closed.code in (1000, 4400), closed
    target.case_done()


@pytest.mark.parametrize(
    ("frame", "reason"),
    [  # regressions: KeyError 'bytes' on a text frame; a close reason over 123 bytes
        pytest.param("junk", "frames are binary msgpack, not text", id="text-frame"),
        pytest.param(_pack([{"t": "\u00e9" * 100}]), None, id="non-ascii-tag"),
    ],
)
def test_early_regressions_on_the_session_channel(
    target: Target, frame: Frame, reason: str | None
) -> None:
    async def case() -> Closed:
        async with await _connect(target, "/v1/session", {"authorization": target.bearer}) as ws:
            await ws.send(frame)
            return await _until_closed(ws)

    closed = target.run(case())
    assert closed.code == 4400, closed
    assert reason is None or closed.reason == reason
    assert len(closed.reason.encode()) <= 123


# --- at the end ----------------------------------------------------------------------------------


def test_zz_the_coordinator_survived_the_whole_run(target: Target) -> None:
    target.still_serves()
    rss = psutil.Process(target.pid).memory_info().rss
    assert rss - target.rss_before < RSS_BUDGET, (target.rss_before, rss)
    assert target.cases > 0
