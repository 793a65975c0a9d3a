"""SQL names taken from configuration: validated, then quoted, never pasted into SQL.

A worker's tables live in a schema named by a setting (``CDC_BILLING_SCHEMA``, ...) and the
outbox is ``CDC_OUTBOX_TABLE`` (``schema.table`` or ``table``). Both go through here.
"""

from __future__ import annotations

from psycopg import sql

from cdc.service.settings import IDENTIFIER_RULE, check_table, is_identifier
from consumers.errors import ConfigError


def check_name(value: str, setting: str) -> str:
    """``value`` if it is a plain SQL identifier (the settings' one rule), else a
    :class:`ConfigError` naming ``setting``."""
    if not is_identifier(value):
        raise ConfigError(f"{setting}={value!r} is not a valid name: {IDENTIFIER_RULE}")
    return value


def qualified_table(value: str, setting: str) -> sql.Composed:
    """``schema.table`` or ``table`` (schema ``public``) as a quoted SQL name."""
    try:
        schema, table = check_table(value).split(".")
    except ValueError as exc:
        raise ConfigError(f"{setting}={value!r} is not a valid table: {exc}") from None
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))


#: A worker's ``CREATE SCHEMA IF NOT EXISTS {s}`` that a role owning an existing schema may
#: run: the plain statement asks for the database's CREATE privilege even when the schema
#: exists. Format with ``s`` (the quoted schema) and ``schema_name`` (its name as a literal).
CREATE_SCHEMA = (
    "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_namespace WHERE nspname = {schema_name})"
    " THEN CREATE SCHEMA {s}; END IF; END $$"
)


def render(query: sql.Composable) -> str:
    """The query as text, rendered once at start (names are quoted identifiers)."""
    return query.as_string(None)
