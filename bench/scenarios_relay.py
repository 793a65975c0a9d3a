"""Scenarios that measure the broker and the relay: ceiling, drain, steady load, shape, RSS.

Each scenario returns a JSON-able dict of its figures. The broker ceiling and the relay
drain use the same instrument (queue depth sampled on an unread durable classic queue), the
same message size, persistence and confirm window, so their ratio compares like with like.
Latencies are measured at an auto-ack consumer of the bound queue: arrival minus the
``commit_time`` header (the commit time from the Begin message); the relay's own
``cdc_confirm_latency_seconds`` histogram is reported beside them.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Any

import psycopg

from bench.env import Run
from bench.load import insert_backlog, paced_writer
from bench.nodetool import NodeConsumer, ceiling_publish
from bench.observe import (
    CpuWindow,
    DepthSampler,
    ProcessSampler,
    Profiler,
    broker_pids,
    cpu_seconds,
    machine_busy_seconds,
    mib,
    postgres_cpu,
    walsender_pids,
)
from bench.params import Params, relay_window
from bench.relay_process import RelayProcess, relay_scenario
from bench.stats import (
    counter_value,
    drain_rate,
    epoch,
    histogram_buckets,
    histogram_quantile,
    latency_summary,
    paired_ratio,
)

HISTOGRAM = "cdc_confirm_latency_seconds"
PUBLISHED = "cdc_events_published_total"
ROUTING_KEY = "device.started"


def _cpu_now(
    db_name: str, relay_pid: int | None = None, walsenders: list[int] | None = None
) -> dict[str, float]:
    """CPU seconds so far of the broker, the run's PostgreSQL backends (``walsenders``
    included), the relay (if any) and the whole machine, with the wall clock."""
    now = {
        "rabbitmq": sum(cpu_seconds(pid) for pid in broker_pids()),
        "postgres": postgres_cpu(db_name, walsenders or []),
        "machine": machine_busy_seconds(),
        "wall": time.monotonic(),
    }
    if relay_pid is not None:
        now["relay"] = cpu_seconds(relay_pid)
    return now


def _cpu_per_event(
    before: dict[str, float], after: dict[str, float], events: int
) -> dict[str, Any]:
    """µs of CPU per event of each process group between two ``_cpu_now`` readings, the
    machine's busy cores over that span (everyone's), and the load average at its end."""
    wall = after["wall"] - before["wall"]
    return {
        "cpu_us_per_event": {
            name: round((after[name] - before[name]) / events * 1e6, 1) if events else None
            for name in after if name != "wall"
        },
        "machine_busy_cores": round((after["machine"] - before["machine"]) / wall, 2)
        if wall > 0 else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


async def ceiling(
    run: Run, p: Params, label: str = "ceiling", *, warm_up: bool = False
) -> dict[str, Any]:
    """The broker's ceiling: Node amqplib publishing as the relay does, nothing else.

    ``warm_up`` first publishes a tenth of the events into the same queue and purges them,
    so the first figure of a run does not carry the broker's and Node's start-up.
    """
    names = run.names(label)
    await run.declare_sink(names)
    if warm_up:
        await ceiling_publish(
            run.amqp_url, names.exchange, ROUTING_KEY,
            count=p.drain_events // 10, size=p.payload_size, window=p.window,
        )
        await run.purge(names.queue)
    sampler = DepthSampler(run.amqp_url, names.queue)
    await sampler.start()
    try:
        cpu_before, children = _cpu_now(run.db_name), os.times()
        node = await ceiling_publish(
            run.amqp_url, names.exchange, ROUTING_KEY,
            count=p.drain_events, size=p.payload_size, window=p.window,
        )
        # The publisher is a child that has been waited for: its CPU is in the children's.
        done = os.times()
        publisher = (done.children_user + done.children_system
                     - children.children_user - children.children_system)
        await sampler.wait_for(p.drain_events, timeout=60)
        cpu = _cpu_per_event(cpu_before, _cpu_now(run.db_name), p.drain_events)
        cpu["cpu_us_per_event"]["publisher"] = round(publisher / p.drain_events * 1e6, 1)
        measured = drain_rate(sampler.samples, p.drain_events)
    finally:
        await sampler.stop()
        await run.delete_sink(names)
    return {
        **cpu,
        "events": p.drain_events,
        "payload_bytes": p.payload_size,
        "window": p.window,
        "rate": round(measured[0], 1) if measured else None,
        "publisher_rate": round(float(node["rate"]), 1),
        "nacked": node["nacked"],
        "method": "queue depth sampled every 50 ms, first to last message (publisher's own "
                  "first-publish-to-last-confirm rate beside it)",
    }


async def _drain(
    run: Run, relay: RelayProcess, *, events: int, rows_per_txn: int, payload: int,
    max_seconds: float,
) -> dict[str, Any]:
    """Commit a backlog, start ``relay``, time the drain by queue depth (relay left running)."""
    insert_s = await insert_backlog(
        run.db_url, relay.names.table, events, rows_per_txn=rows_per_txn, payload_size=payload
    )
    sampler = DepthSampler(run.amqp_url, relay.names.queue)
    await sampler.start()
    try:
        started = time.monotonic()
        await relay.start()
        startup = time.monotonic() - started
        proc = ProcessSampler(relay.pid)
        proc.start()
        cpu = CpuWindow(proc)
        # CPU per event from here on: the events still to come at this moment.
        profiler = Profiler(relay.pid, run.results_dir / f"profile-{relay.names.table}.txt")
        await profiler.start()
        walsenders = await walsender_pids(run.admin_url, run.db_name)
        cpu_before = _cpu_now(run.db_name, relay.pid, walsenders)
        remaining = events - sampler.depth
        reached = await sampler.wait_for(events, timeout=max_seconds)
        per_event = _cpu_per_event(
            cpu_before, _cpu_now(run.db_name, relay.pid, walsenders), remaining
        )
        share = cpu.share()
        await profiler.stop()
        metrics = await relay.metrics()
        await proc.stop()
    finally:
        await sampler.stop()
    measured = drain_rate(sampler.samples, events) if reached else None
    return {
        **per_event,
        "events": events,
        "rows_per_txn": rows_per_txn,
        "payload_bytes": payload,
        "insert_seconds": round(insert_s, 2),
        "startup_seconds": round(startup, 2),
        "rate": round(measured[0], 1) if measured else None,
        "drain_seconds": round(measured[2] - measured[1], 2) if measured else None,
        "complete": reached,
        "delivered": sampler.depth,
        "relay_cpu_cores": round(share, 2),
        "relay_rss_max_mib": mib([v for _, v in proc.rss]),
        "parked": counter_value(metrics, "cdc_events_parked_total"),
        "republished": counter_value(metrics, "cdc_republished_total"),
    }


async def drain(run: Run, p: Params, ceiling_rate: float | None) -> dict[str, Any]:
    """Relay backlog drains (100 rows/txn, 500 B) interleaved with broker ceilings.

    The order is C D C D C ..: the run's first ceiling, then ``drain_pairs`` times a relay
    drain followed by a ceiling. The broker's rate on a shared machine moves by more than
    10% within minutes, so each drain is compared with the ceilings measured right before
    and right after it (paired ratio, to their mean), and the figure reported is the median
    of the paired ratios, with their range.
    """
    ceilings: list[float | None] = [ceiling_rate]
    runs: list[dict[str, Any]] = []
    default = relay_window()
    windows = p.relay_windows or (default,)
    for i in range(p.drain_pairs * len(windows)):
        window = windows[i % len(windows)]
        async with relay_scenario(run, f"drain{i}", CDC_MAX_IN_FLIGHT=str(window)) as relay:
            result = await _drain(
                run, relay, events=p.drain_events, rows_per_txn=p.backlog_rows_per_txn,
                payload=p.payload_size, max_seconds=p.max_drain_seconds,
            )
        after = await ceiling(run, p, f"ceiling_after{i}")
        ceilings.append(after.get("rate"))
        result["ceiling_before"] = ceilings[-2]
        result["ceiling_after"] = ceilings[-1]
        result["ceiling_after_cpu_us_per_event"] = after.get("cpu_us_per_event")
        result["ratio_to_ceiling"] = paired_ratio(result["rate"], ceilings[-2], ceilings[-1])
        result["relay_window"] = window
        runs.append(result)
    by_window: dict[str, dict[str, Any]] = {}
    for window in windows:
        paired = [r["ratio_to_ceiling"] for r in runs
                  if r["relay_window"] == window and r["ratio_to_ceiling"]]
        by_window[str(window)] = {
            "median": round(statistics.median(paired), 3) if paired else None,
            "ratios": paired,
        }
    # The headline is the relay at its default window (what a user gets).
    runs_at = [r for r in runs if r["relay_window"] == default] or runs
    ratios = [r["ratio_to_ceiling"] for r in runs_at if r["ratio_to_ceiling"]]
    drained = [r["rate"] for r in runs_at if r["rate"]]
    shares = [r["relay_cpu_cores"] for r in runs_at]
    return {
        "pairs": runs,
        "by_relay_window": by_window,
        "ceilings": ceilings,
        "ratio_to_ceiling": round(statistics.median(ratios), 3) if ratios else None,
        "ratio_range": [min(ratios), max(ratios)] if ratios else None,
        "rate": round(statistics.median(drained), 1) if drained else None,
        "rate_range": [min(drained), max(drained)] if drained else None,
        "relay_cpu_cores": round(statistics.median(shares), 2) if shares else None,
        "relay_rss_max_mib": max((r["relay_rss_max_mib"] or 0 for r in runs), default=None),
        "complete": all(r["complete"] for r in runs),
        "events": p.drain_events,
        "method": "C D C D ..: each drain's rate over the mean of the ceilings right before "
                  "and after it; median and range of those paired ratios",
    }


def _window_latencies(
    arrivals: list[tuple[float, str, str]], start: float, end: float
) -> tuple[list[float], list[float], int]:
    """For events committed in ``[start, end]`` (epoch): latencies (s) from ``commit_time``
    and from ``created_at``; and how many arrived in that window by arrival time."""
    from_commit: list[float] = []
    from_created: list[float] = []
    arrived = 0
    for arrival, commit_time, created_at in arrivals:
        if start <= arrival <= end:
            arrived += 1
        if commit_time:
            committed = epoch(commit_time)
            if start <= committed <= end:
                from_commit.append(arrival - committed)
                if created_at:
                    from_created.append(arrival - epoch(created_at))
    return from_commit, from_created, arrived


async def _offered_load(
    run: Run, relay: RelayProcess, proc: ProcessSampler, *, rate: float, seconds: float,
    warmup: float, rows_per_txn: int, payload: int, catch_up: float = 30.0,
) -> dict[str, Any]:
    """One load level: paced writer, scrape before/after, CPU and RSS over the window, then
    wait (bounded) until the relay has confirmed everything offered, so the level's slowest
    events are in its latency figures and do not spill into the next level."""
    published_before = counter_value(await relay.metrics(), PUBLISHED)
    writer = asyncio.create_task(paced_writer(
        run.db_url, relay.names.table, rate=rate, duration=warmup + seconds,
        rows_per_txn=rows_per_txn, payload_size=payload,
    ))
    try:
        await asyncio.sleep(warmup)
        window_start, mono_start = time.time(), time.monotonic()
        before = histogram_buckets(await relay.metrics(), HISTOGRAM)
        cpu = CpuWindow(proc)
        offered = await writer
    finally:
        if not writer.done():
            writer.cancel()
    window_end, mono_end = time.time(), time.monotonic()
    share = cpu.share()
    after = histogram_buckets(await relay.metrics(), HISTOGRAM)
    rss = proc.rss_between(mono_start, mono_end)
    target = published_before + offered.rows
    published = counter_value(await relay.metrics(), PUBLISHED)
    while published < target and time.monotonic() - mono_end < catch_up:
        await asyncio.sleep(0.2)
        published = counter_value(await relay.metrics(), PUBLISHED)
    caught_up = time.monotonic() - mono_end
    await asyncio.sleep(0.5)  # confirmed -> delivered to the consumer
    histogram = {
        f"p{int(q * 100)}_ms": (round(v * 1000, 2) if v is not None else None)
        for q in (0.5, 0.95, 0.99)
        for v in [histogram_quantile(before, after, q)]
    }
    return {
        "target_rate": round(rate, 1),
        "offered_rate": round(offered.rate, 1),
        "rows_per_txn": rows_per_txn,
        "payload_bytes": payload,
        "window": (window_start, window_end),
        "relay_cpu_cores": round(share, 2),
        "relay_rss_max_mib": mib(rss),
        "relay_histogram": histogram,
        "catch_up_s": round(caught_up, 1),
        "unconfirmed_after_catch_up": max(0, int(target - published)),
    }


async def measure_loads(
    run: Run, label: str, loads: list[tuple[str, float]], *, seconds: float, warmup: float,
    rows_per_txn: int, payload: int,
) -> dict[str, dict[str, Any]]:
    """Start a relay, then measure the ``loads`` on it (see :func:`loads_on`)."""
    async with relay_scenario(run, label) as relay:
        await relay.start()
        return await loads_on(run, relay, label, loads, seconds=seconds, warmup=warmup,
                              rows_per_txn=rows_per_txn, payload=payload)


async def loads_on(
    run: Run, relay: RelayProcess, label: str, loads: list[tuple[str, float]], *,
    seconds: float, warmup: float, rows_per_txn: int, payload: int,
) -> dict[str, dict[str, Any]]:
    """With a latency consumer on ``relay``'s queue, offer each ``(key, rate)`` in turn."""
    await run.purge(relay.names.queue)
    consumer = NodeConsumer(run.amqp_url, relay.names.queue,
                            run.results_dir / f"arrivals-{label}.tsv")
    await consumer.start()
    proc = ProcessSampler(relay.pid)
    proc.start()
    levels: dict[str, dict[str, Any]] = {}
    try:
        for key, rate in loads:
            levels[key] = await _offered_load(
                run, relay, proc, rate=rate, seconds=seconds, warmup=warmup,
                rows_per_txn=rows_per_txn, payload=payload,
            )
    finally:
        await proc.stop()
        arrivals = await consumer.stop()
    for level in levels.values():
        start, end = level.pop("window")
        from_commit, from_created, arrived = _window_latencies(arrivals, start, end)
        level["delivered_rate"] = round(arrived / (end - start), 1)
        level["latency"] = latency_summary(from_commit)
        level["latency_from_created_at"] = latency_summary(from_created)
    return levels


async def steady(run: Run, p: Params, ceiling_rate: float) -> dict[str, Any]:
    """Offered load at fractions of the ceiling; commit->consumer latency, relay CPU/RSS."""
    loads = [(f"{int(f * 100)}%", f * ceiling_rate) for f in p.steady_levels]
    levels = await measure_loads(
        run, "steady", loads, seconds=p.steady_seconds, warmup=p.steady_warmup,
        rows_per_txn=p.steady_rows_per_txn, payload=p.payload_size,
    )
    return {
        "ceiling_rate": ceiling_rate,
        "seconds_per_level": p.steady_seconds,
        "latency_method": "arrival at an auto-ack consumer of the bound queue minus the "
                          "commit_time header; relay_histogram = the relay's "
                          "cdc_confirm_latency_seconds (commit -> broker confirm), bucket-"
                          "interpolated",
        "levels": levels,
    }


async def shape(run: Run, p: Params) -> dict[str, Any]:
    """Drain rate and latency against payload size and transaction size."""
    points = [(size, p.backlog_rows_per_txn) for size in p.shape_payloads]
    points += [(p.payload_size, txn) for txn in p.shape_txn_sizes]
    out: dict[str, Any] = {"events": p.shape_events, "latency_rate": p.shape_rate, "points": []}
    for size, txn in points:
        label = f"shape_{size}b_{txn}r"
        async with relay_scenario(run, label) as relay:
            result = await _drain(run, relay, events=p.shape_events, rows_per_txn=txn,
                                  payload=size, max_seconds=p.max_drain_seconds)
            loads = await loads_on(
                run, relay, label, [("load", p.shape_rate)], seconds=p.shape_seconds,
                warmup=1.0, rows_per_txn=min(txn, 10), payload=size,
            )
        out["points"].append({
            "payload_bytes": size, "rows_per_txn": txn, "drain_rate": result["rate"],
            "drain_complete": result["complete"], "latency": loads["load"]["latency"],
            "latency_rows_per_txn": loads["load"]["rows_per_txn"],
            "relay_histogram": loads["load"]["relay_histogram"],
        })
    return out


async def _slot_confirmed(db_url: str, slot: str, lsn: str) -> bool:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as db:
        cur = await db.execute(
            "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots"
            " WHERE slot_name = %s", (lsn, slot),
        )
        row = await cur.fetchone()
    return bool(row and row[0])


async def rss(run: Run, p: Params) -> dict[str, Any]:
    """RSS of the relay sampled through a large backlog drain (done = slot confirmed past it).

    The queue keeps only the newest ``rss_queue_cap`` messages (drop-head, still persisted
    and confirmed) so a million events do not sit in the shared broker.
    """
    async with relay_scenario(run, "rss", max_length=p.rss_queue_cap) as relay:
        insert_s = await insert_backlog(
            run.db_url, relay.names.table, p.rss_events,
            rows_per_txn=p.backlog_rows_per_txn, payload_size=p.payload_size,
        )
        async with await psycopg.AsyncConnection.connect(run.db_url, autocommit=True) as db:
            cur = await db.execute("SELECT pg_current_wal_lsn()::text")
            row = await cur.fetchone()
        assert row is not None
        end_lsn = str(row[0])
        await relay.start()
        proc = ProcessSampler(relay.pid, interval=0.5)
        proc.start()
        started = time.monotonic()
        deadline = started + p.rss_max_seconds
        done = False
        try:
            while time.monotonic() < deadline:
                if await _slot_confirmed(run.db_url, relay.names.slot, end_lsn):
                    done = True
                    break
                await asyncio.sleep(0.5)
            elapsed = time.monotonic() - started
        finally:
            await proc.stop()
        samples = [v for _, v in proc.rss]
        metrics = await relay.metrics()
    step = max(1, len(proc.rss) // 200)
    return {
        "events": p.rss_events,
        "insert_seconds": round(insert_s, 2),
        "complete": done,
        "cut_after_s": None if done else p.rss_max_seconds,
        "seconds": round(elapsed, 1),
        "rate_incl_startup": round(p.rss_events / elapsed, 1) if done else None,
        "published": counter_value(metrics, "cdc_events_published_total"),
        "rss_samples": len(samples),
        "rss_max_mib": mib(samples),
        "rss_first_mib": round(samples[0] / 2**20, 1) if samples else None,
        "rss_last_mib": round(samples[-1] / 2**20, 1) if samples else None,
        # Bounded = the second half of the drain peaks no higher than the first half did.
        "rss_growth_second_half_mib": (
            round((max(samples[len(samples) // 2:]) - max(samples[:len(samples) // 2]))
                  / 2**20, 1) if len(samples) >= 4 else None
        ),
        "rss_series_mib": [
            (round(t - started, 1), round(v / 2**20, 1)) for t, v in proc.rss[::step]
        ],
    }
