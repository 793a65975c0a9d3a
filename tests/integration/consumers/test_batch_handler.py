"""The runtime's batch-handler path (``Route.batch``) against the real PostgreSQL.

``run_batch`` with ``optimistic=True`` hands every new message of a batch to the route's batch
handler in one call; duplicates (already in the inbox, or twice in the batch) never reach it;
if it fails, the batch is rolled back and runs message by message with savepoints, so one bad
message fails alone and the others commit exactly once. A lost lock race is tried again on
the batch path before falling back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from harness.session import db_url
from psycopg import sql
from pydantic import BaseModel

from consumers.runtime import batch as batch_mod
from consumers.runtime import inbox
from consumers.runtime.batch import DONE, DUPLICATE, FAILED, BatchMessage, run_batch
from consumers.runtime.spec import Delivery, HandlerContext, Route

pytestmark = pytest.mark.integration


class Entry(BaseModel):
    key: str
    amount: int


class Calls:
    """Which path ran what, and the SQL both paths use (one row per message)."""

    def __init__(self, schema: str) -> None:
        self.table = sql.SQL("{}.entries").format(sql.Identifier(schema))
        self.batches: list[list[str]] = []
        self.singles: list[str] = []
        self.lock_first: int = 0  # batch calls that must first lose a lock race

    async def single(self, ctx: HandlerContext, entry: Entry) -> None:
        self.singles.append(ctx.delivery.message_id)
        if entry.amount < 0:
            raise ValueError("a negative amount is refused")
        await ctx.conn.execute(
            sql.SQL("INSERT INTO {} VALUES (%s, %s, %s)").format(self.table),
            (ctx.delivery.message_id, entry.key, entry.amount),
        )

    async def many(
        self, conn: psycopg.AsyncConnection[Any], messages: Sequence[tuple[Delivery, Any]]
    ) -> None:
        self.batches.append([d.message_id for d, _ in messages])
        if self.lock_first:
            self.lock_first -= 1
            await conn.execute("SET LOCAL lock_timeout = '1ms'")
            await conn.execute("SELECT pg_advisory_xact_lock(424242)")  # held by the test
        if any(e.amount < 0 for _, e in messages):
            raise ValueError("a negative amount is refused")
        await conn.execute(
            sql.SQL("INSERT INTO {} SELECT * FROM unnest(%s::text[], %s::text[], %s::int[])")
            .format(self.table),
            ([d.message_id for d, _ in messages], [e.key for _, e in messages],
             [e.amount for _, e in messages]),
        )


async def _setup(url: str, schema: str) -> psycopg.AsyncConnection[Any]:
    conn = await psycopg.AsyncConnection.connect(url, prepare_threshold=None)
    await inbox.apply_schema(
        conn,
        f"{schema}.inbox",
        [sql.SQL("CREATE TABLE {}.entries (id text PRIMARY KEY, key text, amount int)")
         .format(sql.Identifier(schema)).as_string(conn)],
    )
    return conn


def _items(calls: Calls, specs: list[tuple[str, int]]) -> list[BatchMessage]:
    route = Route("ledger.#", Entry, calls.single, calls.many)
    return [
        BatchMessage(
            Delivery(mid, "ledger.x", {}, 1, b""), route, Entry(key=mid, amount=amount), "q"
        )
        for mid, amount in specs
    ]


async def _rows(conn: psycopg.AsyncConnection[Any], calls: Calls) -> list[tuple[Any, ...]]:
    cur = await conn.execute(sql.SQL("SELECT id, amount FROM {} ORDER BY id").format(calls.table))
    rows = await cur.fetchall()
    await conn.commit()
    return rows


async def test_one_call_for_the_new_messages_duplicates_skipped(pg_schema, pg_session_db):
    conn = await _setup(db_url(pg_session_db), pg_schema)
    calls = Calls(pg_schema)
    how = await run_batch(
        conn, f"{pg_schema}.inbox", "t", _items(calls, [("a", 1)]), optimistic=True
    )
    assert how == batch_mod.FIRST
    # "a" is already in the inbox, "b" comes twice in the batch
    items = _items(calls, [("a", 1), ("b", 2), ("c", 3), ("b", 2)])
    await run_batch(conn, f"{pg_schema}.inbox", "t", items, optimistic=True)
    assert [i.outcome for i in items] == [DUPLICATE, DONE, DONE, DUPLICATE]
    assert calls.batches == [["a"], ["b", "c"]] and calls.singles == []
    assert await _rows(conn, calls) == [("a", 1), ("b", 2), ("c", 3)]
    await conn.close()


async def test_a_bad_message_mid_batch_fails_alone_the_others_commit(pg_schema, pg_session_db):
    conn = await _setup(db_url(pg_session_db), pg_schema)
    calls = Calls(pg_schema)
    items = _items(calls, [("a", 1), ("b", -1), ("c", 3), ("a", 1)])
    how = await run_batch(conn, f"{pg_schema}.inbox", "t", items, optimistic=True)
    assert how == batch_mod.FALLBACK
    assert [i.outcome for i in items] == [DONE, FAILED, DONE, DUPLICATE]
    assert isinstance(items[1].error, ValueError)
    # the batch call failed and was rolled back; the per-message path ran each once
    assert calls.batches == [["a", "b", "c"]] and calls.singles == ["a", "b", "c"]
    assert await _rows(conn, calls) == [("a", 1), ("c", 3)]
    cur = await conn.execute(
        sql.SQL("SELECT message_id FROM {}.inbox ORDER BY 1").format(sql.Identifier(pg_schema))
    )
    assert await cur.fetchall() == [("a",), ("c",)]  # "b" is not claimed: it will be retried
    await conn.commit()
    await conn.close()


async def test_a_lost_lock_race_is_retried_on_the_batch_path(pg_schema, pg_session_db):
    url = db_url(pg_session_db)
    conn = await _setup(url, pg_schema)
    calls = Calls(pg_schema)
    calls.lock_first = batch_mod.OPTIMISTIC_TRIES - 1  # the last try gets through
    async with await psycopg.AsyncConnection.connect(url) as holder:
        await holder.execute("SELECT pg_advisory_xact_lock(424242)")  # held throughout
        items = _items(calls, [("a", 1), ("b", 2)])
        how = await run_batch(conn, f"{pg_schema}.inbox", "t", items, optimistic=True)
    assert how == batch_mod.RETRIED
    assert [i.outcome for i in items] == [DONE, DONE]
    assert len(calls.batches) == batch_mod.OPTIMISTIC_TRIES and calls.singles == []
    assert await _rows(conn, calls) == [("a", 1), ("b", 2)]
    await conn.close()


@pytest.mark.parametrize("threshold", [5, None], ids=["psycopg-default", "runtime"])
async def test_failed_pipelines_leave_no_stale_prepared_statement(
    pg_schema, pg_session_db, threshold
):
    """The pitfall of statements psycopg prepares inside a pipeline that then fails ("prepared
    statement _pg3_N does not exist" afterwards): the runtime's connections never prepare
    (``prepare_threshold=None``); with either setting, round after round of pipelined
    batches that fail mid-way and run again with savepoints keep working."""
    conn = await _setup(db_url(pg_session_db), pg_schema)
    await conn.set_autocommit(False)
    conn.prepare_threshold = threshold
    calls = Calls(pg_schema)
    route = Route("ledger.#", Entry, calls.single)  # per-message handler only, pipelined
    for n in range(4):
        specs = [(f"{n}-{i}", -1 if i == 5 else i) for i in range(10)]
        items = [
            BatchMessage(Delivery(m, "ledger.x", {}, 1, b""), route, Entry(key=m, amount=a), "q")
            for m, a in specs
        ]
        await run_batch(conn, f"{pg_schema}.inbox", "t", items, optimistic=True)
        assert [i.outcome for i in items] == [FAILED if i == 5 else DONE for i in range(10)]
    assert len(await _rows(conn, calls)) == 36
    await conn.close()
