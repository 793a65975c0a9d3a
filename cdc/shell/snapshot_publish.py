"""Publish outbox rows read from a snapshot (backfill, recovery) with the relay's publisher.

Rows are read in batches in id order (keyset: ``id > last``) on a connection whose
transaction holds the snapshot, as text exactly as pgoutput would send them (same session
settings as the replication connection), turned into messages by
:func:`cdc.core.outbox.route_snapshot`, and published with the relay's confirm publisher
(:class:`cdc.shell.publisher.Publisher`: mandatory, persistent, parking of unroutable and
malformed rows). A batch is at most ``CDC_MAX_IN_FLIGHT`` rows, which is the window: the
next batch is read only when every message of this one is confirmed, and only then is
``on_batch`` told the batch's last id, so a caller that records it can resume after a
crash with at most one batch sent twice. Losing the broker raises
:class:`~cdc.errors.SinkError`; what was recorded stays recorded.

Rows whose ``id`` is NULL are not read (keyset order cannot reach them); an ``id`` primary
key excludes them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from cdc.config import RelaySettings
from cdc.core.outbox import OutboxColumns, route_snapshot
from cdc.core.watermark import Txn
from cdc.errors import SetupError, SinkError
from cdc.shell.metrics import Metrics
from cdc.shell.publisher import Publisher
from cdc.wire.pgoutput import Column, Relation, TupleData

Conn = psycopg.Connection[tuple[Any, ...]]
#: The replication connection's output settings, so values read here print the same.
SESSION_SETTINGS = (("TimeZone", "UTC"), ("DateStyle", "ISO, YMD"), ("extra_float_digits", "3"))


@dataclass(frozen=True, slots=True)
class SnapshotRows:
    """How to read one selection of outbox rows: the table's layout and a WHERE clause."""

    layout: OutboxColumns
    table: sql.Composed
    where: sql.Composable

    def count(self, conn: Conn) -> int:
        """Rows in the selection (in the connection's current snapshot)."""
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE {}").format(self.table, self.where)
        ).fetchone()
        return int(row[0]) if row else 0

    def fetch(self, conn: Conn, after_id: str | None, limit: int) -> list[tuple[str, TupleData]]:
        """The next ``limit`` rows after ``after_id`` in id order, as (id text, tuple)."""
        columns = sql.SQL(", ").join(
            sql.SQL("{}::text").format(sql.Identifier(c.name)) for c in self.layout.relation.columns
        )
        # Qualified: the output column "id" (text) must not be what ORDER BY sorts.
        keyset = sql.SQL("o.id > %s" if after_id is not None else "o.id IS NOT NULL")
        query = sql.SQL(
            "SELECT o.id::text, {} FROM {} AS o WHERE {} AND {} ORDER BY o.id LIMIT %s"
        ).format(columns, self.table, keyset, self.where)
        params: tuple[Any, ...] = (after_id, limit) if after_id is not None else (limit,)
        rows = conn.execute(query, params).fetchall()
        return [
            (str(r[0]), tuple(v.encode() if v is not None else None for v in r[1:])) for r in rows
        ]


def pin_session(conn: Conn) -> None:
    """Set the output settings for the current transaction (``SET LOCAL``)."""
    for name, value in SESSION_SETTINGS:
        conn.execute("SELECT set_config(%s, %s, true)", (name, value))


def table_layout(conn: Conn, settings: RelaySettings) -> tuple[OutboxColumns, sql.Composed]:
    """The outbox table's columns (as a pgoutput Relation would list them) and its name."""
    rows = conn.execute(
        "SELECT c.oid, a.attname, a.atttypid, a.atttypmod FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
        "WHERE n.nspname = %s AND c.relname = %s ORDER BY a.attnum",
        (settings.table_schema, settings.table_name),
    ).fetchall()
    if not rows:
        raise SetupError(f"table {settings.outbox_table} does not exist: run `cdc setup`")
    columns = tuple(Column(0, str(name), int(oid), int(mod)) for _, name, oid, mod in rows)
    relation = Relation(None, int(rows[0][0]), settings.table_schema, settings.table_name,
                        "d", columns)  # fmt: skip
    if "id" not in {c.name for c in columns}:
        raise SetupError(f"{settings.outbox_table} has no id column; the outbox needs one")
    table = sql.SQL("{}").format(sql.Identifier(settings.table_schema, settings.table_name))
    return OutboxColumns.of(relation), table


@dataclass(frozen=True, slots=True)
class Batch:
    """One confirmed batch: its last id and the totals so far."""

    last_id: str
    rows: int
    sent: int


async def publish_rows(
    settings: RelaySettings,
    metrics: Metrics,
    layout: OutboxColumns,
    fetch: Callable[[str | None, int], list[tuple[str, TupleData]]],
    *,
    source: str,
    snapshot: str,
    after_id: str | None = None,
    on_batch: Callable[[Batch], None] = lambda _: None,
) -> int:
    """Publish every row ``fetch`` returns, batch by batch; return how many were sent.

    ``fetch(after_id, limit)`` runs in a worker thread (it does blocking database reads);
    ``on_batch`` runs after each batch is confirmed in full (also in a worker thread).
    """
    confirmed = 0
    progress = asyncio.Event()

    def on_confirm(txns: list[Txn]) -> None:
        nonlocal confirmed
        confirmed += len(txns)
        progress.set()

    publisher = Publisher(settings, metrics, on_confirm)
    await publisher.connect()
    sent = 0
    try:
        while True:
            rows = await asyncio.to_thread(fetch, after_id, settings.max_in_flight)
            if not rows:
                return sent
            txn = Txn(0, time.time())
            await publisher.wait_writable()
            for _, row in rows:
                item = route_snapshot(layout, row, source=source, snapshot=snapshot)
                publisher.publish(txn, item)
            sent += len(rows)
            while confirmed < sent:
                progress.clear()
                waiter: asyncio.Future[Any] = asyncio.ensure_future(progress.wait())
                waiting: set[asyncio.Future[Any]] = {waiter, publisher.closed}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if publisher.closed.done():
                    raise publisher.closed.exception() or SinkError("broker connection closed")
            after_id = rows[-1][0]
            await asyncio.to_thread(on_batch, Batch(after_id, len(rows), sent))
    finally:
        await publisher.close()
