"""The outbox table and its publication: create them if absent, check what is there.

Runs over an ordinary (non-replication) connection with bound parameters; identifiers are
composed with ``psycopg.sql.Identifier``, never pasted in. A table that lacks a required
column is a :class:`SetupError` that names the columns.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from cdc.config import RelaySettings
from cdc.core.outbox import REQUIRED_COLUMNS
from cdc.errors import SetupError

Conn = psycopg.Connection[tuple[Any, ...]]


def _count(conn: Conn, query: str, params: tuple[Any, ...]) -> int:
    row = conn.execute(query, params).fetchone()
    return int(row[0]) if row else 0


def table_exists(conn: Conn, settings: RelaySettings) -> bool:
    """Whether the configured outbox table exists (by schema and name)."""
    return bool(
        _count(
            conn,
            "SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename = %s",
            (settings.table_schema, settings.table_name),
        )
    )


def ensure_table(conn: Conn, settings: RelaySettings) -> None:
    """Create the outbox table from ``sql/`` if absent, then check its required columns."""
    table = sql.Identifier(settings.table_schema, settings.table_name)
    for script in sorted(resources.files("cdc.sql").iterdir(), key=lambda p: p.name):
        if script.name.endswith(".sql"):
            conn.execute(sql.SQL(script.read_text()).format(table=table))
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = %s",
        (settings.table_schema, settings.table_name),
    ).fetchall()
    missing = set(REQUIRED_COLUMNS) - {r[0] for r in rows}
    if missing:
        raise SetupError(
            f"{settings.outbox_table} lacks columns {sorted(missing)}; the outbox needs "
            f"{', '.join(REQUIRED_COLUMNS)}"
        )


def ensure_publication(conn: Conn, settings: RelaySettings) -> None:
    """Create the publication for the outbox table (INSERTs only), or add the table to it."""
    pub = sql.Identifier(settings.publication_name)
    table = sql.Identifier(settings.table_schema, settings.table_name)
    exists = _count(
        conn, "SELECT count(*) FROM pg_publication WHERE pubname = %s", (settings.publication_name,)
    )
    if not exists:
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert')").format(
                pub, table
            )
        )
        return
    if not table_published(conn, settings):
        conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(pub, table))


def table_published(conn: Conn, settings: RelaySettings) -> bool:
    """Whether the publication carries the configured table, by schema and name.

    A table renamed away (and perhaps recreated under the old name) drops out here even
    though the publication still holds the renamed one.
    """
    return bool(
        _count(
            conn,
            "SELECT count(*) FROM pg_publication_tables "
            "WHERE pubname = %s AND schemaname = %s AND tablename = %s",
            (settings.publication_name, settings.table_schema, settings.table_name),
        )
    )
