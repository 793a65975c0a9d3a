"""Billing's SQL against the real PostgreSQL, without the broker: the store keeps the tables
equal to the pure metering of the set of events, whatever the order, duplicates included,
and also when two connections (two replicas) apply interleaved halves concurrently."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from billing_scenario import PRICING, delivery_order, expected, record_rows, scenario, to_metering
from conftest import db_url
from psycopg import sql

from consumers.billing.metering import DeviceEvent, PlanChange, balance_low_id
from consumers.billing.store import BillingStore, schema_ddl

pytestmark = pytest.mark.integration
INITIAL = Decimal("100")
THRESHOLD = Decimal("40")


async def _prepare(url: str, schema: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for stmt in schema_ddl(schema):
            await conn.execute(stmt.encode())
        await conn.execute(
            sql.SQL(
                "CREATE TABLE {}.event_outbox (id uuid PRIMARY KEY, aggregate_type text NOT NULL,"
                " aggregate_id text NOT NULL, event_type text NOT NULL, payload jsonb NOT NULL,"
                " created_at timestamptz NOT NULL DEFAULT now())"
            ).format(sql.Identifier(schema))
        )


def _store(schema: str) -> BillingStore:
    return BillingStore(
        schema, f"{schema}.event_outbox", PRICING, initial_balance=INITIAL, threshold=THRESHOLD
    )


async def _apply(
    url: str, store: BillingStore, events: list[DeviceEvent | PlanChange], batch: int = 7
) -> None:
    """Apply ``events`` in batches, one savepoint per event, like the runtime does: an event
    that loses a deadlock is undone to its savepoint and tried again in a later batch."""
    pending = list(events)
    async with await psycopg.AsyncConnection.connect(url) as conn:
        while pending:
            chunk, pending = pending[:batch], pending[batch:]
            for n, event in enumerate(chunk):
                await conn.execute("RELEASE SAVEPOINT m; SAVEPOINT m" if n else "SAVEPOINT m")
                try:
                    if isinstance(event, PlanChange):
                        await store.plan_change(conn, event)
                    else:
                        await store.device_event(conn, event)
                except psycopg.errors.DeadlockDetected:
                    await conn.execute("ROLLBACK TO SAVEPOINT m")
                    pending.append(event)
            await conn.commit()


def _tables(url: str, schema: str) -> tuple[list[tuple[Any, ...]], dict[str, Decimal], list[Any]]:
    s = sql.Identifier(schema)
    with psycopg.connect(url) as conn:
        records = conn.execute(
            sql.SQL(
                "SELECT record_id, device_id, user_id, started_at, stopped_at, duration_seconds,"
                " rate, cost, closed_by FROM {}.usage_records ORDER BY record_id"
            ).format(s)
        ).fetchall()
        balances = dict(
            conn.execute(sql.SQL("SELECT user_id, balance FROM {}.balances").format(s)).fetchall()
        )
        outbox = conn.execute(
            sql.SQL(
                "SELECT id, aggregate_id, event_type, payload FROM {}.event_outbox ORDER BY 2"
            ).format(s)
        ).fetchall()
    return records, balances, outbox


def _check(url: str, schema: str, events: list[Any]) -> None:
    records, balances = expected(events, INITIAL)
    got_records, got_balances, outbox = _tables(url, schema)
    assert got_records == record_rows(records)
    assert got_balances == balances
    below = {u for u, b in balances.items() if b < THRESHOLD}
    assert below, "the scenario should take someone below the threshold"
    alerted = [row[1] for row in outbox]
    assert len(alerted) == len(set(alerted)), f"a user alerted twice: {alerted}"
    assert below <= set(alerted)
    for event_id, user, event_type, payload in outbox:
        assert event_type == "billing.balance_low"
        assert str(event_id) == str(balance_low_id(user, THRESHOLD))
        assert payload["userId"] == user and payload["threshold"] == float(THRESHOLD)


async def test_any_order_with_duplicates_gives_the_tables_of_the_set(pg_schema, pg_session_db):
    url = db_url(pg_session_db)
    await _prepare(url, pg_schema)
    events = scenario(seed=1)
    store = _store(pg_schema)
    await _apply(url, store, to_metering(delivery_order(events, seed=2, duplicates=15)))
    _check(url, pg_schema, events)
    # Everything once more, in another order: nothing changes (each event is stored once).
    before = _tables(url, pg_schema)
    await _apply(url, store, to_metering(delivery_order(events, seed=3, duplicates=0)))
    assert _tables(url, pg_schema) == before


async def test_two_connections_applying_interleaved_halves_agree(pg_schema, pg_session_db):
    url = db_url(pg_session_db)
    await _prepare(url, pg_schema)
    events = scenario(seed=4)
    order = to_metering(delivery_order(events, seed=5, duplicates=10))
    rng = random.Random(6)
    halves: tuple[list[Any], list[Any]] = ([], [])
    for e in order:
        halves[rng.randrange(2)].append(e)
    store = _store(pg_schema)
    await asyncio.gather(*(_apply(url, store, half, batch=1) for half in halves))
    _check(url, pg_schema, events)


async def test_a_late_stop_splits_a_session_and_the_balance_follows(pg_schema, pg_session_db):
    url = db_url(pg_session_db)
    await _prepare(url, pg_schema)
    t0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    m = dt.timedelta(minutes=1)
    store = _store(pg_schema)
    first = [DeviceEvent("a", "d", "start", t0, "u"), DeviceEvent("d", "d", "stop", t0 + 30 * m)]
    await _apply(url, store, list(first))
    records, balances, _ = _tables(url, pg_schema)
    assert [r[4] - r[3] for r in records] == [30 * m]
    assert balances == {"u": Decimal("70")}  # 30 min at 60/h
    late = [
        DeviceEvent("b", "d", "stop", t0 + 10 * m),
        DeviceEvent("c", "d", "start", t0 + 20 * m, "u"),
    ]
    await _apply(url, store, late)
    records, balances, _ = _tables(url, pg_schema)
    assert [(r[0], r[4] - r[3]) for r in records] == [("a", 10 * m), ("c", 10 * m)]
    assert balances == {"u": Decimal("80")}
