"""The words of herder as data: tasks, nodes, jobs, events and their states.

The allowed state changes live here as tables, not as ``if`` chains spread
over the code: the store builds its guarded ``UPDATE ... WHERE state IN (...)``
statements from them, and tests check every recorded history against them.
Nothing in this module does I/O.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from herder import selector
from herder.errors import InvalidTransition

# Moved to herder.values (the worker's light import); named here too, so that
# payloads and results pickled before (``herder.model.TaskRef``) still load.
from herder.values import ResultRef as ResultRef
from herder.values import TaskRef as TaskRef

# ---------------------------------------------------------------------------
# States


class TaskState(enum.StrEnum):
    WAITING = "waiting"
    READY = "ready"
    LEASED = "leased"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_TASK_STATES


FINAL_TASK_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})

_T = TaskState
TASK_TRANSITIONS: frozenset[tuple[TaskState, TaskState]] = frozenset(
    {
        (_T.WAITING, _T.READY),
        (_T.WAITING, _T.FAILED),  # a dependency failed
        (_T.WAITING, _T.CANCELLED),
        (_T.READY, _T.LEASED),
        (_T.READY, _T.CANCELLED),
        (_T.LEASED, _T.RUNNING),
        (_T.LEASED, _T.READY),  # lease expired or handed back
        (_T.LEASED, _T.SUCCEEDED),  # result arrived in the same batch as "started"
        (_T.LEASED, _T.FAILED),
        (_T.LEASED, _T.CANCELLED),
        (_T.RUNNING, _T.READY),  # retry, or lease expired
        (_T.RUNNING, _T.SUCCEEDED),
        (_T.RUNNING, _T.FAILED),
        (_T.RUNNING, _T.CANCELLED),
    }
)


class NodeState(enum.StrEnum):
    REQUESTED = "requested"
    BOOTING = "booting"
    CONNECTED = "connected"
    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"
    TERMINATED = "terminated"
    LOST = "lost"

    @property
    def is_alive(self) -> bool:
        return self not in (NodeState.TERMINATED, NodeState.LOST)


_N = NodeState
NODE_TRANSITIONS: frozenset[tuple[NodeState, NodeState]] = frozenset(
    {
        (_N.REQUESTED, _N.BOOTING),
        (_N.REQUESTED, _N.CONNECTED),  # it paired before the provider call returned
        (_N.BOOTING, _N.CONNECTED),
        (_N.CONNECTED, _N.READY),  # after the herd's ``init_node``
        (_N.READY, _N.BUSY),
        (_N.BUSY, _N.READY),
        (_N.READY, _N.DRAINING),
        (_N.BUSY, _N.DRAINING),
        (_N.CONNECTED, _N.DRAINING),
        (_N.DRAINING, _N.TERMINATED),
        (_N.LOST, _N.CONNECTED),  # a lost node that comes back re-pairs
        (_N.TERMINATED, _N.CONNECTED),  # a restarted agent re-using its node id
    }
    | {(s, _N.LOST) for s in NodeState if s not in (_N.LOST, _N.TERMINATED)}
    | {(s, _N.TERMINATED) for s in NodeState if s is not _N.TERMINATED}
)


def sources(transitions: Iterable[tuple[Any, Any]], target: Any) -> frozenset[Any]:
    """Every state from which ``target`` may be reached."""
    return frozenset(src for src, dst in transitions if dst == target)


def check_task_transition(task_id: str, old: TaskState, new: TaskState) -> None:
    if (old, new) not in TASK_TRANSITIONS:
        raise InvalidTransition(
            f"task {task_id}: {old} -> {new} is not allowed", task_id=task_id, old=old, new=new
        )


def check_node_transition(node_id: str, old: NodeState, new: NodeState) -> None:
    if old == new:
        return
    if (old, new) not in NODE_TRANSITIONS:
        raise InvalidTransition(
            f"node {node_id}: {old} -> {new} is not allowed", node_id=node_id, old=old, new=new
        )


class Reason(enum.StrEnum):
    """Why a task or node ended up where it is (stored as text)."""

    LOST = "lost"
    DEPENDENCY_FAILED = "dependency failed"
    TIMEOUT = "timeout"
    ERROR = "error"
    EXIT_CODE = "exit code"
    CANCELLED = "cancelled"
    WORKER_DIED = "worker died"
    # node reasons
    LOST_HEARTBEAT = "lost heartbeat"
    DRAINED = "drained"
    USER = "user"
    IDLE = "idle"
    SHUTDOWN = "shutdown"
    REPLACED = "replaced"
    SPOT_INTERRUPTION = "spot interruption"
    BOOT_TIMEOUT = "boot timeout"
    PROVIDER_ERROR = "provider error"
    INIT_FAILED = "init_node failed"
    RELEASE_FAILED = "release failed"  # the fleet's release could not be installed
    PROCESS_EXITED = "process exited"
    ORPHAN = "orphan"
    SCALED_DOWN = "scaled down"
    # why a service was restarted (besides the task reasons above)
    UNHEALTHY = "unhealthy"
    EXITED = "exited"
    HANDED_BACK = "handed back"


# ---------------------------------------------------------------------------
# Identifiers

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
MAX_PAYLOAD_BYTES = 32 * 2**20
# a release id: "r-" and the start of the sha256 of its content (herder.releases)
RELEASE_ID_PATTERN = r"^r-[0-9a-f]{20}$"
_ID_RE = re.compile(ID_PATTERN)


def new_id(prefix: str) -> str:
    """A random id such as ``t-3f9a0c...``; made by whoever creates the object.

    Clients make their own task ids so that a retried submission carries the
    same ids and is stored once (the id is the idempotency key).
    """
    return f"{prefix}-{secrets.token_hex(10)}"


def valid_id(value: str, field: str) -> str:
    if not _ID_RE.match(value):
        raise ValueError(
            f"{field} {value!r} must be 1-128 characters of letters, digits, '.', '_', ':' or '-'"
        )
    return value


# ---------------------------------------------------------------------------
# Task specifications (what a client submits)

Labels = dict[str, str]


def relative_path(value: str, field: str) -> str:
    """A path that stays inside the directory it is joined to: relative, no ``..``.

    Guards the scratch directory: a fetch destination or an upload pattern
    must not reach outside it, whatever the tasks file says.
    """
    if not value or "\0" in value:
        raise ValueError(f"{field} must be a non-empty path without NUL characters")
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value):
        raise ValueError(f"{field} must be a relative path, got {value!r}")
    if ".." in re.split(r"[/\\]", value):
        raise ValueError(f"{field} must not contain '..', got {value!r}")
    return value


class FetchSpec(BaseModel):
    """One input of a command task, copied into its scratch directory before ``run``.

    Exactly one source: a datastore ``key``, the output ``path`` of a task it
    depends on (``from``, that task's name), or an http(s) ``url``. ``dest``
    is where it lands in the scratch directory (default: the source's last
    path segment).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    key: str | None = Field(default=None, min_length=1, max_length=1024)
    from_task: str | None = Field(default=None, alias="from", min_length=1, max_length=256)
    path: str | None = None
    url: str | None = Field(default=None, max_length=4096)
    dest: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> FetchSpec:
        given = [n for n in ("key", "from_task", "url") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of key, from or url")
        if self.from_task is not None and self.path is None:
            raise ValueError("'from' needs 'path': the file within that task's outputs")
        if self.from_task is None and self.path is not None:
            raise ValueError("'path' goes with 'from'")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        if self.path is not None:
            relative_path(self.path, "path")
        relative_path(self.target(), "dest")
        return self

    def target(self) -> str:
        """Where the input lands, relative to the scratch directory."""
        if self.dest is not None:
            return self.dest
        source = self.key or self.path or (self.url or "").split("?", 1)[0]
        return source.rstrip("/").rsplit("/", 1)[-1] or "download"


class Limits(BaseModel):
    """Resource limits of one command (``setrlimit`` in the child, before it starts).

    A command past ``memory_mb`` fails to allocate, past ``cpu_s`` is killed
    (SIGXCPU, then SIGKILL), past ``open_files`` cannot open more, and past
    ``processes`` cannot fork (counted per user, as the kernel does).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory_mb: int | None = Field(default=None, ge=16, le=16 * 2**20)
    cpu_s: int | None = Field(default=None, ge=1, le=30 * 86400)
    open_files: int | None = Field(default=None, ge=16, le=2**20)
    processes: int | None = Field(default=None, ge=1, le=2**22)


class CommandSpec(BaseModel):
    """A command task: inputs to ``fetch``, the ``run`` (argv without a shell, or
    a string for ``sh -c``), and glob patterns of outputs to ``upload``.

    It runs in a fresh scratch directory per attempt, removed afterwards
    unless ``keep_scratch``. ``limits`` caps its resources, ``run_as`` runs it
    as another user (the agent must be root to switch), and the ``env``
    variables named in ``secret_env`` are passed to it but never shown: the
    API, the CLI and the dashboard print ``***`` for their values.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: list[str] | str
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    fetch: list[FetchSpec] = Field(default_factory=list)
    upload: list[str] = Field(default_factory=list)
    keep_scratch: bool = False
    limits: Limits | None = None
    run_as: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    secret_env: list[str] = Field(default_factory=list, max_length=256)

    @model_validator(mode="after")
    def _secrets_are_env(self) -> CommandSpec:
        unknown = [name for name in self.secret_env if name not in self.env]
        if unknown:
            raise ValueError(f"secret_env names {unknown[0]!r}, which is not in env")
        return self

    def with_secrets(self, change: Callable[[str], str]) -> CommandSpec:
        """The spec with each secret variable's value passed through ``change``
        (sealing on the coordinator, unsealing on the agent)."""
        if not self.secret_env:
            return self
        env = {k: change(v) if k in self.secret_env else v for k, v in self.env.items()}
        return self.model_copy(update={"env": env})

    def shown(self) -> CommandSpec:
        """The spec as shown to people: secret environment values replaced by ``***``."""
        if not self.secret_env:
            return self
        env = {k: "***" if k in self.secret_env else v for k, v in self.env.items()}
        return self.model_copy(update={"env": env})

    @field_validator("upload")
    @classmethod
    def _patterns_inside(cls, value: list[str]) -> list[str]:
        for i, pattern in enumerate(value):
            relative_path(pattern, f"upload[{i}]")
        return value

    @field_validator("run")
    @classmethod
    def _run_not_empty(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("run must not be empty")
        elif not value or not all(value) or not value[0].strip():
            raise ValueError("run must be a non-empty list of non-empty strings")
        return value

    def argv(self) -> list[str]:
        return ["sh", "-c", self.run] if isinstance(self.run, str) else list(self.run)


# A service whose run lasted less than this is restarted after a delay that
# doubles from the first to the cap; a run at least this long resets it.
SERVICE_SHORT_RUN_S = 10.0
SERVICE_FIRST_DELAY_S = 1.0
SERVICE_MAX_DELAY_S = 60.0


def restart_backoff(previous_s: float, ran_s: float) -> float:
    """The delay before a service that ran ``ran_s`` seconds starts again.

    ``previous_s`` is the delay applied before that run (0 for none). A
    crash loop slows down to one start a minute; a service that stayed up
    for :data:`SERVICE_SHORT_RUN_S` is restarted at once, and its next short
    run starts the doubling again from :data:`SERVICE_FIRST_DELAY_S`.
    """
    if ran_s >= SERVICE_SHORT_RUN_S:
        return 0.0
    return min(SERVICE_MAX_DELAY_S, max(SERVICE_FIRST_DELAY_S, previous_s * 2))


class ServiceSpec(BaseModel):
    """A command that is kept running: restarted whenever it exits, until cancelled.

    ``health`` is checked on the node every ``health_s`` seconds once
    ``grace_s`` (default ``health_s``) has passed since the start: a command
    (argv without a shell, or a string for ``sh -c``; exit 0 is healthy, run
    in the task's scratch directory and environment, killed after
    ``health_timeout_s``) or an ``http://`` / ``https://`` URL (a GET
    answered 2xx within ``health_timeout_s`` is healthy). After
    ``unhealthy_after`` failed checks in a row the service is killed and
    restarted. Without ``health`` only its exit is watched.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    health: list[str] | str | None = None
    health_s: float = Field(default=10.0, gt=0, le=86400)
    health_timeout_s: float = Field(default=5.0, gt=0, le=3600)
    unhealthy_after: int = Field(default=3, ge=1, le=1000)
    grace_s: float | None = Field(default=None, ge=0, le=86400)

    @field_validator("health")
    @classmethod
    def _health_not_empty(cls, value: list[str] | str | None) -> list[str] | str | None:
        if value is None:
            return value
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("health must not be empty")
            if "\0" in value:
                raise ValueError("health must not contain a NUL character")
            if value.startswith(("http:", "https:")) and not value.startswith(
                ("http://", "https://")
            ):
                raise ValueError(f"health URL must start with http:// or https://, got {value!r}")
        elif not value or not all(value) or not value[0].strip():
            raise ValueError("health must be a non-empty list of non-empty strings")
        return value

    @property
    def health_url(self) -> str | None:
        """The URL to GET, when the check is one."""
        if isinstance(self.health, str) and self.health.startswith(("http://", "https://")):
            return self.health
        return None

    def health_argv(self) -> list[str] | None:
        """The command to run, when the check is one."""
        if self.health is None or self.health_url is not None:
            return None
        return ["sh", "-c", self.health] if isinstance(self.health, str) else list(self.health)

    @property
    def first_check_s(self) -> float:
        """Seconds from the start to the first check."""
        return self.health_s if self.grace_s is None else self.grace_s


class TaskSpec(BaseModel):
    """One task as submitted. ``payload`` is opaque to the coordinator (never unpickled there).

    In JSON (``POST /v1/tasks``) the payload is base64.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64"
    )

    id: Annotated[str, Field(pattern=ID_PATTERN)]
    kind: Literal["call", "command"]
    name: str | None = Field(default=None, max_length=256)
    # a Python call's function and arguments, pickled: big data goes by the datastore
    payload: bytes | None = Field(default=None, max_length=MAX_PAYLOAD_BYTES)
    command: CommandSpec | None = None
    depends_on: list[str] = Field(default_factory=list, max_length=100_000)
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    max_attempts: int = Field(default=3, ge=1, le=100)
    timeout_s: float | None = Field(default=None, gt=0, le=30 * 86400)
    labels: Labels = Field(default_factory=dict)
    run_on_failure: bool = False
    service: ServiceSpec | None = None
    # which nodes may run it (herder.selector) and what it holds while it runs
    select: str | None = Field(default=None, max_length=selector.MAX_SELECTOR)
    resources: dict[str, float] = Field(default_factory=dict)
    # the release (herder.releases) whose environment it runs in; None: the
    # fleet's release when it was submitted, or the agent's own environment
    release: str | None = Field(default=None, pattern=RELEASE_ID_PATTERN)

    @field_validator("select")
    @classmethod
    def _select_parses(cls, value: str | None) -> str | None:
        if value is not None:
            selector.parse(value)  # a SelectorError is a ValueError: names the field
        return value

    @field_validator("resources")
    @classmethod
    def _resources_known(cls, value: dict[str, float]) -> dict[str, float]:
        return selector.check_resources(value)

    @model_validator(mode="after")
    def _kind_matches_body(self) -> TaskSpec:
        if self.kind == "call" and (self.payload is None or self.command is not None):
            raise ValueError("a call task needs a payload and no command")
        if self.kind == "command" and (self.command is None or self.payload is not None):
            raise ValueError("a command task needs a command and no payload")
        if self.service is not None and self.kind != "command":
            raise ValueError(
                "service: only a command task can be a service (a Python call returns a "
                "value once; run a program with a command task instead)"
            )
        if self.id in self.depends_on:
            raise ValueError(f"task {self.id} depends on itself")
        if len(set(self.depends_on)) != len(self.depends_on):
            raise ValueError("depends_on lists a task twice")
        return self

    def constraint_key(self) -> str:
        """A canonical text for the task's placement constraints ('' for none).

        The store indexes ready tasks by this key, so a node claims the
        unconstrained tasks through one index range and matches the few
        distinct keys against its labels in Python.
        """
        return constraint_key(self.labels, self.select, self.resources)


def constraint_key(
    labels: Labels, select: str | None = None, resources: dict[str, float] | None = None
) -> str:
    """Labels alone give "k=v,k=v" as ever; see :func:`herder.selector.constraint_key`."""
    if not select and not resources:
        return ",".join(f"{k}={labels[k]}" for k in sorted(labels))
    return selector.constraint_key(labels, select, resources)


def labels_match(required: str, node_labels: Labels) -> bool:
    """Whether a node with ``node_labels`` has the labels a task's constraint key asks.

    Only the labels: the selector and resources of a key are checked
    against all of a node's facts by :meth:`herder.selector.Constraint.admits`.
    """
    if not required:
        return True
    if selector.SEP in required:
        required = required.rsplit(selector.SEP, 2)[0]
        if not required:
            return True
    for pair in required.split(","):
        key, _, value = pair.partition("=")
        if node_labels.get(key) != value:
            return False
    return True


# ---------------------------------------------------------------------------
# Releases (herder.releases keeps the manifest; the same pattern is there)


def is_release_id(value: str) -> bool:
    return bool(re.match(RELEASE_ID_PATTERN, value))


# ---------------------------------------------------------------------------
# Records (what the store returns)


class TaskRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    job_id: str
    name: str | None
    kind: str
    state: TaskState
    priority: int
    attempt: int
    max_attempts: int
    timeout_s: float | None
    labels: Labels
    depends_on: list[str]
    node_id: str | None
    lease_id: str | None
    reason: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    command: CommandSpec | None = None
    error: dict[str, Any] | None = None
    output: dict[str, Any] | None = None
    service: ServiceSpec | None = None
    restarts: int = 0
    select: str | None = None  # canonical text of its selector
    resources: dict[str, float] = Field(default_factory=dict)
    release: str | None = None
    # why a ready task is not running, when the coordinator knows (not stored)
    waiting_reason: str | None = None


class ServiceExit(BaseModel):
    """How a service's last run ended (kept with the service in the store)."""

    model_config = ConfigDict(frozen=True)

    reason: str
    exit_code: int | None = None
    at: float
    ran_s: float | None = None


class ServiceRecord(BaseModel):
    """A service as the store knows it: where it runs, how often it was restarted.

    ``started_at`` is the start of the current run; live health is not
    stored (the coordinator adds it from the agents' heartbeats).
    """

    model_config = ConfigDict(frozen=True)

    id: str
    name: str | None
    job_id: str
    state: TaskState
    node_id: str | None
    lease_id: str | None
    restarts: int
    started_at: float | None
    spec: ServiceSpec
    last_exit: ServiceExit | None = None
    restart_at: float | None = None  # the next run starts no earlier (crash-loop delay)


class AttemptRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    task_id: str
    attempt: int
    lease_id: str
    node_id: str
    leased_at: float
    started_at: float | None
    ended_at: float | None
    outcome: str | None
    reason: str | None
    error: dict[str, Any] | None = None
    phases: list[dict[str, Any]] | None = None


class NodeRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    state: NodeState
    provider: str
    labels: Labels
    slots: int
    host: str | None
    pid: int | None
    created_at: float
    last_seen: float | None
    reason: str | None  # the death reason once it is terminated or lost
    address: str | None = None  # where its provider put it: a pid, a host, an instance id
    deadline: float | None = None  # a requested/booting node not paired by then is replaced
    data: dict[str, Any] = Field(default_factory=dict)  # free-form, from ``--data``
    resources: dict[str, float] = Field(default_factory=dict)  # cpus, mem_gb, disk_gb, gpus
    paused: bool = False  # takes no new tasks (``herder pause``); kept across restarts


ROLES = ("read", "submit", "admin", "agent")


class TokenRecord(BaseModel):
    """An API token as stored: never its secret, only a digest of it."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str | None
    role: Literal["read", "submit", "admin", "agent"]
    digest: str
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


class EventRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    at: float
    action: str
    task_id: str | None = None
    node_id: str | None = None
    lease_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class JobSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    name: str | None
    created_at: float
    counts: dict[str, int]
    started_at: float | None = None  # when its first task was leased

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> bool:
        return all(TaskState(s).is_final for s, n in self.counts.items() if n)

    @property
    def failed(self) -> int:
        return self.counts.get(TaskState.FAILED, 0) + self.counts.get(TaskState.CANCELLED, 0)


def find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle among ``edges`` (node -> the nodes it depends on), or None.

    Iterative, so 100,000-task files with long chains do not hit the recursion
    limit; edges to names outside ``edges`` are ignored (checked elsewhere).
    The cycle is returned in order, first element repeated at the end.
    """
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(edges, white)
    for root in edges:
        if colour[root] != white:
            continue
        path: list[str] = [root]
        iters = [iter(edges[root])]
        colour[root] = grey
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                colour[path.pop()] = black
                iters.pop()
                continue
            state = colour.get(nxt)
            if state is None or state == black:
                continue
            if state == grey:
                return [*path[path.index(nxt) :], nxt]
            colour[nxt] = grey
            path.append(nxt)
            iters.append(iter(edges[nxt]))
    return None


class _GcPause:
    """Counts the threads inside :func:`gc_paused`; the last one out re-enables."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders = 0
        self.was_enabled = True


_gc_pause = _GcPause()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a big batch of records is built.

    Parsing or storing 100,000 tasks allocates millions of objects that all
    live on, so the collector runs again and again and finds nothing:
    measured, 3.3 s of a 3.9 s parse (0.56 s without). Nothing built here
    makes reference cycles. Nested and concurrent uses (a parse in one
    thread, a store write in another) keep it off until the last one ends.
    """
    with _gc_pause.lock:
        if _gc_pause.holders == 0:
            _gc_pause.was_enabled = gc.isenabled()
            gc.disable()
        _gc_pause.holders += 1
    try:
        yield
    finally:
        with _gc_pause.lock:
            _gc_pause.holders -= 1
            if _gc_pause.holders == 0 and _gc_pause.was_enabled:
                gc.enable()
