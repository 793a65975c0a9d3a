"""TEMPORARY stand-in for the one slot-creation function (``cdc/slot_create.py``).

Same signature as the real one; deleted when that lands on main (one import changes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq, sql

from cdc.config import RelaySettings
from cdc.errors import SetupError, SourceError
from cdc.lsn import parse_lsn

Conn = psycopg.Connection[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class CreatedSlot:
    """A slot just created, its start, its base snapshot and the system identity."""

    slot_name: str
    consistent_lsn: int
    snapshot_name: str | None
    base_snapshot: str
    system_identifier: str
    timeline: int


def _command(pgconn: pq.abc.PGconn, command: bytes) -> pq.abc.PGresult:
    result = pgconn.exec_(command)
    if result.status != pq.ExecStatus.TUPLES_OK or result.ntuples != 1:
        text = (result.error_message or b"").decode(errors="replace").strip()
        raise SetupError(f"{command.decode()} failed: {text}")
    return result


def _value(result: pq.abc.PGresult, column: int) -> str:
    raw = result.get_value(0, column)
    return "" if raw is None else raw.decode()


@contextlib.contextmanager
def exported_slot(
    settings: RelaySettings, *, failover: bool = False
) -> Iterator[tuple[CreatedSlot, Conn]]:
    """Create the slot and yield it with a connection inside its exported snapshot."""
    url = settings.database_url.get_secret_value()
    try:
        repl = psycopg.connect(url, replication="database", autocommit=True)
    except psycopg.OperationalError as exc:
        raise SourceError(f"cannot open a replication connection: {exc}") from exc
    with repl:
        ident = _command(repl.pgconn, b"IDENTIFY_SYSTEM")
        name = '"' + settings.slot_name.replace('"', '""') + '"'
        options = "SNAPSHOT 'export'" + (", FAILOVER true" if failover else "")
        result = _command(
            repl.pgconn, f"CREATE_REPLICATION_SLOT {name} LOGICAL pgoutput ({options})".encode()
        )
        with psycopg.connect(url) as reader:
            reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            snapshot_name = _value(result, 2) or None
            if snapshot_name is not None:
                reader.execute(
                    sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name))
                )
            row = reader.execute("SELECT pg_current_snapshot()::text").fetchone()
            created = CreatedSlot(
                settings.slot_name,
                parse_lsn(_value(result, 1) or "0/0"),
                snapshot_name,
                str(row[0]) if row else "",
                _value(ident, 0),
                int(_value(ident, 1) or 0),
            )
            try:
                yield created, reader
            finally:
                reader.rollback()
