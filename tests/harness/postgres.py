"""PostgreSQL for the tests: connections, roles, and removing databases, slots, prepared
transactions and checkpoints the tests created.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from harness.session import (
    SESSION,
    STALE_AFTER_S,
    STALE_DB_RE,
    STALE_SLOT_RE,
    db_url,
    is_ours_or_stale,
    session_services,
)

if TYPE_CHECKING:  # harness.relay imports this module
    from harness.relay import Env


# PostgreSQL


def pg_connect(url: str, **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, connect_timeout=10, **kw)


def drop_slot(conn: psycopg.Connection[Any], slot: str, timeout: float = 15.0) -> None:
    """Terminate the walsender holding ``slot`` (if any), then drop the slot (if it exists)."""
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
        if row is None:
            return
        if row[0] is not None:
            conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
            time.sleep(0.05)
        try:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            return
        except psycopg.errors.UndefinedObject:
            return
        except psycopg.errors.ObjectInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def delete_checkpoint(conn: psycopg.Connection[Any], slot: str) -> None:
    """Remove ``slot``'s row of the relay's checkpoint table, if that table exists."""
    if conn.execute("SELECT to_regclass('cdc.relay_checkpoint')").fetchone()[0]:
        conn.execute("DELETE FROM cdc.relay_checkpoint WHERE slot_name = %s", (slot,))


def rollback_prepared(conn: psycopg.Connection[Any], database: str, prefix: str = "") -> None:
    rows = conn.execute(
        "SELECT gid FROM pg_prepared_xacts WHERE database = %s AND gid LIKE %s",
        (database, prefix + "%"),
    ).fetchall()
    for (gid,) in rows:
        with contextlib.suppress(psycopg.Error):
            conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))


def drop_database(admin: psycopg.Connection[Any], name: str) -> None:
    admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()",
        (name,),
    )
    # Prepared transactions of that database must be resolved from inside it.
    with contextlib.suppress(psycopg.Error), pg_connect(db_url(name)) as conn:
        rollback_prepared(conn, name)
    for (slot,) in admin.execute(
        "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)
    ).fetchall():
        with contextlib.suppress(psycopg.Error):
            drop_slot(admin, slot)
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def sweep_postgres(admin: psycopg.Connection[Any], current_db: str | None) -> list[str]:
    """Drop this session's leftover slots/databases and stale ones of crashed sessions."""
    swept: list[str] = []
    for (slot,) in admin.execute(
        "SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE 'cdc\\_test\\_%'"
    ).fetchall():
        if is_ours_or_stale(slot, f"cdc_test_{SESSION}_", STALE_SLOT_RE):
            with contextlib.suppress(psycopg.Error):
                drop_slot(admin, slot)
                swept.append(f"slot {slot}")
    for (name,) in admin.execute(
        "SELECT datname FROM pg_database WHERE datname LIKE 'cdc\\_test\\_%'"
    ).fetchall():
        m = STALE_DB_RE.match(name)
        if name == current_db or (m and time.time() - int(m.group(1), 16) > STALE_AFTER_S):
            with contextlib.suppress(psycopg.Error):
                drop_database(admin, name)
                swept.append(f"database {name}")
    for (role,) in admin.execute(
        "SELECT rolname FROM pg_roles WHERE rolname LIKE 'cdc\\_test\\_%'"
    ).fetchall():
        if is_ours_or_stale(role, f"cdc_test_{SESSION}_", STALE_SLOT_RE):
            with contextlib.suppress(psycopg.Error):
                admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
                swept.append(f"role {role}")
    return swept


class SqlAccess:
    """A lazily opened connection to ``db_url`` and a one-call query helper for fixtures."""

    db_url: str
    _conn: psycopg.Connection[Any] | None

    @property
    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = pg_connect(self.db_url)
        return self._conn

    def sql(self, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
        cur = self.conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def create_role(attributes: str, env: Env, kind: str) -> str:
    """Create ``cdc_test_<S>_<t>_<kind>`` with ``attributes`` (trust auth: no password)."""
    role = f"cdc_test_{SESSION}_{env.tag}_{kind}"
    with pg_connect(session_services().admin_url) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} " + attributes).format(sql.Identifier(role)))
    return role


def drop_role(env: Env, role: str) -> None:
    """End the role's sessions, drop what it owns and its grants in the test database, drop it."""
    ident = sql.Identifier(role)
    with pg_connect(session_services().admin_url) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        with pg_connect(env.db_url) as conn:  # its grants and objects live in the test database
            conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))
