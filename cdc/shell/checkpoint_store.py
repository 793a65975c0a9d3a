"""Reads and writes of ``cdc.relay_checkpoint`` over an ordinary autocommit connection.

The rules live in ``cdc/core/checkpoint.py``; this module only moves rows. Snapshots travel as
``pg_snapshot`` text and LSNs as ``pg_lsn`` text, cast in SQL. Every update but
:func:`mark_lost` touches only a row in state ``ready``, so a relay never overwrites what
``cdc recover`` is doing.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from cdc.config import RelaySettings
from cdc.core.checkpoint import LOST, READY, Checkpoint, normalize_snapshot, plan_write
from cdc.core.lsn import format_lsn, parse_lsn
from cdc.errors import SetupError

Conn = psycopg.Connection[tuple[Any, ...]]

TABLE = "cdc.relay_checkpoint"

_SELECT = (
    "SELECT slot_name, outbox_table, publication_name, system_identifier, timeline,"
    " confirmed_lsn::text AS confirmed_lsn, proven_snapshot::text AS proven_snapshot,"
    " base_snapshot::text AS base_snapshot, state, lost_reason, proven_at,"
    " candidate_snapshot::text AS candidate_snapshot, candidate_lsn::text AS candidate_lsn,"
    " backfill_mode, backfill_since, backfill_done, backfill_after_id, backfill_rows_done,"
    " backfill_rows_total, created_at, updated_at"
    " FROM cdc.relay_checkpoint WHERE slot_name = %s"
)


def table_exists(conn: Conn) -> bool:
    """Whether ``cdc setup`` has created the checkpoint table."""
    row = conn.execute("SELECT to_regclass('cdc.relay_checkpoint') IS NOT NULL").fetchone()
    return bool(row and row[0])


def read(conn: Conn, slot_name: str) -> Checkpoint | None:
    """The slot's row, or ``None`` (first start). No table is a :class:`SetupError`."""
    if not table_exists(conn):
        raise SetupError(
            f"the relay's checkpoint table {TABLE} does not exist: run `cdc setup` "
            "(once, after upgrading)"
        )
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(_SELECT, (slot_name,)).fetchone()
    if row is None:
        return None
    row["confirmed_lsn"] = parse_lsn(row["confirmed_lsn"])
    if row["candidate_lsn"] is not None:
        row["candidate_lsn"] = parse_lsn(row["candidate_lsn"])
    return Checkpoint(**row)


def insert(conn: Conn, cp: Checkpoint) -> bool:
    """Insert a first row for the slot; False if one exists already (another relay won)."""
    cur = conn.execute(
        "INSERT INTO cdc.relay_checkpoint (slot_name, outbox_table, publication_name,"
        " system_identifier, timeline, state, confirmed_lsn, proven_snapshot, base_snapshot,"
        " backfill_mode, backfill_since, backfill_done, backfill_rows_total)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s::pg_lsn, %s::pg_snapshot, %s::pg_snapshot,"
        " %s, %s, %s, %s) ON CONFLICT (slot_name) DO NOTHING",
        (
            cp.slot_name, cp.outbox_table, cp.publication_name, cp.system_identifier,
            cp.timeline, cp.state, format_lsn(cp.confirmed_lsn), cp.proven_snapshot,
            cp.base_snapshot, cp.backfill_mode, cp.backfill_since, cp.backfill_done,
            cp.backfill_rows_total,
        ),
    )
    return cur.rowcount == 1


def first_row(
    settings: RelaySettings, sysid: str, timeline: int, lsn: int, snapshot: str
) -> Checkpoint:
    """The row of a slot just made or adopted: proven and base snapshot are the same one
    (no stream row lies below its xmin yet)."""
    return Checkpoint(
        slot_name=settings.slot_name,
        outbox_table=settings.outbox_table,
        publication_name=settings.publication_name,
        system_identifier=sysid,
        timeline=timeline,
        confirmed_lsn=lsn,
        proven_snapshot=snapshot,
        base_snapshot=snapshot,
    )


def current_snapshot(conn: Conn) -> str:
    """``pg_current_snapshot()`` as text, read now on ``conn``."""
    row = conn.execute("SELECT pg_current_snapshot()::text").fetchone()
    return normalize_snapshot(str(row[0])) if row else ""


def mark_lost(conn: Conn, slot_name: str, reason: str) -> None:
    """Record that the slot is lost (first reason wins; a recovery in progress is kept)."""
    conn.execute(
        "UPDATE cdc.relay_checkpoint SET state = %s, lost_reason = %s, updated_at = now()"
        " WHERE slot_name = %s AND state = %s",
        (LOST, reason, slot_name, READY),
    )


def set_timeline(conn: Conn, slot_name: str, timeline: int) -> None:
    """Record the timeline a failover slot now streams on."""
    conn.execute(
        "UPDATE cdc.relay_checkpoint SET timeline = %s, updated_at = now()"
        " WHERE slot_name = %s AND state = %s",
        (timeline, slot_name, READY),
    )


def write_checkpoint(conn: Conn, slot_name: str, flushed: int) -> bool:
    """One periodic checkpoint (the rule is :func:`cdc.core.checkpoint.plan_write`).

    The new candidate is read snapshot FIRST, insert LSN SECOND, in separate statements:
    every transaction visible in the snapshot then has its commit record below that LSN.
    Returns True if a candidate was promoted to the proven snapshot.
    """
    row = conn.execute(
        "SELECT confirmed_lsn::text, candidate_snapshot::text, candidate_lsn::text"
        " FROM cdc.relay_checkpoint WHERE slot_name = %s AND state = %s",
        (slot_name, READY),
    ).fetchone()
    if row is None:
        return False
    snapshot = current_snapshot(conn)
    lsn_row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert lsn_row is not None
    plan = plan_write(
        confirmed_lsn=parse_lsn(row[0]),
        candidate_snapshot=row[1],
        candidate_lsn=parse_lsn(row[2]) if row[2] else None,
        flushed=flushed,
        new_snapshot=snapshot,
        new_lsn=parse_lsn(lsn_row[0]),
    )
    conn.execute(
        "UPDATE cdc.relay_checkpoint SET confirmed_lsn = %s::pg_lsn,"
        " proven_snapshot = coalesce(%s::pg_snapshot, proven_snapshot),"
        " proven_at = CASE WHEN %s::pg_snapshot IS NULL THEN proven_at ELSE now() END,"
        " candidate_snapshot = %s::pg_snapshot, candidate_lsn = %s::pg_lsn, updated_at = now()"
        " WHERE slot_name = %s AND state = %s",
        (
            format_lsn(plan.confirmed_lsn), plan.proven_snapshot, plan.proven_snapshot,
            plan.candidate_snapshot, format_lsn(plan.candidate_lsn), slot_name, READY,
        ),
    )
    return plan.proven_snapshot is not None
