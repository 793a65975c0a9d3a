"""Writers of outbox rows: a committed backlog, and a paced writer for offered load.

Rows are made by PostgreSQL itself (``generate_series``) so the harness spends almost no
CPU writing them; the payload is a jsonb whose printed text (what the relay publishes) is
exactly the requested number of bytes. ``created_at`` keeps its default ``now()``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

EVENT_TYPE = "device.started"


def _payload_expr(pad: int) -> sql.Composable:
    """jsonb of fixed printed width: the ids are zero-padded, ``pad`` x's fill up."""
    return sql.SQL(
        "jsonb_build_object('deviceId', 'dev-' || lpad(mod(g, 1000)::text, 4, '0'),"
        " 'userId', 'u-' || lpad(mod(g, 97)::text, 3, '0'), 'pad', repeat('x', {}))"
    ).format(sql.Literal(pad))


async def pad_for(db_url: str, size: int) -> int:
    """How many pad characters make the printed payload exactly ``size`` bytes."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as db:
        query = sql.SQL("SELECT length(({})::text) FROM (SELECT 1 AS g) s").format(
            _payload_expr(0)
        )
        cur = await db.execute(query)
        row = await cur.fetchone()
    assert row is not None
    base = int(row[0])
    if size < base:
        raise ValueError(f"payloads under {base} bytes are not supported")
    return size - base


def _insert_sql(table: str, pad: int, event_type: str) -> sql.Composed:
    return sql.SQL(
        "INSERT INTO {} (aggregate_type, aggregate_id, event_type, payload) "
        "SELECT 'device', 'dev-' || mod(g, 1000), {}, {} FROM generate_series(1, %s) g"
    ).format(sql.Identifier(table), sql.Literal(event_type), _payload_expr(pad))


async def insert_backlog(
    db_url: str, table: str, count: int, *, rows_per_txn: int, payload_size: int,
    event_type: str = EVENT_TYPE,
) -> float:
    """Commit ``count`` rows in transactions of ``rows_per_txn``; returns the seconds taken.

    One server-side loop (a DO block that commits after each transaction's rows), so a
    million rows cost one round trip rather than ten thousand.
    """
    pad = await pad_for(db_url, payload_size)
    txns, rest = divmod(count, rows_per_txn)
    insert = _insert_sql(table, pad, event_type).as_string(None)
    body = (
        f"BEGIN FOR i IN 1..{txns} LOOP "
        f"{insert.replace('%s', str(rows_per_txn))}; COMMIT; END LOOP; "
        + (f"{insert.replace('%s', str(rest))}; " if rest else "")
        + "END"
    )
    started = time.monotonic()
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as db:
        # The backlog only has to be committed before the relay starts: not waiting for each
        # commit's WAL flush makes a 1-row-per-transaction backlog quick to write, and the
        # relay sees the same WAL either way.
        await db.execute("SET synchronous_commit = off")
        await db.execute(sql.SQL("DO {}").format(sql.Literal(body)))
    return time.monotonic() - started


@dataclass(frozen=True, slots=True)
class Offered:
    """What a paced writer actually offered."""

    rows: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


async def paced_writer(
    db_url: str, table: str, *, rate: float, duration: float, rows_per_txn: int,
    payload_size: int, event_type: str = EVENT_TYPE, connections: int = 4,
    insert: sql.Composed | None = None,
) -> Offered:
    """Commit ``rate`` rows/s for ``duration`` s, ``rows_per_txn`` per transaction.

    Transactions follow an absolute schedule, so a late one is followed at once by the next
    instead of shifting all later ones (the offered rate does not drift down). The schedule
    is dealt round-robin to ``connections`` sessions, as concurrent writers would commit:
    one session waiting for each commit's WAL flush in turn could not offer the higher
    rates. The achieved rate is returned for the record. ``insert`` replaces the statement
    (one ``%s``: the row count), for a mix of event types.
    """
    if insert is None:
        insert = _insert_sql(table, await pad_for(db_url, payload_size), event_type)
    interval = rows_per_txn / rate
    connections = max(1, min(connections, int(duration / interval) or 1))
    started = time.monotonic() + 0.2  # every session connected before the first tick

    async def session(first: int) -> int:
        rows = 0
        async with await psycopg.AsyncConnection.connect(
            db_url, autocommit=True, application_name="bench-writer"
        ) as db:
            tick = first
            while (due := started + tick * interval) - started < duration:
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await db.execute(insert, (rows_per_txn,), prepare=True)
                rows += rows_per_txn
                tick += connections
        return rows

    written = await asyncio.gather(*(session(c) for c in range(connections)))
    return Offered(sum(written), time.monotonic() - started)
