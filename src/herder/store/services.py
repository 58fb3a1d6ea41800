"""Service tasks in the store: the shape of the ``service`` column and the restart step.

A service is a command task that is kept running. Whenever a run ends (the
program exits, with any code; the agent kills it as unhealthy or past its
timeout; its node is lost; a draining or interrupted agent hands it back)
the task goes back to ``ready`` with ``restarts`` + 1 and its attempt not
charged: ``max_attempts`` does not apply. Only a cancel ends it. Each run
keeps its row in ``attempts``, and a ``service_restarted`` event says why.

The column holds the settings and the restart bookkeeping together::

    {"spec": {...ServiceSpec...},
     "backoff_s": 2.0,        # the crash-loop delay applied before the current run
     "restart_at": 1712.5,    # wall clock: the next run starts no earlier
     "last_exit": {"reason": "exit code", "exit_code": 3, "at": ..., "ran_s": 0.5}}

Why the delay rides the assignment rather than the claim: the ready index
(``ix_tasks_ready``) gives the head of the queue in priority order; a
``restart_at <= now`` condition in the claim would make the database walk
past every waiting service for every claim, or need a second index kept in
step. Instead a restarted service is ready at once and claimed as any task;
the claim hands the node what is left of its delay (``start_delay_s``) and
the agent waits in the slot before starting it. The slot is held meanwhile,
which is the point: a crash-looping service occupies its place, it does not
spin through the queue. Only exits reported by the agent (the program's own
doing) grow the delay; a lost node or a hand-back restarts it without one.
Nothing here does I/O: :mod:`herder.store.sql` runs the statements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from herder.model import (
    Reason,
    ServiceExit,
    ServiceRecord,
    ServiceSpec,
    TaskState,
    restart_backoff,
)

_REASON_WIDTH = 256


def service_column(spec: ServiceSpec | None) -> dict[str, Any] | None:
    """The column's value for a new task (None: not a service)."""
    if spec is None:
        return None
    return {"spec": spec.model_dump(exclude_defaults=True), "backoff_s": 0.0}


def spec_of(column: dict[str, Any]) -> ServiceSpec:
    return ServiceSpec.model_validate(column.get("spec") or {})


def start_delay(column: dict[str, Any] | None, now: float) -> float:
    """What is left, at a claim at ``now``, of the service's crash-loop delay."""
    if not column:
        return 0.0
    restart_at = column.get("restart_at")
    return 0.0 if restart_at is None else max(0.0, float(restart_at) - now)


@dataclass(frozen=True)
class Restart:
    """One service run that ended, to be sent back to ``ready``."""

    task_id: str
    lease_id: str
    node_id: str | None
    column: dict[str, Any]  # the new value of the service column
    restarts: int  # the count after this restart
    delay_s: float
    exit: ServiceExit

    def params(self) -> dict[str, Any]:
        """Bind parameters of ``HotStatements.restart``."""
        return {"tid": self.task_id, "lid": self.lease_id, "svc": self.column}

    def event(self) -> tuple[str, str | None, str | None, str | None, dict[str, Any]]:
        data = {
            "reason": self.exit.reason,
            "exit_code": self.exit.exit_code,
            "restarts": self.restarts,
            "delay_s": self.delay_s,
            "ran_s": self.exit.ran_s,
        }
        return ("service_restarted", self.task_id, self.node_id, self.lease_id, data)


def restart(
    row: Any,
    *,
    reason: str,
    now: float,
    exit_code: int | None = None,
    ran_s: float | None = None,
    backoff: bool = False,
) -> Restart:
    """The restart of ``row`` (a lease row with ``service`` and ``restarts``).

    ``backoff``: the program ended on its own (or was killed for its own
    fault), so a short run grows the delay before the next one. Otherwise
    (node lost, handed back) the delay already decided is kept, no more.
    """
    column = dict(row.service)
    end = ServiceExit(reason=_clip(reason), exit_code=exit_code, at=now, ran_s=ran_s)
    delay = 0.0
    if backoff:
        delay = restart_backoff(float(column.get("backoff_s") or 0.0), ran_s or 0.0)
        column["backoff_s"] = delay
        column["restart_at"] = now + delay
    column["last_exit"] = end.model_dump()
    return Restart(
        task_id=row.id,
        lease_id=row.lease_id,
        node_id=row.node_id,
        column=column,
        restarts=(row.restarts or 0) + 1,
        delay_s=delay,
        exit=end,
    )


def result_restart(row: Any, result: Any, now: float) -> Restart:
    """The restart after an agent reported the end of a run (``result``: a TaskResult)."""
    output = result.output or {}
    code = output.get("returncode")
    if result.reason:
        reason = result.reason
    elif result.state is TaskState.SUCCEEDED:
        reason = Reason.EXITED
    else:
        reason = result.state.value
    started = result.started_at or row.started_at or row.leased_at or now
    ended = result.ended_at or now
    return restart(
        row,
        reason=reason,
        now=now,
        exit_code=code if isinstance(code, int) else None,
        ran_s=max(0.0, ended - started),
        backoff=True,
    )


def service_record(row: Any) -> ServiceRecord:
    column: dict[str, Any] = row.service
    last = column.get("last_exit")
    return ServiceRecord(
        id=row.id,
        name=row.name,
        job_id=row.job_id,
        state=TaskState(row.state),
        node_id=row.node_id,
        lease_id=row.lease_id,
        restarts=row.restarts or 0,
        started_at=row.started_at,
        spec=spec_of(column),
        last_exit=ServiceExit.model_validate(last) if last else None,
        restart_at=column.get("restart_at"),
    )


def _clip(text: str) -> str:
    return text if len(text) <= _REASON_WIDTH else text[: _REASON_WIDTH - 3] + "..."
