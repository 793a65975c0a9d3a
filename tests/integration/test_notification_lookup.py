"""The notifications worker's chunk lookup against the real PostgreSQL: it finds exactly the
stored preferences, delivered channels and inbox ids of a chunk, and reads only those rows,
also from tables that hold many rows but have no statistics yet (a new deployment draining
a backlog before autovacuum's first ANALYZE)."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from harness.postgres import without_autovacuum
from harness.session import db_url
from psycopg import sql

from consumers.notifications.store import DeliveryLog, Lookup, NotificationStore, schema_ddl
from consumers.runtime.inbox import apply_schema

pytestmark = pytest.mark.integration

ROWS = 20_000  # message ids with records (two channels each) and inbox rows (two consumers)
CONSUMER = "notifications"


async def _fill(conn: psycopg.AsyncConnection[Any], schema: str, analyzed: bool) -> None:
    s = sql.Identifier(schema)
    await without_autovacuum(
        conn, schema, ("notification_preferences", "notification_deliveries", "inbox")
    )
    await conn.execute(sql.SQL(
        "INSERT INTO {}.notification_preferences (user_id, webhook, webhook_url)"
        " SELECT 'u-' || i, true, 'https://hooks.example/' || i FROM generate_series(0, 199) i"
    ).format(s))
    await conn.execute(sql.SQL(
        "INSERT INTO {}.notification_deliveries (message_id, channel, user_id, idempotency_key)"
        " SELECT 'm-' || i, c, 'u-1', 'k-' || i FROM generate_series(1, %s) i,"
        " (VALUES ('in_app'), ('webhook')) v(c)"
    ).format(s), (ROWS,))
    await conn.execute(sql.SQL(
        "INSERT INTO {}.inbox (consumer, message_id, routing_key)"
        " SELECT c, 'm-' || i, 'device.created' FROM generate_series(1, %s) i,"
        " (VALUES ('billing'), (%s)) v(c)"
    ).format(s), (ROWS, CONSUMER))
    if analyzed:
        await conn.execute(sql.SQL("ANALYZE {}.notification_deliveries").format(s))
        await conn.execute(sql.SQL("ANALYZE {}.inbox").format(s))


def _rows_read(plan: dict[str, Any], names: set[str]) -> int:
    """Rows the plan's scans of the tables (or indexes) in ``names`` produced or filtered
    out, over all their loops."""
    here = 0
    if plan.get("Relation Name") in names or plan.get("Index Name") in names:
        loops = plan.get("Actual Loops", 1)
        removed = plan.get("Rows Removed by Filter", 0)
        removed += plan.get("Rows Removed by Index Recheck", 0)
        here = round((plan.get("Actual Rows", 0) + removed) * loops)
    return here + sum(_rows_read(child, names) for child in plan.get("Plans", ()))


@pytest.mark.parametrize("analyzed", [False, True], ids=["no statistics", "analyzed"])
async def test_a_chunk_lookup_reads_only_its_own_rows(pg_schema, pg_session_db, analyzed):
    url = db_url(pg_session_db)
    store = NotificationStore(pg_schema)
    statement = store.lookup_statement(f"{pg_schema}.inbox", CONSUMER)
    users = [f"u-{i}" for i in range(10, 30)] + ["u-absent"]
    delivered = [f"m-{i}" for i in range(100, 113)]
    unknown = [f"m-new-{i}" for i in range(13)]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await apply_schema(conn, f"{pg_schema}.inbox", schema_ddl(pg_schema))
        await _fill(conn, pg_schema, analyzed)
        found = await store.lookup_many(conn, users, delivered + unknown, statement)
        cur = await conn.execute(
            b"EXPLAIN (ANALYZE, FORMAT JSON) " + statement.encode(),
            {"u": users, "m": delivered + unknown},
        )
        row = await cur.fetchone()
    assert row is not None
    plan = row[0]  # EXPLAIN's JSON, parsed by psycopg

    assert sorted(found.prefs) == sorted(users[:-1])
    assert found.prefs["u-12"].webhook_url == "https://hooks.example/12"
    assert found.done == {m: {"in_app", "webhook"} for m in delivered}
    assert found.seen == set(delivered)
    read = _rows_read(plan[0]["Plan"], {
        "notification_deliveries", "notification_deliveries_pkey", "inbox", "inbox_pkey",
    })
    # Two records and one inbox row of this consumer per delivered id, a few index entries
    # besides: a scan of the tables' 60,000 rows would be hundreds of times more.
    assert read <= 4 * len(delivered + unknown), read


async def test_chunks_asked_a_moment_apart_share_one_read_and_each_gets_its_rows(
    pg_schema, pg_session_db, monkeypatch
):
    url = db_url(pg_session_db)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await apply_schema(conn, f"{pg_schema}.inbox", schema_ddl(pg_schema))
        await _fill(conn, pg_schema, analyzed=True)
    store = NotificationStore(pg_schema)
    statements = []  # the read statements the real store runs
    read = store.lookup_many

    async def counted(*args: Any) -> Lookup:
        statements.append(args[2])
        return await read(*args)

    monkeypatch.setattr(store, "lookup_many", counted)
    log = DeliveryLog(store, lambda: url, f"{pg_schema}.inbox", CONSUMER)
    chunks = [([f"u-{i}"], [f"m-{100 + i}", f"m-new-{i}"]) for i in range(3)]
    try:
        await log.lookup(["u-0"], ["m-1"])  # connects; the chunks below time only the read
        reads_before = len(statements)
        asks = []
        for users, ids in chunks:
            # Deliveries come a few per wakeup of the consuming loop: a new chunk a moment
            # after the one before, not in the same loop iteration.
            asks.append(asyncio.create_task(log.lookup(users, ids)))
            for _ in range(3):
                await asyncio.sleep(0)
        found = await asyncio.gather(*asks)
    finally:
        await log.close()

    assert len(statements) - reads_before == 1
    for (users, ids), lookup in zip(chunks, found, strict=True):
        assert users[0] in lookup.prefs
        assert lookup.done[ids[0]] == {"in_app", "webhook"}
        assert ids[0] in lookup.seen and ids[1] not in lookup.seen
