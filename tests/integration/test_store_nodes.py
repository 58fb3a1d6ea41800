"""Node records in the store (both backends): requested before the provider
call, batched moves, the provider's address, and the upgrade of an older
store that predates them."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from herder.errors import SchemaMismatch
from herder.model import NodeRecord, NodeState
from herder.store import schema
from herder.store.sql import SqlStore, async_url


def requested(node_id: str, deadline: float = 100.0) -> NodeRecord:
    return NodeRecord(
        id=node_id,
        name=node_id,
        state=NodeState.REQUESTED,
        provider="ec2",
        labels={"zone": "a"},
        slots=2,
        host=None,
        pid=None,
        created_at=1.0,
        last_seen=None,
        reason=None,
        deadline=deadline,
    )


async def test_nodes_move_in_batches_and_keep_address_deadline_and_death_reason(
    store_url: str,
) -> None:
    store = SqlStore(store_url)
    await store.open()
    try:
        await store.add_nodes([requested("a"), requested("b"), requested("c")])
        moved, refused = await store.set_node_states(
            [
                ("a", NodeState.BOOTING, None, "i-0a"),
                ("b", NodeState.TERMINATED, "provider error: capacity: none left", None),
                ("c", NodeState.READY, None, None),  # requested -> ready is not a move
                ("zzz", NodeState.BOOTING, None, None),  # unknown: skipped
            ],
            2.0,
        )
        assert [n.id for n in moved] == ["a", "b"]
        assert len(refused) == 1
        assert "requested -> ready" in str(refused[0])
        nodes = {n.id: n for n in await store.nodes()}
        assert (nodes["a"].state, nodes["a"].address, nodes["a"].deadline) == (
            NodeState.BOOTING,
            "i-0a",
            100.0,
        )
        assert nodes["b"].reason == "provider error: capacity: none left"
        assert nodes["c"].state is NodeState.REQUESTED
        # pairing before the provider call returned: the address lands, the state stays
        await store.set_node_state("c", NodeState.CONNECTED, None, 3.0)
        await store.set_node_states([("c", NodeState.BOOTING, None, "i-0c")], 3.5)
        c = {n.id: n for n in await store.nodes()}["c"]
        assert (c.state, c.address, c.deadline) == (NodeState.CONNECTED, "i-0c", None)
        actions = [(e.action, e.node_id) for e in await store.events(limit=100)]
        assert actions == [
            ("node_requested", "a"),
            ("node_requested", "b"),
            ("node_requested", "c"),
            ("node_booting", "a"),
            ("node_terminated", "b"),
            ("node_connected", "c"),
        ]
        assert await store.latest_event_id() == (await store.events(limit=100))[-1].id
        assert await store.get_meta("fleet.target") is None
        await store.set_meta("fleet.target", '{"target": 3}')
        await store.set_meta("fleet.target", '{"target": 4}')
        assert await store.get_meta("fleet.target") == '{"target": 4}'
        cluster = await store.cluster_id()
        assert cluster.startswith("c-")
    finally:
        await store.close()


async def _downgrade_to_v2(url: str) -> None:
    """Make the store look as version 2 left it: no fleet or service columns."""
    engine = create_async_engine(async_url(url))
    try:
        async with engine.begin() as conn:
            for index in schema.ADDED_INDEXES:  # made by later versions
                await conn.execute(sa.text(f"DROP INDEX IF EXISTS {index.name}"))
            for table, column in schema.ADDED_COLUMNS[3]:
                await conn.execute(sa.text(f"ALTER TABLE {table} DROP COLUMN {column.name}"))
            await conn.execute(sa.text("UPDATE meta SET value = '2' WHERE key = 'schema'"))
            await conn.execute(
                sa.text(
                    "INSERT INTO nodes (id, name, state, provider, labels, slots, created_at) "
                    "VALUES ('old', 'old', 'terminated', 'local', '{}', 1, 1.0)"
                )
            )
    finally:
        await engine.dispose()


async def test_a_version_2_store_is_upgraded_in_place_and_a_newer_one_refused(
    store_url: str,
) -> None:
    store = SqlStore(store_url)
    await store.open()
    cluster = await store.cluster_id()
    await store.close()
    await _downgrade_to_v2(store_url)

    store = SqlStore(store_url)
    await store.open()
    try:
        (old,) = await store.nodes()
        assert (old.id, old.address, old.deadline) == ("old", None, None)
        await store.add_nodes([requested("new")])
        assert await store.get_meta("schema") == str(schema.SCHEMA_VERSION)
        assert await store.cluster_id() == cluster
        await store.set_meta("schema", "99")
    finally:
        await store.close()

    store = SqlStore(store_url)
    with pytest.raises(SchemaMismatch, match=r"schema 99.*upgrade herder"):
        await store.open()
    await store.close()
