"""The checkpoint row as backfill, recovery and prune use it (``cdc.relay_checkpoint``).

Thin I/O over an autocommit connection, on top of ``cdc/shell/checkpoint_store.py`` (which reads
and inserts the row): the :class:`~cdc.core.horizon.Horizon` that prune and recovery trust, the
first row of a backfill, its progress, and the outcome of a recovery. Every statement is
keyed by the slot name, bound as a parameter.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

import psycopg

from cdc.config import RelaySettings
from cdc.core.checkpoint import Checkpoint
from cdc.core.horizon import BACKFILL_MODES, BackfillMode, Horizon
from cdc.errors import SetupError
from cdc.shell import checkpoint_store

Conn = psycopg.Connection[tuple[Any, ...]]


def has_status_column(conn: Conn, settings: RelaySettings) -> bool:
    """Whether the outbox table has the poller's ``status`` column."""
    row = conn.execute(
        "SELECT count(*) FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = %s AND column_name = 'status'",
        (settings.table_schema, settings.table_name),
    ).fetchone()
    return bool(row and row[0])


def load(conn: Conn, settings: RelaySettings) -> Checkpoint | None:
    """The slot's checkpoint row, or ``None`` if the slot was never set up."""
    if not checkpoint_store.table_exists(conn):
        return None  # `cdc setup` has never run on this database
    return checkpoint_store.read(conn, settings.slot_name)


def backfill_mode(row: Checkpoint) -> BackfillMode:
    """The row's backfill mode, checked against the known ones."""
    for mode in BACKFILL_MODES:
        if row.backfill_mode == mode:
            return mode
    raise SetupError(f"checkpoint of slot {row.slot_name} has backfill mode {row.backfill_mode!r}")


def horizon(conn: Conn, settings: RelaySettings, row: Checkpoint) -> Horizon:
    """What the row proves published (see :mod:`cdc.core.horizon`)."""
    return Horizon(
        row.proven_snapshot,
        row.base_snapshot,
        backfill_mode(row),
        row.backfill_since,
        row.backfill_done,
        has_status_column(conn, settings),
    )


def insert_backfill(
    conn: Conn,
    settings: RelaySettings,
    *,
    system_identifier: str,
    timeline: int,
    confirmed_lsn: int,
    base_snapshot: str,
    mode: BackfillMode,
    since: datetime | None,
    rows_total: int,
) -> None:
    """Write the row of a slot just created for a backfill (not done, nothing sent yet).

    The proven snapshot starts as the base one: no stream row lies below its xmin.
    """
    row = replace(
        checkpoint_store.first_row(
            settings, system_identifier, timeline, confirmed_lsn, base_snapshot
        ),
        backfill_mode=mode,
        backfill_since=since,
        backfill_done=False,
        backfill_rows_total=rows_total,
    )
    if not checkpoint_store.insert(conn, row):
        raise SetupError(
            f"slot {settings.slot_name} got a checkpoint from another process meanwhile "
            "(a relay started before this setup?): check `cdc status`"
        )


def start_backfill(
    conn: Conn, settings: RelaySettings, mode: BackfillMode, since: datetime | None, total: int
) -> None:
    """Give a slot set up without a backfill one now (nothing sent yet)."""
    conn.execute(
        "UPDATE cdc.relay_checkpoint SET backfill_mode = %s, backfill_since = %s, "
        "backfill_done = false, backfill_after_id = NULL, backfill_rows_done = 0, "
        "backfill_rows_total = %s, updated_at = now() "
        "WHERE slot_name = %s AND backfill_mode = 'none'",
        (mode, since, total, settings.slot_name),
    )


def record_backfill(
    conn: Conn, settings: RelaySettings, after_id: str | None, rows_done: int, done: bool
) -> None:
    """Record that every row up to ``after_id`` (in id order) is confirmed by the broker."""
    conn.execute(
        "UPDATE cdc.relay_checkpoint SET backfill_after_id = %s, backfill_rows_done = %s, "
        "backfill_done = %s, updated_at = now() WHERE slot_name = %s",
        (after_id, rows_done, done, settings.slot_name),
    )


def mark_recovering(conn: Conn, settings: RelaySettings) -> None:
    """Committed before anything else a recovery does: an interrupted one is redone."""
    conn.execute(
        "UPDATE cdc.relay_checkpoint SET state = 'recovering', updated_at = now() "
        "WHERE slot_name = %s",
        (settings.slot_name,),
    )


def finish_recovery(
    conn: Conn,
    settings: RelaySettings,
    *,
    snapshot: str,
    system_identifier: str,
    timeline: int,
    confirmed_lsn: str,
) -> None:
    """After a recovery: every stream row below the new slot's snapshot is published."""
    conn.execute(
        "UPDATE cdc.relay_checkpoint SET state = 'ready', lost_reason = NULL, "
        "proven_snapshot = %s::pg_snapshot, proven_at = now(), candidate_snapshot = NULL, "
        "candidate_lsn = NULL, system_identifier = %s, timeline = %s, "
        "confirmed_lsn = %s::pg_lsn, updated_at = now() WHERE slot_name = %s",
        (snapshot, system_identifier, timeline, confirmed_lsn, settings.slot_name),
    )
