"""A small demo event source for ``make run``: writes outbox rows and prints what arrives.

It plays the platform's services (inserting device/user/billing events into the outbox,
each in its own transaction) and a listener bound to the exchange with ``#`` on an
exclusive auto-delete queue, so a newcomer sees events flow from INSERT to broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
import uuid

import aiormq
import orjson
import psycopg
from psycopg import sql

from cdc.config import RelaySettings


def _device(i: int, **extra: object) -> dict[str, object]:
    # Seven devices; device d belongs to user u-(d % 3), so billing can pair its sessions.
    d = i % 7
    return {"deviceId": f"dev-{d}", "userId": f"u-{d % 3}", **extra}


# Seed-like events (payload fields as the platform's services publish them); starts and
# stops are the most frequent so the billing worker makes sessions out of them.
_EVENTS = (
    ("device", "device.started", lambda i: _device(i)),
    ("device", "device.started", lambda i: _device(i)),
    ("device", "device.stopped", lambda i: _device(i)),
    ("device", "device.stopped", lambda i: _device(i)),
    ("device", "device.updated", lambda i: _device(i, plan=random.choice(["basic", "pro"]))),
    ("user", "user.updated", lambda i: {"userId": f"u-{i % 3}", "plan": "standard"}),
    ("app", "app.installed", lambda i: _device(i, appName="Maps")),
    ("scheduler", "scheduler.task_completed", lambda i: {"userId": f"u-{i % 3}",
                                                         "taskName": "nightly backup"}),
)


async def _listen(settings: RelaySettings, seen: list[float]) -> None:
    conn = await aiormq.connect(settings.broker_url())
    try:
        channel = await conn.channel()
        await channel.exchange_declare(settings.exchange, exchange_type="topic", durable=True)
        declared = await channel.queue_declare("", exclusive=True, auto_delete=True)
        queue = declared.queue
        assert queue is not None
        await channel.queue_bind(queue, settings.exchange, routing_key="#")

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            props = message.header.properties
            headers = props.headers or {}
            print(
                f"  <- {message.routing_key:<22} id={props.message_id} "
                f"lsn={headers.get('commit_lsn')!s} {message.body.decode()[:60]}",
                flush=True,
            )
            seen.append(time.monotonic())

        await channel.basic_consume(queue, on_message, no_ack=True)
        await asyncio.Event().wait()
    finally:
        await conn.close()


async def run_demo(settings: RelaySettings, *, rate: float, count: int) -> int:
    """Insert events at ``rate`` per second (``count`` 0 = forever) and print arrivals."""
    seen: list[float] = []
    listener = asyncio.create_task(_listen(settings, seen))
    table = sql.Identifier(settings.table_schema, settings.table_name)
    insert = sql.SQL(
        "INSERT INTO {} (id, aggregate_type, aggregate_id, event_type, payload) "
        "VALUES (%s, %s, %s, %s, %s)"
    ).format(table)
    await asyncio.sleep(1)
    async with await psycopg.AsyncConnection.connect(
        settings.dsn(), autocommit=True
    ) as db:
        for i in itertools.count(1):
            if count and i > count:
                break
            aggregate, event_type, payload = random.choice(_EVENTS)
            body = orjson.dumps(payload(i)).decode()
            await db.execute(insert, (uuid.uuid4(), aggregate, f"{aggregate}-{i % 7}",
                                      event_type, body))
            print(f"-> {event_type:<25} (row {i})", flush=True)
            await asyncio.sleep(1 / rate)
    await asyncio.sleep(2)
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener
    print(f"demo: {len(seen)} event(s) arrived through the relay", flush=True)
    return 0 if seen else 1
