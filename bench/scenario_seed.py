"""Seed baseline: the platform's polling relay and its planned batched variant, beside ours.

For each poller: throughput = events confirmed into the bound queue over a whole number of
polls of a standing backlog; latency = arrival at a consumer minus the row's ``created_at``
under a light paced load (one row per transaction). The relay is measured at the very same
load with the very same latency definition, so the ratios compare like with like; its
throughput figure is the backlog drain of the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import psycopg
from psycopg import sql

from bench.env import Run, drop_table
from bench.load import insert_backlog, paced_writer
from bench.nodetool import NodeConsumer
from bench.observe import DepthSampler
from bench.params import Params
from bench.scenarios_relay import measure_loads
from bench.seed_poller import SeedPoller, create_seed_table
from bench.stats import epoch, latency_summary, ratio


async def _run_poller(poller: SeedPoller) -> asyncio.Task[None]:
    task = asyncio.create_task(poller.run())
    await asyncio.sleep(0)
    return task


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _variant(run: Run, p: Params, label: str, batched: bool) -> dict[str, Any]:
    names = run.names(label)
    await run.declare_sink(names)
    await create_seed_table(run.db_url, names.table)
    poller = SeedPoller(
        run.db_url, run.amqp_url, names.table, names.exchange,
        interval=p.seed_poll_interval, limit=p.seed_poll_limit, batched=batched,
    )
    try:
        await insert_backlog(run.db_url, names.table, p.seed_backlog, rows_per_txn=100,
                             payload_size=p.payload_size)
        sampler = DepthSampler(run.amqp_url, names.queue, interval=0.1)
        await sampler.start()
        window = p.seed_polls * p.seed_poll_interval
        task = await _run_poller(poller)
        try:
            # The window holds exactly seed_polls ticks (at 0, 5, ..., window - 5 s).
            await asyncio.sleep(window - 0.2)
            delivered = sampler.depth
        finally:
            await _stop(task)
            await sampler.stop()
        throughput = delivered / window

        async with await psycopg.AsyncConnection.connect(run.db_url, autocommit=True) as db:
            await db.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(names.table)))
        await run.purge(names.queue)
        consumer = NodeConsumer(run.amqp_url, names.queue,
                                run.results_dir / f"arrivals-{label}.tsv")
        await consumer.start()
        task = await _run_poller(poller)
        try:
            offered = await paced_writer(
                run.db_url, names.table, rate=p.seed_rate, duration=p.seed_seconds,
                rows_per_txn=1, payload_size=p.payload_size,
            )
            await asyncio.sleep(p.seed_poll_interval + 1.0)  # the last rows' tick
        finally:
            await _stop(task)
            arrivals = await consumer.stop()
        latencies = [arrival - epoch(created) for arrival, _, created in arrivals if created]
        return {
            "batched": batched,
            "poll_interval_s": p.seed_poll_interval,
            "poll_limit": p.seed_poll_limit,
            "throughput": round(throughput, 1),
            "throughput_window_s": window,
            "offered_rate": round(offered.rate, 1),
            "offered": offered.rows,
            "delivered": len(arrivals),
            "latency": latency_summary(latencies),
            "failed_attempts": poller.failed_attempts,
            "skipped_ticks": poller.skipped_ticks,
        }
    finally:
        with contextlib.suppress(Exception):
            await run.delete_sink(names)
        with contextlib.suppress(Exception):
            await drop_table(run.db_url, names.table)


async def seed(run: Run, p: Params, relay_drain_rate: float | None) -> dict[str, Any]:
    """The poller, the batched poller and the relay side by side, plus the ratios."""
    poller = await _variant(run, p, "seed_poller", batched=False)
    batched = await _variant(run, p, "seed_batched", batched=True)
    loads = await measure_loads(
        run, "seed_relay", [("load", p.seed_rate)], seconds=p.seed_seconds, warmup=1.0,
        rows_per_txn=1, payload=p.payload_size,
    )
    relay = loads["load"]
    relay_median = relay["latency_from_created_at"]["p50_ms"]
    return {
        "assumptions": "poll LIMIT per tick is not in the seed report; assumed "
                       f"{p.seed_poll_limit}. Latency = consumer arrival - created_at "
                       f"at {p.seed_rate:g} events/s, one row per transaction, for all three.",
        "poller": poller,
        "batched": batched,
        "relay_same_load": {
            "offered_rate": relay["offered_rate"],
            "latency": relay["latency_from_created_at"],
        },
        "relay_throughput": relay_drain_rate,
        "ratios": {
            "throughput_vs_poller": ratio(relay_drain_rate, poller["throughput"]),
            "throughput_vs_batched": ratio(relay_drain_rate, batched["throughput"]),
            "median_latency_poller_over_relay": ratio(poller["latency"]["p50_ms"], relay_median),
            "median_latency_batched_over_relay": ratio(
                batched["latency"]["p50_ms"], relay_median
            ),
        },
    }
