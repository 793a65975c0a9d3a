"""CPU per chunk lookup of the notifications worker: ``python -m bench.micro_lookup``.

    python -m bench.micro_lookup --trees /work/base,. --chunks 8,26 --rounds 3

Before its sends, the worker reads each chunk's preferences, delivered channels and inbox
ids (``store.DeliveryLog.lookup``). In a backlog drain that read costs the worker about as
much as a tenth of its CPU, and a whole drain is too noisy on a shared machine to show a
change of a few per cent. This times the read alone against a real PostgreSQL
(``BENCH_PG_URL``, else a server of the bench's own): CPU seconds of the reading process
(``time.process_time``, the Python side; the server's share is not counted) and wall time,
per lookup, over ``--lookups`` sequential lookups of ``chunk`` new events each, for users
among 10,000 with a webhook preference. Each tree runs in a subprocess with its own code
first on ``sys.path``; the trees take turns (A B A B ...), and the table gives each tree's
median and its ratio to the first tree's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

USERS = 10_000


async def _measure(dsn: str, chunk: int, lookups: int) -> tuple[float, float]:
    """µs of CPU and of wall time per lookup (run in the child, with the tree's code)."""
    import psycopg

    from consumers.notifications.store import DeliveryLog, NotificationStore, schema_ddl
    from consumers.runtime.inbox import apply_schema

    schema = f"bench_lookup_{os.getpid()}"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
        await db.execute(f'CREATE SCHEMA "{schema}"')
        await apply_schema(db, f"{schema}.inbox", schema_ddl(schema))
        await db.execute(
            f'INSERT INTO "{schema}".notification_preferences (user_id, in_app, webhook,'
            " webhook_url) SELECT 'u-' || i, true, true, 'http://127.0.0.1:1/h/u-' || i"
            f" FROM generate_series(0, {USERS - 1}) i"
        )
    log = DeliveryLog(NotificationStore(schema), lambda: dsn, f"{schema}.inbox", "notifications")
    try:
        asks = [
            ([f"u-{(n * chunk + j) % USERS}" for j in range(chunk)],
             [str(uuid.uuid4()) for _ in range(chunk)])
            for n in range(lookups + 20)
        ]
        for users, mids in asks[:20]:  # connection, statement cache
            await log.lookup(users, mids)
        cpu, wall = time.process_time(), time.perf_counter()
        for users, mids in asks[20:]:
            await log.lookup(users, mids)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await log.close()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
            await db.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return cpu / lookups * 1e6, wall / lookups * 1e6


def _run_tree(tree: Path, dsn: str, chunk: int, lookups: int) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}
    out = subprocess.run(
        [sys.executable, __file__, "--one", "--dsn", dsn, "--chunk", str(chunk),
         "--lookups", str(lookups)],
        env=env, capture_output=True, text=True, check=True, timeout=600,
    ).stdout.split()
    return float(out[0]), float(out[1])


def _compare(trees: list[Path], dsn: str, chunks: list[int], rounds: int, lookups: int) -> None:
    for chunk in chunks:
        cpu: dict[Path, list[float]] = {t: [] for t in trees}
        wall: dict[Path, list[float]] = {t: [] for t in trees}
        for _ in range(rounds):
            for tree in trees:
                c, w = _run_tree(tree, dsn, chunk, lookups)
                cpu[tree].append(c)
                wall[tree].append(w)
                print(f"  {tree} chunk {chunk}: {c:.0f} µs CPU, {w:.0f} µs wall", flush=True)
        first = statistics.median(cpu[trees[0]])
        print(f"chunk of {chunk} events, {lookups} lookups x {rounds} rounds (median):")
        for tree in trees:
            med = statistics.median(cpu[tree])
            print(f"  {tree}: {med:.0f} µs CPU per lookup ({med / first:.2f}x),"
                  f" {statistics.median(wall[tree]):.0f} µs wall")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro_lookup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", default=".", help="comma-separated source trees")
    parser.add_argument("--chunks", default="8,26", help="events per chunk, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lookups", type=int, default=1000)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        c, w = asyncio.run(_measure(args.dsn, args.chunk, args.lookups))
        print(f"{c:.1f} {w:.1f}")
        return 0
    from bench.pgserver import own_server

    trees = [Path(t).resolve() for t in args.trees.split(",")]
    chunks = [int(c) for c in args.chunks.split(",")]
    given = os.environ.get("BENCH_PG_URL")
    with contextlib.nullcontext(given) if given else own_server() as admin_url:
        _compare(trees, admin_url, chunks, args.rounds, args.lookups)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
