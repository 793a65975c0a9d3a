"""The inbox table: ``(consumer, message_id)`` rows written in the handler's transaction.

A row exists exactly when the effects of that message are committed, because it is
inserted in the same transaction and removed again (inside that transaction) if the
handler fails. Claims for a whole batch go in one statement, in sorted order so that two
replicas claiming overlapping ids lock them in the same order and cannot deadlock.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from consumers.runtime.pgarray import text_array
from consumers.sqlnames import render

# Serialises schema creation across replicas that start together (CREATE TABLE IF NOT
# EXISTS races on the catalog otherwise).
_SCHEMA_LOCK_KEY = 0x63646377  # "cdcw"


def table_ident(table: str) -> sql.Composed:
    """``schema.table`` (already validated by the settings) as a quoted identifier."""
    schema, name = table.split(".")
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


async def apply_schema(
    conn: psycopg.AsyncConnection[Any], table: str, statements: Sequence[str]
) -> None:
    """Create the inbox table, then run the worker's own idempotent DDL, in one transaction."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
        await conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " consumer text NOT NULL,"
                " message_id text NOT NULL,"
                " routing_key text NOT NULL,"
                " processed_at timestamptz NOT NULL DEFAULT now(),"
                " PRIMARY KEY (consumer, message_id))"
            ).format(table_ident(table))
        )
        for statement in statements:
            await conn.execute(statement.encode())


async def claim(
    conn: psycopg.AsyncConnection[Any],
    table: str,
    consumer: str,
    message_ids: Sequence[str],
    routing_keys: Sequence[str],
) -> set[str]:
    """Insert the batch's ids; return those that were new (the others are duplicates)."""
    cur = await conn.execute(
        _claim_statement(table), (consumer, text_array(message_ids), text_array(routing_keys))
    )
    return {row[0] for row in await cur.fetchall()}


@functools.lru_cache(maxsize=8)
def _claim_statement(table: str) -> str:
    # Composed and rendered once per table, not once per batch.
    return render(
        sql.SQL(
            "INSERT INTO {} (consumer, message_id, routing_key)"
            " SELECT %s, m, k FROM unnest(%s::text[], %s::text[]) AS t(m, k) ORDER BY m"
            " ON CONFLICT DO NOTHING RETURNING message_id"
        ).format(table_ident(table))
    )


async def unclaim(
    conn: psycopg.AsyncConnection[Any], table: str, consumer: str, message_id: str
) -> None:
    """Remove the claim of a message whose handler failed (same transaction)."""
    await conn.execute(
        sql.SQL("DELETE FROM {} WHERE consumer = %s AND message_id = %s").format(
            table_ident(table)
        ),
        (consumer, message_id),
    )
