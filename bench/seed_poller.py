"""The seed platform's outbox relay, reimplemented as the baseline (seed report, Phase 6).

What the report shows, kept as is:

- a timer fires every 5 s (``@Cron`` every five seconds); a tick that finds the previous
  one still running is skipped;
- it reads ``status = 'pending'`` rows oldest first and publishes them **one by one**
  to the topic exchange (routing key = ``event_type``, persistent);
- a success sets ``status = 'published'``, ``published_at``; a failure increments
  ``retry_count`` and records ``error_message`` and ``last_error_at``; the third failure
  sets ``status = 'failed'`` and the row is never tried again (0 -> 2 -> 3, then failed).

The report does not give the batch size of a tick: we assume ``LIMIT 100`` (the usual
ORM ``take: 100``), a parameter. The **batched** variant is the report's plan (P3 #8,
"fetch a batch, e.g. 10, and publish in parallel"): each tick publishes groups of 10
concurrently and marks each group's successes with one UPDATE. Publishing uses publisher
confirms, so "published" means the broker has it, as for the relay it is compared with.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from importlib import resources
from typing import Any

import aiormq
import psycopg
from aiormq.abc import AbstractChannel
from psycopg import sql

MAX_RETRIES = 3

async def create_seed_table(db_url: str, table: str) -> None:
    """The seed's ``event_outbox`` (legacy columns and all) as the relay's ``sql/`` has it,
    plus the index a poller on ``status`` needs."""
    ident = sql.Identifier(table)
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as db:
        for script in sorted(resources.files("cdc.sql").iterdir(), key=lambda p: p.name):
            if script.name.endswith(".sql"):
                await db.execute(sql.SQL(script.read_text()).format(table=ident))
        await db.execute(sql.SQL("CREATE INDEX ON {} (status, created_at)").format(ident))


class SeedPoller:
    """One polling relay over ``table``; ``run()`` until cancelled."""

    def __init__(
        self, db_url: str, amqp_url: str, table: str, exchange: str, *,
        interval: float = 5.0, limit: int = 100, batched: bool = False, group: int = 10,
    ) -> None:
        self.db_url = db_url
        self.amqp_url = amqp_url
        self.table = sql.Identifier(table)
        self.exchange = exchange
        self.interval = interval
        self.limit = limit
        self.batched = batched
        self.group = group
        self.published = 0
        self.failed_attempts = 0
        self.skipped_ticks = 0

    async def run(self) -> None:
        """Tick every ``interval`` s on a fixed schedule, skipping a tick while one runs."""
        connection = await aiormq.connect(self.amqp_url)
        busy: asyncio.Task[None] | None = None
        try:
            channel = await connection.channel(publisher_confirms=True)
            async with await psycopg.AsyncConnection.connect(self.db_url, autocommit=True) as db:
                started = time.monotonic()
                tick = 0
                while True:
                    if busy is None or busy.done():
                        if busy is not None:
                            busy.result()
                        busy = asyncio.create_task(self.poll_once(db, channel))
                    else:
                        self.skipped_ticks += 1
                    tick += 1
                    await asyncio.sleep(max(0.0, started + tick * self.interval - time.monotonic()))
        finally:
            if busy is not None and not busy.done():
                busy.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await busy
            with contextlib.suppress(Exception):
                await connection.close()

    async def poll_once(self, db: psycopg.AsyncConnection[Any], channel: AbstractChannel) -> None:
        """One tick: the pending rows, oldest first, up to ``limit``."""
        cur = await db.execute(
            sql.SQL(
                "SELECT id, aggregate_type, aggregate_id, event_type, payload::text, created_at"
                " FROM {} WHERE status = 'pending' ORDER BY created_at LIMIT %s"
            ).format(self.table),
            (self.limit,),
        )
        rows = await cur.fetchall()
        if not self.batched:
            for row in rows:
                try:
                    await self._publish(channel, row)
                except Exception as exc:  # the seed records any failure on the row
                    await self._record_failure(db, row[0], exc)
                else:
                    await db.execute(
                        sql.SQL(
                            "UPDATE {} SET status = 'published', published_at = now()"
                            " WHERE id = %s"
                        ).format(self.table),
                        (row[0],),
                    )
                    self.published += 1
            return
        for start in range(0, len(rows), self.group):
            chunk = rows[start:start + self.group]
            outcomes = await asyncio.gather(
                *(self._publish(channel, row) for row in chunk), return_exceptions=True
            )
            done = [row[0] for row, outcome in zip(chunk, outcomes, strict=True)
                    if not isinstance(outcome, BaseException)]
            for row, outcome in zip(chunk, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    await self._record_failure(db, row[0], outcome)
            if done:
                await db.execute(
                    sql.SQL(
                        "UPDATE {} SET status = 'published', published_at = now()"
                        " WHERE id = ANY(%s)"
                    ).format(self.table),
                    (done,),
                )
                self.published += len(done)

    async def _publish(self, channel: AbstractChannel, row: tuple[Any, ...]) -> None:
        event_id, aggregate_type, aggregate_id, event_type, payload, created_at = row
        confirmation = await channel.basic_publish(
            payload.encode(),
            exchange=self.exchange,
            routing_key=event_type,
            properties=aiormq.spec.Basic.Properties(
                content_type="application/json",
                delivery_mode=2,
                message_id=str(event_id),
                message_type=event_type,
                headers={
                    "aggregate_type": aggregate_type,
                    "aggregate_id": aggregate_id,
                    "created_at": created_at.isoformat(timespec="microseconds"),
                },
            ),
            timeout=10,
        )
        if not isinstance(confirmation, aiormq.spec.Basic.Ack):
            raise RuntimeError(f"broker did not confirm: {confirmation!r}")

    async def _record_failure(
        self, db: psycopg.AsyncConnection[Any], event_id: Any, exc: BaseException
    ) -> None:
        self.failed_attempts += 1
        await db.execute(
            sql.SQL(
                "UPDATE {} SET retry_count = retry_count + 1, error_message = %s,"
                " last_error_at = now(),"
                " status = CASE WHEN retry_count + 1 >= %s THEN 'failed' ELSE status END"
                " WHERE id = %s"
            ).format(self.table),
            (f"Failed to publish: {exc}"[:1000], MAX_RETRIES, event_id),
        )
