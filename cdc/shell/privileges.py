"""Least privilege: what the relay's role needs, granting it, and ``cdc setup --check``.

The relay runs as a role with ``LOGIN REPLICATION`` and nothing else but these grants:

- ``CONNECT`` on the database;
- ``USAGE`` on the outbox table's schema and ``SELECT`` on the outbox table (``SELECT,
  DELETE`` when the relay prunes it itself, ``CDC_PRUNE_OLDER_THAN``);
- ``USAGE`` on schema ``cdc`` and ``SELECT, INSERT, UPDATE`` on ``cdc.relay_checkpoint``
  (its durable checkpoint, created by ``cdc setup``).

It creates nothing: ``cdc setup``, run by an administrator (owner of the schema, superuser
or equivalent), creates the table, the publication, the checkpoint table and the slot,
prints these grants and, with ``--relay-role ROLE``, applies them. ``cdc setup --check``
changes nothing (a read-only session): run as the relay's role, it verifies every
requirement (``wal_level``, the role's attributes, the table and its columns, the grants,
the publication and its membership, the slot) and lists what is missing.

Identifiers are composed with ``psycopg.sql.Identifier``, never pasted in.
"""

from __future__ import annotations

from psycopg import sql

from cdc.config import RelaySettings
from cdc.core.outbox import REQUIRED_COLUMNS
from cdc.errors import ConfigError, SetupError
from cdc.service.cli import Finding
from cdc.service.settings import IDENTIFIER_RULE, is_identifier
from cdc.shell import slot as slots

CHECKPOINT_SCHEMA = "cdc"
CHECKPOINT_TABLE = "relay_checkpoint"
CHECKPOINT_PRIVILEGES = ("SELECT", "INSERT", "UPDATE")
#: The example role name `cdc setup` prints the grants for when none is given.
DEFAULT_ROLE = "cdc_relay"


def check_role_name(role: str) -> str:
    """A plain identifier, or ConfigError (exit 2)."""
    if not is_identifier(role):
        raise ConfigError(
            f"invalid configuration: --relay-role {role!r} must be a plain SQL identifier "
            f"({IDENTIFIER_RULE})"
        )
    return role


def outbox_privileges(settings: RelaySettings) -> tuple[str, ...]:
    """What the relay's role needs on the outbox table: it deletes only to prune."""
    return ("SELECT", "DELETE") if settings.prune_older_than else ("SELECT",)


def relay_grants(settings: RelaySettings, database: str, role: str) -> list[sql.Composed]:
    """The GRANT statements the relay's role needs, in the order they apply."""
    who = sql.Identifier(role)
    table = sql.Identifier(settings.table_schema, settings.table_name)
    checkpoint = sql.Identifier(CHECKPOINT_SCHEMA, CHECKPOINT_TABLE)
    privileges = sql.SQL(", ").join(map(sql.SQL, CHECKPOINT_PRIVILEGES))
    return [
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), who),
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
            sql.Identifier(settings.table_schema), who
        ),
        sql.SQL("GRANT {} ON TABLE {} TO {}").format(
            sql.SQL(", ").join(map(sql.SQL, outbox_privileges(settings))), table, who
        ),
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(CHECKPOINT_SCHEMA), who),
        sql.SQL("GRANT {} ON TABLE {} TO {}").format(privileges, checkpoint, who),
    ]


def grant_lines(settings: RelaySettings, role: str, apply: bool) -> list[str]:
    """The relay role's SQL as text (``apply``: also run the GRANTs, as the administrator)."""
    with slots.connect(settings) as conn:
        database = str(slots._one(conn, "SELECT current_database()"))
        grants = relay_grants(settings, database, role)
        attributes = sql.SQL("ALTER ROLE {} LOGIN REPLICATION").format(sql.Identifier(role))
        lines = [
            "-- the relay's role: LOGIN REPLICATION and these grants, nothing else",
            f"-- (as a superuser, if the role lacks them) {attributes.as_string(conn)};",
            *(f"{g.as_string(conn)};" for g in grants),
        ]
        if apply:
            if slots._one(conn, "SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,)) == 0:
                raise SetupError(
                    f"role {role!r} does not exist: CREATE ROLE {role} LOGIN REPLICATION "
                    "PASSWORD '...' (as a superuser), then run `cdc setup --relay-role` again"
                )
            for statement in grants:
                conn.execute(statement)
            lines.append(f"-- applied the grants to {role}")
    return lines


def _need(ok: bool, what: str, fix: str) -> Finding:
    """``what`` if met, else ``what: fix``."""
    return Finding(True, what) if ok else Finding(False, f"{what}: {fix}")


def _relation(conn: slots.Conn, schema: str, name: str) -> int | None:
    """The table's oid from the catalogs (readable without any privilege on it)."""
    return slots._one(  # type: ignore[no-any-return]
        conn,
        "SELECT c.oid::int FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        (schema, name),
    )


def _table_privileges(
    conn: slots.Conn, role: str, schema: str, name: str, privileges: tuple[str, ...]
) -> list[Finding]:
    what = f"{schema}.{name}"
    oid = _relation(conn, schema, name)
    if oid is None:
        return [Finding(False, f"table {what} does not exist: run `cdc setup`")]
    found = []
    usage = slots._one(conn, "SELECT has_schema_privilege(%s, 'USAGE')", (schema,))
    found.append(
        _need(bool(usage), f"USAGE on schema {schema}", f"GRANT USAGE ON SCHEMA {schema} TO {role}")
    )
    query = "SELECT has_table_privilege(%s::oid, %s)"
    lacking = [p for p in privileges if not slots._one(conn, query, (oid, p))]
    wanted = ", ".join(privileges)
    found.append(
        _need(not lacking, f"{wanted} on {what}", f"GRANT {wanted} ON TABLE {what} TO {role}")
    )
    return found


def _server(conn: slots.Conn, role: str) -> list[Finding]:
    found = []
    level = slots._one(conn, "SHOW wal_level")
    found.append(
        _need(
            level == "logical",
            f"wal_level is {level}",
            "needs logical: ALTER SYSTEM SET wal_level = logical, then restart",
        )
    )
    row = conn.execute(
        "SELECT rolcanlogin, rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    login, replication, superuser = row if row else (False, False, False)
    found.append(
        _need(
            bool(login and (replication or superuser)),
            f"role {role} has LOGIN and REPLICATION",
            f"ALTER ROLE {role} LOGIN REPLICATION (as a superuser)",
        )
    )
    return found


def _outbox(conn: slots.Conn, settings: RelaySettings, role: str) -> list[Finding]:
    schema, name = settings.table_schema, settings.table_name
    found = _table_privileges(conn, role, schema, name, outbox_privileges(settings))
    oid = _relation(conn, schema, name)
    if oid is not None:
        columns = {
            r[0]
            for r in conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 "
                "AND NOT attisdropped",
                (oid,),
            ).fetchall()
        }
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        found.insert(
            0,
            _need(
                not missing,
                f"table {settings.outbox_table} has {', '.join(REQUIRED_COLUMNS)}",
                f"it lacks {', '.join(missing)}",
            ),
        )
    return found


def _publication(conn: slots.Conn, settings: RelaySettings) -> list[Finding]:
    pub, table = settings.publication_name, settings.outbox_table
    row = conn.execute(
        "SELECT pubinsert FROM pg_publication WHERE pubname = %s", (pub,)
    ).fetchone()
    if row is None:
        return [Finding(False, f"publication {pub} does not exist: run `cdc setup`")]
    member = slots._one(
        conn,
        "SELECT count(*) FROM pg_publication_tables "
        "WHERE pubname = %s AND schemaname = %s AND tablename = %s",
        (pub, settings.table_schema, settings.table_name),
    )
    return [
        _need(
            bool(row[0]),
            f"publication {pub} publishes inserts",
            f"ALTER PUBLICATION {pub} SET (publish = 'insert')",
        ),
        _need(bool(member), f"publication {pub} includes {table}", "run `cdc setup`"),
    ]


def _slot(conn: slots.Conn, settings: RelaySettings) -> Finding:
    slot = settings.slot_name
    row = conn.execute(
        "SELECT plugin, database = current_database() FROM pg_replication_slots "
        "WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        return Finding(False, f"slot {slot} does not exist: run `cdc setup`")
    plugin, here = row
    if plugin != "pgoutput" or not here:
        return Finding(
            False, f"slot {slot} uses {plugin} or another database: choose another CDC_SLOT_NAME"
        )
    return Finding(True, f"slot {slot} exists (pgoutput, this database)")


def check(settings: RelaySettings) -> list[Finding]:
    """Every requirement of the relay, checked as the connecting role without any change."""
    with slots.connect(settings) as conn:
        conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        role = str(slots._one(conn, "SELECT current_user"))
        return [
            *_server(conn, role),
            *_outbox(conn, settings, role),
            *_publication(conn, settings),
            _slot(conn, settings),
            *_table_privileges(
                conn, role, CHECKPOINT_SCHEMA, CHECKPOINT_TABLE, CHECKPOINT_PRIVILEGES
            ),
        ]
