"""Support for the replayable fault cases: seeds, the nemesis, the workload, the results.

- **Size**: ``HERDER_FAULTS_FULL=1`` (``make faults``) runs each case at the
  issue's full size; otherwise a small size that keeps ``make test`` fast.
- **Seed**: every case draws its fault schedule from ``random.Random(seed)``;
  the seed is printed and recorded, and ``HERDER_FAULT_SEED=N`` replays it.
- **Results**: with ``HERDER_FAULTS_RESULTS=DIR`` each case writes one JSON row
  there, which ``tests/faults/render_faults.py`` turns into FAULTS.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cloudpickle

from herder import security
from herder.client import AsyncClient
from herder.local import LocalHerd
from herder.model import TaskSpec, new_id
from tests.faults.fault_checker import Store, SubmissionLog, Verdict, store_rows

FULL = os.environ.get("HERDER_FAULTS_FULL") == "1"
TERMINAL = ("succeeded", "failed", "cancelled")


N = TypeVar("N", int, float)


def size(small: N, full: N) -> N:
    """The case's size for this run."""
    return full if FULL else small


def fault_seed(case: str) -> int:
    """The seed of this run: ``HERDER_FAULT_SEED`` to replay one, else a fresh one (printed)."""
    given = os.environ.get("HERDER_FAULT_SEED")
    seed = int(given) if given else random.SystemRandom().randrange(2**32)
    print(f"[{case}] fault seed {seed} (replay: HERDER_FAULT_SEED={seed})")
    return seed


@dataclass(frozen=True)
class Fault:
    """One planned fault: at ``offset_s`` into the run, ``action`` on the ``pick``-th target."""

    offset_s: float
    action: str
    pick: float  # in [0, 1): which of the live targets, whatever their pids are this time


def schedule(
    seed: int, actions: Sequence[str], count: int, every_s: float, jitter: float = 0.5
) -> list[Fault]:
    """``count`` faults about ``every_s`` apart; the same seed gives the same list."""
    rng = random.Random(seed)
    at = 0.0
    out = []
    for _ in range(count):
        at += every_s * rng.uniform(1 - jitter, 1 + jitter)
        out.append(Fault(round(at, 3), rng.choice(list(actions)), rng.random()))
    return out


@dataclass
class Nemesis:
    """Runs a fault schedule in a thread; ``done`` is set when it ends or is told to stop.

    Each action gets the fault's ``pick`` and returns what it hit (for the log),
    or None when there was nothing to hit (then it counts as not injected).
    """

    faults: list[Fault]
    actions: Mapping[str, Callable[[float], str | None]]
    injected: list[tuple[float, str, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        start = time.monotonic()
        for fault in self.faults:
            if self.stop.wait(max(0.0, start + fault.offset_s - time.monotonic())):
                return
            hit = self.actions[fault.action](fault.pick)
            if hit is not None:
                self.injected.append((time.time(), fault.action, hit))

    @contextmanager
    def running(self) -> Iterator[Nemesis]:
        thread = threading.Thread(target=self._run, name="nemesis", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            thread.join(30)


def pick_from(items: Sequence[Any], pick: float) -> Any:
    """The ``pick``-th of ``items`` (sorted by the caller), or None when there are none."""
    return items[int(pick * len(items))] if items else None


def fault_herd(
    home: Path,
    nodes: int,
    slots: int,
    *,
    listen: str = "127.0.0.1:0",
    store: str | None = None,
    **env: str,
) -> LocalHerd:
    """A LocalHerd whose agents append to ``home/exec.log`` (its store ``home/herd.db``
    unless ``store`` names another)."""
    return LocalHerd(
        nodes=nodes,
        slots=slots,
        home=home,
        listen=listen,
        store=store,
        env={**os.environ, "HERDER_EXEC_LOG": str(home / "exec.log"), **env},
    )


def join_token(home: Path, url: str) -> str:
    """A join token for an agent started by hand (through a proxy, in a namespace) at ``url``."""
    return security.JoinToken(
        security.load_secret(home / "secret"),
        security.ca_fingerprint((home / "tls" / "ca.pem").read_bytes()),
        url,
    ).encode()


def call_spec(fn: Callable[..., Any], *args: Any, depends_on: list[str] | None = None,
              retries: int = 2) -> TaskSpec:  # fmt: skip
    return TaskSpec(
        id=new_id("t"),
        kind="call",
        name=getattr(fn, "__name__", None),
        payload=cloudpickle.dumps((fn, args, {})),
        depends_on=depends_on or [],
        max_attempts=retries + 1,
    )


async def _submit(
    env: dict[str, str], batches: list[list[TaskSpec]], log: SubmissionLog, job: str, pause_s: float
) -> None:
    client = await AsyncClient.open(env=env)
    try:
        for i, batch in enumerate(batches):
            if i and pause_s:
                await asyncio.sleep(pause_s)
            for spec in batch:
                log.sent(spec.id, spec.depends_on)
            await client.submit_batch(job, "faults", batch)
            log.acked([spec.id for spec in batch])
    finally:
        await client.close()


def submit(
    env: dict[str, str],
    batches: list[list[TaskSpec]],
    log: SubmissionLog,
    job: str = "",
    pause_s: float = 0.0,
) -> None:
    """Submit ``batches`` in order as one job, each batch one transaction (``pause_s``
    apart); ``log`` records what was acknowledged."""
    asyncio.run(_submit(env, batches, log, job or new_id("j"), pause_s))


def count_settled(db: Store, ids: Sequence[str]) -> int:
    """How many of ``ids`` reached a final state (read from the store itself)."""
    final = ", ".join(f"'{state}'" for state in TERMINAL)
    want = set(ids)
    rows = store_rows(db, f"SELECT id FROM tasks WHERE state IN ({final})")
    return sum(1 for (tid,) in rows if tid in want)


def wait_settled(db: Store, ids: Sequence[str], timeout: float) -> float:
    """Wait until every id is final; returns when (``time.monotonic``). Fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        done = count_settled(db, ids)
        if done == len(ids):
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"only {done} of {len(ids)} tasks finished within {timeout}s")
        time.sleep(0.2)


def record(
    case: str, title: str, seed: int | None, verdict: Verdict | None, **figures: Any
) -> None:
    """One row for FAULTS.md (when ``HERDER_FAULTS_RESULTS`` names a directory)."""
    where = os.environ.get("HERDER_FAULTS_RESULTS")
    row = {
        "case": case,
        "title": title,
        "size": "full" if FULL else "small",
        "seed": seed,
        **(verdict.row() if verdict is not None else {}),
        **figures,
    }
    print(f"[{case}] {json.dumps(row)}")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        (Path(where) / f"{case}.json").write_text(json.dumps(row, indent=1) + "\n")
