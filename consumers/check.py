"""``python -m consumers <worker> --check``: is the worker's role enough? Changes nothing.

A worker's database role needs no superuser and no REPLICATION: it owns the schema of its
own tables (the worker creates or keeps them, its functions and its inbox at every start,
and ``CREATE ... IF NOT EXISTS`` needs the schema's ``CREATE`` privilege and ownership of
what exists), and holds the privileges a worker lists in ``WorkerSpec.extra
["outbox_privileges"]`` on ``CDC_OUTBOX_TABLE`` (billing: ``INSERT`` and ``SELECT`` for its
``billing.balance_low`` rows). The check, as the configured role:

1. logs in to PostgreSQL and the broker (a refusal exits 3 as the worker would);
2. runs the worker's start-up DDL inside a transaction that is rolled back;
3. looks up each listed privilege on the outbox table.

It prints one ``ok:`` / ``missing:`` line each and returns 0, or 3 if anything is missing.
"""

from __future__ import annotations

import psycopg

from cdc.service.cli import Finding, print_findings
from cdc.service.refusals import first_line
from consumers.config import ConsumerSettings
from consumers.connect import open_broker, open_database
from consumers.runtime import inbox
from consumers.runtime.spec import WorkerSpec

Conn = psycopg.AsyncConnection[tuple[object, ...]]


async def _schema(conn: Conn, role: str, settings: ConsumerSettings, spec: WorkerSpec) -> Finding:
    what = f"the worker's tables, functions and inbox {settings.worker_inbox_table}"
    try:
        async with conn.transaction(force_rollback=True):
            await inbox.apply_schema(conn, settings.worker_inbox_table, spec.schema)
    except psycopg.errors.InsufficientPrivilege as exc:
        return Finding(
            False,
            f"{what}: {first_line(str(exc))}: the role must own the worker's schema "
            f"(CREATE SCHEMA <schema> AUTHORIZATION {role}) and what already exists in it",
        )
    return Finding(True, f"{what} can be created or kept by {role}")


async def _outbox(
    conn: Conn, role: str, settings: ConsumerSettings, spec: WorkerSpec
) -> list[Finding]:
    wanted = tuple(spec.extra.get("outbox_privileges", ()))
    if not wanted:
        return []
    table = settings.outbox_table
    lacking = []
    for privilege in wanted:
        cur = await conn.execute("SELECT has_table_privilege(%s, %s)", (table, privilege))
        row = await cur.fetchone()
        if not (row and row[0]):
            lacking.append(privilege)
    listed = ", ".join(wanted)
    if lacking:
        return [Finding(False, f"{listed} on {table}: GRANT {listed} ON TABLE {table} TO {role}")]
    return [Finding(True, f"{listed} on {table}")]


async def check(settings: ConsumerSettings, spec: WorkerSpec) -> list[Finding]:
    """Every requirement of the worker, checked as its configured roles (nothing changes)."""
    conn = await open_database(settings.dsn(), prepare_threshold=None)
    try:
        cur = await conn.execute("SELECT current_user")
        row = await cur.fetchone()
        role = str(row[0]) if row else "?"
        found = [Finding(True, f"PostgreSQL login as {role}")]
        found.append(await _schema(conn, role, settings, spec))
        found += await _outbox(conn, role, settings, spec)
    finally:
        await conn.close()
    broker = await open_broker(settings.broker_url())
    await broker.close()
    found.append(Finding(True, "broker login and vhost"))
    return found


async def run(settings: ConsumerSettings, spec: WorkerSpec) -> int:
    """Print the findings; the exit code (0, or 3 if anything is missing)."""
    return print_findings(await check(settings, spec))
