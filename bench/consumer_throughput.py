"""Consumer worker throughput: events/s drained from a backlog, with inbox dedup, exact effects.

Run by hand (not part of ``make test``)::

    .venv/bin/python bench/consumer_throughput.py [--events 20000] [--replicas 1 2]

For each replica count it declares a fresh topology (quorum queue by default) and a fresh
database table set, publishes ``--events`` persistent events into the backlog, starts the
replicas of ``tests.workers.ledger`` (one INSERT per event + the inbox row, a savepoint per
message, one commit per batch), and reports events/s from the first committed effect to the
last (start-up excluded), and the workers' CPU time per event (user+system, from /proc), which
is the steadier figure on a shared machine. It then checks that every event has exactly one
effect, and removes what it created.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aio_pika
import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parent.parent
PG = os.environ.get("CDC_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP = os.environ.get("CDC_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _db_url(name: str) -> str:
    base, _, _ = PG.rpartition("/")
    return f"{base}/{name}"


async def _publish(exchange: str, n: int) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    conn = await aio_pika.connect(AMQP)
    ch = await conn.channel()
    ex = await ch.get_exchange(exchange, ensure=False)
    for start in range(0, n, 1000):
        await asyncio.gather(
            *(
                ex.publish(
                    aio_pika.Message(
                        json.dumps({"key": f"k{i}", "amount": i, "pad": "x" * 400}).encode(),
                        message_id=ids[i],
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    "ledger.entry",
                    mandatory=True,
                )
                for i in range(start, min(start + 1000, n))
            )
        )
    await conn.close()
    return ids


async def _delete(names: list[str], exchanges: list[str]) -> None:
    conn = await aio_pika.connect(AMQP)
    ch = await conn.channel()
    raw = await ch.get_underlay_channel()
    for q in names:
        await raw.queue_delete(q)
    for e in exchanges:
        await raw.exchange_delete(e)
    await conn.close()


def _cpu_seconds(pids: list[int]) -> float:
    """user+system CPU of the processes so far (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def _run(
    events: int, replicas: int, queue_type: str, batch: int, prefetch: int, db_only: bool
) -> dict[str, float]:
    tag = f"{int(time.time()):08x}{secrets.token_hex(2)}"
    ns = f"cdc_bench.{tag}"
    dbname = f"cdc_bench_{tag}"
    with psycopg.connect(PG, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env.update(
        CDC_DATABASE_URL=_db_url(dbname),
        CDC_AMQP_URL=AMQP,
        CDC_EXCHANGE=f"{ns}.events",
        CDC_LEDGER_NAMESPACE=ns,
        CDC_LEDGER_TABLE="ledger",
        CDC_WORKER_METRICS_PORT="0",
        CDC_WORKER_QUEUE_TYPE=queue_type,
        CDC_WORKER_BATCH_SIZE=str(batch),
        CDC_WORKER_PREFETCH=str(prefetch),
        CDC_WORKER_LOG_LEVEL="WARNING",
        CDC_LEDGER_DB_ONLY=str(db_only).lower(),
    )
    cmd = [sys.executable, "-m", "consumers", "tests.workers.ledger"]
    profile = os.environ.get("CDC_BENCH_PROFILE")  # cProfile output file of the replicas
    procs: list[subprocess.Popen[bytes]] = []
    service = f"{ns}.ledger-service"
    queues = [f"{ns}.ledger.entries", f"{service}.parked"] + [
        f"{service}.retry.{d}s" for d in (5, 10, 20)
    ]
    try:
        # declare the topology with a first run, then stop it, and fill the backlog
        first = subprocess.Popen(cmd, cwd=REPO, env=env)
        db = psycopg.connect(_db_url(dbname), autocommit=True)
        while True:
            time.sleep(0.2)
            if db.execute("SELECT to_regclass('ledger')").fetchone()[0]:  # type: ignore[index]
                break
        time.sleep(1.0)
        first.terminate()
        first.wait(20)
        t0 = time.monotonic()
        ids = asyncio.run(_publish(f"{ns}.events", events))
        publish_s = time.monotonic() - t0
        run = cmd if not profile else [sys.executable, "-m", "cProfile", "-o", profile, *cmd[1:]]
        procs = [subprocess.Popen(run, cwd=REPO, env=env) for _ in range(replicas)]
        count = 0
        cpu0 = None
        while count < events:
            time.sleep(0.05 if cpu0 is None else 0.2)
            count = db.execute("SELECT count(*) FROM ledger").fetchone()[0]  # type: ignore[index]
            if cpu0 is None and count:
                cpu0, count0 = _cpu_seconds([p.pid for p in procs]), count
        cpu = _cpu_seconds([p.pid for p in procs]) - (cpu0 or 0.0)
        first_at, last_at, distinct, total = db.execute(
            "SELECT min(at), max(at), count(DISTINCT message_id), count(*) FROM ledger"
        ).fetchone()  # type: ignore[misc]
        seconds = (last_at - first_at).total_seconds()
        assert distinct == total == events == len(set(ids)), (distinct, total, events)
        db.close()
        return {
            "events/s": events / seconds,
            "seconds": seconds,
            "publish/s": events / publish_s,
            "cpu_us": cpu / max(1, events - count0) * 1e6,
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        asyncio.run(_delete(queues, [f"{service}.retry", f"{ns}.events"]))
        with psycopg.connect(PG, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--queue-type", default="quorum", choices=["quorum", "classic"])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument(
        "--mode", nargs="+", default=["savepoint", "db-only"], choices=["savepoint", "db-only"]
    )
    args = parser.parse_args()
    for mode in args.mode:
        for n in args.replicas:
            r = _run(args.events, n, args.queue_type, args.batch, args.prefetch, mode == "db-only")
            print(
                f"mode={mode} replicas={n} queue={args.queue_type} batch={args.batch} "
                f"prefetch={args.prefetch}: "
                f"{r['events/s']:.0f} events/s ({args.events} events in {r['seconds']:.2f}s, "
                f"exact); worker CPU {r['cpu_us']:.0f} us/event "
            f"(= {1e6 / r['cpu_us']:.0f} events/s per busy core); "
            f"backlog published at {r['publish/s']:.0f}/s"
            )


if __name__ == "__main__":
    main()
