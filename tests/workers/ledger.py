"""A tiny worker for the runtime's tests: ``python -m consumers tests.workers.ledger``.

Queue ``<ns>.ledger.entries`` is bound to ``ledger.#`` and ``unrouted.#``; only ``ledger.#``
has a route, so ``unrouted.*`` events exercise the no-route rule. ``CDC_LEDGER_QUEUES=n``
adds queues ``<ns>.ledger.entries-<i>`` bound to ``ledger<i>.#`` (i = 2..n), same handler.
An ``Entry`` inserts one row into ``CDC_LEDGER_TABLE`` (message_id, key, amount, attempt,
pid) and can fail on demand:

- ``fail="always"``: raises ``Retry`` every time (poison message);
- ``fail="times"``: raises ``Retry`` while ``attempt <= fail_times``;
- ``fail="permanent"``: raises ``PermanentError``;
- ``fail="blocked"``: raises ``PermanentError`` while ``key`` is in ``<table>_blocked``;
- ``fail="sql"``: runs a statement that fails in PostgreSQL (division by zero);
- ``sleep_ms``: waits that long inside the transaction (in-flight work for shutdown tests).

Every attempt that reaches the handler appends ``message_id attempt wall_time`` to
``CDC_LEDGER_ATTEMPT_LOG`` (outside the transaction, so failed attempts show too).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Literal

from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field

from cdc.service.settings import check_table
from consumers.config import ConsumerSettings
from consumers.errors import PermanentError, Retry
from consumers.runtime.spec import HandlerContext, QueueSpec, Route, WorkerSpec


class LedgerSettings(ConsumerSettings):
    """The runtime's settings plus where the ledger writes."""

    ledger_table: str = Field("public.ledger", description="table of ledger rows")
    ledger_namespace: str = Field("ledger", description="prefix of the queue/service names")
    ledger_attempt_log: str = Field("", description="file that records every attempt")
    ledger_db_only: bool = Field(False, description="declare the handlers database-only")
    ledger_queues: int = Field(
        1, ge=1, description="queues: the first as above, queue i (2..n) bound to ledger<i>.#"
    )


SETTINGS = LedgerSettings


class Entry(BaseModel):
    model_config = ConfigDict(extra="ignore")

    key: str
    amount: int
    fail: Literal["always", "times", "permanent", "blocked", "sql"] | None = None
    fail_times: int = 0
    sleep_ms: int = 0


def _ident(table: str) -> sql.Composed:
    schema, name = check_table(table).split(".")
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


def build(settings: ConsumerSettings) -> WorkerSpec:
    assert isinstance(settings, LedgerSettings)
    table = _ident(settings.ledger_table)
    blocked = _ident(settings.ledger_table + "_blocked")
    log_path = settings.ledger_attempt_log

    async def on_entry(ctx: HandlerContext, entry: Entry) -> None:
        d = ctx.delivery
        if log_path:
            with open(log_path, "a") as f:  # noqa: ASYNC230 - tiny test-only write
                f.write(f"{d.message_id} {d.attempt} {time.time():.6f}\n")
        if entry.sleep_ms:
            await asyncio.sleep(entry.sleep_ms / 1000)
        if entry.fail == "always" or (entry.fail == "times" and d.attempt <= entry.fail_times):
            raise Retry(f"asked to fail (attempt {d.attempt})")
        if entry.fail == "permanent":
            raise PermanentError("asked to fail permanently")
        if entry.fail == "sql":
            await ctx.conn.execute("SELECT 1 / 0")
        if entry.fail == "blocked":
            cur = await ctx.conn.execute(
                sql.SQL("SELECT 1 FROM {} WHERE key = %s").format(blocked), (entry.key,)
            )
            if await cur.fetchone():
                raise PermanentError(f"key {entry.key} is blocked")
        await ctx.conn.execute(
            sql.SQL(
                "INSERT INTO {} (message_id, key, amount, attempt, pid) VALUES (%s, %s, %s, %s, %s)"
            ).format(table),
            (d.message_id, entry.key, entry.amount, d.attempt, os.getpid()),
        )

    ns = settings.ledger_namespace
    schema = (
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (id bigserial PRIMARY KEY, message_id text NOT NULL,"
            " key text NOT NULL, amount bigint NOT NULL, attempt int NOT NULL, pid int NOT NULL,"
            " at timestamptz NOT NULL DEFAULT clock_timestamp())"
        ).format(table),
        sql.SQL("CREATE TABLE IF NOT EXISTS {} (key text PRIMARY KEY)").format(blocked),
    )
    return WorkerSpec(
        name=f"{ns}-ledger",
        service=f"{ns}.ledger-service",
        queues=(
            QueueSpec(f"{ns}.ledger.entries", ("ledger.#", "unrouted.#")),
            *(
                QueueSpec(f"{ns}.ledger.entries-{i}", (f"ledger{i}.#",))
                for i in range(2, settings.ledger_queues + 1)
            ),
        ),
        routes=(
            Route("ledger.#", Entry, on_entry),
            *(Route(f"ledger{i}.#", Entry, on_entry) for i in range(2, settings.ledger_queues + 1)),
        ),
        schema=tuple(s.as_string() for s in schema),
        db_only=settings.ledger_db_only,
    )
