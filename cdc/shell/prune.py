"""``cdc prune --older-than <d>``: delete outbox rows the checkpoint proves published.

A row goes only if ``created_at < now() - d`` *and* :func:`cdc.core.horizon.published` holds
for it: a row the relay has not confirmed, a row from before the cutover that was neither
backfilled nor marked ``published`` by the poller, is never deleted, however old, and
with the relay stopped the horizon stops too, so nothing newer than it goes.

Short transactions, short locks: the table is walked in ranges of pages (a TID range
scan, so each step reads only those pages, not the table again), and each step deletes at
most ``batch`` rows in its own transaction with ``FOR UPDATE SKIP LOCKED``. Writers only
insert, which never waits for these row locks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from cdc.config import RelaySettings
from cdc.core.horizon import published
from cdc.errors import SetupError
from cdc.shell import horizon_store as store
from cdc.shell import slot as slots

Conn = psycopg.Connection[tuple[Any, ...]]
BATCH_ROWS = 500
PAGES_PER_STEP = 64


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What a prune did."""

    deleted: int
    kept_unproven: int
    seconds: float

    def summary(self, older_than: str) -> str:
        """One line for the operator."""
        return (
            f"pruned {self.deleted} published rows older than {older_than}; kept "
            f"{self.kept_unproven} older rows not proven published; {self.seconds:.1f}s"
        )


def _pages(conn: Conn, settings: RelaySettings) -> int:
    row = conn.execute(
        "SELECT pg_relation_size(c.oid) / current_setting('block_size')::bigint "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        (settings.table_schema, settings.table_name),
    ).fetchone()
    return int(row[0]) if row else 0


def prune(
    settings: RelaySettings, older_than: float, batch: int = BATCH_ROWS
) -> PruneResult:
    """Delete the proven-published rows older than ``older_than`` seconds."""
    started = time.monotonic()
    with slots.connect(settings) as conn:
        checkpoint = store.load(conn, settings)
        if checkpoint is None:
            raise SetupError(
                f"no checkpoint for slot {settings.slot_name}, so no row is proven "
                "published: run `cdc setup` and `cdc relay` first"
            )
        columns = {
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = %s",
                (settings.table_schema, settings.table_name),
            ).fetchall()
        }
        if "created_at" not in columns:
            raise SetupError(f"{settings.outbox_table} has no created_at column to prune by")
        row = conn.execute(
            "SELECT now() - make_interval(secs => %s)", (older_than,)
        ).fetchone()
        cutoff = row[0] if row else None
        table = sql.Identifier(settings.table_schema, settings.table_name)
        proven = published(store.horizon(conn, settings, checkpoint))
        delete = sql.SQL(
            "DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} "
            "WHERE ctid >= %(lo)s::tid AND ctid < %(hi)s::tid AND created_at < %(cutoff)s "
            "AND {proven} LIMIT %(n)s FOR UPDATE SKIP LOCKED))"
        ).format(t=table, proven=proven)
        deleted = 0
        pages = _pages(conn, settings)
        for first in range(0, pages, PAGES_PER_STEP):
            bounds = {"lo": f"({first},0)", "hi": f"({first + PAGES_PER_STEP},0)"}
            while True:
                params = {**bounds, "cutoff": cutoff, "n": batch}
                n = conn.execute(delete, params).rowcount
                deleted += max(n, 0)
                if n < batch:
                    break
        kept = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE created_at < %s AND NOT {}").format(
                table, proven
            ),
            (cutoff,),
        ).fetchone()
    return PruneResult(deleted, int(kept[0]) if kept else 0, time.monotonic() - started)
