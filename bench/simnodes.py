"""Many simulated nodes in one process: each a real connection that pairs and heartbeats.

Each simulated node opens its own WebSocket to the coordinator, proves it
knows the secret (the same mutual handshake as ``herder agent``), and then
sends a heartbeat every second, with or without telemetry. It runs no
tasks: it answers nothing, so the coordinator gives it none once its
prefetch is 0. Used by ``bench/telemetry.py`` (and a fleet of 200 costs
the benchmark one process, not 200).
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from dataclasses import dataclass

import websockets

from herder import protocol, security

# What a node's heartbeat carries with telemetry on (as herder.agent.telemetry reports).
READING = {
    "cpu_percent": 12.5,
    "memory_percent": 41.0,
    "mem_used_mb": 3200.0,
    "mem_total_mb": 7800.0,
    "disk_free_gb": 120.0,
    "load1": 0.4,
    "net_sent_bps": 1200.0,
    "net_recv_bps": 3400.0,
}


@dataclass
class Traffic:
    frames: int = 0
    bytes: int = 0


async def simulate(
    join: str, count: int, seconds: float, *, telemetry: bool, prefix: str = "sim"
) -> Traffic:
    """``count`` nodes heartbeating for ``seconds``; what they sent."""
    token = security.JoinToken.parse(join)
    assert token.url is not None
    ca = await asyncio.to_thread(security.fetch_pinned_ca, token.url, token.fingerprint)
    ssl = security.client_ssl_context(ca)
    url = "wss://" + token.url.split("://", 1)[1].rstrip("/") + "/v1/agent"
    traffic = Traffic()
    stop = time.monotonic() + seconds
    await asyncio.gather(
        *(
            _node(url, ssl, token.secret, f"{prefix}-{i:04d}", stop, telemetry, traffic)
            for i in range(count)
        )
    )
    return traffic


async def _node(
    url: str,
    ssl: object,
    secret: bytes,
    node_id: str,
    stop: float,
    telemetry: bool,
    traffic: Traffic,
) -> None:
    await asyncio.sleep(random.random())  # do not all pair in the same millisecond
    async with websockets.connect(
        url, ssl=ssl, max_size=protocol.MAX_FRAME_BYTES, ping_interval=None, compression=None
    ) as ws:
        nonce = security.new_nonce()
        await ws.send(
            protocol.encode(
                protocol.Hello(
                    node_id=node_id,
                    name=node_id,
                    slots=1,
                    prefetch=0,
                    host=socket.gethostname(),
                    nonce=nonce,
                )
            )
        )
        (challenge,) = protocol.decode_coordinator(await ws.recv())
        assert isinstance(challenge, protocol.Challenge)
        mac = security.agent_proof(secret, challenge.nonce, nonce)
        await ws.send(protocol.encode(protocol.Proof(mac=mac)))
        (welcome,) = protocol.decode_coordinator(await ws.recv())
        assert isinstance(welcome, protocol.Welcome), welcome
        drain = asyncio.ensure_future(_discard(ws))
        try:
            while time.monotonic() < stop:
                reading = dict(READING, cpu_percent=random.uniform(0, 100)) if telemetry else None
                frame = protocol.encode(protocol.Heartbeat(prefetch=0, telemetry=reading))
                await ws.send(frame)
                traffic.frames += 1
                traffic.bytes += len(frame)
                await asyncio.sleep(welcome.heartbeat_s)
            await ws.send(protocol.encode(protocol.Bye(reason="idle")))
        finally:
            drain.cancel()


async def _discard(ws: websockets.ClientConnection) -> None:
    """Read (and drop) what the coordinator sends, so its sends never block."""
    async for _ in ws:
        pass
