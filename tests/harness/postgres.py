"""PostgreSQL for the tests: connections, roles, and removing databases, slots, prepared
transactions and checkpoints the tests created.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from harness.common import Teardown, parse_lsn
from harness.rows import Row, insert_rows
from harness.session import (
    REPO,
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


async def without_autovacuum(
    conn: psycopg.AsyncConnection[Any], schema: str, tables: tuple[str, ...]
) -> None:
    """Keep autovacuum off ``schema``'s ``tables``, so they stay without statistics (as a new
    deployment's tables are until autovacuum's first ANALYZE) for as long as a test needs."""
    for table in tables:
        await conn.execute(
            sql.SQL("ALTER TABLE {}.{} SET (autovacuum_enabled = false)").format(
                sql.Identifier(schema), sql.Identifier(table)
            )
        )


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


class OutboxDb(SqlAccess):
    """One test's PostgreSQL names in ``dbname`` (outbox table, slot, publication, prefix of
    its prepared transactions) and helpers over them; ``drop(teardown)`` removes them all."""

    def __init__(self, dbname: str, url: str, tag: str) -> None:
        self.dbname = dbname
        self.db_url = url
        self.table = f"public.outbox_{tag}"
        self.slot = f"cdc_test_{SESSION}_{tag}"
        self.publication = f"cdc_test_pub_{tag}"
        self.gid_prefix = f"cdc_test_{SESSION}_{tag}_"
        self.extra_tables: list[str] = []
        self._conn: psycopg.Connection[Any] | None = None

    def connect(self) -> psycopg.Connection[Any]:
        return pg_connect(self.db_url)

    def table_ident(self) -> sql.Composed:
        schema, name = self.table.split(".")
        return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))

    def current_wal_lsn(self) -> int:
        return parse_lsn(self.sql("SELECT pg_current_wal_lsn()::text")[0][0])

    def slot_info(self) -> dict[str, Any] | None:
        rows = self.sql(
            "SELECT slot_name, plugin, active, active_pid, restart_lsn::text,"
            " confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (self.slot,),
        )
        if not rows:
            return None
        keys = ("slot_name", "plugin", "active", "active_pid", "restart_lsn", "confirmed_flush_lsn")
        return dict(zip(keys, rows[0], strict=True))

    def confirmed_flush_lsn(self) -> int:
        info = self.slot_info()
        assert info is not None, f"slot {self.slot} does not exist"
        return parse_lsn(info["confirmed_flush_lsn"])

    def slot_active(self) -> bool:
        info = self.slot_info()
        return bool(info and info["active"])

    def create_seed_table(self) -> None:
        """The outbox table exactly as ``cdc/sql/001_outbox_table.sql`` makes it."""
        ddl = (REPO / "cdc" / "sql" / "001_outbox_table.sql").read_text()
        self.sql(sql.SQL(ddl).format(table=self.table_ident()))  # type: ignore[arg-type]

    def seed_poller_rows(self, pending: int, failed: int, published: int) -> dict[str, set[str]]:
        """Rows as the seed's polling relay leaves them (statuses ``pending``, ``failed``
        after 5 tries, ``published`` with ``published_at``), created an hour ago, in one
        statement; returns their ids by status."""
        self.sql(
            sql.SQL(
                "INSERT INTO {} (aggregate_type, aggregate_id, event_type, payload, status,"
                " retry_count, published_at, created_at)"
                " SELECT 'device', 'dev-' || g, 'device.started',"
                " jsonb_build_object('seed', g, 'deviceId', 'dev-' || g),"
                " CASE WHEN g <= %(p)s THEN 'pending' WHEN g <= %(p)s + %(f)s THEN 'failed'"
                " ELSE 'published' END,"
                " CASE WHEN g > %(p)s AND g <= %(p)s + %(f)s THEN 5 ELSE 0 END,"
                " CASE WHEN g > %(p)s + %(f)s THEN now() - interval '50 minutes' END,"
                " now() - interval '1 hour' + g * interval '1 ms'"
                " FROM generate_series(1, %(n)s) g"
            ).format(self.table_ident()),
            {"p": pending, "f": failed, "n": pending + failed + published},
        )
        by_status: dict[str, set[str]] = {"pending": set(), "failed": set(), "published": set()}
        query = sql.SQL("SELECT id::text, status FROM {}").format(self.table_ident())
        for rid, status in self.sql(query):
            by_status[status].add(rid)
        return by_status

    def insert(self, rows: list[dict[str, Any]], table: str | None = None) -> list[dict[str, Any]]:
        """Insert ``rows`` in one committed transaction; returns them."""
        with self.conn.transaction(), self.conn.cursor() as cur:
            insert_rows(cur, table or self.table, rows)
        return rows

    def prepare(self, rows: list[dict[str, Any]], name: str) -> str:
        """Insert ``rows`` and PREPARE TRANSACTION; returns the gid (rolled back at teardown)."""
        gid = f"{self.gid_prefix}{name}"
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute("BEGIN")
            insert_rows(cur, self.table, rows)
            cur.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(gid)))
        return gid

    def finish_prepared(self, gid: str, commit: bool) -> None:
        verb = "COMMIT PREPARED {}" if commit else "ROLLBACK PREPARED {}"
        self.sql(sql.SQL(verb).format(sql.Literal(gid)))

    def columns(self) -> dict[str, str]:
        schema, name = self.table.split(".")
        return dict(
            self.sql(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
                (schema, name),
            )
        )

    def ensure_headers_column(self) -> None:
        if "headers" not in self.columns():
            self.sql(sql.SQL("ALTER TABLE {} ADD COLUMN headers jsonb").format(self.table_ident()))

    def fetch_rows(self) -> dict[str, Row]:
        """The committed rows of the outbox (the ground truth), keyed by id."""
        has_headers = "headers" in self.columns()
        query = sql.SQL(
            "SELECT id::text, aggregate_type, aggregate_id, event_type, payload::text, {},"
            " created_at FROM {}"
        ).format(sql.SQL("headers" if has_headers else "NULL::jsonb"), self.table_ident())
        return {r[0]: Row(*r) for r in self.sql(query)}

    def create_legacy_table(self) -> None:
        """``event_outbox`` exactly as the seed report shows it (no ``headers`` column)."""
        self.sql(
            sql.SQL(
                """
                CREATE TABLE {} (
                    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                    aggregate_type varchar(100) NOT NULL,
                    aggregate_id   varchar(255),
                    event_type     varchar(255) NOT NULL,
                    payload        jsonb NOT NULL,
                    status         varchar(50) NOT NULL DEFAULT 'pending',
                    retry_count    integer NOT NULL DEFAULT 0,
                    error_message  text,
                    last_error_at  timestamptz,
                    published_at   timestamptz,
                    created_at     timestamptz NOT NULL DEFAULT now()
                )
                """
            ).format(self.table_ident())
        )

    def checkpoint(self) -> dict[str, Any] | None:
        """This test's row of ``cdc.relay_checkpoint`` (None if absent or no table yet)."""
        if not self.sql("SELECT to_regclass('cdc.relay_checkpoint') IS NOT NULL")[0][0]:
            return None
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT *, proven_snapshot::text AS proven_text,"
                " base_snapshot::text AS base_text, confirmed_lsn::text AS confirmed_text"
                " FROM cdc.relay_checkpoint WHERE slot_name = %s",
                (self.slot,),
            )
            return cur.fetchone()

    def drop(self, t: Teardown) -> None:
        """Roll back the prepared transactions, drop the slot, its checkpoint row, the
        publication and the tables; each step's failure is recorded in ``t``."""
        step, errors = t.step, t.errors
        with contextlib.suppress(Exception):
            if self._conn is not None:
                self._conn.close()
        try:
            with pg_connect(self.db_url) as conn:
                step(
                    "rollback prepared",
                    lambda: rollback_prepared(conn, self.dbname, self.gid_prefix),
                )
                step("drop slot", lambda: drop_slot(conn, self.slot))
                step("delete checkpoint row", lambda: delete_checkpoint(conn, self.slot))
                step(
                    "drop publication",
                    lambda: conn.execute(
                        sql.SQL("DROP PUBLICATION IF EXISTS {}").format(
                            sql.Identifier(self.publication)
                        )
                    ),
                )
                for table in [self.table, *self.extra_tables]:
                    schema, name = table.split(".")
                    step(
                        f"drop {table}",
                        lambda s=schema, n=name: conn.execute(
                            sql.SQL("DROP TABLE IF EXISTS {}.{} CASCADE").format(
                                sql.Identifier(s), sql.Identifier(n)
                            )
                        ),
                    )
        except Exception as exc:
            errors.append(f"postgres: {exc!r}")
