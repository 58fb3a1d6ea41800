"""The peers' LISTEN/NOTIFY channel when its connection is lost and reopened.

A CI run's coordinator stopped when PostgreSQL went away: its publish loop
and its refresh loop both reopened the lost channel at once, and the publish
ran on a connection whose LISTEN was still being set up ("another operation
is in progress", asyncpg's InternalClientError, which nothing caught).
"""

from __future__ import annotations

import asyncio

import asyncpg  # type: ignore[import-untyped]

from herder.store.pg_cluster import Channel

ROUNDS = 20


async def test_reopening_while_publishing_is_one_at_a_time(pg_url: str) -> None:
    heard: list[str] = []
    channel = Channel(pg_url, heard.append)
    await channel.open()
    listening = channel._conn
    try:
        for i in range(ROUNDS):  # bounded: each round loses the connection once
            assert channel._conn is not None
            channel._conn.terminate()  # as PostgreSQL going away leaves it
            await asyncio.gather(channel.open(), channel.publish([f"n{i}"]), channel.open())
            assert channel.is_open
        # the last round's note comes back on the one connection that listens
        async with asyncio.timeout(10):
            while f"n{ROUNDS - 1}" not in heard:
                await asyncio.sleep(0.02)
    finally:
        await channel.close()
    assert listening is not None
    assert listening.is_closed()
    admin = await asyncpg.connect(pg_url)
    try:
        # reopened once per loss, not once per caller: no connection left behind
        others = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()
    assert others == 0
