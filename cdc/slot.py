"""Database-side set-up and inspection: outbox table, publication, slot, status.

Runs over an ordinary (non-replication) connection with bound parameters; identifiers are
composed with ``psycopg.sql.Identifier``, never pasted in. Every refusal is a
:class:`SetupError` whose message says what the operator should run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from cdc.config import RelaySettings
from cdc.errors import SetupError, SourceError
from cdc.failover import supported as failover_slots_supported
from cdc.outbox import REQUIRED_COLUMNS

Conn = psycopg.Connection[tuple[Any, ...]]


def connect(settings: RelaySettings) -> Conn:
    """Open an autocommit connection, translating failures into actionable errors."""
    try:
        return psycopg.connect(settings.database_url.get_secret_value(), autocommit=True)
    except psycopg.OperationalError as exc:
        raise SourceError(f"cannot connect to PostgreSQL: {exc}".strip()) from exc


def _one(conn: Conn, query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def check_server(conn: Conn) -> None:
    """Refuse with instructions unless wal_level is logical and the role may replicate."""
    level = _one(conn, "SHOW wal_level")
    if level != "logical":
        raise SetupError(
            f"wal_level is {level!r}, logical replication needs 'logical': run "
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
        )
    can = _one(conn, "SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user")
    if not can:
        user = _one(conn, "SELECT current_user")
        raise SetupError(f"role {user!r} may not replicate: run ALTER ROLE {user} REPLICATION")


def _table_exists(conn: Conn, settings: RelaySettings) -> bool:
    return bool(
        _one(
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
    exists = _one(conn, "SELECT count(*) FROM pg_publication WHERE pubname = %s",
                  (settings.publication_name,))
    if not exists:
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert')").format(
                pub, table
            )
        )
        return
    has_table = _one(
        conn,
        "SELECT count(*) FROM pg_publication_tables "
        "WHERE pubname = %s AND schemaname = %s AND tablename = %s",
        (settings.publication_name, settings.table_schema, settings.table_name),
    )
    if not has_table:
        conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(pub, table))


def require_publication(conn: Conn, settings: RelaySettings) -> None:
    """Fail with instructions if the publication is missing (the relay does not make it)."""
    if not _one(conn, "SELECT count(*) FROM pg_publication WHERE pubname = %s",
                (settings.publication_name,)):
        raise SetupError(
            f"publication {settings.publication_name!r} does not exist: run `cdc setup`"
        )


def create_slot(conn: Conn, settings: RelaySettings) -> None:
    """Create the pgoutput slot; on PostgreSQL 17+ as a failover slot.

    A failover slot is synchronized to standbys that run with ``sync_replication_slots``,
    so after a promotion the relay continues from the copy there instead of finding no
    slot (docs/operations.md lists the server settings). Older servers get a plain slot.
    """
    if failover_slots_supported(conn.info.server_version):
        # (name, plugin, temporary, twophase, failover)
        conn.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput', false, false, true)",
            (settings.slot_name,),
        )
    else:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')",
                     (settings.slot_name,))


def ensure_slot(conn: Conn, settings: RelaySettings) -> bool:
    """Create the logical slot if missing; return True if it was created."""
    plugin = _one(conn, "SELECT plugin FROM pg_replication_slots WHERE slot_name = %s",
                  (settings.slot_name,))
    if plugin is None:
        try:
            create_slot(conn, settings)
        except psycopg.errors.DuplicateObject:
            return False  # another relay created it between our look and our create
        except psycopg.Error as exc:
            raise SetupError(f"cannot create slot {settings.slot_name!r}: {exc}") from exc
        return True
    if plugin != "pgoutput":
        raise SetupError(
            f"slot {settings.slot_name!r} uses plugin {plugin!r}, not pgoutput: "
            "drop it or choose another CDC_SLOT_NAME"
        )
    return False


def setup(settings: RelaySettings) -> list[str]:
    """Idempotent `cdc setup`: checks, table, publication, slot. Returns what it did."""
    with connect(settings) as conn:
        check_server(conn)
        done = []
        if not _table_exists(conn, settings):
            done.append(f"created table {settings.outbox_table}")
        try:
            ensure_table(conn, settings)
            ensure_publication(conn, settings)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise SetupError(
                f"{exc}: grant CREATE on the schema and ownership of the table"
            ) from exc
        done.append(f"publication {settings.publication_name} covers {settings.outbox_table}")
        created = ensure_slot(conn, settings)
        done.append(f"{'created' if created else 'kept'} slot {settings.slot_name}")
        return done


@dataclass(frozen=True, slots=True)
class SlotStatus:
    """What `cdc status` reports."""

    slot_name: str
    exists: bool
    plugin: str | None = None
    active: bool = False
    active_pid: int | None = None
    restart_lsn: str | None = None
    confirmed_flush_lsn: str | None = None
    current_wal_lsn: str | None = None
    lag_bytes: int | None = None
    retained_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready mapping with the documented keys."""
        return asdict(self)


def status(settings: RelaySettings) -> SlotStatus:
    """Read the slot's position and lag from pg_replication_slots."""
    with connect(settings) as conn:
        row = conn.execute(
            "SELECT plugin, active, active_pid, restart_lsn::text, confirmed_flush_lsn::text, "
            "pg_current_wal_lsn()::text, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint "
            "FROM pg_replication_slots WHERE slot_name = %s",
            (settings.slot_name,),
        ).fetchone()
    if row is None:
        return SlotStatus(settings.slot_name, exists=False)
    return SlotStatus(settings.slot_name, True, *row)
