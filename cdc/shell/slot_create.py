"""The one way the relay's slot is made: with an exported snapshot and the system's identity.

``CREATE_REPLICATION_SLOT ... (SNAPSHOT 'export')`` runs on a ``replication=database``
connection (walsenders speak only the simple query protocol, so it goes through
``pgconn.exec_``). The snapshot it exports is the boundary between "already in the table"
and "comes from the stream", and it lives only until the next command on that connection,
so the replication connection stays idle while a second, ordinary connection imports it
(``SET TRANSACTION SNAPSHOT``) and reads what it needs. ``IDENTIFY_SYSTEM`` runs first, on
the same connection, for the system identifier and timeline the checkpoint records.

:func:`create_slot` is the plain form (``cdc setup``, the relay's first start);
:func:`exported_slot` keeps the snapshot open while the caller reads rows in it (backfill,
recovery).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq, sql

from cdc.config import RelaySettings
from cdc.core.checkpoint import normalize_snapshot
from cdc.core.failover import supported as failover_slots_supported
from cdc.core.lsn import parse_lsn
from cdc.errors import SourceError
from cdc.service.refusals import refused_by_postgres
from cdc.shell.source import translate_error
from cdc.wire.replication import IDENTIFY_SYSTEM, create_slot_command

Conn = psycopg.Connection[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class SystemIdentity:
    """What IDENTIFY_SYSTEM says about the server a replication connection reached."""

    system_identifier: str
    timeline: int


@dataclass(frozen=True, slots=True)
class CreatedSlot:
    """A slot just created: where it starts and the snapshot that matches that start.

    ``base_snapshot`` is ``pg_current_snapshot()`` read inside the exported snapshot (the
    ``pg_snapshot`` text ``xmin:xmax:xip,...``); it outlives ``snapshot_name``, which is
    valid only while :func:`exported_slot` is open.
    """

    slot_name: str
    consistent_lsn: int
    snapshot_name: str | None
    base_snapshot: str
    system_identifier: str
    timeline: int


def _value(result: pq.abc.PGresult, column: int) -> str | None:
    raw = result.get_value(0, column)
    return None if raw is None else raw.decode()


def _command(pgconn: pq.abc.PGconn, command: bytes) -> pq.abc.PGresult:
    result = pgconn.exec_(command)
    if result.status != pq.ExecStatus.TUPLES_OK or result.ntuples != 1:
        raise translate_error(result, pgconn)
    return result


def identify_system(conn: Conn) -> SystemIdentity:
    """Run IDENTIFY_SYSTEM on a ``replication=database`` connection."""
    result = _command(conn.pgconn, IDENTIFY_SYSTEM)
    return SystemIdentity(_value(result, 0) or "", int(_value(result, 1) or 0))


def replication_connect(settings: RelaySettings) -> Conn:
    """Open a ``replication=database`` connection (for IDENTIFY_SYSTEM and slot creation)."""
    try:
        return psycopg.connect(
            settings.dsn(), replication="database", autocommit=True
        )
    except psycopg.OperationalError as exc:
        doing = "cannot open a replication connection"
        refused = refused_by_postgres(str(exc), doing)
        raise refused or SourceError(f"{doing}: {exc}".strip()) from exc


@contextlib.contextmanager
def exported_slot(
    settings: RelaySettings, *, failover: bool | None = None
) -> Iterator[tuple[CreatedSlot, Conn]]:
    """Create ``settings.slot_name`` and yield it with a connection inside its snapshot.

    The yielded connection is in a REPEATABLE READ transaction that imported the slot's
    exported snapshot: it sees exactly the rows committed before the slot's first streamed
    change. Read them before leaving the block; the transaction is rolled back and both
    connections are closed on exit (the slot stays). ``failover`` defaults to "where the
    server has failover slots" (17+), so standbys that sync slots keep a copy. A slot that
    already exists is a :class:`SourceError` (SQLSTATE 42710), missing privileges a
    ``SetupError``.
    """
    with replication_connect(settings) as repl:
        if failover is None:
            failover = failover_slots_supported(repl.info.server_version)
        identity = identify_system(repl)
        result = _command(repl.pgconn, create_slot_command(settings.slot_name, failover=failover))
        # Columns: slot_name, consistent_point, snapshot_name, output_plugin. Nothing may be
        # sent on `repl` from here until the reader is done: that would end the snapshot.
        consistent = parse_lsn(_value(result, 1) or "0/0")
        snapshot_name = _value(result, 2)
        try:
            reader = psycopg.connect(settings.dsn())
        except psycopg.OperationalError as exc:
            raise SourceError(f"cannot connect to PostgreSQL: {exc}".strip()) from exc
        with reader:
            reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            if snapshot_name is not None:
                reader.execute(
                    sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name))
                )
            row = reader.execute("SELECT pg_current_snapshot()::text").fetchone()
            created = CreatedSlot(
                slot_name=settings.slot_name,
                consistent_lsn=consistent,
                snapshot_name=snapshot_name,
                base_snapshot=normalize_snapshot(str(row[0])) if row else "",
                system_identifier=identity.system_identifier,
                timeline=identity.timeline,
            )
            try:
                yield created, reader
            finally:
                reader.rollback()


def create_slot(settings: RelaySettings, *, failover: bool | None = None) -> CreatedSlot:
    """Create the slot and return where it starts, its base snapshot and the system identity."""
    with exported_slot(settings, failover=failover) as (created, _reader):
        return created


def current_identity(settings: RelaySettings) -> SystemIdentity:
    """IDENTIFY_SYSTEM over a short-lived replication connection."""
    with replication_connect(settings) as repl:
        return identify_system(repl)
