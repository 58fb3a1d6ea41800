"""Case 5 of the fault suite: the commit succeeded but the acknowledgement was lost.

A :class:`CuttingProxy` sits between a peer and the coordinator and, on a
seeded schedule, drops the coordinator's answer to a request and cuts the
connection. On the client's side the answer is the ``Submitted`` of a
submission (the client resends it with the same task ids); on the agent's,
the ``Ack`` of a result (the agent resends it under the same lease id).
Either way the store must hold each task once and each result once.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from herder.client import AsyncClient
from herder.local import LocalHerd
from herder.model import new_id
from tests.faults.fault_checker import SubmissionLog, check
from tests.faults.fault_proxy import CuttingProxy
from tests.faults.fault_suite import (
    FULL,
    call_spec,
    fault_herd,
    fault_seed,
    join_token,
    record,
    size,
    submit,
    wait_settled,
)
from tests.helpers import wait_for


def tiny(i: int) -> int:
    time.sleep(0.005)
    return i


def port_of(herd: LocalHerd) -> int:
    port = urlsplit(herd.url).port
    assert port is not None
    return port


async def submit_through(
    proxy: CuttingProxy, env: dict[str, str], log: SubmissionLog, cuts: int
) -> int:
    """Submissions of one to three tasks, each awaited until acknowledged, until the proxy
    cut ``cuts`` answers (for at most a second a cut); returns how many were made."""
    client = await AsyncClient.open(f"https://127.0.0.1:{proxy.port}", env=env)
    i = 0
    deadline = time.monotonic() + 10 + cuts
    try:
        job = new_id("j")
        while proxy.cuts < cuts and time.monotonic() < deadline:
            i += 1
            batch = [call_spec(tiny, i) for _ in range(1 + i % 3)]
            for spec in batch:
                log.sent(spec.id)
            await asyncio.wait_for(client.submit_batch(job, "acks", batch), 90)
            log.acked([spec.id for spec in batch])
    finally:
        await client.close()
    return i


def test_lost_submission_acks_make_no_duplicate_tasks(tmp_path: Path) -> None:
    seed = fault_seed("acks-submit")
    cuts = size(8, 1_000)
    log = SubmissionLog()
    herd = fault_herd(tmp_path, 1, 2)
    herd.start()
    try:
        herd.wait_nodes()
        proxy = CuttingProxy(port_of(herd), seed, p=0.5, max_cuts=cuts)
        started = time.monotonic()
        with proxy.running():
            submissions = asyncio.run(submit_through(proxy, herd.env(), log, cuts))
        wall = time.monotonic() - started
        wait_settled(tmp_path / "herd.db", log.acknowledged, timeout=120)
    finally:
        herd.stop()
    verdict = check(tmp_path / "herd.db", log, tmp_path / "exec.log")
    record(
        "5a-acks-submit",
        "submission committed, acknowledgement lost",
        seed,
        verdict,
        faults=proxy.cuts,
        submissions=submissions,
        wall_s=round(wall, 1),
    )
    assert verdict.ok, f"seed {seed}: {verdict}"
    assert proxy.cuts == cuts, f"seed {seed}: only {proxy.cuts} answers were cut"


def test_lost_result_acks_make_no_duplicate_results(tmp_path: Path) -> None:
    seed = fault_seed("acks-result")
    cuts = size(15, 1_000)
    log = SubmissionLog()
    herd = LocalHerd(nodes=0, home=tmp_path)
    herd.start()
    proxy = CuttingProxy(port_of(herd), seed, p=0.3, max_cuts=cuts)
    try:
        with proxy.running():
            join = join_token(tmp_path, f"https://127.0.0.1:{proxy.port}")
            env = {**herd.env(), "HERDER_JOIN": join}
            agent_env = {**env, "HERDER_EXEC_LOG": str(tmp_path / "exec.log")}
            with (
                open(tmp_path / "agent.log", "wb") as agent_log,
                subprocess.Popen(
                    [sys.executable, "-m", "herder", "agent", "--slots", "2"],
                    env=agent_env,
                    stdout=agent_log,
                    stderr=agent_log,
                ) as agent,
            ):
                try:
                    herd.wait_nodes(1)
                    started = time.monotonic()
                    # rounds of work until the proxy has cut its share of result acks
                    # (results share ack frames, so tasks per cut vary): bounded both ways
                    for _ in range(size(3, 200)):
                        n = size(100, 1_000)
                        specs = [call_spec(tiny, i) for i in range(n)]
                        submit(herd.env(), [specs[i : i + 20] for i in range(0, n, 20)], log)
                        wait_settled(tmp_path / "herd.db", log.acknowledged, timeout=180)
                        if proxy.cuts >= cuts or time.monotonic() - started > size(60, 1500):
                            break
                    wall = time.monotonic() - started
                    wait_for(lambda: proxy.cuts >= 1, 5, "an answer to be cut")
                finally:
                    agent.terminate()
                    try:
                        agent.wait(30)
                    except subprocess.TimeoutExpired:
                        agent.kill()
                        agent.wait()
    finally:
        herd.stop()
    verdict = check(tmp_path / "herd.db", log, tmp_path / "exec.log")
    record(
        "5b-acks-result",
        "result committed, acknowledgement lost",
        seed,
        verdict,
        faults=proxy.cuts,
        wall_s=round(wall, 1),
    )
    assert verdict.ok, f"seed {seed}: {verdict}"
    assert os.path.getsize(tmp_path / "exec.log") > 0
    if FULL:
        assert proxy.cuts >= cuts, f"seed {seed}: only {proxy.cuts} result acks were cut"
