"""The messages between agents, clients and the coordinator, version ``v1``.

A WebSocket frame is a msgpack array of messages, so one frame may carry many
(results of a batch, assignments for a batch). Each message is a map with a
type tag ``t``; pydantic checks every field on the way in and an invalid
frame raises :class:`ProtocolError` naming the field. Pickled bytes
(functions, arguments, results) travel as opaque ``bytes`` fields: the
coordinator never unpickles them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgpack
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)

from herder.model import (
    RELEASE_ID_PATTERN,
    CommandSpec,
    ServiceSpec,
    TaskSpec,
)
from herder.values import check_bus_data

VERSION = 1
# security.NONCE_BYTES, kept here too (protocol imports nothing but model and
# values); a unit
# test holds the two equal
HELLO_NONCE_BYTES = 32
MAX_FRAME_BYTES = 64 * 1024 * 1024


class JobSubmission(BaseModel):
    """The JSON body of ``POST /v1/tasks``: one job's tasks, stored all or nothing.

    Validated straight into TaskSpecs by pydantic's core, no per-task Python
    loop on either side: a 100,000-task push spends its time in the store.
    """

    model_config = ConfigDict(extra="forbid")

    job_id: str
    job_name: str | None = Field(default=None, max_length=256)
    tasks: list[TaskSpec] = Field(min_length=1, max_length=1_000_000)


class ProtocolError(ValueError):
    """A frame that does not follow protocol v1."""


MAX_NESTING = 100
"""How deep the free-form maps of a message (a node's data, a result's error and
output) may nest: the store keeps them as JSON, and ``json.dumps`` recurses (a
result nested 1,000 levels deep raised RecursionError in the engine loop)."""


def _shallow(value: dict[str, Any]) -> dict[str, Any]:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            raise ValueError(f"nested deeper than {MAX_NESTING} levels")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return value


FreeForm = Annotated[dict[str, Any], AfterValidator(_shallow)]


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- agent -> coordinator ---------------------------------------------------


class HeldLease(_Msg):
    task_id: str
    lease_id: str


class Hello(_Msg):
    t: Literal["hello"] = "hello"
    v: int = VERSION
    node_id: str = Field(min_length=1, max_length=128)
    name: str = Field(max_length=256)
    slots: int = Field(ge=1, le=4096)
    prefetch: int = Field(ge=0, le=100_000)
    labels: dict[str, str] = Field(default_factory=dict)
    # free-form facts (``--data``) and what it has to run tasks with
    # (cpus, mem_gb, disk_gb, gpus): both matched by task selectors
    data: FreeForm = Field(default_factory=dict)
    resources: dict[str, float] = Field(default_factory=dict)
    host: str = ""
    pid: int = 0
    provider: str = "joined"
    # exactly security.NONCE_BYTES: the proofs are HMACs over both nonces concatenated
    nonce: bytes = Field(min_length=HELLO_NONCE_BYTES, max_length=HELLO_NONCE_BYTES)
    held: list[HeldLease] = Field(default_factory=list)
    # the id of the agent token it proves itself with; None: the cluster secret
    token_id: str | None = Field(default=None, pattern=r"^k-[0-9a-f]{16}$")


class Proof(_Msg):
    t: Literal["proof"] = "proof"
    mac: bytes


HEALTH_ERROR_CHARS = 500
HealthState = Literal["starting", "healthy", "unhealthy"]


class HealthReport(_Msg):
    """The health of one running service, as its agent last checked it.

    ``state``: ``starting`` (no check yet), ``healthy`` (the last check
    passed) or ``unhealthy`` (the last ``failures`` checks in a row failed;
    at the service's ``unhealthy_after`` it is killed and restarted).
    """

    task_id: str
    lease_id: str
    state: HealthState
    checked_at: float | None = None
    error: str | None = Field(default=None, max_length=HEALTH_ERROR_CHARS)
    failures: int = Field(default=0, ge=0)


class Heartbeat(_Msg):
    t: Literal["hb"] = "hb"
    leases: list[str] = Field(default_factory=list)
    prefetch: int | None = Field(default=None, ge=0, le=100_000)
    # cpu %, memory, disk, load, network, GPUs (herder.agent.telemetry)
    telemetry: dict[str, float] | None = Field(default=None, max_length=256)
    health: list[HealthReport] | None = None  # the node's running services with a check
    # releases in the node's cache (most recently used first) and those it is installing
    releases: list[str] | None = None
    loading: list[str] | None = None


class Started(_Msg):
    t: Literal["started"] = "started"
    leases: list[HeldLease]
    at: float


class ResultItem(_Msg):
    task_id: str
    lease_id: str
    state: Literal["succeeded", "failed", "cancelled"]
    reason: str | None = None
    result: bytes | None = None
    error: FreeForm | None = None
    error_pickle: bytes | None = None
    output: FreeForm | None = None
    started_at: float | None = None
    ended_at: float | None = None


class Results(_Msg):
    t: Literal["results"] = "results"
    items: list[ResultItem]
    prefetch: int | None = Field(default=None, ge=0, le=100_000)


class OutputChunk(_Msg):
    """New bytes a running command wrote to one of its streams."""

    task_id: str
    lease_id: str
    stream: Literal["stdout", "stderr"]
    data: bytes = Field(max_length=1 << 20)


class Output(_Msg):
    """Output of running commands, streamed while they run (tails are in the result)."""

    t: Literal["output"] = "output"
    chunks: list[OutputChunk]


class Release(_Msg):
    """Leases handed back unstarted (a draining agent), so others can take them at once.

    ``interrupted``: the agent's machine is being taken away (a spot
    interruption notice). The leases are every one it held, queued *and*
    running; the running tasks were killed before this was sent and none
    will report a result. Each is to go back to ``ready`` at once, whatever
    its state, without being charged an attempt.

    ``leaving``: the agent is stopping (SIGTERM): lease it nothing more, so
    what it hands back goes to other agents rather than straight back to it.
    """

    t: Literal["release"] = "release"
    leases: list[HeldLease]
    interrupted: bool = False
    leaving: bool = False


class Bye(_Msg):
    t: Literal["bye"] = "bye"
    reason: str


# --- coordinator -> agent ---------------------------------------------------


class Challenge(_Msg):
    t: Literal["challenge"] = "challenge"
    nonce: bytes
    mac: bytes


class Welcome(_Msg):
    t: Literal["welcome"] = "welcome"
    node_id: str
    heartbeat_s: float
    lost_after_s: float
    adopted: list[str] = Field(default_factory=list)


class Refuse(_Msg):
    t: Literal["refuse"] = "refuse"
    reason: str


class Assignment(_Msg):
    task_id: str
    lease_id: str
    attempt: int
    kind: Literal["call", "command"]
    payload: bytes | None = None
    command: CommandSpec | None = None
    timeout_s: float | None = None
    dep_results: dict[str, bytes] = Field(default_factory=dict)
    job_id: str = ""
    name: str | None = None  # with job_id, where a command's outputs go
    service: ServiceSpec | None = None  # kept running: health-checked, restarted by the store
    start_delay_s: float = Field(default=0.0, ge=0)  # wait this long in the slot, then start
    release: str | None = Field(default=None, pattern=RELEASE_ID_PATTERN)  # its environment


class Assign(_Msg):
    t: Literal["assign"] = "assign"
    tasks: list[Assignment]


class Ack(_Msg):
    t: Literal["ack"] = "ack"
    accepted: list[str] = Field(default_factory=list)
    refused: list[str] = Field(default_factory=list)


class Cancel(_Msg):
    t: Literal["cancel"] = "cancel"
    leases: list[str]


class Drain(_Msg):
    """Take no more work and hand back what has not started. ``leave``: exit once
    the running tasks are done; ``kill``: stop them now and hand them back too."""

    t: Literal["drain"] = "drain"
    leave: bool = False
    kill: bool = False


class LoadRelease(_Msg):
    """Install this release now (the fleet's release: before the node takes work,
    or on a roll-out); answered with :class:`ReleaseLoaded`."""

    t: Literal["load_release"] = "load_release"
    release: str = Field(pattern=RELEASE_ID_PATTERN)


class ReleaseLoaded(_Msg):
    """A release is ready on the node (``error`` None) or could not be installed.

    Sent for every :class:`LoadRelease`, and the first time a task's release
    is made ready in this agent; ``cached``: it was installed already.
    """

    t: Literal["release_loaded"] = "release_loaded"
    release: str = Field(pattern=RELEASE_ID_PATTERN)
    seconds: float = Field(ge=0)
    cached: bool = False
    error: str | None = Field(default=None, max_length=16_384)


# --- client <-> coordinator (session channel) -------------------------------


class Submit(_Msg):
    t: Literal["submit"] = "submit"
    req: int
    job_id: str
    job_name: str | None = None
    tasks: list[TaskSpec]


class Watch(_Msg):
    t: Literal["watch"] = "watch"
    task_ids: list[str]


class Unwatch(_Msg):
    """The client dropped its futures of these tasks: their outcomes are no longer
    sent to it (the tasks run on; a later ``Watch`` asks again)."""

    t: Literal["unwatch"] = "unwatch"
    task_ids: list[str]


class Submitted(_Msg):
    t: Literal["submitted"] = "submitted"
    req: int
    error: str | None = None


class Outcome(_Msg):
    task_id: str
    state: Literal["succeeded", "failed", "cancelled"]
    reason: str | None = None
    result: bytes | None = None
    error: dict[str, Any] | None = None
    error_pickle: bytes | None = None
    output: dict[str, Any] | None = None


class Done(_Msg):
    t: Literal["done"] = "done"
    items: list[Outcome]


# --- the event bus (agents and clients) -----------------------------------------

TOPIC = Field(min_length=1, max_length=256)


BusData = Annotated[Any, AfterValidator(check_bus_data)]


class Send(_Msg):
    """A message for the handlers of ``topic`` on the nodes ``target`` names.

    ``target``: a node id, ``"all"``, or a selector over node labels. From a
    client, ``req`` is answered by :class:`Sent`; from an agent (a task's
    ``herder.task.send``), the coordinator relays it and answers nothing.
    """

    t: Literal["send"] = "send"
    target: str = Field(min_length=1, max_length=1024)
    topic: str = TOPIC
    data: BusData = None
    req: int = 0
    task_id: str | None = None


class Emit(_Msg):
    """An event a running task emits for the clients (``herder.task.emit``)."""

    t: Literal["emit"] = "emit"
    topic: str = TOPIC
    data: BusData = None
    task_id: str | None = None


class Progress(_Msg):
    """How far a running task is (``herder.task.progress``): 0 to 1 and a short note."""

    t: Literal["progress"] = "progress"
    task_id: str
    lease_id: str
    job_id: str = ""
    fraction: float = Field(ge=0.0, le=1.0)
    message: str = Field(default="", max_length=500)


class TaskTelemetry(_Msg):
    """A running task's own readings (``herder.task.telemetry``)."""

    t: Literal["task_telemetry"] = "task_telemetry"
    task_id: str
    lease_id: str
    readings: dict[str, float] = Field(max_length=64)


class Deliver(_Msg):
    """A bus message for this node's handlers (``herder.node.on``); ``sender``:
    the node id it came from, or ``"client"``."""

    t: Literal["deliver"] = "deliver"
    topic: str = TOPIC
    data: BusData = None
    sender: str


class Sent(_Msg):
    """The answer to a client's :class:`Send`: on how many nodes it was delivered."""

    t: Literal["sent"] = "sent"
    req: int
    delivered: int = 0
    error: str | None = None


EventKind = Literal["node_available", "node_unavailable", "emit", "progress"]


class Event(_Msg):
    """Pushed to clients: a node came or went, a task emitted, a watched task's progress.

    Discovery and emitted events go to every connected client (each keeps
    them for a TTL, for listeners that come later); progress goes to the
    clients watching the task.
    """

    t: Literal["event"] = "event"
    kind: EventKind
    at: float
    node_id: str | None = None
    task_id: str | None = None
    topic: str | None = None
    data: Any = None


AgentMessage = Annotated[
    Hello
    | Proof
    | Heartbeat
    | Started
    | Results
    | Output
    | Release
    | Bye
    | Send
    | Emit
    | Progress
    | ReleaseLoaded
    | TaskTelemetry,
    Field(discriminator="t"),
]
CoordinatorMessage = Annotated[
    Challenge | Welcome | Refuse | Assign | Ack | Cancel | Drain | Deliver | LoadRelease,
    Field(discriminator="t"),
]
ClientMessage = Annotated[Submit | Watch | Unwatch | Send, Field(discriminator="t")]
ServerMessage = Annotated[Submitted | Done | Refuse | Sent | Event, Field(discriminator="t")]

_agent_frame: TypeAdapter[list[AgentMessage]] = TypeAdapter(list[AgentMessage])
_coordinator_frame: TypeAdapter[list[CoordinatorMessage]] = TypeAdapter(list[CoordinatorMessage])
_client_frame: TypeAdapter[list[ClientMessage]] = TypeAdapter(list[ClientMessage])
_server_frame: TypeAdapter[list[ServerMessage]] = TypeAdapter(list[ServerMessage])


def encode(*messages: _Msg) -> bytes:
    """One frame carrying ``messages`` in order."""
    frame: bytes = msgpack.packb([m.model_dump(mode="python") for m in messages], use_bin_type=True)
    return frame


def _decode(adapter: TypeAdapter[Any], frame: bytes | str) -> Any:
    if isinstance(frame, str):
        raise ProtocolError("frames are binary msgpack, not text")
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolError(f"not a msgpack frame: {exc}") from exc
    if not isinstance(raw, list):
        raise ProtocolError("a frame must be an array of messages")
    try:
        return adapter.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ProtocolError(f"invalid message at {where}: {first['msg']}") from exc


def decode_agent(frame: bytes | str) -> list[AgentMessage]:
    return list(_decode(_agent_frame, frame))


def decode_coordinator(frame: bytes | str) -> list[CoordinatorMessage]:
    return list(_decode(_coordinator_frame, frame))


def decode_client(frame: bytes | str) -> list[ClientMessage]:
    return list(_decode(_client_frame, frame))


def decode_server(frame: bytes | str) -> list[ServerMessage]:
    return list(_decode(_server_frame, frame))
