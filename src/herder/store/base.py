"""The Store interface: the only persistent state of herder.

Every operation that changes state is one transaction, and takes a batch:
one commit for many submissions, claims or results. A method returns only
after its transaction is committed, so whatever the caller acknowledges is
durable. Values crossing this interface are plain dataclasses of
:mod:`herder.model` words; pickled payloads are opaque ``bytes``.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from herder.errors import InvalidTransition, SubmissionError
from herder.model import (
    AttemptRecord,
    CommandSpec,
    EventRecord,
    JobSummary,
    NodeRecord,
    NodeState,
    ServiceRecord,
    ServiceSpec,
    TaskRecord,
    TaskSpec,
    TaskState,
    TokenRecord,
)


@dataclass(frozen=True)
class Claimed:
    """A task leased to a node, with what it needs to run."""

    task_id: str
    lease_id: str
    attempt: int
    kind: str
    payload: bytes | None
    command: CommandSpec | None
    timeout_s: float | None
    dep_results: dict[str, bytes]
    job_id: str = ""
    name: str | None = None
    service: ServiceSpec | None = None
    # A service restarted after a short run waits this long on its node
    # before starting (its crash-loop delay, what is left of it at the claim).
    start_delay_s: float = 0.0
    ckey: str = ""  # its placement key: the coordinator counts the resources it holds
    created_at: float = 0.0  # when it was submitted (dispatch latency)
    release: str | None = None  # the release whose environment it runs in


@dataclass
class Sample:
    """One telemetry point of a node (``task_id`` "") or of a task running there."""

    node_id: str
    task_id: str
    resolution: int  # seconds
    at: float  # the start of its interval (whole seconds or minutes)
    data: dict[str, float]


@dataclass(frozen=True)
class Submission:
    """One batch of tasks for one job, stored all or nothing."""

    job_id: str
    job_name: str | None
    specs: list[TaskSpec]
    owner: str | None = None  # the API token submitting it (None: the cluster secret)


@dataclass(frozen=True)
class ClaimRequest:
    """Lease up to ``limit`` ready tasks whose constraint key is in ``constraint_keys``."""

    node_id: str
    constraint_keys: list[str]
    limit: int
    # What the node has free now, when some of ``constraint_keys`` need
    # resources: the claim then takes only tasks that fit in it together.
    free: dict[str, float] | None = None


@dataclass(frozen=True)
class TaskResult:
    """What an agent reports for one lease."""

    task_id: str
    lease_id: str
    state: TaskState  # succeeded, failed or cancelled as seen by the agent
    reason: str | None = None
    result: bytes | None = None
    error: dict[str, Any] | None = None
    error_pickle: bytes | None = None
    output: dict[str, Any] | None = None
    started_at: float | None = None
    ended_at: float | None = None


@dataclass(frozen=True)
class Final:
    """A task that reached a final state in a transaction (to tell its watchers)."""

    task_id: str
    state: TaskState
    reason: str | None = None
    result: bytes | None = None
    error: dict[str, Any] | None = None
    error_pickle: bytes | None = None
    output: dict[str, Any] | None = None


@dataclass
class Changes:
    """What one transaction did, for the service to act on after commit."""

    finals: list[Final] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)  # lease ids
    refused: list[str] = field(default_factory=list)  # lease ids
    requeued: list[str] = field(default_factory=list)  # task ids back to ready
    newly_ready: int = 0
    cancel_leases: list[tuple[str, str]] = field(default_factory=list)  # (node_id, lease_id)


class Store(abc.ABC):
    """The durable queue, nodes and events. Implementations: :mod:`herder.store.sql`."""

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    # --- tasks ---------------------------------------------------------

    @abc.abstractmethod
    async def submit(
        self, job_id: str, job_name: str | None, specs: list[TaskSpec], now: float
    ) -> Changes:
        """Store a batch atomically, or raise SubmissionError and store nothing.

        A batch whose ids are all stored already is a retry and changes nothing.
        """

    @abc.abstractmethod
    async def claim(
        self, node_id: str, constraint_keys: list[str], limit: int, now: float
    ) -> list[Claimed]:
        """Lease up to ``limit`` ready tasks, highest priority first, oldest first."""

    @abc.abstractmethod
    async def cycle(
        self,
        *,
        submissions: Sequence[Submission] = (),
        started: Sequence[tuple[str, str]] = (),
        released: Sequence[tuple[str, str]] = (),
        results: Sequence[TaskResult] = (),
        claims: Sequence[ClaimRequest] = (),
        now: float,
    ) -> tuple[Changes, dict[str, list[Claimed]], list[SubmissionError | None]]:
        """Submissions, started, released and finished leases, then claims: one transaction.

        Returns what changed, the claims per node, and per submission its error or None.
        """

    @abc.abstractmethod
    async def ready_constraint_keys(self) -> list[str]:
        """The distinct placement constraints among ready tasks ('' included if any)."""

    @abc.abstractmethod
    async def count_ready(self, constraint_keys: list[str], limit: int) -> int:
        """Ready tasks under these constraint keys, counted up to ``limit`` (cheap)."""

    @abc.abstractmethod
    async def mark_running(self, leases: list[tuple[str, str]], now: float) -> None:
        """``(task_id, lease_id)`` pairs whose tasks have started; stale ones are ignored."""

    @abc.abstractmethod
    async def complete(self, results: list[TaskResult], now: float) -> Changes:
        """Record results; a result whose lease is not current is refused, not recorded."""

    @abc.abstractmethod
    async def requeue_node(
        self, node_id: str, reason: str, now: float, keep: Collection[str] = ()
    ) -> Changes:
        """Return the node's leases (but ``keep``) to the queue, or fail them when spent.

        The attempt stays charged: a task that keeps killing its nodes runs out.
        A service is restarted instead (not charged, ``restarts`` + 1).
        """

    @abc.abstractmethod
    async def release_leases(self, leases: list[tuple[str, str]], now: float) -> Changes:
        """Hand back leases without charging an attempt (tasks that never started,
        or killed for a spot interruption); a service that was running counts a restart."""

    @abc.abstractmethod
    async def adopt(self, node_id: str, leases: list[tuple[str, str]]) -> list[str]:
        """After a reconnect: keep the node's leases that are still current; returns them."""

    @abc.abstractmethod
    async def leases_of(self, node_id: str) -> list[tuple[str, str]]:
        """``(task_id, lease_id)`` of the node's leased and running tasks."""

    @abc.abstractmethod
    async def cancel(self, task_ids: list[str] | None, job_id: str | None, now: float) -> Changes:
        """Cancel tasks (and fail their dependents); running ones are listed to be killed."""

    # --- queries -------------------------------------------------------

    @abc.abstractmethod
    async def task(self, task_id: str) -> TaskRecord | None: ...

    @abc.abstractmethod
    async def tasks(
        self,
        *,
        states: Sequence[TaskState] | None = None,
        job_id: str | None = None,
        node_id: str | None = None,
        name: str | None = None,
        limit: int = 100,
        after: str | None = None,
        descending: bool = False,
    ) -> list[TaskRecord]:
        """A page of tasks in submission order (``descending``: newest first).

        ``states`` (None: all), ``job_id``, ``node_id`` and ``name`` (a glob)
        filter; the next page starts ``after`` the last task id of this one
        (keyset paging: as fast on the millionth page as on the first).
        """

    @abc.abstractmethod
    async def timeline(
        self, *, job_id: str | None = None, since: float | None = None, limit: int = 5000
    ) -> list[dict[str, Any]]:
        """Attempts that started (at or after ``since``), oldest first: for a task stream."""

    @abc.abstractmethod
    async def job_owners(self, task_ids: list[str] | None, job_id: str | None) -> set[str | None]:
        """Who submitted the jobs of these tasks (or this job): token ids, None for admins."""

    # --- API tokens ------------------------------------------------------

    @abc.abstractmethod
    async def add_token(self, token: TokenRecord) -> None: ...

    @abc.abstractmethod
    async def tokens(self) -> list[TokenRecord]: ...

    @abc.abstractmethod
    async def revoke_token(self, token_id: str, now: float) -> TokenRecord | None:
        """Revoke (idempotent); None when there is no such token."""

    # --- telemetry -------------------------------------------------------

    @abc.abstractmethod
    async def add_samples(self, samples: list[Sample]) -> None:
        """Store telemetry samples (one transaction; a repeated key keeps the last)."""

    @abc.abstractmethod
    async def roll_up_samples(
        self, *, fine_before: float, coarse_before: float, resolution: int
    ) -> int:
        """Average fine samples older than ``fine_before`` into ``resolution``-second
        ones, and drop those older than ``coarse_before``; how many fine ones went."""

    @abc.abstractmethod
    async def samples(
        self, node_id: str | None, since: float, resolution: int, *, task_id: str = ""
    ) -> list[Sample]:
        """A series (every node's, when ``node_id`` is None) since ``since``, oldest first."""

    @abc.abstractmethod
    async def attempts(self, task_id: str) -> list[AttemptRecord]: ...

    @abc.abstractmethod
    async def finals(self, task_ids: list[str]) -> list[Final]:
        """The final outcomes among ``task_ids`` (for a client that watches them)."""

    @abc.abstractmethod
    async def services(self, *, ended: bool = False) -> list[ServiceRecord]:
        """Service tasks still kept running (``ended``: the cancelled ones too)."""

    @abc.abstractmethod
    async def job(self, job_id: str) -> JobSummary | None: ...

    @abc.abstractmethod
    async def jobs(self, limit: int = 100) -> list[JobSummary]: ...

    @abc.abstractmethod
    async def counts(self) -> dict[str, int]: ...

    @abc.abstractmethod
    async def finished_since(self, since: float) -> int:
        """How many tasks finished at or after ``since`` (for throughput)."""

    @abc.abstractmethod
    async def release_users(self, release_id: str) -> dict[str, int]:
        """Tasks not yet finished that run in ``release_id``, counted by state."""

    # --- nodes and events ----------------------------------------------

    @abc.abstractmethod
    async def upsert_node(self, node: NodeRecord) -> None: ...

    @abc.abstractmethod
    async def add_nodes(self, nodes: list[NodeRecord]) -> None:
        """Record nodes about to be asked of a provider (before the call)."""

    @abc.abstractmethod
    async def set_node_state(
        self,
        node_id: str,
        state: NodeState,
        reason: str | None,
        now: float,
        *,
        address: str | None = None,
    ) -> NodeRecord | None:
        """Move a node, recording an event; an illegal move raises InvalidTransition."""

    @abc.abstractmethod
    async def set_node_states(
        self, moves: list[tuple[str, NodeState, str | None, str | None]], now: float
    ) -> tuple[list[NodeRecord], list[InvalidTransition]]:
        """Move many nodes in one transaction; illegal moves are returned, not made."""

    @abc.abstractmethod
    async def set_node_paused(self, node_id: str, paused: bool, now: float) -> bool:
        """Pause or resume a node; False if there is no such node."""

    @abc.abstractmethod
    async def get_meta(self, key: str) -> str | None:
        """A small setting kept with the store (the fleet's target, say)."""

    @abc.abstractmethod
    async def set_meta(self, key: str, value: str) -> None: ...

    @abc.abstractmethod
    async def latest_event_id(self) -> int: ...

    @abc.abstractmethod
    async def cluster_id(self) -> str:
        """The herd's id, made once with the store."""

    @abc.abstractmethod
    async def node(self, node_id: str) -> NodeRecord | None: ...

    @abc.abstractmethod
    async def nodes(self, *, alive_only: bool = False) -> list[NodeRecord]: ...

    @abc.abstractmethod
    async def add_event(
        self,
        action: str,
        now: float,
        *,
        task_id: str | None = None,
        node_id: str | None = None,
        lease_id: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None: ...

    @abc.abstractmethod
    async def events(
        self, *, after: int = 0, task_id: str | None = None, limit: int = 100
    ) -> list[EventRecord]: ...
