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
from harness.billing_model import BillingModel, meter
from harness.billing_scenario import (
    PRICING,
    delivery_order,
    expected,
    record_rows,
    scenario,
    to_metering,
)
from harness.postgres import without_autovacuum
from harness.session import db_url
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
    that loses a lock race (deadlock or the store's lock timeout) is undone to its savepoint
    and tried again in a later batch."""
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
                except (psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable):
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


def _halves(order: list[Any], seed: int) -> tuple[list[Any], list[Any]]:
    """``order`` dealt at random to two replicas, each keeping the order."""
    rng = random.Random(seed)
    halves: tuple[list[Any], list[Any]] = ([], [])
    for e in order:
        halves[rng.randrange(2)].append(e)
    return halves


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
    halves = _halves(order, seed=6)
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


# -- the batch form (BillingStore.device_events), as the worker's batch handler uses it ------


async def _apply_batches(
    url: str, store: BillingStore, events: list[DeviceEvent | PlanChange], batch: int = 25
) -> int:
    """Apply ``events`` like the runtime's batch path: a batch's device events in one
    ``device_events`` call, its plan changes one by one, one commit; a batch that loses a
    lock race (another connection holds its devices or users) is rolled back and tried again.
    Returns how many batches were tried again."""
    pending, again = list(events), 0
    async with await psycopg.AsyncConnection.connect(url) as conn:
        while pending:
            chunk, pending = pending[:batch], pending[batch:]
            try:
                await store.device_events(conn, [e for e in chunk if isinstance(e, DeviceEvent)])
                for e in chunk:
                    if isinstance(e, PlanChange):
                        await store.plan_change(conn, e)
                await conn.commit()
            except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected):
                await conn.rollback()
                pending += chunk
                again += 1
    return again


async def test_batches_in_any_order_with_duplicates_give_the_tables_of_the_set(
    pg_schema, pg_session_db
):
    url = db_url(pg_session_db)
    await _prepare(url, pg_schema)
    events = scenario(seed=7)
    store = _store(pg_schema)
    order = to_metering(delivery_order(events, seed=8, duplicates=20))
    # duplicates inside one batch as well as across batches
    order = order[:10] + order[:3] + order[10:]
    await _apply_batches(url, store, order, batch=30)
    _check(url, pg_schema, events)
    before = _tables(url, pg_schema)
    await _apply_batches(url, store, to_metering(delivery_order(events, seed=9, duplicates=0)))
    assert _tables(url, pg_schema) == before


async def test_batches_equal_event_by_event(pg_schema, pg_session_db):
    """The batch form and the one-event form leave the same records and balances. (An
    alert's balance is the one at the moment it was written, which depends on what came
    together, in both forms; ``_check`` holds for both.)"""
    url = db_url(pg_session_db)
    events = scenario(seed=10)
    order = to_metering(delivery_order(events, seed=11, duplicates=5))
    await _prepare(url, pg_schema)
    await _apply(url, _store(pg_schema), order)
    one_by_one = _tables(url, pg_schema)[:2]
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("device_events", "user_plans", "usage_records", "balances",
                      "balance_alerts", "event_outbox"):
            conn.execute(sql.SQL("TRUNCATE {}.{}").format(
                sql.Identifier(pg_schema), sql.Identifier(table)))
    await _apply_batches(url, _store(pg_schema), order, batch=40)
    assert _tables(url, pg_schema)[:2] == one_by_one
    _check(url, pg_schema, events)


async def test_two_connections_applying_overlapping_batches_agree(pg_schema, pg_session_db):
    """Two replicas' batches share devices and users: sorted locks, no lost update, no
    deadlock between device locks (plan changes may still race; those batches go again)."""
    url = db_url(pg_session_db)
    await _prepare(url, pg_schema)
    events = scenario(seed=12, devices=8, sessions=8)
    order = to_metering(delivery_order(events, seed=13, duplicates=10))
    halves = _halves(order, seed=14)
    store = _store(pg_schema)
    await asyncio.gather(*(_apply_batches(url, store, half, batch=6) for half in halves))
    _check(url, pg_schema, events)


# -- the windowed recompute (branch history) --------------------------------------------------


def _random_events(seed: int, n: int = 70) -> list[DeviceEvent | PlanChange]:
    """Two devices, two users, minutes on a coarse grid (ties), ids whose order differs
    between byte order and a natural-language collation, rates and plans, rare deletes."""
    rng = random.Random(seed)
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    out: list[DeviceEvent | PlanChange] = []
    for i in range(n):
        mid = f"{rng.choice(['a', 'B', '_', 'Z', 'b'])}{i}"
        at = t0 + dt.timedelta(minutes=rng.randrange(0, 120, 5))
        device, user = rng.choice(["d1", "d2"]), rng.choice(["u1", "u2"])
        kind = rng.choice(["start"] * 4 + ["stop"] * 4 + ["update", "plan", "delete"])
        if kind == "plan":
            out.append(PlanChange(mid, user, at, rng.choice(["basic", "pro"])))
        elif kind == "update":
            out.append(DeviceEvent(mid, device, "update", at, None, None,
                                   rng.choice([Decimal("45"), Decimal("120")])))
        elif kind == "start":
            out.append(DeviceEvent(mid, device, "start", at, user,
                                   rng.choice([None, None, "pro", "basic"])))
        elif kind == "delete" and rng.random() < 0.5:
            out.append(DeviceEvent(mid, device, "delete", at))
        else:
            out.append(DeviceEvent(mid, device, "stop", at))
    return out


@pytest.mark.parametrize("seed", range(4))
async def test_windowed_sql_equals_the_full_recompute_after_every_batch(
    pg_schema, pg_session_db, seed
):
    """The store reads only a window of each device's history; after every batch (random
    sizes, random order, duplicates) records, balances and alerts equal the full recompute's
    (:class:`BillingModel` without windows) of the events delivered so far."""
    url = db_url(pg_session_db)
    await _prepare(url, pg_schema)
    rng = random.Random(seed)
    events = _random_events(seed)
    order = events + rng.sample(events, 15)
    rng.shuffle(order)
    store = _store(pg_schema)
    ledger = BillingModel(PRICING, initial_balance=INITIAL, threshold=THRESHOLD)
    s = sql.Identifier(pg_schema)
    async with await psycopg.AsyncConnection.connect(url) as conn:
        while order:
            size = rng.randint(1, 6)
            chunk, order = order[:size], order[size:]
            await store.device_events(conn, [e for e in chunk if isinstance(e, DeviceEvent)])
            for e in chunk:
                if isinstance(e, PlanChange):
                    await store.plan_change(conn, e)
            await conn.commit()
            ledger.apply_batch(chunk)
            records, balances, _ = _tables(url, pg_schema)
            assert records == record_rows(ledger.records)
            assert balances == ledger.balances()
            alerts = await (await conn.execute(
                sql.SQL("SELECT user_id, balance FROM {}.balance_alerts").format(s))).fetchall()
            await conn.commit()
            assert dict(alerts) == ledger.alerts


async def test_a_long_history_is_read_as_a_window(pg_schema, pg_session_db):
    """A device with 400 sessions: a new stop makes billing_state_many return the window's
    few events (counted), not the history, and the records stay those of the whole set."""
    url = db_url(pg_session_db)
    await _prepare(url, pg_schema)
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    history: list[DeviceEvent] = []
    for k in range(400):
        history += [
            DeviceEvent(f"s{k:03}", "d1", "start", t0 + dt.timedelta(hours=k), "u1",
                        "pro" if k == 0 else None),
            DeviceEvent(f"t{k:03}", "d1", "stop", t0 + dt.timedelta(hours=k, minutes=30)),
        ]
    new = [DeviceEvent("s-new", "d1", "start", t0 + dt.timedelta(hours=500), "u1"),
           DeviceEvent("t-new", "d1", "stop", t0 + dt.timedelta(hours=501))]
    store = _store(pg_schema)
    async with await psycopg.AsyncConnection.connect(url) as conn:
        for i in range(0, len(history), 100):
            await store.device_events(conn, history[i : i + 100])
        await conn.commit()
        cur = await conn.execute(
            sql.SQL("SELECT tag, id FROM {}.billing_state_many(%s, %s, %s, %s, %s, %s, %s)")
            .format(sql.Identifier(pg_schema)),
            ([e.message_id for e in new], ["d1"] * 2, [e.kind for e in new],
             [e.at for e in new], [e.user_id for e in new], [None, None], [None, None]),
        )
        rows = await cur.fetchall()
        await conn.rollback()
        assert sorted(i for tag, i in rows if tag == "e") == ["s-new", "t-new", "t399"]
        assert [i for tag, i in rows if tag == "x"] == ["s000"]  # the plan in force
        assert not [i for tag, i in rows if tag == "r"]  # no record starts in the window
        await store.device_events(conn, new)
        await conn.commit()
    records, _, _ = _tables(url, pg_schema)
    assert records == record_rows(meter([*history, *new], PRICING)[0])
    assert len(records) == 401 and records[0][0] == "s-new" and records[0][6] == Decimal("90")


async def test_a_batch_reads_only_its_devices_rows_from_tables_without_statistics(
    pg_schema, pg_session_db
):
    """The functions run while the tables are new and empty, as a worker's do at its start;
    the tables then fill up before autovacuum's first ANALYZE. A batch must still read only
    the rows of its own devices: no scan of the table, and no index read in full (a plan
    PL/pgSQL cached from the empty tables did the one; a fresh plan from the same statistics
    paired a device's rows with every entry of the owners' index to do the other)."""
    url = db_url(pg_session_db)
    await _prepare(url, pg_schema)
    s = sql.Identifier(pg_schema)
    state_many = sql.SQL(
        "SELECT count(*) FROM {}.billing_state_many(%s::text[], %s::text[], %s::text[],"
        " %s::timestamptz[], %s::text[], %s::text[], %s::numeric[])"
    ).format(s)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def batch(tag: str, devices: range) -> tuple[list[Any], ...]:
        n = len(devices)
        return (
            [f"{tag}-{i}" for i in range(n)], [f"dev-{d}" for d in devices],
            ["start"] * n, [start + dt.timedelta(days=1, seconds=i) for i in range(n)],
            [f"u-{d % 50}" for d in devices], [None] * n, [None] * n,
        )

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        tables = ("device_events", "usage_records", "user_plans")
        await without_autovacuum(conn, pg_schema, tables)
        # Statistics that say empty (a database-wide ANALYZE run after the deployment, say):
        # with none at all the planner assumes ten pages, and an index wins anyway.
        for table in tables:
            await conn.execute(sql.SQL("ANALYZE {}.{}").format(s, sql.Identifier(table)))
        # Batches of a worker under load, past PL/pgSQL's switch to a cached generic plan.
        for n in range(8):
            await conn.execute(state_many, batch(f"warm{n}", range(2000 + 100 * n, 2100 + 100 * n)))
        await conn.execute(sql.SQL(
            "INSERT INTO {}.device_events (message_id, device_id, kind, at, user_id)"
            " SELECT 'old-' || i, 'dev-' || (i % 1000), (ARRAY['start', 'stop'])[1 + i / 1000 % 2],"
            " timestamptz '2025-12-01' + i * interval '1 s', 'u-' || (i % 50)"
            " FROM generate_series(1, 40000) i"
        ).format(s))
        # The backend's counters of its own reads, not yet flushed to the shared statistics:
        # they include the batches above, so the batch's reads are a difference.
        reads = sql.SQL(
            "SELECT t.seq_tup_read, (SELECT sum(pg_stat_get_xact_tuples_returned(i.indexrelid))"
            " FROM pg_index i WHERE i.indrelid = t.relid)"
            " FROM pg_stat_xact_user_tables t WHERE t.relid = {}::regclass"
        ).format(sql.Literal(f"{pg_schema}.device_events"))
        async with conn.transaction():
            before = await (await conn.execute(reads)).fetchone()
            await conn.execute(state_many, batch("new", range(100, 200)))
            after = await (await conn.execute(reads)).fetchone()
    assert before is not None and after is not None
    seq_read, index_read = (a - b for a, b in zip(after, before, strict=True))
    # The 100 devices hold 40 rows each, their windows fewer; a scan of the table would be
    # 40,000 rows or more, a full read of an index as many entries.
    assert seq_read == 0 and index_read <= 100 * 40 * 3, (before, after)
