"""A TCP proxy that loses answers: the fault of case 5 (committed, but never acknowledged).

It passes bytes both ways untouched (TLS goes through it end to end), but
when the server answers a request, it may instead drop that answer and cut
both connections. Everything the server sends it sends after committing
(the store is the truth), so a dropped answer is exactly "the commit
succeeded but the acknowledgement was lost"; the peer must retry, and the
retry must not store anything twice.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class CuttingProxy:
    """Forwards 127.0.0.1:<port> to ``target_port``; cuts up to ``max_cuts`` answers,
    each with probability ``p`` (drawn from ``random.Random(seed)``), never in the first
    ``warmup_s`` of a connection (its TLS handshake and authentication)."""

    target_port: int
    seed: int
    p: float
    max_cuts: int
    warmup_s: float = 0.3
    cuts: int = 0
    port: int = 0
    _rng: random.Random = field(init=False)
    _loop: asyncio.AbstractEventLoop = field(init=False)
    _conns: set[asyncio.Task[None]] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._loop = asyncio.new_event_loop()

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        waiting: list[bool],
        answers: bool,
        opened: float,
    ) -> None:
        try:
            while data := await src.read(65536):
                if answers and waiting[0] and time.monotonic() - opened > self.warmup_s:
                    waiting[0] = False
                    if self.cuts < self.max_cuts and self._rng.random() < self.p:
                        self.cuts += 1
                        raise ConnectionAbortedError("answer dropped")
                elif not answers:
                    waiting[0] = True
                dst.write(data)
                await dst.drain()
        finally:
            dst.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._conns.add(me)
        me.add_done_callback(self._conns.discard)
        opened = time.monotonic()
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        waiting = [False]  # a request went up and its answer has not come back yet
        results = await asyncio.gather(
            self._pipe(reader, up_w, waiting, False, opened),
            self._pipe(up_r, writer, waiting, True, opened),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, Exception) and not isinstance(r, (OSError, ConnectionError)):
                raise r

    @contextmanager
    def running(self) -> Iterator[CuttingProxy]:
        ready = threading.Event()
        stop = asyncio.Event()

        async def main() -> None:
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            async with server:
                await stop.wait()
                server.close()
                for task in self._conns:
                    task.cancel()
                await asyncio.gather(*self._conns, return_exceptions=True)

        thread = threading.Thread(
            target=self._loop.run_until_complete, args=(main(),), name="cutting-proxy"
        )
        thread.start()
        try:
            if not ready.wait(10):
                raise RuntimeError("the proxy did not start")
            yield self
        finally:
            self._loop.call_soon_threadsafe(stop.set)
            thread.join(10)
            self._loop.close()
