"""The floor under workload B: what one durable round trip costs before any herder code.

A B round trip (submit, run, result) crosses, in herder's design:

- two SQLite transactions committed with ``synchronous=FULL`` (the submission
  with its lease, then the result), each an fsync of the WAL: measured as
  ``bench/store_round.py``'s ``floor``, the statements of both written by
  hand on herder's schema (its indexes decide how many pages each commit
  writes); a one-row commit is shown too, for scale;
- two TLS WebSocket round trips between Python processes on loopback
  (client and coordinator, coordinator and agent), with the libraries herder
  uses (``websockets`` on both ends here: uvicorn's server side costs more);
- one round trip between two processes over a socket pair (agent and task
  worker).

Each is measured alone, with nothing but the library calls, and their sum
is the floor: what a B round trip would cost if herder's own code cost
nothing. Printed next to nothing else; ``make bench``'s B p50 and the peers'
are in RESULTS.md. Writes ``bench/results-floor.json``.
Run: ``.venv/bin/python bench/floor.py [--n 2000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import sqlite3
import ssl
import statistics
import tempfile
import time
from pathlib import Path

from store_round import floor_rounds

from herder import certs

HERE = Path(__file__).parent


def commit_us(directory: Path, n: int) -> float:
    """Median µs of a one-row transaction committed with WAL + synchronous=FULL."""
    db = sqlite3.connect(directory / "floor.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (id TEXT PRIMARY KEY, v BLOB)")
    times = []
    for i in range(n + 100):
        t = time.perf_counter()
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?, ?)", (f"k{i}", b"x" * 200))
        db.execute("COMMIT")
        times.append(time.perf_counter() - t)
    db.close()
    return 1e6 * statistics.median(times[100:])


def _echo_server(port_out: multiprocessing.Queue, cert: str, key: str) -> None:  # type: ignore[type-arg]
    from websockets.asyncio.server import serve

    async def echo(ws: object) -> None:
        async for frame in ws:  # type: ignore[attr-defined]
            await ws.send(frame)  # type: ignore[attr-defined]

    async def main() -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        async with serve(echo, "127.0.0.1", 0, ssl=context, compression=None) as server:
            port_out.put(server.sockets[0].getsockname()[1])
            await asyncio.Future()

    asyncio.run(main())


def websocket_us(directory: Path, n: int) -> float:
    """Median µs of a 200-byte frame's round trip over TLS WebSocket to another process."""
    files = certs.ensure_tls(directory / "tls", ["127.0.0.1"])
    ports: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    server = multiprocessing.Process(
        target=_echo_server, args=(ports, str(files.cert), str(files.key)), daemon=True
    )
    server.start()
    try:
        port = ports.get(timeout=30)
        return asyncio.run(_client(port, files.ca_cert, n))
    finally:
        server.kill()
        server.join()


async def _client(port: int, ca: Path, n: int) -> float:
    from websockets.asyncio.client import connect

    context = ssl.create_default_context(cafile=str(ca))
    times = []
    async with connect(f"wss://127.0.0.1:{port}", ssl=context, compression=None) as ws:
        frame = b"y" * 200
        for _ in range(n + 100):
            t = time.perf_counter()
            await ws.send(frame)
            await ws.recv()
            times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times[100:])


def _pipe_echo(sock: socket.socket) -> None:
    while data := sock.recv(4096):
        sock.sendall(data)


def socketpair_us(n: int) -> float:
    """Median µs of a 100-byte message's round trip to another process over a socket pair."""
    ours, theirs = socket.socketpair()
    child = multiprocessing.Process(target=_pipe_echo, args=(theirs,), daemon=True)
    child.start()
    theirs.close()
    times = []
    try:
        for _ in range(n + 100):
            t = time.perf_counter()
            ours.sendall(b"z" * 100)
            ours.recv(4096)
            times.append(time.perf_counter() - t)
    finally:
        ours.close()
        child.join(10)
    return 1e6 * statistics.median(times[100:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="herder-floor-") as tmp:
        parts = {
            "one_row_commit_us": commit_us(Path(tmp), args.n),
            "store_two_transactions_us": asyncio.run(floor_rounds(Path(tmp) / "store.db", args.n))[
                "wall_us"
            ],
            "tls_websocket_round_trip_us": websocket_us(Path(tmp), args.n),
            "socketpair_round_trip_us": socketpair_us(args.n),
        }
    floor = (
        parts["store_two_transactions_us"]
        + 2 * parts["tls_websocket_round_trip_us"]
        + parts["socketpair_round_trip_us"]
    )
    out = {k: round(v, 1) for k, v in parts.items()}
    out["b_floor_ms"] = round(floor / 1000, 3)
    for k, v in out.items():
        print(f"{k:32s} {v}")
    (HERE / "results-floor.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {HERE / 'results-floor.json'}")


if __name__ == "__main__":
    main()
