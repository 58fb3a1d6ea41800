"""Discovery benchmark: how fast an agent finds and pairs, what a flood costs the listener.

1. Seconds from ``herder agent`` start to "paired" (p50/p90 over ``--runs``):
   via the UDP beacon (``--discover``), via a tracker (``--tracker``), and,
   as the baseline nothing can beat, with an explicit join token
   (``--join TOKEN@URL``: the interpreter, the imports and the handshake).
   One coordinator (beacon every 1 s, announcing to a tracker every 3 s) and
   one standalone ``herder tracker`` run for the whole measurement; agents
   poll the tracker every 1 s.
2. CPU of a process whose only job is the beacon listener, under a flood
   of 10,000 packets/s for ``--flood-s`` seconds (psutil, user+system time
   over wall time): random garbage of 1..1500 bytes, then correctly sized
   beacons with a wrong signature (the costliest drop: one HMAC each). The
   listener must still accept a good beacon afterwards.

Runs in the root network namespace on private ports (beacon port 17421), so
it does not meet other herds' beacons on 7421. Prints a table and writes
``bench/results-discovery.json``. Run: ``.venv/bin/python bench/discovery.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from herder.discovery.beacon import encode_beacon
from herder.security import JoinToken

HERE = Path(__file__).parent
BEACON_PORT = 17421
FLOOD_PORT = 17521
console = Console()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def herder(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "herder", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def wait_text(log: Path, text: str, timeout: float) -> float:
    """Seconds until ``text`` appears in ``log``; raises after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if text in log.read_text(errors="replace"):
            return time.monotonic() - start
        time.sleep(0.01)
    raise TimeoutError(f"{text!r} not in {log} after {timeout}s:\n{log.read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


def time_to_pair(args: list[str], env: dict[str, str], tmp: Path, runs: int) -> list[float]:
    times = []
    for i in range(runs):
        log = tmp / f"agent-{args[0].strip('-')}-{i}.log"
        start = time.monotonic()
        proc = herder("agent", *args, env=env, log=log)
        try:
            wait_text(log, "paired with", 60)
            times.append(time.monotonic() - start)
        finally:
            stop(proc)
    return times


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def flood_cpu(secret: bytes, seconds: float, rate: int, forged: bool) -> dict[str, Any]:
    """CPU% of a listener-only process while ``rate`` packets/s arrive for ``seconds``."""
    code = (
        "import asyncio, sys\n"
        "from herder.discovery.beacon import listen_for_beacon\n"
        f"b = asyncio.run(listen_for_beacon(bytes.fromhex({secret.hex()!r}), port={FLOOD_PORT}))\n"
        "print('accepted', b.cluster, flush=True)\n"
    )
    listener = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        time.sleep(1.5)  # imports done, socket bound
        ps = psutil.Process(listener.pid)
        wrong = secrets.token_bytes(32)
        pool = [
            encode_beacon(wrong, "c-x", ["https://10.0.0.1:7420"], bytes(32))
            if forged
            else secrets.token_bytes(1 + (i * 37) % 1500)
            for i in range(256)
        ]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        before = ps.cpu_times()
        start = time.monotonic()
        sent = 0
        batch = rate // 100  # one batch every 10 ms
        while (elapsed := time.monotonic() - start) < seconds:
            for _ in range(batch):
                sock.sendto(pool[sent % len(pool)], ("127.0.0.1", FLOOD_PORT))
                sent += 1
            ahead = sent / rate - elapsed
            if ahead > 0:
                time.sleep(ahead)
        wall = time.monotonic() - start
        after = ps.cpu_times()
        cpu = (after.user + after.system - before.user - before.system) / wall * 100
        sock.sendto(
            encode_beacon(secret, "c-bench", ["https://127.0.0.1:1"], bytes(32)),
            ("127.0.0.1", FLOOD_PORT),
        )
        out, _ = listener.communicate(timeout=10)
        sock.close()
        return {
            "packets": sent,
            "pps": round(sent / wall),
            "cpu_percent": round(cpu, 1),
            "good_beacon_accepted_after": b"accepted c-bench" in out,
        }
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--flood-s", type=float, default=5.0)
    parser.add_argument("--rate", type=int, default=10_000)
    opts = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="herder-bench-discovery-"))
    home = tmp / "home"
    from herder.security import load_or_create_secret

    secret = load_or_create_secret(home / "secret")
    env = {
        **os.environ,
        "HERDER_SECRET": secret.hex(),
        "HERDER_BEACON_PORT": str(BEACON_PORT),
        "HERDER_LOG_LEVEL": "info",
    }
    tracker_port, port = free_port(), free_port()
    tracker_url = f"http://127.0.0.1:{tracker_port}"
    tracker = herder("tracker", "--listen", f"127.0.0.1:{tracker_port}", env=env, log=tmp / "t.log")
    coord = herder(
        "up", "--home", str(home), "--listen", f"0.0.0.0:{port}", "--tracker", tracker_url,
        env=env, log=tmp / "c.log",
    )  # fmt: skip
    try:
        wait_text(tmp / "c.log", "coordinator ready", 30)
        time.sleep(3.5)  # the first announcement has reached the tracker
        token = JoinToken.parse(JoinToken(secret, _fingerprint(home)).encode())
        join = f"{token.encode()}@https://127.0.0.1:{port}"
        results: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "runs": opts.runs,
        }
        for label, args in [
            ("join", ["--join", join]),
            ("beacon", ["--discover"]),
            ("tracker", ["--tracker", tracker_url]),
        ]:
            times = time_to_pair(args, env, tmp, opts.runs)
            results[f"start_to_paired_{label}_s"] = {
                "p50": round(statistics.median(times), 3),
                "p90": round(pct(times, 0.9), 3),
                "all": [round(t, 3) for t in times],
            }
    finally:
        stop(coord)
        stop(tracker)
    results["flood_garbage"] = flood_cpu(secret, opts.flood_s, opts.rate, forged=False)
    results["flood_forged"] = flood_cpu(secret, opts.flood_s, opts.rate, forged=True)

    table = Table(title="discovery")
    table.add_column("figure")
    table.add_column("value")
    for label in ("join", "beacon", "tracker"):
        r = results[f"start_to_paired_{label}_s"]
        table.add_row(
            f"agent start -> paired via {label}, p50 / p90 (n={opts.runs})",
            f"{r['p50']:.2f} s / {r['p90']:.2f} s",
        )
    for kind in ("garbage", "forged"):
        r = results[f"flood_{kind}"]
        table.add_row(
            f"listener CPU, {r['pps']:,} {kind} packets/s for {opts.flood_s:g} s",
            f"{r['cpu_percent']:.1f} % (good beacon after: {r['good_beacon_accepted_after']})",
        )
    console.print(table)
    (HERE / "results-discovery.json").write_text(json.dumps(results, indent=2) + "\n")


def _fingerprint(home: Path) -> bytes:
    from herder.security import ca_fingerprint

    return ca_fingerprint((home / "tls" / "ca.pem").read_bytes())


if __name__ == "__main__":
    main()
