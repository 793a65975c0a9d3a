"""Billing's store as its tables grow under statistics that call them empty:
``python -m bench.billing_plans``.

    python -m bench.billing_plans [--events 120000] [--batch 100] [--devices 5000]

A worker's session keeps running while its tables fill up, and autovacuum's next ANALYZE
may be a minute or more away. This applies batches of ``device.started``/``device.stopped``
events through ``BillingStore.device_events`` (one session, one transaction per batch, no
broker) to a fresh database on a real PostgreSQL (``CDC_BENCH_PG_URL``), in four arms side by
side: the functions planned at every call (as shipped) or with PL/pgSQL's plan cache (the
functions' ``plan_cache_mode`` reset), each with the tables analyzed while empty (autovacuum
off) or analyzed every 10,000 events (statistics kept current). It prints the wall time per
event of each quarter of the run; the session waits for the server, so that is the store's
whole cost. Everything created is dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path

import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.consumer_throughput import PG, _db_url  # noqa: E402
from cdc.config import RelaySettings  # noqa: E402
from cdc.shell.schema import ensure_table  # noqa: E402
from consumers.billing.metering import DeviceEvent, Pricing  # noqa: E402
from consumers.billing.store import BillingStore, schema_ddl  # noqa: E402

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
TABLES = ("device_events", "usage_records", "user_plans")
FUNCTIONS = ("billing_state", "billing_state_many", "billing_write")
ANALYZE_EVERY = 10_000


def _batches(events: int, batch: int, devices: int) -> list[list[DeviceEvent]]:
    """Alternating starts and stops of random devices, each device's times increasing."""
    rng = random.Random(1)
    clock = [0.0] * devices
    running = [False] * devices
    out: list[list[DeviceEvent]] = []
    for _ in range(events // batch):
        chunk = []
        for _ in range(batch):
            d = rng.randrange(devices)
            clock[d] += rng.uniform(1, 60)
            at = T0 + dt.timedelta(seconds=clock[d])
            ident, device = str(uuid.uuid4()), f"dev-{d}"
            chunk.append(
                DeviceEvent(ident, device, "stop", at, None, None, None) if running[d]
                else DeviceEvent(ident, device, "start", at, f"u-{d % 500}", None, None)
            )
            running[d] = not running[d]
        out.append(chunk)
    return out


async def _arm(url: str, cached: bool, kept: bool, batches: list[list[DeviceEvent]]) -> list[float]:
    """µs of wall time per event in each quarter of ``batches``."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for statement in schema_ddl("bill"):
            await conn.execute(statement.encode())
    with psycopg.connect(url, autocommit=True) as sync:  # the outbox, as `cdc setup` makes it
        ensure_table(sync, RelaySettings(database_url=url, outbox_table="bill.event_outbox"))
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for name in FUNCTIONS if cached else ():
            await conn.execute(
                sql.SQL("ALTER FUNCTION bill.{} RESET plan_cache_mode").format(sql.Identifier(name))
            )
        for table in TABLES:
            t = sql.Identifier(table)
            await conn.execute(
                sql.SQL("ALTER TABLE bill.{} SET (autovacuum_enabled = false)").format(t)
            )
            await conn.execute(sql.SQL("ANALYZE bill.{}").format(t))
    store = BillingStore(
        "bill", "bill.event_outbox", Pricing(),
        initial_balance=Decimal(10**9), threshold=Decimal(1),
    )
    quarter = max(1, len(batches) // 4)
    per_event: list[float] = []
    async with await psycopg.AsyncConnection.connect(url) as conn:
        done, start = 0, time.perf_counter()
        for n, chunk in enumerate(batches, 1):
            await store.device_events(conn, chunk)
            await conn.commit()
            done += len(chunk)
            if kept and done % ANALYZE_EVERY < len(chunk):
                await conn.execute("ANALYZE bill.device_events, bill.usage_records")
                await conn.commit()
            if n % quarter == 0:
                now = time.perf_counter()
                per_event.append((now - start) / sum(map(len, batches[n - quarter:n])) * 1e6)
                start = now
    return per_event[:4]


def main() -> None:
    """Run the four arms and print one row each."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=120_000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--devices", type=int, default=5_000)
    args = ap.parse_args()
    batches = _batches(args.events, args.batch, args.devices)
    name = f"bench_plans_{uuid.uuid4().hex[:8]}"
    print(f"{args.events:,} events in batches of {args.batch}, {args.devices:,} devices;"
          " µs of wall time per event in each quarter of the run")
    print(f"{'plans':<10} {'statistics':<22} {'q1':>7} {'q2':>7} {'q3':>7} {'q4':>7}")
    for cached in (False, True):
        for kept in (False, True):
            with psycopg.connect(PG, autocommit=True) as admin:
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            try:
                figures = asyncio.run(_arm(_db_url(name), cached, kept, batches))
            finally:
                with psycopg.connect(PG, autocommit=True) as admin:
                    admin.execute(
                        sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name))
                    )
            stats = f"every {ANALYZE_EVERY:,} events" if kept else "empty (analyzed at 0)"
            cells = " ".join(f"{f:>7.0f}" for f in figures)
            print(f"{'cached' if cached else 'per call':<10} {stats:<22} {cells}", flush=True)


if __name__ == "__main__":
    main()
