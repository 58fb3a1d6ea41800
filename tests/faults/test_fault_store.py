"""Case 11 of the fault suite: the store unavailable (its SQLite file locked by another
process).

While agents work through a backlog, another process holds the database's
write lock for twice the coordinator's busy timeout (10 s). Meanwhile
submissions are probed over HTTP: each is answered 200 or 503 with
``Retry-After``, never 500 (and some must meet the outage: 503), and the
coordinator never exits. Once the lock is
gone, the rate of committed results must be back to 90 % of what it was
before within 10 s (asserted at full size; recorded always).
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from herder.client import AsyncClient
from herder.model import new_id
from tests.faults.fault_checker import SubmissionLog, check
from tests.faults.fault_suite import (
    FULL,
    call_spec,
    fault_herd,
    record,
    size,
    submit,
    wait_settled,
)

# Well past the coordinator's 10 s busy timeout: writes queued behind the first fail too,
# so submissions meet the outage (a lock just over 10 s only delays them).
LOCK_S = 20.0
BUSY_TIMEOUT_S = 10.0  # herder.store.sql's PRAGMA busy_timeout
WINDOW_S = 2.0

HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def quick(i: int) -> int:
    time.sleep(0.005)
    return i


def succeeded(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM tasks WHERE state='succeeded'").fetchone()[0])
    finally:
        conn.close()


async def probe(
    env: dict[str, str], until: float, log: SubmissionLog
) -> list[tuple[int, str, float]]:
    """POST one task every 0.25 s until ``until``; (status, Retry-After, seconds) of each."""
    client = await AsyncClient.open(env=env)
    answers: list[tuple[int, str, float]] = []

    async def one() -> None:
        spec = call_spec(quick, -1)
        body = {"job_id": new_id("j"), "tasks": [spec.model_dump(mode="json")]}
        log.sent(spec.id)
        sent = time.monotonic()
        response = await client.http.post("/v1/tasks", json=body, timeout=30)
        waited = time.monotonic() - sent
        answers.append((response.status_code, response.headers.get("retry-after", ""), waited))
        if response.status_code == 200:
            log.acked([spec.id])

    try:
        pending = []
        while time.monotonic() < until:
            pending.append(asyncio.create_task(one()))
            await asyncio.sleep(0.25)
        await asyncio.gather(*pending)
    finally:
        await client.close()
    return answers


def rate_series(samples: list[tuple[float, int]], start: float, end: float) -> float:
    """Committed results per second between ``start`` and ``end`` (from the samples)."""
    inside = [(t, n) for t, n in samples if start <= t <= end]
    if len(inside) < 2 or inside[-1][0] == inside[0][0]:
        return 0.0
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def test_a_locked_store_gives_503_never_500_and_throughput_returns(tmp_path: Path) -> None:
    log = SubmissionLog()
    db = tmp_path / "herd.db"
    herd = fault_herd(tmp_path, 2, 2)
    herd.start()
    try:
        herd.wait_nodes()
        backlog = [call_spec(quick, i) for i in range(size(2_500, 30_000))]
        submit(herd.env(), [backlog[i : i + 2_000] for i in range(0, len(backlog), 2_000)], log)
        samples: list[tuple[float, int]] = []

        def sample_for(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                samples.append((time.monotonic(), succeeded(db)))
                time.sleep(0.25)

        sample_for(4.0)
        locked_at = time.monotonic()
        with subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(db), str(LOCK_S)], stdout=subprocess.PIPE
        ) as holder:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == b"locked"
            answers = asyncio.run(probe(herd.env(), time.monotonic() + LOCK_S - 1, log))
            holder.wait(60)
        released_at = time.monotonic()
        sample_for(size(6.0, 10.0))
        alive = herd.process is not None and herd.process.poll() is None
        wait_settled(db, log.acknowledged, timeout=size(300, 900))
    finally:
        herd.stop()
    before = rate_series(samples, locked_at - 4.0, locked_at)
    back_after = next(
        (
            round(t - released_at, 1)
            for t, _ in samples
            if released_at <= t <= released_at + 10
            and rate_series(samples, t, t + WINDOW_S) >= 0.9 * before
        ),
        None,
    )
    statuses = sorted({status for status, _, _ in answers})
    slowest = max(waited for _, _, waited in answers)
    verdict = check(db, log, tmp_path / "exec.log")
    record(
        "11-store-locked",
        f"SQLite file locked by another process for {LOCK_S:.0f} s",
        None,
        verdict,
        faults=1,
        statuses=statuses,
        answers_503_without_retry_after=sum(1 for s, r, _ in answers if s == 503 and not r),
        slowest_answer_s=round(slowest, 2),
        rate_before_per_s=round(before),
        rates_after_per_s=[
            round(rate_series(samples, released_at + k, released_at + k + WINDOW_S))
            for k in range(0, int(size(6, 10)), 2)
        ],
        back_to_90pct_after_s=back_after,
    )
    assert alive, "the coordinator exited"
    assert 500 not in statuses, f"answers: {answers}"
    assert all(s in (200, 503) for s in statuses), f"answers: {answers}"
    assert all(r for s, r, _ in answers if s == 503), "a 503 without Retry-After"
    # none waits past the first failed transaction (the busy timeout), not a second one
    assert slowest <= BUSY_TIMEOUT_S + 2.0, f"an answer took {slowest:.1f}s"
    assert 503 in statuses, f"no submission met the outage: {answers}"
    assert verdict.ok, f"{verdict}"
    if FULL:  # on a small run (a busy shared machine) the rates are too noisy to judge
        assert back_after is not None, "throughput not back to 90 % within 10 s"
