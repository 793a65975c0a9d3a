"""The checkpoint row's horizon, backfill and recovery fields (``cdc.relay_checkpoint``).

Thin I/O over an autocommit connection: read the :class:`~cdc.horizon.Horizon` that prune
and recovery trust, write the row a backfill starts with, its progress, and the outcome of
a recovery. Every statement is keyed by the slot name, bound as a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from cdc.config import RelaySettings
from cdc.horizon import BackfillMode, Horizon

Conn = psycopg.Connection[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class Backfill:
    """A slot's backfill: mode, where it got to, and its counts."""

    mode: BackfillMode
    since: datetime | None
    done: bool
    after_id: str | None
    rows_done: int
    rows_total: int


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The fields of the checkpoint row that backfill, recovery and prune read."""

    state: str
    lost_reason: str | None
    system_identifier: str
    horizon: Horizon
    backfill: Backfill


def has_status_column(conn: Conn, settings: RelaySettings) -> bool:
    """Whether the outbox table has the poller's ``status`` column."""
    row = conn.execute(
        "SELECT count(*) FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = %s AND column_name = 'status'",
        (settings.table_schema, settings.table_name),
    ).fetchone()
    return bool(row and row[0])


def load(conn: Conn, settings: RelaySettings) -> Checkpoint | None:
    """The slot's checkpoint row, or ``None`` if the slot was never set up.

    ``conn`` must be in autocommit mode (a failed read would abort a transaction).
    """
    try:
        row = conn.execute(
            "SELECT state, lost_reason, system_identifier, proven_snapshot::text, "
            "base_snapshot::text, backfill_mode, backfill_since, backfill_done, "
            "backfill_after_id, backfill_rows_done, backfill_rows_total "
            "FROM cdc.relay_checkpoint WHERE slot_name = %s",
            (settings.slot_name,),
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        return None  # `cdc setup` has never run on this database
    if row is None:
        return None
    state, reason, system_id, proven, base, mode, since, done, after, n, total = row
    horizon = Horizon(proven, base, mode, since, done, has_status_column(conn, settings))
    return Checkpoint(
        state, reason, system_id, horizon, Backfill(mode, since, done, after, n, total)
    )


def insert_backfill(
    conn: Conn,
    settings: RelaySettings,
    *,
    system_identifier: str,
    timeline: int,
    confirmed_lsn: str,
    base_snapshot: str,
    mode: BackfillMode,
    since: datetime | None,
    rows_total: int,
) -> None:
    """Write the row of a slot just created for a backfill (not done, nothing sent yet).

    The proven snapshot starts as the base one: no stream row lies below its xmin.
    """
    conn.execute(
        "INSERT INTO cdc.relay_checkpoint (slot_name, outbox_table, publication_name, "
        "system_identifier, timeline, confirmed_lsn, proven_snapshot, base_snapshot, "
        "backfill_mode, backfill_since, backfill_done, backfill_rows_total) "
        "VALUES (%s, %s, %s, %s, %s, %s::pg_lsn, %s::pg_snapshot, %s::pg_snapshot, "
        "%s, %s, false, %s)",
        (
            settings.slot_name, settings.outbox_table, settings.publication_name,
            system_identifier, timeline, confirmed_lsn, base_snapshot, base_snapshot,
            mode, since, rows_total,
        ),
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
