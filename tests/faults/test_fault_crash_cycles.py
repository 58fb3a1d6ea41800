"""Case 4 of the fault suite: power loss, kill -9 of the coordinator mid-write, many cycles.

Each cycle starts a coordinator on the same SQLite store, submits batches
from a client, and kills it -9 at a seeded moment. Then it drops every write
the coordinator had not synced, as a power loss would: the coordinator runs
with ``unsynced.c`` preloaded, which keeps a copy of each store file as of its
last ``fsync``/``fdatasync``, and the test puts those copies back (a file never
synced is removed). The store must then pass ``PRAGMA integrity_check`` and
hold every acknowledged submission. herder opens SQLite with WAL and
``synchronous=FULL`` (herder.store.sql), so a commit returns only after its
WAL frames are synced; what the drop takes is only what was never
acknowledged.

The model is per file: each file goes back to its own last sync, the most
pessimistic state a disk that keeps synced data can be left in. It does not
tear writes inside a sync (SQLite's WAL checksums are for that) and treats an
unlink as durable at once (SQLite unlinks the WAL only on a clean close).
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from herder.local import LocalHerd
from tests.faults.fault_checker import SubmissionLog
from tests.faults.fault_suite import call_spec, fault_seed, record, size, submit
from tests.helpers import free_port

STORE_FILES = ("herd.db", "herd.db-wal")


def nothing() -> None:
    """Never run: the herd has no agents; only the submissions matter here."""


@pytest.fixture(scope="module")
def unsynced_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``unsynced.c`` built as a shared object (a C compiler is needed: CI installs one)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        if os.environ.get("HERDER_REQUIRE_CC") == "1":
            pytest.fail("a C compiler is required (HERDER_REQUIRE_CC=1) but there is none")
        pytest.skip("no C compiler to build the unsynced-writes shim")
    out = tmp_path_factory.mktemp("shim") / "unsynced.so"
    source = Path(__file__).with_name("unsynced.c")
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(source), "-ldl"], check=True)
    return out


def drop_unsynced(home: Path) -> int:
    """Put each store file back to its last synced content; the bytes that were dropped."""
    dropped = 0
    for name in STORE_FILES:
        live, synced = home / name, home / f"{name}.durable"
        now = live.read_bytes() if live.exists() else b""
        kept = synced.read_bytes() if synced.exists() else b""
        dropped += abs(len(now) - len(kept)) + sum(a != b for a, b in zip(now, kept, strict=False))
        if synced.exists():
            shutil.copyfile(synced, live)
        else:
            live.unlink(missing_ok=True)
    (home / "herd.db-shm").unlink(missing_ok=True)  # shared memory: gone with the power
    return dropped


def mark_synced(home: Path) -> None:
    """Take the store files as they are now as synced: the check's own connection closed
    cleanly (a checkpoint, synced, and the WAL removed), outside the shim's sight."""
    for name in STORE_FILES:
        live, synced = home / name, home / f"{name}.durable"
        if live.exists():
            shutil.copyfile(live, synced)
        else:
            synced.unlink(missing_ok=True)


def store_state(db: Path) -> tuple[str, set[str]]:
    conn = sqlite3.connect(db, timeout=30)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        ids = {tid for (tid,) in conn.execute("SELECT id FROM tasks")}
    finally:
        conn.close()
    return str(integrity), ids


WRITER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("PRAGMA synchronous=FULL")
conn.execute("CREATE TABLE t (x INTEGER)")
conn.execute("PRAGMA synchronous=" + sys.argv[2])
for i in range(100000):
    conn.execute("INSERT INTO t VALUES (?)", (i,))
    print(i, flush=True)  # acknowledged: the commit returned
"""


@pytest.mark.parametrize(("synchronous", "loses"), [("OFF", True), ("FULL", False)])
def test_the_shim_drops_what_was_not_synced(
    tmp_path: Path, unsynced_shim: Path, synchronous: str, loses: bool
) -> None:
    """The harness bites: with syncing off the drop loses acknowledged rows, with FULL none."""
    db = tmp_path / "herd.db"
    env = {**os.environ, "LD_PRELOAD": str(unsynced_shim), "HERDER_UNSYNCED_WATCH": str(db)}
    argv = [sys.executable, "-c", WRITER, str(db), synchronous]
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True) as writer:
        assert writer.stdout is not None
        acknowledged = -1
        for line in writer.stdout:
            acknowledged = int(line)
            if acknowledged == 2000:
                break
        writer.kill()
    dropped = drop_unsynced(tmp_path)
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT count(*) FROM t").fetchone()[0]
    finally:
        conn.close()
    if loses:
        assert dropped > 0
        assert rows < acknowledged + 1
    else:
        assert rows >= acknowledged + 1


def test_power_loss_cycles_keep_every_acknowledged_write(
    tmp_path: Path, unsynced_shim: Path
) -> None:
    seed = fault_seed("power-loss")
    rng = random.Random(seed)
    cycles = size(3, 50)
    listen = f"127.0.0.1:{free_port()}"  # the same address each time: the client reconnects
    env = {
        **os.environ,
        "LD_PRELOAD": str(unsynced_shim),
        "HERDER_UNSYNCED_WATCH": str(tmp_path / "herd.db"),
    }
    log = SubmissionLog()
    bad: list[str] = []
    dropped_bytes = 0
    started = time.monotonic()
    herd = LocalHerd(nodes=0, home=tmp_path, listen=listen, env=env)
    herd.start()
    batches = [[call_spec(nothing) for _ in range(20)] for _ in range(40 * cycles)]
    submitter = threading.Thread(
        target=submit, args=(herd.env(), batches, log), kwargs={"pause_s": 0.05}, daemon=True
    )
    submitter.start()
    try:
        for cycle in range(cycles):
            time.sleep(rng.uniform(0.3, 1.5))
            herd.kill()
            acknowledged = set(log.acknowledged)
            assert (tmp_path / "herd.db-wal.durable").exists(), "the shim kept no synced copy"
            dropped_bytes += drop_unsynced(tmp_path)
            integrity, ids = store_state(tmp_path / "herd.db")
            if integrity != "ok":
                bad.append(f"cycle {cycle}: integrity_check {integrity}")
            if acknowledged - ids:
                bad.append(f"cycle {cycle}: {len(acknowledged - ids)} acknowledged tasks missing")
            mark_synced(tmp_path)
            herd = LocalHerd(nodes=0, home=tmp_path, listen=listen, env=env)
            herd.start()
        # the cycles often end before the submissions do (2,000 batches at full size,
        # 0.05 s apart, each a commit): the rest is submitted to the last coordinator
        submitter.join(size(120, 600))
        assert not submitter.is_alive(), f"seed {seed}: the submitter did not finish"
    finally:
        herd.stop()
    _, ids = store_state(tmp_path / "herd.db")
    lost = set(log.acknowledged) - ids
    record(
        "4-power-loss",
        "kill -9 of the coordinator mid-write, unsynced writes dropped",
        seed,
        None,
        tasks=len(log.acknowledged),
        faults=cycles,
        lost=len(lost),
        integrity_failures=sum(1 for b in bad if "integrity" in b),
        unsynced_bytes_dropped=dropped_bytes,
        wall_s=round(time.monotonic() - started, 1),
    )
    assert len(log.acknowledged) == 20 * len(batches), f"seed {seed}: not all acknowledged"
    assert not bad, f"seed {seed}: {bad}"
    assert not lost, f"seed {seed}: {len(lost)} acknowledged tasks lost"
