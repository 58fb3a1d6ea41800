"""Node records in the store (both backends): requested before the provider
call, batched moves, the provider's address, and the upgrade of an older
store that predates them."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from herder.errors import SchemaMismatch
from herder.model import NodeRecord, NodeState
from herder.store import migrate, schema
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


async def _as_version_2(url: str, cluster: str) -> None:
    """Make the store as herder left it at schema 2, before migrations existed: built
    by the first two revisions, ``meta.schema`` 2, no ``alembic_version``; one old node."""
    engine = create_async_engine(async_url(url))

    def rebuild(conn: sa.Connection) -> None:
        schema.metadata.drop_all(conn)
        conn.exec_driver_sql("DROP TABLE alembic_version")
        migrate.run_revisions(conn, "0002")
        conn.exec_driver_sql("DROP TABLE alembic_version")
        conn.execute(
            sa.text("INSERT INTO meta (key, value) VALUES ('cluster', :c)"), {"c": cluster}
        )
        conn.exec_driver_sql(
            "INSERT INTO nodes (id, name, state, provider, labels, slots, created_at) "
            "VALUES ('old', 'old', 'terminated', 'local', '{}', 1, 1.0)"
        )

    try:
        async with engine.begin() as conn:
            await conn.run_sync(rebuild)
    finally:
        await engine.dispose()


async def test_a_version_2_store_is_refused_then_upgraded_and_a_newer_one_refused(
    store_url: str,
) -> None:
    store = SqlStore(store_url)
    await store.open()
    cluster = await store.cluster_id()
    await store.close()
    await _as_version_2(store_url, cluster)

    store = SqlStore(store_url)
    with pytest.raises(SchemaMismatch, match=r"schema 2 .*herder db upgrade --store"):
        await store.open()
    assert (await store.upgrade_schema()).after == migrate.code_revision()
    await store.close()

    store = SqlStore(store_url)
    await store.open()
    try:
        (old,) = await store.nodes()
        assert (old.id, old.address, old.deadline) == ("old", None, None)
        await store.add_nodes([requested("new")])
        assert await store.get_meta("schema") == str(schema.SCHEMA_VERSION)
        assert await store.cluster_id() == cluster

        def from_newer_herder(conn: sa.Connection) -> None:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")

        await store.write_transaction(from_newer_herder)
    finally:
        await store.close()

    store = SqlStore(store_url)
    with pytest.raises(SchemaMismatch, match=r"schema 0099, newer .*upgrade herder"):
        await store.open()
    await store.close()


async def test_two_stores_writing_one_new_meta_key_at_once_both_succeed(store_url: str) -> None:
    """Coordinators sharing a store write meta keys (the fleet's target, its release)
    at start-up: a key neither has written yet must not fail either of them."""
    first, second = SqlStore(store_url), SqlStore(store_url)
    await first.open()
    await second.open()
    try:
        keys = [f"race.{i}" for i in range(20)]
        await asyncio.gather(
            *(
                s.set_meta(k, "first" if s is first else "second")
                for k in keys
                for s in (first, second)
            )
        )
        assert {await first.get_meta(k) for k in keys} <= {"first", "second"}
        assert None not in {await second.get_meta(k) for k in keys}
    finally:
        await first.close()
        await second.close()
